package classify

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The classifier is pure: the gate, the CLI and policy tooling all call
// it, and it must give the same answer everywhere, so it reaches nothing
// but PostgreSQL's parser (and that parser's protobuf runtime).
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/gate/classify", "the classifier is pure: pg_query and the stdlib only",
		"github.com/pganalyze/pg_query_go/v6", "google.golang.org/protobuf")
}
