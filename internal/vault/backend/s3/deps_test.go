package s3

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The S3 backend is a leaf like the directory one: of this module it may
// import only the backend interface (minio-go brings its own dependencies).
// Lock dates are the vault's decision, never the backend's.
func TestDeps(t *testing.T) {
	m := deptest.Module
	deptest.Forbid(t, m+"internal/vault/backend/s3", deptest.VaultBelow, map[string]string{
		m + "internal/vault/guard":     "the vault decides lock dates; the backend only applies them",
		m + "internal/vault/retention": "the vault decides lock dates; the backend only applies them",
		m + "internal/vault/repo":      "a backend stores opaque objects",
		m + "internal/vault/format":    "a backend stores opaque objects",
		m + "internal/vault/server":    "a backend is below the server",
		m + "internal/s3test":          "the test harness is for tests",
		m + "internal/state":           "a backend keeps no state",
		m + "internal/ledger":          "a backend stores opaque objects",
	})
}
