package repo

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The repository is a client: it reaches a vault only through Store, so
// the same code runs in-process and against a vault server.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/repo", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/server":        "a client reaches the vault through Store",
		deptest.Module + "internal/vault/guard":         "a client reaches the vault through Store",
		deptest.Module + "internal/vault/backend/local": "a client reaches the vault through Store",
	})
}
