// Package deptest checks a package's transitive imports against the layout
// (../shared/STYLE.md): negative dependency tests, so that a wrong import
// fails a test instead of slowly eroding which part may trust which.
package deptest

import (
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"strings"
	"testing"
)

// Module is this module's import path prefix.
const Module = "github.com/dualkey/dualkey/"

// Common reasons, shared by the vault's packages.
var (
	// VaultBelow lists what no vault package may import, and why.
	VaultBelow = map[string]string{
		Module + "cmd":              "nothing under internal imports cmd",
		Module + "internal/gate":    "the vault never depends on the gateway",
		Module + "internal/quorum":  "the vault verifies quorum certificates (quorum/cert), it does not run quorum",
		Module + "internal/pgagent": "the agent is a client of the vault",
	}
	// allowedEverywhere are leaves any package may import despite a
	// forbidden prefix above them.
	allowedEverywhere = []string{Module + "internal/quorum/cert"}
)

type listed struct {
	ImportPath string
	Standard   bool
}

func deps(t testing.TB, pkg string) []listed {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	out, err := exec.Command(goBin, "list", "-deps", "-json=ImportPath,Standard", pkg).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list -deps %s: %v: %s", pkg, err, ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	var all []listed
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var p listed
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		all = append(all, p)
	}
	return all
}

func under(path, prefix string) bool { return path == prefix || strings.HasPrefix(path, prefix+"/") }

// Forbid fails t for every package that pkg imports, directly or not, that
// is or lies under a key of forbidden (import paths), naming the reason.
// Each map is merged; later maps win.
func Forbid(t testing.TB, pkg string, forbidden ...map[string]string) {
	t.Helper()
	rules := map[string]string{}
	for _, m := range forbidden {
		for k, v := range m {
			rules[k] = v
		}
	}
	for _, d := range deps(t, pkg) {
		if d.ImportPath == pkg || allowed(d.ImportPath) {
			continue
		}
		for bad, why := range rules {
			if under(d.ImportPath, bad) {
				t.Errorf("%s imports %s: %s", pkg, d.ImportPath, why)
			}
		}
	}
}

func allowed(path string) bool {
	for _, a := range allowedEverywhere {
		if under(path, a) {
			return true
		}
	}
	return false
}

// Only fails t if pkg imports anything but the standard library and the
// packages under allow, saying why (for leaves such as a backend).
func Only(t testing.TB, pkg, why string, allow ...string) {
	t.Helper()
	for _, d := range deps(t, pkg) {
		if d.Standard || d.ImportPath == pkg {
			continue
		}
		ok := false
		for _, a := range allow {
			ok = ok || under(d.ImportPath, a)
		}
		if !ok {
			t.Errorf("%s imports %s: %s", pkg, d.ImportPath, why)
		}
	}
}
