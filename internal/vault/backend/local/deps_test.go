package local

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// A directory backend is a leaf: the standard library and the backend
// interface, nothing that could make it trust a caller.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/vault/backend/local",
		"a directory backend needs only the standard library and internal/vault/backend",
		deptest.Module+"internal/vault/backend")
}
