package tripwire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Errors returned by [Decoder.Feed].
var (
	// ErrGap: the bytes fed do not start where the previous call ended.
	ErrGap = errors.New("tripwire: WAL fed out of order")
	// ErrNotPageAligned: the first call must start on a WAL page boundary.
	ErrNotPageAligned = errors.New("tripwire: first WAL fed must start on a page boundary")
)

// Options tune a [Decoder]. The zero value is usable.
type Options struct {
	// MassRows is how many rows of one relation a transaction must delete
	// (or update) to raise MassDelete (MassUpdate). 0 means 10000: pgbench
	// and ordinary OLTP change a handful of rows per transaction, while a
	// forgotten WHERE on any table worth alerting about changes far more.
	MassRows int64
	// MaxRecordSize caps the bytes buffered for one record; larger records
	// are skipped unread and reported. 0 means 64 MiB: the largest records
	// PostgreSQL 15 writes in practice (full-page images for 32 blocks,
	// commit records listing thousands of relations) are a few MiB, and the
	// cap keeps a corrupt xl_tot_len from buffering up to 4 GiB.
	MaxRecordSize int
	// SegmentSize is the WAL segment size, needed only until the first
	// long page header (which carries it) when starting mid-segment.
	// 0 means 16 MiB, initdb's default.
	SegmentSize int
	// MaxTransactions caps the transactions tracked at once; records of
	// further ones are not counted (and reported once). 0 means 65536.
	MaxTransactions int
	// Names names relations and databases in events; nil leaves names empty.
	Names Names
	// OnRecord, when set, is called for every record decoded, in LSN order.
	OnRecord func(*Record)
}

func (o *Options) applyDefaults() {
	if o.MassRows <= 0 {
		o.MassRows = 10000
	}
	if o.MaxRecordSize <= 0 {
		o.MaxRecordSize = 64 << 20
	}
	if o.SegmentSize <= 0 {
		o.SegmentSize = 16 << 20
	}
	if o.MaxTransactions <= 0 {
		o.MaxTransactions = 1 << 16
	}
}

// mode is where the decoder is in the byte stream, outside page headers.
type mode uint8

const (
	modeStart  mode = iota // at a record boundary (after alignment)
	modeRecord             // buffering a record
	modeSkip               // skipping d.skip bytes of a record not kept
	modeResync             // lost: skip to the next page header
	modeEnd                // zeroed space after the last record
	modeSwitch             // after XLOG_SWITCH: skip to the next segment
)

// maxErrors caps the errors one Feed call reports, so that a long run of
// garbage costs bounded memory.
const maxErrors = 16

// Decoder decodes a WAL stream and raises events. It is not safe for
// concurrent use.
type Decoder struct {
	opts    Options
	started bool
	pos     LSN    // next byte expected
	segSize uint64 // from the last long page header

	hdr     [longHeader]byte
	hdrNeed int  // header bytes of the current page
	seen    bool // a page header has been read since the start or a resync

	mode    mode
	buf     []byte // the record being assembled
	totLen  int    // its xl_tot_len, 0 until known
	recLSN  LSN
	skip    int // modeSkip: bytes left
	lastRec LSN // start of the last record decoded, for xl_prev
	rec     Record

	tx     *tracker
	events []Event
	errs   []error
}

// NewDecoder returns a decoder with opts.
func NewDecoder(opts Options) *Decoder {
	opts.applyDefaults()
	return &Decoder{opts: opts, segSize: uint64(opts.SegmentSize), tx: newTracker(&opts)}
}

// Next is the LSN the next Feed must start at (zero before the first).
func (d *Decoder) Next() LSN { return d.pos }

// Feed decodes data, the WAL bytes starting at lsn. The first call must
// start on a page boundary (a record that began earlier is skipped); each
// later one where the previous ended, else Feed returns ErrGap and
// consumes nothing. Feed returns the events completed by data, valid
// until the next call. A non-nil error other than ErrGap and
// ErrNotPageAligned reports corrupt WAL: the decoder skipped it,
// resynchronised at the next page and kept decoding, and the events
// returned alongside are still good.
func (d *Decoder) Feed(lsn LSN, data []byte) ([]Event, error) {
	if !d.started {
		if lsn%pageSize != 0 {
			return nil, fmt.Errorf("%w: %s", ErrNotPageAligned, lsn)
		}
		d.started, d.pos = true, lsn
	} else if lsn != d.pos {
		return nil, fmt.Errorf("%w: got %s, want %s", ErrGap, lsn, d.pos)
	}
	d.events, d.errs = d.events[:0], d.errs[:0]
	for len(data) > 0 {
		n := d.step(data)
		data = data[n:]
		d.pos += LSN(n)
	}
	return d.events, errors.Join(d.errs...)
}

func (d *Decoder) fail(format string, args ...any) {
	d.lastRec = 0 // the chain of xl_prev is broken here
	if len(d.errs) < maxErrors {
		d.errs = append(d.errs, fmt.Errorf("tripwire: "+format, args...))
	}
}

// step consumes at least one byte of data and returns how many.
func (d *Decoder) step(data []byte) int {
	off := int(d.pos % pageSize)
	if d.mode == modeSwitch {
		// The rest of the segment holds no records, only page headers.
		n := int(min(uint64(len(data)), d.segSize-uint64(d.pos)%d.segSize))
		if (uint64(d.pos)+uint64(n))%d.segSize == 0 {
			d.mode = modeStart
		}
		return n
	}
	if off == 0 {
		d.hdrNeed = shortHeader
	}
	if off < d.hdrNeed {
		n := min(d.hdrNeed-off, len(data))
		copy(d.hdr[off:], data[:n])
		if off+n == shortHeader && binary.LittleEndian.Uint16(d.hdr[2:])&xlpLongHeader != 0 {
			d.hdrNeed = longHeader
			return n
		}
		if off+n == d.hdrNeed {
			d.pageHeader()
		}
		return n
	}
	avail := min(len(data), pageSize-off)
	switch d.mode {
	case modeStart:
		if pad := int(-d.pos & 7); pad > 0 {
			return min(pad, avail)
		}
		d.mode, d.buf, d.totLen, d.recLSN = modeRecord, d.buf[:0], 0, d.pos
		return d.record(data[:avail])
	case modeRecord:
		return d.record(data[:avail])
	case modeSkip:
		n := min(d.skip, avail)
		d.skip -= n
		if d.skip == 0 {
			d.mode = modeStart
		}
		return n
	default: // modeResync, modeEnd
		return avail
	}
}

// pageHeader checks the header of the page at d.pos (rounded down) and
// decides how its first bytes continue the stream.
func (d *Decoder) pageHeader() {
	page := d.pos - d.pos%pageSize
	h := d.hdr[:d.hdrNeed]
	magic := binary.LittleEndian.Uint16(h[0:])
	info := binary.LittleEndian.Uint16(h[2:])
	addr := LSN(binary.LittleEndian.Uint64(h[8:]))
	remLen := binary.LittleEndian.Uint32(h[16:])
	if d.mode == modeEnd && magic == 0 {
		return // still in zeroed space
	}
	bad := func(format string, args ...any) {
		d.fail("page %s: "+format, append([]any{page}, args...)...)
		d.mode, d.seen = modeResync, false
	}
	if magic != pageMagic {
		bad("magic %04x, want %04x (PostgreSQL 15, little-endian)", magic, pageMagic)
		return
	}
	if addr != page {
		bad("header says page %s", addr)
		return
	}
	if info&xlpLongHeader != 0 {
		seg := uint64(binary.LittleEndian.Uint32(h[32:]))
		blck := binary.LittleEndian.Uint32(h[36:])
		if seg < 1<<20 || seg > 1<<30 || seg&(seg-1) != 0 || blck != pageSize || uint64(page)%seg != 0 {
			bad("long header with segment size %d, block size %d", seg, blck)
			return
		}
		d.segSize = seg
	}
	cont := info&xlpFirstIsContRecord != 0
	wasSeen := d.seen
	d.seen = true
	switch d.mode {
	case modeRecord:
		if d.totLen == 0 {
			// Impossible: a record starts 8-aligned, so its length field
			// never straddles a page.
			bad("record at %s cut before its length", d.recLSN)
			return
		}
		want := d.totLen - len(d.buf)
		switch {
		case cont && int(remLen) == want:
			return
		case cont:
			d.fail("page %s: continuation of %d bytes, record at %s needs %d", page, remLen, d.recLSN, want)
			d.mode, d.skip = modeSkip, int(remLen)
		case info&xlpFirstIsOverwriteCon != 0:
			// The server crashed mid-record and overwrote the rest: the
			// record never existed.
			d.mode = modeStart
		default:
			d.fail("page %s: record at %s cut off", page, d.recLSN)
			d.mode = modeStart
		}
	case modeSkip:
		if !cont {
			d.fail("page %s: skipped record cut off", page)
			d.mode = modeStart
		} else if int(remLen) != d.skip {
			d.fail("page %s: continuation of %d bytes, want %d", page, remLen, d.skip)
			d.skip = int(remLen)
		}
	default:
		if cont && wasSeen && d.mode == modeStart {
			d.fail("page %s: continuation with no record open", page)
		}
		d.mode = modeStart
		if cont {
			d.mode, d.skip = modeSkip, int(remLen)
		}
	}
	if d.mode == modeSkip && d.skip == 0 {
		d.mode = modeStart
	}
}

// record buffers bytes of the record being assembled (all within one page)
// and decodes it once complete. It returns the bytes consumed.
func (d *Decoder) record(data []byte) int {
	n := 0
	if d.totLen == 0 {
		n = min(4-len(d.buf), len(data))
		d.buf = append(d.buf, data[:n]...)
		if len(d.buf) < 4 {
			return n
		}
		tot := binary.LittleEndian.Uint32(d.buf)
		switch {
		case tot == 0:
			// Zeroed space: the end of the WAL written so far (a segment
			// file read before it was full).
			d.mode = modeEnd
			return n
		case tot < recHeader:
			d.fail("record at %s: xl_tot_len %d", d.recLSN, tot)
			d.mode, d.seen = modeResync, false
			return n
		case uint64(tot) > uint64(d.opts.MaxRecordSize):
			d.fail("record at %s: %d bytes, over the %d byte limit: skipped", d.recLSN, tot, d.opts.MaxRecordSize)
			d.mode, d.skip = modeSkip, int(tot)-4
			return n
		}
		d.totLen = int(tot)
		data = data[n:]
	}
	m := min(d.totLen-len(d.buf), len(data))
	d.buf = append(d.buf, data[:m]...)
	n += m
	if len(d.buf) == d.totLen {
		d.mode = modeStart
		d.decode(d.pos + LSN(n))
	}
	return n
}

// decode handles the complete record in d.buf, which ends just before end.
func (d *Decoder) decode(end LSN) {
	rec := &d.rec
	if err := decodeRecord(d.buf, rec); err != nil {
		d.fail("record at %s: %v", d.recLSN, err)
		d.mode, d.seen = modeResync, false
		return
	}
	rec.LSN, rec.End = d.recLSN, end
	if d.lastRec != 0 && rec.Prev != d.lastRec {
		d.fail("record at %s: xl_prev %s, previous record at %s", rec.LSN, rec.Prev, d.lastRec)
	}
	d.lastRec = rec.LSN
	if d.opts.OnRecord != nil {
		d.opts.OnRecord(rec)
	}
	if rec.RmID == RmXLOG && rec.Info&0xF0 == xlogSwitch {
		d.mode = modeSwitch
		if uint64(end)%d.segSize == 0 {
			d.mode = modeStart
		}
	}
	if cap(d.buf) > 1<<20 {
		d.buf = nil // do not pin one huge record's buffer
	}
	d.events = d.tx.record(rec, d.events)
	if err := d.tx.takeErr(); err != nil {
		d.fail("record at %s: %v", rec.LSN, err)
	}
}

// xlogSwitch is XLOG_SWITCH, RM_XLOG_ID's "rest of segment unused" record.
const xlogSwitch = 0x40
