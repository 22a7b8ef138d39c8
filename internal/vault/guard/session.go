package guard

import (
	"context"
	"fmt"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// Session is one capability's view of a [Store]. Every method checks the
// capability and the vault rules before touching the backend, and returns
// errors that unwrap to ErrForbidden, ErrLocked, ErrInvalid,
// backend.ErrNotExist or backend.ErrExists where those apply.
//
// The server's Client has the same method set, so code written against an
// interface of these methods runs in-process or over HTTPS alike.
type Session struct {
	st  *Store
	cap Capability
}

// Capability returns the session's capability. It takes ctx and returns an
// error only to match the network client, which must ask the server.
func (s *Session) Capability(ctx context.Context) (Capability, error) { return s.cap, nil }

func (s *Session) need(c Capability, op string, h any) error {
	if !s.cap.Allows(c) {
		return fmt.Errorf("guard: %s %v: needs %s, token has %q: %w", op, h, c, s.cap, ErrForbidden)
	}
	return nil
}

func validate(op string, h backend.Handle) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("guard: %s: %w: %w", op, ErrInvalid, err)
	}
	return nil
}

// Config returns the repository config. Read capability suffices.
func (s *Session) Config(ctx context.Context) (format.Config, error) {
	if err := s.need(Read, "config", "config"); err != nil {
		return format.Config{}, err
	}
	return s.st.config(ctx)
}

// Save stores data under h, under these rules:
//
//   - config: admin; must parse as a valid config; written once.
//   - keys, marks: admin.
//   - data (packs): append.
//   - index: append; must start with a valid plaintext index header.
//   - wal: append; must start with a valid WAL header (format.WALHeader)
//     followed by at least a seal's worth of bytes.
//   - snapshots: never; snapshots enter through Commit.
//   - locks: never; only the vault writes lock records.
//
// Every name but the config's must be format.Hash of data, checked here.
// Saving an existing name again with the same bytes succeeds (a retry);
// with other bytes it fails with backend.ErrExists.
func (s *Session) Save(ctx context.Context, h backend.Handle, data []byte) error {
	if err := validate("save", h); err != nil {
		return err
	}
	var need Capability
	switch h.Type {
	case backend.Config, backend.Key, backend.Mark:
		need = Admin
	case backend.Pack, backend.Index, backend.WAL, backend.Ledger:
		need = Append
	case backend.Snapshot:
		return fmt.Errorf("guard: save %v: snapshots are stored only by commit: %w", h, ErrForbidden)
	case backend.Lock, backend.Policy, backend.Change, backend.Consumed:
		return fmt.Errorf("guard: save %v: only the vault writes %s records, under a quorum certificate: %w", h, h.Type, ErrForbidden)
	default:
		panic("guard: unhandled type " + string(h.Type)) // Validate accepted it: a bug
	}
	if err := s.need(need, "save", h); err != nil {
		return err
	}
	var cfg *format.Config
	switch h.Type {
	case backend.Config:
		c, err := format.ParseConfig(data)
		if err != nil {
			return fmt.Errorf("guard: save config: %w: %w", ErrInvalid, err)
		}
		if len(c.QuorumPolicy) > 0 {
			if _, err := cert.ParsePolicy(c.QuorumPolicy); err != nil {
				return fmt.Errorf("guard: save config: quorum policy: %w: %w", ErrInvalid, err)
			}
		}
		cfg = &c
	case backend.Index:
		if _, _, err := format.ParseIndexHeader(data); err != nil {
			return fmt.Errorf("guard: save %v: %w: %w", h, ErrInvalid, err)
		}
	case backend.WAL:
		_, body, err := format.ParseWALHeader(data)
		if err != nil {
			return fmt.Errorf("guard: save %v: %w: %w", h, ErrInvalid, err)
		}
		if len(body) < format.WALSealOverhead {
			return fmt.Errorf("guard: save %v: sealed body of %d bytes is shorter than a seal: %w", h, len(body), ErrInvalid)
		}
	case backend.Ledger:
		if _, err := format.ParseLedgerObject(data); err != nil {
			return fmt.Errorf("guard: save %v: %w: %w", h, ErrInvalid, err)
		}
	}
	// A ledger object is named by a keyed hash of its logical name, which
	// the vault cannot check; the backend still never replaces it.
	if h.Type != backend.Config && h.Type != backend.Ledger {
		if id := format.Hash(data); id.String() != h.Name {
			return fmt.Errorf("guard: save %v: name is not the hash of the content (%s): %w", h, id, ErrInvalid)
		}
	}
	until, err := s.st.objectUntil(ctx, h, cfg)
	if err != nil {
		return fmt.Errorf("guard: save %v: lock date: %w", h, err)
	}
	if err := s.st.save(ctx, h, data, until); err != nil {
		return fmt.Errorf("guard: save %v: %w", h, err)
	}
	if cfg != nil {
		// Init saved the first key before this config said how long to
		// lock it.
		if err := s.st.lockKeys(ctx, until); err != nil {
			return fmt.Errorf("guard: save %v: %w", h, err)
		}
		s.st.mu.Lock()
		s.st.cfg = cfg
		s.st.mu.Unlock()
	}
	return nil
}

// Load returns length bytes of h from offset (length 0: to the end). Read
// capability suffices for every type: see the package comment for why append
// and read tokens may read encrypted objects.
func (s *Session) Load(ctx context.Context, h backend.Handle, offset, length int64) ([]byte, error) {
	if err := validate("load", h); err != nil {
		return nil, err
	}
	if err := s.need(Read, "load", h); err != nil {
		return nil, err
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("guard: load %v: negative offset or length: %w", h, ErrInvalid)
	}
	b, err := s.st.be.Load(ctx, h, offset, length)
	if err != nil {
		return nil, fmt.Errorf("guard: load %v: %w", h, err)
	}
	return b, nil
}

// Stat describes h. Read capability suffices.
func (s *Session) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if err := validate("stat", h); err != nil {
		return backend.Info{}, err
	}
	if err := s.need(Read, "stat", h); err != nil {
		return backend.Info{}, err
	}
	fi, err := s.st.be.Stat(ctx, h)
	if err != nil {
		return backend.Info{}, fmt.Errorf("guard: stat %v: %w", h, err)
	}
	return fi, nil
}

// List calls fn for each object of type t. Read capability suffices.
func (s *Session) List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error {
	if !t.Valid() {
		return fmt.Errorf("guard: list: unknown type %q: %w", t, ErrInvalid)
	}
	if err := s.need(Read, "list", t); err != nil {
		return err
	}
	if err := s.st.be.List(ctx, t, fn); err != nil {
		return fmt.Errorf("guard: list %s: %w", t, err)
	}
	return nil
}

// Commit records a snapshot: it checks that every declared pack exists,
// writes a lock record on the vault's clock lasting max(req.LockFor,
// MinRetention) and then the snapshot object, named by the hash of
// req.Snapshot. The lock goes first so that a crash never leaves an unlocked
// snapshot (a lock without its snapshot is harmless and expires). Append
// capability is needed.
//
// Committing the same snapshot again (a retry) adds another record and so
// can only lengthen its lock.
func (s *Session) Commit(ctx context.Context, req format.CommitRequest) (format.LockRecord, format.ID, error) {
	if err := s.need(Append, "commit", "snapshot"); err != nil {
		return format.LockRecord{}, format.ID{}, err
	}
	id := format.Hash(req.Snapshot)
	fail := func(err error) (format.LockRecord, format.ID, error) {
		return format.LockRecord{}, format.ID{}, fmt.Errorf("guard: commit snapshot %s: %w", id, err)
	}
	switch {
	case len(req.Snapshot) == 0:
		return fail(fmt.Errorf("empty snapshot: %w", ErrInvalid))
	case len(req.Packs) > format.MaxIndexPacks:
		return fail(fmt.Errorf("%d packs exceeds limit %d: %w", len(req.Packs), format.MaxIndexPacks, ErrInvalid))
	case req.LockFor < 0:
		return fail(fmt.Errorf("negative lock_for: %w", ErrInvalid))
	}
	var wal *format.WALRange
	if req.WAL != nil {
		if err := req.WAL.Validate(); err != nil {
			return fail(fmt.Errorf("%w: %w", ErrInvalid, err))
		}
		w := *req.WAL
		wal = &w
	}
	cfg, err := s.st.config(ctx)
	if err != nil {
		return fail(err)
	}
	minRet, err := s.st.minRetention(ctx)
	if err != nil {
		return fail(err)
	}
	lockFor := max(time.Duration(req.LockFor), minRet)
	if limit := s.st.maxLock(cfg); lockFor > limit {
		return fail(fmt.Errorf("lock_for %v exceeds the vault's limit %v: %w", lockFor, limit, ErrInvalid))
	}
	packs := sortedUnique(req.Packs)

	if err := s.st.acquire(ctx); err != nil {
		return fail(err)
	}
	defer s.st.release()
	if err := s.st.checkPacks(ctx, packs); err != nil {
		return fail(err)
	}
	now := s.st.now()
	rec := format.LockRecord{
		Snapshot: id,
		Time:     now,
		Until:    now.Add(lockFor),
		Reason:   format.ReasonCommit,
		Packs:    packs,
		WAL:      wal,
	}
	if err := s.st.writeLock(ctx, rec); err != nil {
		return fail(err)
	}
	// On object-locking storage the packs (and their indexes) and the
	// WAL a base backup needs are locked as long as the snapshot before
	// the snapshot appears.
	if err := s.st.lockPacks(ctx, packs, rec.Until); err != nil {
		return fail(err)
	}
	if err := s.st.lockWAL(ctx, rec.WAL, rec.Until); err != nil {
		return fail(err)
	}
	h := backend.Handle{Type: backend.Snapshot, Name: id.String()}
	if err := s.st.save(ctx, h, req.Snapshot, rec.Until); err != nil {
		return fail(fmt.Errorf("save %v: %w", h, err))
	}
	return rec, id, nil
}

// checkPacks returns an error naming the first pack that does not exist.
func (s *Store) checkPacks(ctx context.Context, packs []format.ID) error {
	if len(packs) > statListThreshold {
		have := make(map[string]struct{})
		err := s.be.List(ctx, backend.Pack, func(fi backend.Info) error {
			have[fi.Name] = struct{}{}
			return nil
		})
		if err != nil {
			return fmt.Errorf("list packs: %w", err)
		}
		for _, p := range packs {
			if _, ok := have[p.String()]; !ok {
				return fmt.Errorf("pack %s: %w", p, backend.ErrNotExist)
			}
		}
		return nil
	}
	for _, p := range packs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := s.be.Stat(ctx, backend.Handle{Type: backend.Pack, Name: p.String()}); err != nil {
			return fmt.Errorf("pack %s: %w", p, err)
		}
	}
	return nil
}

// ExtendLock writes a new lock record for snapshot reaching until, carrying
// the packs of the snapshot's latest record and its WAL range, after checking that the
// snapshot and those packs still exist. until must be later than the
// snapshot's current lock: locks are never shortened, so an earlier until
// fails with ErrLocked; an equal one returns the existing record. Append
// capability is needed.
func (s *Session) ExtendLock(ctx context.Context, snapshot format.ID, until time.Time) (format.LockRecord, error) {
	if err := s.need(Append, "extend lock of", snapshot); err != nil {
		return format.LockRecord{}, err
	}
	fail := func(err error) (format.LockRecord, error) {
		return format.LockRecord{}, fmt.Errorf("guard: extend lock of %s: %w", snapshot, err)
	}
	if until.IsZero() {
		return fail(fmt.Errorf("no until given: %w", ErrInvalid))
	}
	until = until.UTC().Round(0)
	cfg, err := s.st.config(ctx)
	if err != nil {
		return fail(err)
	}
	if err := s.st.acquire(ctx); err != nil {
		return fail(err)
	}
	defer s.st.release()

	all, err := s.st.liveLocks(ctx)
	if err != nil {
		return fail(err)
	}
	cur, mine := LockUntil(values(all), snapshot)
	if len(mine) == 0 {
		return fail(fmt.Errorf("no lock records: %w", backend.ErrNotExist))
	}
	switch {
	case until.Before(cur):
		return fail(fmt.Errorf("locks are never shortened: current lock until %s, asked %s: %w",
			cur.Format(time.RFC3339), until.Format(time.RFC3339), ErrLocked))
	case until.Equal(cur):
		for _, r := range mine {
			if r.Until.Equal(cur) {
				return r, nil
			}
		}
	}
	now := s.st.now()
	if !until.After(now) {
		return fail(fmt.Errorf("until %s is not in the future: %w", until.Format(time.RFC3339), ErrInvalid))
	}
	if limit := s.st.maxLock(cfg); until.Sub(now) > limit {
		return fail(fmt.Errorf("until is more than the vault's limit %v away: %w", limit, ErrInvalid))
	}
	latest := mine[len(mine)-1] // sorted by Time
	h := backend.Handle{Type: backend.Snapshot, Name: snapshot.String()}
	if _, err := s.st.be.Stat(ctx, h); err != nil {
		return fail(fmt.Errorf("stat %v: %w", h, err))
	}
	if err := s.st.checkPacks(ctx, latest.Packs); err != nil {
		return fail(err)
	}
	rec := format.LockRecord{
		Snapshot: snapshot,
		Time:     now,
		Until:    until,
		Reason:   format.ReasonExtend,
		Packs:    latest.Packs,
		WAL:      walOf(mine),
	}
	if err := s.st.writeLock(ctx, rec); err != nil {
		return fail(err)
	}
	if err := s.st.lockPacks(ctx, latest.Packs, until); err != nil {
		return fail(err)
	}
	if err := s.st.lockWAL(ctx, rec.WAL, until); err != nil {
		return fail(err)
	}
	if l := s.st.locker(); l != nil {
		if _, err := s.st.extend(ctx, l, h, until); err != nil {
			return fail(fmt.Errorf("lock %v: %w", h, err))
		}
	}
	return rec, nil
}

// Locks returns every lock record in the vault, sorted by Time. Read
// capability suffices.
func (s *Session) Locks(ctx context.Context) ([]format.LockRecord, error) {
	if err := s.need(Read, "list", "locks"); err != nil {
		return nil, err
	}
	all, err := s.st.liveLocks(ctx)
	if err != nil {
		return nil, err
	}
	rs := values(all)
	sortRecords(rs)
	return rs, nil
}

// SnapshotLock returns the lock horizon of snapshot id (zero if it has no
// records) and its records, oldest first. Read capability suffices.
func (s *Session) SnapshotLock(ctx context.Context, id format.ID) (until time.Time, records []format.LockRecord, err error) {
	rs, err := s.Locks(ctx)
	if err != nil {
		return time.Time{}, nil, err
	}
	until, records = LockUntil(rs, id)
	return until, records, nil
}

// Remove deletes h. Admin capability is needed, and:
//
//   - the config is never removed;
//   - a lock record only once expired (Until <= now);
//   - a snapshot only while none of its lock records is live;
//   - a pack only while no live lock record lists it;
//   - an index only if every pack it covers that a live record lists is
//     also covered by another existing index;
//   - a key only if it is not the last one;
//   - a WAL piece only once the vault has held it for the repository's
//     MinRetention, on the vault clock from the time it was stored, and
//     while no live lock record's WAL range needs it;
//   - marks freely.
//
// Refusals for locks unwrap to ErrLocked, others to ErrForbidden.
func (s *Session) Remove(ctx context.Context, h backend.Handle) error {
	if err := validate("remove", h); err != nil {
		return err
	}
	if err := s.need(Admin, "remove", h); err != nil {
		return err
	}
	switch h.Type {
	case backend.Config:
		return fmt.Errorf("guard: remove %v: the config is never removed: %w", h, ErrForbidden)
	case backend.Policy, backend.Change, backend.Consumed:
		return fmt.Errorf("guard: remove %v: %s records are never removed: %w", h, h.Type, ErrForbidden)
	case backend.Ledger:
		return fmt.Errorf("guard: remove %v: ledger objects are never removed: %w", h, ErrForbidden)
	}
	if err := s.st.acquire(ctx); err != nil {
		return fmt.Errorf("guard: remove %v: %w", h, err)
	}
	defer s.st.release()
	if err := s.st.mayRemove(ctx, h); err != nil {
		return fmt.Errorf("guard: remove %v: %w", h, err)
	}
	if err := s.st.be.Remove(ctx, h); err != nil {
		return fmt.Errorf("guard: remove %v: %w", h, err)
	}
	s.st.mu.Lock()
	switch h.Type {
	case backend.Lock:
		delete(s.st.locks, h.Name)
	case backend.Index:
		delete(s.st.indexes, h.Name)
	case backend.WAL:
		delete(s.st.walHead, h.Name)
	}
	s.st.mu.Unlock()
	return nil
}

// mayRemove applies Remove's rules; the caller holds the semaphore.
func (s *Store) mayRemove(ctx context.Context, h backend.Handle) error {
	now := s.now()
	switch h.Type {
	case backend.Mark:
		return nil

	case backend.Key:
		cfg, err := s.config(ctx)
		if err != nil {
			return err
		}
		if len(cfg.QuorumPolicy) > 0 {
			return fmt.Errorf("this vault holds an approver policy: removing a key needs a quorum certificate (vault:%s): %w", OpRemoveKey, ErrForbidden)
		}
		return s.mayRemoveKey(ctx, h)

	case backend.Lock:
		r, err := s.loadLock(ctx, h.Name)
		if err != nil {
			return err
		}
		if r.Live(now) {
			return fmt.Errorf("lock for snapshot %s is live until %s: %w", r.Snapshot, r.Until.Format(time.RFC3339), ErrLocked)
		}
		// A shortening stays while a record it supersedes exists, or that
		// record's longer Until would come back into force.
		for _, sup := range r.Supersedes {
			if _, err := s.be.Stat(ctx, backend.Handle{Type: backend.Lock, Name: sup.String()}); err == nil {
				return fmt.Errorf("it supersedes lock record %s, which still exists: %w", sup, ErrLocked)
			}
		}
		return nil

	case backend.WAL:
		return s.mayRemoveWAL(ctx, h, now)
	}

	all, err := s.liveLocks(ctx)
	if err != nil {
		return err
	}
	// live maps each pack a live record lists to one snapshot that needs it.
	live := make(map[format.ID]format.ID)
	liveSnap := make(map[format.ID]time.Time)
	for _, r := range all {
		if !r.Live(now) {
			continue
		}
		if r.Until.After(liveSnap[r.Snapshot]) {
			liveSnap[r.Snapshot] = r.Until
		}
		for _, p := range r.Packs {
			live[p] = r.Snapshot
		}
	}

	switch h.Type {
	case backend.Snapshot:
		id, err := format.ParseID(h.Name)
		if err != nil {
			return err // Validate passed, so unreachable
		}
		if until, ok := liveSnap[id]; ok {
			return fmt.Errorf("snapshot is locked until %s: %w", until.Format(time.RFC3339), ErrLocked)
		}
		return nil

	case backend.Pack:
		id, err := format.ParseID(h.Name)
		if err != nil {
			return err
		}
		if snap, ok := live[id]; ok {
			return fmt.Errorf("pack is needed by snapshot %s, locked until %s: %w",
				snap, liveSnap[snap].Format(time.RFC3339), ErrLocked)
		}
		return nil

	case backend.Index:
		covered, err := s.indexPacks(ctx, h.Name)
		if err != nil {
			return err
		}
		need := make(map[format.ID]struct{})
		for _, p := range covered {
			if _, ok := live[p]; ok {
				need[p] = struct{}{}
			}
		}
		if len(need) == 0 {
			return nil
		}
		err = s.be.List(ctx, backend.Index, func(fi backend.Info) error {
			if fi.Name == h.Name || len(need) == 0 {
				return nil
			}
			other, err := s.indexPacks(ctx, fi.Name)
			if err != nil {
				return nil // an unreadable index covers nothing: fail closed
			}
			for _, p := range other {
				delete(need, p)
			}
			return ctx.Err()
		})
		if err != nil {
			return fmt.Errorf("list indexes: %w", err)
		}
		for p := range need {
			snap := live[p]
			return fmt.Errorf("it is the only index covering pack %s of snapshot %s, locked until %s: %w",
				p, snap, liveSnap[snap].Format(time.RFC3339), ErrLocked)
		}
		return nil
	}
	panic("guard: unhandled type " + string(h.Type))
}

func values(m map[string]format.LockRecord) []format.LockRecord {
	out := make([]format.LockRecord, 0, len(m))
	for _, r := range m {
		out = append(out, r)
	}
	return out
}

// mayRemoveWAL allows removing a WAL piece only once the vault has held it
// for the repository's MinRetention, counted on the vault's clock from the
// object's modification time in the backend. WAL carries no lock
// record: it arrives every fraction of a second, and a record per piece
// would double the objects written on the agent's critical path.
//
// The modification time is the vault's receive time because the vault wrote
// the file itself (a temp file then a link; an identical retry leaves the
// first time in place), and no client can set it. Whoever could change it
// (root on the vault host) could delete the folder anyway; object storage
// will lock each piece with Object Lock instead. A time in the future (a
// clock step, a touched file) keeps the piece: the rule fails closed.
func (s *Store) mayRemoveWAL(ctx context.Context, h backend.Handle, now time.Time) error {
	minRet, err := s.minRetention(ctx)
	if err != nil {
		return err
	}
	fi, err := s.be.Stat(ctx, h)
	if err != nil {
		return err
	}
	received := fi.ModTime.UTC()
	until := received.Add(minRet)
	if now.Before(until) {
		return fmt.Errorf("WAL received %s is kept until %s (minimum retention %v): %w",
			received.Format(time.RFC3339), until.Format(time.RFC3339), minRet, ErrLocked)
	}
	all, err := s.liveLocks(ctx)
	if err != nil {
		return err
	}
	var hd *format.WALHeader
	var need *format.LockRecord
	for _, r := range all {
		if r.WAL == nil || !r.Live(now) || (need != nil && !r.Until.After(need.Until)) {
			continue
		}
		if hd == nil {
			// Only the plaintext header says what a piece holds; its
			// name is a hash. A header that does not parse keeps the
			// piece: the vault refused such pieces on save.
			x, err := s.walHeader(ctx, h.Name)
			if err != nil {
				return err
			}
			hd = &x
		}
		if r.WAL.Needs(*hd) {
			need = &r
		}
	}
	if need != nil {
		return fmt.Errorf("WAL piece (timeline %d, %X-%X) is needed by base backup snapshot %s (%s), locked until %s: %w",
			hd.Timeline, hd.Start, hd.End, need.Snapshot, need.WAL, need.Until.Format(time.RFC3339), ErrLocked)
	}
	return nil
}

// walOf returns the WAL range of a snapshot's records: the latest record's
// that has one (all of a snapshot's records carry the one given at commit),
// nil if none does.
func walOf(records []format.LockRecord) *format.WALRange {
	var out *format.WALRange
	var at time.Time
	for _, r := range records {
		if r.WAL != nil && (out == nil || !r.Time.Before(at)) {
			w := *r.WAL
			out, at = &w, r.Time
		}
	}
	return out
}

// mayRemoveKey allows removing an existing key that is not the last one.
func (s *Store) mayRemoveKey(ctx context.Context, h backend.Handle) error {
	// Stat first so removing a missing key reports ErrNotExist.
	if _, err := s.be.Stat(ctx, h); err != nil {
		return err
	}
	n := 0
	if err := s.be.List(ctx, backend.Key, func(backend.Info) error { n++; return nil }); err != nil {
		return fmt.Errorf("list keys: %w", err)
	}
	if n <= 1 {
		return fmt.Errorf("it is the last key: %w", ErrForbidden)
	}
	return nil
}
