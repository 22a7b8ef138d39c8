package server

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the vault server free of the parts it must not trust or
// sit above: the gate, quorum service and agent (threats T1–T3), cmd, and
// the client-side repository. quorum/cert, a leaf the vault will use to
// verify admin actions (T4), is allowed.
func TestDeps(t *testing.T) {
	const pkg = "github.com/dualkey/dualkey/internal/vault/server"
	forbidden := map[string]string{
		"github.com/dualkey/dualkey/cmd":                 "nothing under internal imports cmd",
		"github.com/dualkey/dualkey/internal/gate":       "the vault never depends on the gateway",
		"github.com/dualkey/dualkey/internal/quorum":     "only quorum/cert, a leaf, may be imported",
		"github.com/dualkey/dualkey/internal/pgagent":    "the agent is a client of the vault",
		"github.com/dualkey/dualkey/internal/vault/repo": "the client-side repository is above the server",
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	out, err := exec.Command(goBin, "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "github.com/dualkey/dualkey/internal/quorum/cert") {
			continue
		}
		for bad, why := range forbidden {
			if dep == bad || strings.HasPrefix(dep, bad+"/") {
				t.Errorf("%s imports %s: %s", pkg, dep, why)
			}
		}
	}
}
