// Package check verifies a vault from the client side and repairs its
// indexes: it names every damaged object (pack, index, snapshot, tree or
// data blob, and why) and every snapshot the damage reaches, and it can
// rebuild the index of packs that no readable index covers.
//
// Terms: a pack is "unindexed" when it is in the store but no readable index
// covers it, which is normal for a backup in progress and harmless until a
// snapshot needs one of its blobs; a snapshot is "affected" when any tree or
// content blob reachable from it is missing, damaged or only findable in an
// unindexed pack, and "intact" otherwise.
package check

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// Unreadable means the store failed to read an object it lists (an I/O
// error rather than wrong bytes).
const Unreadable Kind = "unreadable"

// Options tune Check.
type Options struct {
	// ReadData reads every pack whole: its hash against its name, its
	// header against the index, and every blob decrypted and checked.
	// Without it only indexes, snapshots and trees are read, and packs are
	// checked by listing (existence and size).
	ReadData bool
	// Workers is how many packs are read at once with ReadData. Two keep one
	// core decrypting while the other waits on the disk; more only seek.
	Workers int
	// Progress, if set, is called as packs are read with ReadData, with the
	// pack bytes read so far and in total; never by two goroutines at once.
	Progress func(done, total int64)
	// Now is the clock that decides which lock records are live (a live
	// lock whose snapshot is absent means a snapshot went missing). Nil
	// means time.Now.
	Now func() time.Time
	// Log receives notes; nil discards.
	Log *slog.Logger
}

// ApplyDefaults fills zero fields.
func (o *Options) ApplyDefaults() {
	if o.Workers <= 0 {
		o.Workers = 2
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Damage is one damaged or missing object.
type Damage struct {
	// Type is the object type ("pack", "index", "snapshot", "lock",
	// "mark") or, for a blob inside a pack, its blob type ("tree", "data").
	Type string
	// Name is the object's name or the blob's ID; empty when the object is
	// not known by name (an unparseable lock record listing).
	Name string
	// Pack holds a blob; zero for objects.
	Pack   format.ID
	Kind   Kind
	Detail string
}

func (d Damage) String() string {
	s := d.Type
	if d.Name != "" {
		s += " " + d.Name
	}
	if !d.Pack.IsZero() {
		s += " in pack " + d.Pack.String()
	}
	s += ": " + string(d.Kind)
	if d.Detail != "" {
		s += " (" + d.Detail + ")"
	}
	return s
}

// SnapshotStatus says whether one snapshot can be restored whole.
type SnapshotStatus struct {
	ID       format.ID
	Time     time.Time // the vault's time when known (repo.SnapshotInfo.When)
	Hostname string
	Paths    []string
	// Problems describe what is damaged, at most maxProblems; nil when the
	// snapshot is intact.
	Problems []string
}

// Intact reports whether every tree and blob of the snapshot checked out.
func (s SnapshotStatus) Intact() bool { return len(s.Problems) == 0 }

// maxProblems bounds the problems listed per snapshot: a lost pack can
// reach thousands of blobs, and the first few say what happened.
const maxProblems = 20

// Counts says how much was checked.
type Counts struct {
	Indexes, Packs, Snapshots, Trees, DataBlobs int
	BytesRead                                   int64
}

// Report is the outcome of Check.
type Report struct {
	ReadData bool
	Counts   Counts
	// Damage lists every damaged object, sorted by type and name.
	Damage []Damage
	// Snapshots lists every snapshot, readable or not, oldest first.
	Snapshots []SnapshotStatus
	// Unindexed packs are in the store but no readable index covers them:
	// a backup in progress, one killed before writing its index, or a lost
	// index (RebuildIndex repairs it). Not damage by itself.
	Unindexed []format.ID
	// Leftover packs are marked as garbage and missing from the store,
	// yet an index still names them: a prune run stopped before rewriting
	// its indexes. Not damage unless a snapshot needs them.
	Leftover []format.ID
}

// OK reports whether nothing is damaged.
func (r *Report) OK() bool { return len(r.Damage) == 0 }

// Affected returns the snapshots that cannot be restored whole.
func (r *Report) Affected() []SnapshotStatus {
	var out []SnapshotStatus
	for _, s := range r.Snapshots {
		if !s.Intact() {
			out = append(out, s)
		}
	}
	return out
}

// Intact returns the snapshots that checked out whole.
func (r *Report) Intact() []SnapshotStatus {
	var out []SnapshotStatus
	for _, s := range r.Snapshots {
		if s.Intact() {
			out = append(out, s)
		}
	}
	return out
}

// Object type names used in Damage.Type, for people rather than folders.
const (
	objPack     = "pack"
	objIndex    = "index"
	objSnapshot = "snapshot"
	objLock     = "lock"
	objMark     = "mark"
)

type blobKey struct {
	pack format.ID
	off  uint32
}

type checker struct {
	r    *repo.Repository
	opts Options
	inv  *Inventory
	rep  *Report

	mu     sync.Mutex // guards rep.Damage, seen and badAt during readData
	seen   map[string]bool
	badAt  map[blobKey]string
	gone   map[format.ID]bool  // indexed packs missing from the store
	marked map[format.ID]bool  // packs listed in a mark
	short  map[format.ID]int64 // truncated packs: their actual size

	trees   map[format.ID]*snapshot.Tree
	treeErr map[format.ID]string
	data    map[format.ID]bool
	memo    map[format.ID][]string
}

// Check verifies r's store; see Options for how deep. Damage is reported in
// the Report, never as an error: the error is for failures to talk to the
// store at all, or ctx ending.
func Check(ctx context.Context, r *repo.Repository, opts Options) (*Report, error) {
	opts.ApplyDefaults()
	inv, err := ReadInventory(ctx, r, opts.Workers)
	if err != nil {
		return nil, err
	}
	c := &checker{r: r, opts: opts, inv: inv, rep: &Report{ReadData: opts.ReadData},
		seen: map[string]bool{}, badAt: map[blobKey]string{}, gone: map[format.ID]bool{},
		marked: map[format.ID]bool{}, short: map[format.ID]int64{},
		trees: map[format.ID]*snapshot.Tree{}, treeErr: map[format.ID]string{},
		data: map[format.ID]bool{}, memo: map[format.ID][]string{}}

	c.checkIndexes()
	if err := c.checkMarks(ctx); err != nil {
		return nil, err
	}
	c.checkPacks()
	snaps, err := c.checkSnapshots(ctx)
	if err != nil {
		return nil, err
	}
	if err := c.walk(ctx, snaps); err != nil {
		return nil, err
	}
	if opts.ReadData {
		if err := c.readData(ctx); err != nil {
			return nil, err
		}
	}
	for i := range c.rep.Snapshots {
		s := &c.rep.Snapshots[i]
		if sn, ok := snaps[s.ID]; ok {
			s.Problems = capProblems(c.treeProblems(sn.Tree))
		}
	}
	c.rep.Counts.Trees = len(c.trees) + len(c.treeErr)
	c.rep.Counts.DataBlobs = len(c.data)
	slices.SortFunc(c.rep.Damage, func(a, b Damage) int {
		return cmp.Or(cmp.Compare(a.Type, b.Type), cmp.Compare(a.Name, b.Name),
			slices.Compare(a.Pack[:], b.Pack[:]), cmp.Compare(a.Kind, b.Kind))
	})
	for _, d := range c.rep.Damage {
		opts.Log.Warn("damaged", "object", d.Type, "name", d.Name, "kind", string(d.Kind), "detail", d.Detail)
	}
	return c.rep, nil
}

// add records d once per (type, name, pack, kind).
func (c *checker) add(d Damage) {
	k := d.Type + "/" + d.Name + "/" + d.Pack.String() + "/" + string(d.Kind)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.seen[k] {
		c.seen[k] = true
		c.rep.Damage = append(c.rep.Damage, d)
	}
}

func kindOr(err error, k Kind) Kind {
	if kk := KindOf(err); kk != "" {
		return kk
	}
	return k
}

func (c *checker) checkIndexes() {
	c.rep.Counts.Indexes = len(c.inv.Indexes) + len(c.inv.BadIndexes)
	for _, n := range sortedKeys(c.inv.BadIndexes) {
		bi := c.inv.BadIndexes[n]
		detail := bi.Err.Error()
		if len(bi.Packs) > 0 {
			detail += fmt.Sprintf("; its header lists %d packs", len(bi.Packs))
		}
		c.add(Damage{Type: objIndex, Name: n, Kind: kindOr(bi.Err, Malformed), Detail: detail})
	}
}

func (c *checker) checkMarks(ctx context.Context) error {
	names, err := listNames(ctx, c.r, backend.Mark)
	if err != nil {
		return err
	}
	for _, n := range names {
		data, err := c.r.Store().Load(ctx, backend.Handle{Type: backend.Mark, Name: n}, 0, 0)
		if err != nil {
			if errors.Is(err, backend.ErrNotExist) {
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			c.add(Damage{Type: objMark, Name: n, Kind: Unreadable, Detail: err.Error()})
			continue
		}
		if format.Hash(data).String() != n {
			c.add(Damage{Type: objMark, Name: n, Kind: HashMismatch})
			continue
		}
		var m format.Mark
		if err := json.Unmarshal(data, &m); err != nil {
			c.add(Damage{Type: objMark, Name: n, Kind: Malformed, Detail: err.Error()})
			continue
		}
		for _, p := range m.Packs {
			c.marked[p] = true
		}
	}
	return nil
}

func (c *checker) checkPacks() {
	c.rep.Counts.Packs = len(c.inv.Disk)
	for _, id := range sortedIDs(c.inv.Indexed) {
		blobs := c.inv.Indexed[id]
		size, ok := c.inv.Disk[id]
		want := packSize(blobs)
		switch {
		case !ok && c.marked[id]:
			c.gone[id] = true
			c.rep.Leftover = append(c.rep.Leftover, id)
		case !ok:
			c.gone[id] = true
			c.add(Damage{Type: objPack, Name: id.String(), Kind: Missing,
				Detail: fmt.Sprintf("an index lists %d blobs in it", len(blobs))})
		case size < want:
			c.short[id] = size
			c.add(Damage{Type: objPack, Name: id.String(), Kind: Truncated,
				Detail: fmt.Sprintf("%d bytes, the index implies %d", size, want)})
		case size > want:
			c.add(Damage{Type: objPack, Name: id.String(), Kind: SizeMismatch,
				Detail: fmt.Sprintf("%d bytes, the index implies %d", size, want)})
		}
	}
	c.rep.Unindexed = append(sortedIDs(c.inv.Unindexed), sortedIDs(c.inv.BadHeaders)...)
	SortIDs(c.rep.Unindexed)
	for _, id := range sortedIDs(c.inv.BadHeaders) {
		err := c.inv.BadHeaders[id]
		c.add(Damage{Type: objPack, Name: id.String(), Kind: kindOr(err, Malformed),
			Detail: "no index covers it and its header is unreadable: " + err.Error()})
	}
}

// checkSnapshots loads every snapshot object and returns the readable ones.
// It fills rep.Snapshots, including damaged snapshots and snapshots a live
// lock record names that are missing.
func (c *checker) checkSnapshots(ctx context.Context) (map[format.ID]*snapshot.Snapshot, error) {
	names, err := listNames(ctx, c.r, backend.Snapshot)
	if err != nil {
		return nil, err
	}
	locks, err := c.r.Store().Locks(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		c.add(Damage{Type: objLock, Kind: Malformed, Detail: err.Error()})
	}
	bySnap := map[format.ID][]format.LockRecord{}
	for _, l := range locks {
		bySnap[l.Snapshot] = append(bySnap[l.Snapshot], l)
	}
	info := func(id format.ID, sn *snapshot.Snapshot) repo.SnapshotInfo {
		si := repo.SnapshotInfo{ID: id, Snapshot: sn}
		for _, l := range bySnap[id] {
			if l.Reason == format.ReasonCommit && (si.VaultTime.IsZero() || l.Time.Before(si.VaultTime)) {
				si.VaultTime = l.Time
			}
			if l.Until.After(si.LockUntil) {
				si.LockUntil = l.Until
			}
		}
		return si
	}

	good := map[format.ID]*snapshot.Snapshot{}
	present := map[format.ID]bool{}
	for _, n := range names {
		id, err := format.ParseID(n)
		if err != nil {
			continue
		}
		present[id] = true
		sn, kind, err := c.loadSnapshot(ctx, id)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			c.add(Damage{Type: objSnapshot, Name: n, Kind: kind, Detail: err.Error()})
			si := info(id, &snapshot.Snapshot{})
			c.rep.Snapshots = append(c.rep.Snapshots, SnapshotStatus{ID: id, Time: si.When(),
				Problems: []string{fmt.Sprintf("snapshot object %s", kind)}})
			continue
		}
		good[id] = sn
		si := info(id, sn)
		c.rep.Snapshots = append(c.rep.Snapshots, SnapshotStatus{ID: id, Time: si.When(), Hostname: sn.Hostname, Paths: sn.Paths})
	}
	now := c.opts.Now()
	for _, id := range sortedIDs(bySnap) {
		if present[id] {
			continue
		}
		si := info(id, &snapshot.Snapshot{})
		if !si.Locked(now) {
			continue // forgotten after its lock expired; prune clears the records
		}
		c.add(Damage{Type: objSnapshot, Name: id.String(), Kind: Missing,
			Detail: fmt.Sprintf("its lock record is live until %s (or its commit stopped after the lock was written)",
				si.LockUntil.Format(time.RFC3339))})
		c.rep.Snapshots = append(c.rep.Snapshots, SnapshotStatus{ID: id, Time: si.When(),
			Problems: []string{"snapshot object missing"}})
	}
	slices.SortFunc(c.rep.Snapshots, func(a, b SnapshotStatus) int {
		return cmp.Or(a.Time.Compare(b.Time), slices.Compare(a.ID[:], b.ID[:]))
	})
	c.rep.Counts.Snapshots = len(c.rep.Snapshots)
	return good, nil
}

func (c *checker) loadSnapshot(ctx context.Context, id format.ID) (*snapshot.Snapshot, Kind, error) {
	data, err := c.r.Store().Load(ctx, backend.Handle{Type: backend.Snapshot, Name: id.String()}, 0, 0)
	if err != nil {
		if errors.Is(err, backend.ErrNotExist) {
			return nil, Missing, err
		}
		return nil, Unreadable, err
	}
	if got := format.Hash(data); got != id {
		return nil, HashMismatch, fmt.Errorf("%d bytes hash to %s", len(data), got.String()[:12])
	}
	plain, err := c.r.Key().Open(nil, data)
	if err != nil {
		return nil, Unauthenticated, err
	}
	sn, err := snapshot.Decode(plain)
	if err != nil {
		return nil, Malformed, err
	}
	return sn, "", nil
}

// walk loads every tree reachable from snaps, once each.
func (c *checker) walk(ctx context.Context, snaps map[format.ID]*snapshot.Snapshot) error {
	var stack []format.ID
	for _, id := range sortedIDs(snaps) {
		stack = append(stack, snaps[id].Tree)
	}
	for len(stack) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		id := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if _, ok := c.trees[id]; ok {
			continue
		}
		if _, ok := c.treeErr[id]; ok {
			continue
		}
		t, kind, err := c.loadTree(ctx, id)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			c.treeErr[id] = fmt.Sprintf("tree %s: %s", id.String()[:12], kind)
			d := Damage{Type: pack.Tree.String(), Name: id.String(), Kind: kind, Detail: err.Error()}
			if locs := c.inv.Lookup(id); len(locs) > 0 {
				d.Pack = locs[0].Pack
			}
			c.add(d)
			continue
		}
		c.trees[id] = t
		for _, n := range t.Nodes {
			for _, b := range n.Content {
				c.data[b] = true
			}
			if n.Subtree != nil {
				stack = append(stack, *n.Subtree)
			}
		}
	}
	return nil
}

func (c *checker) loadTree(ctx context.Context, id format.ID) (*snapshot.Tree, Kind, error) {
	data, err := c.inv.LoadBlob(ctx, c.r, pack.Tree, id)
	if err != nil {
		return nil, kindOr(err, Unreadable), err
	}
	t, err := snapshot.DecodeTree(data)
	if err != nil {
		return nil, Malformed, err
	}
	return t, "", nil
}

// readData reads every pack in the store whole.
func (c *checker) readData(ctx context.Context) error {
	var total int64
	for _, s := range c.inv.Disk {
		total += s
	}
	var (
		pmu  sync.Mutex // serializes Progress calls, so callers need no lock
		done int64
	)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(c.opts.Workers)
	for _, id := range sortedIDs(c.inv.Disk) {
		g.Go(func() error {
			n, err := c.readPack(gctx, id)
			pmu.Lock()
			defer pmu.Unlock()
			done += n
			if c.opts.Progress != nil {
				c.opts.Progress(done, total)
			}
			return err
		})
	}
	err := g.Wait()
	c.rep.Counts.BytesRead = done
	return err
}

func (c *checker) readPack(ctx context.Context, id format.ID) (int64, error) {
	h := backend.Handle{Type: backend.Pack, Name: id.String()}
	data, err := c.r.Store().Load(ctx, h, 0, 0)
	if err != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		if !errors.Is(err, backend.ErrNotExist) { // vanished since the listing: a concurrent prune
			c.add(Damage{Type: objPack, Name: id.String(), Kind: Unreadable, Detail: err.Error()})
		}
		return 0, nil
	}
	pname := id.String()
	_, isShort := c.short[id]
	if got := format.Hash(data); got != id && !isShort {
		c.add(Damage{Type: objPack, Name: pname, Kind: HashMismatch,
			Detail: fmt.Sprintf("%d bytes hash to %s", len(data), got.String()[:12])})
	}
	hdr, herr := pack.Parse(c.r.Key(), data)
	if herr != nil && !isShort {
		c.add(Damage{Type: objPack, Name: pname, Kind: KindOf(headerErr(id, herr)),
			Detail: "header: " + herr.Error()})
	}
	entries, indexed := c.inv.Indexed[id]
	if !indexed {
		entries = hdr
	} else if herr == nil {
		if diff := compareBlobs(hdr, entries); diff != "" {
			c.add(Damage{Type: objPack, Name: pname, Kind: IndexMismatch, Detail: diff})
		}
	}
	for _, b := range entries {
		if err := ctx.Err(); err != nil {
			return int64(len(data)), err
		}
		end := int64(b.Offset) + int64(b.Length)
		if end > int64(len(data)) {
			c.mu.Lock()
			c.badAt[blobKey{id, b.Offset}] = fmt.Sprintf("pack %s truncated", pname[:12])
			c.mu.Unlock()
			continue
		}
		loc := repo.Location{Pack: id, Blob: b}
		if _, err := decodeAt(c.r, loc, data[b.Offset:end]); err != nil {
			kind := KindOf(err)
			c.mu.Lock()
			c.badAt[blobKey{id, b.Offset}] = fmt.Sprintf("%s blob %s in pack %s: %s", b.Type, format.ID(b.ID).String()[:12], pname[:12], kind)
			c.mu.Unlock()
			c.add(Damage{Type: b.Type.String(), Name: format.ID(b.ID).String(), Pack: id, Kind: kind, Detail: err.Error()})
		}
	}
	return int64(len(data)), nil
}

// compareBlobs describes the first difference between a pack's header and
// its index entries, or returns "".
func compareBlobs(hdr, idx []pack.Blob) string {
	if len(hdr) != len(idx) {
		return fmt.Sprintf("header lists %d blobs, index %d", len(hdr), len(idx))
	}
	byOff := make(map[uint32]pack.Blob, len(hdr))
	for _, b := range hdr {
		byOff[b.Offset] = b
	}
	for _, b := range idx {
		if h, ok := byOff[b.Offset]; !ok || h != b {
			return fmt.Sprintf("blob %s at offset %d differs", format.ID(b.ID).String()[:12], b.Offset)
		}
	}
	return ""
}

// locProblem says why the blob at loc cannot be read, or returns "".
func (c *checker) locProblem(loc repo.Location, t pack.BlobType) string {
	switch {
	case c.gone[loc.Pack]:
		if c.marked[loc.Pack] {
			c.add(Damage{Type: objPack, Name: loc.Pack.String(), Kind: Missing,
				Detail: "a prune run deleted it as garbage, yet a snapshot needs it"})
		}
		return fmt.Sprintf("pack %s missing", loc.Pack.String()[:12])
	case loc.Type != t:
		return fmt.Sprintf("blob %s is %s, not %s", format.ID(loc.ID).String()[:12], loc.Type, t)
	}
	if size, ok := c.short[loc.Pack]; ok && int64(loc.Offset)+int64(loc.Length) > size {
		return fmt.Sprintf("pack %s truncated", loc.Pack.String()[:12])
	}
	if p := c.badAt[blobKey{loc.Pack, loc.Offset}]; p != "" {
		return p
	}
	return ""
}

// blobProblem says why blob id cannot be restored, or returns "". It
// records damage for blobs found nowhere and for unindexed packs that
// snapshots need.
func (c *checker) blobProblem(id format.ID, t pack.BlobType) string {
	locs := c.inv.Lookup(id)
	if len(locs) == 0 {
		c.add(Damage{Type: t.String(), Name: id.String(), Kind: Missing, Detail: "named by a tree, in no index or pack"})
		return fmt.Sprintf("%s blob %s missing", t, id.String()[:12])
	}
	first := ""
	var unindexed *format.ID
	for _, loc := range locs {
		if p := c.locProblem(loc, t); p != "" {
			if first == "" {
				first = p
			}
			continue
		}
		if c.inv.IsIndexed(loc) {
			return ""
		}
		if unindexed == nil {
			p := loc.Pack
			unindexed = &p
		}
	}
	if unindexed != nil {
		c.add(Damage{Type: objPack, Name: unindexed.String(), Kind: Unindexed,
			Detail: "snapshots need its blobs but no index covers it (an index was lost?): rebuild the index"})
		return fmt.Sprintf("%s blob %s is only in pack %s, which no index covers", t, id.String()[:12], unindexed.String()[:12])
	}
	return first
}

// treeProblems lists what is wrong below tree id, memoized: trees are
// shared between snapshots and between directories.
func (c *checker) treeProblems(id format.ID) []string {
	if p, ok := c.memo[id]; ok {
		return p
	}
	c.memo[id] = nil // trees are content-addressed, so a cycle means forgery; stop it here
	var probs []string
	if e, bad := c.treeErr[id]; bad {
		probs = append(probs, e)
	} else if p := c.blobProblem(id, pack.Tree); p != "" {
		probs = append(probs, p)
	}
	if t := c.trees[id]; t != nil {
		for _, n := range t.Nodes {
			for _, b := range n.Content {
				if p := c.blobProblem(b, pack.Data); p != "" {
					probs = append(probs, p)
				}
			}
			if n.Subtree != nil {
				probs = append(probs, c.treeProblems(*n.Subtree)...)
			}
		}
	}
	probs = capProblems(probs)
	c.memo[id] = probs
	return probs
}

func capProblems(p []string) []string {
	if len(p) == 0 {
		return nil
	}
	seen := map[string]bool{}
	out := p[:0:0]
	for _, s := range p {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	if len(out) > maxProblems {
		out = append(out[:maxProblems], fmt.Sprintf("and %d more", len(out)-maxProblems))
	}
	return out
}
