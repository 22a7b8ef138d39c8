package chunker

import (
	"go/build"
	"strings"
	"testing"
)

// TestDeps keeps the chunker a leaf on the standard library: it is part of
// the vault format, so no third-party code decides where chunks end, and it
// must not import other vault packages (they import it).
func TestDeps(t *testing.T) {
	pkg, err := build.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, imp := range pkg.Imports {
		if first, _, _ := strings.Cut(imp, "/"); strings.Contains(first, ".") {
			t.Errorf("imports %s: the chunker may import only the standard library", imp)
		}
	}
}
