package retention

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/check"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// DefaultGrace is the default for PruneOptions.Grace. A pack must stay
// unreferenced this long after a run first marked it: longer than any
// backup runs between uploading a pack and committing the snapshot that
// needs it (that commit would otherwise fail for a missing pack).
const DefaultGrace = 24 * time.Hour

// PruneOptions tune Prune.
type PruneOptions struct {
	// Grace is how old a mark must be before the packs it lists may be
	// deleted. Zero means DefaultGrace.
	Grace time.Duration
	// DryRun computes and reports everything but writes and removes
	// nothing; refusals by the vault are predicted from its lock records.
	DryRun bool
	// Now is the clock for marks and for which lock records are live. Nil
	// means time.Now.
	Now func() time.Time
	// Log receives what was deleted, kept and why; nil discards.
	Log *slog.Logger
}

// ApplyDefaults fills zero fields.
func (o *PruneOptions) ApplyDefaults() {
	if o.Grace <= 0 {
		o.Grace = DefaultGrace
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// PruneReport says what Prune did (or, with DryRun, would do).
type PruneReport struct {
	DryRun bool
	// Snapshots is how many snapshots were walked; UsedPacks how many packs
	// hold a blob one of them needs.
	Snapshots, UsedPacks int
	// Candidates are the packs no snapshot needs, found this run.
	Candidates []format.ID
	// Deleted are the candidates removed, and BytesFreed their size.
	Deleted    []format.ID
	BytesFreed int64
	// Kept are candidates not deleted, with why (not yet marked, in the
	// grace period, locked by the vault).
	Kept map[format.ID]string
	// Mark is the mark written this run (zero if none) and Marked the
	// packs it lists: candidates no surviving earlier mark lists.
	Mark   format.ID
	Marked []format.ID
	// IndexesWritten replace IndexesRemoved, which covered deleted packs.
	IndexesWritten []format.ID
	IndexesRemoved []string
	// MarksRemoved listed only packs now deleted or needed again, or were
	// unreadable; LocksRemoved are expired lock records of snapshots that
	// no longer exist.
	MarksRemoved []string
	LocksRemoved []string
	// Missing are blobs a snapshot needs that no pack holds: damage for
	// check to report; prune deletes nothing on their account.
	Missing []format.ID
}

// ErrUnsafe is returned (wrapped) when Prune cannot know what the snapshots
// need, because a snapshot or tree is unreadable: deleting then could
// destroy what a damaged snapshot still points to. Run check first.
var ErrUnsafe = errors.New("retention: prune refused: the vault is damaged")

// usage is what the snapshots need, computed from a fresh inventory.
type usage struct {
	inv   *check.Inventory
	snaps map[string]bool     // snapshot names walked
	used  map[format.ID]bool  // packs holding a needed blob
	miss  map[format.ID]bool  // needed blobs no pack holds
	locks []format.LockRecord // all lock records
}

// Prune deletes packs that no snapshot needs, in two phases and without a
// lock file; see the package comment. It needs an admin store. Steps:
//
//  1. find every blob reachable from every snapshot, and the packs holding
//     them; every other pack in the store or an index is a candidate;
//  2. delete each candidate that a mark older than Grace lists, after
//     checking again that no snapshot committed meanwhile needs it; the
//     vault refuses packs a live lock lists, and those are kept;
//  3. write a mark listing the candidates no surviving mark lists;
//  4. replace each index covering a deleted pack by one without it;
//  5. remove marks that are done with and expired lock records of
//     snapshots that no longer exist (and are older than Grace, so a
//     commit between its lock and its snapshot write is not disturbed).
//
// Prune refuses (ErrUnsafe) when a snapshot or tree cannot be read. The
// Repository's in-memory index is not updated: open the repository again
// after a prune to back up into it.
func Prune(ctx context.Context, r *repo.Repository, opts PruneOptions) (*PruneReport, error) {
	opts.ApplyDefaults()
	now := opts.Now().UTC().Round(0)
	log := opts.Log
	rep := &PruneReport{DryRun: opts.DryRun, Kept: map[format.ID]string{}}

	marks, badMarks, err := loadMarks(ctx, r)
	if err != nil {
		return nil, err
	}
	markedAt := map[format.ID]time.Time{} // earliest mark listing each pack
	for _, m := range marks {
		for _, p := range m.Packs {
			if t, ok := markedAt[p]; !ok || m.Time.Before(t) {
				markedAt[p] = m.Time
			}
		}
	}
	u, err := computeUsage(ctx, r, markedAt)
	if err != nil {
		return nil, err
	}

	candidates := u.candidates()
	deadline := now.Add(-opts.Grace)
	var due []format.ID
	for _, p := range candidates {
		t, ok := markedAt[p]
		switch {
		case !ok:
			rep.Kept[p] = "marked now; deletable after " + now.Add(opts.Grace).Format(time.RFC3339)
		case t.After(deadline):
			rep.Kept[p] = "in the grace period until " + t.Add(opts.Grace).Format(time.RFC3339)
		default:
			due = append(due, p)
		}
	}

	// A snapshot committed since the walk may need a due pack: walk again
	// if the snapshot list changed. (A commit after this check is stopped
	// by the vault: its lock record lists the pack, or its pack check
	// fails because the pack is gone.)
	if len(due) > 0 {
		names, err := snapshotNames(ctx, r)
		if err != nil {
			return nil, err
		}
		changed := len(names) != len(u.snaps)
		for _, n := range names {
			changed = changed || !u.snaps[n]
		}
		if changed {
			log.Info("snapshots changed during prune; walking again")
			if u, err = computeUsage(ctx, r, markedAt); err != nil {
				return nil, err
			}
			due = slices.DeleteFunc(due, func(p format.ID) bool {
				if u.used[p] {
					rep.Kept[p] = "needed by a snapshot committed during prune"
				}
				return u.used[p]
			})
		}
	}
	rep.Snapshots, rep.UsedPacks = len(u.snaps), len(u.used)
	rep.Candidates = candidates
	rep.Missing = sortedIDs(u.miss)
	for _, b := range rep.Missing {
		log.Warn("a snapshot needs a blob no pack holds; run check", "blob", b)
	}

	// Phase 2: delete.
	deleted := map[format.ID]bool{}
	locked := lockedPacks(u.locks, now)
	for _, p := range due {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		_, onDisk := u.inv.Disk[p]
		if !onDisk {
			deleted[p] = true // already gone (an earlier run stopped midway)
			continue
		}
		if opts.DryRun {
			if why, ok := locked[p]; ok {
				rep.Kept[p] = "locked: " + why
				continue
			}
		} else if err := r.Store().Remove(ctx, backend.Handle{Type: backend.Pack, Name: p.String()}); err != nil {
			switch {
			case ctx.Err() != nil:
				return rep, ctx.Err()
			case errors.Is(err, backend.ErrNotExist):
				deleted[p] = true
				continue
			case errors.Is(err, guard.ErrLocked):
				rep.Kept[p] = "locked: " + err.Error()
				log.Info("pack kept: the vault refuses, a live lock lists it", "pack", p, "err", err)
			case errors.Is(err, backend.ErrRetained):
				rep.Kept[p] = "retained by object lock: " + err.Error()
				log.Info("pack kept: the storage's object lock has not expired", "pack", p, "err", err)
			default:
				rep.Kept[p] = "remove failed: " + err.Error()
				log.Warn("pack kept: remove failed", "pack", p, "err", err)
			}
			continue
		}
		deleted[p] = true
		rep.Deleted = append(rep.Deleted, p)
		rep.BytesFreed += u.inv.Disk[p]
		log.Info("pack deleted", "pack", p, "bytes", u.inv.Disk[p], "dry_run", opts.DryRun)
	}

	// Phase 3: mark the candidates no surviving mark lists. A mark is
	// named by the hash of its bytes, like every object.
	var fresh []format.ID
	for _, p := range candidates {
		if _, ok := markedAt[p]; !ok && !deleted[p] {
			fresh = append(fresh, p)
		}
	}
	if len(fresh) > 0 {
		data, err := json.Marshal(format.Mark{Time: now, Packs: fresh})
		if err != nil {
			panic(fmt.Sprintf("retention: marshal mark: %v", err)) // plain struct: a bug
		}
		rep.Mark, rep.Marked = format.Hash(data), fresh
		if !opts.DryRun {
			if err := r.Store().Save(ctx, backend.Handle{Type: backend.Mark, Name: rep.Mark.String()}, data); err != nil {
				return rep, fmt.Errorf("retention: save mark: %w", err)
			}
		}
		log.Info("packs marked as garbage", "mark", rep.Mark, "packs", len(fresh))
	}

	// Phase 4: indexes. Also drop packs an earlier, interrupted run deleted
	// (marked, gone from the store, needed by nothing).
	drop := func(p format.ID) bool {
		if deleted[p] {
			return true
		}
		_, onDisk := u.inv.Disk[p]
		_, wasMarked := markedAt[p]
		return !onDisk && wasMarked && !u.used[p]
	}
	for _, name := range sortedKeys(u.inv.Indexes) {
		packs := u.inv.Indexes[name]
		if !slices.ContainsFunc(packs, func(p check.IndexPack) bool { return drop(p.ID) }) {
			continue
		}
		keep := slices.DeleteFunc(slices.Clone(packs), func(p check.IndexPack) bool { return drop(p.ID) })
		if opts.DryRun {
			rep.IndexesRemoved = append(rep.IndexesRemoved, name)
			continue
		}
		if len(keep) > 0 {
			ids, err := r.SaveIndexes(ctx, keep)
			rep.IndexesWritten = append(rep.IndexesWritten, ids...)
			if err != nil {
				return rep, err
			}
		}
		if err := r.Store().Remove(ctx, backend.Handle{Type: backend.Index, Name: name}); err != nil {
			if ctx.Err() != nil {
				return rep, ctx.Err()
			}
			// Harmless: the old index names packs that are gone, which
			// the next run drops again.
			log.Warn("old index kept", "index", name, "err", err)
			continue
		}
		rep.IndexesRemoved = append(rep.IndexesRemoved, name)
	}

	// Phase 5: marks and lock records.
	for _, name := range sortedKeys(marks) {
		done := true
		for _, p := range marks[name].Packs {
			_, onDisk := u.inv.Disk[p]
			if onDisk && !deleted[p] && !u.used[p] {
				done = false
				break
			}
		}
		if done {
			rep.MarksRemoved = append(rep.MarksRemoved, name)
		}
	}
	rep.MarksRemoved = append(rep.MarksRemoved, badMarks...)
	slices.Sort(rep.MarksRemoved)
	if !opts.DryRun {
		for _, name := range rep.MarksRemoved {
			if err := r.Store().Remove(ctx, backend.Handle{Type: backend.Mark, Name: name}); err != nil && !errors.Is(err, backend.ErrNotExist) {
				if ctx.Err() != nil {
					return rep, ctx.Err()
				}
				log.Warn("mark kept", "mark", name, "err", err)
			}
		}
	}
	rep.LocksRemoved, err = removeStaleLocks(ctx, r, now, deadline, opts.DryRun, log)
	if err != nil {
		return rep, err
	}
	return rep, nil
}

// candidates are the packs in the store or an index that no snapshot needs,
// except unindexed packs whose header is unreadable (their contents are
// unknown, so they are never deleted).
func (u *usage) candidates() []format.ID {
	set := map[format.ID]bool{}
	for p := range u.inv.Disk {
		if _, bad := u.inv.BadHeaders[p]; !bad && !u.used[p] {
			set[p] = true
		}
	}
	for p := range u.inv.Indexed {
		if !u.used[p] {
			set[p] = true
		}
	}
	return sortedIDs(set)
}

// computeUsage reads the inventory and walks every snapshot. A blob stored
// more than once needs only its copies in unmarked, indexed packs when it
// has any: a backup that opened after a mark stores such blobs again (repo
// excludes marked packs from deduplication), and the marked copy is then
// garbage. Otherwise every stored copy is kept.
func computeUsage(ctx context.Context, r *repo.Repository, marked map[format.ID]time.Time) (*usage, error) {
	inv, err := check.ReadInventory(ctx, r, 2)
	if err != nil {
		return nil, err
	}
	locks, err := r.Store().Locks(ctx)
	if err != nil {
		return nil, fmt.Errorf("retention: lock records: %w", err)
	}
	names, err := snapshotNames(ctx, r)
	if err != nil {
		return nil, err
	}
	u := &usage{inv: inv, snaps: map[string]bool{}, used: map[format.ID]bool{}, miss: map[format.ID]bool{}, locks: locks}
	need := func(b format.ID) {
		var stored, unmarked []format.ID
		for _, l := range inv.Lookup(b) {
			if _, ok := inv.Disk[l.Pack]; !ok {
				continue
			}
			stored = append(stored, l.Pack)
			if _, ok := marked[l.Pack]; !ok && inv.IsIndexed(l) {
				unmarked = append(unmarked, l.Pack)
			}
		}
		if len(unmarked) > 0 {
			stored = unmarked
		}
		if len(stored) == 0 {
			u.miss[b] = true
		}
		for _, p := range stored {
			u.used[p] = true
		}
	}
	seen := map[format.ID]bool{}
	var stack []format.ID
	for _, n := range names {
		id, err := format.ParseID(n)
		if err != nil {
			continue
		}
		sn, err := r.LoadSnapshot(ctx, id)
		if err != nil {
			if errors.Is(err, backend.ErrNotExist) {
				continue // forgotten since the listing
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("%w: %w", ErrUnsafe, err)
		}
		u.snaps[n] = true
		stack = append(stack, sn.Tree)
	}
	for len(stack) > 0 {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		id := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[id] {
			continue
		}
		seen[id] = true
		need(id)
		data, err := inv.LoadBlob(ctx, r, pack.Tree, id)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("%w: tree %s: %w", ErrUnsafe, id, err)
		}
		t, err := snapshot.DecodeTree(data)
		if err != nil {
			return nil, fmt.Errorf("%w: tree %s: %w", ErrUnsafe, id, err)
		}
		for _, n := range t.Nodes {
			for _, b := range n.Content {
				need(b)
			}
			if n.Subtree != nil {
				stack = append(stack, *n.Subtree)
			}
		}
	}
	return u, nil
}

func snapshotNames(ctx context.Context, r *repo.Repository) ([]string, error) {
	var names []string
	err := r.Store().List(ctx, backend.Snapshot, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return ctx.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("retention: list snapshots: %w", err)
	}
	return names, nil
}

// loadMarks returns the readable marks by name, and the names of unreadable
// ones (which protect nothing and would stop repo.Open: they are removed).
func loadMarks(ctx context.Context, r *repo.Repository) (map[string]format.Mark, []string, error) {
	var names []string
	if err := r.Store().List(ctx, backend.Mark, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return ctx.Err()
	}); err != nil {
		return nil, nil, fmt.Errorf("retention: list marks: %w", err)
	}
	marks := map[string]format.Mark{}
	var bad []string
	for _, n := range names {
		data, err := r.Store().Load(ctx, backend.Handle{Type: backend.Mark, Name: n}, 0, 0)
		if err != nil {
			if errors.Is(err, backend.ErrNotExist) {
				continue
			}
			return nil, nil, fmt.Errorf("retention: load mark %s: %w", n, err)
		}
		var m format.Mark
		if format.Hash(data).String() != n || json.Unmarshal(data, &m) != nil || m.Time.IsZero() {
			bad = append(bad, n)
			continue
		}
		marks[n] = m
	}
	return marks, bad, nil
}

// lockedPacks maps each pack a live lock record lists to a description.
func lockedPacks(locks []format.LockRecord, now time.Time) map[format.ID]string {
	out := map[format.ID]string{}
	for _, l := range locks {
		if !l.Live(now) {
			continue
		}
		for _, p := range l.Packs {
			out[p] = fmt.Sprintf("needed by snapshot %s, locked until %s", l.Snapshot, l.Until.Format(time.RFC3339))
		}
	}
	return out
}

// removeStaleLocks removes lock records that have expired, whose snapshot
// no longer exists, and that were written before deadline.
func removeStaleLocks(ctx context.Context, r *repo.Repository, now, deadline time.Time, dryRun bool, log *slog.Logger) ([]string, error) {
	names, err := snapshotNames(ctx, r)
	if err != nil {
		return nil, err
	}
	present := map[string]bool{}
	for _, n := range names {
		present[n] = true
	}
	var lockNames []string
	if err := r.Store().List(ctx, backend.Lock, func(fi backend.Info) error {
		lockNames = append(lockNames, fi.Name)
		return ctx.Err()
	}); err != nil {
		return nil, fmt.Errorf("retention: list locks: %w", err)
	}
	slices.Sort(lockNames)
	var removed []string
	for _, n := range lockNames {
		data, err := r.Store().Load(ctx, backend.Handle{Type: backend.Lock, Name: n}, 0, 0)
		if err != nil {
			if ctx.Err() != nil {
				return removed, ctx.Err()
			}
			continue
		}
		rec, err := format.ParseLockRecord(data)
		if err != nil || rec.Live(now) || present[rec.Snapshot.String()] || rec.Time.After(deadline) {
			continue
		}
		if !dryRun {
			if err := r.Store().Remove(ctx, backend.Handle{Type: backend.Lock, Name: n}); err != nil {
				if ctx.Err() != nil {
					return removed, ctx.Err()
				}
				log.Warn("lock record kept", "lock", n, "err", err)
				continue
			}
		}
		removed = append(removed, n)
	}
	return removed, nil
}

func sortedIDs(m map[format.ID]bool) []format.ID {
	out := make([]format.ID, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	check.SortIDs(out)
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
