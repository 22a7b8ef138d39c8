package gate

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

const alicePW = "alice-password-1"

func approverKey(name string) ed25519.PrivateKey {
	seed := sha256.Sum256([]byte("gate test approver " + name))
	return ed25519.NewKeyFromSeed(seed[:])
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// env is a real PostgreSQL 15, a state store with users and a quorum
// policy (bob and carol approve, 2 of 2), and a gate in front.
type env struct {
	t    testing.TB
	srv  *pgtest.Server
	db   *state.DB
	led  *ledger.Ledger
	svc  *quorum.Service
	g    *Gate
	addr string
	dir  string
}

const testPolicy = `
listen: 127.0.0.1:0
tls: {generate: true, require_tls: false}
upstreams:
  shop: {host: 127.0.0.1, port: %d, user: app_owner, password: brokered-secret, sslmode: disable}
  bench: {host: 127.0.0.1, port: %d, user: app_owner, password: brokered-secret, sslmode: disable}
groups:
  ops: [alice]
rules:
  - {name: reads-writes, groups: [ops], databases: [shop], classes: [read, write, ddl], action: allow, max_rows: 5}
  - {name: bench, groups: [ops], databases: [bench], classes: [read, write], action: allow, max_rows: 1000}
  - {name: destructive, groups: [ops], databases: ["*"], classes: [destructive], action: hold}
  - {name: no-admin, users: ["*"], databases: ["*"], classes: [privileged, unknown], action: deny, message: ask the DBA team}
`

func newEnv(t testing.TB, mod func(*Config)) *env {
	t.Helper()
	srv := pgtest.Start(t, pgtest.Options{})
	srv.Exec("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'brokered-secret'")
	srv.Exec("postgres", "CREATE DATABASE shop OWNER app_owner")
	srv.Exec("postgres", "CREATE DATABASE bench OWNER app_owner")
	return startGate(t, srv, mod)
}

func startGate(t testing.TB, srv *pgtest.Server, mod func(*Config)) *env {
	t.Helper()
	return startGateOn(t, srv, "", mod)
}

// startGateOn is startGate with its state store at stateDSN (""; SQLite in
// a temporary directory), opened with opts.
func startGateOn(t testing.TB, srv *pgtest.Server, stateDSN string, mod func(*Config), opts ...state.Option) *env {
	t.Helper()
	dir := t.TempDir()
	e := &env{t: t, srv: srv, dir: dir}
	ctx := ctxT(t, time.Minute)
	if stateDSN == "" {
		stateDSN = filepath.Join(dir, "state.db")
	}
	var err error
	if e.db, err = state.Open(ctx, stateDSN, opts...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.db.Close() })
	if e.led, err = ledger.Open(ctx, e.db.Ledger(), nil, ed25519.NewKeyFromSeed(make([]byte, 32)), ledger.Options{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.led.Close(context.Background()) })
	e.svc = quorum.New(e.db, e.led, quorum.Options{PollInterval: 10 * time.Millisecond})
	p := &cert.Policy{Rules: []cert.Rule{{Name: "sql", Actions: []string{"sql:*"}, Threshold: 2},
		{Name: "policy", Actions: []string{"policy:change"}, Threshold: 2}}}
	for _, n := range []string{"bob", "carol"} {
		p.Approvers = append(p.Approvers, cert.Approver{Name: n, PublicKey: approverKey(n).Public().(ed25519.PublicKey)})
	}
	if err := e.svc.Init(ctx, p); err != nil {
		t.Fatal(err)
	}
	v, err := NewVerifier(alicePW, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.db.AddUser(ctx, state.User{Name: "alice", Groups: []string{"ops"}, Secret: v.String()}); err != nil {
		t.Fatal(err)
	}
	if err := e.db.AddUser(ctx, state.User{Name: "dave", Groups: []string{"ops"}, Secret: v.String(), Disabled: true}); err != nil {
		t.Fatal(err)
	}
	pc, err := policy.Parse(fmt.Appendf(nil, testPolicy, srv.Port, srv.Port), "gate.yaml")
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, _, err := TLSConfig(filepath.Join(dir, "gate.crt"), filepath.Join(dir, "gate.key"), true, nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Upstreams: map[string]Upstream{}, Policy: pc, State: e.db, Quorum: e.svc, Ledger: e.led,
		TLS: tlsCfg, AuthDelay: 100 * time.Millisecond, RecordReads: true}
	for name, u := range pc.Upstreams {
		dsn, _ := u.DSN()
		cfg.Upstreams[name] = Upstream{DSN: dsn, Role: u.User}
	}
	if mod != nil {
		mod(&cfg)
	}
	if e.g, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	go e.g.Serve(ln)
	t.Cleanup(func() {
		if err := e.g.Close(ctxT(t, time.Minute)); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return e
}

func (e *env) url(user, pw, db, sslmode string) string {
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=%s", user, pw, e.addr, db, sslmode)
}

func (e *env) connect(db string) *pgx.Conn {
	e.t.Helper()
	c, err := pgx.Connect(ctxT(e.t, time.Minute), e.url("alice", alicePW, db, "disable"))
	if err != nil {
		e.t.Fatalf("connect through the gate: %v", err)
	}
	e.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// approve has bob and carol approve request id.
func (e *env) approve(id string) {
	e.t.Helper()
	for _, n := range []string{"bob", "carol"} {
		a := cert.Sign(approverKey(n), n, cert.ID(id), cert.Approve, time.Now().Add(time.Hour))
		if _, err := e.svc.Approve(ctxT(e.t, time.Minute), a); err != nil {
			e.t.Fatalf("approve by %s: %v", n, err)
		}
	}
}

var requestRE = regexp.MustCompile(`request ([0-9a-f]{64})`)

// heldID asserts err is a hold and returns its request ID.
func heldID(t *testing.T, err error) string {
	t.Helper()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, "held for approval") {
		t.Fatalf("want a hold (42501), got %v", err)
	}
	m := requestRE.FindStringSubmatch(pe.Message)
	if m == nil || !strings.Contains(pe.Message, "dualkey approvals approve "+m[1]) {
		t.Fatalf("hold does not name its request and the command: %q", pe.Message)
	}
	return m[1]
}

func count(t *testing.T, srv *pgtest.Server, db, table string) int {
	t.Helper()
	n, err := strconv.Atoi(srv.Query(db, "SELECT count(*) FROM "+table))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (e *env) psql(db string, stdin string, args ...string) (string, error) {
	all := append([]string{"-X", "-v", "ON_ERROR_STOP=1", "-At", e.url("alice", alicePW, db, "disable")}, args...)
	cmd := exec.Command(pgtest.Bin("psql"), all...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Dir = e.dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestGate runs everything with sessions served by the event loop (while
// they can be) and again on goroutines from the start.
func TestGate(t *testing.T) {
	t.Run("event loop", func(t *testing.T) { testGate(t, false) })
	t.Run("goroutines", func(t *testing.T) {
		if testing.Short() {
			t.Skip("-short: the event loop's run covers the goroutines too, from the first hold on")
		}
		testGate(t, true)
	})
}

func testGate(t *testing.T, noLoop bool) {
	e := newEnv(t, func(c *Config) { c.NoEventLoop = noLoop })
	if (len(e.g.loops) == 0) != noLoop {
		t.Fatalf("%d event loops, want them %v", len(e.g.loops), !noLoop)
	}
	ctx := ctxT(t, 5*time.Minute)
	c := e.connect("shop")
	if _, err := c.Exec(ctx, "CREATE TABLE items (id int PRIMARY KEY, name text)"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 20) g"); err != nil {
		t.Fatal(err)
	}

	t.Run("session runs as the brokered role", func(t *testing.T) {
		var who string
		if err := c.QueryRow(ctx, "SELECT current_user").Scan(&who); err != nil || who != "app_owner" {
			t.Fatalf("current_user = %q, %v", who, err)
		}
	})

	t.Run("extended protocol, prepared and pipelined", func(t *testing.T) {
		var name string
		if err := c.QueryRow(ctx, "SELECT name FROM items WHERE id = $1", 7).Scan(&name); err != nil || name != "item 7" {
			t.Fatalf("got %q, %v", name, err)
		}
		if _, err := c.Prepare(ctx, "by_id", "SELECT name FROM items WHERE id = $1"); err != nil {
			t.Fatal(err)
		}
		if entered, escaped, _ := e.g.loopCounts(); !noLoop && (entered != 1 || escaped != 0) {
			t.Fatalf("%d sessions on the event loops (want 1), %d left them (want 0)", entered, escaped)
		}
		b := &pgx.Batch{}
		for i := 1; i <= 10; i++ {
			b.Queue("by_id", i)
		}
		b.Queue("UPDATE items SET name = name WHERE id = $1", 3)
		br := c.SendBatch(ctx, b)
		for i := 1; i <= 10; i++ {
			if err := br.QueryRow().Scan(&name); err != nil || name != fmt.Sprintf("item %d", i) {
				t.Fatalf("batch row %d: %q, %v", i, name, err)
			}
		}
		if tag, err := br.Exec(); err != nil || tag.RowsAffected() != 1 {
			t.Fatalf("batch update: %v %v", tag, err)
		}
		if err := br.Close(); err != nil {
			t.Fatal(err)
		}
		if _, escaped, _ := e.g.loopCounts(); !noLoop && escaped != 1 {
			// The UPDATE runs under the guard (max_rows), which waits for
			// its row count: off the loop.
			t.Fatalf("the guarded UPDATE's session did not leave the event loop (%d left)", escaped)
		}
		// simple protocol through pgx too
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM items", pgx.QueryExecModeSimpleProtocol).Scan(&n); err != nil || n != 20 {
			t.Fatalf("simple: %d, %v", n, err)
		}
	})

	t.Run("prepared as DELETE without WHERE is held at Parse", func(t *testing.T) {
		if _, err := c.Prepare(ctx, "innocent", "SELECT id FROM items WHERE id = $1"); err != nil {
			t.Fatal(err)
		}
		_, err := c.Prepare(ctx, "wipe", "DELETE FROM items")
		heldID(t, err)
		// the session is still usable, and nothing was deleted
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM items").Scan(&n); err != nil || n != 20 {
			t.Fatalf("after hold: %d, %v", n, err)
		}
		// a pipelined batch whose second statement is refused: the first
		// does not commit (the implicit transaction fails as a whole)
		b := &pgx.Batch{}
		b.Queue("UPDATE items SET name = 'changed' WHERE id = 1")
		b.Queue("DELETE FROM items")
		err = c.SendBatch(ctx, b).Close()
		heldID(t, err)
		if got := e.srv.Query("shop", "SELECT name FROM items WHERE id = 1"); got != "item 1" {
			t.Fatalf("the batch's first statement committed: %q", got)
		}
	})

	t.Run("hidden DROP in a multi-statement string through psql is held", func(t *testing.T) {
		out, err := e.psql("shop", "", "-c", "SELECT 1; /* tidy */ DROP TABLE items")
		if err == nil || !strings.Contains(out, "held for approval") {
			t.Fatalf("psql: %v\n%s", err, out)
		}
		if count(t, e.srv, "shop", "items") != 20 {
			t.Fatal("items changed")
		}
	})

	t.Run("hold, approve, run once, held again", func(t *testing.T) {
		const drop = "DROP TABLE IF EXISTS scratch"
		if _, err := c.Exec(ctx, "CREATE TABLE scratch (x int)"); err != nil {
			t.Fatal(err)
		}
		_, err := c.Exec(ctx, drop)
		id := heldID(t, err)
		// asking again before approval names the same request
		_, err = c.Exec(ctx, drop)
		if again := heldID(t, err); again != id {
			t.Fatalf("second ask opened %s, want %s", again, id)
		}
		sum, err := e.svc.Show(ctx, cert.ID(id))
		if err != nil {
			t.Fatal(err)
		}
		if r := sum.Request; r.Requester != "alice" || r.SQL.Text != drop || r.SQL.Database != "shop" || r.SQL.Role != "app_owner" || r.SQL.Class != "destructive" {
			t.Fatalf("request binds %+v %+v", r, r.SQL)
		}
		e.approve(id)
		// another statement is not covered by the approval
		_, err = c.Exec(ctx, drop+" CASCADE")
		heldID(t, err)
		if _, err := c.Exec(ctx, drop); err != nil {
			t.Fatalf("approved statement: %v", err)
		}
		if got := e.srv.Query("shop", "SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'"); got != "0" {
			t.Fatal("scratch still exists")
		}
		if sum, _ := e.svc.Show(ctx, cert.ID(id)); sum.Status != state.StatusConsumed {
			t.Fatalf("request status %s", sum.Status)
		}
		_, err = c.Exec(ctx, drop)
		if next := heldID(t, err); next == id {
			t.Fatal("a consumed request was reused")
		}
	})

	t.Run("approved prepared statement runs once per approval", func(t *testing.T) {
		if _, err := c.Exec(ctx, "CREATE TABLE tmp1 (x int); INSERT INTO tmp1 VALUES (1), (2)"); err != nil {
			t.Fatal(err)
		}
		const wipe = "TRUNCATE tmp1"
		_, err := c.Prepare(ctx, "t1", wipe)
		id := heldID(t, err)
		e.approve(id)
		if _, err := c.Prepare(ctx, "t1", wipe); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "t1"); err != nil {
			t.Fatal(err)
		}
		if n := count(t, e.srv, "shop", "tmp1"); n != 0 {
			t.Fatalf("tmp1 has %d rows", n)
		}
		_, err = c.Exec(ctx, "t1")
		heldID(t, err)
	})

	t.Run("deny names the rule", func(t *testing.T) {
		_, err := c.Exec(ctx, "ALTER SYSTEM SET work_mem = '1MB'")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, "no-admin") || pe.Hint != "ask the DBA team" {
			t.Fatalf("want deny by no-admin, got %v", err)
		}
		_, err = c.Exec(ctx, "SELEC 1")
		if !errors.As(err, &pe) || pe.Code != "42501" {
			t.Fatalf("unparseable SQL: %v", err)
		}
	})

	t.Run("blast-radius guard", func(t *testing.T) {
		// within the limit of 5: runs, outside a transaction and inside one
		tag, err := c.Exec(ctx, "DELETE FROM items WHERE id > 18")
		if err != nil || tag.RowsAffected() != 2 {
			t.Fatalf("small delete: %v %v", tag, err)
		}
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if tag, err := tx.Exec(ctx, "UPDATE items SET name = 'x' WHERE id = $1", 1); err != nil || tag.RowsAffected() != 1 {
			t.Fatalf("update in tx: %v %v", tag, err)
		}
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		// too many rows: rolled back and held, the request shows the rows
		_, err = c.Exec(ctx, "DELETE FROM items WHERE id > 2")
		id := heldID(t, err)
		if n := count(t, e.srv, "shop", "items"); n != 18 {
			t.Fatalf("items = %d after the guard, want 18", n)
		}
		sum, err := e.svc.Show(ctx, cert.ID(id))
		if err != nil || !strings.Contains(sum.Request.Reason, "touches 16 rows") {
			t.Fatalf("request reason %q, %v", sum.Request.Reason, err)
		}
		// simple protocol, inside a transaction block: the savepoint path
		out, err := e.psql("shop", "BEGIN;\nUPDATE items SET name = 'y' WHERE id < 3;\nDELETE FROM items WHERE id > 2;\n")
		if err == nil || !strings.Contains(out, "held for approval") || !strings.Contains(out, "UPDATE 2") {
			t.Fatalf("psql guard in a block: %v\n%s", err, out)
		}
		if n := count(t, e.srv, "shop", "items"); n != 18 {
			t.Fatalf("items = %d", n)
		}
		// approved: the same statement runs once
		e.approve(id)
		if tag, err := c.Exec(ctx, "DELETE FROM items WHERE id > 2"); err != nil || tag.RowsAffected() != 16 {
			t.Fatalf("approved guarded delete: %v %v", tag, err)
		}
		if n := count(t, e.srv, "shop", "items"); n != 2 {
			t.Fatalf("items = %d", n)
		}
	})

	t.Run("psql copy in and out", func(t *testing.T) {
		src := filepath.Join(e.dir, "in.csv")
		var b strings.Builder
		for i := 100; i < 1100; i++ {
			fmt.Fprintf(&b, "%d,row %d\n", i, i)
		}
		os.WriteFile(src, []byte(b.String()), 0o644)
		out, err := e.psql("shop", "", "-c", `\copy items FROM 'in.csv' WITH (FORMAT csv)`)
		if err != nil || !strings.Contains(out, "COPY 1000") {
			t.Fatalf("copy in: %v\n%s", err, out)
		}
		out, err = e.psql("shop", "", "-c", `\copy (SELECT * FROM items WHERE id >= 100 ORDER BY id) TO 'out.csv' WITH (FORMAT csv)`)
		if err != nil {
			t.Fatalf("copy out: %v\n%s", err, out)
		}
		got, _ := os.ReadFile(filepath.Join(e.dir, "out.csv"))
		if string(got) != b.String() {
			t.Fatalf("copy out differs: %d bytes vs %d", len(got), b.Len())
		}
	})

	t.Run("cancel reaches the upstream backend", func(t *testing.T) {
		qctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := c.Exec(qctx, "SELECT pg_sleep(30)")
		var pe *pgconn.PgError
		if err == nil || time.Since(start) > 10*time.Second {
			t.Fatalf("pg_sleep not cancelled: %v after %s", err, time.Since(start))
		}
		// pgx closes the conn on a context cancel; the server saw 57014
		_ = pe
		c = e.connect("shop") // before any Fatal: the later subtests use c
		// The cancel request travels client → gate → server on its own
		// connection: wait for it to land, well before pg_sleep would end.
		deadline := time.Now().Add(15 * time.Second)
		for {
			n := e.srv.Query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
			if n == "0" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pg_sleep still running upstream (%s) 15 s after the cancel", n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	})

	t.Run("notices and LISTEN/NOTIFY", func(t *testing.T) {
		l := e.connect("shop")
		if _, err := l.Exec(ctx, "LISTEN jobs"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, "SELECT pg_notify('jobs', 'hello')"); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		n, err := l.WaitForNotification(wctx)
		if err != nil || n.Channel != "jobs" || n.Payload != "hello" {
			t.Fatalf("notification %+v, %v", n, err)
		}
	})

	t.Run("upstream errors pass through unchanged", func(t *testing.T) {
		_, err := c.Exec(ctx, "INSERT INTO items VALUES (1, 'dup')")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "23505" || pe.ConstraintName != "items_pkey" {
			t.Fatalf("got %v", err)
		}
	})

	t.Run("authentication", func(t *testing.T) {
		try := func(user, pw, db, ssl string) error {
			cc, err := pgx.Connect(ctx, e.url(user, pw, db, ssl))
			if err == nil {
				cc.Close(ctx)
			}
			return err
		}
		code := func(err error) string {
			var pe *pgconn.PgError
			if errors.As(err, &pe) {
				return pe.Code
			}
			return fmt.Sprint(err)
		}
		t0 := time.Now()
		if err := try("alice", "wrong", "shop", "disable"); code(err) != "28P01" {
			t.Fatalf("wrong password: %v", err)
		}
		d1 := time.Since(t0)
		t0 = time.Now()
		if err := try("mallory", "whatever", "shop", "disable"); code(err) != "28P01" {
			t.Fatalf("unknown user: %v", err)
		}
		d2 := time.Since(t0)
		// Lower bounds only (the configured 100 ms, then doubled): a wait
		// is never shorter, but a loaded machine makes either longer.
		if d1 < 100*time.Millisecond || d2 < 200*time.Millisecond {
			t.Fatalf("delay does not grow per source: %s then %s", d1, d2)
		}
		if err := try("dave", alicePW, "shop", "disable"); code(err) != "28000" {
			t.Fatalf("disabled user: %v", err)
		}
		if err := try("alice", alicePW, "nosuchdb", "disable"); code(err) != "3D000" {
			t.Fatalf("unknown database: %v", err)
		}
		if err := try("alice", alicePW, "shop", "require"); err != nil {
			t.Fatalf("TLS login: %v", err)
		}
	})

	t.Run("pgbench simple and prepared", func(t *testing.T) {
		e.srv.Pgbench("-i", "-s", "1", "-q", "bench")
		e.srv.Exec("bench", "GRANT ALL ON ALL TABLES IN SCHEMA public TO app_owner")
		for _, mode := range []string{"simple", "prepared"} {
			cmd := exec.Command(pgtest.Bin("pgbench"), "-n", "-M", mode, "-c", "4", "-T", "3",
				e.url("alice", alicePW, "bench", "disable"))
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Run(); err != nil {
				t.Fatalf("pgbench -M %s: %v\n%s", mode, err, out.String())
			}
			m := regexp.MustCompile(`tps = ([0-9.]+)`).FindStringSubmatch(out.String())
			if m == nil || strings.Contains(out.String(), "number of failed transactions") && !strings.Contains(out.String(), "number of failed transactions: 0 ") {
				t.Fatalf("pgbench -M %s:\n%s", mode, out.String())
			}
			tps, _ := strconv.ParseFloat(m[1], 64)
			t.Logf("pgbench -M %s through the gate: %.0f tps", mode, tps)
			if tps < 50 {
				t.Fatalf("implausible tps %.0f:\n%s", tps, out.String())
			}
		}
	})

	t.Run("ledger", func(t *testing.T) {
		// One prepared statement run three times: three records, each
		// with its own rows.
		const again = "INSERT INTO items SELECT $1::int, 'again' WHERE $2::bool"
		for i := range 3 {
			if _, err := c.Exec(ctx, again, 10000+i, i != 1); err != nil {
				t.Fatalf("prepared insert %d: %v", i, err)
			}
		}
		// Wait for c's session to end (its close record is queued before
		// its place is released), then for the queue to be written.
		open, _ := e.g.Sessions("alice")
		c.Close(ctx)
		for n := open; n >= open; n, _ = e.g.Sessions("alice") {
			select {
			case <-ctx.Done():
				t.Fatal("the closed session never ended")
			case <-time.After(10 * time.Millisecond):
			}
		}
		e.g.rec.flush()
		kinds := map[string]int{}
		var sawRows, sawHold bool
		var againRows []int64
		err := e.db.Ledger().Read(ctx, 1, func(_ uint64, rec []byte) error {
			r, err := ledger.ParseRecord(rec)
			if err != nil {
				return err
			}
			kinds[r.Kind]++
			var d map[string]any
			json.Unmarshal(r.Data, &d)
			for _, st := range ranIn(t, r) {
				if st.SQL == "DELETE FROM items WHERE id > 18" && st.Rows != nil && *st.Rows == 2 && st.Decision == "allow" && !st.At.IsZero() {
					sawRows = true
				}
				if st.SQL == again && st.Rows != nil {
					againRows = append(againRows, *st.Rows)
				}
			}
			if r.Kind == ledger.KindStatement && d["decision"] == "hold" && d["request"] != nil {
				sawHold = true
			}
			if r.Kind == ledger.KindSessionOpen && d["user"] == "alice" && d["from"] == nil {
				t.Errorf("session record without its source: %s", r.Data)
			}
			if bytes.Contains(rec, []byte(alicePW)) || bytes.Contains(rec, []byte("brokered-secret")) {
				t.Errorf("a password in the ledger: %s", rec)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{ledger.KindSessionOpen, ledger.KindSessionClose, ledger.KindStatement, ledger.KindStatements, ledger.KindRequest, ledger.KindApproval, ledger.KindDecision} {
			if kinds[k] == 0 {
				t.Errorf("no %s record (have %v)", k, kinds)
			}
		}
		if !sawRows || !sawHold {
			t.Errorf("statement records: rows %v, hold %v", sawRows, sawHold)
		}
		if fmt.Sprint(againRows) != "[1 0 1]" {
			t.Errorf("a prepared insert run three times: records with rows %v, want [1 0 1]", againRows)
		}
	})
}

func TestGateTLSAndBadClients(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.RequireTLS = true; c.MaxMessageSize = 1 << 20 })
	ctx := ctxT(t, 3*time.Minute)

	t.Run("require_tls refuses plaintext", func(t *testing.T) {
		_, err := pgx.Connect(ctx, e.url("alice", alicePW, "shop", "disable"))
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, "requires TLS") {
			t.Fatalf("plaintext: %v", err)
		}
		out, err := exec.Command(pgtest.Bin("psql"), "-X", "-At", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
			e.url("alice", alicePW, "shop", "require")).CombinedOutput()
		// the upstream leg is plaintext here; what matters is that psql got in over TLS
		if err != nil || strings.TrimSpace(string(out)) != "f" {
			t.Fatalf("psql over TLS: %v\n%s", err, out)
		}
	})

	c, err := pgx.Connect(ctx, e.url("alice", alicePW, "shop", "require"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, "CREATE TABLE t (x int)"); err != nil {
		t.Fatal(err)
	}

	t.Run("client killed mid-COPY", func(t *testing.T) {
		pc, err := pgconn.Connect(ctx, e.url("alice", alicePW, "shop", "require"))
		if err != nil {
			t.Fatal(err)
		}
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			_, err := pc.CopyFrom(ctx, pr, "COPY t FROM STDIN")
			done <- err
		}()
		for i := range 1000 {
			fmt.Fprintf(pw, "%d\n", i)
		}
		// the copy is under way upstream
		deadline := time.Now().Add(10 * time.Second)
		for e.srv.Query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_owner' AND query LIKE 'COPY t%'") != "1" {
			if time.Now().After(deadline) {
				t.Fatal("COPY never started upstream")
			}
			time.Sleep(20 * time.Millisecond)
		}
		pc.Conn().Close() // vanish without CopyDone
		pw.Close()
		<-done
		for e.srv.Query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_owner' AND query LIKE 'COPY t%'") != "0" {
			if time.Now().After(deadline.Add(10 * time.Second)) {
				t.Fatal("the upstream COPY outlived its client")
			}
			time.Sleep(50 * time.Millisecond)
		}
		if n := count(t, e.srv, "shop", "t"); n != 0 {
			t.Fatalf("a vanished COPY left %d rows", n)
		}
	})

	t.Run("oversized message closes the session, the gate serves on", func(t *testing.T) {
		big, err := pgx.Connect(ctx, e.url("alice", alicePW, "shop", "require"))
		if err != nil {
			t.Fatal(err)
		}
		_, err = big.Exec(ctx, "SELECT '"+strings.Repeat("x", 2<<20)+"'")
		if err == nil {
			t.Fatal("a 2 MiB query passed a 1 MiB limit")
		}
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil {
			t.Fatalf("other session after the oversized one: %v", err)
		}
	})
}
