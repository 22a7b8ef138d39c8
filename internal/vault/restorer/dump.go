package restorer

import (
	"archive/tar"
	"context"
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// dumpPrefetch is how many blobs Dump loads ahead of the one it writes:
// enough to keep a slow link busy, few enough (at most a few MiB) to keep
// Dump streaming.
const dumpPrefetch = 8

// Dump writes what is at path p in the tree root to w: a file's content, or
// for a directory a tar stream (PAX format) of it and everything below it,
// named by its path relative to p's parent ("etc/", "etc/passwd"; for the
// root, just the top-level names). Content is streamed blob by blob, in
// order. Sockets are left out; symlinks, hard links, FIFOs and devices
// become the matching tar entries.
func Dump(ctx context.Context, r *repo.Repository, root repo.ID, p string, w io.Writer) error {
	n, err := Lookup(ctx, r, root, p)
	if err != nil {
		return err
	}
	switch n.Type {
	case snapshot.File:
		return writeContent(ctx, r, p, n, w)
	case snapshot.Dir:
		return dumpTar(ctx, r, n, w)
	}
	return fmt.Errorf("restorer: dump %q: a %s is neither a file nor a directory", p, n.Type)
}

func dumpTar(ctx context.Context, r *repo.Repository, dir *snapshot.Node, w io.Writer) error {
	tw := tar.NewWriter(w)
	links := map[devIno]string{}
	entry := func(name string, n *snapshot.Node) error {
		hdr := &tar.Header{
			Name: name, Mode: int64(unixPerm(n.Mode)), Uid: int(n.UID), Gid: int(n.GID),
			Uname: n.User, Gname: n.Group, ModTime: n.ModTime, AccessTime: n.AccessTime,
			Format: tar.FormatPAX,
		}
		switch n.Type {
		case snapshot.Dir:
			hdr.Typeflag, hdr.Name = tar.TypeDir, name+"/"
		case snapshot.File:
			key := devIno{n.Device, n.Inode}
			if first, ok := links[key]; ok && n.Links > 1 {
				hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
				break
			}
			if n.Links > 1 {
				links[key] = name
			}
			hdr.Typeflag, hdr.Size = tar.TypeReg, int64(n.Size)
		case snapshot.Symlink:
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, n.LinkTarget
		case snapshot.FIFO:
			hdr.Typeflag = tar.TypeFifo
		case snapshot.Dev, snapshot.CharDev:
			hdr.Typeflag = tar.TypeBlock
			if n.Type == snapshot.CharDev {
				hdr.Typeflag = tar.TypeChar
			}
			hdr.Devmajor, hdr.Devminor = int64(unix.Major(n.Rdev)), int64(unix.Minor(n.Rdev))
		default:
			return nil // sockets
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("restorer: dump %s: %w", name, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			return writeContent(ctx, r, name, n, tw)
		}
		return nil
	}
	prefix := dir.Name
	if prefix != "" {
		if err := entry(prefix, dir); err != nil {
			return err
		}
	}
	err := walkTree(ctx, r, *dir.Subtree, prefix, entry)
	if err != nil {
		return err
	}
	return tw.Close()
}

// writeContent streams a file's content blobs to w in order, exactly
// n.Size bytes, loading up to dumpPrefetch blobs ahead.
func writeContent(ctx context.Context, r *repo.Repository, name string, n *snapshot.Node, w io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		data []byte
		err  error
	}
	q := make(chan chan result, dumpPrefetch)
	go func() {
		defer close(q)
		for _, id := range n.Content {
			c := make(chan result, 1)
			select {
			case q <- c:
			case <-ctx.Done():
				return
			}
			go func() {
				d, err := r.LoadBlob(ctx, pack.Data, id)
				c <- result{d, err}
			}()
		}
	}()
	left := int64(n.Size)
	for c := range q {
		res := <-c
		if res.err != nil {
			return fmt.Errorf("restorer: dump %s: %w", name, res.err)
		}
		d := res.data
		if int64(len(d)) > left {
			d = d[:left]
		}
		if _, err := w.Write(d); err != nil {
			return fmt.Errorf("restorer: dump %s: %w", name, err)
		}
		left -= int64(len(d))
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if left != 0 {
		return fmt.Errorf("%w: dump %s: content is %d bytes shorter than the file's size", repo.ErrDamaged, name, left)
	}
	return nil
}
