package archiver

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// sampleTree makes a directory with a few MiB of mixed content.
func sampleTree(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "src")
	repotest.WriteFile(t, filepath.Join(dir, "a.txt"), []byte("hello\n"), 0o644)
	repotest.WriteFile(t, filepath.Join(dir, "big.bin"), repotest.Random(5<<20), 0o644)
	repotest.WriteFile(t, filepath.Join(dir, "sub", "text.log"), bytes.Repeat([]byte("line of a log file 12345\n"), 100000), 0o644)
	repotest.WriteFile(t, filepath.Join(dir, "sub", "empty"), nil, 0o644)
	if err := os.MkdirAll(filepath.Join(dir, "emptydir"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("a.txt", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(dir, "a.txt"), filepath.Join(dir, "hard")); err != nil {
		t.Fatal(err)
	}
	return dir
}

func repoSize(t *testing.T, dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// readAll reassembles a file's content from the repository.
func readAll(t *testing.T, r *repo.Repository, n *snapshot.Node) []byte {
	var out []byte
	for _, id := range n.Content {
		b, err := r.LoadBlob(context.Background(), pack.Data, id)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
	}
	return out
}

func TestBackupRoundTripAndDedup(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, time.Hour)
	src := sampleTree(t)

	res, err := Backup(ctx, env.Repo, []string{src}, Options{Tags: []string{"t1"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Summary.Files != 5 || res.Summary.FilesNew != 5 {
		t.Errorf("summary = %+v, want 5 new files", res.Summary)
	}
	if !res.Lock.Until.After(time.Now().Add(59 * time.Minute)) {
		t.Errorf("lock until %v, want at least the 1h repository minimum", res.Lock.Until)
	}

	// A fresh process sees the snapshot and its content.
	r2 := env.Reopen(t)
	si, err := r2.FindSnapshot(ctx, "latest")
	if err != nil {
		t.Fatal(err)
	}
	if si.ID != res.ID || si.VaultTime.IsZero() || !si.Locked(time.Now()) {
		t.Fatalf("latest = %+v, want %s locked with a vault time", si, res.ID)
	}
	root, err := r2.LoadTree(ctx, si.Tree)
	if err != nil {
		t.Fatal(err)
	}
	top := root.Find("src")
	if top == nil || top.Type != snapshot.Dir {
		t.Fatalf("root = %+v", root.Nodes)
	}
	tree, err := r2.LoadTree(ctx, *top.Subtree)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a.txt", "big.bin"} {
		want, _ := os.ReadFile(filepath.Join(src, name))
		if got := readAll(t, r2, tree.Find(name)); !bytes.Equal(got, want) {
			t.Errorf("%s: content differs (%d vs %d bytes)", name, len(got), len(want))
		}
	}
	if l := tree.Find("link"); l == nil || l.Type != snapshot.Symlink || l.LinkTarget != "a.txt" {
		t.Errorf("link = %+v", l)
	}
	if h := tree.Find("hard"); h == nil || h.Inode != tree.Find("a.txt").Inode || h.Links != 2 {
		t.Errorf("hard link not recorded: %+v", h)
	}
	if e := tree.Find("emptydir"); e == nil || e.Type != snapshot.Dir || e.Mode.Perm() != 0o700 {
		t.Errorf("emptydir = %+v", e)
	}

	// An unchanged second backup adds under 1% to the repository.
	before := repoSize(t, env.Dir)
	res2, err := Backup(ctx, r2, []string{src}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	grow := repoSize(t, env.Dir) - before
	if grow > before/100 {
		t.Errorf("unchanged backup grew the repository by %d of %d bytes", grow, before)
	}
	if res2.Summary.FilesChanged != 0 || res2.Summary.FilesNew != 0 || res2.Summary.BytesAdded != 0 {
		t.Errorf("unchanged backup summary = %+v", res2.Summary)
	}

	// Changing 64 KiB in the middle of the big file keeps every chunk that
	// ends before the change and stores new chunks only from the one the
	// change falls in. How far the new cut points run on before they meet
	// the old ones depends on the repository's keyed gear (random per
	// repository) and on max-size cuts, so the bound is the file's tail,
	// not a chunk count.
	const at = 2 << 20
	bigNode := func(id repo.ID) *snapshot.Node {
		t.Helper()
		tr, err := r2.LoadTree(ctx, mustSnap(t, r2, id).Tree)
		if err != nil {
			t.Fatal(err)
		}
		tr, err = r2.LoadTree(ctx, *tr.Find("src").Subtree)
		if err != nil {
			t.Fatal(err)
		}
		return tr.Find("big.bin")
	}
	old := bigNode(res2.ID)
	f, err := os.OpenFile(filepath.Join(src, "big.bin"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(repotest.Random(64<<10), at)
	f.Close()
	res3, err := Backup(ctx, r2, []string{src}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	cur := bigNode(res3.ID)
	want, _ := os.ReadFile(filepath.Join(src, "big.bin"))
	if !bytes.Equal(readAll(t, r2, cur), want) {
		t.Fatal("changed big.bin does not read back")
	}
	// The old chunks that end before the change are kept, in place.
	var kept, end int
	for _, id := range old.Content {
		b, err := r2.LoadBlob(ctx, pack.Data, id)
		if err != nil {
			t.Fatal(err)
		}
		if end+len(b) > at {
			break
		}
		if kept >= len(cur.Content) || cur.Content[kept] != id {
			t.Fatalf("chunk %d (bytes %d..%d, before the change) was not reused", kept, end, end+len(b))
		}
		kept++
		end += len(b)
	}
	// New bytes: at least the change, at most from the start of the chunk
	// it fell in to the end of the file; and exactly the chunks the new
	// content list has that the old one did not.
	had := map[repo.ID]bool{}
	for _, id := range old.Content {
		had[id] = true
	}
	var fresh int64
	var nfresh int64
	for _, id := range cur.Content[kept:] {
		if !had[id] {
			b, err := r2.LoadBlob(ctx, pack.Data, id)
			if err != nil {
				t.Fatal(err)
			}
			had[id] = true
			fresh += int64(len(b))
			nfresh++
		}
	}
	sm := res3.Summary
	if sm.FilesChanged != 1 || sm.FilesNew != 0 || sm.BytesAdded < 64<<10 || sm.BytesAdded > int64(len(want)-end) ||
		sm.BytesAdded != fresh || sm.BlobsAdded != nfresh {
		t.Errorf("after a 64 KiB change at %d (%d chunks kept, %d new bytes in %d chunks): %+v", at, kept, fresh, nfresh, sm)
	}
}

func TestBackupReader(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	data := bytes.Repeat([]byte("stdin data "), 300000)
	res, err := BackupReader(ctx, env.Repo, bytes.NewReader(data), "dump.sql", Options{})
	if err != nil {
		t.Fatal(err)
	}
	root, err := env.Repo.LoadTree(ctx, mustSnap(t, env.Repo, res.ID).Tree)
	if err != nil {
		t.Fatal(err)
	}
	n := root.Find("dump.sql")
	if n == nil || n.Size != uint64(len(data)) || !bytes.Equal(readAll(t, env.Repo, n), data) {
		t.Fatalf("stdin file not stored whole: %+v", n)
	}
	if _, err := BackupReader(ctx, env.Repo, strings.NewReader("x"), "../evil", Options{}); err == nil {
		t.Error("a stdin name with a slash was accepted")
	}
}

func TestPageChunking(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, 0)
	src := filepath.Join(t.TempDir(), "db")
	page := 8192
	data := repotest.Random(400 * page)
	repotest.WriteFile(t, filepath.Join(src, "16384"), data, 0o644)
	opts := Options{PageSize: func(string, os.FileInfo) int { return page }}
	if _, err := Backup(ctx, env.Repo, []string{src}, opts); err != nil {
		t.Fatal(err)
	}
	// Touch 10 pages: the next backup stores exactly 10 pages.
	for i := 0; i < 10; i++ {
		copy(data[(i*37%400)*page+100:], []byte("changed!"))
	}
	repotest.WriteFile(t, filepath.Join(src, "16384"), data, 0o644)
	res, err := Backup(ctx, env.Repo, []string{src}, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Summary.BlobsAdded != 10 { // data blobs only: the 10 changed pages
		t.Errorf("blobs added = %d, want 10; summary %+v", res.Summary.BlobsAdded, res.Summary)
	}
}

func mustSnap(t *testing.T, r *repo.Repository, id repo.ID) repo.SnapshotInfo {
	si, err := r.FindSnapshot(context.Background(), id.String()[:12])
	if err != nil {
		t.Fatal(err)
	}
	return si
}

// BenchmarkBackup measures a first backup of 256 MiB: half random, half
// text-like. Run with -benchtime=1x.
func BenchmarkBackup(b *testing.B) {
	src := filepath.Join(b.TempDir(), "src")
	os.MkdirAll(src, 0o755)
	os.WriteFile(filepath.Join(src, "random"), repotest.Random(128<<20), 0o644)
	var text bytes.Buffer
	for i := 0; text.Len() < 128<<20; i++ {
		fmt.Fprintf(&text, "%d|account-%d|%d|filler filler filler filler\n", i, i*7919%100000, i%5000)
	}
	os.WriteFile(filepath.Join(src, "text"), text.Bytes(), 0o644)
	b.SetBytes(256 << 20)
	for b.Loop() {
		env := repotest.New(b, 0)
		env.Repo.Close()
		opts := repotest.Options()
		opts.PackSize = 16 << 20
		r, err := repo.Open(context.Background(), env.Store.Session("admin"), repotest.Password, opts)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Backup(context.Background(), r, []string{src}, Options{NoParent: true}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBackupDir backs up the directory in DUALKEY_BENCH_DIR (for
// profiling on real data such as bench/'s pgbench data directory).
func BenchmarkBackupDir(b *testing.B) {
	src := os.Getenv("DUALKEY_BENCH_DIR")
	if src == "" {
		b.Skip("set DUALKEY_BENCH_DIR")
	}
	for b.Loop() {
		env := repotest.New(b, 0)
		env.Repo.Close()
		opts := repotest.Options()
		opts.PackSize = 16 << 20
		r, err := repo.Open(context.Background(), env.Store.Session("admin"), repotest.Password, opts)
		if err != nil {
			b.Fatal(err)
		}
		res, err := Backup(context.Background(), r, []string{src}, Options{NoParent: true})
		if err != nil {
			b.Fatal(err)
		}
		b.SetBytes(res.Summary.Bytes)
	}
}
