package keyfile

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// A leaf: whoever signs approvals needs only this, the standard library and
// x/crypto (Argon2id, XChaCha20-Poly1305).
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/quorum/keyfile", "keyfile is a leaf: stdlib and x/crypto",
		"golang.org/x/crypto", "golang.org/x/sys")
}
