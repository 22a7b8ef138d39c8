package restorer

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

func TestDump(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	big := randBytes(11, 1<<20+77)
	writeFile(t, filepath.Join(src, "big"), big, 0o640)
	writeFile(t, filepath.Join(src, "sub", "small"), []byte("small"), 0o600)
	writeFile(t, filepath.Join(src, "sub", "empty"), nil, 0o644)
	mustRun(t, os.Link(filepath.Join(src, "sub", "small"), filepath.Join(src, "sub", "twin")))
	mustRun(t, os.Symlink("../big", filepath.Join(src, "sub", "link")))
	mustRun(t, os.MkdirAll(filepath.Join(src, "sub", "deep", "er"), 0o755))
	mt := time.Date(2022, 5, 6, 7, 8, 9, 0, time.UTC)
	setTime(t, filepath.Join(src, "sub", "small"), mt, mt)
	root := backup(t, env.Repo, src)
	ctx := context.Background()

	t.Run("file", func(t *testing.T) {
		var buf bytes.Buffer
		mustRun(t, Dump(ctx, env.Repo, root, "/big", &buf))
		if !bytes.Equal(buf.Bytes(), big) {
			t.Errorf("Dump(big): %d bytes, want %d equal", buf.Len(), len(big))
		}
		buf.Reset()
		mustRun(t, Dump(ctx, env.Repo, root, "sub/empty", &buf))
		if buf.Len() != 0 {
			t.Errorf("Dump(empty) wrote %d bytes", buf.Len())
		}
	})
	t.Run("dir", func(t *testing.T) {
		var buf bytes.Buffer
		mustRun(t, Dump(ctx, env.Repo, root, "sub", &buf))
		hdrs, contents := readTar(t, &buf)
		var names []string
		for _, h := range hdrs {
			names = append(names, h.Name)
		}
		want := []string{"sub/", "sub/deep/", "sub/deep/er/", "sub/empty", "sub/link", "sub/small", "sub/twin"}
		if !slices.Equal(names, want) {
			t.Fatalf("tar entries %q, want %q", names, want)
		}
		byName := map[string]*tar.Header{}
		for _, h := range hdrs {
			byName[h.Name] = h
		}
		if h := byName["sub/small"]; h.Typeflag != tar.TypeReg || h.Mode != 0o600 || !h.ModTime.Equal(mt) || contents["sub/small"] != "small" {
			t.Errorf("sub/small: %+v %q", h, contents["sub/small"])
		}
		if h := byName["sub/twin"]; h.Typeflag != tar.TypeLink || h.Linkname != "sub/small" {
			t.Errorf("sub/twin: type %c link %q, want a hard link to sub/small", h.Typeflag, h.Linkname)
		}
		if h := byName["sub/link"]; h.Typeflag != tar.TypeSymlink || h.Linkname != "../big" {
			t.Errorf("sub/link: type %c link %q", h.Typeflag, h.Linkname)
		}
		if h := byName["sub/deep/"]; h.Typeflag != tar.TypeDir || h.Mode != 0o755 {
			t.Errorf("sub/deep/: type %c mode %o", h.Typeflag, h.Mode)
		}
	})
	t.Run("root", func(t *testing.T) {
		var buf bytes.Buffer
		mustRun(t, Dump(ctx, env.Repo, root, "/", &buf))
		_, contents := readTar(t, &buf)
		if contents["big"] != string(big) || contents["sub/small"] != "small" {
			t.Errorf("root tar: big %d bytes, sub/small %q", len(contents["big"]), contents["sub/small"])
		}
	})
	t.Run("errors", func(t *testing.T) {
		for _, p := range []string{"nope", "big/x", "sub/nope"} {
			if err := Dump(ctx, env.Repo, root, p, io.Discard); !errors.Is(err, ErrNotFound) {
				t.Errorf("Dump(%q): err %v, want ErrNotFound", p, err)
			}
		}
		if err := Dump(ctx, env.Repo, root, "sub/link", io.Discard); err == nil {
			t.Error("Dump(symlink): no error")
		}
	})
}

func readTar(t *testing.T, r io.Reader) ([]*tar.Header, map[string]string) {
	t.Helper()
	tr := tar.NewReader(r)
	var hdrs []*tar.Header
	contents := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return hdrs, contents
		}
		mustRun(t, err)
		b, err := io.ReadAll(tr)
		mustRun(t, err)
		hdrs = append(hdrs, h)
		contents[h.Name] = string(b)
	}
}

func TestWalkLookup(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	for _, p := range []string{"a/x", "a/y/z", "b", "c/d/e"} {
		writeFile(t, filepath.Join(src, filepath.FromSlash(p)), []byte(p), 0o644)
	}
	root := backup(t, env.Repo, src)
	ctx := context.Background()

	walk := func(skip string, skipErr error) []string {
		var got []string
		mustRun(t, Walk(ctx, env.Repo, root, func(p string, n *snapshot.Node) error {
			got = append(got, p)
			if p == skip {
				return skipErr
			}
			return nil
		}))
		return got
	}
	tests := []struct {
		name, skip string
		err        error
		want       []string
	}{
		{"all", "", nil, []string{"a", "a/x", "a/y", "a/y/z", "b", "c", "c/d", "c/d/e"}},
		{"skip dir", "a/y", fs.SkipDir, []string{"a", "a/x", "a/y", "b", "c", "c/d", "c/d/e"}},
		{"skip rest of dir", "a/x", fs.SkipDir, []string{"a", "a/x", "b", "c", "c/d", "c/d/e"}},
		{"skip all", "b", fs.SkipAll, []string{"a", "a/x", "a/y", "a/y/z", "b"}},
	}
	for _, tt := range tests {
		if got := walk(tt.skip, tt.err); !slices.Equal(got, tt.want) {
			t.Errorf("%s: walked %q, want %q", tt.name, got, tt.want)
		}
	}
	boom := errors.New("boom")
	if err := Walk(ctx, env.Repo, root, func(string, *snapshot.Node) error { return boom }); !errors.Is(err, boom) {
		t.Errorf("Walk: err %v, want fn's error", err)
	}

	n, err := Lookup(ctx, env.Repo, root, "/c/d/e")
	if err != nil || n.Name != "e" || n.Type != snapshot.File || n.Size != 5 {
		t.Errorf("Lookup(c/d/e) = %+v, %v", n, err)
	}
	n, err = Lookup(ctx, env.Repo, root, "")
	if err != nil || n.Type != snapshot.Dir || *n.Subtree != root {
		t.Errorf("Lookup(root) = %+v, %v", n, err)
	}
	for _, p := range []string{"q", "b/x", "a/../b"} {
		if _, err := Lookup(ctx, env.Repo, root, p); !errors.Is(err, ErrNotFound) {
			t.Errorf("Lookup(%q): err %v, want ErrNotFound", p, err)
		}
	}
}
