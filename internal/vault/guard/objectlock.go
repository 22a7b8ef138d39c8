package guard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// Locker is a backend whose storage can lock objects itself (S3 with
// COMPLIANCE-mode Object Lock): a locked object cannot be deleted or
// overwritten before its date by any account, and the date can only move
// later. The vault decides which date each object needs (the rules are in
// [Store.objectUntil] and docs/object-lock.md); the backend only applies it.
// A backend that is not a Locker (a local directory) is protected by the
// vault's rules alone.
type Locker interface {
	backend.Backend
	// ObjectLock reports whether locking is in force; false for a bucket
	// initialised with --no-object-lock.
	ObjectLock() bool
	// SaveLocked is Save, retaining the object until until (none if zero).
	// An identical object already there is extended to until.
	SaveLocked(ctx context.Context, h backend.Handle, data []byte, until time.Time) error
	// ExtendRetention makes h retained until at least until and returns the
	// date now in force and whether it had to change it. It never shortens.
	ExtendRetention(ctx context.Context, h backend.Handle, until time.Time) (time.Time, bool, error)
}

// DefaultLockGranularity is the default for [Options.LockGranularity]. A
// daily step makes an object that every hourly commit needs cost one
// retention update a day instead of one an hour, for at most a day of
// extra retention (measured request counts in docs/object-lock.md).
const DefaultLockGranularity = 24 * time.Hour

// extendParallel is how many retention updates run at once. Each is one or
// two small requests; 16 keeps a commit of a thousand packs under a few
// seconds on a 20 ms link without crowding the connection pool.
const extendParallel = 16

// locker returns the backend as a Locker when object locking is in force.
func (s *Store) locker() Locker {
	if l, ok := s.be.(Locker); ok && l.ObjectLock() {
		return l
	}
	return nil
}

// roundUp moves t to the next multiple of the lock granularity (UTC), so
// that retention dates change in steps. A time not after now is zero: no
// lock.
func (s *Store) roundUp(t, now time.Time) time.Time {
	if !t.After(now) {
		return time.Time{}
	}
	g := s.opts.LockGranularity
	if g <= 0 {
		return t
	}
	r := t.UTC().Truncate(g)
	if r.Before(t) {
		r = r.Add(g)
	}
	return r
}

// save writes h with the retention until (rounded up) when the backend
// locks objects, otherwise it is a plain Save.
func (s *Store) save(ctx context.Context, h backend.Handle, data []byte, until time.Time) error {
	l := s.locker()
	if l == nil {
		return s.be.Save(ctx, h, data)
	}
	until = s.roundUp(until, s.now())
	if err := l.SaveLocked(ctx, h, data, until); err != nil {
		return err
	}
	s.noteRetained(h, until)
	return nil
}

func (s *Store) noteRetained(h backend.Handle, until time.Time) {
	if until.IsZero() {
		return
	}
	s.mu.Lock()
	if until.After(s.retained[h]) {
		s.retained[h] = until
	}
	s.mu.Unlock()
}

// extend makes h retained until at least until (rounded up). It costs
// nothing when this Store already extended h that far.
func (s *Store) extend(ctx context.Context, l Locker, h backend.Handle, until time.Time) (bool, error) {
	until = s.roundUp(until, s.now())
	if until.IsZero() {
		return false, nil
	}
	s.mu.Lock()
	known := s.retained[h]
	s.mu.Unlock()
	if !known.Before(until) {
		return false, nil
	}
	got, changed, err := l.ExtendRetention(ctx, h, until)
	if err != nil {
		return false, err
	}
	s.noteRetained(h, got)
	return changed, nil
}

// permanentUntil is the retention of objects the vault never removes (the
// config, keys, ledger objects, policy, change and consumed records): the
// later of now + the minimum retention and the latest lock in force, so
// that the keys that open a locked snapshot and the record of what happened
// outlive it. [Store.ExtendObjectLocks] rolls it forward; if that stops
// running, these objects stay locked until the last date it set.
func (s *Store) permanentUntil(ctx context.Context, minRet time.Duration) (time.Time, error) {
	now := s.now()
	until := now.Add(minRet)
	all, err := s.liveLocks(ctx)
	if err != nil {
		return time.Time{}, err
	}
	for _, r := range all {
		if r.Until.After(until) {
			until = r.Until
		}
	}
	return until, nil
}

// objectUntil is the retention a new object of h's type gets when saved
// through a session: see docs/object-lock.md, "What each object's lock is".
// cfg is the config being saved, for the config itself. Snapshots and lock
// records get their lock record's Until where they are written.
func (s *Store) objectUntil(ctx context.Context, h backend.Handle, cfg *format.Config) (time.Time, error) {
	if s.locker() == nil {
		return time.Time{}, nil
	}
	var minRet time.Duration
	if cfg != nil {
		minRet = time.Duration(cfg.MinRetention)
	} else {
		m, err := s.minRetCached(ctx)
		switch {
		case h.Type == backend.Key && errors.Is(err, backend.ErrNotExist):
			// Init saves the first key before the config; the config's
			// save locks the keys already there (lockKeys).
			return time.Time{}, nil
		case err != nil:
			return time.Time{}, err
		}
		minRet = m
	}
	switch h.Type {
	case backend.Mark:
		return time.Time{}, nil // prune's own notes; removable any time
	case backend.Pack, backend.Index, backend.WAL:
		// A pack's snapshot is committed later and for at least minRet,
		// and Commit extends the pack to the snapshot's lock. A WAL piece
		// is kept minRet from its arrival, as the vault's own rule says.
		return s.now().Add(minRet), nil
	default:
		return s.permanentUntil(ctx, minRet)
	}
}

// lockPacks extends every pack of a commit or lock extension, and every
// index covering one of them, to until. Indexes are included because a
// restore needs them: losing the last index of a pack loses nothing (the
// index can be rebuilt from the packs) but costs a rebuild.
func (s *Store) lockPacks(ctx context.Context, packs []format.ID, until time.Time) error {
	l := s.locker()
	if l == nil || len(packs) == 0 {
		return nil
	}
	want := make(map[format.ID]bool, len(packs))
	for _, p := range packs {
		want[p] = true
	}
	var indexes []string
	err := s.be.List(ctx, backend.Index, func(fi backend.Info) error {
		indexes = append(indexes, fi.Name)
		return ctx.Err()
	})
	if err != nil {
		return fmt.Errorf("list indexes: %w", err)
	}
	var hs []backend.Handle
	for _, p := range packs {
		hs = append(hs, backend.Handle{Type: backend.Pack, Name: p.String()})
	}
	for _, name := range indexes {
		covered, err := s.indexPacks(ctx, name)
		if err != nil {
			continue // an unreadable index is no help to a restore
		}
		for _, p := range covered {
			if want[p] {
				hs = append(hs, backend.Handle{Type: backend.Index, Name: name})
				break
			}
		}
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(extendParallel)
	for _, h := range hs {
		g.Go(func() error {
			if _, err := s.extend(gctx, l, h, until); err != nil {
				return fmt.Errorf("lock %v until %s: %w", h, until.Format(time.RFC3339), err)
			}
			return nil
		})
	}
	return g.Wait()
}

// lockWAL extends every WAL piece that rng needs ([format.WALRange.Needs])
// to until: a base backup is no use without the WAL that makes it
// consistent. Only the pieces' plaintext headers are read (one ranged read
// per piece not seen before). A header that cannot be read is skipped: the
// vault refused such pieces on save, and restore could not use one.
func (s *Store) lockWAL(ctx context.Context, rng *format.WALRange, until time.Time) error {
	l := s.locker()
	if l == nil || rng == nil {
		return nil
	}
	var names []string
	err := s.be.List(ctx, backend.WAL, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return ctx.Err()
	})
	if err != nil {
		return fmt.Errorf("list WAL: %w", err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(extendParallel)
	for _, name := range names {
		g.Go(func() error {
			hd, err := s.walHeader(gctx, name)
			if err != nil || !rng.Needs(hd) {
				return gctx.Err()
			}
			h := backend.Handle{Type: backend.WAL, Name: name}
			if _, err := s.extend(gctx, l, h, until); err != nil {
				return fmt.Errorf("lock %v until %s: %w", h, until.Format(time.RFC3339), err)
			}
			return nil
		})
	}
	return g.Wait()
}

// LockReport says what [Store.ExtendObjectLocks] did.
type LockReport struct {
	// ObjectLock is false when the backend does not lock objects; then
	// nothing else is set.
	ObjectLock bool
	// Horizon is the date the never-removed objects are now locked until.
	Horizon time.Time
	// Checked objects had a lock date to keep; Extended of them needed a
	// later retention date than this process knew them to have.
	Checked, Extended int
	// Failed lists objects whose retention could not be extended.
	Failed []string
}

// ExtendObjectLocks keeps the storage's object locks in step with the
// vault's lock records: each snapshot, lock record, pack and index until
// the latest live lock that needs it, and every object the vault never
// removes until the horizon ([Store.permanentUntil]). It only ever extends.
// WAL pieces are locked for the minimum retention from their arrival, the
// same rule the vault applies to their removal, and those a live lock
// record's WAL range needs until that record's Until.
//
// It is safe to run at any time and from several processes; the vault
// server and `dualkey vault extend-locks` run it. The error is non-nil if
// the records could not be read or any object failed; the report then says
// which.
func (s *Store) ExtendObjectLocks(ctx context.Context, log *slog.Logger) (LockReport, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := s.locker()
	if l == nil {
		return LockReport{}, nil
	}
	rep := LockReport{ObjectLock: true}
	minRet, err := s.minRetention(ctx)
	if err != nil {
		return rep, fmt.Errorf("guard: extend object locks: %w", err)
	}
	all, err := s.liveLocks(ctx)
	if err != nil {
		return rep, fmt.Errorf("guard: extend object locks: %w", err)
	}
	now := s.now()
	horizon := now.Add(minRet)
	snapUntil := map[string]time.Time{}
	packUntil := map[format.ID]time.Time{}
	jobs := map[backend.Handle]time.Time{}
	var ranges []format.LockRecord // live records with a WAL range
	for name, r := range all {
		if !r.Live(now) {
			continue
		}
		if r.WAL != nil {
			ranges = append(ranges, r)
		}
		jobs[backend.Handle{Type: backend.Lock, Name: name}] = r.Until
		if r.Until.After(horizon) {
			horizon = r.Until
		}
		sn := r.Snapshot.String()
		if r.Until.After(snapUntil[sn]) {
			snapUntil[sn] = r.Until
		}
		for _, p := range r.Packs {
			if r.Until.After(packUntil[p]) {
				packUntil[p] = r.Until
			}
		}
	}
	rep.Horizon = s.roundUp(horizon, now)

	for _, t := range backend.Types {
		err := s.be.List(ctx, t, func(fi backend.Info) error {
			var until time.Time
			switch t {
			case backend.Snapshot:
				until = snapUntil[fi.Name]
			case backend.Pack:
				if id, err := format.ParseID(fi.Name); err == nil {
					until = packUntil[id]
				}
			case backend.Index:
				covered, err := s.indexPacks(ctx, fi.Name)
				if err != nil {
					log.Warn("index unreadable; its lock is left as it is", "index", fi.Name, "err", err)
					return nil
				}
				for _, p := range covered {
					if packUntil[p].After(until) {
						until = packUntil[p]
					}
				}
			case backend.Config, backend.Key, backend.Ledger, backend.Policy, backend.Change, backend.Consumed:
				until = horizon
			case backend.WAL:
				if len(ranges) == 0 {
					return nil
				}
				hd, err := s.walHeader(ctx, fi.Name)
				if err != nil {
					log.Warn("WAL piece unreadable; its lock is left as it is", "wal", fi.Name, "err", err)
					return nil
				}
				for _, r := range ranges {
					if r.Until.After(until) && r.WAL.Needs(hd) {
						until = r.Until
					}
				}
			default: // locks (above), marks
				return nil
			}
			if until.After(now) {
				jobs[fi.Handle] = until
			}
			return ctx.Err()
		})
		if err != nil {
			return rep, fmt.Errorf("guard: extend object locks: list %s: %w", t, err)
		}
	}

	var (
		mu       sync.Mutex
		extended atomic.Int64
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(extendParallel)
	for h, until := range jobs {
		g.Go(func() error {
			did, err := s.extend(gctx, l, h, until)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				log.Warn("could not extend object lock", "object", h.String(), "until", until, "err", err)
				mu.Lock()
				rep.Failed = append(rep.Failed, h.String())
				mu.Unlock()
				return nil
			}
			if did {
				extended.Add(1)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return rep, fmt.Errorf("guard: extend object locks: %w", err)
	}
	rep.Checked, rep.Extended = len(jobs), int(extended.Load())
	log.Info("object locks extended", "checked", rep.Checked, "extended", rep.Extended, "failed", len(rep.Failed), "horizon", rep.Horizon)
	if len(rep.Failed) > 0 {
		return rep, fmt.Errorf("guard: extend object locks: %d objects failed (first %s)", len(rep.Failed), rep.Failed[0])
	}
	return rep, nil
}

// savePermanent saves an object the vault never removes, locked until the
// horizon on object-locking storage.
func (s *Store) savePermanent(ctx context.Context, h backend.Handle, data []byte) error {
	until, err := s.objectUntil(ctx, h, nil)
	if err != nil {
		return fmt.Errorf("lock date: %w", err)
	}
	return s.save(ctx, h, data, until)
}

// ExtendObjectLocks runs [Store.ExtendObjectLocks]. Append capability
// suffices: it only ever lengthens what the lock records already demand.
func (s *Session) ExtendObjectLocks(ctx context.Context, log *slog.Logger) (LockReport, error) {
	if err := s.need(Append, "extend object locks of", "vault"); err != nil {
		return LockReport{}, err
	}
	return s.st.ExtendObjectLocks(ctx, log)
}

// lockKeys extends every key object to until: the config's save calls it,
// because init stores the first key before the config that says how long
// to lock it.
func (s *Store) lockKeys(ctx context.Context, until time.Time) error {
	l := s.locker()
	if l == nil {
		return nil
	}
	var keys []backend.Handle
	if err := s.be.List(ctx, backend.Key, func(fi backend.Info) error {
		keys = append(keys, fi.Handle)
		return ctx.Err()
	}); err != nil {
		return fmt.Errorf("list keys: %w", err)
	}
	for _, h := range keys {
		if _, err := s.extend(ctx, l, h, until); err != nil {
			return fmt.Errorf("lock %v: %w", h, err)
		}
	}
	return nil
}

// DefaultExtendEvery is how often [KeepObjectLocks] runs when asked by the
// vault server and the PostgreSQL agent. Retention dates move in daily
// steps (DefaultLockGranularity), so an hourly run extends each object at
// most once a day and notices a new lock within the hour; a run over an
// unchanged vault costs one HEAD per object it has not seen extended.
const DefaultExtendEvery = time.Hour

// ObjectLocker is a store that can keep the storage's object locks in step
// with the vault's lock records: an in-process [Session].
type ObjectLocker interface {
	ExtendObjectLocks(ctx context.Context, log *slog.Logger) (LockReport, error)
}

// KeepObjectLocks runs st's ExtendObjectLocks now and then every interval
// (DefaultExtendEvery if zero) until ctx ends, logging failures; it returns
// at once if st is not an [ObjectLocker] (a vault server's client: that
// server runs it itself). Commits and lock extensions lock what they need
// themselves; this rolls the never-removed objects forward and repairs
// what an interrupted commit left short.
func KeepObjectLocks(ctx context.Context, st any, every time.Duration, log *slog.Logger) {
	l, ok := st.(ObjectLocker)
	if !ok {
		return
	}
	if every <= 0 {
		every = DefaultExtendEvery
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		rep, err := l.ExtendObjectLocks(ctx, log)
		if err != nil && ctx.Err() == nil {
			log.Warn("extending object locks failed; retrying at the next run", "err", err, "failed", len(rep.Failed))
		}
		if !rep.ObjectLock && err == nil {
			return // nothing to keep on this storage
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// KeepObjectLocks runs [KeepObjectLocks] on this session every
// DefaultExtendEvery until ctx ends. Its signature names no guard type, so
// a client such as the PostgreSQL agent can call it on an in-process store
// without importing the vault's rule engine.
func (s *Session) KeepObjectLocks(ctx context.Context, log *slog.Logger) {
	KeepObjectLocks(ctx, s, DefaultExtendEvery, log)
}

// minRetCacheFor is how long minRetCached reuses the minimum retention.
// With an approver policy, reading it lists the policy and change records:
// two LIST requests per WAL piece (five a second from an agent) would cost
// more than the WAL itself. The minimum only ever goes down, so a stale
// value locks new objects a little longer, never shorter.
const minRetCacheFor = time.Minute

// minRetCached is minRetention, reread at most every minRetCacheFor; for the
// lock dates of arriving objects only (retention decisions use
// minRetention).
func (s *Store) minRetCached(ctx context.Context) (time.Duration, error) {
	now := s.now()
	s.mu.Lock()
	m, at := s.minRet, s.minRetAt
	s.mu.Unlock()
	if !at.IsZero() && now.Sub(at) < minRetCacheFor && !now.Before(at) {
		return m, nil
	}
	m, err := s.minRetention(ctx)
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.minRet, s.minRetAt = m, now
	s.mu.Unlock()
	return m, nil
}
