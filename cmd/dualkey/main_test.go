package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// binPath is a dualkey binary built once for the tests that need a real
// process: a server to connect to, or a backup to kill.
var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "dualkey-bin")
	if err != nil {
		panic(err)
	}
	os.Chmod(dir, 0o755) // tests also run it as an unprivileged user
	binPath = filepath.Join(dir, "dualkey")
	out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build dualkey: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// cli runs dualkey commands in-process with their own environment.
type cli struct {
	t   *testing.T
	env map[string]string
}

func newCLI(t *testing.T, repo string) *cli {
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte("correct horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return &cli{t: t, env: map[string]string{"DUALKEY_REPO": repo, "DUALKEY_PASSWORD_FILE": pw}}
}

func (c *cli) with(k, v string) *cli {
	env := map[string]string{}
	for a, b := range c.env {
		env[a] = b
	}
	env[k] = v
	return &cli{t: c.t, env: env}
}

// run returns stdout, stderr and the exit code.
func (c *cli) run(args ...string) (string, string, int) {
	c.t.Helper()
	var out, errb bytes.Buffer
	a := newApp(strings.NewReader(""), &out, &errb, func(k string) string { return c.env[k] })
	code := a.run(context.Background(), args)
	return out.String(), errb.String(), code
}

// ok runs a command that must succeed and returns its stdout.
func (c *cli) ok(args ...string) string {
	c.t.Helper()
	out, errs, code := c.run(args...)
	if code != 0 {
		c.t.Fatalf("dualkey %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// code runs a command that must fail with want and returns its stderr.
func (c *cli) code(want int, args ...string) string {
	c.t.Helper()
	out, errs, code := c.run(args...)
	if code != want {
		c.t.Fatalf("dualkey %s: exit %d, want %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, want, out, errs)
	}
	return errs
}

func (c *cli) json(v any, args ...string) {
	c.t.Helper()
	out := c.ok(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		c.t.Fatalf("dualkey %s --json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// proc starts the built binary with c's environment.
func (c *cli) proc(args ...string) *exec.Cmd {
	cmd := exec.Command(binPath, args...)
	cmd.Env = os.Environ()
	for k, v := range c.env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	return cmd
}
