package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
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
	c := &cli{t: t, env: map[string]string{}}
	rp := startRun(t, c, nil)
	b, addr, data := rp.banner, rp.addr, rp.data
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

	rp.stop(t)
}

// runProc is a `dualkey run` process and what its banner said.
type runProc struct {
	p                  *exec.Cmd
	stdout             io.Reader
	stderr             *strings.Builder
	banner, addr, data string
}

// startRun starts `dualkey run --data DIR` in a new directory (as cred's
// user when set) and reads its banner.
func startRun(t *testing.T, c *cli, cred *syscall.Credential) *runProc {
	t.Helper()
	work, err := os.MkdirTemp("", "dualkey-run-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(work, 0o755) // the local server's OS user passes through when root
	t.Cleanup(func() { os.RemoveAll(work) })
	if cred != nil {
		os.Chown(work, int(cred.Uid), int(cred.Gid))
	}
	rp := &runProc{data: filepath.Join(work, "dualkey-data"), stderr: &strings.Builder{}}
	rp.p = c.proc("run", "--data", rp.data)
	rp.p.Dir = work
	if cred != nil {
		rp.p.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	if rp.stdout, err = rp.p.StdoutPipe(); err != nil {
		t.Fatal(err)
	}
	rp.p.Stderr = rp.stderr
	if err := rp.p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rp.p.Process.Kill(); rp.p.Wait() })
	sc := bufio.NewScanner(rp.stdout)
	var banner strings.Builder
	for sc.Scan() {
		banner.WriteString(sc.Text() + "\n")
		if strings.Contains(sc.Text(), "--before-xid X instead of --latest") {
			break
		}
	}
	rp.banner = banner.String()
	t.Logf("banner:\n%s", rp.banner)
	m := regexp.MustCompile(`(?m)^gate +(\S+) \(TLS`).FindStringSubmatch(rp.banner)
	if m == nil {
		t.Fatalf("no gate address in the banner; stderr:\n%s", rp.stderr.String())
	}
	rp.addr = m[1]
	return rp
}

// stop sends SIGINT, as Ctrl-C does, and checks the clean stop.
func (rp *runProc) stop(t *testing.T) {
	t.Helper()
	if err := rp.p.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(rp.stdout)
	if err := rp.p.Wait(); err != nil {
		t.Fatalf("dualkey run after SIGINT: %v\nstdout: %s\nstderr:\n%s", err, rest, rp.stderr.String())
	}
	if !strings.Contains(string(rest), "stopped; the vault holds WAL up to") {
		t.Fatalf("no clean stop: %s\nstderr:\n%s", rest, rp.stderr.String())
	}
	if pgserver.New(filepath.Join(rp.data, "pg"), 0).Status(context.Background()) {
		t.Fatal("the local server still runs")
	}
}

// TestRunCommandUnprivileged: run by an ordinary user (nobody), the local
// server runs as that user, owns its directory, and all of it works.
func TestRunCommandUnprivileged(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	if os.Geteuid() != 0 {
		t.Skip("TestRunCommand already runs unprivileged")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := &cli{t: t, env: map[string]string{}}
	rp := startRun(t, c, &syscall.Credential{Uid: 65534, Gid: 65534})
	fi, err := os.Stat(filepath.Join(rp.data, "pg", "data"))
	if err != nil {
		t.Fatal(err)
	}
	if uid := fi.Sys().(*syscall.Stat_t).Uid; uid != 65534 {
		t.Fatalf("the local server's data is owned by uid %d, want 65534", uid)
	}
	pw, err := os.ReadFile(filepath.Join(rp.data, "people", "alice", "password"))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://alice:%s@%s/app?sslmode=require", strings.TrimSpace(string(pw)), rp.addr))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE n (x int); INSERT INTO n VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(ctx, "TRUNCATE n")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" {
		t.Fatalf("TRUNCATE: %v, want held", err)
	}
	conn.Close(ctx)
	rp.stop(t)
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
