package guard

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// Capability is what a session may do. Admin includes append, which
// includes read.
type Capability string

// The capabilities, weakest first.
const (
	Read   Capability = "read"
	Append Capability = "append"
	Admin  Capability = "admin"
)

func (c Capability) rank() int {
	switch c {
	case Read:
		return 1
	case Append:
		return 2
	case Admin:
		return 3
	}
	return 0
}

// Valid reports whether c is one of the known capabilities.
func (c Capability) Valid() bool { return c.rank() > 0 }

// Allows reports whether c includes need. An invalid capability allows
// nothing.
func (c Capability) Allows(need Capability) bool {
	return c.Valid() && need.Valid() && c.rank() >= need.rank()
}

// ParseCapability parses "read", "append" or "admin".
func ParseCapability(s string) (Capability, error) {
	c := Capability(s)
	if !c.Valid() {
		return "", fmt.Errorf("guard: unknown capability %q (want read, append or admin): %w", s, ErrInvalid)
	}
	return c, nil
}

var (
	// ErrForbidden is returned (wrapped) when the session's capability is too
	// weak or the operation is never allowed (writing a lock record, removing
	// the config, saving a snapshot outside Commit).
	ErrForbidden = errors.New("guard: forbidden")
	// ErrLocked is returned (wrapped) when a retention lock protects the
	// object, or when a lock would be shortened.
	ErrLocked = errors.New("guard: retention lock in force")
	// ErrInvalid is returned (wrapped) for malformed requests: a bad handle, a
	// name that is not the hash of the bytes, an unparseable config or index
	// header, an out-of-range lock time.
	ErrInvalid = errors.New("guard: invalid request")
)

// indexMagic opens every index object; see format.AppendIndexHeader.
const indexMagic = "DKI1"

// DefaultMaxLock is the default for [Options.MaxLock]: ten years, longer
// than any retention policy we have been asked for, short enough that a
// compromised append token cannot pin junk in the vault forever.
const DefaultMaxLock = 10 * 365 * 24 * time.Hour

// statListThreshold is the number of declared packs above which Commit lists
// all packs once instead of calling Stat per pack. A local Stat costs about as
// much as reading one directory entry, so a listing wins well before this.
const statListThreshold = 256

// Options configure a [Store].
type Options struct {
	// Now is the vault's clock. Nil means time.Now. Every lock time comes
	// from it, never from a client.
	Now func() time.Time
	// MaxLock bounds how far past now a client may ask a lock to reach (at
	// commit or extension). Zero means DefaultMaxLock. A config whose
	// MinRetention exceeds it raises the bound to MinRetention.
	MaxLock time.Duration
	// LockGranularity is the step in which retention dates on object-locking
	// storage ([Locker]) are rounded up. Zero means DefaultLockGranularity;
	// negative means no rounding (tests).
	LockGranularity time.Duration
}

// ApplyDefaults fills zero fields.
func (o *Options) ApplyDefaults() {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxLock <= 0 {
		o.MaxLock = DefaultMaxLock
	}
	if o.LockGranularity == 0 {
		o.LockGranularity = DefaultLockGranularity
	}
}

// Store wraps a backend and owns the vault clock and the caches of immutable
// records. Use [Store.Session] to act with a capability. A Store is safe for
// concurrent use; it assumes it is the only writer of lock records to its
// backend (other processes may read).
type Store struct {
	be   backend.Backend
	opts Options

	// sem serializes Commit, ExtendLock and Remove, so that what they check
	// (a pack exists; no live lock lists it) still holds when they write:
	// otherwise a pack could be removed between Commit's existence check and
	// its lock write. It is a channel so waiting honours ctx.
	sem chan struct{}

	mu      sync.Mutex // guards the caches below; never held across backend calls
	cfg     *format.Config
	locks   map[string]format.LockRecord // lock object name → record
	indexes map[string][]format.ID       // index object name → packs in its header
	walHead map[string]format.WALHeader  // WAL object name → its plaintext header
	// verified remembers records whose certificate verified ("type/name" →
	// request ID); see Store.verifiedAt.
	verified map[string]cert.ID
	// retained is a lower bound of the storage retention of objects this
	// Store saved or extended on a [Locker], to skip needless updates.
	retained map[backend.Handle]time.Time
	// minRet caches minRetention for lock dates of arriving objects
	// (minRetCached); minRetAt is when it was read.
	minRet   time.Duration
	minRetAt time.Time
}

// New returns a Store enforcing the vault rules on be.
func New(be backend.Backend, opts Options) *Store {
	opts.ApplyDefaults()
	return &Store{
		be:       be,
		opts:     opts,
		sem:      make(chan struct{}, 1),
		locks:    make(map[string]format.LockRecord),
		indexes:  make(map[string][]format.ID),
		walHead:  make(map[string]format.WALHeader),
		verified: make(map[string]cert.ID),
		retained: make(map[backend.Handle]time.Time),
	}
}

// Session returns a session acting with capability c. An invalid c yields a
// session that may do nothing.
func (s *Store) Session(c Capability) *Session { return &Session{st: s, cap: c} }

// Backend returns the wrapped backend, for the server's own housekeeping and
// for tests. Writes through it bypass every rule.
func (s *Store) Backend() backend.Backend { return s.be }

func (s *Store) now() time.Time { return s.opts.Now().UTC().Round(0) }

func (s *Store) acquire(ctx context.Context) error {
	select {
	case s.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Store) release() { <-s.sem }

// config returns the cached config, reading it on first use. A missing
// config is not cached, so a vault initialised later is noticed.
func (s *Store) config(ctx context.Context) (format.Config, error) {
	s.mu.Lock()
	c := s.cfg
	s.mu.Unlock()
	if c != nil {
		return *c, nil
	}
	data, err := s.be.Load(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, 0, 0)
	if err != nil {
		return format.Config{}, fmt.Errorf("guard: load config: %w", err)
	}
	cfg, err := format.ParseConfig(data)
	if err != nil {
		return format.Config{}, fmt.Errorf("guard: stored config: %w", err)
	}
	s.mu.Lock()
	s.cfg = &cfg
	s.mu.Unlock()
	return cfg, nil
}

// maxLock is the furthest past now a client may ask a lock to reach.
func (s *Store) maxLock(cfg format.Config) time.Duration {
	return max(s.opts.MaxLock, time.Duration(cfg.MinRetention))
}

// liveLocks returns the lock records in force: all of them but those a
// valid certified shortening superseded.
func (s *Store) liveLocks(ctx context.Context) (map[string]format.LockRecord, error) {
	all, err := s.allLocks(ctx)
	if err != nil {
		return nil, err
	}
	return s.effectiveLocks(ctx, all)
}

// allLocks lists the lock objects and returns their records, loading only
// names not seen before: records are immutable, so a cached one never goes
// stale, and names that vanished from the listing are dropped. Any record
// that fails to load or parse fails the whole call, so decisions that depend
// on locks fail closed.
func (s *Store) allLocks(ctx context.Context) (map[string]format.LockRecord, error) {
	var names []string
	err := s.be.List(ctx, backend.Lock, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return ctx.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("guard: list locks: %w", err)
	}
	out := make(map[string]format.LockRecord, len(names))
	var missing []string
	s.mu.Lock()
	for _, n := range names {
		if r, ok := s.locks[n]; ok {
			out[n] = r
		} else {
			missing = append(missing, n)
		}
	}
	s.mu.Unlock()
	for _, n := range missing {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		r, err := s.loadLock(ctx, n)
		if err != nil {
			return nil, err
		}
		out[n] = r
	}
	s.mu.Lock()
	for n := range s.locks {
		if _, ok := out[n]; !ok {
			delete(s.locks, n)
		}
	}
	for _, n := range missing {
		s.locks[n] = out[n]
	}
	s.mu.Unlock()
	return out, nil
}

func (s *Store) loadLock(ctx context.Context, name string) (format.LockRecord, error) {
	h := backend.Handle{Type: backend.Lock, Name: name}
	data, err := s.be.Load(ctx, h, 0, 0)
	if err != nil {
		return format.LockRecord{}, fmt.Errorf("guard: load %v: %w", h, err)
	}
	if format.Hash(data).String() != name {
		return format.LockRecord{}, fmt.Errorf("guard: lock %s: name is not the hash of its content", name)
	}
	r, err := format.ParseLockRecord(data)
	if err != nil {
		return format.LockRecord{}, fmt.Errorf("guard: lock %s: %w", name, err)
	}
	return r, nil
}

// writeLock stores r under the hash of its encoding and caches it.
func (s *Store) writeLock(ctx context.Context, r format.LockRecord) error {
	data, err := json.Marshal(r)
	if err != nil {
		panic(fmt.Sprintf("guard: marshal lock record: %v", err)) // plain struct: a bug
	}
	name := format.Hash(data).String()
	if err := s.save(ctx, backend.Handle{Type: backend.Lock, Name: name}, data, r.Until); err != nil {
		return fmt.Errorf("guard: write lock for snapshot %s: %w", r.Snapshot, err)
	}
	s.mu.Lock()
	s.locks[name] = r
	s.mu.Unlock()
	return nil
}

// indexPacks returns the packs listed in the plaintext header of index name.
func (s *Store) indexPacks(ctx context.Context, name string) ([]format.ID, error) {
	s.mu.Lock()
	p, ok := s.indexes[name]
	s.mu.Unlock()
	if ok {
		return p, nil
	}
	h := backend.Handle{Type: backend.Index, Name: name}
	head, err := s.be.Load(ctx, h, 0, int64(format.IndexHeaderSize(0)))
	if err != nil {
		return nil, fmt.Errorf("guard: load %v: %w", h, err)
	}
	p, _, err = format.ParseIndexHeader(head)
	if err != nil {
		// Only the count was read; anything but "truncated" is final.
		if len(head) < format.IndexHeaderSize(0) || string(head[:4]) != indexMagic {
			return nil, fmt.Errorf("guard: %v: %w", h, err)
		}
		n := binary.BigEndian.Uint32(head[4:])
		if n > format.MaxIndexPacks {
			return nil, fmt.Errorf("guard: %v: %w", h, err)
		}
		full, err := s.be.Load(ctx, h, 0, int64(format.IndexHeaderSize(int(n))))
		if err != nil {
			return nil, fmt.Errorf("guard: load %v: %w", h, err)
		}
		if p, _, err = format.ParseIndexHeader(full); err != nil {
			return nil, fmt.Errorf("guard: %v: %w", h, err)
		}
	}
	s.mu.Lock()
	s.indexes[name] = p
	s.mu.Unlock()
	return p, nil
}

// walHeader returns the plaintext header of WAL object name, with one
// ranged read the first time. Objects are named by the hash of their bytes,
// so a cached header never goes stale.
func (s *Store) walHeader(ctx context.Context, name string) (format.WALHeader, error) {
	s.mu.Lock()
	hd, ok := s.walHead[name]
	s.mu.Unlock()
	if ok {
		return hd, nil
	}
	h := backend.Handle{Type: backend.WAL, Name: name}
	head, err := s.be.Load(ctx, h, 0, format.WALHeaderSize)
	if err != nil {
		return format.WALHeader{}, fmt.Errorf("guard: load %v: %w", h, err)
	}
	hd, _, err = format.ParseWALHeader(head)
	if err != nil {
		return format.WALHeader{}, fmt.Errorf("guard: %v: %w", h, err)
	}
	s.mu.Lock()
	s.walHead[name] = hd
	s.mu.Unlock()
	return hd, nil
}

// LockUntil returns the lock horizon of snapshot id among records (the
// latest Until of its records; zero if it has none) and its records, oldest
// first. Clients use it to show lock-until; retention uses it to count time.
func LockUntil(records []format.LockRecord, id format.ID) (until time.Time, mine []format.LockRecord) {
	for _, r := range records {
		if r.Snapshot != id {
			continue
		}
		mine = append(mine, r)
		if r.Until.After(until) {
			until = r.Until
		}
	}
	sortRecords(mine)
	return until, mine
}

// sortRecords orders records by Time, then Until, then snapshot: a stable
// order for listings and tests.
func sortRecords(rs []format.LockRecord) {
	slices.SortFunc(rs, func(a, b format.LockRecord) int {
		if c := a.Time.Compare(b.Time); c != 0 {
			return c
		}
		if c := a.Until.Compare(b.Until); c != 0 {
			return c
		}
		return slices.Compare(a.Snapshot[:], b.Snapshot[:])
	})
}

// sortedUnique returns ids sorted with duplicates removed; nil if empty, so
// that a record round-trips through JSON (omitempty) unchanged.
func sortedUnique(ids []format.ID) []format.ID {
	if len(ids) == 0 {
		return nil
	}
	out := slices.Clone(ids)
	slices.SortFunc(out, func(a, b format.ID) int { return slices.Compare(a[:], b[:]) })
	return slices.Compact(out)
}
