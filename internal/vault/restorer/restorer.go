package restorer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dualkey/dualkey/internal/vault/repo"
)

var (
	// ErrTargetNotEmpty is returned by Restore for a target directory that
	// holds something, unless Options.Overwrite is set.
	ErrTargetNotEmpty = errors.New("restorer: target directory is not empty")
	// ErrNotFound means a path does not exist in the snapshot.
	ErrNotFound = errors.New("restorer: no such path in the snapshot")
)

// Options tune Restore. The zero value restores everything with defaults.
type Options struct {
	// Include selects what to restore: slash-separated glob patterns matched
	// against the paths inside the snapshot, one path.Match pattern per
	// element ("etc/*.conf", "var/lib/*/base"). A pattern matching a
	// directory selects all below it; the directories leading to a selected
	// path are restored too. Empty selects everything.
	Include []string
	// Workers is how many pack ranges are loaded, decoded and written at
	// once. Zero means 2 × runtime.NumCPU(): decoding is CPU-bound, and a
	// second worker per core hides the latency of the load before it.
	Workers int
	// Progress, if set, is called about ten times a second from one
	// goroutine, and once more with the final Stats before Restore returns.
	Progress func(Stats)
	// Log receives notes on what was skipped; nil discards.
	Log *slog.Logger
	// Overwrite allows a non-empty target: entries in the way of the
	// snapshot's names are removed (directories stay and are merged into).
	Overwrite bool
	// Verify re-reads every restored file afterwards and checks it against
	// the IDs of its content blobs.
	Verify bool
}

// ApplyDefaults fills zero fields.
func (o *Options) ApplyDefaults() {
	if o.Workers <= 0 {
		o.Workers = 2 * runtime.NumCPU()
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Stats counts what a Restore did.
type Stats struct {
	Files     int64 // regular files (inodes) created
	HardLinks int64 // further names of a file, created with link(2)
	Dirs      int64
	Symlinks  int64
	Specials  int64 // FIFOs and devices created
	Skipped   int64 // sockets, and devices mknod refused (logged)

	Bytes     int64 // size of the files to restore, holes included
	BytesDone int64 // of Bytes, written or left as a hole so far
	Blobs     int64 // distinct content blobs needed
	BlobsDone int64 // of Blobs, decoded (or given up) so far
	Loaded    int64 // bytes read from the store

	// OwnerSkipped counts entries whose owner could not be set because
	// the restore does not run as root.
	OwnerSkipped int64
	Verified     int64 // files re-read and found equal (Options.Verify)
	Failed       int64 // paths listed in the returned *Error
}

// Failure is one path that could not be restored, or not fully.
type Failure struct {
	Path string // inside the snapshot; "" is the root
	Err  error
}

// Error is returned by Restore when some paths could not be restored; all
// others were. Failures are sorted by path.
type Error struct {
	Failures []Failure
}

// maxListed bounds the failures Error() spells out; all are in Failures.
const maxListed = 20

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "restorer: %d path(s) not restored", len(e.Failures))
	for i, f := range e.Failures {
		if i == maxListed {
			fmt.Fprintf(&b, "; and %d more", len(e.Failures)-maxListed)
			break
		}
		p := f.Path
		if p == "" {
			p = "/"
		}
		fmt.Fprintf(&b, "; %s: %v", p, f.Err)
	}
	return b.String()
}

// Unwrap returns the failures' errors, so errors.Is(err, repo.ErrDamaged)
// tells damage from other trouble.
func (e *Error) Unwrap() []error {
	out := make([]error, len(e.Failures))
	for i, f := range e.Failures {
		out[i] = f.Err
	}
	return out
}

// counters mirror Stats, updated concurrently.
type counters struct {
	files, hardLinks, dirs, symlinks, specials, skipped atomic.Int64
	bytes, bytesDone, blobs, blobsDone, loaded          atomic.Int64
	ownerSkipped, verified                              atomic.Int64
}

type restore struct {
	r    *repo.Repository
	opts Options
	p    *plan
	c    counters

	mu       sync.Mutex
	failures []Failure
}

// Restore writes the tree root into target, byte for byte and with
// metadata: modes (setuid, setgid, sticky too), owners, access and
// modification times to the nanosecond, symlinks, hard links, FIFOs and, when
// permitted, devices. All-zero blobs are not written, so sparse files come
// back sparse. Target must be missing or an empty directory unless
// opts.Overwrite.
//
// Damage does not stop a restore: a blob or tree that cannot be read is
// recorded against the paths that need it, everything else is restored, and
// the error returned is then an *Error listing those paths. Other errors
// (target unusable, root tree unreadable, ctx ended) are returned as they
// occur. The Stats are valid in every case.
//
// Restore never follows a symlink below target: it creates every directory
// itself, opens files with O_NOFOLLOW, and sets times without following.
func Restore(ctx context.Context, r *repo.Repository, root repo.ID, target string, opts Options) (Stats, error) {
	opts.ApplyDefaults()
	m, err := newMatcher(opts.Include)
	if err != nil {
		return Stats{}, err
	}
	target, err = prepareTarget(target, opts.Overwrite)
	if err != nil {
		return Stats{}, err
	}
	rs := &restore{r: r, opts: opts}
	stopProgress := rs.startProgress()
	err = rs.run(ctx, root, target, m)
	stopProgress()
	st := rs.stats()
	if err != nil {
		return st, err
	}
	if len(rs.failures) > 0 {
		sort.SliceStable(rs.failures, func(i, j int) bool { return rs.failures[i].Path < rs.failures[j].Path })
		return st, &Error{Failures: rs.failures}
	}
	return st, nil
}

func (rs *restore) run(ctx context.Context, root repo.ID, target string, m *matcher) error {
	start := time.Now()
	p, err := makePlan(ctx, rs.r, root, m, rs.opts.Workers, target, rs.fail)
	if err != nil {
		return err
	}
	rs.p = p
	rs.c.bytes.Store(p.bytes)
	rs.c.blobs.Store(int64(len(p.blobs)))
	rs.opts.Log.Debug("restore planned", "entries", len(p.entries), "files", len(p.files),
		"blobs", len(p.blobs), "loads", len(p.spans), "took", time.Since(start))
	if err := rs.create(ctx); err != nil {
		return err
	}
	if err := rs.fetch(ctx); err != nil {
		return err
	}
	if err := rs.finishDirs(ctx); err != nil {
		return err
	}
	if rs.opts.Verify {
		if err := rs.verify(ctx); err != nil {
			return err
		}
	}
	rs.opts.Log.Debug("restore done", "took", time.Since(start), "failed", len(rs.failures))
	return nil
}

func (rs *restore) fail(path string, err error) {
	rs.mu.Lock()
	rs.failures = append(rs.failures, Failure{Path: path, Err: err})
	rs.mu.Unlock()
	rs.opts.Log.Warn("not restored", "path", path, "err", err)
}

// failFile records the first failure of a file; later ones add nothing.
func (rs *restore) failFile(fi int32, err error) {
	fs := rs.p.files[fi]
	if fs.failed.CompareAndSwap(false, true) {
		rs.fail(rs.p.entries[fs.entry].path, err)
	}
}

func (rs *restore) stats() Stats {
	rs.mu.Lock()
	failed := int64(len(rs.failures))
	rs.mu.Unlock()
	c := &rs.c
	return Stats{
		Files: c.files.Load(), HardLinks: c.hardLinks.Load(), Dirs: c.dirs.Load(),
		Symlinks: c.symlinks.Load(), Specials: c.specials.Load(), Skipped: c.skipped.Load(),
		Bytes: c.bytes.Load(), BytesDone: c.bytesDone.Load(), Blobs: c.blobs.Load(),
		BlobsDone: c.blobsDone.Load(), Loaded: c.loaded.Load(),
		OwnerSkipped: c.ownerSkipped.Load(), Verified: c.verified.Load(), Failed: failed,
	}
}

// startProgress runs Options.Progress until the returned stop is called;
// stop makes the final call.
func (rs *restore) startProgress() (stop func()) {
	if rs.opts.Progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				rs.opts.Progress(rs.stats())
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
		rs.opts.Progress(rs.stats())
	}
}

// prepareTarget creates target if missing and checks that it is a
// directory, empty unless overwrite. It returns target made absolute, so
// that a later chdir cannot move the restore.
func prepareTarget(target string, overwrite bool) (string, error) {
	if target == "" {
		return "", errors.New("restorer: no target directory given")
	}
	abs, err := filepath.Abs(target)
	if err != nil {
		return "", fmt.Errorf("restorer: target %s: %w", target, err)
	}
	fi, err := os.Stat(abs)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(abs, 0o700); err != nil {
			return "", fmt.Errorf("restorer: create target: %w", err)
		}
		return abs, nil
	}
	if err != nil {
		return "", fmt.Errorf("restorer: target: %w", err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("restorer: target %s is not a directory", abs)
	}
	if overwrite {
		return abs, nil
	}
	d, err := os.Open(abs)
	if err != nil {
		return "", fmt.Errorf("restorer: target: %w", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(1)
	if err != nil && err != io.EOF {
		return "", fmt.Errorf("restorer: target: %w", err)
	}
	if len(names) > 0 {
		return "", fmt.Errorf("%w: %s (restore into a new directory, or overwrite)", ErrTargetNotEmpty, abs)
	}
	return abs, nil
}

// joinTarget maps a snapshot path to its place under target. Names were
// checked to be single path elements by snapshot.DecodeTree.
func joinTarget(target, p string) string {
	if p == "" {
		return target
	}
	return target + string(filepath.Separator) + filepath.FromSlash(p)
}
