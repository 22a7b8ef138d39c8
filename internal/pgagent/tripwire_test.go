package pgagent

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/tripwire"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// relNodeOf returns the relfilenode of rel in db as the WAL names it.
func relNodeOf(t *testing.T, pg *pgtest.Server, db, rel string) tripwire.RelFileNode {
	t.Helper()
	s := pg.Query(db, `SELECT coalesce(nullif(c.reltablespace, 0), d.dattablespace) || ' ' || d.oid || ' ' || pg_relation_filenode(c.oid)
		FROM pg_class c, pg_database d WHERE c.oid = $1::regclass AND d.datname = current_database()`, rel)
	var n tripwire.RelFileNode
	f := strings.Fields(s)
	if len(f) != 3 {
		t.Fatalf("relfilenode of %s: %q", rel, s)
	}
	for i, p := range []*uint32{&n.Spc, &n.DB, &n.Rel} {
		v, err := parseUint32(f[i])
		if err != nil {
			t.Fatal(err)
		}
		*p = v
	}
	return n
}

func parseUint32(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 10, 32)
	return uint32(v), err
}

// The name cache against a real server: tables, their indexes and TOAST
// named as their table, a rename followed, and names kept after a drop.
func TestNameCache(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	ctx := context.Background()
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", "CREATE DATABASE app")
	pg.Exec("app", `CREATE SCHEMA shop; CREATE TABLE shop.orders (id int PRIMARY KEY, note text);
		INSERT INTO shop.orders SELECT g, repeat('x', 10) FROM generate_series(1, 10) g`)
	heap := relNodeOf(t, pg, "app", "shop.orders")
	pkey := relNodeOf(t, pg, "app", "shop.orders_pkey")
	toastName := pg.Query("app", "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'shop.orders'::regclass")
	toast := relNodeOf(t, pg, "app", toastName)
	dbOID, _ := parseUint32(pg.Query("postgres", "SELECT oid FROM pg_database WHERE datname = 'app'"))

	c := NewNameCache(pg.URL("postgres"))
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	check := func(n tripwire.RelFileNode, name, table string) {
		t.Helper()
		if got, ok := c.Relation(n); !ok || got != name {
			t.Errorf("Relation(%v) = %q, %v; want %q", n, got, ok, name)
		}
		if got, ok := c.Table(n); !ok || got != table {
			t.Errorf("Table(%v) = %q, %v; want %q", n, got, ok, table)
		}
	}
	check(heap, "shop.orders", "shop.orders")
	check(pkey, "shop.orders_pkey", "shop.orders")
	check(toast, toastName, "shop.orders")
	if got, ok := c.Database(dbOID); !ok || got != "app" {
		t.Errorf("Database(%d) = %q, %v", dbOID, got, ok)
	}
	oid, _ := parseUint32(pg.Query("app", "SELECT 'shop.orders'::regclass::oid"))
	if got, ok := c.RelationOID(dbOID, oid); !ok || got != "shop.orders" {
		t.Errorf("RelationOID = %q, %v", got, ok)
	}
	// Shared catalogs are in database 0 of the global tablespace.
	if got, ok := c.Relation(tripwire.RelFileNode{Spc: 1664, DB: 0, Rel: relNodeOf(t, pg, "app", "pg_database").Rel}); !ok || got != "pg_catalog.pg_database" {
		t.Errorf("pg_database: %q, %v", got, ok)
	}

	pg.Exec("app", "ALTER TABLE shop.orders RENAME TO orders_old")
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	check(heap, "shop.orders_old", "shop.orders_old")
	check(pkey, "shop.orders_pkey", "shop.orders_old")

	pg.Exec("app", "DROP TABLE shop.orders_old")
	pg.Exec("postgres", "DROP DATABASE app")
	if err := c.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	check(heap, "shop.orders_old", "shop.orders_old")
	check(toast, toastName, "shop.orders_old")
	if got, ok := c.Database(dbOID); !ok || got != "app" {
		t.Errorf("dropped database: %q, %v", got, ok)
	}
	if _, ok := c.Relation(tripwire.RelFileNode{Spc: 1663, DB: dbOID, Rel: 999999}); ok {
		t.Error("an unknown relfilenode has a name")
	}

	bad := NewNameCache("postgres://nobody@127.0.0.1:1/x?connect_timeout=2")
	if err := bad.Refresh(ctx); err == nil || !strings.Contains(err.Error(), "pg_database") {
		t.Errorf("unreachable server: %v", err)
	}
}

// detections collects what an agent's tripwire reports.
type detections struct {
	mu sync.Mutex
	ds []Detection
}

func (d *detections) add(_ context.Context, x Detection) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ds = append(d.ds, x)
}

// wait returns the first detection with an event of kind whose objects
// include obj (at a commit not in skip), waiting up to a generous deadline.
func (d *detections) wait(t *testing.T, kind tripwire.Kind, obj string, skip ...map[tripwire.LSN]tripwire.Kind) (Detection, tripwire.Event) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		d.mu.Lock()
		for _, x := range d.ds {
			for i, e := range x.Events {
				if _, old := lookup(skip, e.CommitLSN); !old && e.Kind == kind && slices.Contains(x.Objects[i], obj) {
					d.mu.Unlock()
					return x, e
				}
			}
		}
		d.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("no %v of %s detected; have %+v", kind, obj, d.all())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func lookup(ms []map[tripwire.LSN]tripwire.Kind, l tripwire.LSN) (tripwire.Kind, bool) {
	for _, m := range ms {
		if k, ok := m[l]; ok {
			return k, true
		}
	}
	return 0, false
}

func (d *detections) all() []Detection {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.ds)
}

// The tripwire in a streaming agent, against a real server: each kind of
// event from a superuser's own connection, named; nothing from pgbench;
// and an agent started again on the same vault finds the same commits
// again (the store deduplicates by commit LSN).
func TestAgentTripwire(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	r := repotest.New(t, 0).Repo
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", "CREATE DATABASE app")
	pg.Exec("postgres", "CREATE DATABASE doomed")
	pg.Exec("doomed", "CREATE TABLE d (id int); INSERT INTO d SELECT generate_series(1, 100)")
	pg.Exec("app", `CREATE TABLE keep (id int PRIMARY KEY, v text);
		INSERT INTO keep SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
		CREATE TABLE gone (id int PRIMARY KEY, v text); INSERT INTO gone SELECT g, 'x' FROM generate_series(1, 100) g;
		CREATE TABLE trunc (id int); INSERT INTO trunc SELECT generate_series(1, 100)`)
	pg.Pgbench("-i", "-s", "2", "-q", "app")

	det := &detections{}
	opts := AgentOptions{URL: pg.URL("postgres"), Slot: "tw", OnDetect: det.add, NamesEvery: time.Hour}
	ra := runAgent(t, r, opts)

	// A table created after the agent started is named too: the commit
	// that created its files asks for a refresh.
	pg.Exec("app", "CREATE TABLE fresh (id int); INSERT INTO fresh SELECT generate_series(1, 50)")
	time.Sleep(300 * time.Millisecond)

	pg.Pgbench("-c", "2", "-T", "3", "app")
	pg.Exec("app", "DROP TABLE gone")
	dropD, drop := det.wait(t, tripwire.RelationsDropped, "public.gone")
	t.Logf("DROP TABLE detected %v after the commit (received %v after)", dropD.Detected.Sub(drop.Time), dropD.Received.Sub(drop.Time))
	if drop.DBName != "app" || drop.XID == 0 || drop.LSN != drop.CommitLSN {
		t.Errorf("drop event %+v", drop)
	}
	if dropD.Detected.Before(drop.Time.Add(-time.Second)) || dropD.Received.After(dropD.Detected) {
		t.Errorf("times: commit %v, received %v, detected %v", drop.Time, dropD.Received, dropD.Detected)
	}
	pg.Exec("app", "DROP TABLE fresh")
	det.wait(t, tripwire.RelationsDropped, "public.fresh")
	pg.Exec("app", "TRUNCATE trunc")
	det.wait(t, tripwire.Truncate, "public.trunc")
	pg.Exec("app", "UPDATE keep SET v = 'y'")
	_, upd := det.wait(t, tripwire.MassUpdate, "public.keep")
	if n := upd.Relations[0].Updates; n != 20000 {
		t.Errorf("mass update counted %d rows", n)
	}
	pg.Exec("app", "DELETE FROM keep WHERE id <= 15000")
	_, del := det.wait(t, tripwire.MassDelete, "public.keep")
	if n := del.Relations[0].Deletes; n != 15000 {
		t.Errorf("mass delete counted %d rows", n)
	}
	pg.Exec("postgres", "DROP DATABASE doomed")
	_, dbDrop := det.wait(t, tripwire.DatabaseDrop, "doomed")
	if dbDrop.LSN >= dbDrop.CommitLSN {
		t.Errorf("database drop: restore point %v not before the commit %v", dbDrop.LSN, dbDrop.CommitLSN)
	}
	// pgbench (which ran between) raised nothing: every detection is one
	// of the statements above.
	first := map[tripwire.LSN]tripwire.Kind{}
	for _, x := range det.all() {
		for i, e := range x.Events {
			first[e.CommitLSN] = e.Kind
			ok := false
			for _, o := range x.Objects[i] {
				ok = ok || slices.Contains([]string{"public.gone", "public.fresh", "public.trunc", "public.keep", "doomed"}, o)
			}
			if !ok {
				t.Errorf("unexpected %v of %v at %v", e.Kind, x.Objects[i], e.CommitLSN)
			}
		}
	}

	// A server restart: the agent reconnects, the decoder goes on.
	pg.Restart()
	pg.Exec("app", "TRUNCATE pgbench_history, pgbench_tellers")
	_, tr := det.wait(t, tripwire.Truncate, "public.pgbench_tellers")
	first[tr.CommitLSN] = tr.Kind
	ra.waitDurable(t, currentLSN(t, pg), 30*time.Second)
	ra.stop(t)

	// A new agent on the same vault decodes the WAL it resumes in from
	// the start of its segment for context, and reports only what comes
	// after: nothing found twice, and no false alarm from transactions
	// whose beginning lies before (pgbench -i ran there).
	again := &detections{}
	opts.OnDetect = again.add
	ra2 := runAgent(t, r, opts)
	pg.Exec("app", "INSERT INTO keep SELECT g, 'z' FROM generate_series(20001, 40000) g")
	pg.Exec("app", "DELETE FROM keep")
	again.wait(t, tripwire.MassDelete, "public.keep", first)
	ra2.stop(t)
	if ds := again.all(); len(ds) != 1 {
		t.Errorf("second agent: %d detections, want only the new delete: %+v", len(ds), ds)
	}
}

// The hot path: what feed costs the receive loop per message, and how fast
// the decoder's goroutine consumes WAL, on WAL captured from a real server.
func BenchmarkTripwireFeed(b *testing.B) {
	raw, err := os.ReadFile("../tripwire/testdata/drop-table.wal.gz")
	if err != nil {
		b.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(raw))
	if err != nil {
		b.Fatal(err)
	}
	all, err := io.ReadAll(zr)
	if err != nil {
		b.Fatal(err)
	}
	start, wal := pgwal.LSN(binary.LittleEndian.Uint64(all)), all[8:]
	a := &Agent{opts: AgentOptions{OnDetect: func(context.Context, Detection) {}}}
	a.opts.applyDefaults()
	b.Run("feed", func(b *testing.B) {
		// The receive loop's cost: copy and enqueue one 8 KiB message.
		f := newTripwireFeed(a)
		ctx := context.Background()
		go func() {
			for range f.q {
			}
		}()
		msg := wal[:min(8192, len(wal))]
		b.SetBytes(int64(len(msg)))
		b.ReportAllocs()
		for b.Loop() {
			f.feed(ctx, 1, start, msg)
		}
		close(f.q)
	})
	b.Run("decode", func(b *testing.B) {
		f := newTripwireFeed(a)
		b.SetBytes(int64(len(wal)))
		b.ReportAllocs()
		events := 0
		a.opts.OnDetect = func(_ context.Context, d Detection) { events += len(d.Events) }
		for b.Loop() {
			// A decoder already under way (the capture starts mid-segment,
			// where a new one would first read the vault), then the
			// receive path: one 8 KiB message at a time.
			f.dec, f.tli = f.newDecoder(), 1
			ev, err := f.dec.Feed(tripwire.LSN(start), wal[:8192])
			if err != nil {
				b.Fatal(err)
			}
			f.report(context.Background(), walChunk{tli: 1, lsn: start}, ev)
			for off := 8192; off < len(wal); off += 8192 {
				f.decode(context.Background(), walChunk{tli: 1, lsn: start + pgwal.LSN(off), data: wal[off:min(off+8192, len(wal))]})
			}
		}
		if events == 0 {
			b.Fatal("the capture's DROP TABLE was not reported")
		}
	})
}

func TestRecoverySettingsBeforeLSN(t *testing.T) {
	o := RestoreOptions{BeforeLSN: 0x3000A28, WalFetchCommand: "/bin/fetch"}
	got := recoverySettings(&o, &BaseBackupInfo{}, time.Now(), "/usr/bin/dualkey")
	want := "restore_command = '/bin/fetch %f %p'\nrecovery_target_lsn = '0/3000A28'\nrecovery_target_inclusive = false\nrecovery_target_timeline = 'latest'\nrecovery_target_action = 'promote'"
	if g := strings.Join(got[1:], "\n"); g != want {
		t.Errorf("settings:\n%s\nwant:\n%s", g, want)
	}
	o.Target, o.LSN = "/x", 5
	if err := o.check(); err != ErrBadTarget {
		t.Errorf("two targets: %v", err)
	}
}
