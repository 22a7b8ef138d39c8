package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgtest"
)

// TestPGRestoreTablespaceMap restores a cluster with a tablespace with
// `dualkey pg restore --tablespace-map`: the tablespace goes where the
// flag says (by OID or by original location), the output and --json say
// where, and bad mappings are refused before anything is written.
func TestPGRestoreTablespaceMap(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	base, err := os.MkdirTemp("", "dualkey-tsmap-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	c := newCLI(t, filepath.Join(base, "vault"))
	c.ok("vault", "init", "--min-retention", "0s")
	pg := pgtest.Start(t, pgtest.Options{})
	ts := filepath.Join(base, "ts")
	if err := os.Mkdir(ts, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := pgtest.Own(ts); err != nil {
		t.Fatal(err)
	}
	pg.Exec("postgres", "CREATE TABLESPACE extra LOCATION '"+ts+"'")
	pg.Exec("postgres", "CREATE TABLE important (id int) TABLESPACE extra; INSERT INTO important SELECT generate_series(1, 100)")
	oid := pg.Query("postgres", "SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
	agent := startAgentProc(t, c, "--pg", pg.URL("postgres"), "--slot", "tsmap", "--flush-every", "50ms", "--no-tripwire")
	c.ok("pg", "basebackup", "--pg", pg.URL("postgres"))
	waitVault(t, openRepoFor(t, c), serverLSN(t, pg), 30*time.Second)
	agent.interrupt(t)

	target := func() string { return filepath.Join(t.TempDir(), "data") }
	inside := target()
	tests := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"malformed", []string{"--tablespace-map", "nonsense"}, exitUsage, "OLD=NEW"},
		{"mapped twice", []string{"--tablespace-map", oid + "=/a", "--tablespace-map", oid + "=/b"}, exitUsage, "mapped twice"},
		{"no such tablespace", []string{"--tablespace-map", "1=/a"}, exitError, "no such tablespace"},
		// The server still runs: its tablespace directory is not empty.
		{"original location in use", nil, exitUsage, "not empty"},
		{"inside the target", []string{"--target", inside, "--tablespace-map", oid + "=" + filepath.Join(inside, "ts")}, exitUsage, "outside the target"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"pg", "restore", "--latest"}, tt.args...)
			if !strings.Contains(strings.Join(tt.args, " "), "--target") {
				args = append(args, "--target", target())
			}
			if errs := c.code(tt.code, args...); !strings.Contains(errs, tt.msg) {
				t.Errorf("stderr %q does not mention %q", errs, tt.msg)
			}
		})
	}
	if _, err := os.Lstat(inside); !os.IsNotExist(err) {
		t.Errorf("refused restore wrote its target: %v", err)
	}

	// By original location, with --json.
	moved := filepath.Join(base, "moved", "ts")
	var res struct {
		Result pgagent.RestoreResult `json:"result"`
	}
	dir := target()
	c.json(&res, "pg", "restore", "--latest", "--target", dir, "--tablespace-map", ts+"="+moved)
	if len(res.Result.Tablespaces) != 1 || res.Result.Tablespaces[0] != (pgagent.RestoredTablespace{OID: mustOID(t, oid), Original: ts, Location: moved}) {
		t.Errorf("--json tablespaces %+v, want %s from %s at %s", res.Result.Tablespaces, oid, ts, moved)
	}
	if got, err := os.Readlink(filepath.Join(dir, "pg_tblspc", oid)); err != nil || got != moved {
		t.Errorf("pg_tblspc/%s links to %q (%v), want %s", oid, got, err, moved)
	}
	if ents, err := os.ReadDir(moved); err != nil || len(ents) == 0 {
		t.Errorf("nothing restored into %s: %v", moved, err)
	}

	// By OID, as text.
	moved2 := filepath.Join(base, "moved2")
	out := c.ok("pg", "restore", "--latest", "--target", target(), "--tablespace-map", oid+"="+moved2)
	if want := "tablespace " + oid + " restored to " + moved2; !strings.Contains(out, want) {
		t.Errorf("output does not say %q:\n%s", want, out)
	}
}

func mustOID(t *testing.T, s string) uint32 {
	t.Helper()
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(n)
}
