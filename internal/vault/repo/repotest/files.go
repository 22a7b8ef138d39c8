package repotest

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
)

// WriteFile writes data to p with mode, creating parent directories, and
// fails the test on error. The mode is set explicitly so umask does not
// change what a test backs up.
func WriteFile(t testing.TB, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

// Random returns n bytes that do not compress.
func Random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}
