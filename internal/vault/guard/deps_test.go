package guard

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The vault's rule engine stays free of the parts it guards against (the
// gate, quorum service and agent run on hosts we assume compromised, T1-T3);
// cmd and the client-side repository sit above it.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/vault/guard", deptest.VaultBelow, map[string]string{
		deptest.Module + "internal/vault/repo":   "the client-side repository is above the guard",
		deptest.Module + "internal/vault/server": "the server wraps the guard, not the reverse",
	})
}
