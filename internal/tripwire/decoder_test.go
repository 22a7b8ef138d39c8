package tripwire

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"slices"
	"testing"
)

// loadCapture reads testdata/drop-table.wal.gz: WAL of a real PostgreSQL 15
// around a DROP TABLE (written by TestRealWAL with -update).
func loadCapture(t testing.TB) (LSN, []byte) {
	t.Helper()
	b, err := os.ReadFile("testdata/drop-table.wal.gz")
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(zr)
	if err != nil || len(all) < 8 {
		t.Fatalf("capture: %v", err)
	}
	return LSN(binary.LittleEndian.Uint64(all)), all[8:]
}

func feedAll(d *Decoder, start LSN, wal []byte, piece int) ([]Event, []error) {
	var events []Event
	var errs []error
	for pos := 0; pos < len(wal); pos += piece {
		ev, err := d.Feed(start+LSN(pos), wal[pos:min(pos+piece, len(wal))])
		events = append(events, ev...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	return events, errs
}

func TestCapture(t *testing.T) {
	start, wal := loadCapture(t)
	var want []Event
	// The events must not depend on how the stream is cut into pieces.
	for _, piece := range []int{len(wal), pageSize, 1000, 7, 1} {
		events, errs := feedAll(NewDecoder(Options{}), start, wal, piece)
		if len(errs) > 0 {
			t.Fatalf("pieces of %d: %v", piece, errs)
		}
		if len(events) != 1 || events[0].Kind != RelationsDropped || len(events[0].Relations) != 4 {
			t.Fatalf("pieces of %d: events %+v, want one drop of 4 relations", piece, events)
		}
		if want == nil {
			want = events
		} else if !eventsEqual(events, want) {
			t.Fatalf("pieces of %d: %+v, want %+v", piece, events, want)
		}
	}
}

func eventsEqual(a, b []Event) bool {
	return slices.EqualFunc(a, b, func(x, y Event) bool {
		return x.Kind == y.Kind && x.LSN == y.LSN && x.XID == y.XID && x.Time.Equal(y.Time) &&
			slices.Equal(x.Relations, y.Relations)
	})
}

// A decoder may start at any page: a record continued from the page
// before is skipped, and every page from there on decodes.
func TestStartAtAnyPage(t *testing.T) {
	start, wal := loadCapture(t)
	full, _ := feedAll(NewDecoder(Options{}), start, wal, len(wal))
	commit := full[0].CommitLSN
	for off := 0; off < len(wal); off += pageSize {
		events, errs := feedAll(NewDecoder(Options{}), start+LSN(off), wal[off:], 3000)
		if len(errs) > 0 {
			t.Fatalf("from page %s: %v", start+LSN(off), errs)
		}
		if start+LSN(off) <= commit-commit%pageSize {
			if !eventsEqual(events, full) {
				t.Errorf("from page %s: %+v, want %+v", start+LSN(off), events, full)
			}
		}
	}
}

func TestFeedOrder(t *testing.T) {
	start, wal := loadCapture(t)
	d := NewDecoder(Options{})
	if _, err := d.Feed(start+8, wal[8:100]); !errors.Is(err, ErrNotPageAligned) {
		t.Fatalf("mid-page start: %v, want ErrNotPageAligned", err)
	}
	if _, err := d.Feed(start, wal[:100]); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Feed(start+200, wal[200:300]); !errors.Is(err, ErrGap) {
		t.Fatalf("gap: %v, want ErrGap", err)
	}
	if d.Next() != start+100 {
		t.Fatalf("Next %s after a refused feed, want %s", d.Next(), start+100)
	}
}

// A bit flipped inside the commit record fails its CRC: the decoder
// reports it and raises nothing from the damaged record.
func TestCorruptCommit(t *testing.T) {
	start, wal := loadCapture(t)
	full, _ := feedAll(NewDecoder(Options{}), start, wal, len(wal))
	at := int(full[0].CommitLSN-start) + recHeader + 2 // in the main data
	bad := slices.Clone(wal)
	bad[at] ^= 0x10
	events, errs := feedAll(NewDecoder(Options{}), start, bad, 4096)
	if len(events) != 0 {
		t.Errorf("corrupt commit raised %+v", events)
	}
	if len(errs) == 0 || !bytes.Contains([]byte(errors.Join(errs...).Error()), []byte("CRC mismatch")) {
		t.Errorf("errors %v, want a CRC mismatch", errs)
	}
}

// A record header claiming 4 GiB must not make the decoder buffer (or
// allocate) anything near that.
func TestHugeTotLen(t *testing.T) {
	page := make([]byte, 3*pageSize)
	for i := range 3 {
		p := page[i*pageSize:]
		binary.LittleEndian.PutUint16(p[0:], pageMagic)
		binary.LittleEndian.PutUint64(p[8:], uint64(i*pageSize))
		if i > 0 {
			binary.LittleEndian.PutUint16(p[2:], xlpFirstIsContRecord)
			binary.LittleEndian.PutUint32(p[16:], 0xFFFFFFF0-uint32(i*(pageSize-shortHeader)))
		}
	}
	binary.LittleEndian.PutUint32(page[shortHeader:], 0xFFFFFFF0)
	for _, max := range []int{0, 1 << 30} {
		d := NewDecoder(Options{MaxRecordSize: max})
		_, err := d.Feed(0, page)
		if cap(d.buf) > 2*len(page) {
			t.Errorf("MaxRecordSize %d: buffered %d bytes from %d fed", max, cap(d.buf), len(page))
		}
		if max == 0 && err == nil {
			t.Errorf("MaxRecordSize %d: no error for a 4 GiB record", max)
		}
	}
}

func FuzzDecoder(f *testing.F) {
	start, wal := loadCapture(f)
	f.Add(uint64(start), wal, uint16(0))
	f.Add(uint64(start), wal[:len(wal)/2], uint16(5000))
	f.Add(uint64(start), wal[pageSize:], uint16(77))
	flipped := slices.Clone(wal)
	flipped[len(flipped)/3] ^= 1
	f.Add(uint64(start), flipped, uint16(1))
	f.Add(uint64(0), []byte{}, uint16(0))
	f.Fuzz(func(t *testing.T, lsn uint64, data []byte, split uint16) {
		lsn -= lsn % pageSize
		d := NewDecoder(Options{MaxRecordSize: 1 << 20, MassRows: 1})
		cut := min(int(split), len(data))
		next := LSN(lsn)
		// Each step consumes at least one byte, so Feed always returns.
		for _, part := range [][]byte{data[:cut], data[cut:]} {
			if _, err := d.Feed(next, part); errors.Is(err, ErrGap) || errors.Is(err, ErrNotPageAligned) {
				t.Fatal(err)
			}
			next += LSN(len(part))
		}
		if d.Next() != next {
			t.Fatalf("Next %s after feeding up to %s", d.Next(), next)
		}
		if cap(d.buf) > 2*len(data)+1<<10 {
			t.Fatalf("buffered %d bytes from %d fed", cap(d.buf), len(data))
		}
	})
}
