package main

import (
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/disktest"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// TestKill9 kills backups at random points and checks that the repository
// stays consistent and the next backup completes, reusing what was stored.
func TestKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("writes a few hundred MiB")
	}
	repo := filepath.Join(t.TempDir(), "vault")
	c := newCLI(t, repo)
	c.ok("vault", "init", "--min-retention", "0s")
	src := filepath.Join(t.TempDir(), "src")
	const files, size = 24, 12 << 20 // 288 MiB, incompressible: 18 packs
	for i := range files {
		repotest.WriteFile(t, filepath.Join(src, "f"+string(rune('a'+i))), repotest.Random(size), 0o644)
	}

	kill := func(when func(*exec.Cmd) bool) {
		cmd := c.proc("backup", src)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		for !when(cmd) {
			select {
			case err := <-done:
				t.Fatalf("backup finished before it could be killed: %v", err)
			case <-time.After(5 * time.Millisecond):
			}
		}
		cmd.Process.Signal(syscall.SIGKILL)
		err := <-done
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("backup was not killed: %v", err)
		}
	}
	// Once at a random early moment, once right after the first index
	// object appeared (so there is something to reuse).
	start := time.Now()
	delay := time.Duration(50+rand.IntN(400)) * time.Millisecond
	kill(func(*exec.Cmd) bool { return time.Since(start) > delay })
	indexes := func() int { n, _ := filepath.Glob(filepath.Join(repo, "index", "*")); return len(n) }
	before := indexes()
	kill(func(*exec.Cmd) bool { return indexes() > before })

	// No damage: unfinished work is only unindexed packs or unused blobs.
	c.ok("verify", "--read-data")
	tmp, _ := os.ReadDir(filepath.Join(repo, "tmp"))
	t.Logf("after two kills: %d index objects, %d temp files", indexes(), len(tmp))

	var res struct {
		Summary struct {
			Bytes      int64 `json:"bytes"`
			BytesAdded int64 `json:"bytes_added"`
		} `json:"summary"`
	}
	c.json(&res, "backup", src)
	if res.Summary.Bytes != files*size {
		t.Fatalf("backup read %d bytes, want %d", res.Summary.Bytes, files*size)
	}
	if res.Summary.BytesAdded > res.Summary.Bytes-8*(16<<20) {
		t.Errorf("the backup after the kills added %d of %d bytes: the indexed work of the killed run was not reused",
			res.Summary.BytesAdded, res.Summary.Bytes)
	}
	target := filepath.Join(t.TempDir(), "r")
	c.ok("restore", "latest", "--target", target)
	sameTree(t, src, filepath.Join(target, "src"))
	c.ok("verify", "--read-data")

	// The killed runs' leftovers are garbage for two prune runs to collect.
	c.ok("prune", "--grace", "1ns")
	c.ok("prune", "--grace", "1ns")
	c.ok("verify", "--read-data")
	target2 := filepath.Join(t.TempDir(), "r2")
	c.ok("restore", "latest", "--target", target2)
	sameTree(t, src, filepath.Join(target2, "src"))
}

// TestFullDisk backs up into a vault on a small tmpfs: the backup that
// does not fit fails with a clear error, and nothing stored before is lost.
func TestFullDisk(t *testing.T) {
	mnt := disktest.Tmpfs(t, "48m")
	repo := filepath.Join(mnt, "vault")
	c := newCLI(t, repo)
	c.ok("vault", "init", "--min-retention", "1h")
	small := makeTree(t)
	c.ok("backup", small)

	big := filepath.Join(t.TempDir(), "big")
	for i := range 8 {
		repotest.WriteFile(t, filepath.Join(big, "r"+string(rune('0'+i))), repotest.Random(8<<20), 0o644)
	}
	errs := c.code(exitError, "backup", big)
	if !strings.Contains(errs, "no space left on device") {
		t.Errorf("full disk error does not say so: %s", errs)
	}
	var snaps []any
	c.json(&snaps, "snapshots")
	if len(snaps) != 1 {
		t.Errorf("%d snapshots after the failed backup, want 1", len(snaps))
	}
	target := filepath.Join(t.TempDir(), "r")
	c.ok("restore", "latest", "--target", target)
	sameTree(t, small, filepath.Join(target, "src"))
	c.ok("verify", "--read-data")
}
