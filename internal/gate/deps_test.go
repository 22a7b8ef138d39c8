package gate

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The gate uses classify, policy, quorum, state and the ledger; it never
// reaches into the vault or the agent, and nothing under internal imports cmd.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/gate", map[string]string{
		deptest.Module + "cmd":              "nothing under internal imports cmd",
		deptest.Module + "internal/vault":   "the gate has nothing to do with backups",
		deptest.Module + "internal/pgagent": "the agent is a vault client",
		deptest.Module + "internal/pgtest":  "the test harness is for tests only",
	})
}
