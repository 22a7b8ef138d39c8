package restorer

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

const sparseSize = 64 << 20

// makeTree fills dir with every kind of entry Restore handles and gives each
// its own nanosecond times. It reports whether a device node could be made.
func makeTree(t *testing.T, dir string) (haveDev bool) {
	t.Helper()
	root := os.Geteuid() == 0
	writeFile(t, filepath.Join(dir, "empty"), nil, 0o644)
	writeFile(t, filepath.Join(dir, "one"), []byte{42}, 0o600)
	writeFile(t, filepath.Join(dir, "big"), randBytes(1, 5<<20+123), 0o755)
	writeFile(t, filepath.Join(dir, "suid"), []byte("#!/bin/sh\n"), 0o755|os.ModeSetuid)
	writeFile(t, filepath.Join(dir, "dup1"), randBytes(2, 200<<10), 0o644)
	writeFile(t, filepath.Join(dir, "sub", "dup2"), randBytes(2, 200<<10), 0o644)
	// One chunk four times in one file: a blob written to several offsets.
	writeFile(t, filepath.Join(dir, "repeat"), bytes.Repeat(randBytes(3, testChunk), 4), 0o644)
	mustRun(t, os.MkdirAll(filepath.Join(dir, "a", "b", "c"), 0o755))
	mustRun(t, os.MkdirAll(filepath.Join(dir, "a", "b2"), 0o700))
	mustRun(t, os.Mkdir(filepath.Join(dir, "setgid"), 0o755))
	mustRun(t, os.Chmod(filepath.Join(dir, "setgid"), 0o775|os.ModeSetgid))
	writeFile(t, filepath.Join(dir, "setgid", "f"), []byte("in setgid"), 0o640)
	mustRun(t, os.Mkdir(filepath.Join(dir, "sticky"), 0o755))
	mustRun(t, os.Chmod(filepath.Join(dir, "sticky"), 0o777|os.ModeSticky))
	mustRun(t, os.Symlink("big", filepath.Join(dir, "link")))
	mustRun(t, os.Symlink("nope/none", filepath.Join(dir, "dangling")))
	mustRun(t, os.Symlink("/etc/passwd", filepath.Join(dir, "abs")))
	writeFile(t, filepath.Join(dir, "hl1"), randBytes(4, 100<<10), 0o640)
	mustRun(t, os.Link(filepath.Join(dir, "hl1"), filepath.Join(dir, "sub", "hl2")))
	makeSparse(t, filepath.Join(dir, "sparse"))
	mustRun(t, unix.Mkfifo(filepath.Join(dir, "fifo"), 0o620))
	mustRun(t, os.Chmod(filepath.Join(dir, "fifo"), 0o620))
	if l, err := net.Listen("unix", filepath.Join(dir, "sock")); err == nil {
		l.(*net.UnixListener).SetUnlinkOnClose(false)
		l.Close()
	}
	if root {
		writeFile(t, filepath.Join(dir, "owned"), []byte("not mine"), 0o644)
		mustRun(t, os.Chown(filepath.Join(dir, "owned"), 1234, 5678))
		mustRun(t, os.Symlink("owned", filepath.Join(dir, "ownedlink")))
		mustRun(t, os.Lchown(filepath.Join(dir, "ownedlink"), 1234, 5678))
		mustRun(t, os.Mkdir(filepath.Join(dir, "owneddir"), 0o750))
		mustRun(t, os.Chown(filepath.Join(dir, "owneddir"), 1234, 5678))
		mustRun(t, os.Chmod(filepath.Join(dir, "suid"), 0o755|os.ModeSetuid)) // chown may clear it
		err := unix.Mknod(filepath.Join(dir, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
		haveDev = err == nil
		if err != nil {
			t.Logf("no device node in the test tree: %v", err)
		}
	}
	// Distinct nanosecond times, children before their directories.
	var paths []string
	mustRun(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		paths = append(paths, p)
		return err
	}))
	base := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC)
	for i := len(paths) - 1; i > 0; i-- {
		mt := base.Add(time.Duration(i)*time.Hour + time.Duration(i*7919+1)*time.Nanosecond)
		setTime(t, paths[i], mt.Add(-time.Duration(i)*time.Minute-13*time.Nanosecond), mt)
	}
	return haveDev
}

func makeSparse(t *testing.T, p string) {
	f, err := os.Create(p)
	mustRun(t, err)
	defer f.Close()
	mustRun(t, f.Truncate(sparseSize))
	for _, off := range []int64{0, 10<<20 + 5, sparseSize - 3} {
		_, err := f.WriteAt([]byte("abc"), off)
		mustRun(t, err)
	}
}

func TestRestoreRoundTrip(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	haveDev := makeTree(t, src)
	root := backup(t, env.Repo, src)

	// A new process: nothing cached from the backup.
	r := env.Reopen(t)
	dst := filepath.Join(t.TempDir(), "restore") // missing: created
	var progress int
	st, err := Restore(context.Background(), r, root, dst, Options{Verify: true, Progress: func(Stats) { progress++ }})
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	checkRestored(t, r, root, src, dst)

	var sparse syscall.Stat_t
	mustRun(t, syscall.Stat(filepath.Join(dst, "sparse"), &sparse))
	if sparse.Size != sparseSize || sparse.Blocks*512 > sparseSize/16 {
		t.Errorf("sparse file: size %d, %d bytes allocated; want %d with holes", sparse.Size, sparse.Blocks*512, sparseSize)
	}
	files := int64(12) // empty one big suid dup1 dup2 repeat setgid/f hl1 sparse
	specials := int64(1)
	links := int64(3)
	if os.Geteuid() == 0 {
		files++
		links++
		if haveDev {
			specials++
		}
	}
	want := Stats{Files: files - 2, HardLinks: 1, Symlinks: links, Specials: specials, Skipped: 1, Verified: files - 2}
	got := Stats{Files: st.Files, HardLinks: st.HardLinks, Symlinks: st.Symlinks, Specials: st.Specials, Skipped: st.Skipped, Verified: st.Verified}
	if got != want {
		t.Errorf("stats %+v, want %+v", got, want)
	}
	if st.BytesDone != st.Bytes || st.BlobsDone != st.Blobs || st.Loaded == 0 {
		t.Errorf("stats: %d of %d bytes, %d of %d blobs, %d loaded", st.BytesDone, st.Bytes, st.BlobsDone, st.Blobs, st.Loaded)
	}
	if progress == 0 {
		t.Error("Progress never called")
	}
}

func TestRestoreTargetNotEmpty(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "f"), []byte("new"), 0o644)
	root := backup(t, env.Repo, src)

	dst := t.TempDir()
	writeFile(t, filepath.Join(dst, "old"), []byte("old"), 0o644)
	if _, err := Restore(context.Background(), env.Repo, root, dst, Options{}); !errors.Is(err, ErrTargetNotEmpty) {
		t.Fatalf("Restore into non-empty target: err %v, want ErrTargetNotEmpty", err)
	}
	if _, err := os.Lstat(filepath.Join(dst, "f")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("refused restore wrote f anyway (err %v)", err)
	}
	if _, err := Restore(context.Background(), env.Repo, root, filepath.Join(dst, "old"), Options{}); err == nil {
		t.Error("Restore onto a file: no error")
	}
}

// TestRestoreOverwrite checks that with Overwrite, what stands in the way is
// replaced, and that a symlink in the target never leads the restore out.
func TestRestoreOverwrite(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "a", "f"), []byte("inside"), 0o644)
	writeFile(t, filepath.Join(src, "top"), []byte("new top"), 0o644)
	writeFile(t, filepath.Join(src, "d"), []byte("a file now"), 0o644)
	writeFile(t, filepath.Join(src, "l"), []byte("was a symlink"), 0o644)
	root := backup(t, env.Repo, src)

	outside := t.TempDir()
	writeFile(t, filepath.Join(outside, "victim"), []byte("keep me"), 0o644)
	dst := t.TempDir()
	mustRun(t, os.Symlink(outside, filepath.Join(dst, "a")))
	mustRun(t, os.Symlink(filepath.Join(outside, "victim"), filepath.Join(dst, "l")))
	writeFile(t, filepath.Join(dst, "top"), []byte("old top, longer than the new one"), 0o600)
	writeFile(t, filepath.Join(dst, "d", "x"), []byte("in a dir"), 0o644)
	writeFile(t, filepath.Join(dst, "unrelated"), []byte("stays"), 0o644)

	if _, err := Restore(context.Background(), env.Repo, root, dst, Options{Overwrite: true}); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(outside)
	if len(ents) != 1 {
		t.Errorf("restore wrote outside the target: %v", ents)
	}
	if b, _ := os.ReadFile(filepath.Join(outside, "victim")); string(b) != "keep me" {
		t.Errorf("restore wrote through a symlink: victim = %q", b)
	}
	for name, want := range map[string]string{"a/f": "inside", "top": "new top", "d": "a file now", "l": "was a symlink", "unrelated": "stays"} {
		p := filepath.Join(dst, name)
		fi, err := os.Lstat(p)
		if err != nil || !fi.Mode().IsRegular() {
			t.Errorf("%s: %v, %v; want a regular file", name, fi, err)
			continue
		}
		if b, _ := os.ReadFile(p); string(b) != want {
			t.Errorf("%s = %q, want %q", name, b, want)
		}
	}
	if fi, err := os.Lstat(filepath.Join(dst, "a")); err != nil || !fi.IsDir() {
		t.Errorf("a: %v, %v; want a directory", fi, err)
	}
}

func TestRestoreInclude(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	for _, p := range []string{"etc/passwd", "etc/hosts", "etc/ssl/cert.pem", "var/lib/db/base/1",
		"var/lib/db/base/2", "var/lib/other/base/3", "var/log/x.log", "home/u/.bashrc", "top.txt", "etc.txt"} {
		writeFile(t, filepath.Join(src, filepath.FromSlash(p)), []byte(p), 0o644)
	}
	mustRun(t, os.MkdirAll(filepath.Join(src, "var", "empty"), 0o755))
	oldDir := time.Date(2019, 1, 2, 3, 4, 5, 6, time.UTC)
	setTime(t, filepath.Join(src, "var", "lib"), oldDir, oldDir)
	root := backup(t, env.Repo, src)

	tests := []struct {
		name    string
		include []string
		want    []string
	}{
		{"dir", []string{"etc"}, []string{"etc", "etc/hosts", "etc/passwd", "etc/ssl", "etc/ssl/cert.pem"}},
		{"leading slash", []string{"/etc/ssl/"}, []string{"etc", "etc/ssl", "etc/ssl/cert.pem"}},
		{"glob in file", []string{"etc/p*"}, []string{"etc", "etc/passwd"}},
		{"glob in dir", []string{"var/lib/*/base"}, []string{"var", "var/lib", "var/lib/db", "var/lib/db/base",
			"var/lib/db/base/1", "var/lib/db/base/2", "var/lib/other", "var/lib/other/base", "var/lib/other/base/3"}},
		{"per element", []string{"*.txt"}, []string{"etc.txt", "top.txt"}},
		{"deep glob", []string{"*/*/*.log"}, []string{"var", "var/log", "var/log/x.log"}},
		{"empty dir", []string{"var/empty"}, []string{"var", "var/empty"}},
		{"several", []string{"top.txt", "home"}, []string{"home", "home/u", "home/u/.bashrc", "top.txt"}},
		{"no match", []string{"nothing/here"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dst := t.TempDir()
			if _, err := Restore(context.Background(), env.Repo, root, dst, Options{Include: tt.include}); err != nil {
				t.Fatal(err)
			}
			got := listTree(t, dst)
			if !slices.Equal(got, tt.want) {
				t.Errorf("Include %q restored %q, want %q", tt.include, got, tt.want)
			}
			if slices.Contains(got, "var/lib") {
				fi, err := os.Stat(filepath.Join(dst, "var", "lib"))
				if err != nil || !fi.ModTime().Equal(oldDir) {
					t.Errorf("var/lib: %v, %v; want its snapshot mtime %v", fi.ModTime(), err, oldDir)
				}
			}
			for _, p := range got {
				if strings.Contains(p, ".") && !strings.HasSuffix(p, "/") {
					if b, _ := os.ReadFile(filepath.Join(dst, p)); string(b) != p && !isDir(dst, p) {
						t.Errorf("%s = %q", p, b)
					}
				}
			}
		})
	}
	if _, err := Restore(context.Background(), env.Repo, root, t.TempDir(), Options{Include: []string{"etc/["}}); err == nil {
		t.Error("bad pattern: no error")
	}
}

func isDir(dir, p string) bool {
	fi, err := os.Stat(filepath.Join(dir, p))
	return err == nil && fi.IsDir()
}

func listTree(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	mustRun(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, filepath.ToSlash(rel))
		}
		return nil
	}))
	sort.Strings(out)
	return out
}

// TestRestoreDamagedPack flips one byte of one blob in a pack on disk: the
// files using that blob are named in the error, all others restore intact.
func TestRestoreDamagedPack(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	for i := range 12 {
		writeFile(t, filepath.Join(src, "d", string(rune('a'+i))), randBytes(uint64(100+i), 300<<10+i), 0o644)
	}
	// victim's second chunk is also used by copy, in another directory.
	victim := randBytes(7, 3*testChunk)
	writeFile(t, filepath.Join(src, "victim"), victim, 0o644)
	writeFile(t, filepath.Join(src, "z", "copy"), victim[testChunk:2*testChunk], 0o644)
	root := backup(t, env.Repo, src)

	n, err := Lookup(context.Background(), env.Repo, root, "victim")
	mustRun(t, err)
	loc, ok := env.Repo.Index().Lookup(n.Content[1])
	if !ok {
		t.Fatal("victim's blob not in the index")
	}
	name := loc.Pack.String()
	p := filepath.Join(env.Dir, string(backend.Pack), name[:2], name)
	mustRun(t, os.Chmod(p, 0o600))
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	mustRun(t, err)
	b := make([]byte, 1)
	off := int64(loc.Offset) + int64(loc.Length)/2
	_, err = f.ReadAt(b, off)
	mustRun(t, err)
	b[0] ^= 0x40
	_, err = f.WriteAt(b, off)
	mustRun(t, err)
	mustRun(t, f.Close())

	dst := t.TempDir()
	_, err = Restore(context.Background(), env.Repo, root, dst, Options{Verify: true})
	var rerr *Error
	if !errors.As(err, &rerr) {
		t.Fatalf("Restore: err %v, want *Error", err)
	}
	var failed []string
	for _, f := range rerr.Failures {
		failed = append(failed, f.Path)
	}
	if want := []string{"victim", "z/copy"}; !slices.Equal(failed, want) {
		t.Errorf("failed paths %q, want %q", failed, want)
	}
	if !errors.Is(err, repo.ErrDamaged) {
		t.Errorf("err %v does not wrap repo.ErrDamaged", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "victim") || !strings.Contains(msg, "z/copy") {
		t.Errorf("error message %q does not name the damaged files", msg)
	}
	for i := range 12 {
		name := filepath.Join("d", string(rune('a'+i)))
		got, err := os.ReadFile(filepath.Join(dst, name))
		if err != nil || !bytes.Equal(got, randBytes(uint64(100+i), 300<<10+i)) {
			t.Errorf("%s: undamaged file not restored (err %v)", name, err)
		}
	}
	// The victim's undamaged chunks are still there, the damaged one a hole.
	got, err := os.ReadFile(filepath.Join(dst, "victim"))
	mustRun(t, err)
	if len(got) != len(victim) || !bytes.Equal(got[:testChunk], victim[:testChunk]) || !bytes.Equal(got[2*testChunk:], victim[2*testChunk:]) ||
		!isZero(got[testChunk:2*testChunk]) {
		t.Error("victim: undamaged chunks not restored around the damaged one")
	}
}

func TestRestoreCancel(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "f"), randBytes(9, 1<<20), 0o644)
	root := backup(t, env.Repo, src)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Restore(ctx, env.Repo, root, t.TempDir(), Options{}); !errors.Is(err, context.Canceled) {
		t.Errorf("Restore with cancelled ctx: err %v, want context.Canceled", err)
	}
}

func TestMatcher(t *testing.T) {
	m, err := newMatcher([]string{"a/*/c", "x"})
	mustRun(t, err)
	tests := []struct {
		path            string
		selects, inside bool
	}{
		{"a", false, true},
		{"a/b", false, true},
		{"a/b/c", true, false},
		{"a/b/c/d", true, false},
		{"a/b/d", false, false},
		{"b", false, false},
		{"x", true, false},
		{"x/y", true, false},
		{"xy", false, false},
	}
	for _, tt := range tests {
		e := splitPath(tt.path)
		if got := m.selects(e); got != tt.selects {
			t.Errorf("selects(%q) = %v, want %v", tt.path, got, tt.selects)
		}
		if got := m.mayContain(e); got != tt.inside {
			t.Errorf("mayContain(%q) = %v, want %v", tt.path, got, tt.inside)
		}
	}
	if _, err := newMatcher([]string{"/"}); err == nil {
		t.Error(`pattern "/" accepted`)
	}
}

// TestRestoreDamagedTree damages one directory's tree blob: that directory
// is reported (and still created), everything else restores.
func TestRestoreDamagedTree(t *testing.T) {
	env := repotest.New(t, 0)
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "bad", "lost"), []byte("lost"), 0o644)
	writeFile(t, filepath.Join(src, "good", "kept"), []byte("kept"), 0o644)
	writeFile(t, filepath.Join(src, "top"), []byte("top"), 0o644)
	root := backup(t, env.Repo, src)
	n, err := Lookup(context.Background(), env.Repo, root, "bad")
	mustRun(t, err)
	loc, _ := env.Repo.Index().Lookup(*n.Subtree)
	name := loc.Pack.String()
	p := filepath.Join(env.Dir, string(backend.Pack), name[:2], name)
	mustRun(t, os.Chmod(p, 0o600))
	data, err := os.ReadFile(p)
	mustRun(t, err)
	data[loc.Offset+loc.Length/2] ^= 1
	mustRun(t, os.WriteFile(p, data, 0o600))

	dst := t.TempDir()
	_, err = Restore(context.Background(), env.Reopen(t), root, dst, Options{})
	var rerr *Error
	if !errors.As(err, &rerr) || len(rerr.Failures) != 1 || rerr.Failures[0].Path != "bad" || !errors.Is(err, repo.ErrDamaged) {
		t.Fatalf("Restore: err %v, want one damaged failure for bad", err)
	}
	if got, want := listTree(t, dst), []string{"bad", "good", "good/kept", "top"}; !slices.Equal(got, want) {
		t.Errorf("restored %q, want %q", got, want)
	}
}
