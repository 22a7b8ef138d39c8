package format

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The plaintext records the server parses: a leaf, stdlib and BLAKE3 only.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/vault/format", "format is a leaf read by the vault server", "github.com/zeebo/blake3", "github.com/klauspost/cpuid")
}
