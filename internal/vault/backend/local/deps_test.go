package local_test

import (
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the directory backend a leaf: it stores opaque bytes, so it
// needs the backend interface and the standard library, nothing else. Above
// all it must not import the vault or anything that decides what may be
// deleted, or the write-once promise would depend on that code.
func TestDeps(t *testing.T) {
	const (
		module = "github.com/dualkey/dualkey/"
		self   = module + "internal/vault/backend/local"
	)
	allowed := map[string]bool{
		self:                              true,
		module + "internal/vault/backend": true,
	}
	out, err := exec.Command("go", "list", "-deps", "-json=ImportPath,Standard", ".").Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list: %v: %s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for {
		var pkg struct {
			ImportPath string
			Standard   bool
		}
		err := dec.Decode(&pkg)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("decoding go list output: %v", err)
		}
		switch {
		case pkg.Standard || allowed[pkg.ImportPath]:
		case strings.HasPrefix(pkg.ImportPath, module+"internal/"):
			t.Errorf("local imports %s: the only internal package it may use is internal/vault/backend", pkg.ImportPath)
		default:
			t.Errorf("local imports %s: a directory backend needs only the standard library", pkg.ImportPath)
		}
	}
}
