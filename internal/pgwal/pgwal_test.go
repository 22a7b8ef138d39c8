package pgwal

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

const seg = 1 << 20 // the smallest segment size keeps tests fast

// stream returns n bytes of WAL-like data for LSNs [start, start+n): the
// byte at an LSN depends only on the LSN and seed, so two writers of the
// same range write the same bytes. Half the bytes are constant per 8 KiB
// page, like WAL's zero padding and repeated headers, so it compresses.
func stream(seed uint64, start LSN, n int) []byte {
	out := make([]byte, n)
	for i := range out {
		l := uint64(start) + uint64(i)
		if l%8192 < 4096 {
			out[i] = byte(l / 8192)
			continue
		}
		x := (l ^ seed) * 0x9E3779B97F4A7C15
		out[i] = byte(x >> 56)
	}
	return out
}

// write feeds [start, start+n) to w in messages of random sizes up to 128 KiB,
// as the replication protocol delivers it.
func write(t testing.TB, w *Writer, tli uint32, seed uint64, start LSN, n int) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(start), uint64(n)))
	for off := 0; off < n; {
		k := min(n-off, 1+rng.IntN(128<<10))
		if err := w.Write(tli, start+LSN(off), stream(seed, start+LSN(off), k)); err != nil {
			t.Fatal(err)
		}
		off += k
	}
}

func flush(t testing.TB, w *Writer) LSN {
	t.Helper()
	d, err := w.Flush(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func load(t testing.TB, r *repo.Repository) *Catalog {
	t.Helper()
	c, err := Load(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Errors) > 0 {
		t.Fatalf("catalog errors: %v", c.Errors)
	}
	return c
}

func piecePath(env *repotest.Env, p Piece) string {
	return filepath.Join(env.Dir, "wal", p.Name.String())
}

func TestWriteContiguity(t *testing.T) {
	env := repotest.New(t, 0)
	tests := []struct {
		name string
		run  func(w *Writer) error
		want error
	}{
		{"contiguous", func(w *Writer) error {
			return errors.Join(w.Write(1, 100, []byte("abc")), w.Write(1, 103, []byte("de")), w.Write(1, 105, nil))
		}, nil},
		{"gap", func(w *Writer) error {
			return errors.Join(w.Write(1, 100, []byte("abc")), w.Write(1, 104, []byte("e")))
		}, ErrNotContiguous},
		{"overlap", func(w *Writer) error {
			return errors.Join(w.Write(1, 100, []byte("abc")), w.Write(1, 102, []byte("cd")))
		}, ErrNotContiguous},
		{"gap after a flush", func(w *Writer) error {
			if err := w.Write(1, 100, []byte("abc")); err != nil {
				return err
			}
			if _, err := w.Flush(context.Background()); err != nil {
				return err
			}
			return w.Write(1, 200, []byte("x"))
		}, ErrNotContiguous},
		{"timeline switch starts a new run", func(w *Writer) error {
			return errors.Join(w.Write(1, 100, []byte("abc")), w.Write(2, 101, []byte("B")), w.Write(2, 102, []byte("C")))
		}, nil},
		{"reset starts a new run", func(w *Writer) error {
			if err := w.Write(1, 100, []byte("abc")); err != nil {
				return err
			}
			w.Reset()
			if w.Buffered() != 0 {
				return errors.New("reset kept bytes")
			}
			return w.Write(1, 50, []byte("x"))
		}, nil},
		{"timeline 0", func(w *Writer) error { return w.Write(0, 100, []byte("abc")) }, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := NewWriter(env.Repo, WriterOptions{})
			err := tt.run(w)
			switch {
			case tt.name == "timeline 0":
				if err == nil {
					t.Fatal("timeline 0 accepted")
				}
			case tt.want == nil && err != nil:
				t.Fatalf("got %v, want success", err)
			case tt.want != nil && !errors.Is(err, tt.want):
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
	// A refused write buffers nothing.
	w := NewWriter(env.Repo, WriterOptions{})
	_ = w.Write(1, 100, []byte("abc"))
	if err := w.Write(1, 99, []byte("zz")); !errors.Is(err, ErrNotContiguous) || !strings.Contains(err.Error(), "overlap of 4 bytes") {
		t.Errorf("overlap error = %v", err)
	}
	if w.Buffered() != 3 {
		t.Errorf("Buffered = %d after a refused write, want 3", w.Buffered())
	}
}

// TestFlushDurable writes WAL in several flushes, reopens the vault as a new
// process would and checks the catalog ends where Flush said.
func TestFlushDurable(t *testing.T) {
	env := repotest.New(t, 0)
	const maxPiece = 200 << 10
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: maxPiece})
	start := LSN(3*seg + 1234)
	if d := flush(t, w); d != 0 {
		t.Errorf("Flush of nothing = %v, want 0", d)
	}
	pos := start
	for _, n := range []int{10, 1 << 20, 3 * maxPiece, 77777} {
		write(t, w, 1, 1, pos, n)
		pos += LSN(n)
		if got := w.Buffered(); got != n {
			t.Errorf("Buffered = %d, want %d", got, n)
		}
		if d := flush(t, w); d != pos {
			t.Fatalf("Flush = %v, want %v", d, pos)
		}
		if w.Buffered() != 0 || w.Durable() != pos {
			t.Errorf("after Flush: Buffered %d, Durable %v", w.Buffered(), w.Durable())
		}
	}
	if d := flush(t, w); d != pos {
		t.Errorf("idle Flush = %v, want %v", d, pos)
	}

	c := load(t, env.Reopen(t))
	if c.End(1) != pos {
		t.Errorf("End(1) = %v, want %v", c.End(1), pos)
	}
	if got := c.Runs(1); len(got) != 1 || got[0] != (Range{start, pos}) {
		t.Errorf("Runs(1) = %v", got)
	}
	// 10 B; 1 MiB = 5 full pieces + 1; 3 full; 77777 B.
	pieces := c.Pieces()
	if len(pieces) != 1+6+3+1 {
		t.Errorf("%d pieces, want 11", len(pieces))
	}
	for _, p := range pieces {
		if p.Len() > maxPiece || p.Timeline != 1 || p.History || p.Size <= 25 {
			t.Errorf("piece %v: len %d, size %d", p, p.Len(), p.Size)
		}
	}
	if got := c.Timelines(); len(got) != 1 || got[0] != 1 {
		t.Errorf("Timelines = %v", got)
	}
	if c.End(2) != 0 || c.Contiguous(1, start-1) != start-1 || c.Contiguous(1, start+5) != pos || c.Contiguous(1, pos) != pos {
		t.Errorf("End(2) %v, Contiguous %v %v %v", c.End(2), c.Contiguous(1, start-1), c.Contiguous(1, start+5), c.Contiguous(1, pos))
	}
}

// failStore fails the next fail saves, after storing the object when after is set
// (an answer lost on the way back).
type failStore struct {
	repo.Store
	mu    sync.Mutex
	fail  int
	after bool
	saves int
}

func (s *failStore) Save(ctx context.Context, h backend.Handle, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.saves++
	if s.fail > 0 {
		s.fail--
		if s.after {
			_ = s.Store.Save(ctx, h, data)
		}
		return errors.New("vault unreachable")
	}
	return s.Store.Save(ctx, h, data)
}

func TestFlushRetry(t *testing.T) {
	for _, after := range []bool{false, true} {
		env := repotest.New(t, 0)
		fs := &failStore{Store: env.Store.Session(guard.Append)}
		r, err := repo.Open(context.Background(), fs, repotest.Password, repotest.Options())
		if err != nil {
			t.Fatal(err)
		}
		w := NewWriter(r, WriterOptions{MaxPiece: 64 << 10})
		write(t, w, 1, 1, seg, 64<<10) // one piece, durable
		if d := flush(t, w); d != seg+64<<10 {
			t.Fatal(d)
		}
		write(t, w, 1, 1, seg+64<<10, 1000)
		fs.fail, fs.after = 1, after
		d, err := w.Flush(context.Background())
		if err == nil || d != seg+64<<10 || w.Buffered() != 1000 {
			t.Fatalf("failing Flush = %v, %v, buffered %d; want error, %v, 1000", d, err, w.Buffered(), LSN(seg+64<<10))
		}
		write(t, w, 1, 1, seg+64<<10+1000, 500) // more WAL arrives meanwhile
		if d := flush(t, w); d != seg+64<<10+1500 {
			t.Fatalf("retry Flush = %v", d)
		}
		// The retry saved the same object: no duplicate even when the first
		// save had landed.
		if n := len(load(t, r).Pieces()); n != 3 {
			t.Errorf("after=%v: %d pieces, want 3", after, n)
		}
	}
}

func TestConcurrentWriteFlush(t *testing.T) {
	env := repotest.New(t, 0)
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: 100 << 10})
	const total = 3 << 20
	done := make(chan struct{})
	go func() {
		defer close(done)
		write(t, w, 1, 7, seg, total)
	}()
	var last LSN
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		d := flush(t, w)
		if d < last {
			t.Fatalf("durable went back from %v to %v", last, d)
		}
		last = d
	}
	if d := flush(t, w); d != seg+total {
		t.Fatalf("final Flush = %v, want %v", d, LSN(seg+total))
	}
	c := load(t, env.Repo)
	for s := uint64(1); s < 4; s++ {
		got, err := Segment(context.Background(), env.Repo, c, 1, s, seg)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, stream(7, SegmentStart(s, seg), seg)) {
			t.Fatalf("segment %d differs", s)
		}
	}
}

// TestSegment stores WAL in pieces that do not follow segment boundaries,
// then assembles segments and compares them with what was written.
func TestSegment(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: 300_000})
	// Segments 2 and 3 whole, 4 up to half. Pieces of 300000 bytes straddle
	// the boundary at 3 MiB.
	write(t, w, 1, 1, 2*seg, 2*seg+seg/2)
	flush(t, w)
	c := load(t, env.Repo)
	spans := false
	for _, p := range c.Pieces() {
		if SegmentOf(p.Start, seg) != SegmentOf(p.End-1, seg) {
			spans = true
		}
	}
	if !spans {
		t.Fatal("no piece spans two segments; the test would prove less")
	}
	for _, s := range []uint64{2, 3} {
		got, err := Segment(ctx, env.Repo, c, 1, s, seg)
		if err != nil {
			t.Fatalf("segment %d: %v", s, err)
		}
		if !bytes.Equal(got, stream(1, SegmentStart(s, seg), seg)) {
			t.Errorf("segment %d differs from what was written", s)
		}
	}
	tests := []struct {
		tli   uint32
		segno uint64
		want  string
	}{
		{1, 4, "WAL 0/480000-0/500000 missing on timeline 1"},
		{1, 1, "WAL 0/100000-0/200000 missing on timeline 1"},
		{2, 2, "WAL 0/200000-0/300000 missing on timeline 2"},
	}
	for _, tt := range tests {
		_, err := Segment(ctx, env.Repo, c, tt.tli, tt.segno, seg)
		if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), SegmentName(tt.tli, tt.segno, seg)) {
			t.Errorf("Segment(%d, %d) = %v, want ErrIncomplete naming %q", tt.tli, tt.segno, err, tt.want)
		}
	}
}

// TestSegmentHead: the last segment is partial after a disaster; its head
// is served zero-padded, a whole segment is served whole, and a segment
// the vault holds nothing of is ErrIncomplete.
func TestSegmentHead(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: 300_000})
	write(t, w, 1, 1, 2*seg, seg+seg/2) // segment 2 whole, 3 up to half
	flush(t, w)
	c := load(t, env.Repo)
	tests := []struct {
		segno   uint64
		wantEnd LSN
	}{
		{2, 3 * seg},
		{3, 3*seg + seg/2},
	}
	for _, tt := range tests {
		got, end, err := SegmentHead(ctx, env.Repo, c, 1, tt.segno, seg)
		if err != nil || end != tt.wantEnd || len(got) != seg {
			t.Fatalf("SegmentHead(%d) = %d bytes, end %v, %v; want end %v", tt.segno, len(got), end, err, tt.wantEnd)
		}
		lo := SegmentStart(tt.segno, seg)
		want := append(stream(1, lo, int(end-lo)), make([]byte, seg-int(end-lo))...)
		if !bytes.Equal(got, want) {
			t.Errorf("segment %d head differs from what was written (or is not zero-padded)", tt.segno)
		}
	}
	if _, _, err := SegmentHead(ctx, env.Repo, c, 1, 4, seg); !errors.Is(err, ErrIncomplete) {
		t.Errorf("SegmentHead of a segment not held: %v, want ErrIncomplete", err)
	}
}

func TestSegmentMissingPiece(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: 256 << 10})
	write(t, w, 1, 1, seg, seg)
	flush(t, w)
	c := load(t, env.Repo)
	mid := c.Pieces()[1] // [0/140000, 0/180000)
	if err := env.Store.Backend().Remove(ctx, mid.handle()); err != nil {
		t.Fatal(err)
	}
	c = load(t, env.Repo)
	_, err := Segment(ctx, env.Repo, c, 1, 1, seg)
	if !errors.Is(err, ErrIncomplete) || !strings.Contains(err.Error(), "0/140000-0/180000") {
		t.Errorf("Segment = %v, want ErrIncomplete naming 0/140000-0/180000", err)
	}
	if c.End(1) != mid.Start || len(c.Runs(1)) != 2 {
		t.Errorf("End = %v, Runs = %v", c.End(1), c.Runs(1))
	}
}

// TestOverlap stores the same WAL twice with different cuts, as a writer
// restarted after a save whose answer was lost would.
func TestOverlap(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	a := NewWriter(env.Repo, WriterOptions{MaxPiece: 300_000})
	write(t, a, 1, 1, seg, seg/2+1000)
	flush(t, a)
	b := NewWriter(env.Repo, WriterOptions{MaxPiece: 200_000})
	write(t, b, 1, 1, seg+300_000, seg-300_000) // overlaps a's tail, ends at 2 MiB
	flush(t, b)
	c := load(t, env.Repo)
	if c.End(1) != 2*seg {
		t.Errorf("End = %v, want 0/200000", c.End(1))
	}
	got, err := Segment(ctx, env.Repo, c, 1, 1, seg)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, stream(1, seg, seg)) {
		t.Error("segment differs")
	}

	// A third copy reaching past the segment is checked against the others
	// even though the plan does not need it.
	x := NewWriter(env.Repo, WriterOptions{})
	write(t, x, 1, 1, 2*seg-5000, 6000)
	flush(t, x)
	c = load(t, env.Repo)
	if _, err := Segment(ctx, env.Repo, c, 1, 1, seg); err != nil {
		t.Errorf("segment 1 with an agreeing extra copy: %v", err)
	}
	if _, err := Segment(ctx, env.Repo, c, 1, 2, seg); !errors.Is(err, ErrIncomplete) {
		t.Errorf("segment 2: %v, want ErrIncomplete", err)
	}

	tests := []struct {
		name   string
		pieces []span
	}{
		// The plan must use both: they disagree on [5000, 6000).
		{"plan overlap", []span{{1, 0, 6000}, {9, 5000, seg}}},
		// A forged piece covering the whole segment alone is chosen by
		// the plan; the genuine pieces still expose it.
		{"forged cover", []span{{1, 0, 300_000}, {1, 300_000, seg}, {9, 0, seg}}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tli := uint32(10 + i)
			for _, p := range tt.pieces {
				y := NewWriter(env.Repo, WriterOptions{}) // a restarted agent, or a forger
				write(t, y, tli, p.seed, 5*seg+p.start, int(p.end-p.start))
				flush(t, y)
			}
			c := load(t, env.Repo)
			_, err := Segment(ctx, env.Repo, c, tli, 5, seg)
			if !errors.Is(err, ErrConflict) || strings.Count(err.Error(), "wal/") != 2 {
				t.Errorf("Segment = %v, want ErrConflict naming two pieces", err)
			}
		})
	}
}

// span is WAL of one seed written at [start, end) within a segment.
type span struct {
	seed       uint64
	start, end LSN
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if off < 0 {
		off += int64(len(b))
	}
	b[off] ^= 0x40
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDamagedPiece(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: 256 << 10})
	write(t, w, 1, 1, seg, seg)
	flush(t, w)
	c := load(t, env.Repo)
	bad := c.Pieces()[2]
	// A damaged object keeps its name, so the name check fires first.
	flipByte(t, piecePath(env, bad), -1)
	_, err := Segment(ctx, env.Repo, c, 1, 1, seg)
	if !errors.Is(err, repo.ErrDamaged) || !strings.Contains(err.Error(), bad.Name.String()) {
		t.Fatalf("Segment = %v, want ErrDamaged naming %s", err, bad.Name)
	}

	// The seal itself, with the name check passed: open an object whose
	// name matches its damaged bytes.
	obj, err := os.ReadFile(piecePath(env, bad))
	if err != nil {
		t.Fatal(err)
	}
	p := bad
	p.Name = format.Hash(obj)
	if _, err := open(env.Repo.Key(), p, obj); !errors.Is(err, crypto.ErrUnauthenticated) || !strings.Contains(err.Error(), p.Name.String()) {
		t.Errorf("open = %v, want ErrUnauthenticated naming the piece", err)
	}

	// Another copy of the same WAL makes the damage harmless.
	w2 := NewWriter(env.Repo, WriterOptions{})
	write(t, w2, 1, 1, bad.Start, int(bad.Len()))
	flush(t, w2)
	c = load(t, env.Repo)
	got, err := Segment(ctx, env.Repo, c, 1, 1, seg)
	if err != nil || !bytes.Equal(got, stream(1, seg, seg)) {
		t.Errorf("with a good copy: %v", err)
	}

	// A damaged header is reported by Load and the piece left out.
	flipByte(t, piecePath(env, c.Pieces()[0]), 3) // the magic
	c2, err := Load(ctx, env.Repo)
	if err != nil || len(c2.Errors) != 1 || len(c2.Pieces()) != len(c.Pieces())-1 {
		t.Errorf("Load = %d errors (%v), %d pieces, %v", len(c2.Errors), c2.Errors, len(c2.Pieces()), err)
	}
}

func TestHistoryAndAncestors(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	w := NewWriter(env.Repo, WriterOptions{MaxPiece: 300_000})
	// Timeline 1 up to 0/350000; promotion at 0/320000 starts timeline 2,
	// streamed from its switch point (not from the segment start).
	write(t, w, 1, 1, 3*seg, seg/2)
	const sw = 3*seg + 0x20000
	write(t, w, 2, 2, sw, seg)
	flush(t, w)
	hist := []byte("1\t0/320000\tno recovery target specified\n")
	if err := w.SaveHistory(ctx, 2, hist); err != nil {
		t.Fatal(err)
	}
	if err := w.SaveHistory(ctx, 1, hist); err == nil {
		t.Error("history of timeline 1 accepted")
	}
	c := load(t, env.Reopen(t))
	got, err := c.History(ctx, 2)
	if err != nil || !bytes.Equal(got, hist) {
		t.Fatalf("History(2) = %q, %v", got, err)
	}
	if _, err := c.History(ctx, 3); !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("History(3) = %v, want ErrNotExist", err)
	}
	if tl := c.Timelines(); len(tl) != 2 || c.End(2) != sw+seg {
		t.Errorf("Timelines = %v, End(2) = %v", tl, c.End(2))
	}
	seg3, err := Segment(ctx, env.Repo, c, 2, 3, seg)
	if err != nil {
		t.Fatal(err)
	}
	want := append(stream(1, 3*seg, sw-3*seg), stream(2, sw, 4*seg-sw)...)
	if !bytes.Equal(seg3, want) {
		t.Error("segment 3 of timeline 2 is not timeline 1 before the switch and 2 after")
	}
}
