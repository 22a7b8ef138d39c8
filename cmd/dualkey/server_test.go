package main

import (
	"bufio"
	"bytes"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func freePort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// startServer runs `dualkey vault serve` as a real process and returns its
// URL and certificate fingerprint.
func startServer(t *testing.T, c *cli) (string, string) {
	addr := freePort(t)
	cmd := c.proc("vault", "serve", "--listen", addr)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuf
	cmd.Stderr = &logs
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	sc := bufio.NewScanner(out)
	fp := ""
	for fp == "" && sc.Scan() {
		if f, ok := strings.CutPrefix(sc.Text(), "tls fingerprint: "); ok {
			fp = f
		}
	}
	if fp == "" {
		t.Fatal("server printed no fingerprint")
	}
	go func() {
		for sc.Scan() {
		}
	}()
	return "https://" + addr, fp
}

func TestServerTokens(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "vault")
	admin := newCLI(t, dir)
	admin.ok("vault", "init", "--min-retention", "1h")
	url, fp := startServer(t, admin)

	token := func(capName string) *cli {
		tok := strings.TrimSpace(admin.ok("vault", "token", "create", "--cap", capName, "--name", capName+"-test"))
		f := filepath.Join(t.TempDir(), capName+".token")
		os.WriteFile(f, []byte(tok+"\n"), 0o600)
		return admin.with("DUALKEY_REPO", url).with("DUALKEY_TLS_FINGERPRINT", fp).with("DUALKEY_TOKEN_FILE", f)
	}
	agent, reader, remoteAdmin := token("append"), token("read"), token("admin")

	src := makeTree(t)
	agent.ok("backup", src)
	var snaps []struct {
		ID string `json:"id"`
	}
	reader.json(&snaps, "snapshots")
	if len(snaps) != 1 {
		t.Fatalf("read token sees %d snapshots, want 1", len(snaps))
	}

	// What an append token must never do, through the real server.
	agent.code(exitRefused, "forget", snaps[0].ID)
	newpw := filepath.Join(t.TempDir(), "newpw")
	os.WriteFile(newpw, []byte("another"), 0o600)
	agent.code(exitRefused, "key", "add", "--new-password-file", newpw)
	reader.code(exitRefused, "backup", src)
	// Even admin cannot forget what is locked.
	remoteAdmin.code(exitRefused, "forget", snaps[0].ID)

	target := filepath.Join(t.TempDir(), "r")
	reader.ok("restore", "latest", "--target", target)
	sameTree(t, src, filepath.Join(target, "src"))
	reader.ok("verify", "--read-data")

	// A wrong fingerprint is refused before any token is sent.
	wrong := reader.with("DUALKEY_TLS_FINGERPRINT", "sha256:"+strings.Repeat("00", 32))
	if errs := wrong.code(exitError, "snapshots"); !strings.Contains(strings.ToLower(errs), "fingerprint") {
		t.Errorf("wrong fingerprint: %s", errs)
	}
	// A revoked token stops working at once.
	admin.ok("vault", "token", "revoke", "read-test")
	time.Sleep(10 * time.Millisecond)
	reader.code(exitError, "snapshots")
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }
