package crypto

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/vault/crypto", "crypto is a leaf: stdlib, x/crypto and BLAKE3",
		"golang.org/x/crypto", "golang.org/x/sys", "github.com/zeebo/blake3", "github.com/klauspost/cpuid")
}
