package pgagent

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
	"github.com/dualkey/dualkey/internal/vault/retention"
)

// vaultClock is the vault's injected clock, moved forward by the test.
type vaultClock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *vaultClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *vaultClock) Advance(d time.Duration) { c.mu.Lock(); c.off += d; c.mu.Unlock() }

// TestBaseBackupKeepsItsWAL: a base backup locked for a year, with the
// vault's minimum retention an hour. A month later on the vault's clock,
// after prune and after an admin removed every WAL piece the vault lets go,
// the WAL the backup needs is still there, WAL outside its range is gone,
// and the backup restores to a consistent server.
func TestBaseBackupKeepsItsWAL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	ctx := context.Background()
	v := newPGVault(t) // the wal-fetch stand-in and password file; a vault of our own below
	v.dir = filepath.Join(filepath.Dir(v.dir), "vault-clocked")
	clock := &vaultClock{}
	be, err := local.Create(ctx, v.dir)
	if err != nil {
		t.Fatal(err)
	}
	st := guard.New(be, guard.Options{Now: clock.Now})
	r, err := repo.Init(ctx, st.Session(guard.Admin), repotest.Password, repo.InitOptions{MinRetention: time.Hour}, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()

	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTable)
	actx, stopAgent := context.WithCancel(ctx)
	defer stopAgent()
	agent := NewAgent(r, AgentOptions{URL: pg.URL("postgres"), FlushEvery: 50 * time.Millisecond, Slot: "walrange"})
	agentDone := make(chan error, 1)
	go func() { agentDone <- agent.Run(actx) }()

	// WAL before the backup, then the backup, then WAL after it, each a
	// few segments long.
	for range 2 {
		pg.Exec("postgres", "INSERT INTO known (v) SELECT md5(g::text) FROM generate_series(1, 2000) g")
		pg.Exec("postgres", "SELECT pg_switch_wal()")
	}
	bb, err := BaseBackup(ctx, r, pg.ReplicationURL(), BaseBackupOptions{LockFor: 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		pg.Exec("postgres", "SELECT pg_switch_wal()")
		pg.Exec("postgres", "INSERT INTO known (v) SELECT md5(g::text) FROM generate_series(1, 2000) g")
	}
	pg.Exec("postgres", "SELECT pg_switch_wal()")
	waitAgentHolds(t, agent, pg, 60*time.Second)
	stopAgent()
	if err := <-agentDone; err != nil {
		t.Fatal(err)
	}
	pg.Crash()

	seg := uint64(pgwal.DefaultSegmentSize)
	want := format.WALRange{Timeline: bb.Meta.Timeline, Start: uint64(bb.Meta.StartLSN) / seg * seg, End: (uint64(bb.Meta.EndLSN)/seg + 1) * seg}
	if bb.Lock.WAL == nil || *bb.Lock.WAL != want {
		t.Fatalf("lock record WAL %v, want %v (backup %v-%v)", bb.Lock.WAL, want, bb.Meta.StartLSN, bb.Meta.EndLSN)
	}

	// A month later on the vault's clock: past the minimum retention,
	// within the backup's lock.
	clock.Advance(30 * 24 * time.Hour)
	admin := st.Session(guard.Admin)
	listWAL := func() []string {
		var names []string
		if err := admin.List(ctx, backend.WAL, func(fi backend.Info) error { names = append(names, fi.Name); return nil }); err != nil {
			t.Fatal(err)
		}
		return names
	}
	before := len(listWAL())
	// Prune deletes packs only; it never tries WAL.
	for range 2 {
		if _, err := retention.Prune(ctx, r, retention.PruneOptions{Grace: time.Nanosecond, Now: clock.Now}); err != nil {
			t.Fatal(err)
		}
	}
	names := listWAL()
	if len(names) != before {
		t.Errorf("prune changed the WAL pieces: %d before, %d after", before, len(names))
	}
	removed, kept := 0, 0
	for _, n := range names {
		h := backend.Handle{Type: backend.WAL, Name: n}
		head, err := admin.Load(ctx, h, 0, format.WALHeaderSize)
		if err != nil {
			t.Fatal(err)
		}
		hd, _, err := format.ParseWALHeader(head)
		if err != nil {
			t.Fatal(err)
		}
		err = admin.Remove(ctx, h)
		switch {
		case want.Needs(hd) && !errors.Is(err, guard.ErrLocked):
			t.Errorf("remove WAL %X-%X the backup needs: %v, want ErrLocked", hd.Start, hd.End, err)
		case want.Needs(hd):
			kept++
		case err != nil:
			t.Errorf("remove WAL %X-%X outside the backup's range: %v", hd.Start, hd.End, err)
		default:
			removed++
		}
	}
	t.Logf("%d WAL pieces: %d outside %v removed, %d kept", len(names), removed, want, kept)
	if removed == 0 || kept == 0 {
		t.Fatalf("removed %d, kept %d: the test shows nothing", removed, kept)
	}

	// The old backup still restores: its WAL makes it consistent.
	if err := pgtest.Own(v.dir); err != nil {
		t.Fatal(err)
	}
	bs, _, err := Backups(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 1 || !bs[0].Usable {
		t.Fatalf("backups after removing WAL: %+v, want the base backup usable", bs)
	}
	o := v.opts(newTarget(t))
	o.Latest = true
	if _, err := Restore(ctx, r, o); err != nil {
		t.Fatal(err)
	}
	srv := pgtest.Attach(t, o.Target)
	srv.Start()
	waitPrimary(t, srv)
	if got := srv.Query("postgres", "SELECT count(*) >= 4000 FROM known"); got != "true" {
		t.Errorf("restored server: count(*) >= 4000 is %s; the rows written before the backup are missing", got)
	}
}
