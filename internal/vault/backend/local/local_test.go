package local_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/disktest"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/backendtest"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
)

func TestSuite(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend {
		return create(t, t.TempDir())
	})
}

func create(t testing.TB, root string) *local.Backend {
	t.Helper()
	be, err := local.Create(t.Context(), root)
	if err != nil {
		t.Fatal(err)
	}
	return be
}

func randomHandle(typ backend.Type) backend.Handle {
	if typ == backend.Config {
		return backend.Handle{Type: typ, Name: backend.ConfigName}
	}
	return backend.Handle{Type: typ, Name: hex.EncodeToString(randomBytes(32))}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// objectPath is where the documented layout puts h.
func objectPath(root string, h backend.Handle) string {
	switch h.Type {
	case backend.Config:
		return filepath.Join(root, "config")
	case backend.Pack:
		return filepath.Join(root, "data", h.Name[:2], h.Name)
	default:
		return filepath.Join(root, string(h.Type), h.Name)
	}
}

// checkNoTemp fails if a temp file is left under root/tmp.
func checkNoTemp(t *testing.T, root string) {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(root, "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		t.Errorf("temp file left behind: %s", e.Name())
	}
}

func TestLayout(t *testing.T) {
	root := t.TempDir()
	be := create(t, root)
	for _, typ := range backend.Types {
		h := randomHandle(typ)
		data := randomBytes(100)
		if err := be.Save(t.Context(), h, data); err != nil {
			t.Fatal(err)
		}
		p := objectPath(root, h)
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("%v not at %s: %v", h, p, err)
		}
		if !bytes.Equal(got, data) {
			t.Errorf("%s holds other bytes than saved", p)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm&0o222 != 0 {
			t.Errorf("%s has mode %v, want no write permission", p, perm)
		}
	}
	checkNoTemp(t, root)
}

func TestNoTempResidue(t *testing.T) {
	root := t.TempDir()
	be := create(t, root)
	h := randomHandle(backend.Pack)
	data := randomBytes(1 << 20)
	if err := be.Save(t.Context(), h, data); err != nil {
		t.Fatal(err)
	}
	if err := be.Save(t.Context(), h, data); err != nil {
		t.Fatalf("identical re-save: %v", err)
	}
	if err := be.Save(t.Context(), h, randomBytes(1<<20)); !errors.Is(err, backend.ErrExists) {
		t.Fatalf("different re-save = %v, want ErrExists", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := be.Save(ctx, randomHandle(backend.Pack), data); err == nil {
		t.Fatal("Save with canceled context succeeded")
	}
	checkNoTemp(t, root)
}

func TestCreate(t *testing.T) {
	root := filepath.Join(t.TempDir(), "a", "vault")
	create(t, root) // makes missing parents
	// No config yet: an interrupted init may run again.
	be := create(t, root)
	if err := be.Save(t.Context(), randomHandle(backend.Config), []byte("cfg")); err != nil {
		t.Fatal(err)
	}
	_, err := local.Create(t.Context(), root)
	if !errors.Is(err, fs.ErrExist) || !strings.HasPrefix(err.Error(), "local: ") {
		t.Errorf("Create over an existing vault = %v, want a local: error wrapping fs.ErrExist", err)
	}
}

func TestOpen(t *testing.T) {
	root := t.TempDir()
	h := randomHandle(backend.Key)
	if err := create(t, root).Save(t.Context(), h, []byte("key")); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(root, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name, root string
		wantErr    error // nil: Open succeeds; errAny: any error
	}{
		{"vault", root, nil},
		{"missing", filepath.Join(root, "missing"), fs.ErrNotExist},
		{"file", file, errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			be, err := local.Open(tt.root)
			switch {
			case tt.wantErr == nil && err != nil:
				t.Fatalf("Open: %v", err)
			case tt.wantErr == nil:
				if _, err := be.Stat(t.Context(), h); err != nil {
					t.Errorf("Stat after Open: %v", err)
				}
			case err == nil:
				t.Fatalf("Open(%s) succeeded, want an error", tt.root)
			case tt.wantErr != errAny && !errors.Is(err, tt.wantErr):
				t.Errorf("Open = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

var errAny = errors.New("any error")

// TestSaveCreatesFolders covers a vault copied by a tool that skips empty
// folders: Save recreates what it needs below the root.
func TestSaveCreatesFolders(t *testing.T) {
	root := t.TempDir()
	be, err := local.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range backend.Types {
		h := randomHandle(typ)
		data := randomBytes(10)
		if err := be.Save(t.Context(), h, data); err != nil {
			t.Fatalf("Save(%v) into a bare folder: %v", h, err)
		}
		if got, err := be.Load(t.Context(), h, 0, 0); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Load(%v) = %d bytes, %v", h, len(got), err)
		}
	}
	checkNoTemp(t, root)
}

func TestListSkipsStrays(t *testing.T) {
	root := t.TempDir()
	be := create(t, root)
	key := randomHandle(backend.Key)
	pack := randomHandle(backend.Pack)
	for _, h := range []backend.Handle{key, pack} {
		if err := be.Save(t.Context(), h, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	other := randomHandle(backend.Pack).Name
	wrongFolder := "00"
	if other[:2] == wrongFolder {
		wrongFolder = "ff"
	}
	strays := []string{
		"keys/notes.txt",
		"keys/" + strings.ToUpper(randomHandle(backend.Key).Name),
		"keys/" + randomHandle(backend.Key).Name[:63],
		"data/" + other,                     // pack outside the fan-out
		"data/zz/" + other,                  // folder is not hex
		"data/" + other[:2] + "/x",          // not a name
		"data/" + wrongFolder + "/" + other, // pack in the wrong folder
		"tmp/keys-" + randomHandle(backend.Key).Name,
	}
	for _, s := range strays {
		p := filepath.Join(root, s)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("stray"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A folder with a valid name is not an object either.
	if err := os.Mkdir(filepath.Join(root, "keys", randomHandle(backend.Key).Name), 0o700); err != nil {
		t.Fatal(err)
	}

	for _, tt := range []struct {
		typ  backend.Type
		want string
	}{
		{backend.Key, key.Name},
		{backend.Pack, pack.Name},
	} {
		var got []string
		err := be.List(t.Context(), tt.typ, func(fi backend.Info) error {
			got = append(got, fi.Name)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0] != tt.want {
			t.Errorf("List(%s) = %q, want only %s", tt.typ, got, tt.want)
		}
	}
}

func TestCleanTemp(t *testing.T) {
	root := t.TempDir()
	be := create(t, root)
	tmp := filepath.Join(root, "tmp")
	old := time.Now().Add(-2 * time.Hour)
	files := map[string]time.Time{
		"data-stale-1": old,
		"data-stale-2": old,
		"data-running": time.Now(),
	}
	for name, mtime := range files {
		p := filepath.Join(tmp, name)
		if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	n, err := be.CleanTemp(time.Hour)
	if err != nil || n != 2 {
		t.Fatalf("CleanTemp = %d, %v; want 2, nil", n, err)
	}
	entries, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "data-running" {
		t.Errorf("after CleanTemp tmp holds %v, want only data-running", entries)
	}
}

// TestLoadCorrupted documents that the backend does not verify content:
// detecting a damaged object is the job of the layers that know its hash.
func TestLoadCorrupted(t *testing.T) {
	root := t.TempDir()
	be := create(t, root)
	h := randomHandle(backend.Pack)
	data := randomBytes(1000)
	if err := be.Save(t.Context(), h, data); err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(data)
	bad[500] ^= 0x80
	p := objectPath(root, h)
	if err := os.Chmod(p, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := be.Load(t.Context(), h, 0, 0)
	if err != nil || !bytes.Equal(got, bad) {
		t.Errorf("Load of a corrupted object = %d bytes, %v; want the bytes on disk", len(got), err)
	}
}

// TestFullDisk fills a 2 MiB tmpfs and checks that the Save that does not fit
// fails clearly and leaves everything saved before intact.
func TestFullDisk(t *testing.T) {
	root := disktest.Tmpfs(t, "2m")
	be := create(t, root)

	const size = 300 << 10 // about 7 fit; the last one fails part-written
	saved := make(map[backend.Handle][]byte)
	var order []backend.Handle
	var (
		failed backend.Handle
		err    error
	)
	for range 100 {
		h := randomHandle(backend.Pack)
		data := randomBytes(size)
		if err = be.Save(t.Context(), h, data); err != nil {
			failed = h
			break
		}
		saved[h] = data
		order = append(order, h)
	}
	if err == nil {
		t.Fatal("100 saves of 300 KiB fit in a 2 MiB tmpfs")
	}
	if !errors.Is(err, syscall.ENOSPC) || !strings.HasPrefix(err.Error(), "local: save "+failed.String()) {
		t.Errorf("Save on a full disk = %v, want a local: save error naming the object and wrapping ENOSPC", err)
	}
	if len(saved) == 0 {
		t.Fatal("not even one object fit")
	}
	if _, err := os.Lstat(objectPath(root, failed)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the failed object is on disk under its final name (Lstat: %v)", err)
	}
	if _, err := be.Stat(t.Context(), failed); !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("Stat of the failed object = %v, want ErrNotExist", err)
	}
	checkNoTemp(t, root)
	for h, data := range saved {
		got, err := be.Load(t.Context(), h, 0, 0)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Load(%v) after disk full = %d bytes, %v; want the %d saved", h, len(got), err, len(data))
		}
	}
	if n := countObjects(t, be, backend.Pack); n != len(saved) {
		t.Errorf("List = %d packs, want %d", n, len(saved))
	}

	// A retry of an object already saved needs no space.
	first := order[0]
	if err := be.Save(t.Context(), first, saved[first]); err != nil {
		t.Errorf("identical re-save on a full disk: %v", err)
	}
	// Freeing space makes room again.
	if err := be.Remove(t.Context(), first); err != nil {
		t.Fatal(err)
	}
	if err := be.Save(t.Context(), failed, randomBytes(100<<10)); err != nil {
		t.Errorf("Save after freeing space: %v", err)
	}
}

func countObjects(t *testing.T, be backend.Backend, typ backend.Type) int {
	t.Helper()
	n := 0
	if err := be.List(t.Context(), typ, func(backend.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

func BenchmarkSave(b *testing.B) {
	be := create(b, b.TempDir())
	data := make([]byte, 16<<20)
	r := mrand.NewChaCha8([32]byte{})
	r.Read(data)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		h := backend.Handle{Type: backend.Pack, Name: fmt.Sprintf("%064x", i)}
		i++
		if err := be.Save(b.Context(), h, data); err != nil {
			b.Fatal(err)
		}
		// Keep the disk from filling over a long -benchtime.
		b.StopTimer()
		if err := be.Remove(b.Context(), h); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
