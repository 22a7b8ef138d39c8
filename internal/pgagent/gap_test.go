package pgagent

import (
	"context"
	"strings"
	"testing"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// TestWALBeyondGap: a restore whose replay must stop at a gap in the
// vault's WAL says so.
func TestWALBeyondGap(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	put := func(start pgwal.LSN, n int) {
		w := pgwal.NewWriter(env.Repo, pgwal.WriterOptions{})
		if err := w.Write(1, start, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
	}
	put(0x1000000, 1<<20)
	cat, err := pgwal.Load(ctx, env.Repo)
	if err != nil {
		t.Fatal(err)
	}
	path, err := newestPath(ctx, cat)
	if err != nil {
		t.Fatal(err)
	}
	ws := &walState{cat: cat, path: path}
	b := &BaseBackupInfo{WALReach: path.reach(cat.Contiguous, 1, 0x1000000)}
	if w := walBeyondGap(ws, b); w != "" {
		t.Errorf("contiguous WAL gave a warning: %s", w)
	}
	put(0x1000000+2<<20, 1<<20) // a 1 MiB hole, then more WAL
	cat, _ = pgwal.Load(ctx, env.Repo)
	ws.cat = cat
	b.WALReach = path.reach(cat.Contiguous, 1, 0x1000000)
	if w := walBeyondGap(ws, b); !strings.Contains(w, "gap at 0/1100000") {
		t.Errorf("warning = %q, want one naming the gap at 0/1100000", w)
	}
}
