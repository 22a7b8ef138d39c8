package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// makeTree builds a tree with every kind of metadata restore must keep.
func makeTree(t *testing.T) string {
	src := filepath.Join(t.TempDir(), "src")
	repotest.WriteFile(t, filepath.Join(src, "plain.txt"), []byte("hello\n"), 0o644)
	repotest.WriteFile(t, filepath.Join(src, "secret"), []byte("s3cr3t"), 0o600)
	repotest.WriteFile(t, filepath.Join(src, "bin", "tool"), repotest.Random(3<<20), 0o755)
	repotest.WriteFile(t, filepath.Join(src, "deep", "a", "b", "c.log"), bytes.Repeat([]byte("log line\n"), 50000), 0o640)
	os.MkdirAll(filepath.Join(src, "empty", "dir"), 0o750)
	os.Symlink("plain.txt", filepath.Join(src, "link"))
	os.Symlink("/nonexistent/target", filepath.Join(src, "dangling"))
	os.Link(filepath.Join(src, "plain.txt"), filepath.Join(src, "deep", "hardlink"))
	// A sparse file: 32 MiB with two islands of data.
	f, err := os.Create(filepath.Join(src, "sparse.img"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(32 << 20)
	f.WriteAt([]byte("start"), 0)
	f.WriteAt([]byte("middle"), 16<<20)
	f.Close()
	os.Chown(filepath.Join(src, "secret"), 1234, 5678)
	os.Lchown(filepath.Join(src, "link"), 1234, 5678)
	when := time.Date(2020, 7, 1, 12, 0, 0, 123456789, time.UTC)
	filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode()&os.ModeSymlink == 0 {
			os.Chtimes(p, when, when)
		}
		return nil
	})
	return src
}

// sameTree compares two trees byte for byte with their metadata.
func sameTree(t *testing.T, want, got string) {
	t.Helper()
	inodes := map[uint64]uint64{}
	err := filepath.Walk(want, func(p string, wi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, p)
		q := filepath.Join(got, rel)
		gi, err := os.Lstat(q)
		if err != nil {
			t.Errorf("%s: missing after restore: %v", rel, err)
			return nil
		}
		if wi.Mode() != gi.Mode() {
			t.Errorf("%s: mode %v, want %v", rel, gi.Mode(), wi.Mode())
		}
		ws, gs := wi.Sys().(*syscall.Stat_t), gi.Sys().(*syscall.Stat_t)
		if ws.Uid != gs.Uid || ws.Gid != gs.Gid {
			t.Errorf("%s: owner %d:%d, want %d:%d", rel, gs.Uid, gs.Gid, ws.Uid, ws.Gid)
		}
		if !wi.ModTime().Equal(gi.ModTime()) {
			t.Errorf("%s: mtime %v, want %v", rel, gi.ModTime(), wi.ModTime())
		}
		switch {
		case wi.Mode()&os.ModeSymlink != 0:
			a, _ := os.Readlink(p)
			b, _ := os.Readlink(q)
			if a != b {
				t.Errorf("%s: link target %q, want %q", rel, b, a)
			}
		case wi.Mode().IsRegular():
			a, _ := os.ReadFile(p)
			b, _ := os.ReadFile(q)
			if !bytes.Equal(a, b) {
				t.Errorf("%s: content differs", rel)
			}
			if ws.Nlink > 1 {
				if prev, ok := inodes[ws.Ino]; ok && prev != gs.Ino {
					t.Errorf("%s: hard link restored as a separate file", rel)
				}
				inodes[ws.Ino] = gs.Ino
			}
			if ws.Blocks < wi.Size()/512/4 && gs.Blocks > ws.Blocks+64 {
				t.Errorf("%s: sparse file restored with %d blocks, source has %d", rel, gs.Blocks, ws.Blocks)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func dirSize(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

func TestRoundTrip(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "vault")
	c := newCLI(t, repo)
	c.ok("vault", "init", "--min-retention", "1h")
	c.code(exitError, "vault", "init") // never over an existing repository
	src := makeTree(t)

	var first struct {
		Snapshot  string    `json:"snapshot"`
		VaultTime time.Time `json:"vault_time"`
		LockUntil time.Time `json:"lock_until"`
	}
	c.json(&first, "backup", src, "--tag", "daily")
	if first.LockUntil.Sub(first.VaultTime) != time.Hour {
		t.Errorf("lock until %v for a commit at %v, want the 1h minimum", first.LockUntil, first.VaultTime)
	}
	size1 := dirSize(repo)

	// An unchanged second backup adds under 1% to the repository.
	c.ok("backup", src)
	if grew := dirSize(repo) - size1; grew > size1/100 {
		t.Errorf("unchanged backup grew the repository by %d of %d bytes", grew, size1)
	}

	var snaps []struct {
		ID     string   `json:"id"`
		Tags   []string `json:"tags"`
		Locked bool     `json:"locked"`
	}
	c.json(&snaps, "snapshots")
	if len(snaps) != 2 || snaps[0].ID != first.Snapshot || snaps[0].Tags[0] != "daily" || !snaps[0].Locked {
		t.Fatalf("snapshots = %+v", snaps)
	}

	target := filepath.Join(t.TempDir(), "restore")
	c.ok("restore", first.Snapshot[:8], "--target", target)
	sameTree(t, src, filepath.Join(target, "src"))

	// A non-empty target is refused.
	c.code(exitError, "restore", "latest", "--target", target)

	// --include restores only what matches.
	part := filepath.Join(t.TempDir(), "part")
	c.ok("restore", "latest", "--target", part, "--include", "src/deep")
	if _, err := os.Stat(filepath.Join(part, "src", "deep", "a", "b", "c.log")); err != nil {
		t.Errorf("included file missing: %v", err)
	}
	if _, err := os.Stat(filepath.Join(part, "src", "plain.txt")); err == nil {
		t.Error("a file outside --include was restored")
	}

	if out := c.ok("dump", "latest", "src/plain.txt"); out != "hello\n" {
		t.Errorf("dump = %q", out)
	}
	ls := c.ok("ls", "latest")
	for _, p := range []string{"/src/plain.txt", "/src/empty/dir", "/src/link", "/src/sparse.img"} {
		if !strings.Contains(ls, p+"\n") {
			t.Errorf("ls lacks %s", p)
		}
	}
	c.ok("verify", "--read-data")

	// Standard input.
	stdinData := bytes.Repeat([]byte("pg_dump output\n"), 10000)
	cmd := c.proc("backup", "--stdin", "--stdin-filename", "db.sql")
	cmd.Stdin = bytes.NewReader(stdinData)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("backup --stdin: %v\n%s", err, out)
	}
	if out := c.ok("dump", "latest", "db.sql"); out != string(stdinData) {
		t.Errorf("dump of the stdin backup returned %d bytes, want %d", len(out), len(stdinData))
	}
}

func TestExitCodes(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "vault")
	c := newCLI(t, repo)
	c.code(exitNoRepo, "snapshots")
	c.ok("vault", "init", "--min-retention", "1h")
	src := makeTree(t)
	c.ok("backup", src)

	bad := filepath.Join(t.TempDir(), "bad")
	os.WriteFile(bad, []byte("wrong"), 0o600)
	c.with("DUALKEY_PASSWORD_FILE", bad).code(exitPassword, "snapshots")
	c.with("DUALKEY_PASSWORD_FILE", "").code(exitUsage, "snapshots")
	c.code(exitUsage, "backup")
	c.code(exitUsage, "restore", "latest")
	c.code(exitUsage, "forget") // an empty policy is refused
	c.code(exitUsage, "snapshots", "--no-such-flag")

	// The snapshot is locked for an hour: neither forget nor a policy removes it.
	errs := c.code(exitRefused, "forget", "latest")
	if !strings.Contains(errs, "locked until") {
		t.Errorf("forget of a locked snapshot: %s", errs)
	}
	out := c.ok("forget", "--keep-within", "1s")
	if !strings.Contains(out, "locked until") {
		t.Errorf("policy output does not say the snapshot is kept for its lock:\n%s", out)
	}
	var snaps []any
	c.json(&snaps, "snapshots")
	if len(snaps) != 1 {
		t.Errorf("%d snapshots after forget, want 1", len(snaps))
	}

	// Locks are extended, never shortened.
	c.ok("lock", "latest", "--for", "48h")
	if errs := c.code(exitRefused, "lock", "latest", "--for", "2h"); !strings.Contains(errs, "never shortened") {
		t.Errorf("shortening a lock: %s", errs)
	}
	var locked []struct {
		LockUntil time.Time `json:"lock_until"`
	}
	c.json(&locked, "snapshots")
	if d := time.Until(locked[0].LockUntil); d < 47*time.Hour {
		t.Errorf("lock until %v after extending to 48h", locked[0].LockUntil)
	}

	// An unreadable file: the snapshot is committed, exit code 3.
	testPartialBackup(t)

	// Damage is exit code 14.
	packs, _ := filepath.Glob(filepath.Join(repo, "data", "*", "*"))
	p := packs[0]
	data, _ := os.ReadFile(p)
	data[10] ^= 0xff
	os.Chmod(p, 0o600)
	os.WriteFile(p, data, 0o400)
	out = c.code(exitDamaged, "verify", "--read-data")
	if !strings.Contains(out, filepath.Base(p)) {
		t.Errorf("verify does not name the damaged pack %s:\n%s", filepath.Base(p), out)
	}
}

// testPartialBackup backs up a tree with a file the backup user cannot read.
// Root reads everything, so as root the backup runs as nobody.
func testPartialBackup(t *testing.T) {
	base, err := os.MkdirTemp("", "dualkey-partial")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o777)
	c := newCLI(t, filepath.Join(base, "vault"))
	pw := filepath.Join(base, "pw")
	os.WriteFile(pw, []byte("pw"), 0o644)
	c = c.with("DUALKEY_PASSWORD_FILE", pw)
	src := filepath.Join(base, "src")
	repotest.WriteFile(t, filepath.Join(src, "ok.txt"), []byte("readable"), 0o644)
	repotest.WriteFile(t, filepath.Join(src, "locked.txt"), []byte("not for you"), 0o600)
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		cred = &syscall.Credential{Uid: 65534, Gid: 65534}
		os.Chown(filepath.Join(src, "locked.txt"), 0, 0)
		os.Chown(src, 65534, 65534)
		os.Chown(filepath.Join(src, "ok.txt"), 65534, 65534)
	}
	run := func(args ...string) (string, int) {
		cmd := c.proc(args...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return string(out), code
	}
	if out, code := run("vault", "init"); code != 0 {
		t.Fatalf("init as nobody: %d %s", code, out)
	}
	out, code := run("backup", src)
	if code != exitPartial || !strings.Contains(out, "locked.txt") {
		t.Fatalf("backup with an unreadable file: exit %d, want %d naming the file:\n%s", code, exitPartial, out)
	}
	if out, code := run("dump", "latest", "src/ok.txt"); code != 0 || out != "readable" {
		t.Errorf("the readable file is not in the partial snapshot: %d %q", code, out)
	}
}
