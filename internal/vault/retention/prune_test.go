package retention

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/archiver"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/check"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// clock is the vault's clock and prune's, moved by tests. It starts at the
// real time because the local backend stamps files with it.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type env struct {
	dir   string
	store *guard.Store
	r     *repo.Repository
	clk   *clock
}

// newEnv is repotest.New with the vault clock under the test's control.
func newEnv(t *testing.T, minRetention time.Duration) *env {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	be, err := local.Create(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	clk := &clock{t: time.Now().UTC()}
	gs := guard.New(be, guard.Options{Now: clk.Now})
	r, err := repo.Init(ctx, gs.Session(guard.Admin), repotest.Password, repo.InitOptions{MinRetention: minRetention}, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return &env{dir: dir, store: gs, r: r, clk: clk}
}

func (e *env) reopen(t *testing.T) *repo.Repository {
	t.Helper()
	r, err := repo.Open(context.Background(), e.store.Session(guard.Admin), repotest.Password, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func (e *env) prune(t *testing.T, r *repo.Repository, dryRun bool) *PruneReport {
	t.Helper()
	rep, err := Prune(context.Background(), r, PruneOptions{Now: e.clk.Now, DryRun: dryRun})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func source(t *testing.T, files map[string]int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "src")
	for name, size := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size)
		rand.Read(b)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func backup(t *testing.T, r *repo.Repository, src string, opts archiver.Options) *archiver.Result {
	t.Helper()
	opts.NoParent = true
	res, err := archiver.Backup(context.Background(), r, []string{src}, opts)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func packsOnDisk(t *testing.T, dir string) []format.ID {
	t.Helper()
	var out []format.ID
	err := filepath.WalkDir(filepath.Join(dir, "data"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		id, err := format.ParseID(d.Name())
		if err != nil {
			return err
		}
		out = append(out, id)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	check.SortIDs(out)
	return out
}

// snapshotPacks returns the packs holding any blob of snapshot id, and
// checks on the way that every content blob reads whole.
func snapshotPacks(t *testing.T, r *repo.Repository, id format.ID) []format.ID {
	t.Helper()
	ctx := context.Background()
	sn, err := r.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	set := map[format.ID]bool{}
	var walk func(format.ID)
	walk = func(tid format.ID) {
		loc, ok := r.Index().Lookup(tid)
		if !ok {
			t.Fatalf("tree %s not in index", tid)
		}
		set[loc.Pack] = true
		tr, err := r.LoadTree(ctx, tid)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range tr.Nodes {
			for _, b := range n.Content {
				if _, err := r.LoadBlob(ctx, pack.Data, b); err != nil {
					t.Fatalf("snapshot %s: %v", id.String()[:12], err)
				}
				loc, _ := r.Index().Lookup(b)
				set[loc.Pack] = true
			}
			if n.Subtree != nil {
				walk(*n.Subtree)
			}
		}
	}
	walk(sn.Tree)
	return sortedIDs(set)
}

func minus(a, b []format.ID) []format.ID {
	var out []format.ID
	for _, x := range a {
		if !slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

func ids(s []format.ID) string {
	var b strings.Builder
	for _, id := range s {
		b.WriteString(id.String()[:12] + " ")
	}
	return b.String()
}

func sameIDs(t *testing.T, what string, got, want []format.ID) {
	t.Helper()
	got, want = slices.Clone(got), slices.Clone(want)
	check.SortIDs(got)
	check.SortIDs(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s = [%s], want [%s]", what, ids(got), ids(want))
	}
}

// verifyAll reopens the vault and runs a full check, which reads every pack
// and reports any snapshot that does not read whole.
func verifyAll(t *testing.T, e *env, wantSnapshots int) {
	t.Helper()
	r := e.reopen(t)
	if len(r.IndexErrors) != 0 {
		t.Fatalf("index errors: %v", r.IndexErrors)
	}
	rep, err := check.Check(context.Background(), r, check.Options{ReadData: true, Now: e.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || len(rep.Intact()) != wantSnapshots || len(rep.Leftover) != 0 {
		var b strings.Builder
		for _, d := range rep.Damage {
			b.WriteString(d.String() + "\n")
		}
		t.Fatalf("after prune: %d intact of %d, want %d; leftover %v; damage:\n%s",
			len(rep.Intact()), len(rep.Snapshots), wantSnapshots, rep.Leftover, b.String())
	}
}

func TestForgetLocked(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, time.Hour)
	a := backup(t, e.r, source(t, map[string]int{"f": 1000}), archiver.Options{}).ID
	b := backup(t, e.r, source(t, map[string]int{"g": 1000}), archiver.Options{LockFor: 48 * time.Hour}).ID

	// Both locked: nothing is removed, and each refusal says why.
	res, err := Forget(ctx, e.r, []format.ID{a, b})
	if !errors.Is(err, guard.ErrLocked) || len(res) != 2 || !res[0].Locked() || !res[1].Locked() {
		t.Fatalf("forget of locked snapshots: %+v, %v", res, err)
	}
	if snaps, _, _ := e.r.Snapshots(ctx); len(snaps) != 2 {
		t.Fatalf("%d snapshots left, want 2", len(snaps))
	}

	// After a's lock expires: b is refused, a is removed all the same.
	e.clk.Add(2 * time.Hour)
	res, err = Forget(ctx, e.r, []format.ID{b, a})
	if !errors.Is(err, guard.ErrLocked) || !res[0].Locked() || res[1].Err != nil {
		t.Fatalf("forget b, a: %+v, %v", res, err)
	}
	snaps, _, err := e.r.Snapshots(ctx)
	if err != nil || len(snaps) != 1 || snaps[0].ID != b {
		t.Fatalf("snapshots = %+v, %v; want only b", snaps, err)
	}
}

func TestPruneTwoPhase(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, time.Hour)
	srcA := source(t, map[string]int{"big": 1500 << 10, "sub/small": 100})
	a := backup(t, e.r, srcA, archiver.Options{}).ID
	b := backup(t, e.r, source(t, map[string]int{"other": 700 << 10}), archiver.Options{}).ID
	onlyA := minus(snapshotPacks(t, e.r, a), snapshotPacks(t, e.r, b))

	// A pack left by a backup killed before it wrote its index.
	data := []byte("orphaned chunk")
	w := pack.NewWriter(e.r.Key(), 0)
	w.Add(pack.Data, e.r.BlobID(data), 0, len(data), e.r.Key().Seal(nil, data))
	orphanBytes, _ := w.Finish()
	orphan := format.Hash(orphanBytes)
	if err := e.r.Store().Save(ctx, backend.Handle{Type: backend.Pack, Name: orphan.String()}, orphanBytes); err != nil {
		t.Fatal(err)
	}
	garbage := append(slices.Clone(onlyA), orphan)
	before := packsOnDisk(t, e.dir)

	e.clk.Add(2 * time.Hour) // a's lock expires
	if _, err := Forget(ctx, e.r, []format.ID{a}); err != nil {
		t.Fatal(err)
	}

	// First run: marks, deletes nothing.
	rep := e.prune(t, e.r, false)
	if len(rep.Deleted) != 0 {
		t.Fatalf("first prune deleted %s", ids(rep.Deleted))
	}
	sameIDs(t, "marked", rep.Marked, garbage)
	sameIDs(t, "packs on disk after the first prune", packsOnDisk(t, e.dir), before)

	// A backup opened after the mark does not deduplicate against marked
	// packs: backing up a's files again stores them again.
	r2 := e.reopen(t)
	again := backup(t, r2, srcA, archiver.Options{})
	if again.Summary.BlobsAdded == 0 {
		t.Errorf("a backup after the mark reused marked packs: %+v", again.Summary)
	}
	garbageNow := packsOnDisk(t, e.dir)

	// Within the grace period: nothing deleted, nothing marked twice.
	e.clk.Add(time.Hour)
	rep = e.prune(t, r2, false)
	if len(rep.Deleted) != 0 || len(rep.Marked) != 0 {
		t.Fatalf("prune in the grace period: deleted %s, marked %s", ids(rep.Deleted), ids(rep.Marked))
	}

	// After the grace period, a dry run says what a real run then does.
	e.clk.Add(24 * time.Hour)
	dry := e.prune(t, r2, true)
	sameIDs(t, "dry run deleted", dry.Deleted, garbage)
	sameIDs(t, "packs after the dry run", packsOnDisk(t, e.dir), garbageNow)

	rep = e.prune(t, r2, false)
	sameIDs(t, "deleted", rep.Deleted, garbage)
	sameIDs(t, "packs on disk", packsOnDisk(t, e.dir), minus(garbageNow, garbage))
	if rep.BytesFreed == 0 || len(rep.IndexesRemoved) == 0 || len(rep.MarksRemoved) != 1 || len(rep.LocksRemoved) != 1 {
		t.Errorf("report: freed %d, indexes removed %v, marks removed %v, locks removed %v",
			rep.BytesFreed, rep.IndexesRemoved, rep.MarksRemoved, rep.LocksRemoved)
	}
	verifyAll(t, e, 2) // b and the second backup of a's files

	// Nothing is left to do.
	rep = e.prune(t, e.reopen(t), false)
	if len(rep.Candidates) != 0 || rep.Mark != (format.ID{}) {
		t.Errorf("a prune after the cleanup found candidates %s", ids(rep.Candidates))
	}
}

func TestPruneKeepsPackNeededBetweenRuns(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, time.Hour)
	src := source(t, map[string]int{"big": 1200 << 10})
	a := backup(t, e.r, src, archiver.Options{}).ID
	packsA := snapshotPacks(t, e.r, a)
	e.clk.Add(2 * time.Hour)
	if _, err := Forget(ctx, e.r, []format.ID{a}); err != nil {
		t.Fatal(err)
	}
	// A client that opened the vault before the first prune run knows
	// nothing of its mark.
	early := e.reopen(t)
	rep := e.prune(t, e.r, false)
	sameIDs(t, "marked", rep.Marked, packsA)

	// It backs up the same files and so commits a snapshot needing every
	// marked pack.
	res := backup(t, early, src, archiver.Options{})
	if res.Summary.BlobsAdded != 0 {
		t.Fatalf("expected a fully deduplicated backup: %+v", res.Summary)
	}
	// Past the grace period and past that snapshot's lock, so only prune's
	// own reference walk protects the packs.
	e.clk.Add(25 * time.Hour)
	rep = e.prune(t, e.reopen(t), false)
	if len(rep.Deleted) != 0 {
		t.Fatalf("deleted %s, needed by snapshot %s", ids(rep.Deleted), res.ID)
	}
	if len(rep.MarksRemoved) != 1 {
		t.Errorf("the mark of packs needed again was not removed: %v", rep.MarksRemoved)
	}
	verifyAll(t, e, 1)
}

func TestPruneKeepsLockedPack(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, time.Hour)
	a := backup(t, e.r, source(t, map[string]int{"f": 800 << 10}), archiver.Options{LockFor: 10 * 24 * time.Hour}).ID
	b := backup(t, e.r, source(t, map[string]int{"g": 300 << 10}), archiver.Options{}).ID
	onlyA := minus(snapshotPacks(t, e.r, a), snapshotPacks(t, e.r, b))
	// The commit of a stopped after the vault wrote its lock record and
	// before the snapshot object: nothing references a's packs, yet a live
	// lock record lists them.
	if err := e.store.Backend().Remove(ctx, backend.Handle{Type: backend.Snapshot, Name: a.String()}); err != nil {
		t.Fatal(err)
	}
	rep := e.prune(t, e.r, false)
	sameIDs(t, "marked", rep.Marked, onlyA)

	e.clk.Add(25 * time.Hour)
	dry := e.prune(t, e.r, true)
	rep = e.prune(t, e.r, false)
	if len(rep.Deleted) != 0 || len(dry.Deleted) != 0 {
		t.Fatalf("deleted packs under a live lock: %s (dry run %s)", ids(rep.Deleted), ids(dry.Deleted))
	}
	for _, p := range onlyA {
		if !strings.Contains(rep.Kept[p], "locked") || !strings.Contains(dry.Kept[p], "locked") {
			t.Errorf("pack %s kept for %q (dry run %q), want locked", p, rep.Kept[p], dry.Kept[p])
		}
		if !slices.Contains(packsOnDisk(t, e.dir), p) {
			t.Errorf("pack %s is gone", p)
		}
	}

	// Once the lock has expired the packs go.
	e.clk.Add(10 * 24 * time.Hour)
	rep = e.prune(t, e.r, false)
	sameIDs(t, "deleted after the lock expired", rep.Deleted, onlyA)
	verifyAll(t, e, 1)
}

// A client that can append floods the vault with 100 junk snapshots of the
// same host and path; a time policy still keeps every real snapshot.
func TestFloodDoesNotPushOutRealSnapshots(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, time.Hour)
	src := source(t, map[string]int{"data": 64 << 10})
	var real []format.ID
	for range 6 {
		real = append(real, backup(t, e.r, src, archiver.Options{}).ID)
		if err := os.WriteFile(filepath.Join(src, "data"), []byte(fmt.Sprint(time.Now().UnixNano())), 0o644); err != nil {
			t.Fatal(err)
		}
		e.clk.Add(24 * time.Hour)
	}
	for i := range 100 {
		if err := os.WriteFile(filepath.Join(src, "data"), fmt.Appendf(nil, "junk %d", i), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := archiver.Backup(ctx, e.r, []string{src}, archiver.Options{}); err != nil {
			t.Fatal(err)
		}
	}
	snaps, bad, err := e.r.Snapshots(ctx)
	if err != nil || len(bad) != 0 || len(snaps) != 106 {
		t.Fatalf("snapshots: %d, %v, %v", len(snaps), bad, err)
	}
	keep, forget, err := Plan(snaps, Policy{Within: 2 * 24 * time.Hour, Daily: 30 * 24 * time.Hour}, e.clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	kept := map[format.ID]string{}
	for _, d := range keep {
		kept[d.Snapshot.ID] = d.Reason()
	}
	for i, id := range real {
		if _, ok := kept[id]; !ok {
			t.Errorf("real snapshot %d (%s) would be forgotten", i, id.String()[:12])
		}
		if strings.Contains(kept[id], "locked") {
			t.Errorf("real snapshot %d kept only by its lock: the test proves nothing", i)
		}
	}
	var ids []format.ID
	for _, d := range forget {
		ids = append(ids, d.Snapshot.ID)
	}
	if _, err := Forget(ctx, e.r, ids); err != nil {
		t.Fatal(err)
	}
	for _, id := range real {
		if _, err := e.r.LoadSnapshot(ctx, id); err != nil {
			t.Errorf("real snapshot gone: %v", err)
		}
	}
}

// Prune deletes nothing when it cannot know what a snapshot needs.
func TestPruneRefusesDamagedSnapshot(t *testing.T) {
	e := newEnv(t, time.Hour)
	a := backup(t, e.r, source(t, map[string]int{"f": 1000}), archiver.Options{}).ID
	p := filepath.Join(e.dir, "snapshots", a.String())
	os.Chmod(p, 0o600)
	if err := os.WriteFile(p, []byte("not a snapshot"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := packsOnDisk(t, e.dir)
	_, err := Prune(context.Background(), e.r, PruneOptions{Now: e.clk.Now})
	if !errors.Is(err, ErrUnsafe) {
		t.Fatalf("prune of a vault with a damaged snapshot: %v, want ErrUnsafe", err)
	}
	sameIDs(t, "packs", packsOnDisk(t, e.dir), before)
}
