package retention

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// retention reaches the vault only through repo's Store; the vault itself
// decides what may be removed.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/retention", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/server": "maintenance works through repo.Store, not the server's internals",
	})
}
