package main

import (
	"bytes"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// quorumCLI is a CLI environment on a fresh state directory, without a
// repository; as(name) gives name's own key directory.
func quorumCLI(t *testing.T) (*cli, string) {
	dir := t.TempDir()
	pp := filepath.Join(dir, "passphrase")
	if err := os.WriteFile(pp, []byte("correct horse battery\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	stateFile := filepath.Join(dir, "data", "state.db")
	return &cli{t: t, env: map[string]string{"DUALKEY_STATE": stateFile, "DUALKEY_KEY_PASSPHRASE_FILE": pp}}, dir
}

func (c *cli) as(dir, name string) *cli {
	return c.with("DUALKEY_CONFIG_DIR", filepath.Join(dir, "cfg-"+name)).with("DUALKEY_USER", name)
}

func requestID(t *testing.T, out string) string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if id, ok := strings.CutPrefix(l, "request "); ok && len(id) == 64 {
			return id
		}
	}
	t.Fatalf("no request ID in %q", out)
	return ""
}

// TestQuorumCLIFlow: three people, keys generated, a 2-of-3 policy, a
// request approved by the two others through the CLI, shown, consumed
// once; then a denial, break-glass with its review, and a policy change.
func TestQuorumCLIFlow(t *testing.T) {
	c, dir := quorumCLI(t)
	people := []string{"alice", "bob", "carol", "dave"}
	pubs := map[string]string{}
	for _, p := range people {
		c.ok("users", "add", p, "--display", strings.ToUpper(p[:1])+p[1:], "--group", "ops")
		pubs[p] = strings.TrimSpace(c.as(dir, p).ok("keys", "generate", p))
		if !strings.HasPrefix(pubs[p], "ed25519:") {
			t.Fatalf("keys generate printed %q", pubs[p])
		}
	}
	var users []map[string]any
	c.json(&users, "users", "list")
	if len(users) != 4 || users[0]["name"] != "alice" {
		t.Fatalf("users list = %v", users)
	}
	c.as(dir, "bob").code(1, "keys", "generate", "bob") // never overwritten
	if out := c.as(dir, "bob").ok("keys", "list"); !strings.Contains(out, pubs["bob"]) {
		t.Errorf("keys list = %q", out)
	}

	c.code(2, "quorum", "init", "--approver", "alice="+pubs["alice"]) // no threshold
	c.ok("quorum", "init", "--approver", "alice="+pubs["alice"], "--approver", "bob="+pubs["bob"],
		"--approver", "carol="+pubs["carol"], "--threshold", "2", "--breakglass", "alice=dba")
	c.code(exitQuorumRefused, "quorum", "init", "--approver", "alice="+pubs["alice"], "--threshold", "1")
	if out := c.ok("quorum", "show"); !strings.Contains(out, "policy serial 1") || !strings.Contains(out, "default              2 of 3") {
		t.Errorf("quorum show = %s", out)
	}

	alice, bob, carol := c.as(dir, "alice"), c.as(dir, "bob"), c.as(dir, "carol")
	id := requestID(t, alice.ok("approvals", "request", "--database", "shop", "--role", "app_owner",
		"--sql", "DROP TABLE audit_2019", "--reason", "the 2019 partition is archived"))
	alice.code(exitQuorumRefused, "approvals", "approve", id) // self-approval
	bob.ok("approvals", "approve", id[:10])
	bob.code(exitQuorumRefused, "approvals", "approve", id) // second vote
	bob.with("DUALKEY_KEY_PASSPHRASE_FILE", writeTemp(t, "wrong")).code(exitPassword, "approvals", "deny", id)

	show := c.ok("approvals", "show", id)
	for _, want := range []string{"status    open", "asked by  alice", "database  shop", "role      app_owner",
		"    DROP TABLE audit_2019", "reason    the 2019 partition is archived", "approved  1: bob", "needed    1 more, from: carol"} {
		if !strings.Contains(show, want) {
			t.Errorf("approvals show lacks %q:\n%s", want, show)
		}
	}
	carol.ok("approvals", "approve", id)
	var s map[string]any
	c.json(&s, "approvals", "show", id)
	if s["status"] != "approved" || s["sql"].(map[string]any)["Text"] != "DROP TABLE audit_2019" {
		t.Errorf("show --json = %v", s)
	}
	var list []map[string]any
	c.json(&list, "approvals", "list", "--status", "approved")
	if len(list) != 1 || list[0]["id"] != id {
		t.Errorf("approvals list --status approved = %v", list)
	}
	var consumed map[string]string
	c.json(&consumed, "approvals", "consume", id, "--as", "gate1")
	if consumed["certificate"] == "" {
		t.Errorf("consume printed %v", consumed)
	}
	if e := c.code(exitQuorumRefused, "approvals", "consume", id, "--as", "gate2"); !strings.Contains(e, "already consumed") {
		t.Errorf("second consume: %s", e)
	}

	// A deny by a registered approver denies.
	id2 := requestID(t, c.as(dir, "dave").ok("approvals", "request", "--database", "shop", "--role", "app_owner",
		"--sql", "TRUNCATE orders", "--reason", "reset"))
	carol.ok("approvals", "deny", id2)
	bob.code(exitQuorumRefused, "approvals", "approve", id2)
	c.json(&s, "approvals", "show", id2)
	if s["status"] != "denied" {
		t.Errorf("after a deny: %v", s["status"])
	}

	// Break-glass: only alice as dba; reviewed only by others, after it ends.
	bob.code(exitNotAllowed, "breakglass", "--reason", "outage", "--for", "30m", "--role", "dba")
	out := alice.ok("breakglass", "--reason", "primary down", "--for", "2s")
	session := strings.Fields(out)[2]
	session = strings.TrimSuffix(session, ":")
	if l := c.ok("breakglass", "list"); !strings.Contains(l, session) || !strings.Contains(l, "UNREVIEWED") {
		t.Errorf("breakglass list = %s", l)
	}
	rid := requestID(t, alice.ok("breakglass", "review", session))
	alice.code(exitQuorumRefused, "approvals", "approve", rid)
	bob.ok("approvals", "approve", rid)
	carol.ok("approvals", "approve", rid)
	time.Sleep(2100 * time.Millisecond) // it ends by itself
	bob.ok("breakglass", "review", session)
	if l := c.ok("breakglass", "list"); strings.Contains(l, session) {
		t.Errorf("reviewed session still listed as unreviewed: %s", l)
	}

	// Policy change: add dave, 3 of 4; needs 2 of the old 3 first.
	pid := requestID(t, carol.ok("quorum", "propose", "--add-approver", "dave="+pubs["dave"], "--threshold", "3", "--reason", "dave joins"))
	c.as(dir, "dave").code(exitQuorumRefused, "approvals", "approve", pid) // not an approver yet
	alice.ok("approvals", "approve", pid)
	carol.code(exitQuorumRefused, "quorum", "apply", pid)
	bob.ok("approvals", "approve", pid)
	carol.ok("quorum", "apply", pid)
	if out := c.ok("quorum", "show"); !strings.Contains(out, "policy serial 2") || !strings.Contains(out, "3 of 4") {
		t.Errorf("after apply: %s", out)
	}
	carol.code(exitQuorumRefused, "quorum", "apply", pid)

	if out := c.ok("audit", "verify"); !strings.Contains(out, "ledger OK") {
		t.Errorf("audit verify = %s", out)
	}
	tail := c.ok("audit", "tail", "-n", "1000")
	for _, k := range []string{"ledger.key", "user", "policy", "request", "approval", "denial", "decision", "breakglass", "review"} {
		if !strings.Contains(tail, " "+k+" ") {
			t.Errorf("audit tail has no %s record", k)
		}
	}
}

func writeTemp(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestAuditVerifyCatchesDatabaseEdits edits the SQLite file behind the
// tool's back: a record's content, then a deleted row.
func TestAuditVerifyCatchesDatabaseEdits(t *testing.T) {
	c, dir := quorumCLI(t)
	for _, p := range []string{"alice", "bob"} {
		c.ok("users", "add", p)
	}
	pub := strings.TrimSpace(c.as(dir, "bob").ok("keys", "generate", "bob"))
	c.ok("quorum", "init", "--approver", "bob="+pub, "--threshold", "1")
	requestID(t, c.as(dir, "alice").ok("approvals", "request", "--database", "shop", "--role", "r", "--sql", "DROP TABLE audit_2019", "--reason", "x"))
	c.ok("audit", "verify")

	db, err := sql.Open("sqlite", c.env["DUALKEY_STATE"])
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var seq uint64
	var rec []byte
	for _, r := range readLedger(t, db) {
		if b := r.Encode(); bytes.Contains(b, []byte("audit_2019")) {
			seq, rec = r.Seq, b
			break
		}
	}
	if rec == nil {
		t.Fatal("no ledger record names audit_2019")
	}
	edited := bytes.Replace(rec, []byte("audit_2019"), []byte("audit_2020"), 1)
	if _, err := db.Exec("UPDATE ledger SET codec = 0, rec = ? WHERE seq = ?", edited, seq); err != nil {
		t.Fatal(err)
	}
	out, _, code := c.run("audit", "verify")
	if code != exitDamaged || !strings.Contains(out, fmt.Sprintf("seq %d: edited", seq)) {
		t.Fatalf("audit verify after an edit: exit %d\n%s", code, out)
	}
	var rep struct {
		Problems []struct{ Seq uint64 }
	}
	jout, _, _ := c.run("audit", "verify", "--json")
	if err := json.Unmarshal([]byte(jout), &rep); err != nil || len(rep.Problems) == 0 {
		t.Fatalf("audit verify --json: %v\n%s", err, jout)
	}
	// Put it back; then garbage in a row stored compressed (codec 1): it
	// does not decode, and verify reports it at its seq, as garbage in a
	// plain row, rather than stop at it.
	if _, err := db.Exec("UPDATE ledger SET rec = ? WHERE seq = ?", rec, seq); err != nil {
		t.Fatal(err)
	}
	c.ok("audit", "verify")
	var codec int
	var stored []byte
	if err := db.QueryRow("SELECT codec, rec FROM ledger WHERE seq = ?", seq).Scan(&codec, &stored); err != nil {
		t.Fatal(err)
	}
	junk := append([]byte{0x28, 0xb5, 0x2f, 0xfd}, bytes.Repeat([]byte{0xa5}, 64)...) // zstd's magic, then junk
	if _, err := db.Exec("UPDATE ledger SET codec = 1, rec = ? WHERE seq = ?", junk, seq); err != nil {
		t.Fatal(err)
	}
	out, _, code = c.run("audit", "verify")
	if code != exitDamaged || !strings.Contains(out, fmt.Sprintf("seq %d: malformed", seq)) {
		t.Fatalf("audit verify with garbage in a compressed row: exit %d\n%s", code, out)
	}
	if _, err := db.Exec("UPDATE ledger SET codec = ?, rec = ? WHERE seq = ?", codec, stored, seq); err != nil {
		t.Fatal(err)
	}
	c.ok("audit", "verify")
	// Then delete a row in the middle.
	if _, err := db.Exec("DELETE FROM ledger WHERE seq = 2"); err != nil {
		t.Fatal(err)
	}
	out, _, code = c.run("audit", "verify")
	if code != exitDamaged || !strings.Contains(out, "seq 2: deleted") {
		t.Fatalf("audit verify after a deletion: exit %d\n%s", code, out)
	}
	// A missing ledger key is never silently replaced.
	os.Rename(filepath.Join(filepath.Dir(c.env["DUALKEY_STATE"]), "ledger.key"), filepath.Join(dir, "moved.key"))
	if e := c.code(1, "users", "add", "carol"); !strings.Contains(e, "key") {
		t.Errorf("with the ledger key gone: %s", e)
	}
}
