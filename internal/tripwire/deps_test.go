package tripwire

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The tripwire is a leaf: it reads WAL bytes the agent hands it and names
// relations through its own Names interface, so it trusts nothing it
// watches and the agent, the vault and cmd can all use it.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/tripwire", "the tripwire is a leaf: stdlib only (Names is its own interface)")
}
