package cert

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The vault server imports cert to check quorum certificates itself, so cert
// must trust nothing but the standard library: no other package of ours, and
// no third-party code that a certificate's verdict could depend on.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/quorum/cert", "cert is a leaf the vault server verifies certificates with")
}
