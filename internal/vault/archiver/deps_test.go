package archiver

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/archiver", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/server":   "a client reaches the vault through repo.Store",
		deptest.Module + "internal/vault/guard":    "a client reaches the vault through repo.Store",
		deptest.Module + "internal/vault/restorer": "backup and restore are independent",
	})
}
