package check

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/archiver"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

// fixture is a vault with two snapshots that share no blobs, so that damage
// to what one needs must leave the other intact.
type fixture struct {
	env          *repotest.Env
	a, b         repo.ID
	packsA       []repo.ID // packs only snapshot a uses, data packs first
	packsB       []repo.ID
	indexA       string // the index written by a's backup
	srcA, srcB   string
	wantA, wantB map[string][]byte
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{env: repotest.New(t, time.Hour), wantA: map[string][]byte{}, wantB: map[string][]byte{}}
	f.srcA = filepath.Join(t.TempDir(), "a")
	f.srcB = filepath.Join(t.TempDir(), "b")
	for name, data := range map[string][]byte{"big": repotest.Random(1500 << 10), "sub/small.txt": []byte("only in a\n")} {
		repotest.WriteFile(t, filepath.Join(f.srcA, name), data, 0o644)
		f.wantA[name] = data
	}
	for name, data := range map[string][]byte{"other": repotest.Random(600 << 10), "x/y/z.txt": bytes.Repeat([]byte("b's log line\n"), 5000)} {
		repotest.WriteFile(t, filepath.Join(f.srcB, name), data, 0o644)
		f.wantB[name] = data
	}
	before := indexNames(t, f.env.Dir)
	res, err := archiver.Backup(ctx, f.env.Repo, []string{f.srcA}, archiver.Options{NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	f.a = res.ID
	for _, n := range indexNames(t, f.env.Dir) {
		if !slices.Contains(before, n) {
			f.indexA = n
		}
	}
	res, err = archiver.Backup(ctx, f.env.Repo, []string{f.srcB}, archiver.Options{NoParent: true})
	if err != nil {
		t.Fatal(err)
	}
	f.b = res.ID
	pa, pb := snapshotPacks(t, f.env.Repo, f.a), snapshotPacks(t, f.env.Repo, f.b)
	for _, p := range pa {
		if !slices.Contains(pb, p) {
			f.packsA = append(f.packsA, p)
		}
	}
	for _, p := range pb {
		if !slices.Contains(pa, p) {
			f.packsB = append(f.packsB, p)
		}
	}
	if len(f.packsA) == 0 || len(f.packsB) == 0 || f.indexA == "" {
		t.Fatalf("fixture: packs a %v, b %v, index a %q", f.packsA, f.packsB, f.indexA)
	}
	return f
}

func indexNames(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// snapshotPacks returns the packs holding the blobs of snapshot id, data
// packs first.
func snapshotPacks(t *testing.T, r *repo.Repository, id repo.ID) []repo.ID {
	t.Helper()
	ctx := context.Background()
	sn, err := r.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var data, trees []repo.ID
	addPack := func(b repo.ID) {
		loc, ok := r.Index().Lookup(b)
		if !ok {
			t.Fatalf("blob %s not in index", b)
		}
		dst := &data
		if loc.Type == pack.Tree {
			dst = &trees
		}
		if !slices.Contains(*dst, loc.Pack) {
			*dst = append(*dst, loc.Pack)
		}
	}
	var walk func(repo.ID)
	walk = func(tid repo.ID) {
		addPack(tid)
		tr, err := r.LoadTree(ctx, tid)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range tr.Nodes {
			for _, b := range n.Content {
				addPack(b)
			}
			if n.Subtree != nil {
				walk(*n.Subtree)
			}
		}
	}
	walk(sn.Tree)
	return append(data, trees...)
}

func packPath(dir string, id repo.ID) string {
	s := id.String()
	return filepath.Join(dir, "data", s[:2], s)
}

func truncate(t *testing.T, p string) {
	t.Helper()
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, 0o600)
	if err := os.Truncate(p, fi.Size()/2); err != nil {
		t.Fatal(err)
	}
}

func flip(t *testing.T, p string) {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/2] ^= 0x10
	os.Chmod(p, 0o600)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func remove(t *testing.T, p string) {
	t.Helper()
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
}

func statusOf(rep *Report, id repo.ID) (SnapshotStatus, bool) {
	for _, s := range rep.Snapshots {
		if s.ID == id {
			return s, true
		}
	}
	return SnapshotStatus{}, false
}

func TestCheckIntact(t *testing.T) {
	f := newFixture(t)
	for _, readData := range []bool{false, true} {
		rep, err := Check(context.Background(), f.env.Repo, Options{ReadData: readData})
		if err != nil {
			t.Fatal(err)
		}
		if !rep.OK() || len(rep.Affected()) != 0 || len(rep.Intact()) != 2 || len(rep.Unindexed) != 0 {
			t.Fatalf("read data %v: undamaged vault: %+v", readData, rep)
		}
		if readData && rep.Counts.BytesRead == 0 {
			t.Errorf("read data read nothing: %+v", rep.Counts)
		}
	}
}

func TestCheckDamage(t *testing.T) {
	type target struct {
		typ, name string
		kinds     []Kind
	}
	tests := []struct {
		name     string
		readData bool
		damage   func(t *testing.T, f *fixture) target
		// rebuild: RebuildIndex must make the vault whole again.
		rebuild bool
	}{
		{"pack missing", false, func(t *testing.T, f *fixture) target {
			remove(t, packPath(f.env.Dir, f.packsA[0]))
			return target{"pack", f.packsA[0].String(), []Kind{Missing}}
		}, false},
		{"pack truncated", false, func(t *testing.T, f *fixture) target {
			truncate(t, packPath(f.env.Dir, f.packsA[0]))
			return target{"pack", f.packsA[0].String(), []Kind{Truncated}}
		}, false},
		{"pack bit flipped", true, func(t *testing.T, f *fixture) target {
			flip(t, packPath(f.env.Dir, f.packsA[0]))
			return target{"pack", f.packsA[0].String(), []Kind{HashMismatch}}
		}, false},
		{"index missing", false, func(t *testing.T, f *fixture) target {
			remove(t, filepath.Join(f.env.Dir, "index", f.indexA))
			return target{"pack", f.packsA[0].String(), []Kind{Unindexed}}
		}, true},
		{"index truncated", false, func(t *testing.T, f *fixture) target {
			truncate(t, filepath.Join(f.env.Dir, "index", f.indexA))
			return target{"index", f.indexA, []Kind{Truncated, HashMismatch}}
		}, true},
		{"index bit flipped", false, func(t *testing.T, f *fixture) target {
			flip(t, filepath.Join(f.env.Dir, "index", f.indexA))
			return target{"index", f.indexA, []Kind{HashMismatch}}
		}, true},
		{"snapshot missing", false, func(t *testing.T, f *fixture) target {
			remove(t, filepath.Join(f.env.Dir, "snapshots", f.a.String()))
			return target{"snapshot", f.a.String(), []Kind{Missing}}
		}, false},
		{"snapshot truncated", false, func(t *testing.T, f *fixture) target {
			truncate(t, filepath.Join(f.env.Dir, "snapshots", f.a.String()))
			return target{"snapshot", f.a.String(), []Kind{HashMismatch}}
		}, false},
		{"snapshot bit flipped", false, func(t *testing.T, f *fixture) target {
			flip(t, filepath.Join(f.env.Dir, "snapshots", f.a.String()))
			return target{"snapshot", f.a.String(), []Kind{HashMismatch}}
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			f := newFixture(t)
			want := tt.damage(t, f)
			// A new process: what it finds must come from the store.
			r := f.env.Reopen(t)
			rep, err := Check(ctx, r, Options{ReadData: tt.readData})
			if err != nil {
				t.Fatal(err)
			}
			if rep.OK() {
				t.Fatalf("damage not detected: %+v", rep)
			}
			found := false
			for _, d := range rep.Damage {
				if d.Type == want.typ && d.Name == want.name && slices.Contains(want.kinds, d.Kind) {
					found = true
				}
			}
			if !found {
				t.Errorf("want %s %s %v among damage:\n%s", want.typ, want.name, want.kinds, damageList(rep))
			}
			sa, okA := statusOf(rep, f.a)
			sb, okB := statusOf(rep, f.b)
			if !okA || sa.Intact() {
				t.Errorf("snapshot a not reported affected: %+v", sa)
			}
			if !okB || !sb.Intact() {
				t.Errorf("snapshot b not reported intact: %+v", sb)
			}
			if got := rep.Affected(); len(got) != 1 || got[0].ID != f.a {
				t.Errorf("affected = %+v, want only a", got)
			}
			// The intact snapshot still restores.
			restoreAll(t, r, f.b, f.wantB)

			if !tt.rebuild {
				return
			}
			res, err := RebuildIndex(ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Indexed) == 0 || len(res.KeptIndexes) != 0 {
				t.Fatalf("rebuild: %+v", res)
			}
			r2 := f.env.Reopen(t)
			if len(r2.IndexErrors) != 0 {
				t.Fatalf("index errors after rebuild: %v", r2.IndexErrors)
			}
			rep, err = Check(ctx, r2, Options{ReadData: true})
			if err != nil {
				t.Fatal(err)
			}
			if !rep.OK() || len(rep.Intact()) != 2 {
				t.Fatalf("after rebuild:\n%s", damageList(rep))
			}
			restoreAll(t, r2, f.a, f.wantA)
		})
	}
}

func damageList(rep *Report) string {
	var b strings.Builder
	for _, d := range rep.Damage {
		b.WriteString(d.String() + "\n")
	}
	for _, s := range rep.Snapshots {
		b.WriteString("snapshot " + s.ID.String()[:12] + ": " + strings.Join(s.Problems, "; ") + "\n")
	}
	return b.String()
}

// restoreAll reads every file of snapshot id through r's index and compares
// it with want (relative path → content).
func restoreAll(t *testing.T, r *repo.Repository, id repo.ID, want map[string][]byte) {
	t.Helper()
	ctx := context.Background()
	sn, err := r.LoadSnapshot(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]byte{}
	var walk func(repo.ID, string)
	walk = func(tid repo.ID, dir string) {
		tr, err := r.LoadTree(ctx, tid)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range tr.Nodes {
			p := filepath.Join(dir, n.Name)
			switch n.Type {
			case snapshot.Dir:
				walk(*n.Subtree, p)
			case snapshot.File:
				var data []byte
				for _, b := range n.Content {
					chunk, err := r.LoadBlob(ctx, pack.Data, b)
					if err != nil {
						t.Fatal(err)
					}
					data = append(data, chunk...)
				}
				got[p] = data
			}
		}
	}
	walk(sn.Tree, "")
	for name, data := range want {
		// Each snapshot has one root entry, its source folder's base name.
		var content []byte
		for p, d := range got {
			if strings.HasSuffix(p, string(filepath.Separator)+name) {
				content = d
			}
		}
		if !bytes.Equal(content, data) {
			t.Errorf("snapshot %s: %s: restored %d bytes, want %d", id.String()[:12], name, len(content), len(data))
		}
	}
}

func TestIndexCodecMatchesRepo(t *testing.T) {
	// An index written by repo decodes here, and one written here is read
	// by repo.Open: the stopgap codec must not drift from repo's.
	ctx := context.Background()
	f := newFixture(t)
	packs, hdr, err := LoadIndex(ctx, f.env.Repo, f.indexA)
	if err != nil {
		t.Fatal(err)
	}
	if len(packs) == 0 || len(hdr) != len(packs) {
		t.Fatalf("index a: %d packs, header %d", len(packs), len(hdr))
	}
	names, err := f.env.Repo.SaveIndexes(ctx, packs)
	if err != nil {
		t.Fatal(err)
	}
	remove(t, filepath.Join(f.env.Dir, "index", f.indexA))
	r := f.env.Reopen(t)
	if len(r.IndexErrors) != 0 || len(names) != 1 {
		t.Fatalf("reopen: %v, names %v", r.IndexErrors, names)
	}
	restoreAll(t, r, f.a, f.wantA)
}

func TestCheckProgressAndKinds(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	var last, total int64
	rep, err := Check(ctx, f.env.Repo, Options{ReadData: true, Workers: 3, Progress: func(d, tot int64) {
		last, total = max(last, d), tot
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || last != total || total != rep.Counts.BytesRead || rep.Counts.Packs < 2 {
		t.Errorf("progress %d/%d, counts %+v", last, total, rep.Counts)
	}
	if _, _, err := LoadIndex(ctx, f.env.Repo, format.ID{}.String()); KindOf(err) != Missing {
		t.Errorf("LoadIndex of a missing index: %v (kind %q)", err, KindOf(err))
	}
}
