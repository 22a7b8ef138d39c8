package archiver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/dualkey/dualkey/internal/vault/chunker"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// smallFile is the size under which a file is read in a smallReaders slot.
const smallFile = 1 << 20

// saveNode stores the entry at path (and, for a directory, everything
// below it) and returns its node. pn is the same entry in the parent
// snapshot, or nil.
func (a *archiver) saveNode(ctx context.Context, path, name string, pn *snapshot.Node) (*snapshot.Node, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fmt.Errorf("archiver: %w", err)
	}
	n := nodeFromInfo(name, fi)
	switch n.Type {
	case snapshot.File:
		return a.saveFile(ctx, path, n, pn)
	case snapshot.Symlink:
		t, err := os.Readlink(path)
		if err != nil {
			return nil, fmt.Errorf("archiver: %w", err)
		}
		n.LinkTarget = t
	case snapshot.Dir:
		if err := a.saveDir(ctx, path, n, pn); err != nil {
			return nil, err
		}
		a.dirs.Add(1)
	}
	return n, nil
}

func (a *archiver) saveDir(ctx context.Context, path string, n, pn *snapshot.Node) error {
	entries, err := os.ReadDir(path)
	if err != nil {
		return fmt.Errorf("archiver: %w", err)
	}
	var ptree *snapshot.Tree
	if pn != nil && pn.Type == snapshot.Dir && pn.Subtree != nil {
		if t, err := a.r.LoadTree(ctx, *pn.Subtree); err == nil {
			ptree = t
		}
	}
	children := make([]*snapshot.Node, len(entries))
	var wg sync.WaitGroup
	for i, e := range entries {
		cpath := filepath.Join(path, e.Name())
		var pc *snapshot.Node
		if ptree != nil {
			pc = ptree.Find(e.Name())
		}
		if !e.Type().IsRegular() {
			c, err := a.saveNode(ctx, cpath, e.Name(), pc)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				a.fail(err)
				continue
			}
			children[i] = c
			continue
		}
		// Large files share Readers slots (more would only seek the disk);
		// small ones, whose cost is mostly per-file latency, run more at
		// once so a source tree keeps both cores busy.
		sem := a.readers
		if fi, err := e.Info(); err == nil && fi.Size() < smallFile {
			sem = a.smallReaders
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			c, err := a.saveNode(ctx, cpath, e.Name(), pc)
			if err != nil {
				if ctx.Err() == nil {
					a.fail(err)
				}
				return
			}
			children[i] = c
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	t := &snapshot.Tree{}
	for _, c := range children {
		if c != nil {
			t.Nodes = append(t.Nodes, c)
		}
	}
	t.Sort()
	id, err := a.r.SaveTree(ctx, t)
	if err != nil {
		return err
	}
	a.use(id)
	n.Subtree = &id
	return nil
}

func (a *archiver) saveFile(ctx context.Context, path string, n, pn *snapshot.Node) (*snapshot.Node, error) {
	a.mu.Lock()
	a.cur = path
	a.mu.Unlock()
	// O_NOFOLLOW: the entry was a regular file at Lstat; if it was swapped
	// for a symlink since, refuse rather than read what it points to.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NOATIME, 0)
	if errors.Is(err, syscall.EPERM) {
		f, err = os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("archiver: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("archiver: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("archiver: %s changed type while being read", path)
	}
	*n = *nodeFromInfo(n.Name, fi)
	pageSize := 0
	if a.opts.PageSize != nil {
		pageSize = a.opts.PageSize(path, fi)
	}
	chunking := "cdc"
	if pageSize > 0 {
		chunking = "pages:" + strconv.Itoa(pageSize)
	}
	a.files.Add(1)
	if pn != nil && unchanged(n, pn) && pn.Chunking == chunking && a.allStored(pn.Content) {
		n.Content, n.Chunking = pn.Content, pn.Chunking
		a.use(n.Content...)
		a.bytes.Add(int64(n.Size))
		return n, nil
	}
	a.mu.Lock()
	if pn == nil {
		a.sum.FilesNew++
	} else {
		a.sum.FilesChanged++
	}
	a.mu.Unlock()
	content, size, err := a.chunkStream(ctx, f, pageSize)
	if err != nil {
		return nil, fmt.Errorf("archiver: read %s: %w", path, err)
	}
	n.Content, n.Size, n.Chunking = content, uint64(size), chunking
	return n, nil
}

// unchanged reports whether a file looks the same as in the parent: same
// size, modification and change time, and inode. The change time catches a
// file rewritten with its mtime set back.
func unchanged(n, pn *snapshot.Node) bool {
	return pn.Type == snapshot.File && n.Size == pn.Size && n.ModTime.Equal(pn.ModTime) &&
		n.ChangeTime.Equal(pn.ChangeTime) && n.Inode == pn.Inode && n.Device == pn.Device
}

func (a *archiver) allStored(ids []repo.ID) bool {
	idx := a.r.Index()
	for _, id := range ids {
		if !idx.HasForDedup(id) {
			return false
		}
	}
	return true
}

// chunkStream cuts rd into chunks, hands them to the blob workers and
// returns their IDs in order.
func (a *archiver) chunkStream(ctx context.Context, rd io.Reader, pageSize int) ([]repo.ID, int64, error) {
	var sp chunker.Splitter
	if pageSize > 0 {
		sp = chunker.NewPages(rd, pageSize)
	} else {
		// A chunker's buffer is twice the maximum chunk size: reuse it
		// across files, or small files pay for allocating and clearing it.
		c, _ := a.chunkers.Get().(*chunker.Chunker)
		if c == nil {
			c = chunker.New(rd, a.gear, chunker.DefaultParams)
		} else {
			c.Reset(rd)
		}
		defer a.chunkers.Put(c)
		sp = c
	}
	var (
		outs    [][]repo.ID
		wg      sync.WaitGroup
		errOnce sync.Once
		jobErr  error
		size    int64
	)
	for eof := false; !eof; {
		if err := ctx.Err(); err != nil {
			wg.Wait()
			return nil, 0, err
		}
		bp := chunkBufs.Get().(*[]byte)
		job := blobJob{}
		if pageSize > 0 {
			// A batch of pages in one buffer: each Next reads into the
			// buffer's free tail.
			buf := (*bp)[:0]
			for len(job.pages) < pageBatch && cap(buf)-len(buf) >= pageSize {
				pg, err := sp.Next(buf[len(buf):])
				if err == io.EOF {
					eof = true
					break
				}
				if err != nil {
					chunkBufs.Put(bp)
					wg.Wait()
					return nil, 0, err
				}
				buf = buf[:len(buf)+len(pg)]
				job.pages = append(job.pages, pg)
				size += int64(len(pg))
			}
			if len(job.pages) == 0 {
				chunkBufs.Put(bp)
				break
			}
			a.bytes.Add(int64(len(buf)))
			job.out = make([]repo.ID, len(job.pages))
		} else {
			chunk, err := sp.Next((*bp)[:0])
			if err == io.EOF {
				chunkBufs.Put(bp)
				break
			}
			if err != nil {
				chunkBufs.Put(bp)
				wg.Wait()
				return nil, 0, err
			}
			size += int64(len(chunk))
			a.bytes.Add(int64(len(chunk)))
			job.data, job.out = chunk, make([]repo.ID, 1)
			if cap(chunk) != cap(*bp) {
				bp = nil // the chunker returned its own buffer
			}
		}
		outs = append(outs, job.out)
		wg.Add(1)
		job.done = func(err error) {
			if err != nil {
				errOnce.Do(func() { jobErr = err })
			}
			if bp != nil {
				chunkBufs.Put(bp)
			}
			wg.Done()
		}
		select {
		case a.jobs <- job:
		case <-ctx.Done():
			wg.Done()
			wg.Wait()
			return nil, 0, ctx.Err()
		}
	}
	wg.Wait()
	if jobErr != nil {
		return nil, 0, jobErr
	}
	var ids []repo.ID
	for _, o := range outs {
		ids = append(ids, o...)
	}
	a.use(ids...)
	return ids, size, nil
}

// pageBatch is how many pages go to a blob worker as one job: 64 pages
// (512 KiB) make the hand-off negligible, and a queue of a few jobs holds
// a few MiB.
const pageBatch = 64

var names struct {
	sync.Mutex
	users, groups map[uint32]string
}

func lookupNames(uid, gid uint32) (string, string) {
	names.Lock()
	defer names.Unlock()
	if names.users == nil {
		names.users, names.groups = map[uint32]string{}, map[uint32]string{}
	}
	u, ok := names.users[uid]
	if !ok {
		if x, err := user.LookupId(strconv.Itoa(int(uid))); err == nil {
			u = x.Username
		}
		names.users[uid] = u
	}
	g, ok := names.groups[gid]
	if !ok {
		if x, err := user.LookupGroupId(strconv.Itoa(int(gid))); err == nil {
			g = x.Name
		}
		names.groups[gid] = g
	}
	return u, g
}

func nodeFromInfo(name string, fi os.FileInfo) *snapshot.Node {
	n := &snapshot.Node{Name: name, Mode: fi.Mode(), ModTime: fi.ModTime().UTC()}
	m := fi.Mode()
	switch {
	case m.IsRegular():
		n.Type = snapshot.File
		n.Size = uint64(fi.Size())
	case m.IsDir():
		n.Type = snapshot.Dir
	case m&os.ModeSymlink != 0:
		n.Type = snapshot.Symlink
	case m&os.ModeCharDevice != 0:
		n.Type = snapshot.CharDev
	case m&os.ModeDevice != 0:
		n.Type = snapshot.Dev
	case m&os.ModeNamedPipe != 0:
		n.Type = snapshot.FIFO
	case m&os.ModeSocket != 0:
		n.Type = snapshot.Socket
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		n.UID, n.GID = st.Uid, st.Gid
		n.User, n.Group = lookupNames(st.Uid, st.Gid)
		n.AccessTime = time.Unix(st.Atim.Sec, st.Atim.Nsec).UTC()
		n.ChangeTime = time.Unix(st.Ctim.Sec, st.Ctim.Nsec).UTC()
		n.Inode, n.Device, n.Links, n.Rdev = st.Ino, uint64(st.Dev), uint64(st.Nlink), uint64(st.Rdev)
	}
	return n
}
