// Package archiver turns files into a snapshot: it walks paths, cuts file
// content into chunks, stores new chunks as blobs, records every entry's
// metadata in trees, and commits the snapshot to the vault.
//
// The work is pipelined so both cores stay busy: the walk and each file's
// reading and chunking run in their own goroutines, hashing, compression and
// encryption run in a pool of blob workers, and packs upload in the
// background (see repo.SaveBlob).
package archiver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dualkey/dualkey/internal/vault/chunker"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// Options tune a backup.
type Options struct {
	Tags     []string
	Hostname string
	// Parent is the snapshot whose unchanged files are not read again.
	// Nil means: the latest snapshot of the same host and paths.
	Parent *repo.SnapshotInfo
	// NoParent forces every file to be read.
	NoParent bool
	// LockFor asks for a retention lock longer than the repository minimum.
	LockFor time.Duration
	// Workers hash, compress and encrypt chunks. Default: one per core.
	Workers int
	// Readers read and chunk files at once. Default 2: one file's read
	// overlaps another's chunking, and more only seeks the disk.
	Readers int
	// PageSize, when it returns a positive size for a file, cuts that file
	// into fixed pages of that size instead of content-defined chunks: a
	// database changes pages in place, and one changed page should cost one
	// page (the PostgreSQL agent uses 8192).
	PageSize func(path string, fi os.FileInfo) int
	// Progress is called about every Interval and once at the end.
	Progress func(Progress)
	Interval time.Duration
	Log      *slog.Logger
	// Kind and Meta are copied into the snapshot (see snapshot.Snapshot):
	// empty for a file tree.
	Kind string
	Meta json.RawMessage
	// BeforeCommit, if set, sees the finished snapshot document after all
	// content is stored and before it is committed. It may fill in what is
	// known only at the end (Meta); an error abandons the backup and
	// nothing is committed (the uploaded blobs stay unreferenced until
	// prune removes them).
	BeforeCommit func(*snapshot.Snapshot) error
	// WAL, if it points to a range when the snapshot is committed (after
	// BeforeCommit, which may fill it in), is the WAL a PostgreSQL base
	// backup needs; see repo.(*Repository).CommitWAL.
	WAL *format.WALRange
	// now is the clock for the snapshot's client time (tests).
	now func() time.Time
}

func (o *Options) applyDefaults() {
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.Readers <= 0 {
		o.Readers = 2
	}
	if o.Interval <= 0 {
		o.Interval = time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.now == nil {
		o.now = time.Now
	}
	if o.Hostname == "" {
		o.Hostname, _ = os.Hostname()
	}
}

// Progress is a running count of a backup.
type Progress struct {
	Files, Dirs int64
	Bytes       int64 // content bytes processed so far
	TotalFiles  int64 // found by the scanner so far
	TotalBytes  int64
	ScanDone    bool
	BytesAdded  int64
	Errors      int64
	Elapsed     time.Duration
	CurrentFile string
	Final       bool
}

// Result is what Backup returns.
type Result struct {
	ID      repo.ID
	Lock    format.LockRecord
	Summary snapshot.Summary
	// Errors are files that could not be read; they are left out of the
	// snapshot, and the backup is still committed.
	Errors []error
}

// ErrPartial is returned, with a committed snapshot, when some files could
// not be read.
var ErrPartial = errors.New("archiver: some files could not be read")

type archiver struct {
	r    *repo.Repository
	opts Options
	gear *chunker.Gear

	jobs    chan blobJob
	readers chan struct{}
	// smallReaders bound files under smallFile: 4 per worker keep the
	// workers fed while each file waits on open, read and its blob.
	smallReaders chan struct{}
	chunkers     sync.Pool      // *chunker.Chunker, keyed by this repository's gear
	wg           sync.WaitGroup // blob workers

	mu     sync.Mutex
	blobs  map[repo.ID]bool // every blob the snapshot refers to
	errs   []error
	cur    string
	sum    snapshot.Summary
	files  atomic.Int64
	dirs   atomic.Int64
	bytes  atomic.Int64
	added  atomic.Int64
	nblobs atomic.Int64
	nerr   atomic.Int64

	scanFiles, scanBytes atomic.Int64
	scanDone             atomic.Bool
}

// blobJob is one blob, or a batch of database pages: pages come 8 KiB at
// a time, and one job per page spent more on channel hand-offs and wake-ups
// than on the page, and left the workers a queue of only a few pages.
type blobJob struct {
	data  []byte    // one blob (chunk), or
	pages [][]byte  // consecutive pages: repo.SavePage each
	out   []repo.ID // the IDs, one per blob
	done  func(err error)
}

// chunkBufs recycles chunk buffers of chunker.DefaultParams.Max bytes.
var chunkBufs = sync.Pool{New: func() any { b := make([]byte, 0, chunker.DefaultParams.Max); return &b }}

func newArchiver(r *repo.Repository, opts Options) *archiver {
	opts.applyDefaults()
	a := &archiver{r: r, opts: opts, gear: chunker.NewGear(r.Key().Chunker),
		jobs: make(chan blobJob, opts.Workers*2), readers: make(chan struct{}, opts.Readers),
		smallReaders: make(chan struct{}, 4*opts.Workers),
		blobs:        map[repo.ID]bool{}}
	return a
}

func (a *archiver) startWorkers(ctx context.Context) {
	for range a.opts.Workers {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			for j := range a.jobs {
				var err error
				if j.pages == nil {
					err = a.saveBlob(ctx, j.data, &j.out[0], a.r.SaveBlob)
				}
				for i, pg := range j.pages {
					if err = a.saveBlob(ctx, pg, &j.out[i], savePage(a.r)); err != nil {
						break
					}
				}
				j.done(err)
			}
		}()
	}
}

// saveBlob stores data with save and records its ID in out.
func (a *archiver) saveBlob(ctx context.Context, data []byte, out *repo.ID, save func(context.Context, pack.BlobType, []byte) (repo.ID, bool, error)) error {
	id, isNew, err := save(ctx, pack.Data, data)
	if err != nil {
		return err
	}
	*out = id
	if isNew {
		a.added.Add(int64(len(data)))
		a.nblobs.Add(1)
	}
	return nil
}

// savePage is r.SavePage with SaveBlob's signature.
func savePage(r *repo.Repository) func(context.Context, pack.BlobType, []byte) (repo.ID, bool, error) {
	return func(ctx context.Context, _ pack.BlobType, data []byte) (repo.ID, bool, error) {
		return r.SavePage(ctx, data)
	}
}

func (a *archiver) use(ids ...repo.ID) {
	a.mu.Lock()
	for _, id := range ids {
		a.blobs[id] = true
	}
	a.mu.Unlock()
}

func (a *archiver) fail(err error) {
	a.nerr.Add(1)
	a.mu.Lock()
	a.errs = append(a.errs, err)
	a.mu.Unlock()
	a.opts.Log.Warn("skipped", "err", err)
}

func (a *archiver) progress(final bool, start time.Time) {
	if a.opts.Progress == nil {
		return
	}
	a.mu.Lock()
	cur := a.cur
	a.mu.Unlock()
	a.opts.Progress(Progress{Files: a.files.Load(), Dirs: a.dirs.Load(), Bytes: a.bytes.Load(),
		TotalFiles: a.scanFiles.Load(), TotalBytes: a.scanBytes.Load(), ScanDone: a.scanDone.Load(),
		BytesAdded: a.added.Load(), Errors: a.nerr.Load(), Elapsed: time.Since(start), CurrentFile: cur, Final: final})
}

// Backup stores paths as a new snapshot. Each path becomes an entry of the
// snapshot's root named by its base name.
func Backup(ctx context.Context, r *repo.Repository, paths []string, opts Options) (*Result, error) {
	if len(paths) == 0 {
		return nil, errors.New("archiver: no paths given")
	}
	abs := make([]string, len(paths))
	names := map[string]string{}
	for i, p := range paths {
		ap, err := filepath.Abs(p)
		if err != nil {
			return nil, fmt.Errorf("archiver: %s: %w", p, err)
		}
		if _, err := os.Lstat(ap); err != nil {
			return nil, fmt.Errorf("archiver: %w", err)
		}
		base := filepath.Base(ap)
		if base == "/" || base == "." {
			base = "root"
		}
		if prev, dup := names[base]; dup {
			return nil, fmt.Errorf("archiver: %s and %s would both be stored as %q: back them up separately", prev, ap, base)
		}
		names[base] = ap
		abs[i] = ap
	}
	sort.Strings(abs)
	a := newArchiver(r, opts)
	parent := a.findParent(ctx, abs)
	return a.run(ctx, abs, parent, func(ctx context.Context, root *snapshot.Tree, ptree *snapshot.Tree) error {
		var wg sync.WaitGroup
		nodes := make([]*snapshot.Node, len(abs))
		for i, p := range abs {
			wg.Add(1)
			base := filepath.Base(p)
			if base == "/" || base == "." {
				base = "root"
			}
			var pn *snapshot.Node
			if ptree != nil {
				pn = ptree.Find(base)
			}
			go func() {
				defer wg.Done()
				n, err := a.saveNode(ctx, p, base, pn)
				if err != nil {
					a.fail(err)
					return
				}
				nodes[i] = n
			}()
		}
		wg.Wait()
		for _, n := range nodes {
			if n != nil {
				root.Nodes = append(root.Nodes, n)
			}
		}
		return nil
	})
}

// BackupReader stores the stream rd as a snapshot holding one file, name.
func BackupReader(ctx context.Context, r *repo.Repository, rd io.Reader, name string, opts Options) (*Result, error) {
	if err := snapshot.ValidName(name); err != nil {
		return nil, fmt.Errorf("archiver: stdin file name: %w", err)
	}
	a := newArchiver(r, opts)
	a.scanDone.Store(true)
	return a.run(ctx, []string{"/" + name}, nil, func(ctx context.Context, root *snapshot.Tree, _ *snapshot.Tree) error {
		now := a.opts.now()
		n := &snapshot.Node{Name: name, Type: snapshot.File, Mode: 0o644, ModTime: now, AccessTime: now, ChangeTime: now,
			UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}
		content, size, err := a.chunkStream(ctx, rd, 0)
		if err != nil {
			a.fail(fmt.Errorf("archiver: stdin: %w", err))
			return nil
		}
		n.Content, n.Size, n.Chunking = content, uint64(size), "cdc"
		a.files.Add(1)
		root.Nodes = append(root.Nodes, n)
		return nil
	})
}

func (a *archiver) findParent(ctx context.Context, paths []string) *repo.SnapshotInfo {
	if a.opts.NoParent {
		return nil
	}
	if a.opts.Parent != nil {
		return a.opts.Parent
	}
	all, _, err := a.r.Snapshots(ctx)
	if err != nil {
		return nil
	}
	for i := len(all) - 1; i >= 0; i-- {
		s := all[i]
		if s.Hostname == a.opts.Hostname && equalStrings(s.Paths, paths) {
			return &all[i]
		}
	}
	return nil
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// run starts the blob workers, lets fill add the root's nodes, and commits
// the snapshot. An error from fill abandons the backup: nothing is
// committed, and the Repository is left fit for the next backup.
func (a *archiver) run(ctx context.Context, paths []string, parent *repo.SnapshotInfo,
	fill func(context.Context, *snapshot.Tree, *snapshot.Tree) error) (*Result, error) {
	start := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	committed := false
	// An abandoned backup, too, waits for its uploads and lets Flush report
	// and clear their errors, before cancel: else they fail after it
	// returned, and their error would fail the next backup on this
	// Repository (the PostgreSQL agent keeps one open). What was stored is
	// indexed, for the next backup to reuse.
	defer func() {
		if committed {
			return
		}
		if err := a.r.Flush(ctx); err != nil && ctx.Err() == nil {
			a.opts.Log.Warn("abandoned backup: storing its packs failed", "err", err)
		}
	}()
	a.startWorkers(ctx)
	if !a.scanDone.Load() {
		go a.scan(ctx, paths)
	}
	tick := time.NewTicker(a.opts.Interval)
	stopTick := make(chan struct{})
	go func() {
		for {
			select {
			case <-tick.C:
				a.progress(false, start)
			case <-stopTick:
				return
			}
		}
	}()

	var ptree *snapshot.Tree
	if parent != nil {
		t, err := a.r.LoadTree(ctx, parent.Tree)
		if err == nil {
			ptree = t
		} else {
			a.opts.Log.Warn("parent snapshot unreadable; reading every file", "parent", parent.ID, "err", err)
		}
	}
	root := &snapshot.Tree{}
	fillErr := fill(ctx, root, ptree)
	close(a.jobs)
	a.wg.Wait()
	tick.Stop()
	close(stopTick)
	if fillErr != nil {
		return nil, fillErr
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("archiver: %w", err)
	}
	if len(root.Nodes) == 0 {
		return nil, fmt.Errorf("archiver: nothing could be read: %w", errors.Join(a.errs...))
	}
	root.Sort()
	rootID, err := a.r.SaveTree(ctx, root)
	if err != nil {
		return nil, err
	}
	a.use(rootID)

	a.sum.Files, a.sum.Dirs, a.sum.Bytes = a.files.Load(), a.dirs.Load(), a.bytes.Load()
	a.sum.BlobsAdded, a.sum.BytesAdded = a.nblobs.Load(), a.added.Load()
	a.sum.Start, a.sum.End = start.UTC(), time.Now().UTC()
	sn := &snapshot.Snapshot{Time: a.opts.now().UTC(), Tree: rootID, Paths: paths, Hostname: a.opts.Hostname,
		Tags: a.opts.Tags, Program: "dualkey", Summary: &a.sum, Kind: a.opts.Kind, Meta: a.opts.Meta}
	if u := os.Getenv("USER"); u != "" {
		sn.Username = u
	}
	if parent != nil {
		pid := parent.ID
		sn.Parent = &pid
	}
	if a.opts.BeforeCommit != nil {
		if err := a.opts.BeforeCommit(sn); err != nil {
			return nil, fmt.Errorf("archiver: not committed: %w", err)
		}
	}
	blobs := make([]repo.ID, 0, len(a.blobs))
	for id := range a.blobs {
		blobs = append(blobs, id)
	}
	var wal *format.WALRange
	if a.opts.WAL != nil && a.opts.WAL.Timeline != 0 {
		w := *a.opts.WAL
		wal = &w
	}
	id, lock, err := a.r.CommitWAL(ctx, sn, blobs, a.opts.LockFor, wal)
	if err != nil {
		return nil, err
	}
	committed = true
	a.progress(true, start)
	res := &Result{ID: id, Lock: lock, Summary: a.sum, Errors: a.errs}
	if len(a.errs) > 0 {
		return res, fmt.Errorf("%w (%d): %w", ErrPartial, len(a.errs), errors.Join(a.errs...))
	}
	return res, nil
}

// scan counts what is to be backed up, for the progress ETA. It only
// lstats, so it runs well ahead of the backup.
func (a *archiver) scan(ctx context.Context, paths []string) {
	defer a.scanDone.Store(true)
	for _, p := range paths {
		_ = filepath.WalkDir(p, func(_ string, d os.DirEntry, err error) error {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			if fi, err := d.Info(); err == nil {
				a.scanFiles.Add(1)
				a.scanBytes.Add(fi.Size())
			}
			return nil
		})
	}
}
