package pgserver

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// pgserver runs PostgreSQL programs; it knows nothing of what the server
// is for, so the runner and the test harness can both stand on it.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/pgserver", map[string]string{
		deptest.Module + "cmd":      "nothing under internal imports cmd",
		deptest.Module + "internal": "a leaf: it starts servers, nothing of ours is needed for that",
	})
}
