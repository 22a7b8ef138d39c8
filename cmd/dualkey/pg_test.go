package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/server"
)

// These tests run `dualkey pg agent` as a real process against a real
// PostgreSQL server and check what ends up in the vault: one gap-free run
// of WAL reaching the server's position, overlapping pieces agreeing byte
// for byte, and a slot that never lets the server drop WAL the vault lacks.

// openRepoFor opens the vault c points at, in this process.
func openRepoFor(t *testing.T, c *cli) *repo.Repository {
	t.Helper()
	a := newApp(strings.NewReader(""), io.Discard, io.Discard, func(k string) string { return c.env[k] })
	r, err := a.openRepo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// agentProc is a running `dualkey pg agent`.
type agentProc struct {
	cmd  *exec.Cmd
	out  *syncBuf
	done chan error
}

func startAgentProc(t *testing.T, c *cli, args ...string) *agentProc {
	t.Helper()
	if c.env["DUALKEY_STATE"] == "" {
		// The tripwire records incidents in the state store, by default
		// ./dualkey-data: not in the source tree.
		c = c.with("DUALKEY_STATE", filepath.Join(t.TempDir(), "state.db"))
	}
	p := &agentProc{cmd: c.proc(append([]string{"pg", "agent"}, args...)...), out: &syncBuf{}, done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("agent (pid %d) output:\n%s", p.cmd.Process.Pid, tailOf(p.out.String(), 4000))
		}
	})
	return p
}

func tailOf(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// kill9 kills the agent with SIGKILL and checks that is how it ended.
func (p *agentProc) kill9(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGKILL)
	err := <-p.done
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("agent was not killed: %v", err)
	}
}

// interrupt stops the agent as Ctrl-C does and returns its output.
func (p *agentProc) interrupt(t *testing.T) string {
	t.Helper()
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatal("agent still running 30s after SIGINT")
	}
	return p.out.String()
}

func serverLSN(t *testing.T, pg *pgtest.Server) pgwal.LSN {
	t.Helper()
	l, err := pgwal.ParseLSN(pg.Query("postgres", "SELECT pg_current_wal_lsn()::text"))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// vaultEnd is where the vault's gap-free WAL of timeline 1 ends.
func vaultEnd(t *testing.T, r *repo.Repository) pgwal.LSN {
	t.Helper()
	cat, err := pgwal.Load(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	return cat.End(1)
}

// waitVault waits until the vault holds timeline 1's WAL up to lsn.
func waitVault(t *testing.T, r *repo.Repository, lsn pgwal.LSN, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		end := vaultEnd(t, r)
		if end >= lsn {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("vault holds WAL to %v after %v, want %v", end, within, lsn)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkSlotBehindVault checks that the slot's restart_lsn is not past the
// end of the vault's WAL, read in that order (the vault only grows).
func checkSlotBehindVault(t *testing.T, pg *pgtest.Server, slot string, r *repo.Repository) {
	t.Helper()
	s := pg.Query("postgres", "SELECT coalesce(restart_lsn::text, '') FROM pg_replication_slots WHERE slot_name = $1", slot)
	end := vaultEnd(t, r)
	if s == "" || end == 0 {
		return
	}
	restart, err := pgwal.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	if restart > end {
		t.Errorf("slot restart_lsn %v is past the vault's end %v: the server may drop WAL the vault lacks", restart, end)
	}
}

// checkVault checks the vault's WAL of timeline 1: one gap-free run reaching
// want, every whole segment in it assembling (pgwal.Segment fails with
// ErrConflict where overlapping pieces disagree) and, where the server still
// has the segment file, equal to it. Overlap is allowed only if identical
// (pgwal's contract: a piece saved but not acknowledged before a kill is
// streamed again); it is counted and logged.
func checkVault(t *testing.T, r *repo.Repository, want pgwal.LSN, pg *pgtest.Server) {
	t.Helper()
	ctx := context.Background()
	cat, err := pgwal.Load(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if len(cat.Errors) > 0 {
		t.Errorf("catalog errors: %v", cat.Errors)
	}
	runs := cat.Runs(1)
	if len(runs) != 1 {
		t.Fatalf("vault holds %d runs of WAL, want 1 (a gap): %v", len(runs), runs)
	}
	if runs[0].End < want {
		t.Errorf("vault holds WAL to %v, the server reached %v", runs[0].End, want)
	}
	var overlap int64
	var reach pgwal.LSN
	n := 0
	for _, p := range cat.Pieces() {
		if p.History || p.Timeline != 1 {
			continue
		}
		if n > 0 && p.Start < reach {
			overlap += int64(min(p.End, reach) - p.Start)
		}
		reach = max(reach, p.End)
		n++
	}
	const seg = pgwal.DefaultSegmentSize
	first, last := pgwal.SegmentOf(runs[0].Start+seg-1, seg), pgwal.SegmentOf(runs[0].End, seg)
	compared := 0
	for s := first; s < last; s++ {
		got, err := pgwal.Segment(ctx, r, cat, 1, s, seg)
		if err != nil {
			t.Errorf("segment %d: %v", s, err)
			continue
		}
		b, err := os.ReadFile(filepath.Join(pg.Dir, "pg_wal", pgwal.SegmentName(1, s, seg)))
		if err != nil {
			continue
		}
		compared++
		if !bytes.Equal(b, got) {
			t.Errorf("segment %s differs from the server's file", pgwal.SegmentName(1, s, seg))
		}
	}
	t.Logf("vault: %v in %d pieces, %d bytes stored twice (identical), %d whole segments assembled, %d equal to pg_wal",
		runs[0], n, overlap, max(0, int(last)-int(first)), compared)
}

// insertRows inserts rows into known until stop is closed; it returns how
// many committed on done.
func insertRows(t *testing.T, url string, stop <-chan struct{}) <-chan int64 {
	t.Helper()
	done := make(chan int64, 1)
	go func() {
		var n atomic.Int64
		defer func() { done <- n.Load() }()
		conn, err := pgx.Connect(context.Background(), url)
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close(context.Background())
		for {
			select {
			case <-stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			if _, err := conn.Exec(context.Background(), "INSERT INTO known (v) VALUES (md5(random()::text))"); err != nil {
				t.Error(err)
				return
			}
			n.Add(1)
		}
	}()
	return done
}

const knownTableSQL = "CREATE TABLE known (id bigserial PRIMARY KEY, v text)"

// TestPGAgentKill9 kills `dualkey pg agent` with SIGKILL twice at random
// moments while rows are inserted; restarted, it resumes where the vault
// ends: no gap, nothing stored twice that differs, the server's position
// reached, and the slot never ahead of the vault.
func TestPGAgentKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	dir := filepath.Join(t.TempDir(), "vault")
	c := newCLI(t, dir)
	c.ok("vault", "init", "--min-retention", "0s")
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTableSQL)
	r := openRepoFor(t, c)
	stop := make(chan struct{})
	rows := insertRows(t, pg.URL("postgres"), stop)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
	}()
	args := []string{"--pg", pg.URL("postgres"), "--slot", "kill9", "--flush-every", "50ms"}

	var end pgwal.LSN
	for range 2 {
		p := startAgentProc(t, c, args...)
		waitVault(t, r, end+1, 30*time.Second) // this run stored something
		time.Sleep(time.Duration(rand.IntN(700)) * time.Millisecond)
		checkSlotBehindVault(t, pg, "kill9", r)
		p.kill9(t)
		end = vaultEnd(t, r)
		// WAL the killed agent never saw: more than a segment.
		pg.Exec("postgres", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 40000) g")
		checkSlotBehindVault(t, pg, "kill9", r)
	}
	p := startAgentProc(t, c, args...)
	time.Sleep(300 * time.Millisecond)
	close(stop)
	n := <-rows
	want := serverLSN(t, pg)
	waitVault(t, r, want, 30*time.Second)
	checkSlotBehindVault(t, pg, "kill9", r)
	out := p.interrupt(t)
	if !strings.Contains(out, "agent stopped; vault holds WAL up to") {
		t.Errorf("agent output on SIGINT:\n%s", tailOf(out, 2000))
	}
	checkVault(t, r, want, pg)
	t.Logf("%d rows inserted one by one, plus 80000 in bulk", n)
}

// vaultServer is a `dualkey vault serve` process on a fixed address.
type vaultServer struct {
	cmd *exec.Cmd
	fp  string
	log *syncBuf
}

func serveVault(t *testing.T, c *cli, addr string) *vaultServer {
	t.Helper()
	s := &vaultServer{cmd: c.proc("vault", "serve", "--listen", addr), log: &syncBuf{}}
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.stop()
		if t.Failed() {
			t.Logf("vault server log:\n%s", tailOf(s.log.String(), 3000))
		}
	})
	sc := bufio.NewScanner(out)
	for s.fp == "" && sc.Scan() {
		if f, ok := strings.CutPrefix(sc.Text(), "tls fingerprint: "); ok {
			s.fp = f
		}
	}
	if s.fp == "" {
		t.Fatalf("server printed no fingerprint:\n%s", s.log.String())
	}
	go func() {
		for sc.Scan() {
		}
	}()
	return s
}

// stop interrupts the server as Ctrl-C does and waits for it.
func (s *vaultServer) stop() {
	if s.cmd.ProcessState != nil {
		return
	}
	s.cmd.Process.Signal(os.Interrupt)
	s.cmd.Wait()
}

// TestPGAgentVaultRestart streams through a vault server with an append
// token; the server is stopped for a few seconds while writes continue and
// started again on the same address. The agent resumes with no gap. Then
// the agent's token is shown unable to delete or rewrite anything.
func TestPGAgentVaultRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL and a vault server")
	}
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "vault")
	admin := newCLI(t, dir)
	admin.ok("vault", "init", "--min-retention", "1h")
	addr := freePort(t)
	srv := serveVault(t, admin, addr)
	url := "https://" + addr
	secret := strings.TrimSpace(admin.ok("vault", "token", "create", "--cap", "append", "--name", "pg-agent"))
	tokFile := filepath.Join(t.TempDir(), "agent.token")
	if err := os.WriteFile(tokFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	agent := admin.with("DUALKEY_REPO", url).with("DUALKEY_TLS_FINGERPRINT", srv.fp).with("DUALKEY_TOKEN_FILE", tokFile)
	r := openRepoFor(t, admin) // the directory itself, for checks

	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTableSQL)
	stop := make(chan struct{})
	rows := insertRows(t, pg.URL("postgres"), stop)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
	}()
	p := startAgentProc(t, agent, "--pg", pg.URL("postgres"), "--slot", "remote", "--flush-every", "50ms")
	waitVault(t, r, serverLSN(t, pg), 30*time.Second)

	srv.stop()
	t0 := time.Now()
	pg.Exec("postgres", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 40000) g")
	time.Sleep(3*time.Second - time.Since(t0))
	checkSlotBehindVault(t, pg, "remote", r)
	srv2 := serveVault(t, admin, addr)
	if srv2.fp != srv.fp {
		t.Fatalf("restarted server has fingerprint %s, was %s", srv2.fp, srv.fp)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	n := <-rows
	want := serverLSN(t, pg)
	t1 := time.Now()
	waitVault(t, r, want, 60*time.Second)
	t.Logf("vault caught up %v after the server came back (%d rows inserted one by one)", time.Since(t1).Round(time.Millisecond), n)
	checkSlotBehindVault(t, pg, "remote", r)
	if out := p.interrupt(t); !strings.Contains(out, "WAL stream interrupted") {
		t.Errorf("the agent never noticed the vault server was gone:\n%s", tailOf(out, 2000))
	}
	checkVault(t, r, want, pg)

	// The agent's token may add, never delete or rewrite.
	agent.ok("pg", "basebackup", "--pg", pg.URL("postgres"))
	var snaps []struct {
		ID string `json:"id"`
	}
	agent.json(&snaps, "snapshots")
	if len(snaps) != 1 {
		t.Fatalf("%d snapshots, want the base backup", len(snaps))
	}
	before, err := pgwal.Load(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	files := vaultFiles(t, dir)
	agent.code(exitRefused, "forget", snaps[0].ID)
	// Prune may run (it finds nothing to delete) or be refused; either way
	// nothing may go.
	if out, errs, code := agent.run("prune", "--grace", "1ns"); code != exitOK && code != exitRefused {
		t.Errorf("prune with an append token: exit %d\n%s%s", code, out, errs)
	}
	cl, err := server.NewClient(url, server.ClientOptions{Token: secret, Fingerprint: srv.fp})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	piece := before.Pieces()[0]
	h := backend.Handle{Type: backend.WAL, Name: piece.Name.String()}
	if err := cl.Remove(ctx, h); !errors.Is(err, guard.ErrForbidden) {
		t.Errorf("DELETE of %v with the append token: %v, want guard.ErrForbidden", h, err)
	}
	obj, err := cl.Load(ctx, h, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	forged := bytes.Clone(obj)
	forged[len(forged)-1] ^= 1
	if err := cl.Save(ctx, h, forged); err == nil {
		t.Errorf("overwriting %v with other bytes succeeded", h)
	}
	after, err := pgwal.Load(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Pieces()) != len(before.Pieces()) {
		t.Errorf("the vault held %d WAL objects, now %d", len(before.Pieces()), len(after.Pieces()))
	}
	if got, err := cl.Load(ctx, h, 0, 0); err != nil || !bytes.Equal(got, obj) {
		t.Errorf("%v changed after the attempts (%v)", h, err)
	}
	agent.json(&snaps, "snapshots")
	if len(snaps) != 1 {
		t.Errorf("%d snapshots after forget with the append token, want 1", len(snaps))
	}
	now := vaultFiles(t, dir)
	for name, size := range files {
		if got, ok := now[name]; !ok || got != size {
			t.Errorf("%s: %d bytes before, %d after (present %v)", name, size, got, ok)
		}
	}
	t.Logf("%d vault objects before the attempts, %d after; none removed or changed", len(files), len(now))
}

// vaultFiles maps each object file of a directory vault to its size.
func vaultFiles(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if fi.IsDir() && rel == ".server" {
			return filepath.SkipDir
		}
		if fi.Mode().IsRegular() {
			out[rel] = fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestPGBasebackupLocal: --pgdata takes a local base backup; a directory
// that is not the server's, or --pgdata on an agent without a schedule, is
// refused.
func TestPGBasebackupLocal(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	c := newCLI(t, filepath.Join(t.TempDir(), "vault"))
	c.ok("vault", "init", "--min-retention", "0s")
	pg := pgtest.Start(t, pgtest.Options{})
	var res struct {
		Meta pgagent.BaseMeta `json:"meta"`
	}
	c.json(&res, "pg", "basebackup", "--pg", pg.URL("postgres"), "--pgdata", pg.Dir)
	if res.Meta.Files < 100 || res.Meta.EndLSN <= res.Meta.StartLSN {
		t.Errorf("meta %+v", res.Meta)
	}
	tests := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"not a data directory", []string{"pg", "basebackup", "--pg", pg.URL("postgres"), "--pgdata", t.TempDir()}, exitError, "not a PostgreSQL data directory"},
		{"throttled", []string{"pg", "basebackup", "--pg", pg.URL("postgres"), "--pgdata", pg.Dir, "--max-rate", "1024"}, exitUsage, "--max-rate"},
		{"agent without a schedule", []string{"pg", "agent", "--pg", pg.URL("postgres"), "--pgdata", pg.Dir, "--no-tripwire"}, exitUsage, "--base-every"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if errs := c.code(tt.code, tt.args...); !strings.Contains(errs, tt.msg) {
				t.Errorf("stderr %q does not mention %q", errs, tt.msg)
			}
		})
	}
}
