package pgagent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// ErrWALNotFound means the vault holds no WAL file of the requested name:
// PostgreSQL asks for files that may not exist (the next timeline's
// history, the segment after the last), and expects a quick refusal.
var ErrWALNotFound = errors.New("pgagent: WAL file not in the vault")

// FetchOptions tune FetchWAL and RunPrefetcher.
type FetchOptions struct {
	// Spool is where following segments are fetched ahead; "" fetches only
	// the file asked for. restore_command runs once per segment, and
	// opening the vault costs a key derivation (~0.3 s): fetching ahead
	// pays it once, not once per segment.
	Spool string
	// Prefetch is how many segments after the one PostgreSQL last asked
	// for are kept in Spool. Replay reads 16 MiB in ~0.1 s and a segment
	// is fetched in ~0.02 s, so 16 (256 MiB of spool) keep replay from
	// ever waiting, with room for a slow vault.
	Prefetch int
	// Background starts RunPrefetcher for this spool in a process of its
	// own that outlives this one (restore_command must return for replay
	// to go on). Nil fetches ahead in this process, before returning.
	Background func() error
	// Wait is how long a request for a segment the prefetcher is about to
	// fetch waits for it rather than opening the vault itself.
	Wait time.Duration
	// Idle ends a prefetcher that PostgreSQL has not asked anything of
	// for this long: the restore has finished or failed.
	Idle time.Duration
	// SegmentSize is the cluster's WAL segment size; 0 means 16 MiB.
	SegmentSize int
	// Workers fetch and assemble segments in parallel; 0 means the cores.
	Workers int
	// NegativeTTL is how long the spool's record of what the vault holds
	// answers "not there" without opening the vault. A minute covers the
	// requests PostgreSQL makes at the end of recovery.
	NegativeTTL time.Duration
	Log         *slog.Logger

	// owner, when set, is given every file the prefetcher writes: a
	// restore running as root fetches ahead for a server run as PGOSUser.
	owner *[2]int
	// ready, when set, is called once the spool holds the vault's summary
	// and its history files: from then on restore_command answers for
	// files the vault lacks, and waits for segments the prefetcher brings,
	// without opening the vault.
	ready func()
}

// own hands p to o.owner, if set.
func (o *FetchOptions) own(p string) {
	if o.owner != nil {
		_ = os.Lchown(p, o.owner[0], o.owner[1])
	}
}

func (o *FetchOptions) applyDefaults() {
	if o.Prefetch <= 0 {
		o.Prefetch = 16
	}
	if o.Wait == 0 {
		o.Wait = 30 * time.Second
	}
	if o.Idle == 0 {
		o.Idle = time.Minute
	}
	if o.SegmentSize == 0 {
		o.SegmentSize = pgwal.DefaultSegmentSize
	}
	if o.Workers <= 0 {
		o.Workers = runtime.NumCPU()
	}
	if o.NegativeTTL == 0 {
		o.NegativeTTL = time.Minute
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// DefaultSpool is the spool wal-fetch uses for a destination inside a
// data directory's pg_wal: a subdirectory PostgreSQL ignores and base
// backups leave out.
func DefaultSpool(dest string) string {
	dir := filepath.Dir(dest)
	if filepath.Base(dir) != "pg_wal" {
		return ""
	}
	return filepath.Join(dir, spoolDirName)
}

// timeline1History is asked for at the end of every recovery and never
// exists: timeline 1 has no history.
const timeline1History = "00000001.history"

// spoolDirName is the spool's directory in pg_wal.
const spoolDirName = "dualkey-prefetch"

// Files in the spool besides segments.
const (
	summaryName = "vault-summary.json" // what the vault held when last opened
	wantName    = "want"               // the segment PostgreSQL asked for last: "TLI SEGNO SERVED"
	lockName    = "prefetch.lock"      // held by the running prefetcher
	bootName    = "boot"               // the boot the spool's files were written in
)

// FetchWAL writes the WAL segment or timeline history file name to dest
// (a temporary file renamed into place). It serves from opts.Spool when
// the file was fetched ahead, waits for it when a prefetcher is fetching
// it, and calls open for the vault only otherwise. A missing file gives
// ErrWALNotFound. The last segment the vault holds is usually partial
// (the server was writing it): it is served with what the vault holds and
// zeros after, which PostgreSQL reads as the end of the WAL, as it does a
// pg_receivewal .partial file.
//
// Nothing is fsynced: PostgreSQL reads what restore_command wrote at once,
// and after a crash it starts recovery again and asks again. Spooled
// segments written before a machine crash are dropped (see checkBoot).
func FetchWAL(ctx context.Context, name, dest string, open func(context.Context) (*repo.Repository, error), opts FetchOptions) error {
	opts.applyDefaults()
	isHist := false
	var tli uint32
	var segno uint64
	if t, err := pgwal.ParseHistoryName(name); err == nil {
		isHist, tli = true, t
	} else if t, s, err := pgwal.ParseSegmentName(name, opts.SegmentSize); err == nil {
		tli, segno = t, s
	} else if name == timeline1History {
		return fmt.Errorf("%w: %s: timeline 1 has no history file", ErrWALNotFound, name)
	} else {
		return fmt.Errorf("%w: %q is not a segment or history file name", ErrWALNotFound, name)
	}
	if opts.Spool != "" {
		if err := os.MkdirAll(opts.Spool, 0o700); err != nil {
			return fmt.Errorf("pgagent: spool: %w", err)
		}
		checkBoot(opts.Spool)
		sum, fresh := readSummary(opts.Spool, opts.NegativeTTL)
		if !isHist {
			// Said before the file leaves the spool, so that the
			// prefetcher does not fetch it again.
			writeWant(opts.Spool, tli, segno, true)
		}
		ok, err := fromSpool(opts.Spool, name, dest)
		// Wait for what the prefetcher will bring: anything the vault
		// holds (whole segments, the partial last one, history files).
		// When it runs as another user (root, in pg restore --start) this
		// process may not be able to open the vault at all.
		if !ok && err == nil && fresh && sum.has(isHist, tli, segno) && prefetcherRunning(opts.Spool) {
			if !isHist {
				writeWant(opts.Spool, tli, segno, false)
			}
			ok, err = waitSpool(ctx, opts.Spool, name, dest, opts.Wait)
			if !isHist {
				writeWant(opts.Spool, tli, segno, true)
			}
		}
		if ok || err != nil {
			if ok && !isHist {
				cleanSpool(opts.Spool, tli, segno, opts.SegmentSize)
				if opts.Background != nil && !prefetcherRunning(opts.Spool) {
					startBackground(&opts)
				}
			}
			return err
		}
		if fresh && !sum.has(isHist, tli, segno) {
			return fmt.Errorf("%w: %s", ErrWALNotFound, name)
		}
	}
	r, cat, err := openCatalog(ctx, open, opts.Spool, opts.SegmentSize)
	if err != nil {
		return err
	}
	if isHist {
		data, err := cat.History(ctx, tli)
		if errors.Is(err, backend.ErrNotExist) {
			return fmt.Errorf("%w: %s", ErrWALNotFound, name)
		}
		if err != nil {
			return err
		}
		return writeFileAtomic(dest, data, 0o600, false)
	}
	data, full, err := segment(ctx, r, cat, tli, segno, opts.SegmentSize)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(dest, data, 0o600, false); err != nil {
		return err
	}
	if opts.Spool == "" || !full {
		return nil
	}
	if opts.Background != nil {
		startBackground(&opts)
		return nil
	}
	if _, err := fillSpool(ctx, r, cat, tli, segno, &opts); err != nil {
		opts.Log.Warn("prefetching WAL failed; fetching segment by segment", "err", err)
	}
	return nil
}

func startBackground(o *FetchOptions) {
	if err := o.Background(); err != nil {
		o.Log.Warn("could not start the WAL prefetcher; fetching segment by segment", "err", err)
	}
}

// RunPrefetcher keeps the spool filled with the opts.Prefetch segments
// after the one PostgreSQL asked for last, fetching them from the vault
// (opened once) while replay goes on, until nothing has been asked for
// opts.Idle or ctx ends. Only one runs per spool (a lock file); a second
// returns at once. What it cannot fetch, FetchWAL fetches itself.
func RunPrefetcher(ctx context.Context, open func(context.Context) (*repo.Repository, error), opts FetchOptions) error {
	opts.applyDefaults()
	if opts.Spool == "" {
		return errors.New("pgagent: prefetcher without a spool")
	}
	if err := os.MkdirAll(opts.Spool, 0o700); err != nil {
		return fmt.Errorf("pgagent: spool: %w", err)
	}
	opts.own(opts.Spool)
	lock, err := os.OpenFile(filepath.Join(opts.Spool, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("pgagent: spool lock: %w", err)
	}
	opts.own(lock.Name())
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return nil // another prefetcher fills this spool
	}
	r, cat, err := openCatalog(ctx, open, opts.Spool, opts.SegmentSize)
	if err != nil {
		return err
	}
	opts.own(filepath.Join(opts.Spool, summaryName))
	if err := spoolHistories(ctx, cat, &opts); err != nil {
		return err
	}
	if opts.ready != nil {
		opts.ready()
	}
	var lastWant want
	lastAsked := time.Now()
	for {
		w, ok := readWant(opts.Spool, opts.SegmentSize)
		if ok && w != lastWant {
			lastWant, lastAsked = w, time.Now()
		}
		n := 0
		if ok {
			if w.served {
				// Only the segments before the one served: the want file
				// says "served" just before the segment leaves the spool
				// (restore_command's shell moves it a moment later), and
				// removing it here made that request fall back to dualkey.
				// A copy of it fetched while it was being served goes
				// with the next request.
				cleanSpool(opts.Spool, w.tli, w.segno, opts.SegmentSize)
			}
			after := w.segno // fill after the segment served last
			if !w.served && after > 0 {
				after-- // or from the one a request waits for
			}
			if n, err = fillSpool(ctx, r, cat, w.tli, after, &opts); err != nil {
				return err
			}
		}
		if n > 0 {
			lastAsked = time.Now() // idle counts from the last work done
			continue
		}
		if time.Since(lastAsked) > opts.Idle {
			opts.Log.Info("WAL prefetcher idle: stopping", "spool", opts.Spool)
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// openCatalog opens the vault and its WAL catalog, and records in the
// spool (if any) what it holds.
func openCatalog(ctx context.Context, open func(context.Context) (*repo.Repository, error), spool string, segSize int) (*repo.Repository, *pgwal.Catalog, error) {
	r, err := open(ctx)
	if err != nil {
		return nil, nil, err
	}
	cat, err := pgwal.Load(ctx, r)
	if err != nil {
		return nil, nil, err
	}
	if spool != "" {
		writeSummary(spool, cat, segSize)
	}
	return r, cat, nil
}

// segment returns segment segno of tli, whole (full) or, for the last one
// the vault holds, its contiguous head padded with zeros.
func segment(ctx context.Context, r *repo.Repository, cat *pgwal.Catalog, tli uint32, segno uint64, segSize int) ([]byte, bool, error) {
	data, end, err := pgwal.SegmentHead(ctx, r, cat, tli, segno, segSize)
	if errors.Is(err, pgwal.ErrIncomplete) {
		return nil, false, fmt.Errorf("%w: %s", ErrWALNotFound, pgwal.SegmentName(tli, segno, segSize))
	}
	if err != nil {
		return nil, false, err
	}
	return data, end == pgwal.SegmentStart(segno+1, segSize), nil
}

// fillSpool fetches the whole segments after segno of tli that the spool
// lacks, up to o.Prefetch ahead, and returns how many it fetched.
func fillSpool(ctx context.Context, r *repo.Repository, cat *pgwal.Catalog, tli uint32, segno uint64, o *FetchOptions) (int, error) {
	var todo []uint64
	for s := segno + 1; s <= segno+uint64(o.Prefetch); s++ {
		lo := pgwal.SegmentStart(s, o.SegmentSize)
		end := cat.Contiguous(tli, lo)
		if end <= lo {
			break
		}
		if _, err := os.Stat(filepath.Join(o.Spool, pgwal.SegmentName(tli, s, o.SegmentSize))); err != nil {
			todo = append(todo, s)
		}
		if end < lo+pgwal.LSN(o.SegmentSize) {
			break // the partial last segment, served padded like FetchWAL does
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(o.Workers)
	for _, s := range todo {
		g.Go(func() error {
			data, _, err := segment(gctx, r, cat, tli, s, o.SegmentSize)
			if err != nil {
				return err
			}
			return spoolFile(o, pgwal.SegmentName(tli, s, o.SegmentSize), data)
		})
	}
	return len(todo), g.Wait()
}

// spoolHistories puts every timeline history file the vault holds in the
// spool, where requests copy them (PostgreSQL asks for them more than once).
func spoolHistories(ctx context.Context, cat *pgwal.Catalog, o *FetchOptions) error {
	for _, p := range cat.Pieces() {
		if !p.History {
			continue
		}
		data, err := cat.History(ctx, p.Timeline)
		if err != nil {
			return fmt.Errorf("pgagent: history of timeline %d: %w", p.Timeline, err)
		}
		if err := spoolFile(o, pgwal.HistoryName(p.Timeline), data); err != nil {
			return err
		}
	}
	return nil
}

// spoolFile writes name into the spool, owned by the server's user before
// it gets its name: a request may take it at once.
func spoolFile(o *FetchOptions, name string, data []byte) error {
	p := filepath.Join(o.Spool, name)
	if o.owner == nil {
		return writeFileAtomic(p, data, 0o600, false)
	}
	tmp := p + ".owned"
	if err := writeFileAtomic(tmp, data, 0o600, false); err != nil {
		return err
	}
	o.own(tmp)
	return os.Rename(tmp, p)
}

// fromSpool moves a prefetched segment to dest, or copies a history file.
func fromSpool(spool, name, dest string) (bool, error) {
	src := filepath.Join(spool, name)
	if _, err := os.Stat(src); err != nil {
		return false, nil
	}
	if strings.HasSuffix(name, ".history") {
		data, err := os.ReadFile(src)
		if err != nil {
			return false, nil
		}
		return true, writeFileAtomic(dest, data, 0o600, false)
	}
	if err := os.Rename(src, dest); err != nil {
		return false, nil // another file system, or gone: fetch it
	}
	return true, nil
}

// waitSpool waits up to d for the running prefetcher to spool name.
func waitSpool(ctx context.Context, spool, name, dest string, d time.Duration) (bool, error) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && prefetcherRunning(spool) {
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if ok, err := fromSpool(spool, name, dest); ok || err != nil {
			return ok, err
		}
	}
	return false, nil
}

// prefetcherRunning reports whether a prefetcher holds the spool's lock.
func prefetcherRunning(spool string) bool {
	f, err := os.Open(filepath.Join(spool, lockName))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return true
	}
	syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return false
}

// want is the segment PostgreSQL asked for last, and whether it was
// served or a request waits for it.
type want struct {
	tli    uint32
	segno  uint64
	served bool
}

func writeWant(spool string, tli uint32, segno uint64, served bool) {
	_ = writeFileAtomic(filepath.Join(spool, wantName), fmt.Appendf(nil, "%d %d %t\n", tli, segno, served), 0o600, false)
}

// readWant reads the want file: "TLI SEGNO SERVED" as writeWant writes
// it, or "NAME true" as restore_command's shell fast path writes it (see
// fastPathCommand) when it serves a spooled segment without starting
// dualkey. A torn or partial file reads as no want.
func readWant(spool string, segSize int) (want, bool) {
	b, err := os.ReadFile(filepath.Join(spool, wantName))
	if err != nil {
		return want{}, false
	}
	f := strings.Fields(string(b))
	if len(f) == 2 && f[1] == "true" {
		t, s, err := pgwal.ParseSegmentName(f[0], segSize)
		return want{t, s, true}, err == nil
	}
	if len(f) != 3 {
		return want{}, false
	}
	t, err1 := strconv.ParseUint(f[0], 10, 32)
	s, err2 := strconv.ParseUint(f[1], 10, 64)
	served, err3 := strconv.ParseBool(f[2])
	return want{uint32(t), s, served}, err1 == nil && err2 == nil && err3 == nil
}

// checkBoot empties the spool when its files were written before the
// machine last started: they were never fsynced, so a crash may have left
// them torn. Within one boot the page cache makes them whole.
func checkBoot(spool string) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return
	}
	p := filepath.Join(spool, bootName)
	if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, boot) {
		return
	}
	if ents, err := os.ReadDir(spool); err == nil {
		for _, e := range ents {
			if e.Name() != lockName {
				os.Remove(filepath.Join(spool, e.Name()))
			}
		}
	}
	_ = writeFileAtomic(p, boot, 0o600, true)
}

// cleanSpool removes spooled segments of tli before segno: recovery has
// moved past them.
func cleanSpool(spool string, tli uint32, segno uint64, segSize int) {
	ents, err := os.ReadDir(spool)
	if err != nil {
		return
	}
	for _, e := range ents {
		t, s, err := pgwal.ParseSegmentName(e.Name(), segSize)
		if err == nil && t == tli && s < segno {
			os.Remove(filepath.Join(spool, e.Name()))
		}
	}
}

type walSummary struct {
	Time      time.Time              `json:"time"`
	Histories []uint32               `json:"histories"`
	Segments  map[uint32][][2]uint64 `json:"segments"` // per timeline: [first, last] segment ranges with WAL
}

func (s *walSummary) has(isHist bool, tli uint32, segno uint64) bool {
	if isHist {
		return slicesContains(s.Histories, tli)
	}
	for _, rg := range s.Segments[tli] {
		if rg[0] <= segno && segno <= rg[1] {
			return true
		}
	}
	return false
}

func slicesContains(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func writeSummary(spool string, cat *pgwal.Catalog, segSize int) {
	sum := walSummary{Time: time.Now(), Segments: map[uint32][][2]uint64{}}
	for _, p := range cat.Pieces() {
		if p.History {
			sum.Histories = append(sum.Histories, p.Timeline)
		}
	}
	for _, tli := range cat.Timelines() {
		for _, rg := range cat.Runs(tli) {
			sum.Segments[tli] = append(sum.Segments[tli], [2]uint64{pgwal.SegmentOf(rg.Start, segSize), pgwal.SegmentOf(rg.End-1, segSize)})
		}
	}
	if b, err := json.Marshal(sum); err == nil {
		_ = writeFileAtomic(filepath.Join(spool, summaryName), b, 0o600, false)
	}
}

func readSummary(spool string, ttl time.Duration) (*walSummary, bool) {
	b, err := os.ReadFile(filepath.Join(spool, summaryName))
	if err != nil {
		return nil, false
	}
	var s walSummary
	if json.Unmarshal(b, &s) != nil || time.Since(s.Time) > ttl || time.Since(s.Time) < 0 {
		return nil, false
	}
	return &s, true
}
