package gate

import (
	"crypto/ed25519"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/disktest"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/state"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// groupStatements groups batch as the recorder does, afresh.
func groupStatements(batch []queued) []ledger.Entry { return new(grouper).groupStatements(batch) }

// The recorder makes one "statements" record per session per batch, at
// its first statement's place; any other record is a barrier that keeps
// the order around it; groups are bounded; rows are there when known.
func TestGroupStatements(t *testing.T) {
	at := time.Date(2026, 12, 2, 12, 0, 0, 5, time.UTC)
	st := func(session, sql string, rows int64) queued {
		return queued{st: &ranStmt{session: session, db: "db-" + session, actor: "u-" + session, rule: "r",
			at: at, text: stmtText{Class: "write", Decision: "allow", SQL: sql}, rows: rows}}
	}
	ruled := func(rule string, q queued) queued { q.st.rule = rule; return q }
	other := func(kind string) queued { return queued{e: ledger.Entry{Kind: kind, Actor: "x"}} }
	// what shows the grouping: kind, then the SQL of each group's statements
	show := func(es []ledger.Entry) string {
		var b strings.Builder
		for _, e := range es {
			b.WriteString(e.Kind)
			if g, ok := e.Data.(*stmtGroup); ok {
				if g.Rule != "r" {
					b.WriteString("[" + g.Rule + "]")
				}
				fmt.Fprintf(&b, "(%s %s %s:", e.Actor, g.Session, g.DB)
				for _, it := range g.Statements {
					sql, err := g.Texts[it.Text].with(it.V)
					if err != nil {
						t.Fatal(err)
					}
					b.WriteString(" " + sql)
				}
				b.WriteString(")")
			}
			b.WriteString("; ")
		}
		return b.String()
	}
	for _, tc := range []struct {
		name  string
		batch []queued
		want  string
	}{
		{"one session", []queued{st("a", "1", 1), st("a", "2", 1), st("a", "3", 1)},
			"statements(u-a a db-a: 1 2 3); "},
		{"shapes and texts", []queued{st("a", "UPDATE t SET v = 1 WHERE id = 'x'", 1), st("a", "BEGIN", 1), st("a", "UPDATE t SET v = -2.5 WHERE id = 'it''s'", 1),
			st("a", "UPDATE t SET v = $1", 1), st("a", "BEGIN", 1), st("a", "UPDATE t SET v = 3 WHERE id > 'x'", 1)},
			"statements(u-a a db-a: UPDATE t SET v = 1 WHERE id = 'x' BEGIN UPDATE t SET v = -2.5 WHERE id = 'it''s' UPDATE t SET v = $1 BEGIN UPDATE t SET v = 3 WHERE id > 'x'); "},
		{"sessions interleaved", []queued{st("a", "1", 1), st("b", "2", 1), st("a", "3", 1), st("b", "4", 1)},
			"statements(u-a a db-a: 1 3); statements(u-b b db-b: 2 4); "},
		{"a barrier", []queued{st("a", "1", 1), st("b", "2", 1), other("session.close"), st("a", "3", 1), st("b", "4", 1)},
			"statements(u-a a db-a: 1); statements(u-b b db-b: 2); session.close; statements(u-a a db-a: 3); statements(u-b b db-b: 4); "},
		{"the rule changes", []queued{st("a", "1", 1), ruled("r2", st("a", "2", 1)), st("b", "3", 1), ruled("r2", st("a", "4", 1)), st("a", "5", 1), st("b", "6", 1)},
			"statements(u-a a db-a: 1); statements[r2](u-a a db-a: 2 4); statements(u-b b db-b: 3 6); statements(u-a a db-a: 5); "},
		{"only others", []queued{other("session.open"), other("statement")}, "session.open; statement; "},
		{"empty", nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := show(groupStatements(tc.batch)); got != tc.want {
				t.Errorf("got  %s\nwant %s", got, tc.want)
			}
		})
	}

	t.Run("bounded", func(t *testing.T) {
		var batch []queued
		for range maxGroupStatements + 1 {
			batch = append(batch, st("a", "x", 1))
		}
		if es := groupStatements(batch); len(es) != 2 || len(es[0].Data.(*stmtGroup).Statements) != maxGroupStatements {
			t.Errorf("%d statements made %d records, want %d and 1", maxGroupStatements+1, len(es), maxGroupStatements)
		}
		long := strings.Repeat("y", 4097)
		batch = batch[:0]
		for i := range 2*maxGroupText/len(long) + 1 {
			batch = append(batch, st("a", long+strconv.Itoa(i), 1)) // distinct: a text repeated is kept once
		}
		es := groupStatements(batch)
		for _, e := range es {
			if g := e.Data.(*stmtGroup); g.text > maxGroupText {
				t.Errorf("a group of %d bytes of SQL, limit %d", g.text, maxGroupText)
			}
		}
		if len(es) < 3 {
			t.Errorf("%d statements of 4 KiB in %d records", len(batch), len(es))
		}
		worst := strings.Repeat("\x01", 4096) // escaped as \u0001: six bytes each
		batch = batch[:0]
		for i := range maxGroupText / (len(worst) + 4) {
			batch = append(batch, st("a", worst+strconv.Itoa(i), 1))
		}
		for range maxGroupStatements {
			batch = append(batch, queued{st: &ranStmt{session: "a", rule: "r", at: at.Add(1000 * time.Hour), text: stmtText{SQL: worst + "0"},
				err: "XX000", request: strings.Repeat("r", 64), rows: math.MaxInt64}}) // the largest item
		}
		b, err := json.Marshal(groupStatements(batch)[0].Data)
		if err != nil || len(b) > ledger.MaxRecordSize-1024 {
			t.Errorf("the largest group encodes to %d bytes (%v), the ledger takes %d", len(b), err, ledger.MaxRecordSize)
		}

		// Texts cut at literals: each piece costs its quotes and comma,
		// "<" its escape (\u003c), a literal of control characters theirs.
		// New shapes each time, then one shape with new literals each time.
		batch = batch[:0]
		for i := range 100 {
			batch = append(batch, st("a", strings.Repeat("1<", 2040)+"x"+strconv.Itoa(i), 1))
		}
		for range maxGroupStatements {
			batch = append(batch, st("a", "SELECT "+strings.Repeat("'\x01',", 585)+"'\x01'", 1))
		}
		es = groupStatements(batch)
		for _, e := range es {
			g := e.Data.(*stmtGroup)
			b, err := json.Marshal(g)
			if err != nil || len(b) > ledger.MaxRecordSize-1024 || g.text > maxGroupText {
				t.Errorf("a group of %d statements, %d texts, costing %d, encodes to %d bytes (%v), the ledger takes %d",
					len(g.Statements), len(g.Texts), g.text, len(b), err, ledger.MaxRecordSize)
			}
			if len(g.Texts[0].Parts) == 0 {
				t.Errorf("a text not cut at its literals: %.40q", g.Texts[0].SQL)
			}
		}
		if len(es) < 3 {
			t.Errorf("%d statements with literals in %d records", len(batch), len(es))
		}
	})

	t.Run("encoding", func(t *testing.T) {
		b := []queued{st("a", "UPDATE t SET a = '<&>'", 7), st("a", "SELECT 1", 0), st("a", "INSERT", -1), st("a", "SELECT 1", 2), st("a", "SELECT 1", 3)}
		b[1].st.at = at.Add(1500 * time.Nanosecond)
		b[2].st.err, b[2].st.at = "23505", at.Add(-time.Microsecond)
		b[3].st.request, b[3].st.text.Decision = "req1", "approved"
		b[4].st.at = at.Add(90 * time.Minute)
		data := groupStatements(b)[0].Data
		got, err := json.Marshal(data)
		if err != nil {
			t.Fatal(err)
		}
		// The keys are in a map's order, as in every other record; each
		// distinct text once, with its class and decision, and cut at its
		// literals when it has any (each statement gives its own); times
		// in µs after the first, which is clipped to the µs.
		want := `{"db":"db-a","from":"2026-12-02T12:00:00Z","rule":"r","session":"a","statements":[` +
			`{"rows":7,"t":0,"us":0,"v":["'\u003c\u0026\u003e'"]},{"rows":0,"t":1,"us":1,"v":["1"]},{"error":"23505","t":2,"us":-1},` +
			`{"request":"req1","rows":2,"t":3,"us":0,"v":["1"]},{"rows":3,"t":1,"us":5400000000,"v":["1"]}],"texts":[` +
			`{"class":"write","decision":"allow","parts":["UPDATE t SET a = ",""]},` +
			`{"class":"write","decision":"allow","parts":["SELECT ",""]},` +
			`{"class":"write","decision":"allow","sql":"INSERT"},` +
			`{"class":"write","decision":"approved","parts":["SELECT ",""]}]}`
		if string(got) != want {
			t.Errorf("got  %s\nwant %s", got, want)
		}

		// Read back, each statement is whole again (to the µs).
		back, err := ParseStatements(got)
		if err != nil {
			t.Fatal(err)
		}
		if back.DB != "db-a" || back.Rule != "r" || back.Session != "a" || len(back.Statements) != len(b) {
			t.Fatalf("read back %+v", back)
		}
		for i, q := range b {
			g := back.Statements[i]
			wantRows := q.st.rows
			if g.Rows == nil {
				wantRows = -1
			} else if *g.Rows != q.st.rows {
				t.Errorf("statement %d: rows %d, want %d", i, *g.Rows, q.st.rows)
			}
			if !g.At.Equal(q.st.at.Truncate(time.Microsecond)) || g.Class != q.st.text.Class || g.Decision != q.st.text.Decision ||
				g.SQL != q.st.text.SQL || g.Error != q.st.err || g.Request != q.st.request || wantRows != q.st.rows {
				t.Errorf("statement %d read back as %+v, was %+v", i, g, *q.st)
			}
		}
	})

	t.Run("read", func(t *testing.T) {
		for _, tc := range []struct{ name, data, want string }{
			// The form before texts, as ledgers written then hold it.
			{"earlier form", `{"db":"d","rule":"r","session":"s","statements":[` +
				`{"at":"2026-12-02T12:00:00.000000005Z","class":"write","decision":"allow","rows":7,"sql":"UPDATE t"},` +
				`{"at":"2026-12-02T12:00:01Z","class":"ddl","decision":"approved","error":"42P07","request":"q","sql":"CREATE TABLE t ()"}]}`,
				"2026-12-02T12:00:00.000000005Z write allow 7 - - UPDATE t; 2026-12-02T12:00:01Z ddl approved ? 42P07 q CREATE TABLE t (); "},
			{"current form", `{"db":"d","from":"2026-12-02T12:00:00Z","rule":"r","session":"s","statements":[{"rows":1,"t":0,"us":2},{"t":0,"us":3000001}],` +
				`"texts":[{"class":"write","decision":"allow","sql":"DELETE FROM t WHERE id = $1"}]}`,
				"2026-12-02T12:00:00.000002Z write allow 1 - - DELETE FROM t WHERE id = $1; 2026-12-02T12:00:03.000001Z write allow ? - - DELETE FROM t WHERE id = $1; "},
			{"literals", `{"db":"d","from":"2026-12-02T12:00:00Z","rule":"r","session":"s","statements":[{"t":0,"us":1,"v":["-5","'a''b'"]},{"t":1,"us":2},{"t":0,"us":3,"v":["7","''"]}],` +
				`"texts":[{"class":"write","decision":"allow","parts":["UPDATE t SET v = v + ", " WHERE k = ", ""]},{"class":"write","decision":"allow","sql":"BEGIN"}]}`,
				"2026-12-02T12:00:00.000001Z write allow ? - - UPDATE t SET v = v + -5 WHERE k = 'a''b'; 2026-12-02T12:00:00.000002Z write allow ? - - BEGIN; " +
					"2026-12-02T12:00:00.000003Z write allow ? - - UPDATE t SET v = v + 7 WHERE k = ''; "},
			{"too few literals", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":0,"us":0,"v":["1"]}],"texts":[{"parts":["a","b","c"]}]}`, "error"},
			{"too many literals", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":0,"us":0,"v":["1","2"]}],"texts":[{"parts":["a","b"]}]}`, "error"},
			{"no literals for parts", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":0,"us":0}],"texts":[{"parts":["a","b"]}]}`, "error"},
			{"literals without parts", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":0,"us":0,"v":["1"]}],"texts":[{"sql":"a"}]}`, "error"},
			{"parts and sql", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":0,"us":0,"v":["1"]}],"texts":[{"parts":["a","b"],"sql":"a1b"}]}`, "error"},
			{"literals in the earlier form", `{"statements":[{"at":"2026-12-02T12:00:00Z","sql":"a","v":["1"]}]}`, "error"},
			{"a text out of range", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":1,"us":0}],"texts":[{"sql":"x"}]}`, "error"},
			{"a negative text", `{"from":"2026-12-02T12:00:00Z","statements":[{"t":-1,"us":0}],"texts":[{"sql":"x"}]}`, "error"},
			{"not JSON", `{"statements":[`, "error"},
			{"a wrong type", `{"statements":[{"t":"0"}],"texts":[]}`, "error"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				got, err := ParseStatements([]byte(tc.data))
				var b strings.Builder
				if err != nil {
					b.WriteString("error")
				}
				for _, st := range got.Statements {
					rows, orNone := "?", func(s string) string {
						if s == "" {
							return "-"
						}
						return s
					}
					if st.Rows != nil {
						rows = strconv.FormatInt(*st.Rows, 10)
					}
					fmt.Fprintf(&b, "%s %s %s %s %s %s %s; ", st.At.Format(time.RFC3339Nano), st.Class, st.Decision, rows, orNone(st.Error), orNone(st.Request), st.SQL)
				}
				if b.String() != tc.want {
					t.Errorf("got  %s\nwant %s", b.String(), tc.want)
				}
			})
		}
	})
}

// ranIn returns the statements a "statements" record holds (none for
// another kind).
func ranIn(t *testing.T, r ledger.Record) []Statement {
	t.Helper()
	if r.Kind != ledger.KindStatements {
		return nil
	}
	g, err := ParseStatements(r.Data)
	if err != nil {
		t.Fatalf("record %d: %v", r.Seq, err)
	}
	if len(g.Statements) == 0 || g.Session == "" || g.DB == "" || r.Actor == "" {
		t.Fatalf("record %d: an incomplete statements record: %s", r.Seq, r.Data)
	}
	return g.Statements
}

// TestLedgerOutage: while the ledger cannot be written the gate refuses
// every statement with 58000 and keeps the records it could not write;
// when the store is back it writes them, in one chain that verifies, and
// statements run again. The store fails (a PostgreSQL state store
// stopped), or stalls (another process holds SQLite's write lock).
func TestLedgerOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL servers")
	}
	upstream := pgtest.Start(t, pgtest.Options{})
	upstream.Exec("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'brokered-secret'")
	upstream.Exec("postgres", "CREATE DATABASE shop OWNER app_owner")
	upstream.Exec("postgres", "CREATE DATABASE bench OWNER app_owner")

	t.Run("store down", func(t *testing.T) {
		// A queue the statements that run before the outage is noticed
		// fill: the recorder must keep taking from it while it retries, or
		// the event loop, blocked on it, never refuses anything.
		defer func(n int) { recordQueue = n }(recordQueue)
		recordQueue = 4
		store := pgtest.Start(t, pgtest.Options{})
		store.Exec("postgres", "CREATE DATABASE dualkey_state")
		e := startGateOn(t, upstream, store.URL("dualkey_state"), nil)
		ledgerOutage(t, e, "t1", 0, store.Stop, store.Start)
	})

	t.Run("disk full", func(t *testing.T) {
		// SQLite on a disk that fills up, with ledger_sync as the gate
		// runs by default: the commit that does not fit fails (SQLite
		// writes the WAL as it commits), and the recorder keeps its batch.
		dir := disktest.Tmpfs(t, "16m")
		filler := filepath.Join(dir, "filler")
		e := startGateOn(t, upstream, filepath.Join(dir, "state.db"), nil, state.WithLedgerSync(time.Second))
		ledgerOutage(t, e, "t3", 0, func() { fillDisk(t, filler) }, func() {
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
		})
	})

	t.Run("store stalled", func(t *testing.T) {
		defer func(d time.Duration) { recordStall = d }(recordStall)
		recordStall = 300 * time.Millisecond
		e := startGate(t, upstream, nil)
		ctx := ctxT(t, time.Minute)
		other, err := sql.Open("sqlite", filepath.Join(e.dir, "state.db"))
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		lock, err := other.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer lock.Close()
		// Within 15 s: the stalled write itself would only give up after
		// 30 (the recorder's deadline; SQLite's busy waits retry until it).
		ledgerOutage(t, e, "t2", 15*time.Second, func() {
			if _, err := lock.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
				t.Fatal(err)
			}
		}, func() {
			if _, err := lock.ExecContext(ctx, "ROLLBACK"); err != nil {
				t.Fatal(err)
			}
		})
	})
}

// ledgerOutage runs inserts into table through e until down() makes the
// gate refuse them (within, if not 0), checks that reads are refused too,
// calls up(), waits for statements to run again and checks every insert
// that ran has its one record.
func ledgerOutage(t *testing.T, e *env, table string, within time.Duration, down, up func()) {
	ctx := ctxT(t, 3*time.Minute)
	c := e.connect("shop")
	if _, err := c.Exec(ctx, "CREATE TABLE "+table+" (id int)"); err != nil {
		t.Fatal(err)
	}
	refused := func(err error) bool {
		var pe *pgconn.PgError
		return errors.As(err, &pe) && pe.Code == "58000" && strings.Contains(pe.Message, "audit ledger")
	}
	insert := func(i int) string { return fmt.Sprintf("INSERT INTO %s VALUES (%d)", table, i) }

	e.g.rec.flush()
	down()
	since := time.Now()
	// The statement that meets the outage still runs (its record is
	// written after it); the failed or stalled write refuses the next.
	ran := 0
	for i := 0; ; i++ {
		_, err := c.Exec(ctx, insert(i))
		if refused(err) {
			break
		}
		if err != nil {
			t.Fatalf("insert %d: %v", i, err)
		}
		ran++
		if ctx.Err() != nil || i > 100000 {
			t.Fatal("statements still run with the ledger down")
		}
	}
	if ran == 0 {
		t.Fatal("no statement ran before the outage was noticed: the test shows nothing about records kept")
	}
	if d := time.Since(since); within > 0 && d > within {
		t.Fatalf("statements ran for %v with the ledger down (%d of them), want refusals within %v", d, ran, within)
	}
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeCacheStatement} {
		if _, err := c.Exec(ctx, "SELECT 1", mode); !refused(err) {
			t.Errorf("%v: a read with the ledger down: %v, want 58000", mode, err)
		}
	}
	if n := e.srv.Query("shop", "SELECT count(*) FROM "+table); n != strconv.Itoa(ran) {
		t.Fatalf("%s rows in %s, %d inserts ran", n, table, ran)
	}

	up()
	for {
		_, err := c.Exec(ctx, insert(-1))
		if err == nil {
			break
		}
		if !refused(err) || ctx.Err() != nil {
			t.Fatalf("after the store came back: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.g.rec.flush()
	inserts := map[string]int{}
	err := e.db.Ledger().Read(ctx, 1, func(_ uint64, rec []byte) error {
		r, err := ledger.ParseRecord(rec)
		if err != nil {
			return err
		}
		for _, st := range ranIn(t, r) {
			if strings.HasPrefix(st.SQL, "INSERT INTO "+table) {
				inserts[st.SQL]++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range ran {
		if inserts[insert(i)] != 1 {
			t.Errorf("%q: %d records, want 1 (records %v)", insert(i), inserts[insert(i)], inserts)
		}
	}
	if inserts[insert(-1)] != 1 || len(inserts) != ran+1 {
		t.Errorf("records %v: want the %d inserts that ran and the one after", inserts, ran)
	}
	rep, err := ledger.Verify(ctx, e.db.Ledger(), nil, ed25519.NewKeyFromSeed(make([]byte, 32)).Public().(ed25519.PublicKey))
	if err != nil || !rep.OK() {
		t.Errorf("the ledger does not verify: %v %+v", err, rep)
	}
}

// A statement that may carry a password never reaches the ledger's text,
// whatever the case of the keyword; others are kept, clipped at 4 KiB.
func TestAuditText(t *testing.T) {
	const withheld = "(text withheld: it may contain a password)"
	for _, tc := range []struct{ sql, want string }{
		{"ALTER ROLE app PASSWORD 'hunter2'", withheld},
		{"create role x login password 's3cret'", withheld},
		{"CREATE USER x WITH PaSsWoRd 'a'", withheld},
		{"ALTER ROLE x PASSWORD", withheld},
		{"password", withheld},
		{"SELECT passwor, d FROM t", "SELECT passwor, d FROM t"},
		{"SELECT pass_word FROM t", "SELECT pass_word FROM t"},
		{"UPDATE t SET v = 1 WHERE id = 2", "UPDATE t SET v = 1 WHERE id = 2"},
		{"", ""},
		{strings.Repeat("x", 5000), strings.Repeat("x", 4096) + "…"},
	} {
		if got := auditText(tc.sql); got != tc.want {
			t.Errorf("auditText(%.40q) = %.60q, want %.60q", tc.sql, got, tc.want)
		}
	}
}

// containsPassword agrees with a lowercase copy and strings.Contains, the
// way it was done before, on every input.
func FuzzContainsPassword(f *testing.F) {
	for _, s := range []string{"PASSWORD", "xpAsSwOrDx", "passwor", "PPASSWORD", "pässword", "\xffpassword", "password\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		// ToLower maps a few non-ASCII runes to ASCII letters (the Kelvin
		// sign to k); none of them is in "password", so the answers agree.
		if got, want := containsPassword(s), strings.Contains(strings.ToLower(s), "password"); got != want {
			t.Fatalf("containsPassword(%q) = %v, strings.ToLower says %v", s, got, want)
		}
	})
}

// A "statements" record is read back from a store that someone may have
// edited (docs/ledger.md): ParseStatements must refuse what it cannot
// read, never panic, and never name a text the record does not hold.
func FuzzParseStatements(f *testing.F) {
	at := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	b := []queued{
		{st: &ranStmt{session: "s", db: "d", actor: "a", rule: "r", at: at, text: stmtText{Class: "write", Decision: "allow", SQL: "UPDATE t SET v = 1"}, rows: 3}},
		{st: &ranStmt{session: "s", db: "d", actor: "a", rule: "r", at: at.Add(time.Millisecond), text: stmtText{Class: "ddl", Decision: "approved", SQL: "CREATE TABLE u ()"}, err: "42P07", request: "q", rows: -1}},
	}
	seed, err := json.Marshal(groupStatements(b)[0].Data)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte(`{"db":"d","rule":"r","session":"s","statements":[{"at":"2026-12-02T12:00:00Z","class":"write","decision":"allow","rows":7,"sql":"UPDATE t"}]}`))
	f.Add([]byte(`{"from":"2026-12-02T12:00:00Z","statements":[{"t":9223372036854775807,"us":-9223372036854775808}],"texts":[]}`))
	f.Add([]byte(`{"from":"2026-12-02T12:00:00Z","statements":[{"t":0,"us":0,"v":["1","'x'"]},{"t":1,"us":0,"v":[]}],"texts":[{"parts":["a "," b ",""]},{"parts":["c"]}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := ParseStatements(data)
		if err != nil {
			return
		}
		// Each statement is a text of the record (class, decision and
		// parts) with the literals it gives between the parts.
		var raw struct {
			Texts      []groupText `json:"texts"`
			Statements []struct {
				T int      `json:"t"`
				V []string `json:"v"`
			} `json:"statements"`
		}
		if json.Unmarshal(data, &raw) != nil || raw.Texts == nil {
			return
		}
		for i, st := range got.Statements {
			tx := raw.Texts[raw.Statements[i].T]
			v, sql := raw.Statements[i].V, st.SQL
			ok := tx.Class == st.Class && tx.Decision == st.Decision
			if tx.Parts == nil {
				ok = ok && len(v) == 0 && sql == tx.SQL
			} else {
				ok = ok && len(v) == len(tx.Parts)-1
				for j, p := range tx.Parts {
					if j > 0 && ok {
						ok = strings.HasPrefix(sql, v[j-1])
						sql = strings.TrimPrefix(sql, v[j-1])
					}
					ok = ok && strings.HasPrefix(sql, p)
					sql = strings.TrimPrefix(sql, p)
				}
				ok = ok && sql == ""
			}
			if !ok {
				t.Fatalf("statement %d (%+v) is not text %d (%+v) with %q", i, st, raw.Statements[i].T, tx, v)
			}
		}
	})
}

// fillDisk writes path until its disk is full.
func fillDisk(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); errors.Is(err, syscall.ENOSPC) {
			return
		} else if err != nil {
			t.Fatal(err)
		}
	}
}
