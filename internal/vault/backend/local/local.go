// Package local stores a vault in a directory on a local file system.
//
// Layout under the root folder:
//
//	config                 the config object
//	keys/<name>            one folder per other type (index, snapshots, locks, marks)
//	data/<nn>/<name>       packs, fanned out by the first two hex digits of the
//	                       name so that no folder holds millions of files
//	tmp/                   objects being written; never listed or loaded
//
// Objects are written once: Save writes a temp file, fsyncs it, and hard-links
// it to the final name, which fails atomically if the name exists. An object
// therefore appears under its final name only complete and durable.
package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
)

const (
	tmpDir = "tmp"
	// fileMode drops write permission from saved objects so that tools other
	// than the vault are less likely to modify them in place.
	fileMode = 0o400
	dirMode  = 0o700
	// chunkSize bounds how much is written or read between checks of ctx: a
	// 16 MiB pack on a slow disk should still stop promptly when cancelled.
	chunkSize = 1 << 20
	// listBatch is how many directory entries List reads at a time, so that
	// listing a large folder does not hold all of its names in memory.
	listBatch = 1024
)

// Backend is a vault stored in a directory. It is safe for concurrent use,
// also by several processes sharing the directory: every coordination it
// needs is done by the file system (exclusive link).
type Backend struct {
	root string
}

var _ backend.Backend = (*Backend)(nil)

// Create prepares root as a new vault directory, creating it and its folders
// as needed, and returns a Backend for it. It fails, with an error wrapping
// fs.ErrExist, if root already holds a config object. A root left with
// folders but no config (Create ran, the config Save did not) is accepted,
// so an interrupted init can simply be run again.
func Create(ctx context.Context, root string) (*Backend, error) {
	root = filepath.Clean(root)
	if err := os.MkdirAll(root, dirMode); err != nil {
		return nil, fmt.Errorf("local: create: %w", err)
	}
	cfg := filepath.Join(root, backend.ConfigName)
	switch _, err := os.Lstat(cfg); {
	case err == nil:
		return nil, fmt.Errorf("local: create: %s already holds a vault config: %w", root, fs.ErrExist)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("local: create: %w", err)
	}

	dirs := []string{tmpDir}
	for _, t := range backend.Types {
		if t != backend.Config {
			dirs = append(dirs, string(t))
		}
	}
	for i := range 256 {
		dirs = append(dirs, filepath.Join(string(backend.Pack), fmt.Sprintf("%02x", i)))
	}
	for _, d := range dirs {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("local: create %s: %w", root, err)
		}
		if err := os.Mkdir(filepath.Join(root, d), dirMode); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("local: create: %w", err)
		}
	}
	// One fsync per parent rather than per folder: 256 fsyncs of data/
	// would make Create take noticeably long on a spinning disk.
	for _, d := range []string{filepath.Join(root, string(backend.Pack)), root, filepath.Dir(root)} {
		if err := syncDir(d); err != nil {
			return nil, fmt.Errorf("local: create: %w", err)
		}
	}
	return &Backend{root: root}, nil
}

// Open returns a Backend for the existing directory root. It checks only that
// root is a directory, not that it holds a vault: callers that need one check
// for the config object with Stat. Folders missing under root (for example
// after a copy that skipped empty folders) are created when first needed.
func Open(root string) (*Backend, error) {
	root = filepath.Clean(root)
	fi, err := os.Stat(root)
	if err != nil {
		return nil, fmt.Errorf("local: open: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("local: open: %s is not a directory", root)
	}
	return &Backend{root: root}, nil
}

// Root returns the directory the backend stores objects in.
func (b *Backend) Root() string { return b.root }

// path returns where h lives. h must be valid.
func (b *Backend) path(h backend.Handle) string {
	switch h.Type {
	case backend.Config:
		return filepath.Join(b.root, backend.ConfigName)
	case backend.Pack:
		return filepath.Join(b.root, string(h.Type), h.Name[:2], h.Name)
	default:
		return filepath.Join(b.root, string(h.Type), h.Name)
	}
}

// Save stores data under h; see [backend.Backend]. It returns once the
// object's bytes and its directory entry are fsynced. A failure (including a
// full disk, whose error unwraps to syscall.ENOSPC) leaves no object under
// h's name.
func (b *Backend) Save(ctx context.Context, h backend.Handle, data []byte) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("local: save: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("local: save %s: %w", h, err)
	}
	if err := b.save(ctx, h, data); err != nil {
		return fmt.Errorf("local: save %s: %w", h, err)
	}
	return nil
}

func (b *Backend) save(ctx context.Context, h backend.Handle, data []byte) error {
	p := b.path(h)
	// A retry after a crash usually finds the object already there; checking
	// first also lets such a retry succeed on a full disk.
	switch err := sameContent(p, data); {
	case err == nil:
		return syncDir(filepath.Dir(p))
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}

	tmp, err := b.writeTemp(ctx, h, data)
	if err != nil {
		return err
	}
	// The final name, once linked, keeps the inode alive; dropping the temp
	// name can fail only harmlessly, and CleanTemp catches what remains.
	defer os.Remove(tmp)
	if err := ctx.Err(); err != nil {
		return err
	}

	err = os.Link(tmp, p)
	if errors.Is(err, fs.ErrNotExist) {
		if err := b.ensureDir(filepath.Dir(p)); err != nil {
			return err
		}
		err = os.Link(tmp, p)
	}
	if errors.Is(err, fs.ErrExist) {
		// A concurrent Save of h won the race.
		if err := sameContent(p, data); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	// Also after a lost race: the winner may not have fsynced the folder yet,
	// and Save must not return before the name is durable.
	return syncDir(filepath.Dir(p))
}

// writeTemp writes data to a new fsynced file under tmp/ and returns its path.
func (b *Backend) writeTemp(ctx context.Context, h backend.Handle, data []byte) (name string, err error) {
	dir := filepath.Join(b.root, tmpDir)
	// The handle in the name helps whoever finds a stale temp file.
	pattern := string(h.Type) + "-" + h.Name + "-*"
	f, err := os.CreateTemp(dir, pattern)
	if errors.Is(err, fs.ErrNotExist) {
		if err := b.ensureDir(dir); err != nil {
			return "", err
		}
		f, err = os.CreateTemp(dir, pattern)
	}
	if err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	for rest := data; len(rest) > 0; {
		if err := ctx.Err(); err != nil {
			return "", err
		}
		n := min(len(rest), chunkSize)
		if _, err := f.Write(rest[:n]); err != nil {
			return "", err
		}
		rest = rest[n:]
	}
	if err := f.Chmod(fileMode); err != nil {
		return "", err
	}
	if err := f.Sync(); err != nil {
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return f.Name(), nil
}

// sameContent returns nil if the file at p holds exactly data, an error
// wrapping backend.ErrExists if it holds something else, and an error
// wrapping fs.ErrNotExist if it is missing.
func sameContent(p string, data []byte) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", p)
	}
	if fi.Size() != int64(len(data)) {
		return backend.ErrExists
	}
	buf := make([]byte, min(len(data), chunkSize))
	for rest := data; len(rest) > 0; {
		n := min(len(rest), len(buf))
		if _, err := io.ReadFull(f, buf[:n]); err != nil {
			return err
		}
		if !bytes.Equal(buf[:n], rest[:n]) {
			return backend.ErrExists
		}
		rest = rest[n:]
	}
	return nil
}

// ensureDir creates dir and any missing parents up to the root, fsyncing
// each parent so the new folder survives a crash.
func (b *Backend) ensureDir(dir string) error {
	rel, err := filepath.Rel(b.root, dir)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		// The root is never created here: its absence means the vault is gone.
		return nil
	}
	err = os.Mkdir(dir, dirMode)
	if errors.Is(err, fs.ErrNotExist) {
		if err := b.ensureDir(filepath.Dir(dir)); err != nil {
			return err
		}
		err = os.Mkdir(dir, dirMode)
	}
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	// Also when another Save created dir first: it may not have synced yet.
	return syncDir(filepath.Dir(dir))
}

// syncDir fsyncs a folder so that entries added or removed in it are durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOTSUP) {
		// Some file systems (for example some network ones) cannot sync a
		// folder; they give no stronger guarantee we could ask for instead.
		err = nil
	}
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Load returns length bytes of h from offset; length 0 means to the end. See
// [backend.Backend]. A range that does not lie within the object is an error,
// never a short result; offset equal to the size with length 0 gives no bytes.
func (b *Backend) Load(ctx context.Context, h backend.Handle, offset, length int64) ([]byte, error) {
	if err := h.Validate(); err != nil {
		return nil, fmt.Errorf("local: load: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("local: load %s: %w", h, err)
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("local: load %s: invalid range: offset %d, length %d", h, offset, length)
	}
	f, err := os.Open(b.path(h))
	if err != nil {
		return nil, fmt.Errorf("local: load %s: %w", h, notExist(err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("local: load %s: %w", h, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("local: load %s: not a regular file", h)
	}
	size := fi.Size()
	if offset > size || length > size-offset {
		return nil, fmt.Errorf("local: load %s: range [%d, %d) beyond object size %d", h, offset, offset+length, size)
	}
	if length == 0 {
		length = size - offset
	}
	// length is at most the size of a file that exists, so this allocation is
	// bounded by what the vault itself wrote.
	buf := make([]byte, length)
	for done := 0; done < len(buf); {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("local: load %s: %w", h, err)
		}
		n := min(len(buf)-done, chunkSize)
		if _, err := f.ReadAt(buf[done:done+n], offset+int64(done)); err != nil {
			// Objects never shrink, so EOF here means someone else edited it.
			return nil, fmt.Errorf("local: load %s: %w", h, err)
		}
		done += n
	}
	return buf, nil
}

// Stat describes h; see [backend.Backend].
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if err := h.Validate(); err != nil {
		return backend.Info{}, fmt.Errorf("local: stat: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return backend.Info{}, fmt.Errorf("local: stat %s: %w", h, err)
	}
	fi, err := os.Lstat(b.path(h))
	if err != nil {
		return backend.Info{}, fmt.Errorf("local: stat %s: %w", h, notExist(err))
	}
	if !fi.Mode().IsRegular() {
		return backend.Info{}, fmt.Errorf("local: stat %s: not a regular file", h)
	}
	return backend.Info{Handle: h, Size: fi.Size(), ModTime: fi.ModTime()}, nil
}

// List calls fn for each object of type t; see [backend.Backend]. Files whose
// names are not valid handles of t (temp files, strays, packs in the wrong
// fan-out folder) are skipped. fn's error is returned unwrapped.
func (b *Backend) List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error {
	if !t.Valid() {
		return fmt.Errorf("local: list: invalid type %q", t)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("local: list %s: %w", t, err)
	}
	switch t {
	case backend.Config:
		fi, err := b.Stat(ctx, backend.Handle{Type: t, Name: backend.ConfigName})
		if errors.Is(err, backend.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		return fn(fi)
	case backend.Pack:
		dir := filepath.Join(b.root, string(t))
		return b.listDir(ctx, dir, t, func(e fs.DirEntry) error {
			name := e.Name()
			if !e.IsDir() || len(name) != 2 || !isLowerHex(name) {
				return nil
			}
			return b.listDir(ctx, filepath.Join(dir, name), t, func(e fs.DirEntry) error {
				if !strings.HasPrefix(e.Name(), name) {
					return nil
				}
				return listEntry(t, e, fn)
			})
		})
	default:
		return b.listDir(ctx, filepath.Join(b.root, string(t)), t, func(e fs.DirEntry) error {
			return listEntry(t, e, fn)
		})
	}
}

// listEntry calls fn for e if it is a valid object of type t.
func listEntry(t backend.Type, e fs.DirEntry, fn func(backend.Info) error) error {
	h := backend.Handle{Type: t, Name: e.Name()}
	if !e.Type().IsRegular() || h.Validate() != nil {
		return nil
	}
	fi, err := e.Info()
	if errors.Is(err, fs.ErrNotExist) {
		return nil // removed since the folder was read
	}
	if err != nil {
		return fmt.Errorf("local: list %s: %w", t, err)
	}
	return fn(backend.Info{Handle: h, Size: fi.Size(), ModTime: fi.ModTime()})
}

// listDir calls visit for each entry of dir, reading it in batches. A missing
// dir has no entries. visit's error is returned unwrapped.
func (b *Backend) listDir(ctx context.Context, dir string, t backend.Type, visit func(fs.DirEntry) error) error {
	d, err := os.Open(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("local: list %s: %w", t, err)
	}
	defer d.Close()
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("local: list %s: %w", t, err)
		}
		entries, err := d.ReadDir(listBatch)
		for _, e := range entries {
			if err := visit(e); err != nil {
				return err
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("local: list %s: %w", t, err)
		}
	}
}

func isLowerHex(s string) bool {
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// Remove deletes h and fsyncs its folder; see [backend.Backend].
func (b *Backend) Remove(ctx context.Context, h backend.Handle) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("local: remove: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("local: remove %s: %w", h, err)
	}
	p := b.path(h)
	if err := os.Remove(p); err != nil {
		return fmt.Errorf("local: remove %s: %w", h, notExist(err))
	}
	if err := syncDir(filepath.Dir(p)); err != nil {
		return fmt.Errorf("local: remove %s: %w", h, err)
	}
	return nil
}

// Close does nothing: a Backend holds no open files between calls.
func (b *Backend) Close() error { return nil }

// CleanTemp removes files in tmp/ last modified more than olderThan ago and
// returns how many it removed. Such files are left by a process killed during
// Save; they are never visible as objects. olderThan must exceed the longest
// Save that may be running (in this or another process), or CleanTemp may
// remove a temp file before it is linked and make that Save fail; an hour is
// ample for any object the vault writes.
func (b *Backend) CleanTemp(olderThan time.Duration) (int, error) {
	dir := filepath.Join(b.root, tmpDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("local: clean temp: %w", err)
	}
	cutoff := time.Now().Add(-olderThan)
	removed := 0
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue // a Save finished meanwhile
		}
		if err != nil {
			return removed, fmt.Errorf("local: clean temp: %w", err)
		}
		if !fi.ModTime().Before(cutoff) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, fmt.Errorf("local: clean temp: %w", err)
		}
		removed++
	}
	if removed > 0 {
		if err := syncDir(dir); err != nil {
			return removed, fmt.Errorf("local: clean temp: %w", err)
		}
	}
	return removed, nil
}

// notExist maps a missing file to backend.ErrNotExist and returns other
// errors unchanged.
func notExist(err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return backend.ErrNotExist
	}
	return err
}
