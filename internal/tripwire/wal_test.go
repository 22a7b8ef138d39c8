package tripwire

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
)

var update = flag.Bool("update", false, "rewrite testdata/drop-table.wal.gz from a real server")

// segSize is initdb's default, which pgtest uses.
const segSize = 16 << 20

func segName(tli uint32, lsn LSN) string {
	seg := uint64(lsn) / segSize
	return fmt.Sprintf("%08X%08X%08X", tli, seg/(0x100000000/segSize), seg%(0x100000000/segSize))
}

func lsnOf(t testing.TB, s string) LSN {
	t.Helper()
	hi, lo, ok := strings.Cut(strings.TrimSpace(s), "/")
	h, err1 := strconv.ParseUint(hi, 16, 32)
	l, err2 := strconv.ParseUint(lo, 16, 32)
	if !ok || err1 != nil || err2 != nil {
		t.Fatalf("bad LSN %q", s)
	}
	return LSN(h<<32 | l)
}

// readWAL returns the server's own WAL from the page holding from up to
// the end of the segment holding to, read from pg_wal on timeline 1.
func readWAL(t testing.TB, srv *pgtest.Server, from, to LSN) (LSN, []byte) {
	t.Helper()
	start := from - from%pageSize
	var out []byte
	for seg := start - start%segSize; seg <= to; seg += segSize {
		b, err := os.ReadFile(filepath.Join(srv.Dir, "pg_wal", segName(1, seg)))
		if err != nil {
			t.Fatal(err)
		}
		if seg < start {
			b = b[start-seg:]
		}
		out = append(out, b...)
	}
	return start, out
}

// decodeAll feeds wal to a new decoder in pieces of random sizes, as the
// agent would receive it, and returns the events and records seen.
func decodeAll(t testing.TB, opts Options, start LSN, wal []byte) ([]Event, []Record) {
	t.Helper()
	var recs []Record
	opts.OnRecord = func(r *Record) {
		c := *r
		c.Blocks, c.MainData = nil, nil
		recs = append(recs, c)
	}
	d := NewDecoder(opts)
	var events []Event
	rng := rand.New(rand.NewPCG(1, uint64(len(wal))))
	for pos := 0; pos < len(wal); {
		n := min(len(wal)-pos, 1+rng.IntN(3*pageSize))
		ev, err := d.Feed(start+LSN(pos), wal[pos:pos+n])
		if err != nil {
			t.Fatalf("Feed at %s: %v", start+LSN(pos), err)
		}
		events = append(events, ev...)
		pos += n
	}
	return events, recs
}

// dumped is one record as pg_waldump prints it.
type dumped struct {
	rmgr   string
	totLen uint32
	xid    uint32
	lsn    LSN
	desc   string
}

var dumpLine = regexp.MustCompile(`^rmgr: (\S+)\s+len \(rec/tot\):\s+\d+/\s*(\d+), tx:\s+(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F/]+, (?:desc: )?(.*)$`)

// waldump runs PostgreSQL's own pg_waldump over [from, to).
func waldump(t testing.TB, srv *pgtest.Server, from, to LSN) []dumped {
	t.Helper()
	cmd := exec.Command(pgtest.Bin("pg_waldump"), "-p", filepath.Join(srv.Dir, "pg_wal"), "-s", from.String(), "-e", to.String())
	out, err := cmd.Output()
	if err != nil && len(out) == 0 {
		t.Fatalf("pg_waldump: %v", err)
	}
	var recs []dumped
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<24)
	for sc.Scan() {
		m := dumpLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		tot, _ := strconv.ParseUint(m[2], 10, 32)
		xid, _ := strconv.ParseUint(m[3], 10, 32)
		recs = append(recs, dumped{rmgr: m[1], totLen: uint32(tot), xid: uint32(xid), lsn: lsnOf(t, m[4]), desc: m[5]})
	}
	return recs
}

func startServer(t *testing.T, extra ...string) *pgtest.Server {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	return pgtest.Start(t, pgtest.Options{Settings: append([]string{
		"track_commit_timestamp = on",
		"wal_keep_size = '4GB'",
		"max_wal_size = '4GB'",
	}, extra...)})
}

// loadNames fills a name cache from pg_class and pg_database as the agent
// will, before the objects are dropped.
func loadNames(t testing.TB, srv *pgtest.Server, db string, names *MapNames) {
	t.Helper()
	ctx := context.Background()
	c := srv.Conn(db)
	defer c.Close(ctx)
	rows, err := c.Query(ctx, `SELECT coalesce(nullif(c.reltablespace, 0), d.dattablespace)::int8, d.oid::int8,
		pg_relation_filenode(c.oid)::int8, c.oid::int8, n.nspname || '.' || c.relname
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_database d
		WHERE d.datname = current_database() AND pg_relation_filenode(c.oid) IS NOT NULL`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var spc, dbo, fn, oid int64
		var name string
		if err := rows.Scan(&spc, &dbo, &fn, &oid, &name); err != nil {
			t.Fatal(err)
		}
		names.SetRelation(RelFileNode{uint32(spc), uint32(dbo), uint32(fn)}, uint32(oid), name)
	}
	rows.Close()
	rows, err = c.Query(ctx, `SELECT oid::int8, datname FROM pg_database`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var oid int64
		var name string
		if err := rows.Scan(&oid, &name); err != nil {
			t.Fatal(err)
		}
		names.SetDatabase(uint32(oid), name)
	}
	rows.Close()
}

func relNode(t testing.TB, srv *pgtest.Server, db, rel string) RelFileNode {
	t.Helper()
	s := srv.Query(db, `SELECT coalesce(nullif(c.reltablespace, 0), d.dattablespace) || '/' || d.oid || '/' || pg_relation_filenode(c.oid)
		FROM pg_class c, pg_database d WHERE c.oid = $1::regclass AND d.datname = current_database()`, rel)
	var n RelFileNode
	if _, err := fmt.Sscanf(s, "%d/%d/%d", &n.Spc, &n.DB, &n.Rel); err != nil {
		t.Fatalf("relfilenode of %s: %q", rel, s)
	}
	return n
}

// scenario runs sql in a transaction (or, with noTx, as is) after noting
// the insert LSN, switches WAL and decodes what the server wrote.
type scenario struct {
	srv   *pgtest.Server
	names *MapNames
	start LSN
}

func (s *scenario) begin(t *testing.T) {
	s.start = lsnOf(t, s.srv.Query("postgres", "SELECT pg_current_wal_insert_lsn()::text"))
}

// finish switches WAL, decodes from the noted LSN and checks every record
// against pg_waldump; it returns the events whose LSN lies after the start.
func (s *scenario) finish(t *testing.T, opts Options) ([]Event, []dumped) {
	t.Helper()
	end := lsnOf(t, s.srv.Query("postgres", "SELECT pg_switch_wal()::text"))
	start, wal := readWAL(t, s.srv, s.start, end)
	opts.Names = s.names
	events, recs := decodeAll(t, opts, start, wal)
	dump := waldump(t, s.srv, s.start, end)
	compareDump(t, recs, dump, s.start, end)
	var out []Event
	for _, e := range events {
		if e.LSN >= s.start {
			out = append(out, e)
		}
	}
	return out, dump
}

// compareDump checks the decoder read exactly the records pg_waldump reads
// in [from, to): same LSNs, lengths, xids and resource managers.
func compareDump(t *testing.T, recs []Record, dump []dumped, from, to LSN) {
	t.Helper()
	var mine []Record
	for _, r := range recs {
		if r.LSN >= from && r.LSN < to {
			mine = append(mine, r)
		}
	}
	if len(mine) != len(dump) {
		t.Fatalf("decoded %d records in [%s, %s), pg_waldump %d", len(mine), from, to, len(dump))
	}
	rmgrs := map[string]uint8{"XLOG": RmXLOG, "Transaction": RmXact, "Storage": RmSmgr, "Database": RmDbase, "Standby": RmStandby, "Heap2": RmHeap2, "Heap": RmHeap}
	for i, d := range dump {
		r := mine[i]
		if r.LSN != d.lsn || r.TotLen != d.totLen || r.XID != d.xid {
			t.Fatalf("record %d: decoded lsn %s len %d xid %d; pg_waldump lsn %s len %d xid %d", i, r.LSN, r.TotLen, r.XID, d.lsn, d.totLen, d.xid)
		}
		if id, ok := rmgrs[d.rmgr]; ok && r.RmID != id {
			t.Fatalf("record %s: rmgr %d, pg_waldump %s", r.LSN, r.RmID, d.rmgr)
		}
	}
}

// commitOf finds the commit record of xid in a pg_waldump listing.
func commitOf(t *testing.T, dump []dumped, xid uint32) LSN {
	t.Helper()
	for _, d := range dump {
		if d.rmgr == "Transaction" && d.xid == xid && strings.HasPrefix(d.desc, "COMMIT") {
			return d.lsn
		}
	}
	t.Fatalf("no commit record for xid %d", xid)
	return 0
}

// runTx runs stmts in one transaction and returns its xid and commit time.
func runTx(t *testing.T, srv *pgtest.Server, db string, rollback bool, stmts ...string) (uint32, time.Time) {
	t.Helper()
	ctx := context.Background()
	c := srv.Conn(db)
	defer c.Close(ctx)
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range stmts {
		if _, err := tx.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	var xid int64
	if err := tx.QueryRow(ctx, "SELECT pg_current_xact_id()::text::int8").Scan(&xid); err != nil {
		t.Fatal(err)
	}
	if rollback {
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		return uint32(xid), time.Time{}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	return uint32(xid), commitTime(t, srv, uint32(xid))
}

func commitTime(t *testing.T, srv *pgtest.Server, xid uint32) time.Time {
	t.Helper()
	var ts time.Time
	c := srv.Conn("postgres")
	defer c.Close(context.Background())
	if err := c.QueryRow(context.Background(), "SELECT pg_xact_commit_timestamp($1::text::xid)", strconv.FormatUint(uint64(xid), 10)).Scan(&ts); err != nil {
		t.Fatal(err)
	}
	return ts.UTC()
}

func only(t *testing.T, events []Event, kind Kind) Event {
	t.Helper()
	var found []Event
	for _, e := range events {
		if e.Kind != kind {
			t.Errorf("unexpected event %v: %+v", e.Kind, e)
			continue
		}
		found = append(found, e)
	}
	if len(found) != 1 {
		t.Fatalf("want one %v event, got %d: %+v", kind, len(found), events)
	}
	return found[0]
}

func checkTx(t *testing.T, e Event, dump []dumped, xid uint32, at time.Time) {
	t.Helper()
	if e.XID != xid {
		t.Errorf("xid %d, want %d", e.XID, xid)
	}
	if want := commitOf(t, dump, xid); e.CommitLSN != want {
		t.Errorf("commit LSN %s, want %s", e.CommitLSN, want)
	}
	if !e.Time.Equal(at) {
		t.Errorf("time %s, want %s", e.Time, at)
	}
}

func nodesOf(rs []Relation) map[RelFileNode]string {
	m := map[RelFileNode]string{}
	for _, r := range rs {
		m[r.Node] = r.Name
	}
	return m
}

func TestRealWAL(t *testing.T) {
	srv := startServer(t)
	names := &MapNames{}
	sc := &scenario{srv: srv, names: names}
	srv.Exec("postgres", `
		CREATE TABLE victim (id int PRIMARY KEY, v text);
		INSERT INTO victim SELECT g, 'row ' || g FROM generate_series(1, 1000) g;
		CREATE SCHEMA app;
		CREATE TABLE app.orders (id int PRIMARY KEY, total numeric);
		CREATE TABLE app.lines (id int, qty int);
		INSERT INTO app.orders SELECT g, g FROM generate_series(1, 500) g;
		INSERT INTO app.lines SELECT g, g FROM generate_series(1, 500) g;
		CREATE TABLE tr (id int PRIMARY KEY, v int);
		INSERT INTO tr SELECT g, g FROM generate_series(1, 1000) g;
		CREATE TABLE big (id int, v int);
		INSERT INTO big SELECT g, g FROM generate_series(1, 20000) g;
		CREATE TABLE big2 (id int, v int);
		INSERT INTO big2 SELECT g, g FROM generate_series(1, 20000) g;
	`)
	srv.Exec("postgres", "CREATE DATABASE doomed")
	srv.Exec("doomed", "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
	loadNames(t, srv, "postgres", names)
	loadNames(t, srv, "doomed", names)

	t.Run("drop table", func(t *testing.T) {
		heap, idx := relNode(t, srv, "postgres", "victim"), relNode(t, srv, "postgres", "victim_pkey")
		sc.begin(t)
		xid, at := runTx(t, srv, "postgres", false, "DROP TABLE victim")
		events, dump := sc.finish(t, Options{})
		e := only(t, events, RelationsDropped)
		checkTx(t, e, dump, xid, at)
		if e.LSN != e.CommitLSN {
			t.Errorf("restore point %s, want the commit %s", e.LSN, e.CommitLSN)
		}
		got := nodesOf(e.Relations)
		if got[heap] != "public.victim" || got[idx] != "public.victim_pkey" {
			t.Errorf("relations %v, want %v named public.victim and %v public.victim_pkey", got, heap, idx)
		}
		if len(e.Relations) != 4 { // heap, index, toast, toast index
			t.Errorf("%d relations, want 4: %+v", len(e.Relations), e.Relations)
		}
		if e.DBName != "postgres" {
			t.Errorf("database %q", e.DBName)
		}
		if *update {
			saveCapture(t, srv, sc.start, e.CommitLSN)
		}
	})

	t.Run("drop schema cascade", func(t *testing.T) {
		orders, lines := relNode(t, srv, "postgres", "app.orders"), relNode(t, srv, "postgres", "app.lines")
		sc.begin(t)
		xid, at := runTx(t, srv, "postgres", false, "DROP SCHEMA app CASCADE")
		events, dump := sc.finish(t, Options{})
		e := only(t, events, RelationsDropped)
		checkTx(t, e, dump, xid, at)
		got := nodesOf(e.Relations)
		if got[orders] != "app.orders" || got[lines] != "app.lines" {
			t.Errorf("relations %v, want app.orders %v and app.lines %v", got, orders, lines)
		}
	})

	t.Run("truncate", func(t *testing.T) {
		old := relNode(t, srv, "postgres", "tr")
		sc.begin(t)
		xid, at := runTx(t, srv, "postgres", false, "TRUNCATE tr")
		events, dump := sc.finish(t, Options{})
		e := only(t, events, Truncate)
		checkTx(t, e, dump, xid, at)
		if got := nodesOf(e.Relations); got[old] != "public.tr" {
			t.Errorf("relations %v, want %v public.tr", got, old)
		}
		if _, ok := nodesOf(e.Created)[relNode(t, srv, "postgres", "tr")]; !ok {
			t.Errorf("created %v lacks the new relfilenode", e.Created)
		}
	})

	t.Run("mass delete", func(t *testing.T) {
		n := relNode(t, srv, "postgres", "big")
		sc.begin(t)
		xid, at := runTx(t, srv, "postgres", false, "DELETE FROM big")
		events, dump := sc.finish(t, Options{})
		e := only(t, events, MassDelete)
		checkTx(t, e, dump, xid, at)
		if len(e.Relations) != 1 || e.Relations[0].Node != n || e.Relations[0].Deletes != 20000 || e.Relations[0].Name != "public.big" {
			t.Errorf("relations %+v, want 20000 deletes of public.big %v", e.Relations, n)
		}
	})

	t.Run("mass update across a savepoint", func(t *testing.T) {
		n := relNode(t, srv, "postgres", "big2")
		sc.begin(t)
		xid, at := runTx(t, srv, "postgres", false,
			"UPDATE big2 SET v = v + 1 WHERE id <= 8000",
			"SAVEPOINT s",
			"UPDATE big2 SET v = v + 1 WHERE id > 8000",
			"RELEASE SAVEPOINT s")
		events, dump := sc.finish(t, Options{})
		e := only(t, events, MassUpdate)
		checkTx(t, e, dump, xid, at)
		if len(e.Relations) != 1 || e.Relations[0].Node != n || e.Relations[0].Updates != 20000 {
			t.Errorf("relations %+v, want 20000 updates of %v", e.Relations, n)
		}
	})

	t.Run("rolled back delete", func(t *testing.T) {
		sc.begin(t)
		runTx(t, srv, "postgres", true, "DELETE FROM big2", "DROP TABLE tr")
		events, _ := sc.finish(t, Options{})
		if len(events) != 0 {
			t.Errorf("rolled back transaction raised %+v", events)
		}
	})

	t.Run("drop database", func(t *testing.T) {
		oid, _ := strconv.ParseUint(srv.Query("postgres", "SELECT oid::text FROM pg_database WHERE datname = 'doomed'"), 10, 32)
		sc.begin(t)
		srv.Exec("postgres", "DROP DATABASE doomed")
		events, dump := sc.finish(t, Options{})
		e := only(t, events, DatabaseDrop)
		var drop, inplace dumped
		for _, d := range dump {
			if d.rmgr == "Database" && strings.HasPrefix(d.desc, "DROP") {
				drop = d
			}
			// DROP DATABASE first marks the database invalid in place
			// (PostgreSQL 15.4 and later): the restore point is there.
			if d.rmgr == "Heap" && strings.HasPrefix(d.desc, "INPLACE") && drop.xid == 0 && strings.Contains(d.desc, "/0/1262") {
				inplace = d
			}
		}
		if drop.xid == 0 {
			t.Fatal("pg_waldump shows no database drop")
		}
		checkTx(t, e, dump, drop.xid, commitTime(t, srv, drop.xid))
		want := drop.lsn
		if inplace.lsn != 0 {
			want = inplace.lsn
		} else if v := srv.Query("postgres", "SHOW server_version_num"); v >= "150004" {
			t.Errorf("PostgreSQL %s: pg_waldump shows no in-place update of pg_database before the drop", v)
		}
		if e.LSN != want {
			t.Errorf("restore point %s, want %s (in-place invalidation %s, drop record %s)", e.LSN, want, inplace.lsn, drop.lsn)
		}
		if e.DB != uint32(oid) || e.DBName != "doomed" || len(e.Tablespaces) != 1 || e.Tablespaces[0] != 1663 {
			t.Errorf("event %+v, want database %d doomed in tablespace 1663", e, oid)
		}
	})
}

// saveCapture writes the WAL from the page holding from to the page
// holding to (inclusive) as testdata: 8 bytes of start LSN, then the WAL.
func saveCapture(t *testing.T, srv *pgtest.Server, from, to LSN) {
	start, wal := readWAL(t, srv, from, to)
	wal = wal[:int(to-start)+pageSize-int(to%pageSize)]
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	binary.Write(zw, binary.LittleEndian, uint64(start))
	zw.Write(wal)
	zw.Close()
	if err := os.WriteFile("testdata/drop-table.wal.gz", buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPgbenchRaisesNothing(t *testing.T) {
	srv := startServer(t)
	sc := &scenario{srv: srv, names: &MapNames{}}
	sc.begin(t)
	srv.Pgbench("-i", "-s", "5", "postgres")
	srv.Pgbench("-c", "4", "-T", "10", "postgres")
	events, dump := sc.finish(t, Options{})
	if len(dump) < 10000 {
		t.Fatalf("only %d records: pgbench did not run?", len(dump))
	}
	for _, e := range events {
		t.Errorf("pgbench raised %v: %+v", e.Kind, e)
	}
}
