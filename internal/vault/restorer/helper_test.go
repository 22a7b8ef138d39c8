package restorer

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// testChunk is the fixed chunk size of the test snapshotter; the archiver
// cuts differently, which the restorer must not care about.
const testChunk = 64 << 10

// backup stores the directory dir in r the way a backup would, with fixed
// 64 KiB chunks, flushes, and returns the root tree.
func backup(t testing.TB, r *repo.Repository, dir string) repo.ID {
	t.Helper()
	ctx := context.Background()
	id := backupDir(t, ctx, r, dir)
	if err := r.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return id
}

func backupDir(t testing.TB, ctx context.Context, r *repo.Repository, dir string) repo.ID {
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	tree := &snapshot.Tree{}
	for _, de := range ents {
		p := filepath.Join(dir, de.Name())
		n := nodeOf(t, p)
		switch n.Type {
		case snapshot.Dir:
			id := backupDir(t, ctx, r, p)
			n.Subtree = &id
		case snapshot.File:
			n.Content = backupFile(t, ctx, r, p)
		}
		tree.Nodes = append(tree.Nodes, n)
	}
	tree.Sort()
	id, err := r.SaveTree(ctx, tree)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func backupFile(t testing.TB, ctx context.Context, r *repo.Repository, p string) []repo.ID {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ids []repo.ID
	for {
		buf := make([]byte, testChunk)
		n, err := io.ReadFull(f, buf)
		if n > 0 {
			id, _, serr := r.SaveBlob(ctx, pack.Data, buf[:n])
			if serr != nil {
				t.Fatal(serr)
			}
			ids = append(ids, id)
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return ids
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func nodeOf(t testing.TB, p string) *snapshot.Node {
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	n := &snapshot.Node{
		Name: fi.Name(), Mode: fi.Mode(), UID: st.Uid, GID: st.Gid,
		ModTime:    time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		AccessTime: time.Unix(st.Atim.Sec, st.Atim.Nsec),
		ChangeTime: time.Unix(st.Ctim.Sec, st.Ctim.Nsec),
		Inode:      st.Ino, Device: st.Dev, Links: uint64(st.Nlink),
	}
	switch m := fi.Mode(); {
	case m.IsDir():
		n.Type = snapshot.Dir
		n.Links = 0
	case m.IsRegular():
		n.Type, n.Size = snapshot.File, uint64(fi.Size())
	case m&fs.ModeSymlink != 0:
		n.Type = snapshot.Symlink
		if n.LinkTarget, err = os.Readlink(p); err != nil {
			t.Fatal(err)
		}
	case m&fs.ModeNamedPipe != 0:
		n.Type = snapshot.FIFO
	case m&fs.ModeSocket != 0:
		n.Type = snapshot.Socket
	case m&fs.ModeCharDevice != 0:
		n.Type, n.Rdev = snapshot.CharDev, st.Rdev
	case m&fs.ModeDevice != 0:
		n.Type, n.Rdev = snapshot.Dev, st.Rdev
	default:
		t.Fatalf("%s: unexpected mode %v", p, m)
	}
	return n
}

// checkRestored compares what Restore wrote under dst with the snapshot
// root (metadata) and with the source directory src (content). Metadata
// is compared first, for all paths, as reading content moves access times.
func checkRestored(t *testing.T, r *repo.Repository, root repo.ID, src, dst string) {
	t.Helper()
	ctx := context.Background()
	type seen struct {
		path string
		node *snapshot.Node
	}
	var all []seen
	inodes := map[devIno]uint64{} // source inode → restored inode
	err := Walk(ctx, r, root, func(p string, n *snapshot.Node) error {
		all = append(all, seen{p, n})
		abs := filepath.Join(dst, filepath.FromSlash(p))
		fi, err := os.Lstat(abs)
		if n.Type == snapshot.Socket {
			if !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("%s: socket restored (err %v), want it skipped", p, err)
			}
			return nil
		}
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode() != n.Mode {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), n.Mode)
		}
		if st.Uid != n.UID || st.Gid != n.GID {
			t.Errorf("%s: owner %d:%d, want %d:%d", p, st.Uid, st.Gid, n.UID, n.GID)
		}
		if got := time.Unix(st.Mtim.Sec, st.Mtim.Nsec); !got.Equal(n.ModTime) {
			t.Errorf("%s: mtime %v, want %v", p, got, n.ModTime)
		}
		_, laterName := inodes[devIno{n.Device, n.Inode}]
		if got := time.Unix(st.Atim.Sec, st.Atim.Nsec); !got.Equal(n.AccessTime) && !(n.Links > 1 && laterName) {
			// Names of one inode share its atime; the backup read the
			// first name before recording the later ones.
			t.Errorf("%s: atime %v, want %v", p, got, n.AccessTime)
		}
		switch n.Type {
		case snapshot.File:
			if fi.Size() != int64(n.Size) {
				t.Errorf("%s: size %d, want %d", p, fi.Size(), n.Size)
			}
			if n.Links > 1 {
				k := devIno{n.Device, n.Inode}
				if ino, ok := inodes[k]; ok && ino != st.Ino {
					t.Errorf("%s: not a hard link of its sibling names (inode %d, want %d)", p, st.Ino, ino)
				}
				inodes[k] = st.Ino
			}
		case snapshot.Symlink:
			if got, _ := os.Readlink(abs); got != n.LinkTarget {
				t.Errorf("%s: symlink to %q, want %q", p, got, n.LinkTarget)
			}
		case snapshot.CharDev, snapshot.Dev:
			if st.Rdev != n.Rdev {
				t.Errorf("%s: rdev %#x, want %#x", p, st.Rdev, n.Rdev)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range all {
		if s.node.Type != snapshot.File {
			continue
		}
		want, err := os.ReadFile(filepath.Join(src, filepath.FromSlash(s.path)))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(dst, filepath.FromSlash(s.path)))
		if err != nil {
			t.Errorf("%s: %v", s.path, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: content differs (%d bytes, want %d)", s.path, len(got), len(want))
		}
	}
}

func randBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func writeFile(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

// setTime sets atime and mtime of p, not following a symlink.
func setTime(t testing.TB, p string, atime, mtime time.Time) {
	t.Helper()
	ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		t.Fatal(err)
	}
}

func mustRun(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
