package restorer

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/archiver"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// TestRestoreArchiverBackup restores what the real archiver stored (content
// defined chunks, its own node metadata), not only the test snapshotter's.
func TestRestoreArchiverBackup(t *testing.T) {
	env := repotest.New(t, 0)
	parent := t.TempDir()
	src := filepath.Join(parent, "data")
	makeTree(t, src)
	ctx := context.Background()
	res, err := archiver.Backup(ctx, env.Repo, []string{src}, archiver.Options{NoParent: true})
	if err != nil {
		t.Fatalf("Backup: %v", err)
	}
	r := env.Reopen(t)
	sn, err := r.LoadSnapshot(ctx, res.ID)
	mustRun(t, err)
	dst := t.TempDir()
	if _, err := Restore(ctx, r, sn.Tree, dst, Options{Verify: true}); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	checkRestored(t, r, sn.Tree, parent, dst)
}
