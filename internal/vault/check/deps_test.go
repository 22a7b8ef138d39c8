package check

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// check reaches the vault only through repo's Store, so it works in-process
// and against a vault server alike.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/check", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/server": "maintenance works through repo.Store, not the server's internals",
	})
}
