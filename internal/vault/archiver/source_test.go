package archiver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// entries yields es in order, then io.EOF.
func entries(es ...*Entry) func() (*Entry, error) {
	i := 0
	return func() (*Entry, error) {
		if i == len(es) {
			return nil, io.EOF
		}
		i++
		return es[i-1], nil
	}
}

func fileEntry(p string, data []byte) *Entry {
	return &Entry{Path: p, Node: snapshot.Node{Type: snapshot.File, Mode: 0o600, UID: 7, GID: 8,
		ModTime: time.Unix(1700000000, 0).UTC(), Size: uint64(len(data))}, Content: bytes.NewReader(data)}
}

// lookup finds the node at a slash path below root.
func lookup(t *testing.T, r *repo.Repository, root repo.ID, p string) *snapshot.Node {
	t.Helper()
	id := root
	elems := strings.Split(p, "/")
	for i, el := range elems {
		tr, err := r.LoadTree(context.Background(), id)
		if err != nil {
			t.Fatal(err)
		}
		n := tr.Find(el)
		if n == nil {
			t.Fatalf("%s: %s missing", p, el)
		}
		if i == len(elems)-1 {
			return n
		}
		id = *n.Subtree
	}
	panic("unreachable")
}

func TestBackupEntries(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, time.Hour)
	page := bytes.Repeat([]byte{1}, 8192)
	rel := append(append(append([]byte{}, page...), bytes.Repeat([]byte{2}, 8192)...), page...)
	big := repotest.Random(3 << 20)
	var committed *snapshot.Snapshot
	opts := Options{Tags: []string{"pg-base"}, Hostname: "h", Kind: snapshot.KindPGBase, Meta: json.RawMessage(`{"a":1}`),
		PageSize: func(p string, fi os.FileInfo) int {
			if strings.HasPrefix(p, "base/") && fi.Mode().IsRegular() {
				return 8192
			}
			return 0
		},
		BeforeCommit: func(sn *snapshot.Snapshot) error {
			sn.Meta = json.RawMessage(`{"a":2}`)
			committed = sn
			return nil
		}}
	res, err := BackupEntries(ctx, env.Repo, "pg:1", entries(
		fileEntry("./base/1/1259", rel), // parent directories implicit
		&Entry{Path: "base/1/", Node: snapshot.Node{Type: snapshot.Dir, Mode: 0o750, UID: 7}}, // the directory after its contents
		fileEntry("big", big),
		fileEntry("empty", nil),
		&Entry{Path: "pg_tblspc/16385", Node: snapshot.Node{Type: snapshot.Symlink, Mode: os.ModeSymlink | 0o777, LinkTarget: "/ts"}},
		fileEntry("big", big[:100]), // a later entry replaces an earlier one
	), opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Summary.Files != 4 || res.Summary.FilesNew != 4 || res.Summary.Dirs != 3 {
		t.Errorf("summary %+v, want 4 files and 3 dirs", res.Summary)
	}
	// Two identical pages are stored once; the 3 MiB file is stored even
	// though a later entry (100 bytes) replaced it.
	if want := int64(2*8192 + len(big) + 100); res.Summary.BytesAdded != want {
		t.Errorf("bytes added %d, want %d", res.Summary.BytesAdded, want)
	}
	sn, err := env.Repo.LoadSnapshot(ctx, res.ID)
	if err != nil {
		t.Fatal(err)
	}
	if sn.Kind != snapshot.KindPGBase || string(sn.Meta) != `{"a":2}` || sn.Paths[0] != "pg:1" || sn.Hostname != "h" || committed == nil {
		t.Errorf("snapshot %+v", sn)
	}
	n := lookup(t, env.Repo, sn.Tree, "base/1/1259")
	if n.Chunking != "pages:8192" || len(n.Content) != 3 || n.Content[0] != n.Content[2] || n.UID != 7 || n.Size != uint64(len(rel)) {
		t.Errorf("relation node %+v", n)
	}
	if got := readAll(t, env.Repo, n); !bytes.Equal(got, rel) {
		t.Error("relation content differs")
	}
	if d := lookup(t, env.Repo, sn.Tree, "base/1"); d.Mode != os.ModeDir|0o750 || d.UID != 7 {
		t.Errorf("explicit directory %+v", d)
	}
	if d := lookup(t, env.Repo, sn.Tree, "base"); d.Type != snapshot.Dir || d.Mode != os.ModeDir|0o700 {
		t.Errorf("implicit directory %+v", d)
	}
	if n := lookup(t, env.Repo, sn.Tree, "big"); n.Chunking != "cdc" || n.Size != 100 {
		t.Errorf("big %+v", n)
	}
	if n := lookup(t, env.Repo, sn.Tree, "pg_tblspc/16385"); n.Type != snapshot.Symlink || n.LinkTarget != "/ts" {
		t.Errorf("symlink %+v", n)
	}
	if n := lookup(t, env.Repo, sn.Tree, "empty"); n.Size != 0 || len(n.Content) != 0 {
		t.Errorf("empty %+v", n)
	}
}

func TestBackupEntriesAbandons(t *testing.T) {
	ctx := context.Background()
	boom := errors.New("boom")
	tests := []struct {
		name   string
		next   func() (*Entry, error)
		before func(*snapshot.Snapshot) error
	}{
		{"source error", func() func() (*Entry, error) {
			n := entries(fileEntry("a", []byte("x")))
			return func() (*Entry, error) {
				if e, err := n(); err == nil {
					return e, nil
				}
				return nil, boom
			}
		}(), nil},
		{"unreadable content", entries(&Entry{Path: "a", Node: snapshot.Node{Type: snapshot.File},
			Content: io.MultiReader(strings.NewReader("x"), iotestErr{boom})}), nil},
		{"escaping path", entries(fileEntry("a/../../b", nil)), nil},
		{"file over a directory", entries(fileEntry("d/x", nil), fileEntry("d", nil)), nil},
		{"no entries", entries(), nil},
		{"before commit", entries(fileEntry("a", nil)), func(*snapshot.Snapshot) error { return boom }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := repotest.New(t, time.Hour)
			_, err := BackupEntries(ctx, env.Repo, "src", tt.next, Options{BeforeCommit: tt.before})
			if err == nil {
				t.Fatal("no error")
			}
			all, _, lerr := env.Repo.Snapshots(ctx)
			if lerr != nil || len(all) != 0 {
				t.Errorf("snapshots after a failed backup: %v %v", all, lerr)
			}
		})
	}
}

type iotestErr struct{ err error }

func (e iotestErr) Read([]byte) (int, error) { return 0, e.err }
