// Package disktest gives tests a small disk of their own that they can
// fill: a tmpfs mounted on a temporary directory. One helper for every
// package that tests what happens when the disk is full.
package disktest

import (
	"os"
	"os/exec"
	"runtime"
	"testing"
)

// Tmpfs mounts a tmpfs of size (mount's syntax: "2m") on a new temporary
// directory, returns the directory and unmounts it when the test ends. It
// skips the test where it cannot mount (not Linux, not root).
func Tmpfs(t testing.TB, size string) string {
	t.Helper()
	if runtime.GOOS != "linux" {
		t.Skip("needs a Linux tmpfs")
	}
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs: %v: %s", err, out)
	}
	// Registered after TempDir's removal, so it runs before it. Lazy: a
	// process the test started may still hold a file open.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// Resize changes the size of the tmpfs Tmpfs mounted on dir: a full disk
// given room again, without touching what is on it.
func Resize(t testing.TB, dir, size string) {
	t.Helper()
	if out, err := exec.Command("mount", "-o", "remount,size="+size, dir).CombinedOutput(); err != nil {
		t.Fatalf("resize the tmpfs on %s: %v: %s", dir, err, out)
	}
}
