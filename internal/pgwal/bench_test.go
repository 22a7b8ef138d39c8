package pgwal

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// BenchmarkFlush measures one agent flush: 4 MiB of WAL written and stored
// as one piece (compress, seal, save with fsync).
func BenchmarkFlush(b *testing.B) {
	env := repotest.New(b, 0)
	w := NewWriter(env.Repo, WriterOptions{})
	const n = 4 << 20
	data := stream(1, 0, n)
	b.SetBytes(n)
	b.ReportAllocs()
	pos := LSN(seg)
	for b.Loop() {
		if err := w.Write(1, pos, data); err != nil {
			b.Fatal(err)
		}
		pos += n
		if _, err := w.Flush(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSeal is the CPU part of a flush: compress and seal 4 MiB.
func BenchmarkSeal(b *testing.B) {
	env := repotest.New(b, 0)
	data := stream(1, 0, 4<<20)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		seal(env.Repo.Key(), format.WALHeader{Timeline: 1, Start: 0, End: uint64(len(data))}, data)
	}
}

// TestCatalogLoadTime loads a catalog of 5000 pieces (the WAL of about a
// day at a quiet rate, or 20 GB of busy WAL) and reports the time.
func TestCatalogLoadTime(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 5000 objects")
	}
	env := repotest.New(t, 0)
	const n = 5000
	// Write the objects directly: saving them one fsync at a time would
	// measure the disk, not Load.
	for i := range n {
		hd := format.WALHeader{Timeline: 1, Start: uint64(seg + i*1000), End: uint64(seg + (i+1)*1000)}
		obj := seal(env.Repo.Key(), hd, stream(1, LSN(hd.Start), 1000))
		if err := os.WriteFile(filepath.Join(env.Dir, "wal", format.Hash(obj).String()), obj, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	t0 := time.Now()
	c := load(t, env.Repo)
	took := time.Since(t0)
	t.Logf("Load of %d pieces: %v", n, took)
	if len(c.Pieces()) != n || c.End(1) != seg+n*1000 {
		t.Fatalf("%d pieces, End %v", len(c.Pieces()), c.End(1))
	}
	if took > 2*time.Second {
		t.Errorf("Load took %v, want well under 2 s", took)
	}
}
