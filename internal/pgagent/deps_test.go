package pgagent

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The agent is a client of the vault: it runs on the database host, which
// the threat model assumes can be compromised (T3), so it reaches the vault
// only through repo.Store and never through the vault's own rule engine.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/pgagent", map[string]string{
		deptest.Module + "cmd":                   "nothing under internal imports cmd",
		deptest.Module + "internal/gate":         "the agent does not depend on the gateway",
		deptest.Module + "internal/vault/guard":  "a client reaches the vault through repo.Store",
		deptest.Module + "internal/vault/server": "a client reaches the vault through repo.Store",
		deptest.Module + "internal/pgtest":       "the test harness is for tests only",
	})
}
