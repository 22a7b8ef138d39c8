package policy

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// The policy is read by `dualkey policy check` in CI, without a database
// or a state store: it knows the classifier's classes and YAML, nothing
// of the proxy, quorum or storage.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/gate/policy", "the policy is config and decisions: the classifier's classes and YAML only",
		deptest.Module+"internal/gate/classify", deptest.Module+"internal/yamlconf", "github.com/pganalyze/pg_query_go/v6", "google.golang.org/protobuf", "gopkg.in/yaml.v3")
}
