package restorer

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/restorer", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/archiver": "restore must not depend on how a backup was cut",
		deptest.Module + "internal/vault/server":   "the store is reached through repo.Store",
		deptest.Module + "internal/vault/guard":    "the store is reached through repo.Store",
	})
}
