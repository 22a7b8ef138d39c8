package runner

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/incident"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgserver"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/quorum/keyfile"
	"github.com/dualkey/dualkey/internal/state"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// workDir is a temporary directory the postgres OS user can pass through
// when the tests run as root.
func workDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "runner-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func testConfig(t *testing.T, yaml string) *Config {
	t.Helper()
	c, err := Parse([]byte(yaml), "dualkey.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func person(t *testing.T, in Info, name string) Person {
	for _, p := range in.People {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no person %s in %+v", name, in.People)
	return Person{}
}

func readSecret(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// gateConn connects through the gate as name, with their password file.
func gateConn(t *testing.T, ctx context.Context, in Info, name, db string) *pgx.Conn {
	t.Helper()
	p := person(t, in, name)
	c, err := pgx.Connect(ctx, fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=require", name, readSecret(t, p.PasswordFile), in.GateAddr, db))
	if err != nil {
		t.Fatalf("connect through the gate as %s: %v", name, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

var heldRE = regexp.MustCompile(`request ([0-9a-f]{64})`)

// held runs sql and expects the gate to hold it; it returns the request.
func held(t *testing.T, ctx context.Context, c *pgx.Conn, sql string) cert.ID {
	t.Helper()
	_, err := c.Exec(ctx, sql)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" {
		t.Fatalf("%s: %v, want held (42501)", sql, err)
	}
	m := heldRE.FindStringSubmatch(pe.Message)
	if m == nil {
		t.Fatalf("held without a request ID: %s", pe.Message)
	}
	return cert.ID(m[1])
}

// approve signs as each approver with their key file and passphrase, on a
// state handle of its own: what `dualkey approvals approve` does.
func approve(t *testing.T, ctx context.Context, r *Runner, id cert.ID, names ...string) state.Status {
	t.Helper()
	in := r.Info()
	db, err := state.Open(ctx, r.Config().StateDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	key, _, err := ledgerKey(ctx, in.LedgerKey, db.Ledger())
	if err != nil {
		t.Fatal(err)
	}
	led, err := ledger.Open(ctx, db.Ledger(), nil, key, ledger.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer led.Close(ctx)
	svc := quorum.New(db, led, quorum.Options{})
	var st state.Status
	for _, n := range names {
		p := person(t, in, n)
		data, err := keyfile.Load(filepath.Join(p.ConfigDir, "keys"), n)
		if err != nil {
			t.Fatal(err)
		}
		_, priv, err := keyfile.Open(data, []byte(readSecret(t, p.PassphraseFile)))
		if err != nil {
			t.Fatal(err)
		}
		s, err := svc.Show(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if st, err = svc.Approve(ctx, cert.Sign(priv, n, id, cert.Approve, s.Request.Expires)); err != nil {
			t.Fatalf("approve as %s: %v", n, err)
		}
	}
	return st
}

// ourGoroutines lists goroutines running this module's code, other than
// the test's own.
func ourGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/dualkey/dualkey/internal/") && !strings.Contains(g, "internal/runner.Test") && !strings.Contains(g, "testing.tRunner") {
			out = append(out, g)
		}
	}
	return out
}

// noLeaks waits until the goroutines of the stopped runner have ended
// (the agent's slot watcher notices its context within moments).
func noLeaks(t *testing.T, ctx context.Context) {
	t.Helper()
	for {
		gs := ourGoroutines()
		if len(gs) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("goroutines left after Stop:\n%s", strings.Join(gs, "\n\n"))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestRunLocal is `dualkey run` with nothing given: a local server, the
// agent, the gate. Alice reads and writes through the gate, her DROP TABLE
// is held, bob and carol approve, it runs once and is held again; WAL and
// a base backup reach the vault; Stop ends everything; a second start
// reuses all of it.
func TestRunLocal(t *testing.T) {
	ctx := ctxT(t, 10*time.Minute)
	dir := workDir(t)
	cfg := testConfig(t, fmt.Sprintf("data_dir: %s\ngate:\n  listen: 127.0.0.1:0\n", filepath.Join(dir, "data")))
	incidents := make(chan incident.Incident, 16)
	r, err := Start(ctx, cfg, Options{Log: testLog(t), OnIncident: func(in incident.Incident) { incidents <- in }})
	if err != nil {
		t.Fatal(err)
	}
	in := r.Info()
	t.Logf("banner:\n%s", r.Banner())
	if !in.Created || in.Local == nil || !in.Local.Created {
		t.Fatalf("first start: %+v", in)
	}
	for _, f := range []string{in.VaultPasswordFile, person(t, in, "alice").PasswordFile, person(t, in, "bob").PassphraseFile, in.LedgerKey, in.Local.PasswordFile} {
		if fi, err := os.Stat(f); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v, want 0600", f, err, fi.Mode())
		}
	}

	// A second runner on the same directory is refused, and the first
	// goes on.
	if _, err := Start(ctx, cfg, Options{}); !errors.Is(err, ErrInUse) {
		t.Fatalf("second runner on one data directory: %v, want ErrInUse", err)
	}

	alice := gateConn(t, ctx, in, "alice", "app")
	if _, err := alice.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.Exec(ctx, "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 3) g; CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)"); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := alice.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 3 {
		t.Fatalf("count = %d, %v", n, err)
	}
	id := held(t, ctx, alice, "DROP TABLE t")
	if err := alice.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 3 {
		t.Fatalf("after the hold: count = %d, %v (the table must still be there)", n, err)
	}
	if st := approve(t, ctx, r, id, "bob"); st != state.StatusOpen {
		t.Fatalf("after bob: %s, want open", st)
	}
	if id2 := held(t, ctx, alice, "DROP TABLE t"); id2 != id {
		t.Fatalf("asked again before approval: request %s, want the same %s", id2, id)
	}
	if st := approve(t, ctx, r, id, "carol"); st != state.StatusApproved {
		t.Fatalf("after carol: %s, want approved", st)
	}
	if _, err := alice.Exec(ctx, "DROP TABLE t"); err != nil {
		t.Fatalf("the approved DROP: %v", err)
	}
	if id3 := held(t, ctx, alice, "DROP TABLE t"); id3 == id {
		t.Fatal("the approval was used twice")
	}
	if err := alice.QueryRow(ctx, "SELECT count(*) FROM pg_tables WHERE tablename = 't'").Scan(&n); err != nil || n != 0 {
		t.Fatalf("table t still exists: %d, %v", n, err)
	}

	// Someone with the superuser's password goes around the gate (T2):
	// the tripwire sees the drop in the WAL, as it saw the approved one.
	if _, err := alice.Exec(ctx, "CREATE TABLE bypass (x int); INSERT INTO bypass VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	alice.Close(ctx)
	su, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres:%s@127.0.0.1:%d/app?sslmode=disable", readSecret(t, in.Local.PasswordFile), in.Local.Port))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := su.Exec(ctx, "DROP TABLE bypass"); err != nil {
		t.Fatal(err)
	}
	su.Close(ctx)
	// Two drops in app, the approved one naming public.t. (The second may
	// be named by its relfilenode when the agent's name cache has not
	// caught up with a table this young.)
	var drops []incident.Incident
	for len(drops) < 2 {
		select {
		case inc := <-incidents:
			t.Logf("incident %s %s %v", inc.ID, inc.Kind, inc.Objects)
			if inc.Kind == "relations-dropped" && inc.Database == "app" {
				drops = append(drops, inc)
			}
		case <-ctx.Done():
			t.Fatalf("the tripwire did not report both drops: %+v", drops)
		}
	}
	if !slices.Contains(drops[0].Objects, "public.t") {
		t.Fatalf("first drop names %v, want public.t", drops[0].Objects)
	}

	// WAL reached the vault and a base backup exists, usable with it.
	if err := r.FirstBackup(ctx); err != nil {
		t.Fatalf("first base backup: %v", err)
	}
	for {
		bs, w, err := r.Backups(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(bs) == 1 && bs[0].Usable && !w.IsZero() {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no usable base backup: %+v %+v", bs, w)
		case <-time.After(200 * time.Millisecond):
		}
	}
	if st := r.AgentStatus(); st.Durable == 0 {
		t.Fatalf("agent status %+v: nothing durable", st)
	}
	if err := r.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if pgserver.New(in.Local.Dir, 0).Status(ctx) {
		t.Fatal("the local server still runs after Stop")
	}
	if c, err := net.Dial("tcp", in.GateAddr); err == nil {
		c.Close()
		t.Fatal("the gate still accepts after Stop")
	}
	noLeaks(t, ctx)

	// Again: everything is reused; the data is there.
	r2, err := Start(ctx, cfg, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Stop(ctx)
	in2 := r2.Info()
	if in2.Created || in2.Local.Created || in2.VaultID != in.VaultID {
		t.Fatalf("second start did not reuse: %+v", in2)
	}
	if got := readSecret(t, person(t, in2, "alice").PasswordFile); got != readSecret(t, person(t, in, "alice").PasswordFile) {
		t.Fatal("alice's password changed")
	}
	alice = gateConn(t, ctx, in2, "alice", "app")
	if err := alice.QueryRow(ctx, "SELECT x FROM kept").Scan(&n); err != nil || n != 42 {
		t.Fatalf("kept = %d, %v", n, err)
	}
	if err := r2.FirstBackup(ctx); err != nil {
		t.Fatal(err)
	}
	if bs, _, err := r2.Backups(ctx); err != nil || len(bs) != 1 {
		t.Fatalf("second start took another first backup: %d, %v", len(bs), err)
	}
	cat, err := pgwal.Load(ctx, r2.repo)
	if err != nil || len(cat.Pieces()) == 0 {
		t.Fatalf("WAL catalog: %v, %v", cat, err)
	}
	alice.Close(ctx)
	if err := r2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	noLeaks(t, ctx)
}

// TestRunURL protects a server given by URL (a pgtest server) and checks
// the clear errors for a server that is not there or whose role cannot
// replicate.
func TestRunURL(t *testing.T) {
	ctx := ctxT(t, 10*time.Minute)
	srv := pgtest.Start(t, pgtest.Options{})
	srv.Exec("postgres", "CREATE ROLE norepl LOGIN")
	srv.Exec("postgres", "CREATE DATABASE shop")
	dir := workDir(t)
	// The gate section's limits apply under dualkey run too.
	cfg := testConfig(t, fmt.Sprintf("data_dir: %s\npg:\n  url: %s\ngate:\n  listen: 127.0.0.1:0\n  limits:\n    max_connections_per_user: 1\n",
		filepath.Join(dir, "data"), srv.URL("shop")))
	r, err := Start(ctx, cfg, Options{Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Stop(ctx)
	in := r.Info()
	if in.Local != nil || len(in.Databases) != 1 || in.Databases[0] != "shop" {
		t.Fatalf("info: %+v", in)
	}
	alice := gateConn(t, ctx, in, "alice", "shop")
	second, err := pgx.Connect(ctx, fmt.Sprintf("postgres://alice:%s@%s/shop?sslmode=require", readSecret(t, person(t, in, "alice").PasswordFile), in.GateAddr))
	var pe *pgconn.PgError
	if err == nil {
		second.Close(ctx)
		t.Fatal("a second session of alice beyond max_connections_per_user: 1")
	} else if !errors.As(err, &pe) || pe.Code != "53300" {
		t.Fatalf("a second session of alice: %v, want 53300", err)
	}
	if _, err := alice.Exec(ctx, "CREATE TABLE o (id int); INSERT INTO o VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	held(t, ctx, alice, "TRUNCATE o")
	alice.Close(ctx)
	if err := r.FirstBackup(ctx); err != nil {
		t.Fatal(err)
	}
	for r.AgentStatus().Durable == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("no WAL reached the vault")
		case <-time.After(100 * time.Millisecond):
		}
	}
	if err := r.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !srv.Running() {
		t.Fatal("the runner stopped a server it did not start")
	}

	// A role without REPLICATION, and a port nobody listens on.
	norepl := strings.Replace(srv.URL("postgres"), "postgres@", "norepl@", 1)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := fmt.Sprintf("postgres://postgres@%s/postgres?sslmode=disable&connect_timeout=5", ln.Addr())
	ln.Close()
	for _, tt := range []struct{ url, want string }{
		{norepl, "REPLICATION"},
		{dead, "cannot connect"},
	} {
		cfg := testConfig(t, fmt.Sprintf("data_dir: %s\npg:\n  url: %s\ngate:\n  listen: 127.0.0.1:0\n", filepath.Join(dir, "data"), tt.url))
		cfg.DataDir = filepath.Join(dir, "fresh")
		_, err := Start(ctx, cfg, Options{})
		if !errors.Is(err, ErrUpstream) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Start with %s: %v, want ErrUpstream saying %q", tt.url, err, tt.want)
		}
		// Checked before anything was made for it.
		if _, err := os.Stat(filepath.Join(cfg.DataDir, "vault")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a vault was made for an unusable server: %v", err)
		}
	}
	noLeaks(t, ctx)
}

// TestStartErrors: a taken gate port and a data directory that cannot be
// made fail the start at once, with errors that say so.
func TestStartErrors(t *testing.T) {
	ctx := ctxT(t, 5*time.Minute)
	dir := workDir(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg := testConfig(t, fmt.Sprintf("data_dir: %s\ngate:\n  listen: %s\n", filepath.Join(dir, "data"), ln.Addr()))
	if _, err := Start(ctx, cfg, Options{}); !errors.Is(err, ErrPortInUse) || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Fatalf("taken gate port: %v", err)
	}

	// The default address, when taken, gives way to a free port.
	c := Default()
	c.DataDir = filepath.Join(dir, "data")
	c.Gate.Listen = ln.Addr().String()
	r := &Runner{cfg: c}
	if err := r.listen(); err != nil || r.info.GateAddr == ln.Addr().String() || r.info.GateListenNote == "" {
		t.Fatalf("default address taken: %v, %+v", err, r.info)
	}
	r.ln.Close()

	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	cfg = testConfig(t, fmt.Sprintf("data_dir: %s\n", filepath.Join(file, "data")))
	if _, err := Start(ctx, cfg, Options{}); !errors.Is(err, ErrDataDir) {
		t.Fatalf("data dir under a file: %v", err)
	}
	if os.Geteuid() != 0 {
		ro := filepath.Join(dir, "ro")
		os.Mkdir(ro, 0o500)
		cfg = testConfig(t, fmt.Sprintf("data_dir: %s\n", ro))
		if _, err := Start(ctx, cfg, Options{}); !errors.Is(err, ErrDataDir) || !strings.Contains(err.Error(), "not writable") {
			t.Fatalf("read-only data dir: %v", err)
		}
	}
}
