package incident

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// Incidents join what the agent decodes to the state, the ledger and the
// webhook; cmd/dualkey wires them. The gate and the vault's server side
// have no part in it.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/incident", map[string]string{
		deptest.Module + "cmd":                   "nothing under internal imports cmd",
		deptest.Module + "internal/gate":         "incidents do not depend on the gateway",
		deptest.Module + "internal/vault/server": "a client reaches the vault through repo.Store",
		deptest.Module + "internal/pgtest":       "the test harness is for tests only",
	})
}
