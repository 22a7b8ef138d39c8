package ledger

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The ledger is a leaf: the gate, quorum and the vault write to it through
// its own Store and Mirror interfaces, so it imports no sibling and trusts
// nothing it would audit.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/ledger", "the ledger is a leaf: stdlib only (Store and Mirror are its own interfaces)")
}
