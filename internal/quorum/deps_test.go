package quorum

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// Quorum runs on the state store and writes the ledger; it must not reach
// up into what it guards or what wires it.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/quorum", map[string]string{
		deptest.Module + "cmd":              "nothing under internal imports cmd",
		deptest.Module + "internal/vault":   "the vault verifies certificates itself (quorum/cert); quorum never drives it",
		deptest.Module + "internal/gate":    "the gate uses quorum, not the reverse",
		deptest.Module + "internal/pgagent": "the agent is a vault client and has nothing to do with consent",
	})
}
