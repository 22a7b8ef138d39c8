package check

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps check a client of the vault: it reaches the vault only
// through repo's Store, so it runs in-process or against a vault server
// alike, and never depends on the parts the vault defends against.
func TestDeps(t *testing.T) {
	forbidden := map[string]string{
		"github.com/dualkey/dualkey/cmd":                   "nothing under internal imports cmd",
		"github.com/dualkey/dualkey/internal/gate":         "the vault never depends on the gateway",
		"github.com/dualkey/dualkey/internal/quorum":       "the vault verifies quorum certificates, it does not run quorum",
		"github.com/dualkey/dualkey/internal/pgagent":      "the agent is a client of the vault",
		"github.com/dualkey/dualkey/internal/vault/server": "maintenance works through repo.Store, not the server's internals",
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	pkg := "github.com/dualkey/dualkey/internal/vault/check"
	out, err := exec.Command(goBin, "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for bad, why := range forbidden {
			if dep == bad || strings.HasPrefix(dep, bad+"/") {
				t.Errorf("%s imports %s: %s", pkg, dep, why)
			}
		}
	}
}
