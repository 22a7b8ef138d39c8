package runner

import (
	"os"
	"strings"
	"testing"
	"time"
)

// TestConfigErrors: each mistake is reported at its line, all at once,
// the gate section's by the gate's own parser with dualkey.yaml's lines.
func TestConfigErrors(t *testing.T) {
	_, err := Load("testdata/bad.yaml")
	if err == nil {
		t.Fatal("bad.yaml loaded")
	}
	for _, want := range []string{
		"testdata/bad.yaml:4: agent.flush_evry: unknown key",
		"testdata/bad.yaml:5: agent.base_every: \"sometimes\" is not a positive duration",
		"testdata/bad.yaml:8: pg.local.port: 99999 is out of range",
		"testdata/bad.yaml:10: users[0].name: ",
		"testdata/bad.yaml:12: users[1].approver: must be true or false",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}

	// With the rest fixed, the gate section's errors name dualkey.yaml's lines.
	data, _ := os.ReadFile("testdata/bad.yaml")
	fixed := strings.NewReplacer("flush_evry", "flush_every", "sometimes", "1h", "99999", "5499", "Alice", "alice", "yes please", "true").Replace(string(data))
	_, err = Parse([]byte(fixed), "dualkey.yaml")
	if err == nil {
		t.Fatal("the gate section's mistakes were not found")
	}
	for _, want := range []string{
		`dualkey.yaml:17: gate.rules[0].databases[0]: "shop" is not an upstream`,
		`dualkey.yaml:19: gate.rules[0].action: "hodl" is not one of allow, deny, hold`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestConfigTable(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"syntax", "data_dir: [\n", "x.yaml:1: "},
		{"unknown top key", "dat_dir: x\n", "x.yaml:1: dat_dir: unknown key"},
		{"upstreams are ours", "gate:\n  upstreams:\n    app: {host: x, user: y}\n", "x.yaml:2: gate.upstreams: dualkey run makes the upstreams"},
		{"state in gate", "gate:\n  state: x.db\n", "x.yaml:2: gate.state: set the top-level state"},
		{"flow gate", "gate: {listen: \"127.0.0.1:1\"}\n", "x.yaml:1: gate: write it as a block mapping"},
		{"threshold above approvers", "users:\n  - name: a\n    approver: true\nquorum:\n  threshold: 2\n", "x.yaml:5: quorum.threshold: 2 is more than the 1 approvers"},
		{"no approver", "users:\n  - name: a\n", "x.yaml:2: users: no approver"},
		{"url and local", "pg:\n  url: postgres://h/db\n  local:\n    port: 5\n", "x.yaml:3: pg.local: a server given by url is not local"},
		{"bad url", "pg:\n  url: mysql://h/db\n", "x.yaml:2: pg.url: \"mysql://h/db\" is not a postgres:// URL"},
		{"password hidden", "pg:\n  url: http://u:hunter2@h/db\n", "u:***@h"},
		{"vault url", "vault:\n  repo: https://vault:8443\n", "x.yaml:2: vault.repo"},
		{"gate rule class", "gate:\n  rules:\n    - users: [\"*\"]\n      databases: [\"*\"]\n      classes: [reed]\n      action: allow\n", "x.yaml:5: gate.rules[0].classes[0]: \"reed\" is not a class"},
		{"gate listen", "gate:\n  listen: nowhere\n", "x.yaml:2: gate.listen: \"nowhere\" is not host:port"},
		{"slot", "agent:\n  slot: My-Slot\n", "x.yaml:2: agent.slot"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), "x.yaml")
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Parse(%q) = %v, want an error containing %q", tt.yaml, err, tt.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("the password shows: %v", err)
			}
		})
	}
}

// TestConfigExample: the documented example parses, and sets what it says.
func TestConfigExample(t *testing.T) {
	c, err := Load("../../docs/dualkey.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Agent.BaseEvery != 12*time.Hour || c.Threshold != 2 || len(c.Users) != 4 || c.Gate.Listen != "127.0.0.1:6543" {
		t.Fatalf("example config: %+v", c)
	}
	d := Default()
	if d.DataDir != "dualkey-data" || d.Gate.Policy == nil || len(d.Gate.Policy.Rules) != 3 || !d.Agent.FirstBaseBackup {
		t.Fatalf("defaults: %+v", d)
	}
}

// TestConfigGateSettings: the gate section's limits, event_loop and ledger_sync reach
// the gate's policy config (the runner builds the gate's Config from it
// with gate.ConfigFrom, as `dualkey gate` does).
func TestConfigGateSettings(t *testing.T) {
	c, err := Parse([]byte("gate:\n  event_loop: false\n  ledger_sync: 0\n  limits:\n    max_connections: 3\n    max_connections_per_user: 1\n"), "x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p := c.Gate.Policy
	if p == nil || !p.NoEventLoop || p.Limits.MaxConnections != 3 || p.Limits.MaxConnectionsPerUser != 1 || p.LedgerSync != 0 {
		t.Fatalf("gate policy: %+v", p)
	}
	if d := Default().Gate.Policy.LedgerSync; d != time.Second {
		t.Fatalf("default ledger_sync %v, want 1s", d)
	}
}

// TestConfigFlagsOnly: with no file (only --pg and --data), or an empty
// one, what is on by default stays on: the tripwire and the first base
// backup (they were off when no document reached the parser).
func TestConfigFlagsOnly(t *testing.T) {
	for _, data := range []string{"", "# nothing\n"} {
		c, err := ParseWith([]byte(data), "", Overrides{URL: "postgres://postgres@127.0.0.1:5432/shop", DataDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		if !c.Tripwire.Enabled || !c.Agent.FirstBaseBackup {
			t.Errorf("%q: tripwire %v, first base backup %v; want both on", data, c.Tripwire.Enabled, c.Agent.FirstBaseBackup)
		}
	}
	c, err := Parse([]byte("tripwire:\n  enabled: false\nagent:\n  first_base_backup: false\n"), "x.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Tripwire.Enabled || c.Agent.FirstBaseBackup {
		t.Errorf("explicit false: tripwire %v, first base backup %v", c.Tripwire.Enabled, c.Agent.FirstBaseBackup)
	}
}

// TestBannerPostgresState: with a PostgreSQL state the printed commands
// name the variable holding the DSN, never a redacted (useless) one.
func TestBannerPostgresState(t *testing.T) {
	r := &Runner{opts: Options{Exe: "dualkey"}, info: Info{State: "postgres://u:***@h/db", LedgerKey: "d/ledger.key",
		Databases: []string{"app"}, GateAddr: "127.0.0.1:1",
		People: []Person{{Name: "alice", PasswordFile: "p"}, {Name: "bob", Approver: true, ConfigDir: "c", PassphraseFile: "f"}}}}
	b := r.Banner()
	for _, l := range strings.Split(b, "\n") {
		if strings.Contains(l, "dualkey approvals") && (strings.Contains(l, "***") || !strings.Contains(l, `--state "$DUALKEY_STATE"`)) {
			t.Errorf("command line %q", l)
		}
	}
	if !strings.Contains(b, "DUALKEY_LEDGER_KEY=d/ledger.key") {
		t.Fatalf("banner:\n%s", b)
	}
}
