package chunker

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
)

var update = flag.Bool("update", false, "rewrite testdata/golden.txt")

// smallParams make many chunks out of little data, so tests stay fast under
// -race; the code paths are the same as for DefaultParams.
var smallParams = Params{Min: 2 << 10, Avg: 8 << 10, Max: 64 << 10}

var testGear = NewGear([32]byte{'t', 'e', 's', 't'})

func randomData(seed byte, n int) []byte {
	data := make([]byte, n)
	rand.NewChaCha8([32]byte{seed}).Read(data)
	return data
}

// refLengths is the cut rule of the Chunker doc comment written as plainly as
// possible, over data held whole; the buffered Chunker must agree with it.
func refLengths(data []byte, g *Gear, p Params) []int {
	k := 0
	for 1<<k < p.Avg {
		k++
	}
	var out []int
	for len(data) > 0 {
		n := len(data)
		if n > p.Max {
			n = p.Max
		}
		if n > p.Min {
			var fp uint64
			for i := max(p.Min-64, 0); i < n; i++ {
				fp = fp<<1 + g.table[data[i]]
				if i < p.Min {
					continue
				}
				bits := k - 2
				if i < p.Avg {
					bits = k + 2
				}
				if fp>>(64-bits) == 0 {
					n = i + 1
					break
				}
			}
		}
		out = append(out, n)
		data = data[n:]
	}
	return out
}

// chunkAll drains s, checking the error contract on the way.
func chunkAll(t testing.TB, s Splitter) [][]byte {
	t.Helper()
	var chunks [][]byte
	for {
		chunk, err := s.Next(nil)
		if err == io.EOF {
			if chunk != nil {
				t.Fatalf("Next returned %d bytes with io.EOF", len(chunk))
			}
			if _, err := s.Next(nil); err != io.EOF {
				t.Fatalf("Next after io.EOF: err = %v, want io.EOF", err)
			}
			return chunks
		}
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		if len(chunk) == 0 {
			t.Fatal("Next returned an empty chunk")
		}
		chunks = append(chunks, chunk)
	}
}

func lengths(chunks [][]byte) []int {
	out := make([]int, len(chunks))
	for i, c := range chunks {
		out[i] = len(c)
	}
	return out
}

// checkChunks checks reassembly and the size bounds.
func checkChunks(t testing.TB, data []byte, chunks [][]byte, p Params) {
	t.Helper()
	if got := bytes.Join(chunks, nil); !bytes.Equal(got, data) {
		t.Fatalf("chunks join to %d bytes that differ from the %d input bytes", len(got), len(data))
	}
	for i, c := range chunks {
		last := i == len(chunks)-1
		if len(c) > p.Max || (!last && len(c) < p.Min) {
			t.Fatalf("chunk %d of %d: length %d outside [%d, %d]", i, len(chunks), len(c), p.Min, p.Max)
		}
	}
}

func TestChunker(t *testing.T) {
	zeros := make([]byte, 5*DefaultParams.Max+123)
	tests := []struct {
		name string
		data []byte
		p    Params
		want []int // chunk lengths; nil means only check invariants
	}{
		{"empty", nil, DefaultParams, []int{}},
		{"one byte", []byte{7}, DefaultParams, []int{1}},
		{"below min", randomData(1, DefaultParams.Min-1), DefaultParams, []int{DefaultParams.Min - 1}},
		{"exactly min", randomData(1, DefaultParams.Min), DefaultParams, []int{DefaultParams.Min}},
		{"exactly max zeros", zeros[:DefaultParams.Max], DefaultParams, []int{DefaultParams.Max}},
		{"max+1 zeros", zeros[:DefaultParams.Max+1], DefaultParams, []int{DefaultParams.Max, 1}},
		{"all zeros", zeros, DefaultParams, []int{
			DefaultParams.Max, DefaultParams.Max, DefaultParams.Max, DefaultParams.Max, DefaultParams.Max, 123}},
		{"random default", randomData(2, 16<<20), DefaultParams, nil},
		{"random exactly max", randomData(3, DefaultParams.Max), DefaultParams, nil},
		{"random small", randomData(4, 4<<20), smallParams, nil},
		{"min equals max", randomData(5, 10000), Params{Min: 1024, Avg: 1024, Max: 1024}, nil},
		{"tiny", randomData(6, 10000), Params{Min: 1, Avg: 4, Max: 4}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			chunks := chunkAll(t, New(bytes.NewReader(tt.data), testGear, tt.p))
			checkChunks(t, tt.data, chunks, tt.p)
			got := lengths(chunks)
			if ref := refLengths(tt.data, testGear, tt.p); !equalInts(got, ref) {
				t.Fatalf("lengths differ from the reference cut rule:\n got %v\nwant %v", got, ref)
			}
			if tt.want != nil && !equalInts(got, tt.want) {
				t.Fatalf("lengths = %v, want %v", got, tt.want)
			}
			if tt.p.Min == tt.p.Max {
				for i, n := range got[:max(len(got)-1, 0)] {
					if n != tt.p.Max {
						t.Fatalf("chunk %d: length %d, want %d", i, n, tt.p.Max)
					}
				}
			}
		})
	}
}

// TestMeanSize guards the mask arithmetic: on random data the mean chunk is
// between Avg and 2*Avg (Min skipping pushes it above Avg).
func TestMeanSize(t *testing.T) {
	data := randomData(7, 8<<20)
	for _, p := range []Params{smallParams, {Min: 16 << 10, Avg: 64 << 10, Max: 256 << 10}} {
		n := len(chunkAll(t, New(bytes.NewReader(data), testGear, p)))
		if mean := len(data) / n; mean < p.Avg || mean > 2*p.Avg {
			t.Errorf("params %v: mean chunk %d bytes, want within [%d, %d]", p, mean, p.Avg, 2*p.Avg)
		}
	}
}

// randReader returns reads of random sizes between 0 and 3*max/2 bytes.
type randReader struct {
	r   io.Reader
	rng *rand.Rand
	max int
}

func (r *randReader) Read(p []byte) (int, error) {
	n := r.rng.IntN(r.max*3/2 + 1)
	return r.r.Read(p[:min(n, len(p))])
}

// TestReaders checks that boundaries do not depend on how the reader splits
// its data, including readers returning data together with io.EOF and
// zero-length reads.
func TestReaders(t *testing.T) {
	data := randomData(8, 600<<10)
	want := lengths(chunkAll(t, New(bytes.NewReader(data), testGear, smallParams)))
	readers := map[string]func() io.Reader{
		"one byte":      func() io.Reader { return iotest.OneByteReader(bytes.NewReader(data)) },
		"half":          func() io.Reader { return iotest.HalfReader(bytes.NewReader(data)) },
		"data with eof": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(data)) },
		"random sizes": func() io.Reader {
			return &randReader{bytes.NewReader(data), rand.New(rand.NewPCG(1, 2)), smallParams.Max}
		},
		"bufio": func() io.Reader { return bufio.NewReaderSize(bytes.NewReader(data), 1000) },
	}
	for name, rd := range readers {
		t.Run(name, func(t *testing.T) {
			chunks := chunkAll(t, New(rd(), testGear, smallParams))
			checkChunks(t, data, chunks, smallParams)
			if got := lengths(chunks); !equalInts(got, want) {
				t.Fatalf("lengths %v, want %v", got, want)
			}
		})
	}
}

func TestReset(t *testing.T) {
	a, b := randomData(9, 300<<10), randomData(10, 200<<10)
	c := New(bytes.NewReader(a), testGear, smallParams)
	if _, err := c.Next(nil); err != nil { // leave a partly consumed buffer behind
		t.Fatal(err)
	}
	c.Reset(bytes.NewReader(b))
	checkChunks(t, b, chunkAll(t, c), smallParams)
}

func TestDeterminism(t *testing.T) {
	data := randomData(11, 1<<20)
	first := lengths(chunkAll(t, New(bytes.NewReader(data), NewGear([32]byte{1}), smallParams)))
	second := lengths(chunkAll(t, New(bytes.NewReader(data), NewGear([32]byte{1}), smallParams)))
	if !equalInts(first, second) {
		t.Fatalf("same key and data, different chunks:\n%v\n%v", first, second)
	}
}

func TestKeysDiffer(t *testing.T) {
	data := randomData(12, 1<<20)
	a := boundaries(lengths(chunkAll(t, New(bytes.NewReader(data), NewGear([32]byte{1}), smallParams))))
	b := boundaries(lengths(chunkAll(t, New(bytes.NewReader(data), NewGear([32]byte{2}), smallParams))))
	shared := 0
	for off := range a {
		if b[off] {
			shared++
		}
	}
	// About 100 boundaries each; a coincidence needs a cut at the very same
	// offset, which independent tables make rare.
	if shared > len(a)/10 {
		t.Fatalf("%d of %d boundaries shared between two keys", shared, len(a))
	}
	if NewGear([32]byte{1}).table == NewGear([32]byte{2}).table {
		t.Fatal("different keys gave the same gear table")
	}
}

// boundaries returns the end offsets of chunks of the given lengths.
func boundaries(ls []int) map[int]bool {
	m := make(map[int]bool, len(ls))
	off := 0
	for _, n := range ls {
		off += n
		m[off] = true
	}
	return m
}

// TestInsertionResync checks the point of content-defined chunking: bytes
// inserted in the middle change only the chunks around them.
func TestInsertionResync(t *testing.T) {
	data := randomData(13, 2<<20)
	orig := chunkAll(t, New(bytes.NewReader(data), testGear, smallParams))
	have := make(map[string]bool, len(orig))
	for _, c := range orig {
		have[string(c)] = true
	}
	for _, ins := range []int{1, 7, 100, 5000} {
		t.Run(fmt.Sprint(ins), func(t *testing.T) {
			mid := len(data) / 2
			mod := append(append(append([]byte{}, data[:mid]...), randomData(14, ins)...), data[mid:]...)
			chunks := chunkAll(t, New(bytes.NewReader(mod), testGear, smallParams))
			checkChunks(t, mod, chunks, smallParams)
			newChunks, newBytes := 0, 0
			for _, c := range chunks {
				if !have[string(c)] {
					newChunks++
					newBytes += len(c)
				}
			}
			// The insertion lands in one chunk; the cut after it may fall
			// differently, rarely more than once before the boundaries meet
			// again.
			if newChunks > 3 || newBytes > 3*smallParams.Max {
				t.Fatalf("%d-byte insertion: %d new chunks, %d new bytes of %d", ins, newChunks, newBytes, len(mod))
			}
			t.Logf("%d-byte insertion: %d new chunks of %d, %d new bytes", ins, newChunks, len(chunks), newBytes)
		})
	}
}

type errReader struct {
	r   io.Reader
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err == io.EOF {
		return n, e.err
	}
	return n, err
}

func TestReadError(t *testing.T) {
	boom := errors.New("boom")
	data := randomData(15, 3*smallParams.Max)
	c := New(&errReader{bytes.NewReader(data), boom}, testGear, smallParams)
	var err error
	for err == nil {
		_, err = c.Next(nil)
	}
	if !errors.Is(err, boom) || !strings.HasPrefix(err.Error(), "chunker: ") {
		t.Fatalf("Next error = %v, want chunker-prefixed wrap of %v", err, boom)
	}
	if _, err2 := c.Next(nil); err2 != err {
		t.Fatalf("error not sticky: then %v, now %v", err, err2)
	}
}

type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }

func TestNoProgress(t *testing.T) {
	if _, err := New(zeroReader{}, testGear, smallParams).Next(nil); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("err = %v, want io.ErrNoProgress", err)
	}
	if _, err := NewPages(zeroReader{}, 0).Next(nil); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("pages: err = %v, want io.ErrNoProgress", err)
	}
}

func TestNextAllocs(t *testing.T) {
	data := randomData(16, 1<<20)
	rd := bytes.NewReader(data)
	c := New(rd, testGear, smallParams)
	buf := make([]byte, smallParams.Max)
	c.Next(buf) // allocates the Chunker's buffer
	allocs := testing.AllocsPerRun(100, func() {
		chunk, err := c.Next(buf)
		if err == io.EOF {
			rd.Reset(data)
			c.Reset(rd)
		}
		if chunk != nil {
			buf = chunk
		}
	})
	if allocs != 0 {
		t.Fatalf("Next allocates %v times per chunk, want 0", allocs)
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		p  Params
		ok bool
	}{
		{DefaultParams, true},
		{Params{1, 4, 4}, true},
		{Params{4, 4, 4}, true},
		{Params{MaxSize / 2, MaxSize / 2, MaxSize}, true},
		{Params{0, 4, 8}, false},
		{Params{1, 2, 8}, false},
		{Params{1, 6, 8}, false},
		{Params{8, 4, 16}, false},
		{Params{1, 16, 8}, false},
		{Params{1, MaxSize, MaxSize + 1}, false},
	}
	for _, tt := range tests {
		t.Run(tt.p.String(), func(t *testing.T) {
			err := tt.p.Validate()
			if (err == nil) != tt.ok {
				t.Fatalf("Validate() = %v, want ok %v", err, tt.ok)
			}
			if err != nil && !strings.HasPrefix(err.Error(), "chunker: ") {
				t.Fatalf("error %q lacks the package prefix", err)
			}
		})
	}
}

func TestNewPanics(t *testing.T) {
	for name, f := range map[string]func(){
		"bad params": func() { New(nil, testGear, Params{}) },
		"nil gear":   func() { New(nil, nil, DefaultParams) },
		"bad page":   func() { NewPages(nil, -1) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			f()
		})
	}
}

// TestGolden pins the vault format: the gear derivation and the cut rule.
// A change here means existing repositories stop deduplicating against new
// backups; regenerate with -update only for a deliberate format version bump.
func TestGolden(t *testing.T) {
	var b strings.Builder
	g := NewGear([32]byte{'g', 'o', 'l', 'd', 'e', 'n'})
	fmt.Fprintf(&b, "gear[0..3] %016x %016x %016x %016x\n", g.table[0], g.table[1], g.table[2], g.table[3])
	fmt.Fprintf(&b, "gear[255] %016x\n", g.table[255])
	data := randomData(17, 1<<20)
	for _, p := range []Params{smallParams, {Min: 16 << 10, Avg: 64 << 10, Max: 256 << 10}} {
		fmt.Fprintf(&b, "%v %v\n", p, lengths(chunkAll(t, New(bytes.NewReader(data), g, p))))
	}
	path := filepath.Join("testdata", "golden.txt")
	if *update {
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if b.String() != string(want) {
		t.Fatalf("chunking changed (vault format!):\n got %s\nwant %s", b.String(), want)
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
