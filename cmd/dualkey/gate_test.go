package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/quorum"
)

// TestGateCommand runs `dualkey gate --config gate.yaml` against a real
// PostgreSQL: gate.yaml's webhook receives the request a held DELETE
// opens (a real local HTTP server), with the dry run's row count in its
// reason, and limits.max_connections_per_user refuses a second session.
func TestGateCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	c, dir := quorumCLI(t)
	c.ok("users", "add", "alice", "--group", "ops")
	c.okStdin("alice-password\n", "users", "passwd", "alice", "--password-stdin")
	bob := strings.TrimSpace(c.as(dir, "bob").ok("keys", "generate", "bob"))
	carol := strings.TrimSpace(c.as(dir, "carol").ok("keys", "generate", "carol"))
	c.ok("quorum", "init", "--approver", "bob="+bob, "--approver", "carol="+carol, "--threshold", "2")

	srv := pgtest.Start(t, pgtest.Options{})
	srv.Exec("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'brokered-secret'")
	srv.Exec("postgres", "CREATE DATABASE shop OWNER app_owner")
	srv.Exec("shop", "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 7); ALTER TABLE t OWNER TO app_owner")

	events := make(chan quorum.Event, 16)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var ev quorum.Event
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		events <- ev
	}))
	defer hook.Close()

	cfg := filepath.Join(dir, "gate.yaml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `listen: 127.0.0.1:0
tls: {require_tls: false}
webhook: %s/hooks/secret-token
limits: {max_connections_per_user: 1, dry_run_timeout: 3s}
upstreams:
  shop: {host: 127.0.0.1, port: %d, user: app_owner, password: brokered-secret, sslmode: disable}
groups:
  ops: [alice]
rules:
  - {name: destructive, groups: [ops], databases: [shop], classes: [destructive], action: hold}
  - {name: work, groups: [ops], databases: [shop], classes: [read, write], action: allow}
`, hook.URL, srv.Port), 0o600); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	gctx, stop := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	var errb strings.Builder
	a := newApp(strings.NewReader(""), pw, &errb, func(k string) string { return c.env[k] })
	done := make(chan int, 1)
	go func() { done <- a.run(gctx, []string{"gate", "--config", cfg}); pw.Close() }()
	lines := bufio.NewScanner(pr)
	if !lines.Scan() {
		t.Fatalf("the gate printed nothing: %s", errb.String())
	}
	m := regexp.MustCompile(`gate listening on (\S+);.*; event loop: (io_uring|epoll)( \(\d+ threads\))?( on CPU ([\d,-]+))?$`).FindStringSubmatch(lines.Text())
	if m == nil {
		t.Fatalf("first line %q", lines.Text())
	}
	if m[4] == "" {
		t.Errorf("first line %q: the event loop is not pinned to a CPU by default", lines.Text())
	}
	go func() {
		for lines.Scan() {
		}
	}()
	var once sync.Once
	stopGate := func() {
		once.Do(func() {
			stop()
			if code := <-done; code != 0 {
				t.Errorf("dualkey gate exited %d: %s", code, errb.String())
			}
		})
	}
	defer stopGate()

	url := fmt.Sprintf("postgres://alice:alice-password@%s/shop?sslmode=disable", m[1])
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "DELETE FROM t", pgx.QueryExecModeSimpleProtocol)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" {
		t.Fatalf("DELETE FROM t: %v, want a hold", err)
	}
	id := regexp.MustCompile(`request ([0-9a-f]{64})`).FindStringSubmatch(pe.Message)
	if id == nil {
		t.Fatalf("hold message %q", pe.Message)
	}
	for opened := false; !opened; {
		select {
		case ev := <-events:
			if ev.Type != quorum.EventOpened {
				continue
			}
			if string(ev.Request) != id[1] || ev.Requester != "alice" || !strings.Contains(ev.Reason, "dry run: touches 7 rows") {
				t.Fatalf("webhook event = %+v, want request %s by alice with its dry run", ev, id[1])
			}
			opened = true
		case <-ctx.Done():
			t.Fatal("gate.yaml's webhook never heard of the held statement")
		}
	}
	if n := srv.Query("shop", "SELECT count(*) FROM t"); n != "7" {
		t.Fatalf("t has %s rows after the hold", n)
	}

	_, err = pgx.Connect(ctx, url)
	if !errors.As(err, &pe) || pe.Code != "53300" || !strings.Contains(pe.Message, "limits.max_connections_per_user") {
		t.Fatalf("second session of alice: %v, want 53300", err)
	}

	// What the session ran is in the ledger, a line per statement under
	// its record in audit tail.
	if _, err := conn.Exec(ctx, "UPDATE t SET id = id WHERE id < 3"); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "INSERT INTO t VALUES ('x')"); err == nil {
		t.Fatal("inserting 'x' into an int column worked")
	}
	conn.Close(ctx)
	stopGate() // writes what is queued
	tail := c.ok("audit", "tail", "-n", "5")
	for _, re := range []string{
		`(?m)^ *\d+  \S+ \S+  statements +alice +session [0-9a-f]+ on shop: \d+ statements, rule rules\[1\] "work" \(.*gate\.yaml:11\)$`,
		`(?m)^        \d\d:\d\d:\d\d\.\d{6}  write +allow +rows 2  UPDATE t SET id = id WHERE id < 3$`,
		`(?m)^        \d\d:\d\d:\d\d\.\d{6}  write +allow +error 22P02  INSERT INTO t VALUES \('x'\)$`,
	} {
		if !regexp.MustCompile(re).MatchString(tail) {
			t.Errorf("audit tail has no line matching %s:\n%s", re, tail)
		}
	}
}
