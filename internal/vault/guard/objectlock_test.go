package guard

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/s3test"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/s3"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// TestObjectLockDates checks, on a real bucket with Object Lock, the date
// each kind of object is locked until: written, at commit, on a lock
// extension and by ExtendObjectLocks; and that the storage refuses what the
// vault's own rules would allow while a storage lock lasts.
func TestObjectLockDates(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	be, err := s3.Create(ctx, srv.NewBucket(t, s3test.BucketOptions{}), s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	st := New(be, Options{LockGranularity: -1}) // exact dates, to compare
	admin, app := st.Session(Admin), st.Session(Append)
	const minRet = 2 * time.Hour

	retention := func(h backend.Handle) time.Time {
		t.Helper()
		until, err := be.Retention(ctx, h)
		if err != nil {
			t.Fatalf("Retention(%v): %v", h, err)
		}
		return until
	}
	// atLeast checks that h is locked until want or later (S3 keeps whole
	// seconds, rounded up).
	atLeast := func(h backend.Handle, want time.Time, what string) {
		t.Helper()
		if got := retention(h); got.Before(want.Truncate(time.Second)) {
			t.Errorf("%s %v: retained until %v, want at least %v", what, h, got, want)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	// Init saves the key before the config; saving the config locks it.
	start := time.Now()
	key := []byte("wrapped key")
	must(admin.Save(ctx, h(backend.Key, key), key))
	if got := retention(h(backend.Key, key)); !got.IsZero() {
		t.Errorf("key saved before the config retained until %v; nothing says how long yet", got)
	}
	must(admin.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, configBytes(t, minRet)))
	atLeast(backend.Handle{Type: backend.Config, Name: backend.ConfigName}, start.Add(minRet), "config")
	atLeast(h(backend.Key, key), start.Add(minRet), "key after the config")

	p1, p2, p3 := []byte("pack one"), []byte("pack two"), []byte("pack three")
	idx, idx3 := index(p1, p2), index(p3)
	wal := walPiece(format.WALHeader{Timeline: 1, Start: 0x1000000, End: 0x1000100})
	ledger := append([]byte("DKL1"), strings.Repeat("s", format.LedgerSealOverhead)...)
	ledgerH := backend.Handle{Type: backend.Ledger, Name: strings.Repeat("7", 64)}
	for _, p := range [][]byte{p1, p2, p3} {
		must(app.Save(ctx, h(backend.Pack, p), p))
	}
	must(app.Save(ctx, h(backend.Index, idx), idx))
	must(app.Save(ctx, h(backend.Index, idx3), idx3))
	must(app.Save(ctx, h(backend.WAL, wal), wal))
	must(app.Save(ctx, ledgerH, ledger))
	mark := []byte(`{"time":"2026-01-01T00:00:00Z","packs":[]}`)
	must(admin.Save(ctx, h(backend.Mark, mark), mark))
	for _, o := range []struct {
		h    backend.Handle
		what string
	}{
		{h(backend.Pack, p3), "pack"}, {h(backend.Index, idx3), "index"},
		{h(backend.WAL, wal), "WAL piece"}, {ledgerH, "ledger object"},
	} {
		atLeast(o.h, start.Add(minRet), o.what+" on arrival")
	}
	if got := retention(h(backend.Mark, mark)); !got.IsZero() {
		t.Errorf("mark retained until %v; prune's notes need no lock", got)
	}

	// Commit: the snapshot, its lock record, its packs and their index
	// until the snapshot's lock; the unrelated pack and index stay as
	// they were.
	rec, snap, err := app.Commit(ctx, format.CommitRequest{Snapshot: []byte("sealed snapshot"), Packs: ids(p1, p2), LockFor: format.Duration(5 * time.Hour)})
	must(err)
	snapH := backend.Handle{Type: backend.Snapshot, Name: snap.String()}
	for _, hh := range []backend.Handle{snapH, h(backend.Pack, p1), h(backend.Pack, p2), h(backend.Index, idx)} {
		atLeast(hh, rec.Until, "after commit")
	}
	if got := retention(h(backend.Pack, p3)); !got.Before(rec.Until) {
		t.Errorf("unused pack retained until %v, as long as the snapshot", got)
	}

	// Extending the lock extends the same objects.
	later := time.Now().Add(8 * time.Hour)
	rec2, err := app.ExtendLock(ctx, snap, later)
	must(err)
	for _, hh := range []backend.Handle{snapH, h(backend.Pack, p1), h(backend.Pack, p2), h(backend.Index, idx)} {
		atLeast(hh, rec2.Until, "after ExtendLock")
	}

	// The never-removed objects follow the latest lock with
	// ExtendObjectLocks; a second run has nothing left to do.
	if got := retention(ledgerH); !got.Before(rec2.Until) {
		t.Fatalf("ledger object already retained until %v: the test shows nothing", got)
	}
	rep, err := admin.ExtendObjectLocks(ctx, nil)
	must(err)
	if !rep.ObjectLock || rep.Extended == 0 || rep.Horizon.Before(rec2.Until) {
		t.Errorf("ExtendObjectLocks = %+v", rep)
	}
	for _, hh := range []backend.Handle{ledgerH, h(backend.Key, key), {Type: backend.Config, Name: backend.ConfigName}} {
		atLeast(hh, rec2.Until, "after ExtendObjectLocks")
	}
	rep, err = admin.ExtendObjectLocks(ctx, nil)
	must(err)
	if rep.Extended != 0 || rep.Checked == 0 {
		t.Errorf("second ExtendObjectLocks = %+v, want everything checked and nothing extended", rep)
	}
	if _, err := st.Session(Read).ExtendObjectLocks(ctx, nil); !errors.Is(err, ErrForbidden) {
		t.Errorf("ExtendObjectLocks with a read token: %v, want ErrForbidden", err)
	}

	// No live lock record lists p3, so the vault's rules would let an admin
	// remove it; the storage's lock still refuses.
	if err := admin.Remove(ctx, h(backend.Pack, p3)); !errors.Is(err, backend.ErrRetained) {
		t.Errorf("Remove of an unused pack under storage retention: %v, want ErrRetained", err)
	}
	// And the ledger object is refused by the vault itself, whatever the
	// storage says.
	if err := admin.Remove(ctx, ledgerH); !errors.Is(err, ErrForbidden) {
		t.Errorf("Remove of a ledger object: %v, want ErrForbidden", err)
	}
}

// TestObjectLockWALRange checks, on a real bucket, that committing a base
// backup with a WAL range locks the WAL pieces the range needs until the
// snapshot's (rounded) lock date, that extending the lock extends them, and
// that other WAL keeps the minimum retention from its arrival.
func TestObjectLockWALRange(t *testing.T) {
	srv := s3test.Start(t)
	ctx := context.Background()
	be, err := s3.Create(ctx, srv.NewBucket(t, s3test.BucketOptions{}), s3.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	st := New(be, Options{}) // daily rounding, as in production
	admin, app := st.Session(Admin), st.Session(Append)
	const minRet = 2 * time.Hour
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	retention := func(h backend.Handle) time.Time {
		t.Helper()
		until, err := be.Retention(ctx, h)
		if err != nil {
			t.Fatalf("Retention(%v): %v", h, err)
		}
		return until.UTC()
	}
	must(admin.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, configBytes(t, minRet)))

	seg := uint64(16 << 20)
	rng := format.WALRange{Timeline: 1, Start: 2 * seg, End: 3 * seg}
	in1 := walPiece(format.WALHeader{Timeline: 1, Start: 2 * seg, End: 2*seg + 4096})
	in2 := walPiece(format.WALHeader{Timeline: 1, Start: 3*seg - 4096, End: 3*seg + 4096})
	out := walPiece(format.WALHeader{Timeline: 1, Start: 4 * seg, End: 4*seg + 4096})
	for _, p := range [][]byte{in1, in2, out} {
		must(app.Save(ctx, h(backend.WAL, p), p))
	}
	arrival := retention(h(backend.WAL, out))

	rec, _, err := app.Commit(ctx, format.CommitRequest{Snapshot: []byte("sealed base backup"), LockFor: format.Duration(72 * time.Hour), WAL: &rng})
	must(err)
	rounded := func(t time.Time) time.Time {
		r := t.UTC().Truncate(DefaultLockGranularity)
		if r.Before(t) {
			r = r.Add(DefaultLockGranularity)
		}
		return r
	}
	for _, p := range [][]byte{in1, in2} {
		if got, want := retention(h(backend.WAL, p)), rounded(rec.Until); !got.Equal(want) {
			t.Errorf("WAL in range after commit: retained until %v, want the snapshot's %v", got, want)
		}
	}
	if got := retention(h(backend.WAL, out)); !got.Equal(arrival) {
		t.Errorf("WAL outside the range: retained until %v, want its arrival lock %v", got, arrival)
	}

	snap := format.Hash([]byte("sealed base backup"))
	rec2, err := app.ExtendLock(ctx, snap, rec.Until.Add(5*24*time.Hour))
	must(err)
	for _, p := range [][]byte{in1, in2} {
		if got, want := retention(h(backend.WAL, p)), rounded(rec2.Until); !got.Equal(want) {
			t.Errorf("WAL in range after ExtendLock: retained until %v, want %v", got, want)
		}
	}
	if got := retention(h(backend.WAL, out)); !got.Equal(arrival) {
		t.Errorf("WAL outside the range after ExtendLock: retained until %v, want %v", got, arrival)
	}

	// A piece that arrives after the commit (the agent streams the end of
	// the range later) is locked by ExtendObjectLocks, from a fresh Store
	// that knows nothing of earlier runs.
	late := walPiece(format.WALHeader{Timeline: 1, Start: 2*seg + 4096, End: 2*seg + 8192})
	must(app.Save(ctx, h(backend.WAL, late), late))
	if _, err := New(be, Options{}).Session(Admin).ExtendObjectLocks(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if got, want := retention(h(backend.WAL, late)), rounded(rec2.Until); !got.Equal(want) {
		t.Errorf("WAL arriving after the commit, after ExtendObjectLocks: retained until %v, want %v", got, want)
	}
	if got := retention(h(backend.WAL, out)); !got.Equal(arrival) {
		t.Errorf("WAL outside the range after ExtendObjectLocks: retained until %v, want %v", got, arrival)
	}
	// The storage refuses what the range protects.
	if err := admin.Remove(ctx, h(backend.WAL, in1)); err == nil {
		t.Error("removed a WAL piece a live base backup needs")
	}
}
