package guard

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/format"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// fakeClock is the injected vault clock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	c.now = t
	c.mu.Unlock()
}

// fixture is a vault with a config (MinRetention 24h), one key, packs p1 and
// p2 covered by index idx and committed in snapshot snap, and a pack p3 that
// no snapshot uses, covered by index idx3.
type fixture struct {
	dir               string // the directory vault
	be                backend.Backend
	st                *Store
	clock             *fakeClock
	admin, app, rd    *Session
	cfg               []byte
	p1, p2, p3        []byte
	idx, idx3         []byte
	snapDoc           []byte
	snap              format.ID
	lock              format.LockRecord
	lockName, keyName string
}

const minRetention = 24 * time.Hour

func h(t backend.Type, data []byte) backend.Handle {
	return backend.Handle{Type: t, Name: format.Hash(data).String()}
}

func index(packs ...[]byte) []byte {
	var ids []format.ID
	for _, p := range packs {
		ids = append(ids, format.Hash(p))
	}
	return append(format.AppendIndexHeader(nil, ids), "encrypted body"...)
}

func ids(packs ...[]byte) []format.ID {
	var out []format.ID
	for _, p := range packs {
		out = append(out, format.Hash(p))
	}
	return out
}

func configBytes(t testing.TB, minRet time.Duration) []byte {
	t.Helper()
	b, err := json.Marshal(format.Config{
		Version:      1,
		ID:           strings.Repeat("ab", 32),
		Created:      t0.Add(-time.Hour),
		MinRetention: format.Duration(minRet),
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func newBackend(t testing.TB) backend.Backend {
	t.Helper()
	be, err := local.Create(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return be
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	return newFixtureWith(t, configBytes(t, minRetention))
}

// newFixtureWith is newFixture with the given config object.
func newFixtureWith(t testing.TB, cfg []byte) *fixture {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	be, err := local.Create(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{dir: dir, be: be, clock: &fakeClock{now: t0}}
	f.st = New(f.be, Options{Now: f.clock.Now})
	f.admin, f.app, f.rd = f.st.Session(Admin), f.st.Session(Append), f.st.Session(Read)
	f.cfg = cfg
	f.p1, f.p2, f.p3 = []byte("pack one"), []byte("pack two"), []byte("pack three")
	f.idx, f.idx3 = index(f.p1, f.p2), index(f.p3)
	f.snapDoc = []byte("encrypted snapshot")
	key := []byte("wrapped key 1")
	f.keyName = format.Hash(key).String()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(f.admin.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, f.cfg))
	must(f.admin.Save(ctx, h(backend.Key, key), key))
	for _, p := range [][]byte{f.p1, f.p2, f.p3} {
		must(f.app.Save(ctx, h(backend.Pack, p), p))
	}
	must(f.app.Save(ctx, h(backend.Index, f.idx), f.idx))
	must(f.app.Save(ctx, h(backend.Index, f.idx3), f.idx3))
	f.lock, f.snap, err = f.app.Commit(ctx, format.CommitRequest{Snapshot: f.snapDoc, Packs: ids(f.p2, f.p1, f.p1)})
	must(err)
	b, _ := json.Marshal(f.lock)
	f.lockName = format.Hash(b).String()
	return f
}

func (f *fixture) after() { f.clock.Set(f.lock.Until.Add(time.Second)) }

func TestRules(t *testing.T) {
	ctx := context.Background()
	cfgH := backend.Handle{Type: backend.Config, Name: backend.ConfigName}
	tests := []struct {
		name string
		run  func(f *fixture) error
		want error // nil: must succeed
	}{
		// Save.
		{"read cannot save pack", func(f *fixture) error { p := []byte("x"); return f.rd.Save(ctx, h(backend.Pack, p), p) }, ErrForbidden},
		{"read cannot save index", func(f *fixture) error { i := index(f.p1); return f.rd.Save(ctx, h(backend.Index, i), i) }, ErrForbidden},
		{"append saves pack", func(f *fixture) error { p := []byte("x"); return f.app.Save(ctx, h(backend.Pack, p), p) }, nil},
		{"append retries identical pack", func(f *fixture) error { return f.app.Save(ctx, h(backend.Pack, f.p1), f.p1) }, nil},
		{"append cannot overwrite pack", func(f *fixture) error { return f.app.Save(ctx, h(backend.Pack, f.p1), []byte("other")) }, ErrInvalid},
		{"pack under wrong hash", func(f *fixture) error { return f.app.Save(ctx, h(backend.Pack, []byte("a")), []byte("b")) }, ErrInvalid},
		{"uppercase name", func(f *fixture) error {
			n := strings.ToUpper(format.Hash(f.p1).String())
			return f.app.Save(ctx, backend.Handle{Type: backend.Pack, Name: n}, f.p1)
		}, ErrInvalid},
		{"path in name", func(f *fixture) error {
			return f.app.Save(ctx, backend.Handle{Type: backend.Pack, Name: "../config"}, f.p1)
		}, ErrInvalid},
		{"unknown type", func(f *fixture) error {
			return f.admin.Save(ctx, backend.Handle{Type: "tmp", Name: format.Hash(f.p1).String()}, f.p1)
		}, ErrInvalid},
		{"append saves index", func(f *fixture) error { i := index(f.p3, f.p1); return f.app.Save(ctx, h(backend.Index, i), i) }, nil},
		{"index with bad header", func(f *fixture) error { i := []byte("DKI2....."); return f.app.Save(ctx, h(backend.Index, i), i) }, ErrInvalid},
		{"index truncated header", func(f *fixture) error {
			i := index(f.p1, f.p2)[:20]
			return f.app.Save(ctx, h(backend.Index, i), i)
		}, ErrInvalid},
		{"append cannot save snapshot", func(f *fixture) error { s := []byte("s"); return f.app.Save(ctx, h(backend.Snapshot, s), s) }, ErrForbidden},
		{"admin cannot save snapshot", func(f *fixture) error { s := []byte("s"); return f.admin.Save(ctx, h(backend.Snapshot, s), s) }, ErrForbidden},
		{"append cannot write lock", func(f *fixture) error {
			b, _ := json.Marshal(format.LockRecord{Snapshot: f.snap, Time: t0, Until: t0.Add(-time.Hour), Reason: "commit"})
			return f.app.Save(ctx, h(backend.Lock, b), b)
		}, ErrForbidden},
		{"admin cannot write lock", func(f *fixture) error {
			b, _ := json.Marshal(format.LockRecord{Snapshot: f.snap, Time: t0, Until: t0.Add(time.Hour), Reason: "commit"})
			return f.admin.Save(ctx, h(backend.Lock, b), b)
		}, ErrForbidden},
		{"append cannot save key", func(f *fixture) error { k := []byte("k2"); return f.app.Save(ctx, h(backend.Key, k), k) }, ErrForbidden},
		{"admin saves key", func(f *fixture) error { k := []byte("k2"); return f.admin.Save(ctx, h(backend.Key, k), k) }, nil},
		{"append cannot save mark", func(f *fixture) error { m := []byte("m"); return f.app.Save(ctx, h(backend.Mark, m), m) }, ErrForbidden},
		{"admin saves mark", func(f *fixture) error { m := []byte("m"); return f.admin.Save(ctx, h(backend.Mark, m), m) }, nil},
		{"append cannot save config", func(f *fixture) error { return f.app.Save(ctx, cfgH, f.cfg) }, ErrForbidden},
		{"admin cannot replace config", func(f *fixture) error { return f.admin.Save(ctx, cfgH, configBytes(t, time.Hour)) }, backend.ErrExists},
		{"admin retries identical config", func(f *fixture) error { return f.admin.Save(ctx, cfgH, f.cfg) }, nil},
		{"invalid config", func(f *fixture) error { return f.admin.Save(ctx, cfgH, []byte(`{"version":1}`)) }, ErrInvalid},
		{"config with unknown field", func(f *fixture) error { return f.admin.Save(ctx, cfgH, []byte(`{"version":1,"x":1}`)) }, ErrInvalid},
		{"invalid capability", func(f *fixture) error {
			_, err := f.st.Session("root").Load(ctx, h(backend.Pack, f.p1), 0, 0)
			return err
		}, ErrForbidden},

		// Reading.
		{"read loads pack range", func(f *fixture) error {
			b, err := f.rd.Load(ctx, h(backend.Pack, f.p1), 5, 3)
			if err == nil && string(b) != "one" {
				return errors.New("wrong bytes " + string(b))
			}
			return err
		}, nil},
		{"append reads config", func(f *fixture) error { _, err := f.app.Config(ctx); return err }, nil},
		{"append stats snapshot", func(f *fixture) error { _, err := f.app.Stat(ctx, h(backend.Snapshot, f.snapDoc)); return err }, nil},
		{"append lists index", func(f *fixture) error { return f.app.List(ctx, backend.Index, func(backend.Info) error { return nil }) }, nil},
		{"load missing", func(f *fixture) error { _, err := f.rd.Load(ctx, h(backend.Pack, []byte("nope")), 0, 0); return err }, backend.ErrNotExist},
		{"list unknown type", func(f *fixture) error { return f.rd.List(ctx, "etc", func(backend.Info) error { return nil }) }, ErrInvalid},

		// Remove by weaker tokens.
		{"append cannot remove unlocked pack", func(f *fixture) error { return f.app.Remove(ctx, h(backend.Pack, f.p3)) }, ErrForbidden},
		{"append cannot remove mark", func(f *fixture) error {
			m := []byte("m")
			if err := f.admin.Save(ctx, h(backend.Mark, m), m); err != nil {
				return err
			}
			return f.app.Remove(ctx, h(backend.Mark, m))
		}, ErrForbidden},
		{"append cannot remove expired lock", func(f *fixture) error {
			f.after()
			return f.app.Remove(ctx, backend.Handle{Type: backend.Lock, Name: f.lockName})
		}, ErrForbidden},
		{"append cannot remove expired snapshot", func(f *fixture) error { f.after(); return f.app.Remove(ctx, h(backend.Snapshot, f.snapDoc)) }, ErrForbidden},
		{"append cannot remove index", func(f *fixture) error { return f.app.Remove(ctx, h(backend.Index, f.idx3)) }, ErrForbidden},
		{"append cannot remove key", func(f *fixture) error { return f.app.Remove(ctx, backend.Handle{Type: backend.Key, Name: f.keyName}) }, ErrForbidden},
		{"read cannot remove", func(f *fixture) error { return f.rd.Remove(ctx, h(backend.Pack, f.p3)) }, ErrForbidden},

		// Remove by admin.
		{"admin cannot remove config", func(f *fixture) error { return f.admin.Remove(ctx, cfgH) }, ErrForbidden},
		{"admin cannot remove locked snapshot", func(f *fixture) error { return f.admin.Remove(ctx, h(backend.Snapshot, f.snapDoc)) }, ErrLocked},
		{"admin cannot remove locked pack", func(f *fixture) error { return f.admin.Remove(ctx, h(backend.Pack, f.p1)) }, ErrLocked},
		{"admin cannot remove covering index", func(f *fixture) error { return f.admin.Remove(ctx, h(backend.Index, f.idx)) }, ErrLocked},
		{"admin cannot remove live lock", func(f *fixture) error {
			return f.admin.Remove(ctx, backend.Handle{Type: backend.Lock, Name: f.lockName})
		}, ErrLocked},
		{"admin removes index covered elsewhere", func(f *fixture) error {
			other := index(f.p1, f.p2, f.p3)
			if err := f.app.Save(ctx, h(backend.Index, other), other); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.Index, f.idx))
		}, nil},
		{"admin cannot remove index when other covers only part", func(f *fixture) error {
			other := index(f.p1)
			if err := f.app.Save(ctx, h(backend.Index, other), other); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.Index, f.idx))
		}, ErrLocked},
		{"admin removes unlocked pack", func(f *fixture) error { return f.admin.Remove(ctx, h(backend.Pack, f.p3)) }, nil},
		{"admin removes index of unlocked pack", func(f *fixture) error { return f.admin.Remove(ctx, h(backend.Index, f.idx3)) }, nil},
		{"admin removes mark", func(f *fixture) error {
			m := []byte("m")
			if err := f.admin.Save(ctx, h(backend.Mark, m), m); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.Mark, m))
		}, nil},
		{"admin cannot remove last key", func(f *fixture) error { return f.admin.Remove(ctx, backend.Handle{Type: backend.Key, Name: f.keyName}) }, ErrForbidden},
		{"admin removes a key not the last", func(f *fixture) error {
			k := []byte("k2")
			if err := f.admin.Save(ctx, h(backend.Key, k), k); err != nil {
				return err
			}
			return f.admin.Remove(ctx, backend.Handle{Type: backend.Key, Name: f.keyName})
		}, nil},
		{"remove missing", func(f *fixture) error { return f.admin.Remove(ctx, h(backend.Mark, []byte("none"))) }, backend.ErrNotExist},
		{"one second before until, still locked", func(f *fixture) error {
			f.clock.Set(f.lock.Until.Add(-time.Second))
			return f.admin.Remove(ctx, h(backend.Pack, f.p1))
		}, ErrLocked},
		{"at until, snapshot removable", func(f *fixture) error {
			f.clock.Set(f.lock.Until)
			return f.admin.Remove(ctx, h(backend.Snapshot, f.snapDoc))
		}, nil},
		{"after until, everything removable", func(f *fixture) error {
			f.after()
			for _, hh := range []backend.Handle{
				h(backend.Snapshot, f.snapDoc), h(backend.Index, f.idx), h(backend.Pack, f.p1), h(backend.Pack, f.p2),
				{Type: backend.Lock, Name: f.lockName},
			} {
				if err := f.admin.Remove(ctx, hh); err != nil {
					return err
				}
			}
			if rs, err := f.admin.Locks(ctx); err != nil || len(rs) != 0 {
				return errors.New("locks remain")
			}
			return nil
		}, nil},
		{"extended lock protects past the first until", func(f *fixture) error {
			if _, err := f.app.ExtendLock(ctx, f.snap, f.lock.Until.Add(time.Hour)); err != nil {
				return err
			}
			f.after()
			// The first record has expired and may go; the pack may not.
			if err := f.admin.Remove(ctx, backend.Handle{Type: backend.Lock, Name: f.lockName}); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.Pack, f.p2))
		}, ErrLocked},

		// Commit.
		{"read cannot commit", func(f *fixture) error {
			_, _, err := f.rd.Commit(ctx, format.CommitRequest{Snapshot: []byte("s")})
			return err
		}, ErrForbidden},
		{"commit with missing pack", func(f *fixture) error {
			missing := format.Hash([]byte("never uploaded"))
			_, _, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("s"), Packs: []format.ID{format.Hash(f.p1), missing}})
			if err != nil && !strings.Contains(err.Error(), missing.String()) {
				t.Errorf("error %q does not name the missing pack", err)
			}
			return err
		}, backend.ErrNotExist},
		{"commit empty snapshot", func(f *fixture) error { _, _, err := f.app.Commit(ctx, format.CommitRequest{}); return err }, ErrInvalid},
		{"commit lock beyond limit", func(f *fixture) error {
			_, _, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("s"), LockFor: format.Duration(DefaultMaxLock + time.Hour)})
			return err
		}, ErrInvalid},
		{"commit negative lock", func(f *fixture) error {
			_, _, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("s"), LockFor: -1})
			return err
		}, ErrInvalid},

		// ExtendLock.
		{"read cannot extend", func(f *fixture) error {
			_, err := f.rd.ExtendLock(ctx, f.snap, f.lock.Until.Add(time.Hour))
			return err
		}, ErrForbidden},
		{"extend unknown snapshot", func(f *fixture) error {
			_, err := f.app.ExtendLock(ctx, format.Hash([]byte("?")), f.lock.Until.Add(time.Hour))
			return err
		}, backend.ErrNotExist},
		{"shorten refused", func(f *fixture) error {
			_, err := f.app.ExtendLock(ctx, f.snap, f.lock.Until.Add(-time.Second))
			return err
		}, ErrLocked},
		{"shorten refused for admin", func(f *fixture) error { _, err := f.admin.ExtendLock(ctx, f.snap, t0); return err }, ErrLocked},
		{"extend to same until is a no-op", func(f *fixture) error {
			r, err := f.app.ExtendLock(ctx, f.snap, f.lock.Until)
			if err == nil && !r.Time.Equal(f.lock.Time) {
				return errors.New("wrote a new record")
			}
			return err
		}, nil},
		{"extend beyond limit", func(f *fixture) error {
			_, err := f.app.ExtendLock(ctx, f.snap, t0.Add(DefaultMaxLock+time.Hour))
			return err
		}, ErrInvalid},
		{"extend after removal of snapshot", func(f *fixture) error {
			f.after()
			if err := f.admin.Remove(ctx, h(backend.Snapshot, f.snapDoc)); err != nil {
				return err
			}
			_, err := f.app.ExtendLock(ctx, f.snap, f.lock.Until.Add(time.Hour))
			return err
		}, backend.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			err := tt.run(f)
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("got %v, want success", err)
			case tt.want != nil && !errors.Is(err, tt.want):
				t.Fatalf("got %v, want %v", err, tt.want)
			case err != nil && !strings.HasPrefix(err.Error(), "guard: "):
				t.Errorf("error %q lacks the guard: prefix", err)
			}
		})
	}
}

// TestRefusalsChangeNothing checks that refused operations leave every
// object in place.
func TestRefusalsChangeNothing(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	before := listAll(t, f.be)
	for _, s := range []*Session{f.rd, f.app, f.admin} {
		for _, hh := range []backend.Handle{
			{Type: backend.Config, Name: backend.ConfigName}, h(backend.Snapshot, f.snapDoc), h(backend.Pack, f.p1),
			h(backend.Index, f.idx), {Type: backend.Lock, Name: f.lockName}, {Type: backend.Key, Name: f.keyName},
		} {
			if err := s.Remove(ctx, hh); err == nil {
				t.Errorf("%s removed %v", s.cap, hh)
			}
		}
		_ = s.Save(ctx, h(backend.Pack, f.p1), []byte("other"))
		_ = s.Save(ctx, h(backend.Snapshot, f.snapDoc), f.snapDoc)
	}
	if after := listAll(t, f.be); strings.Join(after, ",") != strings.Join(before, ",") {
		t.Errorf("objects changed:\nbefore %v\nafter  %v", before, after)
	}
}

func listAll(t *testing.T, be backend.Backend) []string {
	var out []string
	for _, ty := range backend.Types {
		err := be.List(context.Background(), ty, func(fi backend.Info) error {
			out = append(out, fi.String())
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func TestCommitUsesVaultClock(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	if !f.lock.Time.Equal(t0) || !f.lock.Until.Equal(t0.Add(minRetention)) || f.lock.Reason != format.ReasonCommit {
		t.Errorf("commit record = %+v, want time %v until %v", f.lock, t0, t0.Add(minRetention))
	}
	if got, want := f.lock.Packs, sortedUnique(ids(f.p1, f.p2)); len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("packs = %v, want sorted unique %v", got, want)
	}
	if f.snap != format.Hash(f.snapDoc) {
		t.Errorf("snapshot id %s is not the hash of the document", f.snap)
	}

	// A client asking for more than MinRetention gets it, on the vault clock.
	later := t0.Add(3 * time.Hour)
	f.clock.Set(later)
	r, _, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("s2"), Packs: ids(f.p3), LockFor: format.Duration(48 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Time.Equal(later) || !r.Until.Equal(later.Add(48*time.Hour)) {
		t.Errorf("record = %+v, want time %v until +48h", r, later)
	}
	// Asking for less than MinRetention is raised to it.
	r, _, err = f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("s3"), LockFor: format.Duration(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Until.Equal(later.Add(minRetention)) {
		t.Errorf("until = %v, want MinRetention after %v", r.Until, later)
	}

	// What is stored matches what was returned, and SnapshotLock sees it.
	until, recs, err := f.rd.SnapshotLock(ctx, f.snap)
	if err != nil || !until.Equal(f.lock.Until) || len(recs) != 1 {
		t.Fatalf("SnapshotLock = %v, %v, %v", until, recs, err)
	}
	data, err := f.be.Load(ctx, backend.Handle{Type: backend.Lock, Name: f.lockName}, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := format.ParseLockRecord(data)
	if err != nil || !stored.Time.Equal(t0) {
		t.Fatalf("stored record %+v, %v", stored, err)
	}

	// A second store over the same backend (a restart) reads the same locks.
	rs, err := New(f.be, Options{Now: f.clock.Now}).Session(Read).Locks(ctx)
	if err != nil || len(rs) != 3 {
		t.Fatalf("after restart Locks = %d records, %v", len(rs), err)
	}
}

func TestExtendLock(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	f.clock.Set(t0.Add(time.Hour))
	want := f.lock.Until.Add(30 * 24 * time.Hour)
	r, err := f.app.ExtendLock(ctx, f.snap, want)
	if err != nil {
		t.Fatal(err)
	}
	if r.Reason != format.ReasonExtend || !r.Until.Equal(want) || !r.Time.Equal(t0.Add(time.Hour)) || len(r.Packs) != 2 {
		t.Errorf("extension record = %+v", r)
	}
	until, recs, err := f.app.SnapshotLock(ctx, f.snap)
	if err != nil || !until.Equal(want) || len(recs) != 2 {
		t.Errorf("SnapshotLock = %v, %d records, %v; want %v, 2", until, len(recs), err, want)
	}
	if _, err := f.app.ExtendLock(ctx, f.snap, want.Add(-time.Nanosecond)); !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "never shortened") {
		t.Errorf("shortening: %v", err)
	}
}

// orderBackend records the types saved, to check the lock precedes the
// snapshot, and can fail snapshot saves.
type orderBackend struct {
	backend.Backend
	mu           sync.Mutex
	saved        []backend.Type
	failSnapshot bool
}

func (b *orderBackend) Save(ctx context.Context, h backend.Handle, data []byte) error {
	b.mu.Lock()
	b.saved = append(b.saved, h.Type)
	fail := b.failSnapshot && h.Type == backend.Snapshot
	b.mu.Unlock()
	if fail {
		return errors.New("disk on fire")
	}
	return b.Backend.Save(ctx, h, data)
}

func TestCommitWritesLockFirst(t *testing.T) {
	ctx := context.Background()
	be := &orderBackend{Backend: newBackend(t)}
	st := New(be, Options{Now: func() time.Time { return t0 }})
	admin := st.Session(Admin)
	if err := admin.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, configBytes(t, time.Hour)); err != nil {
		t.Fatal(err)
	}
	be.saved = nil
	if _, _, err := admin.Commit(ctx, format.CommitRequest{Snapshot: []byte("s")}); err != nil {
		t.Fatal(err)
	}
	if len(be.saved) != 2 || be.saved[0] != backend.Lock || be.saved[1] != backend.Snapshot {
		t.Errorf("save order = %v, want [locks snapshots]", be.saved)
	}
	// A failed snapshot write leaves a lock and no snapshot: never the reverse.
	be.failSnapshot = true
	if _, _, err := admin.Commit(ctx, format.CommitRequest{Snapshot: []byte("s2")}); err == nil {
		t.Fatal("commit succeeded with a failing backend")
	}
	if _, recs, _ := admin.SnapshotLock(ctx, format.Hash([]byte("s2"))); len(recs) != 1 {
		t.Errorf("got %d lock records for the failed snapshot, want 1", len(recs))
	}
}

func TestCommitWithoutConfig(t *testing.T) {
	st := New(newBackend(t), Options{})
	_, _, err := st.Session(Append).Commit(context.Background(), format.CommitRequest{Snapshot: []byte("s")})
	if !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("commit without config: %v", err)
	}
}

// TestCommitRemoveRace checks that a pack is never both removed and locked:
// Commit and Remove are serialized.
func TestCommitRemoveRace(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	for i := range 20 {
		p := []byte{'p', byte(i)}
		if err := f.app.Save(ctx, h(backend.Pack, p), p); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var cerr, rerr error
		wg.Add(2)
		go func() {
			defer wg.Done()
			_, _, cerr = f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte{'s', byte(i)}, Packs: ids(p)})
		}()
		go func() { defer wg.Done(); rerr = f.admin.Remove(ctx, h(backend.Pack, p)) }()
		wg.Wait()
		if (cerr == nil) == (rerr == nil) {
			t.Fatalf("round %d: commit err %v, remove err %v: exactly one must win", i, cerr, rerr)
		}
		if cerr == nil && !errors.Is(rerr, ErrLocked) || rerr == nil && !errors.Is(cerr, backend.ErrNotExist) {
			t.Fatalf("round %d: commit err %v, remove err %v", i, cerr, rerr)
		}
	}
}

func TestCapability(t *testing.T) {
	tests := []struct {
		c, need Capability
		want    bool
	}{
		{Admin, Read, true}, {Admin, Append, true}, {Admin, Admin, true},
		{Append, Read, true}, {Append, Append, true}, {Append, Admin, false},
		{Read, Read, true}, {Read, Append, false}, {Read, Admin, false},
		{"", Read, false}, {"ADMIN", Read, false}, {Admin, "", false},
	}
	for _, tt := range tests {
		if got := tt.c.Allows(tt.need); got != tt.want {
			t.Errorf("%q.Allows(%q) = %v, want %v", tt.c, tt.need, got, tt.want)
		}
	}
	if _, err := ParseCapability("superuser"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ParseCapability(superuser) = %v", err)
	}
}

// walPiece returns a WAL object: a valid header and a body as long as a seal.
func walPiece(hd format.WALHeader) []byte {
	return append(format.AppendWALHeader(nil, hd), strings.Repeat("s", format.WALSealOverhead)...)
}

func TestWALRules(t *testing.T) {
	ctx := context.Background()
	piece := walPiece(format.WALHeader{Timeline: 1, Start: 0x1000000, End: 0x1000000 + 8192})
	tests := []struct {
		name string
		run  func(f *fixture, received time.Time) error // received: the stored piece's vault time
		want error
	}{
		// Save.
		{"append saves wal", func(f *fixture, _ time.Time) error {
			p := walPiece(format.WALHeader{Timeline: 2, Start: 5, End: 9})
			return f.app.Save(ctx, h(backend.WAL, p), p)
		}, nil},
		{"append saves history", func(f *fixture, _ time.Time) error {
			p := walPiece(format.WALHeader{Timeline: 2, End: 40, History: true})
			return f.app.Save(ctx, h(backend.WAL, p), p)
		}, nil},
		{"append retries identical wal", func(f *fixture, _ time.Time) error { return f.app.Save(ctx, h(backend.WAL, piece), piece) }, nil},
		{"read cannot save wal", func(f *fixture, _ time.Time) error {
			p := walPiece(format.WALHeader{Timeline: 2, Start: 5, End: 9})
			return f.rd.Save(ctx, h(backend.WAL, p), p)
		}, ErrForbidden},
		{"wal under wrong hash", func(f *fixture, _ time.Time) error {
			p := walPiece(format.WALHeader{Timeline: 2, Start: 5, End: 9})
			return f.app.Save(ctx, h(backend.WAL, piece), p)
		}, ErrInvalid},
		{"wal with index magic", func(f *fixture, _ time.Time) error { i := index(f.p1); return f.app.Save(ctx, h(backend.WAL, i), i) }, ErrInvalid},
		{"wal ending before its start", func(f *fixture, _ time.Time) error {
			p := walPiece(format.WALHeader{Timeline: 1, Start: 9, End: 5})
			return f.app.Save(ctx, h(backend.WAL, p), p)
		}, ErrInvalid},
		{"wal of timeline 0", func(f *fixture, _ time.Time) error {
			p := walPiece(format.WALHeader{Timeline: 0, Start: 5, End: 9})
			return f.app.Save(ctx, h(backend.WAL, p), p)
		}, ErrInvalid},
		{"wal without sealed body", func(f *fixture, _ time.Time) error {
			p := format.AppendWALHeader(nil, format.WALHeader{Timeline: 1, Start: 5, End: 9})
			return f.app.Save(ctx, h(backend.WAL, p), p)
		}, ErrInvalid},

		// Remove.
		{"append cannot remove old wal", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(100 * minRetention))
			return f.app.Remove(ctx, h(backend.WAL, piece))
		}, ErrForbidden},
		{"read cannot remove old wal", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(100 * minRetention))
			return f.rd.Remove(ctx, h(backend.WAL, piece))
		}, ErrForbidden},
		{"admin cannot remove young wal", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(minRetention - time.Second))
			return f.admin.Remove(ctx, h(backend.WAL, piece))
		}, ErrLocked},
		{"admin removes wal at MinRetention", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(minRetention))
			return f.admin.Remove(ctx, h(backend.WAL, piece))
		}, nil},
		{"admin cannot remove wal received in the future", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(100 * minRetention))
			future := rcv.Add(101 * minRetention)
			if err := os.Chtimes(filepath.Join(f.dir, "wal", format.Hash(piece).String()), future, future); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.WAL, piece))
		}, ErrLocked},
		{"the backend's mtime is the receive time", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv)
			old := rcv.Add(-minRetention)
			if err := os.Chtimes(filepath.Join(f.dir, "wal", format.Hash(piece).String()), old, old); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.WAL, piece))
		}, nil},
		{"an identical retry keeps the first receive time", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(minRetention))
			time.Sleep(20 * time.Millisecond)
			if err := f.app.Save(ctx, h(backend.WAL, piece), piece); err != nil {
				return err
			}
			return f.admin.Remove(ctx, h(backend.WAL, piece))
		}, nil},
		{"remove missing wal", func(f *fixture, rcv time.Time) error {
			f.clock.Set(rcv.Add(100 * minRetention))
			return f.admin.Remove(ctx, h(backend.WAL, walPiece(format.WALHeader{Timeline: 1, Start: 1, End: 2})))
		}, backend.ErrNotExist},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			if err := f.app.Save(ctx, h(backend.WAL, piece), piece); err != nil {
				t.Fatal(err)
			}
			fi, err := f.rd.Stat(ctx, h(backend.WAL, piece))
			if err != nil {
				t.Fatal(err)
			}
			err = tt.run(f, fi.ModTime.UTC())
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("got %v, want success", err)
			case tt.want != nil && !errors.Is(err, tt.want):
				t.Fatalf("got %v, want %v", err, tt.want)
			case err != nil && !strings.HasPrefix(err.Error(), "guard: "):
				t.Errorf("error %q lacks the guard: prefix", err)
			}
		})
	}
}

// TestWALRangeKeepsWAL checks that the WAL a base backup's lock record names
// outlives the minimum retention for as long as the lock, through an
// extension and a certified-free expiry, while other WAL stays removable
// after the minimum retention.
func TestWALRangeKeepsWAL(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	seg := uint64(16 << 20)
	rng := format.WALRange{Timeline: 2, Start: 3 * seg, End: 5 * seg}
	pieces := map[string][]byte{
		"in range":                  walPiece(format.WALHeader{Timeline: 2, Start: 3*seg + 100, End: 3*seg + 8192}),
		"straddling its end":        walPiece(format.WALHeader{Timeline: 2, Start: 5*seg - 10, End: 5*seg + 10}),
		"of the ancestor in range":  walPiece(format.WALHeader{Timeline: 1, Start: 3 * seg, End: 3*seg + 4096}),
		"the timeline's history":    walPiece(format.WALHeader{Timeline: 2, End: 40, History: true}),
		"before the range":          walPiece(format.WALHeader{Timeline: 2, Start: 2 * seg, End: 3 * seg}),
		"after the range":           walPiece(format.WALHeader{Timeline: 2, Start: 5 * seg, End: 5*seg + 8192}),
		"of a later timeline":       walPiece(format.WALHeader{Timeline: 3, Start: 3 * seg, End: 3*seg + 8192}),
		"of a later timeline (hst)": walPiece(format.WALHeader{Timeline: 3, End: 40, History: true}),
	}
	needed := map[string]bool{"in range": true, "straddling its end": true, "of the ancestor in range": true, "the timeline's history": true}
	var received time.Time
	for _, p := range pieces {
		if err := f.app.Save(ctx, h(backend.WAL, p), p); err != nil {
			t.Fatal(err)
		}
		fi, err := f.rd.Stat(ctx, h(backend.WAL, p))
		if err != nil {
			t.Fatal(err)
		}
		if fi.ModTime.After(received) {
			received = fi.ModTime.UTC()
		}
	}
	// The vault clock runs from the pieces' arrival, as in production.
	f.clock.Set(received)

	if _, _, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("bad range"), WAL: &format.WALRange{Timeline: 1, Start: 9, End: 9}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("commit with an empty WAL range: %v, want ErrInvalid", err)
	}
	base := []byte("sealed base backup")
	rec, snap, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: base, Packs: ids(f.p1), LockFor: format.Duration(30 * minRetention), WAL: &rng})
	if err != nil {
		t.Fatal(err)
	}
	if rec.WAL == nil || *rec.WAL != rng {
		t.Fatalf("commit record WAL = %v, want %v", rec.WAL, rng)
	}
	// A snapshot committed without a range (an older client) protects no WAL.
	if _, _, err := f.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("no range"), LockFor: format.Duration(60 * minRetention)}); err != nil {
		t.Fatal(err)
	}

	try := func(when string, wantLocked func(name string) bool) {
		t.Helper()
		for name, p := range pieces {
			err := f.admin.Remove(ctx, h(backend.WAL, p))
			switch {
			case wantLocked(name) && !errors.Is(err, ErrLocked):
				t.Errorf("%s: remove WAL %s: %v, want ErrLocked", when, name, err)
			case wantLocked(name) && !strings.Contains(err.Error(), snap.String()):
				t.Errorf("%s: refusal %q does not name snapshot %s", when, err, snap)
			case !wantLocked(name) && err != nil && !errors.Is(err, backend.ErrNotExist):
				t.Errorf("%s: remove WAL %s: %v, want success", when, name, err)
			}
		}
	}
	// Past the minimum retention, within the lock: only WAL outside the
	// range goes; the refusal names the snapshot and its date.
	f.clock.Set(received.Add(2 * minRetention))
	try("past the minimum retention", func(n string) bool { return needed[n] })
	err = f.admin.Remove(ctx, h(backend.WAL, pieces["in range"]))
	if want := rec.Until.Format(time.RFC3339); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("refusal %v does not name the lock date %s", err, want)
	}

	// An extension carries the range: the WAL outlives the first lock.
	later := rec.Until.Add(10 * minRetention)
	rec2, err := f.app.ExtendLock(ctx, snap, later)
	if err != nil {
		t.Fatal(err)
	}
	if rec2.WAL == nil || *rec2.WAL != rng {
		t.Errorf("extension record WAL = %v, want %v", rec2.WAL, rng)
	}
	f.clock.Set(rec.Until.Add(time.Hour))
	try("after the first lock, within the extension", func(n string) bool { return needed[n] })

	// Once the lock expires, the range protects nothing.
	f.clock.Set(later.Add(time.Second))
	try("after the lock", func(string) bool { return false })
	listed := 0
	if err := f.rd.List(ctx, backend.WAL, func(backend.Info) error { listed++; return nil }); err != nil {
		t.Fatal(err)
	}
	if listed != 0 {
		t.Errorf("%d WAL pieces left after every lock expired", listed)
	}
}
