package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dualkey/dualkey/internal/incident"
	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/quorum"
)

// The tripwire end to end, as an operator meets it: `dualkey pg agent`
// streams a real server's WAL; a superuser, straight through pgx and never
// through the gate, drops a table, truncates one, deletes most rows of
// another and drops a database, and pgbench runs alongside; each becomes
// one incident in `dualkey incidents list` within moments; and
// `dualkey pg restore --before-incident ID` brings back the cluster as it
// was just before.
func TestIncidentsEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL, the agent and two restored servers")
	}
	ctx := context.Background()
	// The restored servers run as PostgreSQL's OS user: their
	// restore_command must read the vault, the password and the binary.
	base, err := os.MkdirTemp("", "dualkey-incidents-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	vaultDir := filepath.Join(base, "vault")
	pwFile := filepath.Join(base, "password")
	if err := os.WriteFile(pwFile, []byte("correct horse\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// The webhook the agent posts incidents to.
	var hookMu sync.Mutex
	var posts []quorum.Event
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev quorum.Event
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
			t.Errorf("webhook body: %v", err)
		}
		hookMu.Lock()
		posts = append(posts, ev)
		hookMu.Unlock()
	}))
	defer hook.Close()
	c := newCLI(t, vaultDir).with("DUALKEY_PASSWORD_FILE", pwFile).
		with("DUALKEY_STATE", filepath.Join(t.TempDir(), "state.db")).with("DUALKEY_WEBHOOK", hook.URL)
	c.ok("vault", "init")

	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", "CREATE DATABASE shop")
	pg.Exec("postgres", "CREATE DATABASE archive")
	pg.Exec("archive", "CREATE TABLE years (y int PRIMARY KEY, note text); INSERT INTO years SELECT g, md5(g::text) FROM generate_series(1900, 2025) g")
	pg.Exec("shop", `CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric);
		INSERT INTO orders SELECT g, 'customer ' || g, g * 1.25 FROM generate_series(1, 5000) g;
		CREATE TABLE carts (id int PRIMARY KEY); INSERT INTO carts SELECT generate_series(1, 300);
		CREATE TABLE events (id int PRIMARY KEY, v text); INSERT INTO events SELECT g, 'e' FROM generate_series(1, 30000) g`)
	pg.Pgbench("-i", "-s", "2", "-q", "postgres")
	const ordersSum = "SELECT count(*) || ' ' || md5(string_agg(id || customer || total, ',' ORDER BY id)) FROM orders"
	wantOrders := pg.Query("shop", ordersSum)
	wantYears := pg.Query("archive", "SELECT count(*) || ' ' || sum(y) FROM years")

	agent := startAgentProc(t, c, "--pg", pg.URL("postgres"), "--slot", "tripwire", "--flush-every", "50ms")
	r := openRepoFor(t, c)
	waitVault(t, r, serverLSN(t, pg), 30*time.Second)
	c.ok("pg", "basebackup", "--pg", pg.URL("postgres"))

	// pgbench traffic runs while the damage is done, and raises nothing.
	bench := make(chan string, 1)
	go func() { bench <- pg.Pgbench("-c", "2", "-T", "4", "postgres") }()

	superuser := func(db, sql string) time.Time {
		t.Helper()
		conn, err := pgx.Connect(ctx, pg.URL(db))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return time.Now()
	}
	type want struct {
		kind, db, object string
		rows             int64
	}
	var ids []string
	check := func(w want) incident.Incident {
		t.Helper()
		in := waitIncident(t, c, w.kind, w.object, ids)
		ids = append(ids, in.ID)
		if in.Database != w.db || in.XID == 0 || in.CommitLSN == "" || in.RestoreLSN == "" || in.CommitTime.IsZero() || in.Rows != w.rows {
			t.Errorf("%s: %+v", w.kind, in)
		}
		// The requirement: alerted within 5 s of the commit (the agent
		// records its own delay; the poll above only has a generous deadline).
		if in.DelayMS <= 0 || in.DelayMS > 5000 {
			t.Errorf("%s detected %.1f ms after its commit", in.ID, in.DelayMS)
		}
		t.Logf("%-26s %s detected %.1f ms after the commit", in.ID, w.kind, in.DelayMS)
		return in
	}
	superuser("shop", "DROP TABLE orders")
	drop := check(want{"relations-dropped", "shop", "public.orders", 0})
	superuser("shop", "TRUNCATE carts")
	check(want{"truncate", "shop", "public.carts", 0})
	superuser("shop", "DELETE FROM events WHERE id > 5000")
	check(want{"mass-delete", "shop", "public.events", 25000})
	superuser("postgres", "DROP DATABASE archive")
	dbDrop := check(want{"database-drop", "archive", "archive", 0})
	out := <-bench
	if !strings.Contains(out, "number of transactions actually processed") {
		t.Fatalf("pgbench: %s", out)
	}
	// Nothing else: pgbench -i before and pgbench traffic between raised nothing.
	var list struct{ Incidents []incident.Incident }
	c.json(&list, "incidents", "list")
	if len(list.Incidents) != len(ids) {
		t.Errorf("%d incidents, want %d: %+v", len(list.Incidents), len(ids), list.Incidents)
	}
	text := c.ok("incidents", "list")
	for _, id := range ids {
		if !strings.Contains(text, id) {
			t.Errorf("incidents list does not show %s:\n%s", id, text)
		}
	}
	show := c.ok("incidents", "show", drop.ID)
	for _, s := range []string{"public.orders", "shop", strconv.FormatUint(uint64(drop.XID), 10), drop.CommitLSN, "--before-incident " + drop.ID} {
		if !strings.Contains(show, s) {
			t.Errorf("incidents show lacks %q:\n%s", s, show)
		}
	}
	var shown incident.Incident
	c.json(&shown, "incidents", "show", drop.ID)
	if shown.ID != drop.ID || shown.XID != drop.XID {
		t.Errorf("show --json: %+v", shown)
	}
	// Into the ledger too: one alert record per incident.
	var alerts int
	for _, line := range strings.Split(c.ok("audit", "tail", "--from", "1", "--json"), "\n") {
		if strings.Contains(line, `"kind":"alert"`) || strings.Contains(line, `"kind": "alert"`) {
			alerts++
		}
	}
	if alerts != len(ids) {
		t.Errorf("%d alert records in the ledger, want %d", alerts, len(ids))
	}
	// And to the webhook, each with its incident (posted in the background
	// after the store and the ledger).
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		hookMu.Lock()
		n := len(posts)
		hookMu.Unlock()
		if n >= len(ids) {
			break
		}
	}
	hookMu.Lock()
	var hooked []string
	for _, ev := range posts {
		var in incident.Incident
		if ev.Type != quorum.EventIncident || json.Unmarshal(ev.Incident, &in) != nil || !strings.Contains(ev.Text, in.ID) {
			t.Errorf("webhook post %+v", ev)
		}
		hooked = append(hooked, in.ID)
	}
	hookMu.Unlock()
	slices.Sort(hooked)
	if want := slices.Sorted(slices.Values(ids)); !slices.Equal(hooked, want) {
		t.Errorf("webhook posts for %v, want %v", hooked, want)
	}

	end := serverLSN(t, pg)
	waitVault(t, r, end, 30*time.Second)
	agent.interrupt(t)
	// Restarting the agent decodes the tail of the WAL again: no incident twice.
	agent2 := startAgentProc(t, c, "--pg", pg.URL("postgres"), "--slot", "tripwire", "--flush-every", "50ms")
	waitVault(t, r, serverLSN(t, pg), 30*time.Second)
	time.Sleep(time.Second)
	agent2.interrupt(t)
	c.json(&list, "incidents", "list")
	if len(list.Incidents) != len(ids) {
		t.Errorf("after an agent restart: %d incidents, want %d", len(list.Incidents), len(ids))
	}
	if err := pgtest.Own(vaultDir); err != nil {
		t.Fatal(err)
	}

	t.Run("before drop table", func(t *testing.T) {
		port := restoreBefore(t, c, base, drop.ID)
		got := queryRestored(t, port, "shop", ordersSum)
		if got != wantOrders {
			t.Errorf("restored orders: %s, want %s", got, wantOrders)
		}
	})
	t.Run("before drop database", func(t *testing.T) {
		port := restoreBefore(t, c, base, dbDrop.ID)
		if got := queryRestored(t, port, "archive", "SELECT count(*) || ' ' || sum(y) FROM years"); got != wantYears {
			t.Errorf("restored archive.years: %s, want %s", got, wantYears)
		}
		// Restored to the instant before the drop: everything before it
		// is there, orders already dropped and events already cut.
		if got := queryRestored(t, port, "shop", "SELECT count(*) FROM events"); got != "5000" {
			t.Errorf("restored events: %s rows, want 5000", got)
		}
	})
	t.Run("unknown incident", func(t *testing.T) {
		errs := c.code(exitNoIncident, "incidents", "show", "1.DEADBEEF.truncate")
		if !strings.Contains(errs, "no such incident") || !strings.Contains(errs, "1.DEADBEEF.truncate") {
			t.Errorf("unknown incident: %s", errs)
		}
		c.code(exitNoIncident, "pg", "restore", "--target", filepath.Join(t.TempDir(), "x"), "--before-incident", "1.DEADBEEF.truncate")
		if errs := c.code(exitUsage, "incidents", "show", "orders"); !strings.Contains(errs, "TIMELINE.LSN.KIND") {
			t.Errorf("malformed ID: %s", errs)
		}
		c.code(exitUsage, "pg", "restore", "--target", filepath.Join(t.TempDir(), "x"), "--before-incident", drop.ID, "--latest")
	})
}

// waitIncident polls `incidents list` until an incident of kind naming obj
// (and not in seen) appears; the deadline is generous on purpose (the
// delay itself is what the agent records).
func waitIncident(t *testing.T, c *cli, kind, obj string, seen []string) incident.Incident {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var list struct{ Incidents []incident.Incident }
		c.json(&list, "incidents", "list")
		for _, in := range list.Incidents {
			if in.Kind == kind && slices.Contains(in.Objects, obj) && !slices.Contains(seen, in.ID) {
				return in
			}
		}
		if time.Now().After(deadline) {
			b, _ := json.Marshal(list)
			t.Fatalf("no %s incident naming %s after 30 s; incidents: %s", kind, obj, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// restoreBefore restores the vault to just before incident id with
// `dualkey pg restore --before-incident`, starts the server and returns
// its port.
func restoreBefore(t *testing.T, c *cli, base, id string) int {
	t.Helper()
	dir, err := os.MkdirTemp(base, "restore-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "sock")
	if err := os.Mkdir(sock, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := pgtest.Own(sock); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "data")
	port := freeTCPPort(t)
	t.Cleanup(func() {
		cmd := exec.Command(filepath.Join(pgagent.PGBinDir, "pg_ctl"), "-D", target, "-m", "immediate", "stop")
		pgtest.RunAsOSUser(cmd)
		cmd.Run()
	})
	out := c.ok("pg", "restore", "--target", target, "--before-incident", id, "--start", "--port", strconv.Itoa(port),
		"--set", "unix_socket_directories="+sock, "--set", "listen_addresses=127.0.0.1",
		"--restore-command", binPath+" pg wal-fetch --repo "+c.env["DUALKEY_REPO"])
	if !strings.Contains(out, "incident "+id) {
		t.Errorf("restore output does not name the incident:\n%s", out)
	}
	conf, err := os.ReadFile(filepath.Join(target, "postgresql.auto.conf"))
	if err != nil || !strings.Contains(string(conf), "recovery_target_inclusive = false") {
		t.Errorf("postgresql.auto.conf: %v\n%s", err, conf)
	}
	return port
}

func queryRestored(t *testing.T, port int, db, q string) string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", port, db))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var s string
	if err := conn.QueryRow(ctx, q).Scan(&s); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
	return s
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
