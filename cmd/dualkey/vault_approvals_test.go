package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// okStdin runs a command that must succeed, with stdin, and returns its stdout.
func (c *cli) okStdin(stdin string, args ...string) string {
	c.t.Helper()
	var out, errb bytes.Buffer
	a := newApp(strings.NewReader(stdin), &out, &errb, func(k string) string { return c.env[k] })
	if code := a.run(context.Background(), args); code != 0 {
		c.t.Fatalf("dualkey %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out.String(), errb.String())
	}
	return out.String()
}

// keepApprovals writes a copy of the certificate in file with only its
// first n approvals.
func keepApprovals(t *testing.T, file string, n int) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cert.ParseCertificate(bytes.TrimSpace(b))
	if err != nil {
		t.Fatalf("exported certificate: %v", err)
	}
	if len(c.Approvals) <= n {
		t.Fatalf("certificate has %d approvals, want more than %d", len(c.Approvals), n)
	}
	c.Approvals = c.Approvals[:n]
	return writeTemp(t, string(c.Encode()))
}

// TestVaultCertificateFromState runs the two-person rule for vault actions
// through the CLI alone: three people with keys, a 2-of-3 policy in the
// state handed to the vault at init, a request printed by `vault request`,
// submitted to the state, approved by the two others, its certificate
// exported (which consumes the state's request) and accepted once by the
// vault, as a directory and through `vault serve` with an admin token.
func TestVaultCertificateFromState(t *testing.T) {
	q, dir := quorumCLI(t)
	var approvers []string
	for _, p := range []string{"alice", "bob", "carol"} {
		pub := strings.TrimSpace(q.as(dir, p).ok("keys", "generate", p))
		approvers = append(approvers, "--approver", p+"="+pub)
	}
	q.ok(append([]string{"quorum", "init", "--threshold", "2"}, approvers...)...)
	policyFile := filepath.Join(dir, "policy.json")
	if err := os.WriteFile(policyFile, []byte(q.ok("quorum", "show", "--json")), 0o644); err != nil {
		t.Fatal(err)
	}

	v := newCLI(t, filepath.Join(t.TempDir(), "vault"))
	v.ok("vault", "init", "--min-retention", "24h", "--quorum-policy", policyFile)
	var vst struct {
		Serial     uint64 `json:"serial"`
		PolicyHash string `json:"policy_hash"`
	}
	v.json(&vst, "vault", "approvers")
	if show := q.ok("quorum", "show"); vst.Serial != 1 || len(vst.PolicyHash) != 64 ||
		!strings.Contains(show, "policy serial 1 (hash "+vst.PolicyHash[:16]+")") {
		t.Fatalf("the vault holds policy %d %s; the state shows:\n%s", vst.Serial, vst.PolicyHash, show)
	}

	v.ok("backup", makeTree(t))
	var snaps []struct {
		ID string `json:"id"`
	}
	v.json(&snaps, "snapshots")
	snap := snaps[0].ID
	v.code(exitRefused, "forget", snap) // locked, and no certificate

	alice, bob, carol := q.as(dir, "alice"), q.as(dir, "bob"), q.as(dir, "carol")
	reqFile := filepath.Join(dir, "forget.request")
	if err := os.WriteFile(reqFile, []byte(v.ok("vault", "request", "snapshot.forget", snap[:8], "--requester", "alice", "--reason", "test snapshot")), 0o644); err != nil {
		t.Fatal(err)
	}
	id := requestID(t, alice.ok("approvals", "submit", reqFile))
	if again := requestID(t, alice.ok("approvals", "submit", reqFile)); again != id {
		t.Errorf("the same request submitted twice: %s, then %s", id, again)
	}
	// A reformatted request is refused, never re-encoded: the approvals
	// sign the exact bytes the vault will be shown.
	raw, _ := os.ReadFile(reqFile)
	q.code(exitUsage, "approvals", "submit", writeTemp(t, strings.Replace(string(raw), ",", ", ", 1)))
	if show := q.ok("approvals", "show", id); !strings.Contains(show, "vault op  snapshot.forget") ||
		!strings.Contains(show, `snapshot = "`+snap+`"`) {
		t.Errorf("approvals show:\n%s", show)
	}

	alice.code(exitQuorumRefused, "approvals", "approve", id) // the requester never counts
	bob.ok("approvals", "approve", id)
	if e := bob.code(exitQuorumRefused, "approvals", "certificate", id); !strings.Contains(e, "not enough approvals") {
		t.Errorf("certificate with one approval: %s", e)
	}
	carol.ok("approvals", "approve", id)
	certFile := filepath.Join(dir, "forget.cert")
	carol.ok("approvals", "certificate", id, "-o", certFile)

	// The state's request is consumed by the export: not pending any more.
	var s map[string]any
	q.json(&s, "approvals", "show", id)
	if s["status"] != "consumed" || s["consumed_by"] != "carol" {
		t.Errorf("after the export: status %v, consumed by %v", s["status"], s["consumed_by"])
	}
	var approved []map[string]any
	q.json(&approved, "approvals", "list", "--status", "approved")
	if len(approved) != 0 {
		t.Errorf("approved requests after the export: %v", approved)
	}
	// Exporting again prints the same certificate; the vault is what
	// enforces single use.
	first, _ := os.ReadFile(certFile)
	if again := bob.ok("approvals", "certificate", id); again != string(first) {
		t.Errorf("second export differs:\n%s\n%s", again, first)
	}

	// One approval is not a quorum, also when the vault is shown it.
	if e := v.code(exitRefused, "forget", snap, "--certificate", keepApprovals(t, certFile, 1)); !strings.Contains(e, "not enough approvals") {
		t.Errorf("one approval: %s", e)
	}
	v.ok("forget", snap, "--certificate", certFile)
	v.json(&snaps, "snapshots")
	if len(snaps) != 0 {
		t.Fatalf("snapshot still listed: %v", snaps)
	}
	v.code(exitError, "forget", snap, "--certificate", certFile) // nothing left to forget

	// Through the server, with an admin token: lower the minimum retention.
	url, fp := startServer(t, v)
	tok := strings.TrimSpace(v.ok("vault", "token", "create", "--cap", "admin"))
	admin := v.with("DUALKEY_REPO", url).with("DUALKEY_TLS_FINGERPRINT", fp).with("DUALKEY_TOKEN_FILE", writeTemp(t, tok+"\n"))
	req := admin.ok("vault", "request", "retention.lower", "1h", "--requester", "bob", "--reason", "shorter")
	id2 := requestID(t, bob.okStdin(req, "approvals", "submit", "-"))
	alice.ok("approvals", "approve", id2)
	carol.ok("approvals", "approve", id2)
	lower := writeTemp(t, alice.ok("approvals", "certificate", id2))
	admin.code(exitRefused, "vault", "set-min-retention", "1h", "--certificate", keepApprovals(t, lower, 1))
	admin.ok("vault", "set-min-retention", "1h", "--certificate", lower)
	if e := admin.code(exitRefused, "vault", "set-min-retention", "1h", "--certificate", lower); !strings.Contains(e, "already used") {
		t.Errorf("replay through the server: %s", e)
	}
	// The vault remembers the use itself, not the server process.
	v.code(exitRefused, "vault", "set-min-retention", "1h", "--certificate", lower)
	if out := v.ok("vault", "approvers"); !strings.Contains(out, "minimum retention 1h0m0s") {
		t.Errorf("vault approvers: %s", out)
	}

	// A request made under another policy serial is refused by the state.
	parsed, err := cert.ParseRequest(bytes.TrimSpace([]byte(req)))
	if err != nil {
		t.Fatal(err)
	}
	parsed.PolicySerial = 2
	if e := q.code(exitQuorumRefused, "approvals", "submit", writeTemp(t, string(parsed.Encode()))); !strings.Contains(e, "serial 2") {
		t.Errorf("stale serial: %s", e)
	}
	if out := q.ok("audit", "verify"); !strings.Contains(out, "ledger OK") {
		t.Errorf("audit verify: %s", out)
	}
}
