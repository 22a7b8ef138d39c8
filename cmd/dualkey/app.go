package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"sync"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/dualkey/dualkey/internal/vault/archiver"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// Exit codes, documented in docs/cli.md. Scripts rely on them: keep them stable.
const (
	exitOK          = 0
	exitError       = 1   // any other failure
	exitUsage       = 2   // bad flags or arguments
	exitPartial     = 3   // backup committed, but some files could not be read
	exitNoRepo      = 10  // no repository at the given location
	exitPassword    = 12  // wrong password
	exitRefused     = 13  // the vault refused: capability too weak or a retention lock in force
	exitDamaged     = 14  // verify found damage
	exitInterrupted = 130 // interrupted by a signal
)

// app holds one invocation's environment, so tests can run commands
// in-process with their own stdin, stdout and variables.
type app struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string

	repoURL      string
	passwordFile string
	jsonOut      bool
	quiet        bool
	verbose      int
	tokenFlag    string
	fingerprint  string
	log          *slog.Logger

	q quorumOpts // --state, --webhook (quorum_env.go)

	exitCode int      // set by a command that succeeds with a non-zero code
	args     []string // this invocation's arguments, for a command that starts itself again
}

func newApp(stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) *app {
	return &app{stdin: stdin, stdout: stdout, stderr: &lockedWriter{w: stderr}, getenv: getenv}
}

// lockedWriter serialises writes to stderr: the logger and the progress
// line write from different goroutines (a test's bytes.Buffer is not safe
// for that, and on a terminal a log line could land inside a progress line).
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// codeError carries a specific exit code.
type codeError struct {
	code int
	err  error
}

func (e codeError) Error() string { return e.err.Error() }
func (e codeError) Unwrap() error { return e.err }

func (a *app) root() *cobra.Command {
	root := &cobra.Command{
		Use:   "dualkey",
		Short: "Dualkey keeps production data, its backups and its audit trail out of any one person's reach",
		Long: `Dualkey: an encrypted, deduplicating, append-only backup vault with retention
locks that no client can shorten.

The repository is given by --repo or DUALKEY_REPO: a directory, or
https://host:port for a vault server (then DUALKEY_TOKEN or DUALKEY_TOKEN_FILE
and DUALKEY_TLS_FINGERPRINT). The password comes from DUALKEY_PASSWORD_FILE,
DUALKEY_PASSWORD or a prompt.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			level := slog.LevelWarn
			if a.verbose > 0 {
				level = slog.LevelInfo
			}
			if a.verbose > 1 {
				level = slog.LevelDebug
			}
			a.log = slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: level}))
			return nil
		},
	}
	root.SetIn(a.stdin)
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	pf := root.PersistentFlags()
	pf.StringVarP(&a.repoURL, "repo", "r", "", "repository: a directory or https://host:port (env DUALKEY_REPO)")
	pf.StringVar(&a.passwordFile, "password-file", "", "read the password from this file (env DUALKEY_PASSWORD_FILE)")
	pf.StringVar(&a.tokenFlag, "token-file", "", "vault server token file (env DUALKEY_TOKEN_FILE, or DUALKEY_TOKEN)")
	pf.StringVar(&a.fingerprint, "tls-fingerprint", "", "pin the vault server's certificate, sha256:HEX (env DUALKEY_TLS_FINGERPRINT)")
	pf.BoolVar(&a.jsonOut, "json", false, "print machine-readable JSON")
	pf.BoolVarP(&a.quiet, "quiet", "q", false, "print only errors and results")
	pf.CountVarP(&a.verbose, "verbose", "v", "log more (repeat for debug)")
	a.addQuorumFlags(pf)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })

	root.AddCommand(a.vaultCmd(), a.backupCmd(), a.snapshotsCmd(), a.lsCmd(), a.restoreCmd(), a.dumpCmd(),
		a.verifyCmd(), a.forgetCmd(), a.pruneCmd(), a.keyCmd(), a.rebuildIndexCmd(), a.lockCmd(), a.pgCmd(), a.versionCmd())
	root.AddCommand(a.usersCmd(), a.keysCmd(), a.quorumCmd(), a.approvalsCmd(), a.breakglassCmd(), a.auditCmd())
	root.AddCommand(a.gateCmd(), a.runCmd())
	root.AddCommand(a.incidentsCmd())
	root.AddCommand(a.classifyCmd(), a.policyCmd())
	a.addUsersPasswd(root)
	return root
}

func (a *app) run(ctx context.Context, args []string) int {
	a.args = args
	root := a.root()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return a.exitCode
	}
	code := exitCodeFor(ctx, err)
	msg := err.Error()
	if !strings.HasPrefix(msg, "dualkey:") {
		msg = "dualkey: " + msg
	}
	fmt.Fprintln(a.stderr, msg)
	return code
}

func exitCodeFor(ctx context.Context, err error) int {
	var ue usageError
	var ce codeError
	switch {
	case ctx.Err() != nil && errors.Is(err, context.Canceled):
		return exitInterrupted
	case errors.As(err, &ce):
		return ce.code
	case errors.As(err, &ue), strings.HasPrefix(err.Error(), "unknown command"), strings.Contains(err.Error(), "accepts "), strings.Contains(err.Error(), "required flag"):
		return exitUsage
	case errors.Is(err, repo.ErrNoRepository):
		return exitNoRepo
	case errors.Is(err, crypto.ErrWrongPassword):
		return exitPassword
	case errors.Is(err, guard.ErrForbidden), errors.Is(err, guard.ErrLocked), errors.Is(err, backend.ErrRetained):
		// The storage's own Object Lock refusing is a retention lock in
		// force like the vault's.
		return exitRefused
	case errors.Is(err, archiver.ErrPartial):
		return exitPartial
	}
	return exitError
}

func (a *app) env(name, flag string) string {
	if flag != "" {
		return flag
	}
	return a.getenv(name)
}

func (a *app) repoLocation() (string, error) {
	loc := a.env("DUALKEY_REPO", a.repoURL)
	if loc == "" {
		return "", usagef("no repository: give --repo or set DUALKEY_REPO")
	}
	return loc, nil
}

// password finds the repository password: a file, the environment, or a
// prompt on the terminal.
func (a *app) password(prompt string, confirm bool) (string, error) {
	if f := a.env("DUALKEY_PASSWORD_FILE", a.passwordFile); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", fmt.Errorf("dualkey: password file: %w", err)
		}
		p := strings.TrimRight(string(b), "\r\n")
		if p == "" {
			return "", fmt.Errorf("dualkey: password file %s is empty", f)
		}
		return p, nil
	}
	if p := a.getenv("DUALKEY_PASSWORD"); p != "" {
		return p, nil
	}
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil || !term.IsTerminal(int(tty.Fd())) {
		return "", usagef("no password: set DUALKEY_PASSWORD_FILE or DUALKEY_PASSWORD, or run on a terminal")
	}
	defer tty.Close()
	read := func(p string) (string, error) {
		fmt.Fprint(tty, p)
		b, err := term.ReadPassword(int(tty.Fd()))
		fmt.Fprintln(tty)
		return string(b), err
	}
	p, err := read(prompt)
	if err != nil {
		return "", err
	}
	if confirm {
		p2, err := read("enter the password again: ")
		if err != nil {
			return "", err
		}
		if p != p2 {
			return "", errors.New("dualkey: the passwords do not match")
		}
	}
	if p == "" {
		return "", errors.New("dualkey: empty password")
	}
	return p, nil
}

// printJSON writes v as indented JSON.
func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// say prints a human line unless --quiet or --json.
func (a *app) say(format string, args ...any) {
	if a.quiet || a.jsonOut {
		return
	}
	fmt.Fprintf(a.stdout, format+"\n", args...)
}

func isTerminal(w io.Writer) bool {
	if l, ok := w.(*lockedWriter); ok {
		w = l.w
	}
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// handle is a shorthand for building backend handles in commands.
func handle(t backend.Type, name string) backend.Handle { return backend.Handle{Type: t, Name: name} }

// newInfoLogger logs at info level: what a long-running server shows by default.
func newInfoLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

var passwordRE = regexp.MustCompile(`(//[^:/@]+):[^@/]*@`)
