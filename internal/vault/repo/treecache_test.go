package repo_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// packReads counts the pack reads a real store serves.
type packReads struct {
	repo.Store
	n atomic.Int64
}

func (s *packReads) Load(ctx context.Context, h backend.Handle, off, n int64) ([]byte, error) {
	if h.Type == backend.Pack {
		s.n.Add(1)
	}
	return s.Store.Load(ctx, h, off, n)
}

// TestTreesReadByPack: loading the trees of a snapshot reads each tree pack
// once, not once per tree (on object storage, a request per directory), and
// every tree still decodes to what was saved, also after the cache evicts.
func TestTreesReadByPack(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	const n = 400
	ids := make([]repo.ID, n)
	for i := range ids {
		tr := &snapshot.Tree{Nodes: []*snapshot.Node{{Name: fmt.Sprintf("file-%04d", i), Type: snapshot.File}}}
		id, err := env.Repo.SaveTree(ctx, tr)
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = id
	}
	if err := env.Repo.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	store := &packReads{Store: env.Store.Session(guard.Admin)}
	r, err := repo.Open(ctx, store, repotest.Password, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for round := range 2 {
		for i, id := range ids {
			tr, err := r.LoadTree(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if len(tr.Nodes) != 1 || tr.Nodes[0].Name != fmt.Sprintf("file-%04d", i) {
				t.Fatalf("round %d: tree %d holds %+v", round, i, tr.Nodes)
			}
		}
	}
	packs := map[repo.ID]bool{}
	for _, id := range ids {
		loc, ok := r.Index().Lookup(id)
		if !ok {
			t.Fatalf("tree %s not indexed", id)
		}
		packs[loc.Pack] = true
	}
	if got := store.n.Load(); got != int64(len(packs)) {
		t.Errorf("%d pack reads for %d trees in %d packs, read twice; want one read per pack", got, n, len(packs))
	}
}
