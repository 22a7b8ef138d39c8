package gate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/tlscert"
)

// backendPID is the PostgreSQL backend serving c.
func backendPID(t *testing.T, c *pgx.Conn) int {
	t.Helper()
	var pid int
	if err := c.QueryRow(ctxT(t, time.Minute), "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// backendGone waits until the server has no backend pid.
func (e *env) backendGone(t *testing.T, pid int) {
	t.Helper()
	waitFor(t, func() bool {
		return e.srv.Query("postgres", fmt.Sprintf("SELECT count(*) FROM pg_stat_activity WHERE pid = %d", pid)) == "0"
	}, fmt.Sprintf("backend %d to exit", pid))
}

// sleeping waits until backend pid runs SELECT pg_sleep(60).
func (e *env) sleeping(t *testing.T, pid int) {
	t.Helper()
	waitFor(t, func() bool {
		return e.srv.Query("postgres", fmt.Sprintf("SELECT count(*) FROM pg_stat_activity WHERE pid = %d AND query = 'SELECT pg_sleep(60)' AND state = 'active'", pid)) == "1"
	}, "pg_sleep to run")
}

// connectApp connects alice to shop with application_name app.
func (e *env) connectApp(t *testing.T, app string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(e.url("alice", alicePW, "shop", "disable"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["application_name"] = app
	c, err := pgx.ConnectConfig(ctxT(t, time.Minute), cfg)
	if err != nil {
		t.Fatalf("connect as %s: %v", app, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// leave closes c (Terminate) and waits until the gate has put its upstream
// connection in the pool, which then holds want.
func (e *env) leave(t *testing.T, c *pgx.Conn, want int) {
	t.Helper()
	c.Close(ctxT(t, time.Minute))
	waitFor(t, func() bool { return e.g.pool.size() == want }, fmt.Sprintf("%d idle upstream connections", want))
}

// TestUpstreamPool: a session that leaves cleanly leaves its upstream
// connection, reset, to the next; nothing of the first session's state
// reaches the second; connections in a transaction, dead, idle too long or
// left when the gate closes are not reused.
func TestUpstreamPool(t *testing.T) {
	e := newEnv(t, nil)
	ctx := ctxT(t, 3*time.Minute)

	t.Run("reset between sessions", func(t *testing.T) {
		a := e.connect("shop")
		pidA := backendPID(t, a)
		for _, q := range []string{"SET work_mem = '77MB'", "SET application_name = 'first'", "CREATE TEMP TABLE tt (x int)",
			"PREPARE p AS SELECT 1", "LISTEN ch", "SELECT pg_advisory_lock(42)"} {
			if _, err := a.Exec(ctx, q); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
		}
		e.leave(t, a, 1)

		b := e.connect("shop")
		// The same statement text: pgx gives it the same prepared statement
		// name, which the server refuses if the first session's survived.
		if pidB := backendPID(t, b); pidB != pidA {
			t.Fatalf("second session on backend %d, want the first's %d", pidB, pidA)
		}
		if e.g.pool.size() != 0 {
			t.Errorf("pool holds %d while its only connection is in use", e.g.pool.size())
		}
		checks := map[string]string{
			"SHOW work_mem": "4MB",
			"SELECT to_regclass('pg_temp.tt') IS NULL":                                                         "t",
			"SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'":                                     "0",
			"SELECT count(*) FROM pg_listening_channels()":                                                     "0",
			"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()":             "0",
			"SELECT current_setting('application_name') <> 'first'":                                            "t",
			"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = 'shop'": "1",
		}
		for q, want := range checks {
			var got string
			if err := b.QueryRow(ctx, q, pgx.QueryExecModeSimpleProtocol).Scan(&got); err != nil || got != want {
				t.Errorf("%s = %q, %v; want %q", q, got, err, want)
			}
		}
		if v := b.PgConn().ParameterStatus("application_name"); v == "first" {
			t.Error("the second session was told the first's application_name")
		}
		e.g.rec.flush()
		var reused []bool
		e.db.Ledger().Read(ctx, 1, func(_ uint64, rec []byte) error {
			r, err := ledger.ParseRecord(rec)
			if err != nil {
				return err
			}
			var d struct {
				Reused *bool `json:"upstream_reused"`
				PID    int   `json:"upstream_pid"`
			}
			if r.Kind == ledger.KindSessionOpen && json.Unmarshal(r.Data, &d) == nil && d.Reused != nil && d.PID == pidA {
				reused = append(reused, *d.Reused)
			}
			return nil
		})
		if fmt.Sprint(reused) != "[false true]" {
			t.Errorf("session records on backend %d, upstream_reused: %v; want [false true]", pidA, reused)
		}
		e.leave(t, b, 1)
	})

	t.Run("cancel on a reused backend", func(t *testing.T) {
		c := e.connect("shop")
		pid := backendPID(t, c) // the pooled one
		done := make(chan error, 1)
		go func() {
			_, err := c.Exec(ctx, "SELECT pg_sleep(60)")
			done <- err
		}()
		e.sleeping(t, pid)
		// The gate's key for this session maps to the reused backend's.
		if err := c.PgConn().CancelRequest(ctx); err != nil {
			t.Fatal(err)
		}
		var pe *pgconn.PgError
		if err := <-done; !errors.As(err, &pe) || pe.Code != "57014" {
			t.Fatalf("cancelled statement: %v, want SQLSTATE 57014", err)
		}
		if got := backendPID(t, c); got != pid {
			t.Fatalf("backend changed under a session: %d then %d", pid, got)
		}
		e.leave(t, c, 1)
	})

	t.Run("not reused from inside a transaction", func(t *testing.T) {
		c := e.connect("shop")
		pid := backendPID(t, c)
		if _, err := c.Exec(ctx, "BEGIN"); err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
		e.backendGone(t, pid)
		if n := e.g.pool.size(); n != 0 {
			t.Fatalf("pool holds %d after a session left mid-transaction", n)
		}
		d := e.connect("shop")
		if got := backendPID(t, d); got == pid {
			t.Fatal("a backend left in a transaction was reused")
		}
		e.leave(t, d, 1)
	})

	t.Run("not reused when the client leaves mid-statement", func(t *testing.T) {
		c := e.connect("shop")
		pid := backendPID(t, c) // the pooled one
		n0 := e.g.pool.size()
		done := make(chan error, 1)
		go func() {
			_, err := c.Exec(ctx, "SELECT pg_sleep(60)")
			done <- err
		}()
		e.sleeping(t, pid)
		// Gone without a word: no cancel request, no Terminate.
		c.PgConn().Conn().Close()
		if err := <-done; err == nil {
			t.Fatal("pg_sleep(60) returned on a closed connection")
		}
		e.backendGone(t, pid)
		if n := e.g.pool.size(); n != n0 {
			t.Fatalf("pool holds %d after a session left mid-statement, %d before", n, n0)
		}
		d := e.connect("shop")
		backendPID(t, d)
		e.leave(t, d, 1)
	})

	t.Run("a dead idle connection is not handed out", func(t *testing.T) {
		c := e.connect("shop")
		pid := backendPID(t, c)
		e.leave(t, c, 1)
		e.srv.Exec("postgres", fmt.Sprintf("SELECT pg_terminate_backend(%d)", pid))
		e.backendGone(t, pid)
		d := e.connect("shop")
		if got := backendPID(t, d); got == pid {
			t.Fatal("same backend after it was terminated")
		}
		e.leave(t, d, 1)
	})

	t.Run("other startup parameters get another backend", func(t *testing.T) {
		c := e.connectApp(t, "other")
		if e.g.pool.size() != 1 {
			t.Fatalf("pool holds %d, want the idle backend left alone", e.g.pool.size())
		}
		var app string
		if err := c.QueryRow(ctx, "SHOW application_name").Scan(&app); err != nil || app != "other" {
			t.Fatalf("application_name = %q, %v", app, err)
		}
	})

	t.Run("at most pool_idle per database, whatever the startup parameters", func(t *testing.T) {
		e2 := startGate(t, e.srv, func(c *Config) { c.PoolIdle = 2 })
		var pids []int
		var conns []*pgx.Conn
		for _, app := range []string{"a", "b", "c"} {
			c := e2.connectApp(t, app)
			pids = append(pids, backendPID(t, c))
			conns = append(conns, c)
		}
		for i, c := range conns {
			e2.leave(t, c, min(i+1, 2))
		}
		e2.backendGone(t, pids[0]) // idle longest
		for _, pid := range pids[1:] {
			if e2.srv.Query("postgres", fmt.Sprintf("SELECT count(*) FROM pg_stat_activity WHERE pid = %d", pid)) != "1" {
				t.Errorf("backend %d gone, want it idle in the pool", pid)
			}
		}
	})

	t.Run("a full server gets the slot of an idle connection", func(t *testing.T) {
		e2 := startGate(t, e.srv, nil)
		a, b := e2.connectApp(t, "a"), e2.connectApp(t, "b")
		pidA := backendPID(t, a)
		backendPID(t, b)
		e2.leave(t, a, 1)
		e2.leave(t, b, 2)
		// As many backends of app_owner as its limit: two of them idle here.
		n := e.srv.Query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_owner'")
		e.srv.Exec("postgres", "ALTER ROLE app_owner CONNECTION LIMIT "+n)
		defer e.srv.Exec("postgres", "ALTER ROLE app_owner CONNECTION LIMIT -1")
		c := e2.connectApp(t, "c")
		if pid := backendPID(t, c); pid == pidA {
			t.Fatal("another application_name reused a backend")
		}
		e2.backendGone(t, pidA) // idle longest: closed for c
		if n := e2.g.pool.size(); n != 1 {
			t.Errorf("pool holds %d, want 1", n)
		}
	})

	// Sessions relayed on goroutines: the relay is parked, not closed.
	goroutines := func(t *testing.T, e2 *env, sslmode string) {
		a := e2.connect("shop")
		pid := backendPID(t, a)
		if _, err := a.Exec(ctx, "SET work_mem = '77MB'"); err != nil {
			t.Fatal(err)
		}
		e2.leave(t, a, 1)
		b := e2.connect("shop")
		if got := backendPID(t, b); got != pid { // the same prepared statement name again
			t.Fatalf("second session on backend %d, want the first's %d", got, pid)
		}
		var mem string
		var ssl bool
		if err := b.QueryRow(ctx, "SELECT current_setting('work_mem'), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&mem, &ssl); err != nil {
			t.Fatal(err)
		}
		if mem != "4MB" || ssl != (sslmode == "require") {
			t.Errorf("reused backend: work_mem %s, ssl %v (upstream sslmode %s)", mem, ssl, sslmode)
		}
		e2.leave(t, b, 1)
	}
	t.Run("without the event loop", func(t *testing.T) {
		goroutines(t, startGate(t, e.srv, func(c *Config) { c.NoEventLoop = true }), "disable")
	})
	t.Run("upstream TLS", func(t *testing.T) {
		srv := tlsServer(t)
		goroutines(t, startGate(t, srv, func(c *Config) {
			for name, u := range c.Upstreams {
				u.DSN = strings.Replace(u.DSN, "sslmode=disable", "sslmode=require", 1)
				c.Upstreams[name] = u
			}
		}), "require")
	})

	t.Run("idle too long", func(t *testing.T) {
		e2 := startGate(t, e.srv, func(c *Config) { c.PoolIdleTimeout = 200 * time.Millisecond })
		c := e2.connect("shop")
		pid := backendPID(t, c)
		e2.leave(t, c, 1)
		e2.backendGone(t, pid)
		if n := e2.g.pool.size(); n != 0 {
			t.Errorf("pool holds %d after the idle timeout", n)
		}
	})

	t.Run("closed with the gate", func(t *testing.T) {
		e2 := startGate(t, e.srv, nil)
		c := e2.connect("shop")
		pid := backendPID(t, c)
		e2.leave(t, c, 1)
		if err := e2.g.Close(ctx); err != nil {
			t.Fatal(err)
		}
		e2.backendGone(t, pid)
	})

	t.Run("off", func(t *testing.T) {
		e2 := startGate(t, e.srv, func(c *Config) { c.PoolIdle = -1 })
		if e2.g.pool != nil {
			t.Fatal("PoolIdle -1 left a pool")
		}
		pids := map[int]bool{}
		for range 2 {
			c := e2.connect("shop")
			pid := backendPID(t, c)
			pids[pid] = true
			c.Close(ctx)
			e2.backendGone(t, pid)
		}
		if len(pids) != 2 {
			t.Errorf("backends without a pool: %v", pids)
		}
	})
}

// tlsServer is a PostgreSQL server like newEnv's that offers TLS.
func tlsServer(t *testing.T) *pgtest.Server {
	t.Helper()
	srv := pgtest.Start(t, pgtest.Options{})
	crt, key, err := tlscert.SelfSigned("localhost", []string{"127.0.0.1"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"server.crt": crt, "server.key": key} {
		path := filepath.Join(srv.Dir, name)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := pgtest.Own(path); err != nil {
			t.Fatal(err)
		}
	}
	srv.Exec("postgres", "ALTER SYSTEM SET ssl = on")
	srv.Exec("postgres", "SELECT pg_reload_conf()")
	srv.Exec("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'brokered-secret'")
	srv.Exec("postgres", "CREATE DATABASE shop OWNER app_owner")
	srv.Exec("postgres", "CREATE DATABASE bench OWNER app_owner")
	return srv
}
