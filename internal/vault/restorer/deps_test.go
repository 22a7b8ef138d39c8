package restorer

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the restorer a plain client of the repository: it reads
// snapshots through repo and knows nothing of how they were made or where
// they are stored.
func TestDeps(t *testing.T) {
	forbidden := map[string]string{
		"github.com/dualkey/dualkey/cmd":                     "nothing under internal imports cmd",
		"github.com/dualkey/dualkey/internal/gate":           "the vault never depends on the gateway",
		"github.com/dualkey/dualkey/internal/quorum":         "restore needs no approvals",
		"github.com/dualkey/dualkey/internal/pgagent":        "the agent uses the restorer, not the reverse",
		"github.com/dualkey/dualkey/internal/vault/archiver": "restore must not depend on how a backup was cut",
		"github.com/dualkey/dualkey/internal/vault/server":   "the store is reached through repo.Store",
		"github.com/dualkey/dualkey/internal/vault/guard":    "the store is reached through repo.Store",
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	const pkg = "github.com/dualkey/dualkey/internal/vault/restorer"
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
