package restorer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// create makes every entry in walk order: directories (with a private mode
// until finishDirs), empty files of their final size, hard links,
// symlinks and special files. Only files and directories get metadata
// later; everything else is finished here.
func (rs *restore) create(ctx context.Context) error {
	for i := range rs.p.entries {
		if i%256 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		e := &rs.p.entries[i]
		if err := rs.createEntry(e); err != nil {
			if e.file >= 0 {
				rs.p.files[e.file].missing.Store(true)
				rs.failFile(e.file, err)
			} else {
				rs.fail(e.path, err)
			}
		}
	}
	return nil
}

func (rs *restore) createEntry(e *entry) error {
	n := e.node
	switch {
	case n.Type == snapshot.Dir:
		if err := rs.mkdir(e.abs); err != nil {
			return err
		}
		rs.c.dirs.Add(1)
		return nil
	case e.link >= 0:
		first := &rs.p.entries[e.link]
		if err := rs.replace(e.abs, func() error { return os.Link(first.abs, e.abs) }); err != nil {
			return err
		}
		rs.c.hardLinks.Add(1)
		return nil
	case n.Type == snapshot.File:
		return rs.createFile(e)
	case n.Type == snapshot.Symlink:
		if err := rs.replace(e.abs, func() error { return os.Symlink(n.LinkTarget, e.abs) }); err != nil {
			return err
		}
		rs.c.symlinks.Add(1)
		if err := rs.lchown(e.abs, n); err != nil {
			return err
		}
		return setTimes(e.abs, n)
	case n.Type == snapshot.FIFO:
		if err := rs.replace(e.abs, func() error { return unix.Mkfifo(e.abs, 0o600) }); err != nil {
			return fmt.Errorf("mkfifo: %w", err)
		}
		rs.c.specials.Add(1)
		return rs.finishSpecial(e.abs, n)
	case n.Type == snapshot.Dev || n.Type == snapshot.CharDev:
		kind := uint32(unix.S_IFBLK)
		if n.Type == snapshot.CharDev {
			kind = unix.S_IFCHR
		}
		err := rs.replace(e.abs, func() error { return unix.Mknod(e.abs, kind|0o600, int(n.Rdev)) })
		if err != nil {
			// Devices need privileges a restore often lacks; they are also
			// recreated by the system that owns them. Best effort.
			rs.c.skipped.Add(1)
			rs.opts.Log.Warn("device not restored", "path", e.path, "err", err)
			return nil
		}
		rs.c.specials.Add(1)
		return rs.finishSpecial(e.abs, n)
	case n.Type == snapshot.Socket:
		// A socket belongs to the process that bound it; there is nothing
		// to restore.
		rs.c.skipped.Add(1)
		rs.opts.Log.Debug("socket skipped", "path", e.path)
		return nil
	}
	return fmt.Errorf("unknown node type %q", n.Type)
}

func (rs *restore) createFile(e *entry) error {
	n := e.node
	var f *os.File
	err := rs.replace(e.abs, func() error {
		var err error
		f, err = os.OpenFile(e.abs, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o600)
		return err
	})
	if err != nil {
		return err
	}
	rs.c.files.Add(1)
	// Setting the size first leaves every part not written a hole, and
	// spares the file system growing it write by write.
	if n.Size > 0 {
		if err := f.Truncate(int64(n.Size)); err != nil {
			f.Close()
			return err
		}
	}
	fs := rs.p.files[e.file]
	if fs.remaining.Load() == 0 {
		rs.finishFile(e.file, f)
		return nil
	}
	return f.Close()
}

// finishFile sets a file's metadata once all its content is written, and
// closes f (which may be nil).
func (rs *restore) finishFile(fi int32, f *os.File) {
	fs := rs.p.files[fi]
	e := &rs.p.entries[fs.entry]
	n := e.node
	if fs.missing.Load() {
		return
	}
	if f == nil {
		var err error
		f, err = os.OpenFile(e.abs, os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
		if err != nil {
			rs.failFile(fi, err)
			return
		}
	}
	err := func() error {
		if fs.contentLen > int64(n.Size) {
			// Content longer than the recorded size: keep the size.
			if err := f.Truncate(int64(n.Size)); err != nil {
				return err
			}
		}
		if err := rs.chownErr(f.Chown(int(n.UID), int(n.GID))); err != nil {
			return err
		}
		// After chown, which clears setuid and setgid.
		return f.Chmod(permBits(n.Mode))
	}()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = setTimes(e.abs, n)
	}
	if err != nil {
		rs.failFile(fi, err)
	}
}

// finishDirs sets directories' metadata deepest first, after everything
// inside them exists, so that creating their entries does not move their
// times and a read-only mode does not stop the restore.
func (rs *restore) finishDirs(ctx context.Context) error {
	for i := len(rs.p.entries) - 1; i >= 0; i-- {
		e := &rs.p.entries[i]
		if e.node.Type != snapshot.Dir {
			continue
		}
		if i%256 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if err := rs.finishDir(e); err != nil {
			rs.fail(e.path, err)
		}
	}
	return nil
}

func (rs *restore) finishDir(e *entry) error {
	f, err := os.OpenFile(e.abs, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	err = rs.chownErr(f.Chown(int(e.node.UID), int(e.node.GID)))
	if err == nil {
		err = f.Chmod(permBits(e.node.Mode))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return setTimes(e.abs, e.node)
}

// finishSpecial sets owner, mode and times of a FIFO or device node.
func (rs *restore) finishSpecial(abs string, n *snapshot.Node) error {
	if err := rs.lchown(abs, n); err != nil {
		return err
	}
	// fchmodat cannot refuse to follow a symlink on Linux, but abs was just
	// created by mknod, which does not follow one either.
	if err := unix.Fchmodat(unix.AT_FDCWD, abs, unixPerm(n.Mode), 0); err != nil {
		return fmt.Errorf("chmod: %w", err)
	}
	return setTimes(abs, n)
}

// mkdir creates a directory, or, with Overwrite, accepts an existing real
// directory and replaces anything else (a symlink above all).
func (rs *restore) mkdir(abs string) error {
	err := os.Mkdir(abs, 0o700)
	if err == nil || !errors.Is(err, fs.ErrExist) || !rs.opts.Overwrite {
		return err
	}
	fi, lerr := os.Lstat(abs)
	if lerr != nil {
		return lerr
	}
	if fi.IsDir() {
		return nil
	}
	if err := os.Remove(abs); err != nil {
		return err
	}
	return os.Mkdir(abs, 0o700)
}

// replace runs create; with Overwrite, if the name exists, it removes what
// is there (a directory with all it holds) and runs create once more.
func (rs *restore) replace(abs string, create func() error) error {
	err := create()
	if err == nil || !errors.Is(err, fs.ErrExist) || !rs.opts.Overwrite {
		return err
	}
	fi, lerr := os.Lstat(abs)
	if lerr != nil {
		return lerr
	}
	if fi.IsDir() {
		err = os.RemoveAll(abs)
	} else {
		err = os.Remove(abs)
	}
	if err != nil {
		return err
	}
	return create()
}

func (rs *restore) lchown(abs string, n *snapshot.Node) error {
	return rs.chownErr(os.Lchown(abs, int(n.UID), int(n.GID)))
}

// chownErr counts and drops a refusal to change owner: without root (or
// CAP_CHOWN) files simply stay the restoring user's.
func (rs *restore) chownErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EINVAL) {
		rs.c.ownerSkipped.Add(1)
		return nil
	}
	return fmt.Errorf("chown: %w", err)
}

// permBits keeps the bits chmod sets.
func permBits(m os.FileMode) os.FileMode {
	return m & (os.ModePerm | os.ModeSetuid | os.ModeSetgid | os.ModeSticky)
}

func unixPerm(m os.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&os.ModeSetuid != 0 {
		u |= unix.S_ISUID
	}
	if m&os.ModeSetgid != 0 {
		u |= unix.S_ISGID
	}
	if m&os.ModeSticky != 0 {
		u |= unix.S_ISVTX
	}
	return u
}

// setTimes sets access and modification time without following a symlink.
// An unknown (zero) time is left alone; an unknown access time takes the
// modification time.
func setTimes(abs string, n *snapshot.Node) error {
	at := n.AccessTime
	if at.IsZero() {
		at = n.ModTime
	}
	ts := []unix.Timespec{timespec(at), timespec(n.ModTime)}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, abs, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

func timespec(t time.Time) unix.Timespec {
	if t.IsZero() {
		return unix.Timespec{Nsec: unix.UTIME_OMIT}
	}
	return unix.Timespec{Sec: t.Unix(), Nsec: int64(t.Nanosecond())}
}
