package chunker

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The chunker is part of the vault format: only the standard library, so
// nothing outside this package can change where chunks are cut.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/vault/chunker", "the chunker may import only the standard library")
}
