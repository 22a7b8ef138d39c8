package main

import (
	"crypto/ed25519"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// TestVaultQuorumCLI runs the guarded-action path end to end: init with
// approvers, a request printed by the CLI, approvals signed by others, and
// the certificate accepted once by a vault server with an admin token.
func TestVaultQuorumCLI(t *testing.T) {
	keys := map[string]ed25519.PrivateKey{}
	var args []string
	for _, n := range []string{"alice", "bob", "carol"} {
		pub, priv, _ := ed25519.GenerateKey(nil)
		keys[n] = priv
		args = append(args, "--approver", n+"="+cert.FormatPublicKey(pub))
	}
	dir := filepath.Join(t.TempDir(), "vault")
	local := newCLI(t, dir)
	local.ok(append([]string{"vault", "init", "--min-retention", "24h", "--threshold", "2"}, args...)...)
	local.ok("backup", makeTree(t))
	var snaps []struct {
		ID string `json:"id"`
	}
	local.json(&snaps, "snapshots")
	snap := snaps[0].ID

	url, fp := startServer(t, local)
	tok := strings.TrimSpace(local.ok("vault", "token", "create", "--cap", "admin"))
	tf := filepath.Join(t.TempDir(), "admin.token")
	os.WriteFile(tf, []byte(tok+"\n"), 0o600)
	admin := local.with("DUALKEY_REPO", url).with("DUALKEY_TLS_FINGERPRINT", fp).with("DUALKEY_TOKEN_FILE", tf)

	// An admin token alone cannot forget the locked snapshot.
	admin.code(exitRefused, "forget", snap)

	sign := func(reqLine string, signers ...string) string {
		req, err := cert.ParseRequest([]byte(strings.TrimSpace(reqLine)))
		if err != nil {
			t.Fatalf("printed request: %v", err)
		}
		c := &cert.Certificate{Request: req.Encode()}
		for _, s := range signers {
			c.Approvals = append(c.Approvals, cert.Sign(keys[s], s, req.ID(), cert.Approve, time.Now().Add(time.Hour)))
		}
		f := filepath.Join(t.TempDir(), "cert.json")
		os.WriteFile(f, c.Encode(), 0o600)
		return f
	}
	req := admin.ok("vault", "request", "snapshot.forget", snap[:8], "--requester", "alice", "--reason", "test")
	admin.code(exitRefused, "forget", snap, "--certificate", sign(req, "bob"))
	admin.code(exitRefused, "forget", snap, "--certificate", sign(req, "alice", "bob"))
	good := sign(req, "bob", "carol")
	admin.ok("forget", snap, "--certificate", good)
	admin.code(1, "forget", snap, "--certificate", good) // gone: nothing to replay against
	local.json(&snaps, "snapshots")
	if len(snaps) != 0 {
		t.Errorf("snapshot still listed: %v", snaps)
	}

	// Lower the minimum retention on the directory vault.
	req = local.ok("vault", "request", "retention.lower", "1h", "--requester", "bob", "--reason", "test")
	lower := sign(req, "alice", "carol")
	local.ok("vault", "set-min-retention", "1h", "--certificate", lower)
	local.code(exitRefused, "vault", "set-min-retention", "1h", "--certificate", lower) // used once
	if out := local.ok("vault", "approvers"); !strings.Contains(out, "minimum retention 1h0m0s") {
		t.Errorf("approvers output: %s", out)
	}
}
