package pgwal

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// pgwal is a vault client like repo: it reaches the vault only through
// repo.Store, so it works in-process and against a vault server alike, and
// it knows nothing of the agent that feeds it.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/pgwal", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/server":        "a client reaches the vault through repo.Store",
		deptest.Module + "internal/vault/guard":         "a client reaches the vault through repo.Store",
		deptest.Module + "internal/vault/backend/local": "a client reaches the vault through repo.Store",
		"github.com/jackc/pglogrepl":                    "storage does not speak the replication protocol; the agent does",
		"github.com/jackc/pgx/v5":                       "storage does not talk to PostgreSQL",
	})
}
