package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// SnapshotInfo is a snapshot with what the vault recorded of it.
type SnapshotInfo struct {
	ID ID
	*snapshot.Snapshot
	// VaultTime is when the vault committed it, on the vault's clock; zero
	// if no lock record was found (a damaged or hand-edited vault).
	VaultTime time.Time
	// LockUntil is the latest lock of any of its lock records.
	LockUntil time.Time
}

// Locked reports whether the snapshot is under a retention lock at now.
func (s SnapshotInfo) Locked(now time.Time) bool { return now.Before(s.LockUntil) }

// When is the time to show and to apply retention to: the vault's time
// when known, else the client's.
func (s SnapshotInfo) When() time.Time {
	if !s.VaultTime.IsZero() {
		return s.VaultTime
	}
	return s.Time
}

// Commit seals sn and asks the vault to record it with a lock of at least
// lockFor. The packs it needs are derived from the index: the content and
// trees reachable from sn.Tree, which the caller passes as blobs.
func (r *Repository) Commit(ctx context.Context, sn *snapshot.Snapshot, blobs []ID, lockFor time.Duration) (ID, format.LockRecord, error) {
	return r.CommitWAL(ctx, sn, blobs, lockFor, nil)
}

// CommitWAL is Commit for a PostgreSQL base backup: wal, if not nil, is the
// WAL the backup needs, which the vault keeps as long as the snapshot's
// lock (format.LockRecord.WAL).
func (r *Repository) CommitWAL(ctx context.Context, sn *snapshot.Snapshot, blobs []ID, lockFor time.Duration, wal *format.WALRange) (ID, format.LockRecord, error) {
	if err := r.Flush(ctx); err != nil {
		return ID{}, format.LockRecord{}, err
	}
	packSet := map[ID]bool{}
	for _, b := range blobs {
		loc, ok := r.idx.Lookup(b)
		if !ok {
			return ID{}, format.LockRecord{}, fmt.Errorf("repo: commit: blob %s is not stored", b)
		}
		packSet[loc.Pack] = true
	}
	packs := make([]ID, 0, len(packSet))
	for p := range packSet {
		packs = append(packs, p)
	}
	sort.Slice(packs, func(i, j int) bool { return packs[i].String() < packs[j].String() })
	plain, err := json.Marshal(sn)
	if err != nil {
		return ID{}, format.LockRecord{}, err
	}
	req := format.CommitRequest{Snapshot: r.key.Seal(nil, plain), Packs: packs, LockFor: format.Duration(lockFor), WAL: wal}
	lock, id, err := r.store.Commit(ctx, req)
	if err != nil {
		return ID{}, format.LockRecord{}, fmt.Errorf("repo: commit snapshot: %w", err)
	}
	return id, lock, nil
}

// LoadSnapshot reads one snapshot document.
func (r *Repository) LoadSnapshot(ctx context.Context, id ID) (*snapshot.Snapshot, error) {
	data, err := r.store.Load(ctx, backend.Handle{Type: backend.Snapshot, Name: id.String()}, 0, 0)
	if err != nil {
		return nil, fmt.Errorf("repo: load snapshot %s: %w", id, err)
	}
	if format.Hash(data) != id {
		return nil, fmt.Errorf("%w: snapshot %s: content does not match its name", ErrDamaged, id)
	}
	plain, err := r.key.Open(nil, data)
	if err != nil {
		return nil, fmt.Errorf("%w: snapshot %s: %v", ErrDamaged, id, err)
	}
	sn, err := snapshot.Decode(plain)
	if err != nil {
		return nil, fmt.Errorf("%w: snapshot %s: %v", ErrDamaged, id, err)
	}
	return sn, nil
}

// Snapshots lists every readable snapshot, oldest first by vault time.
// Unreadable ones are returned as errors beside the list.
func (r *Repository) Snapshots(ctx context.Context) ([]SnapshotInfo, []error, error) {
	names, err := r.names(ctx, backend.Snapshot)
	if err != nil {
		return nil, nil, err
	}
	locks, err := r.store.Locks(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("repo: locks: %w", err)
	}
	bySnap := map[ID][]format.LockRecord{}
	for _, l := range locks {
		bySnap[l.Snapshot] = append(bySnap[l.Snapshot], l)
	}
	var out []SnapshotInfo
	var bad []error
	for _, n := range names {
		id, err := format.ParseID(n)
		if err != nil {
			continue
		}
		sn, err := r.LoadSnapshot(ctx, id)
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, ctx.Err()
			}
			bad = append(bad, err)
			continue
		}
		si := SnapshotInfo{ID: id, Snapshot: sn}
		for _, l := range bySnap[id] {
			if l.Reason == format.ReasonCommit && (si.VaultTime.IsZero() || l.Time.Before(si.VaultTime)) {
				si.VaultTime = l.Time
			}
			if l.Until.After(si.LockUntil) {
				si.LockUntil = l.Until
			}
		}
		out = append(out, si)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].When().Equal(out[j].When()) {
			return out[i].When().Before(out[j].When())
		}
		return out[i].ID.String() < out[j].ID.String()
	})
	return out, bad, nil
}

// ErrNoSnapshot means no snapshot matched.
var ErrNoSnapshot = errors.New("repo: no matching snapshot")

// FindSnapshot resolves "latest" or a unique ID prefix (at least 4 digits).
func (r *Repository) FindSnapshot(ctx context.Context, ref string) (SnapshotInfo, error) {
	all, _, err := r.Snapshots(ctx)
	if err != nil {
		return SnapshotInfo{}, err
	}
	if ref == "latest" {
		if len(all) == 0 {
			return SnapshotInfo{}, fmt.Errorf("%w: the repository has no snapshots", ErrNoSnapshot)
		}
		return all[len(all)-1], nil
	}
	if len(ref) < 4 {
		return SnapshotInfo{}, fmt.Errorf("repo: snapshot %q: give 'latest' or at least 4 hex digits", ref)
	}
	var found []SnapshotInfo
	for _, s := range all {
		if strings.HasPrefix(s.ID.String(), ref) {
			found = append(found, s)
		}
	}
	switch len(found) {
	case 0:
		return SnapshotInfo{}, fmt.Errorf("%w: %q", ErrNoSnapshot, ref)
	case 1:
		return found[0], nil
	}
	return SnapshotInfo{}, fmt.Errorf("repo: snapshot prefix %q is ambiguous (%d matches)", ref, len(found))
}

// LoadTree reads and decodes a tree blob.
func (r *Repository) LoadTree(ctx context.Context, id ID) (*snapshot.Tree, error) {
	data, err := r.LoadBlob(ctx, pack.Tree, id)
	if err != nil {
		return nil, err
	}
	t, err := snapshot.DecodeTree(data)
	if err != nil {
		return nil, fmt.Errorf("%w: tree %s: %v", ErrDamaged, id, err)
	}
	return t, nil
}

// SaveTree encodes and stores a tree.
func (r *Repository) SaveTree(ctx context.Context, t *snapshot.Tree) (ID, error) {
	data, err := t.Encode()
	if err != nil {
		return ID{}, err
	}
	id, _, err := r.SaveBlob(ctx, pack.Tree, data)
	return id, err
}

// Marks returns the garbage-collection marks by name.
func (r *Repository) Marks(ctx context.Context) (map[string]format.Mark, error) {
	names, err := r.names(ctx, backend.Mark)
	if err != nil {
		return nil, err
	}
	out := map[string]format.Mark{}
	for _, n := range names {
		m, err := r.loadMark(ctx, n)
		if err != nil {
			return nil, err
		}
		out[n] = m
	}
	return out, nil
}

func (r *Repository) loadMark(ctx context.Context, name string) (format.Mark, error) {
	var m format.Mark
	data, err := r.store.Load(ctx, backend.Handle{Type: backend.Mark, Name: name}, 0, 0)
	if err != nil {
		return m, fmt.Errorf("repo: load mark %s: %w", name, err)
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return m, fmt.Errorf("%w: mark %s: %v", ErrDamaged, name, err)
	}
	return m, nil
}

func (r *Repository) loadMarks(ctx context.Context) error {
	names, err := r.names(ctx, backend.Mark)
	if err != nil {
		return err
	}
	for _, n := range names {
		m, err := r.loadMark(ctx, n)
		if err != nil {
			// Marks only advise; prune removes damaged ones.
			r.opts.Log.Warn("mark unreadable; ignored", "mark", n, "err", err)
			continue
		}
		r.idx.Exclude(m.Packs)
	}
	return nil
}
