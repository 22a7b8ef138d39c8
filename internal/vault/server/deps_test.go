package server

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/server", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/repo": "the client-side repository is above the server",
	})
}
