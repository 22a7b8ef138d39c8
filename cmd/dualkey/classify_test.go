package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runIn runs dualkey in-process with stdin and no environment.
func runIn(t *testing.T, stdin string, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	a := newApp(strings.NewReader(stdin), &out, &errb, func(string) string { return "" })
	code := a.run(context.Background(), args)
	return out.String(), errb.String(), code
}

func TestClassifyCommand(t *testing.T) {
	tests := []struct {
		name, stdin string
		args        []string
		want        []string
	}{
		{"argument", "", []string{"classify", "SELECT 1"}, []string{"1. read", "rule select", "class: read"}},
		{"stdin, stacked", "COMMIT; DROP TABLE users", []string{"classify"},
			[]string{"1. read", "2. destructive DROP TABLE users", "rule drop: DROP TABLE users", "class: destructive"}},
		{"blast radius", "", []string{"classify", "DELETE FROM t WHERE id > 5"},
			[]string{"1. write", "tables: t", "blast radius: measured by the row limit"}},
		{"unknown function", "", []string{"classify", "SELECT f(1)"}, []string{"rule func.unknown", "class: unknown"}},
		{"--function", "", []string{"classify", "--function", "app.f=v", "SELECT app.f(1)"}, []string{"rule func.volatile", "class: write"}},
		{"unparseable", "", []string{"classify", "SELEC 1"}, []string{"rule parse.error", "class: unknown"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, errs, code := runIn(t, tt.stdin, tt.args...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errs)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
	out, _, code := runIn(t, "", "classify", "--json", "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
	var res struct {
		Class      string
		Statements []struct{ Rule, Reason string }
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || code != 0 {
		t.Fatalf("--json: %v, exit %d: %s", err, code, out)
	}
	if res.Class != "destructive" || res.Statements[0].Rule != "delete.no-where" || !strings.HasPrefix(res.Statements[0].Reason, "WITH d: ") {
		t.Errorf("--json = %+v", res)
	}
	if _, errs, code := runIn(t, "", "classify", "--function", "f=x", "SELECT 1"); code != exitUsage || !strings.Contains(errs, "--function") {
		t.Errorf("bad --function: exit %d %s", code, errs)
	}
}

const checkConfig = `tls: {require_tls: false}
upstreams:
  app: {host: db, user: gate, password_file: /nonexistent/never-read}
groups:
  dev: [carol]
rules:
  - groups: [dev]
    databases: [app]
    classes: [read, write]
    action: allow
    max_rows: 100
  - groups: [dev]
    databases: [app]
    classes: [destructive]
    action: hold
    message: ask a DBA
`

func TestPolicyCheckCommand(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gate.yaml")
	if err := os.WriteFile(path, []byte(checkConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		stdin string
		args  []string
		code  int
		want  []string
	}{
		{"allow", "", []string{"--user", "carol", "--db", "app", "SELECT 1"}, 0,
			[]string{"decision: allow", "rule: rules[0] (" + path + ":7)", "row limit: 100", "1. read"}},
		{"hold", "TRUNCATE orders", []string{"--user", "carol", "--db", "app"}, exitPolicyHold,
			[]string{"decision: hold", "rules[1] (" + path + ":12)", "message: ask a DBA", "rule truncate"}},
		{"deny by default", "", []string{"--user", "carol", "--db", "app", "GRANT ALL ON t TO carol"}, exitPolicyDeny,
			[]string{"decision: deny", "rule: default: no rule matched", "1. privileged"}},
		{"unknown denied", "", []string{"--user", "carol", "--db", "app", "SELEC 1"}, exitPolicyDeny, []string{"decision: deny"}},
		{"group from the state store", "", []string{"--user", "mallory", "--group", "dev", "--db", "app", "SELECT 1"}, 0, []string{"decision: allow"}},
		{"stranger", "", []string{"--user", "mallory", "--db", "app", "SELECT 1"}, exitPolicyDeny, []string{"decision: deny"}},
		{"strictest statement", "", []string{"--user", "carol", "--db", "app", "SELECT 1; DELETE FROM t"}, exitPolicyHold,
			[]string{"decision: hold", "2. destructive"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"policy", "check", "--config", path}, tt.args...)
			out, errs, code := runIn(t, tt.stdin, args...)
			if code != tt.code {
				t.Fatalf("exit %d, want %d\n%s%s", code, tt.code, out, errs)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
		})
	}
	out, _, code := runIn(t, "", "policy", "check", "--json", "--config", path, "--user", "carol", "--db", "app", "DELETE FROM t WHERE id = 1")
	var d struct {
		Decision, Rule string
		RowLimit       int64 `json:"row_limit"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil || code != 0 || d.Decision != "allow" || d.RowLimit != 100 {
		t.Errorf("--json: %v exit %d %+v", err, code, d)
	}
	if _, errs, code := runIn(t, "", "policy", "check", "--config", path, "--user", "carol", "--db", "nope", "SELECT 1"); code != exitUsage || !strings.Contains(errs, "not an upstream") {
		t.Errorf("unknown db: exit %d %s", code, errs)
	}
	if _, _, code := runIn(t, "", "policy", "check", "--config", path, "--db", "app", "SELECT 1"); code != exitUsage {
		t.Errorf("no --user: exit %d", code)
	}
}

func TestPolicyValidateCommand(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "gate.yaml")
	os.WriteFile(good, []byte(checkConfig), 0o600)
	if out, errs, code := runIn(t, "", "policy", "validate", "--config", good); code != 0 || !strings.Contains(out, "valid (2 rules, 1 upstreams)") {
		t.Errorf("valid config: exit %d %s %s", code, out, errs)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte(strings.Replace(checkConfig, "action: hold", "action: hodl", 1)), 0o600)
	_, errs, code := runIn(t, "", "policy", "validate", "--config", bad)
	if code != exitError || !strings.Contains(errs, bad+`:15: rules[1].action: "hodl" is not one of allow, deny, hold`) {
		t.Errorf("broken config: exit %d %s", code, errs)
	}
	if _, errs, code := runIn(t, "", "policy", "check", "--config", bad, "--user", "u", "--db", "app", "SELECT 1"); code != exitError || !strings.Contains(errs, bad+":15:") {
		t.Errorf("check with a broken config: exit %d %s", code, errs)
	}
}
