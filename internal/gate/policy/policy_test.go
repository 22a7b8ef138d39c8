package policy

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/gate/classify"
)

const example = `# gate.yaml
listen: 0.0.0.0:6432
tls:
  generate: true
state: /var/lib/dualkey/state.db
request_expiry: 30m
webhook: https://hooks.example.com/dualkey
limits:
  max_rows: 1000
  max_connections: 200
upstreams:
  app:
    host: db.internal
    dbname: app_production
    user: dualkey_gate
    password_file: secrets/app.pw
  analytics:
    host: replica.internal
    port: 5433
    user: reader
    sslmode: verify-full
groups:
  dba: [alice, bob]
  dev: [carol, dave]
rules:
  - name: nobody runs what the classifier cannot read
    users: ["*"]
    databases: ["*"]
    classes: [unknown]
    action: deny
  - name: DBAs change schemas, destructive needs a quorum
    groups: [dba]
    databases: ["*"]
    classes: [destructive, privileged]
    action: hold
  - groups: [dba]
    databases: ["*"]
    classes: ["*"]
    action: allow
    max_rows: 50000
  - name: developers read and write app
    groups: [dev]
    databases: [app]
    classes: [read, write]
    action: allow
  - groups: [dev]
    databases: [app]
    classes: [ddl, destructive]
    action: hold
    message: ask a DBA to approve
  - users: ["*"]
    databases: [analytics]
    classes: [read]
    action: allow
`

func TestParseLimits(t *testing.T) {
	c, err := Parse([]byte(`tls: {require_tls: false}
limits: {max_connections: 50, max_connections_per_user: 4, dry_run_timeout: 2s, dry_run: false, pool_idle: 0, pool_idle_timeout: 90s, pool_lifetime: 2h}
event_loop: false
event_loops: 3
upstreams: {db: {host: h, user: u}}
rules: [{users: [a], databases: [db], classes: [read], action: allow}]
`), "g.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if l := c.Limits; l.MaxConnections != 50 || l.MaxConnectionsPerUser != 4 || l.DryRunTimeout != 2*time.Second || !l.NoDryRun ||
		l.PoolIdle != -1 || l.PoolIdleTimeout != 90*time.Second || l.PoolLifetime != 2*time.Hour {
		t.Errorf("limits = %+v", l)
	}
	if !c.NoEventLoop {
		t.Error("event_loop: false left the event loop on")
	}
	if c.EventLoops != 3 {
		t.Errorf("event_loops: 3 gave %d", c.EventLoops)
	}
	if c.LedgerSync != DefaultLedgerSync {
		t.Errorf("ledger_sync not given: %v, want %v", c.LedgerSync, DefaultLedgerSync)
	}
	for in, want := range map[string]time.Duration{"0": 0, "0s": 0, "250ms": 250 * time.Millisecond, "1m": time.Minute} {
		c, err := Parse([]byte("tls: {require_tls: false}\nledger_sync: "+in+"\nupstreams: {db: {host: h, user: u}}\n"+
			"rules: [{users: [a], databases: [db], classes: [read], action: allow}]\n"), "g.yaml")
		if err != nil || c.LedgerSync != want {
			t.Errorf("ledger_sync: %s: %v, %v; want %v", in, c.LedgerSync, err, want)
		}
	}
	for in, want := range map[string]struct {
		cpus []int
		none bool
	}{"": {}, "auto": {}, "none": {none: true}, "[0, 2]": {cpus: []int{0, 2}}, "[3]": {cpus: []int{3}}} {
		doc := "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules: [{users: [a], databases: [db], classes: [read], action: allow}]\n"
		if in != "" {
			doc += "event_loop_cpus: " + in + "\n"
		}
		c, err := Parse([]byte(doc), "g.yaml")
		if err != nil || !slices.Equal(c.LoopCPUs, want.cpus) || c.NoLoopPin != want.none {
			t.Errorf("event_loop_cpus: %q: %v, none %v, %v; want %v, none %v", in, c.LoopCPUs, c.NoLoopPin, err, want.cpus, want.none)
		}
	}
	for _, b := range []string{"epoll", "io_uring"} {
		c, err := Parse([]byte("tls: {require_tls: false}\nevent_loop: "+b+"\nupstreams: {db: {host: h, user: u}}\n"+
			"rules: [{users: [a], databases: [db], classes: [read], action: allow}]\n"), "g.yaml")
		if err != nil {
			t.Fatalf("event_loop: %s: %v", b, err)
		}
		if c.NoEventLoop || c.LoopBackend != b {
			t.Errorf("event_loop: %s: backend %q, off %v", b, c.LoopBackend, c.NoEventLoop)
		}
	}
}

func TestParseExample(t *testing.T) {
	c, err := Parse([]byte(example), "gate.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "0.0.0.0:6432" || !c.TLS.Generate || !c.TLS.RequireTLS || c.TLS.Cert != "gate.crt" ||
		c.RequestExpiry != 30*time.Minute || c.Limits.MaxRows != 1000 || c.Limits.MaxConnections != 200 ||
		c.Limits.MaxMessageBytes != 64<<20 || len(c.Rules) != 6 || c.NoEventLoop {
		t.Errorf("config = %+v", c)
	}
	app := c.Upstreams["app"]
	if app.Port != 5432 || app.DBName != "app_production" || app.SSLMode != "prefer" || app.Line != 12 {
		t.Errorf("app = %+v", app)
	}
	if a := c.Upstreams["analytics"]; a.DBName != "analytics" || a.Port != 5433 {
		t.Errorf("analytics = %+v", a)
	}
}

func TestDecide(t *testing.T) {
	c, err := Parse([]byte(example), "gate.yaml")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		user   string
		groups []string
		db     string
		class  classify.Class
		action Action
		rule   string
		limit  int64
	}{
		{"alice", nil, "app", classify.Read, Allow, `rules[2] (gate.yaml:36)`, 50000},
		{"alice", nil, "app", classify.DDL, Allow, `rules[2] (gate.yaml:36)`, 50000},
		{"alice", nil, "app", classify.Destructive, Hold, `rules[1] "DBAs change schemas, destructive needs a quorum" (gate.yaml:31)`, 0},
		{"alice", nil, "app", classify.Privileged, Hold, "rules[1]", 0},
		{"alice", nil, "app", classify.Unknown, Deny, "rules[0]", 0},
		{"carol", nil, "app", classify.Write, Allow, "rules[3]", 1000}, // limits.max_rows
		{"carol", nil, "app", classify.Destructive, Hold, "rules[4]", 0},
		{"carol", nil, "app", classify.Privileged, Deny, "default: no rule matched", 0},
		{"carol", nil, "analytics", classify.Write, Deny, "default", 0},
		{"carol", nil, "analytics", classify.Read, Allow, "rules[5]", 1000},
		{"mallory", nil, "app", classify.Read, Deny, "default", 0},
		{"mallory", []string{"dev"}, "app", classify.Read, Allow, "rules[3]", 1000}, // group from the state store
		{"mallory", nil, "nope", classify.Read, Deny, "default", 0},
		{"alice", nil, "app", classify.Class("bogus"), Deny, "rules[0]", 0}, // not a class: unknown
	}
	for _, tt := range tests {
		d := c.Decide(tt.user, tt.groups, tt.db, tt.class)
		if d.Action != tt.action || !strings.HasPrefix(d.Rule, tt.rule) || d.RowLimit != tt.limit {
			t.Errorf("Decide(%s, %v, %s, %s) = %+v, want %s by %s limit %d", tt.user, tt.groups, tt.db, tt.class, d, tt.action, tt.rule, tt.limit)
		}
	}
	if d := c.Decide("carol", nil, "app", classify.DDL); d.Message != "ask a DBA to approve" {
		t.Errorf("message = %q", d.Message)
	}
}

// TestStarIsNotUnknown: "*" covers every class but unknown, which only a
// rule naming it allows.
func TestStarIsNotUnknown(t *testing.T) {
	c, err := Parse([]byte(`tls: {require_tls: false}
upstreams: {db: {host: h, user: u}}
rules:
  - {users: ["*"], databases: ["*"], classes: ["*"], action: allow}
`), "g.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, cl := range classify.Classes {
		want := Allow
		if cl == classify.Unknown {
			want = Deny
		}
		if d := c.Decide("x", nil, "db", cl); d.Action != want {
			t.Errorf("%s: %s, want %s", cl, d.Action, want)
		}
	}
}

func TestDecideResult(t *testing.T) {
	c, err := Parse([]byte(`tls: {require_tls: false}
upstreams: {db: {host: h, user: u}}
rules:
  - {users: [u], databases: [db], classes: [write], action: hold}
  - {users: [u], databases: [db], classes: [read], action: allow, max_rows: 10}
  - {users: [u], databases: [db], classes: [ddl], action: allow}
`), "g.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// ddl is the more severe class, yet the string must be held for its write.
	res := classify.Classify("UPDATE t SET a = 1 WHERE id = 1; CREATE TABLE x (a int)", classify.Options{})
	if res.Class != classify.DDL {
		t.Fatalf("class %s", res.Class)
	}
	if d := c.DecideResult("u", nil, "db", res); d.Action != Hold || !strings.HasPrefix(d.Rule, "rules[0]") {
		t.Errorf("DecideResult = %+v, want hold by rules[0]", d)
	}
	if d := c.DecideResult("u", nil, "db", classify.Classify("SELECT 1; CREATE TABLE x (a int)", classify.Options{})); d.Action != Allow || d.RowLimit != 10 {
		t.Errorf("DecideResult = %+v, want allow with the smaller limit 10", d)
	}
	if d := c.DecideResult("u", nil, "db", classify.Classify("", classify.Options{})); d.Action != Allow {
		t.Errorf("empty query: %+v", d)
	}
}

func TestBrokenConfigs(t *testing.T) {
	const ok = "upstreams: {db: {host: h, user: u}}\nrules: [{users: [a], databases: [db], classes: [read], action: allow}]\n"
	tests := []struct {
		name, yaml string
		want       []string // each must appear in the error
	}{
		{"syntax", "a: 1\nlisten: [\n", []string{"g.yaml:2: did not find"}},
		{"empty", "", []string{"g.yaml: empty config"}},
		{"not a mapping", "- a\n", []string{"g.yaml:1: must be a mapping"}},
		{"unknown key", "tls: {require_tls: false}\nlistn: x\n" + ok, []string{"g.yaml:2: listn: unknown key (known: event_loop, event_loop_cpus, event_loops, groups, ledger_sync, limits"}},
		{"twice", "tls: {require_tls: false}\nlisten: a:1\nlisten: b:2\n" + ok, []string{"g.yaml:3: listen: given twice"}},
		{"listen", "tls: {require_tls: false}\nlisten: nowhere\n" + ok, []string{`g.yaml:2: listen: "nowhere" is not host:port`}},
		{"no upstreams", "tls: {require_tls: false}\nrules: []\n", []string{"upstreams: missing", "g.yaml:2: rules: must be a non-empty list"}},
		{"no rules", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\n", []string{"g.yaml:1: rules: missing"}},
		{"tls needs cert", ok, []string{"tls: require_tls needs a certificate"}},
		{"tls half", "tls: {cert: a.pem}\n" + ok, []string{"tls: cert and key go together"}},
		{"tls bool", "tls: {require_tls: maybe}\n" + ok, []string{"g.yaml:1: tls.require_tls: must be true or false"}},
		{"expiry", "tls: {require_tls: false}\nrequest_expiry: soon\n" + ok, []string{`g.yaml:2: request_expiry: "soon" is not a positive duration`}},
		{"webhook", "tls: {require_tls: false}\nwebhook: ftp://x\n" + ok, []string{"g.yaml:2: webhook:"}},
		{"ledger_sync negative", "tls: {require_tls: false}\nledger_sync: -1s\n" + ok, []string{`g.yaml:2: ledger_sync: "-1s" is not a duration from 0`}},
		{"ledger_sync long", "tls: {require_tls: false}\nledger_sync: 2m\n" + ok, []string{`g.yaml:2: ledger_sync: "2m" is not a duration from 0`}},
		{"ledger_sync word", "tls: {require_tls: false}\nledger_sync: often\n" + ok, []string{`g.yaml:2: ledger_sync: "often" is not a duration`}},
		{"event_loop", "tls: {require_tls: false}\nevent_loop: off\n" + ok, []string{"g.yaml:2: event_loop: must be true, false, epoll or io_uring"}},
		{"event_loops", "tls: {require_tls: false}\nevent_loops: 0\n" + ok, []string{"g.yaml:2: event_loops: 0 is out of range"}},
		{"event_loop_cpus word", "tls: {require_tls: false}\nevent_loop_cpus: all\n" + ok, []string{"g.yaml:2: event_loop_cpus: must be auto, none or a list of CPU numbers like [0, 2]"}},
		{"event_loop_cpus empty", "tls: {require_tls: false}\nevent_loop_cpus: []\n" + ok, []string{"g.yaml:2: event_loop_cpus: must be auto, none or a list"}},
		{"event_loop_cpus bad CPU", "tls: {require_tls: false}\nevent_loop_cpus:\n  - 0\n  - 1024\n  - x\n" + ok, []string{"g.yaml:4: event_loop_cpus: 1024 is out of range 0..1023", "g.yaml:5: event_loop_cpus: must be a whole number"}},
		{"limits", "tls: {require_tls: false}\nlimits:\n  max_rows: -1\n  max_message_bytes: 10\n  max_connections_per_user: -2\n  dry_run_timeout: soon\n" + ok,
			[]string{"g.yaml:3: limits.max_rows: -1 is out of range", "g.yaml:4: limits.max_message_bytes: 10 is out of range",
				"g.yaml:5: limits.max_connections_per_user: -2 is out of range", `g.yaml:6: limits.dry_run_timeout: "soon" is not a positive duration`}},
		{"upstream fields", "tls: {require_tls: false}\nupstreams:\n  db:\n    port: 99999\n    sslmode: sometimes\n    password: x\n    password_file: y\nrules: [{users: [a], databases: [db], classes: [read], action: allow}]\n",
			[]string{"g.yaml:4: upstreams.db.port: 99999 is out of range", `g.yaml:5: upstreams.db.sslmode: "sometimes" is not one of`,
				"g.yaml:4: upstreams.db.host: missing", "upstreams.db.user: missing", "password and password_file: give one"}},
		{"upstream key", "tls: {require_tls: false}\nupstreams:\n  db:\n    host: h\n    user: u\n    pasword: x\n" +
			"rules: [{users: [a], databases: [db], classes: [read], action: allow}]\n", []string{"g.yaml:6: upstreams.db.pasword: unknown key"}},
		{"rule action", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - users: [a]\n    databases: [db]\n    classes: [read]\n    action: alow\n",
			[]string{`g.yaml:7: rules[0].action: "alow" is not one of allow, deny, hold`}},
		{"rule class", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - users: [a]\n    databases: [db]\n    classes:\n      - read\n      - destructiv\n    action: hold\n",
			[]string{`g.yaml:8: rules[0].classes[1]: "destructiv" is not a class`}},
		{"rule database", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - users: [a]\n    databases:\n      - db\n      - dbb\n    classes: [read]\n    action: allow\n",
			[]string{`g.yaml:7: rules[0].databases[1]: "dbb" is not an upstream`}},
		{"rule nobody", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - databases: [db]\n    classes: [read]\n    action: allow\n",
			[]string{"g.yaml:4: rules[0]: names nobody"}},
		{"rule missing", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - users: [a]\n",
			[]string{"g.yaml:4: rules[0].databases: missing", "g.yaml:4: rules[0].classes: missing", "g.yaml:4: rules[0].action: missing"}},
		{"rule max_rows on hold", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - users: [a]\n    databases: [db]\n    classes: [write]\n    action: hold\n    max_rows: 10\n",
			[]string{"g.yaml:8: rules[0].max_rows: only an allow rule has a row limit"}},
		{"rule max_rows zero", "tls: {require_tls: false}\nupstreams: {db: {host: h, user: u}}\nrules:\n  - users: [a]\n    databases: [db]\n    classes: [write]\n    action: allow\n    max_rows: 0\n",
			[]string{"g.yaml:8: rules[0].max_rows: 0 is out of range"}},
		{"groups", "tls: {require_tls: false}\ngroups:\n  dba: [alice, 7, '']\n" + ok, []string{"g.yaml:3: groups.dba[2]: must be a non-empty string"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), "g.yaml")
			if err == nil {
				t.Fatalf("no error for\n%s", tt.yaml)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
			if !strings.HasPrefix(err.Error(), "policy: g.yaml") {
				t.Errorf("error %q does not start with the file", err)
			}
		})
	}
}

func TestLoadPaths(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "app.pw"), []byte("s3cret\n"), 0o600)
	cfg := "tls: {cert: c.pem, key: k.pem}\nupstreams: {db: {host: h, user: u, password_file: app.pw, dbname: real}}\n" +
		"rules: [{users: [a], databases: [db], classes: [read], action: allow}]\n"
	path := filepath.Join(dir, "gate.yaml")
	os.WriteFile(path, []byte(cfg), 0o600)
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.TLS.Cert != filepath.Join(dir, "c.pem") || c.Upstreams["db"].PasswordFile != filepath.Join(dir, "app.pw") {
		t.Errorf("paths not resolved against the config's directory: %+v %+v", c.TLS, c.Upstreams["db"])
	}
	dsn, err := c.Upstreams["db"].DSN()
	if err != nil || dsn != "postgres://u:s3cret@h:5432/real?sslmode=prefer" {
		t.Errorf("DSN = %q, %v", dsn, err)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil || !strings.HasPrefix(err.Error(), "policy: ") {
		t.Errorf("missing file: %v", err)
	}
	os.Remove(filepath.Join(dir, "app.pw"))
	if _, err := c.Upstreams["db"].DSN(); err == nil || !strings.Contains(err.Error(), "password_file") {
		t.Errorf("missing password file: %v", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(example))
	f.Add([]byte("rules: [{users: '*'}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data, "f.yaml")
		if err != nil {
			return
		}
		// A valid config decides every class without panicking, and
		// never allows unknown unless a rule names it.
		for _, cl := range classify.Classes {
			d := c.Decide("u", []string{"g"}, "db", cl)
			if d.Action == "" || d.Rule == "" {
				t.Fatalf("empty decision %+v", d)
			}
		}
	})
}
