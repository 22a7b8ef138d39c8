package restorer

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// entry is one name to create, in walk (pre-)order, so that a directory
// always comes before its contents.
type entry struct {
	path string // inside the snapshot
	abs  string // on disk
	node *snapshot.Node
	file int32 // index in plan.files for the first name of a regular file, else -1
	link int32 // for a further name of a hard-linked inode: the entry it links to, else -1
}

// fileState tracks one regular file (one inode) while its content arrives.
type fileState struct {
	entry      int32
	contentLen int64        // sum of the content blobs' lengths that are known
	remaining  atomic.Int64 // blob uses not yet written (or given up)
	failed     atomic.Bool  // listed in the failures
	missing    atomic.Bool  // could not be created: skip its writes
}

// blobUse is one place a blob's plaintext goes.
type blobUse struct {
	file int32
	off  int64
}

type blobPlan struct {
	loc  repo.Location
	uses []blobUse
}

// span is one contiguous range of a pack, loaded with a single Store.Load.
type span struct {
	pack       repo.ID
	start, end int64
	blobs      []*blobPlan // sorted by offset
}

const (
	// maxSpan caps one load: 16 MiB is one default pack, so a full restore
	// reads most packs whole, while Workers loads in flight stay within
	// Workers × 16 MiB of memory.
	maxSpan = 16 << 20
	// maxGap is the largest run of unwanted bytes read to join two wanted
	// blobs into one load. Reading 1 MiB more from a disk or over a LAN costs
	// about what a further request costs.
	maxGap = 1 << 20
)

type plan struct {
	entries []entry
	files   []*fileState
	blobs   map[repo.ID]*blobPlan
	spans   []span
	bytes   int64 // total size of the files
}

type devIno struct{ dev, ino uint64 }

// planner walks the selected trees and builds a plan.
type planner struct {
	r       *repo.Repository
	m       *matcher
	workers int
	target  string
	fail    func(path string, err error)

	mu      sync.Mutex
	trees   map[repo.ID]*snapshot.Tree
	treeErr map[repo.ID]error

	p     *plan
	links map[devIno]int32
}

// makePlan loads the trees below root that the matcher needs, in parallel
// one depth at a time, then lays out entries, files and pack spans. Only a
// failure to read the root tree (or ctx ending) is returned; other damage
// is reported through fail and the rest is planned.
func makePlan(ctx context.Context, r *repo.Repository, root repo.ID, m *matcher, workers int, target string, fail func(string, error)) (*plan, error) {
	pl := &planner{r: r, m: m, workers: workers, target: target, fail: fail,
		trees: map[repo.ID]*snapshot.Tree{}, treeErr: map[repo.ID]error{},
		p: &plan{blobs: map[repo.ID]*blobPlan{}}, links: map[devIno]int32{}}
	if err := pl.loadTrees(ctx, root); err != nil {
		return nil, err
	}
	if err := pl.treeErr[root]; err != nil {
		return nil, fmt.Errorf("restorer: root tree %s: %w", root, err)
	}
	pl.emit(root, "", nil, m.all())
	pl.layoutSpans()
	return pl.p, nil
}

type pendingTree struct {
	id    repo.ID
	elems []string
	sel   bool
}

func (pl *planner) loadTrees(ctx context.Context, root repo.ID) error {
	level := []pendingTree{{id: root, sel: pl.m.all()}}
	for len(level) > 0 {
		var todo []repo.ID
		seen := map[repo.ID]bool{}
		for _, pt := range level {
			if _, ok := pl.trees[pt.id]; ok || seen[pt.id] || pl.treeErr[pt.id] != nil {
				continue
			}
			seen[pt.id] = true
			todo = append(todo, pt.id)
		}
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(pl.workers)
		for _, id := range todo {
			g.Go(func() error {
				t, err := pl.r.LoadTree(gctx, id)
				if err == nil {
					err = checkTree(t)
				}
				if err != nil && ctx.Err() != nil {
					return ctx.Err()
				}
				pl.mu.Lock()
				defer pl.mu.Unlock()
				if err != nil {
					pl.treeErr[id] = err
				} else {
					pl.trees[id] = t
				}
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
		var next []pendingTree
		for _, pt := range level {
			t := pl.trees[pt.id]
			if t == nil {
				continue
			}
			for _, n := range t.Nodes {
				if n.Type != snapshot.Dir {
					continue
				}
				elems := append(pt.elems[:len(pt.elems):len(pt.elems)], n.Name)
				sel := pt.sel || pl.m.selects(elems)
				if sel || pl.m.mayContain(elems) {
					next = append(next, pendingTree{id: *n.Subtree, elems: elems, sel: sel})
				}
			}
		}
		level = next
	}
	return nil
}

// checkTree rejects trees whose names repeat: two nodes of one name would
// let a symlink be created where a later node expects a directory.
// DecodeTree already rejected names that are not one path element.
func checkTree(t *snapshot.Tree) error {
	for i := 1; i < len(t.Nodes); i++ {
		if t.Nodes[i-1].Name >= t.Nodes[i].Name {
			return fmt.Errorf("%w: tree has unsorted or duplicate name %q", repo.ErrDamaged, t.Nodes[i].Name)
		}
	}
	return nil
}

// emit appends the selected entries below tree id (at dir) in walk order and
// reports whether it appended anything.
func (pl *planner) emit(id repo.ID, dir string, elems []string, sel bool) bool {
	t := pl.trees[id]
	if t == nil {
		if err := pl.treeErr[id]; err != nil {
			pl.fail(dir, fmt.Errorf("read directory: %w", err))
			return true
		}
		return false // not loaded: nothing below can be selected
	}
	any := false
	for _, n := range t.Nodes {
		p := n.Name
		if dir != "" {
			p = dir + "/" + n.Name
		}
		celems := append(elems[:len(elems):len(elems)], n.Name)
		csel := sel || pl.m.selects(celems)
		if n.Type == snapshot.Dir {
			if !csel && !pl.m.mayContain(celems) {
				continue
			}
			mark := len(pl.p.entries)
			pl.add(p, n)
			if !pl.emit(*n.Subtree, p, celems, csel) && !csel {
				pl.p.entries = pl.p.entries[:mark]
				continue
			}
			any = true
			continue
		}
		if csel {
			pl.add(p, n)
			any = true
		}
	}
	return any
}

func (pl *planner) add(p string, n *snapshot.Node) {
	e := entry{path: p, abs: joinTarget(pl.target, p), node: n, file: -1, link: -1}
	idx := int32(len(pl.p.entries))
	if n.Type == snapshot.File {
		key := devIno{n.Device, n.Inode}
		if first, ok := pl.links[key]; ok && n.Links > 1 {
			e.link = first
			pl.p.entries = append(pl.p.entries, e)
			return
		}
		if n.Links > 1 && (n.Inode != 0 || n.Device != 0) {
			pl.links[key] = idx
		}
		e.file = pl.addFile(idx, p, n)
	}
	pl.p.entries = append(pl.p.entries, e)
}

func (pl *planner) addFile(entryIdx int32, p string, n *snapshot.Node) int32 {
	fi := int32(len(pl.p.files))
	fs := &fileState{entry: entryIdx}
	pl.p.files = append(pl.p.files, fs)
	pl.p.bytes += int64(n.Size)
	var off int64
	for _, id := range n.Content {
		loc, ok := pl.r.Index().Lookup(id)
		if !ok || loc.Type != pack.Data {
			// Without the blob's length the offsets of the blobs after it are
			// unknown: restore what comes before, report the file.
			pl.fail(p, fmt.Errorf("data blob %s is not in the index", id))
			fs.failed.Store(true)
			break
		}
		bp := pl.p.blobs[id]
		if bp == nil {
			bp = &blobPlan{loc: loc}
			pl.p.blobs[id] = bp
		}
		bp.uses = append(bp.uses, blobUse{file: fi, off: off})
		fs.remaining.Add(1)
		off += int64(loc.RawLength)
	}
	fs.contentLen = off
	return fi
}

// layoutSpans groups the planned blobs by pack and joins neighbours into
// loads of at most maxSpan bytes.
func (pl *planner) layoutSpans() {
	byPack := map[repo.ID][]*blobPlan{}
	for _, bp := range pl.p.blobs {
		byPack[bp.loc.Pack] = append(byPack[bp.loc.Pack], bp)
	}
	packs := make([]repo.ID, 0, len(byPack))
	for id := range byPack {
		packs = append(packs, id)
	}
	// Packs in order of their first use keep the restore roughly in file
	// order, which keeps writes sequential and files finishing early.
	first := map[repo.ID]int64{}
	for id, bps := range byPack {
		m := int64(1) << 62
		for _, bp := range bps {
			for _, u := range bp.uses {
				k := int64(pl.p.files[u.file].entry)<<32 | (u.off >> 20)
				m = min(m, k)
			}
		}
		first[id] = m
	}
	sort.Slice(packs, func(i, j int) bool {
		if first[packs[i]] != first[packs[j]] {
			return first[packs[i]] < first[packs[j]]
		}
		return packs[i].String() < packs[j].String()
	})
	for _, pid := range packs {
		bps := byPack[pid]
		sort.Slice(bps, func(i, j int) bool { return bps[i].loc.Offset < bps[j].loc.Offset })
		var cur *span
		for _, bp := range bps {
			start := int64(bp.loc.Offset)
			end := start + int64(bp.loc.Length)
			if cur != nil && start >= cur.end && start-cur.end <= maxGap && end-cur.start <= maxSpan {
				cur.end = end
				cur.blobs = append(cur.blobs, bp)
				continue
			}
			pl.p.spans = append(pl.p.spans, span{pack: pid, start: start, end: end, blobs: []*blobPlan{bp}})
			cur = &pl.p.spans[len(pl.p.spans)-1]
		}
	}
}
