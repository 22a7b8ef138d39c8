package state

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// State is a leaf: the gate and quorum build on it, so it imports no other
// package of ours (internal/pgtest only from tests), just its two drivers.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/state", map[string]string{
		deptest.Module + "cmd":      "nothing under internal imports cmd",
		deptest.Module + "internal": "state is a leaf: gate, quorum and ledger build on it, not the reverse (pgtest is for tests only)",
	})
}
