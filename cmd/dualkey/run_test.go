package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/pgserver"
)

// TestRunCommand runs `dualkey run` as a process with nothing given, and
// follows its banner: alice connects through the gate with psql's URL, a
// DROP TABLE is held, bob and carol approve with the printed commands, the
// DROP runs once, and SIGINT stops everything (the local server too).
func TestRunCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	work, err := os.MkdirTemp("", "dualkey-run-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(work, 0o755) // the local server's OS user passes through when root
	defer os.RemoveAll(work)
	data := filepath.Join(work, "dualkey-data")

	c := &cli{t: t, env: map[string]string{}}
	p := c.proc("run", "--data", data)
	p.Dir = work
	stdout, err := p.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	p.Stderr = &stderr
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Process.Kill()
	sc := bufio.NewScanner(stdout)
	var banner strings.Builder
	for sc.Scan() {
		banner.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "--before-xid X instead of --latest") {
			break
		}
	}
	t.Logf("banner:\n%s", banner.String())
	b := banner.String()
	m := regexp.MustCompile(`(?m)^gate +(\S+) \(TLS`).FindStringSubmatch(b)
	if m == nil {
		t.Fatalf("no gate address in the banner; stderr:\n%s", stderr.String())
	}
	addr := m[1]
	pw, err := os.ReadFile(filepath.Join(data, "people", "alice", "password"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b, fmt.Sprintf(`psql "postgres://alice@%s/app?sslmode=require"`, addr)) {
		t.Fatalf("the banner does not say how to connect as alice")
	}
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://alice:%s@%s/app?sslmode=require", strings.TrimSpace(string(pw)), addr))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE TABLE gone (x int); INSERT INTO gone VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(ctx, "DROP TABLE gone")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" {
		t.Fatalf("DROP TABLE: %v, want held", err)
	}
	id := regexp.MustCompile(`request ([0-9a-f]{64})`).FindStringSubmatch(pe.Message)[1]

	// The banner's approve commands, word for word but the ID.
	state := filepath.Join(data, "state.db")
	for _, name := range []string{"bob", "carol"} {
		dir := filepath.Join(data, "people", name)
		line := fmt.Sprintf("DUALKEY_CONFIG_DIR=%s DUALKEY_KEY_PASSPHRASE_FILE=%s/passphrase %s approvals approve ID --as %s --state %s", dir, dir, binPath, name, state)
		if !strings.Contains(b, line) {
			t.Fatalf("the banner lacks %q", line)
		}
		c.with("DUALKEY_CONFIG_DIR", dir).with("DUALKEY_KEY_PASSPHRASE_FILE", filepath.Join(dir, "passphrase")).
			ok("approvals", "approve", id[:12], "--as", name, "--state", state)
	}
	if _, err := conn.Exec(ctx, "DROP TABLE gone"); err != nil {
		t.Fatalf("the approved DROP: %v", err)
	}
	if _, err := conn.Exec(ctx, "DROP TABLE gone"); !errors.As(err, &pe) || pe.Code != "42501" {
		t.Fatalf("DROP TABLE again: %v, want held again", err)
	}
	conn.Close(ctx)

	if err := p.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(stdout)
	if err := p.Wait(); err != nil {
		t.Fatalf("dualkey run after SIGINT: %v\nstdout: %s\nstderr:\n%s", err, rest, stderr.String())
	}
	if !strings.Contains(string(rest), "stopped; the vault holds WAL up to") {
		t.Fatalf("no clean stop: %s\nstderr:\n%s", rest, stderr.String())
	}
	if pgserver.New(filepath.Join(data, "pg"), 0).Status(ctx) {
		t.Fatal("the local server still runs")
	}
}

// TestRunConfigErrors: a bad config fails with exit 2 naming the line; an
// explicitly given config that is missing is an error too; --help names
// every key.
func TestRunConfigErrors(t *testing.T) {
	c := &cli{t: t, env: map[string]string{}}
	bad := writeTemp(t, "data_dir: x\nagent:\n  base_every: sometimes\n")
	out := c.code(exitUsage, "run", "--config", bad)
	if !strings.Contains(out, bad+":3: agent.base_every") {
		t.Fatalf("bad config: %s", out)
	}
	c.code(exitUsage, "run", "--config", filepath.Join(t.TempDir(), "missing.yaml"))
	help := c.ok("run", "--help")
	for _, key := range []string{"data_dir", "vault:", "repo:", "password_file", "min_retention", "state:", "pg:", "url:", "gate_url",
		"databases", "local:", "dir:", "port:", "settings", "agent:", "slot:", "synchronous", "flush_every", "base_every",
		"first_base_backup", "retain_warn", "tripwire:", "enabled", "mass_rows", "names_every", "gate:", "listen", "tls:", "request_expiry", "webhook", "limits", "groups", "rules",
		"users:", "name:", "approver:", "quorum:", "threshold"} {
		if !strings.Contains(help, key) {
			t.Errorf("run --help does not document %s", key)
		}
	}
}
