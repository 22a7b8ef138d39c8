package yamlconf

import (
	"testing"

	"github.com/dualkey/dualkey/internal/deptest"
)

// Config parsers of every layer use it, so it is a leaf: YAML only.
func TestDeps(t *testing.T) {
	deptest.Only(t, deptest.Module+"internal/yamlconf", "the config walker is a leaf: YAML only", "gopkg.in/yaml.v3")
}
