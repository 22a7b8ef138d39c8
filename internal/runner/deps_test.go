package runner

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The runner wires the parts together; it may import them all, but not
// the command line, and not the test harness outside tests.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/runner", map[string]string{
		deptest.Module + "cmd":             "nothing under internal imports cmd",
		deptest.Module + "internal/pgtest": "the test harness is for tests only; servers come from internal/pgserver",
	})
}
