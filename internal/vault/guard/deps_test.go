package guard

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the vault's rule engine free of the parts it guards
// against: the gate, quorum service and agent run on hosts we assume may be
// compromised (threats T1–T3), and cmd and the client-side repository sit
// above the vault. quorum/cert is the one allowed exception: it is a leaf
// the vault will use to verify admin actions itself (T4).
func TestDeps(t *testing.T) {
	forbidden := map[string]string{
		"github.com/dualkey/dualkey/cmd":                   "nothing under internal imports cmd",
		"github.com/dualkey/dualkey/internal/gate":         "the vault never depends on the gateway",
		"github.com/dualkey/dualkey/internal/quorum":       "only quorum/cert, a leaf, may be imported",
		"github.com/dualkey/dualkey/internal/pgagent":      "the agent is a client of the vault",
		"github.com/dualkey/dualkey/internal/vault/repo":   "the client-side repository is above the guard",
		"github.com/dualkey/dualkey/internal/vault/server": "the server wraps the guard, not the reverse",
	}
	checkDeps(t, "github.com/dualkey/dualkey/internal/vault/guard", forbidden)
}

func checkDeps(t *testing.T, pkg string, forbidden map[string]string) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	out, err := exec.Command(goBin, "list", "-deps", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for bad, why := range forbidden {
			if dep == bad || strings.HasPrefix(dep, bad+"/") {
				if strings.HasPrefix(dep, "github.com/dualkey/dualkey/internal/quorum/cert") {
					continue
				}
				t.Errorf("%s imports %s: %s", pkg, dep, why)
			}
		}
	}
}
