package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/quorum/keyfile"
	"github.com/dualkey/dualkey/internal/state"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// Exit codes of the quorum commands (docs/cli.md).
const (
	exitQuorumRefused = 15 // the quorum rules refused: self-approval, a bad or unregistered key, a second vote, expired, not enough approvals, already consumed
	exitNotAllowed    = 16 // break-glass not granted to this person or role, or a disabled user
)

// defaultDataDir holds the default state and the ledger key.
const defaultDataDir = "dualkey-data"

// quorumOpts are the global flags of the quorum commands.
type quorumOpts struct {
	state   string
	webhook string
}

func (a *app) addQuorumFlags(pf *pflag.FlagSet) {
	pf.StringVar(&a.q.state, "state", "", "state: a SQLite file or postgres://... (env DUALKEY_STATE; default ./"+defaultDataDir+"/state.db)")
	pf.StringVar(&a.q.webhook, "webhook", "", "POST JSON here when a request is opened or decided and on break-glass (env DUALKEY_WEBHOOK)")
}

// quorumEnv is an open state store, ledger and quorum service.
type quorumEnv struct {
	db   *state.DB
	led  *ledger.Ledger
	svc  *quorum.Service
	hook *quorum.Webhook

	closeMirror func()
}

func isPostgresDSN(dsn string) bool {
	return strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://")
}

// stateDSN returns the state location; for the default SQLite file it
// creates the directory.
func (a *app) stateDSN() (string, error) {
	dsn := a.env("DUALKEY_STATE", a.q.state)
	if dsn == "" {
		dsn = filepath.Join(defaultDataDir, "state.db")
	}
	if !isPostgresDSN(dsn) {
		dir := filepath.Dir(strings.TrimPrefix(strings.TrimPrefix(dsn, "sqlite:"), "//"))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return "", fmt.Errorf("dualkey: state directory: %w", err)
		}
	}
	return dsn, nil
}

// ledgerKeyPath is where the ledger's signing key lives: DUALKEY_LEDGER_KEY,
// else ledger.key beside a SQLite state file, else ./dualkey-data/ledger.key.
func (a *app) ledgerKeyPath(dsn string) string {
	if p := a.getenv("DUALKEY_LEDGER_KEY"); p != "" {
		return p
	}
	if isPostgresDSN(dsn) {
		return filepath.Join(defaultDataDir, "ledger.key")
	}
	return filepath.Join(filepath.Dir(strings.TrimPrefix(strings.TrimPrefix(dsn, "sqlite:"), "//")), "ledger.key")
}

// KindLedgerKey is the record written when a ledger key is created: it
// names the public key later checkpoints must verify under.
const kindLedgerKey = "ledger.key"

// loadLedgerKey reads the ledger key, or creates it when the ledger is
// still empty (ledger.LoadOrCreateKey).
func loadLedgerKey(ctx context.Context, path string, store *state.LedgerStore) (ed25519.PrivateKey, bool, error) {
	key, created, err := ledger.LoadOrCreateKey(ctx, path, store)
	if errors.Is(err, ledger.ErrKeyMissing) {
		return nil, false, fmt.Errorf("dualkey: %w (or set DUALKEY_LEDGER_KEY)", err)
	}
	if err != nil {
		return nil, false, fmt.Errorf("dualkey: %w", err)
	}
	return key, created, nil
}

// quorumLedgerMirror returns the vault's ledger mirror when a repository
// is given (--repo or DUALKEY_REPO), else nil: without a mirror Verify
// still finds edits, deletions and reorders by the chain and the signed
// checkpoints, but not a truncation at a checkpoint boundary
// (docs/ledger.md). Call the returned func to close the repository.
func (a *app) quorumLedgerMirror(ctx context.Context) (ledger.Mirror, func(), error) {
	if a.env("DUALKEY_REPO", a.repoURL) == "" {
		return nil, func() {}, nil
	}
	r, err := a.openRepo(ctx)
	if err != nil {
		return nil, nil, err
	}
	return r.LedgerMirror(), func() { r.Close() }, nil
}

// The vault's mirror must fit the ledger's interface.
var _ ledger.Mirror = (*repo.LedgerMirror)(nil)

// openQuorum opens the state, the ledger and the service. Close it.
func (a *app) openQuorum(ctx context.Context, stateOpts ...state.Option) (*quorumEnv, error) {
	dsn, err := a.stateDSN()
	if err != nil {
		return nil, err
	}
	db, err := state.Open(ctx, dsn, append([]state.Option{state.WithLogger(a.log)}, stateOpts...)...)
	if err != nil {
		return nil, err
	}
	key, created, err := loadLedgerKey(ctx, a.ledgerKeyPath(dsn), db.Ledger())
	if err != nil {
		db.Close()
		return nil, err
	}
	mirror, closeMirror, err := a.quorumLedgerMirror(ctx)
	if err != nil {
		db.Close()
		return nil, err
	}
	led, err := ledger.Open(ctx, db.Ledger(), mirror, key, ledger.Options{Logger: a.log})
	if err != nil {
		closeMirror()
		db.Close()
		return nil, err
	}
	if created {
		pub := cert.FormatPublicKey(key.Public().(ed25519.PublicKey))
		if _, err := led.Append(ctx, ledger.Entry{Kind: kindLedgerKey, Data: map[string]string{"public_key": pub}}); err != nil {
			led.Close(ctx)
			closeMirror()
			db.Close()
			return nil, err
		}
	}
	q := &quorumEnv{db: db, led: led, closeMirror: closeMirror}
	opts := quorum.Options{Logger: a.log}
	if u := a.env("DUALKEY_WEBHOOK", a.q.webhook); u != "" {
		if q.hook, err = quorum.NewWebhook(u, a.log); err != nil {
			led.Close(ctx)
			closeMirror()
			db.Close()
			return nil, usageError{err}
		}
		opts.Notifier = q.hook
	}
	q.svc = quorum.New(db, led, opts)
	return q, nil
}

// close signs what this command appended (a checkpoint), waits for
// webhook deliveries (bounded) and closes the store.
func (q *quorumEnv) close(ctx context.Context) error {
	ctx = context.WithoutCancel(ctx)
	err := q.led.Close(ctx)
	if q.hook != nil {
		wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		q.hook.Close(wctx)
		cancel()
	}
	q.closeMirror() // after the ledger's final mirror pass
	return errors.Join(err, q.db.Close())
}

// withQuorum runs fn with an open quorum environment.
func (a *app) withQuorum(ctx context.Context, fn func(q *quorumEnv) error) error {
	q, err := a.openQuorum(ctx)
	if err != nil {
		return err
	}
	err = fn(q)
	if cerr := q.close(ctx); err == nil {
		err = cerr
	}
	return quorumCode(err)
}

// actOnRequest runs fn as the person as (default DUALKEY_USER) on the
// request ref names (an ID or a unique prefix), with an open quorum
// environment: what approve, deny, consume and apply share.
func (a *app) actOnRequest(ctx context.Context, as, ref string, fn func(q *quorumEnv, me string, id cert.ID) error) error {
	me, err := a.whoAmI(as)
	if err != nil {
		return err
	}
	return a.withQuorum(ctx, func(q *quorumEnv) error {
		id, err := resolveRequest(ctx, q, ref)
		if err != nil {
			return err
		}
		return fn(q, me, id)
	})
}

// quorumCode gives quorum refusals their exit codes.
func quorumCode(err error) error {
	if err == nil {
		return nil
	}
	var ce codeError
	var ue usageError
	if errors.As(err, &ce) || errors.As(err, &ue) {
		return err
	}
	for _, e := range []error{quorum.ErrNotAllowed} {
		if errors.Is(err, e) {
			return codeError{exitNotAllowed, err}
		}
	}
	for _, e := range []error{cert.ErrSelfApproval, cert.ErrUnknownApprover, cert.ErrBadSignature, cert.ErrExpired,
		cert.ErrStalePolicy, cert.ErrNoRule, cert.ErrNotEnough, cert.ErrDenied, cert.ErrNotYetValid,
		quorum.ErrDuplicateVote, quorum.ErrConsumed, quorum.ErrNotOpen, quorum.ErrInitialized, quorum.ErrNoPolicy} {
		if errors.Is(err, e) {
			return codeError{exitQuorumRefused, err}
		}
	}
	return err
}

// keyDir is where this user's approver keys live.
func (a *app) keyDir() (string, error) {
	if d := a.getenv("DUALKEY_CONFIG_DIR"); d != "" {
		return filepath.Join(d, "keys"), nil
	}
	return keyfile.DefaultDir()
}

// passphrase reads a key passphrase from DUALKEY_KEY_PASSPHRASE_FILE or the terminal.
func (a *app) passphrase(prompt string, confirm bool) ([]byte, error) {
	if f := a.getenv("DUALKEY_KEY_PASSPHRASE_FILE"); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("dualkey: passphrase file: %w", err)
		}
		p := strings.TrimRight(string(b), "\r\n")
		if p == "" {
			return nil, fmt.Errorf("dualkey: passphrase file %s is empty", f)
		}
		return []byte(p), nil
	}
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil || !term.IsTerminal(int(tty.Fd())) {
		return nil, usagef("no passphrase: set DUALKEY_KEY_PASSPHRASE_FILE or run on a terminal")
	}
	defer tty.Close()
	read := func(p string) ([]byte, error) {
		fmt.Fprint(tty, p)
		b, err := term.ReadPassword(int(tty.Fd()))
		fmt.Fprintln(tty)
		return b, err
	}
	p, err := read(prompt)
	if err != nil {
		return nil, err
	}
	if confirm {
		p2, err := read("enter the passphrase again: ")
		if err != nil {
			return nil, err
		}
		if string(p) != string(p2) {
			return nil, errors.New("dualkey: the passphrases do not match")
		}
	}
	if len(p) == 0 {
		return nil, errors.New("dualkey: empty passphrase")
	}
	return p, nil
}

// whoAmI is the person a command acts as: --as, else DUALKEY_USER, else
// the only key in the key directory.
func (a *app) whoAmI(as string) (string, error) {
	if as == "" {
		as = a.getenv("DUALKEY_USER")
	}
	if as != "" {
		if err := cert.ValidName(as); err != nil {
			return "", usageError{err}
		}
		return as, nil
	}
	dir, err := a.keyDir()
	if err == nil {
		names, _ := filepath.Glob(filepath.Join(dir, "*.key"))
		if len(names) == 1 {
			return strings.TrimSuffix(filepath.Base(names[0]), ".key"), nil
		}
	}
	return "", usagef("who are you? give --as NAME or set DUALKEY_USER")
}

// signer opens name's key file and returns their private key.
func (a *app) signer(name string) (ed25519.PrivateKey, error) {
	dir, err := a.keyDir()
	if err != nil {
		return nil, err
	}
	data, err := keyfile.Load(dir, name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, usagef("no key for %s in %s: run dualkey keys generate %s", name, dir, name)
		}
		return nil, err
	}
	pass, err := a.passphrase("passphrase for "+name+"'s key: ", false)
	if err != nil {
		return nil, err
	}
	owner, priv, err := keyfile.Open(data, pass)
	if err != nil {
		if errors.Is(err, keyfile.ErrWrongPassphrase) {
			return nil, codeError{exitPassword, fmt.Errorf("dualkey: %s's key: %w", name, err)}
		}
		return nil, err
	}
	if owner != name {
		return nil, fmt.Errorf("dualkey: key file %s belongs to %s", keyfile.Path(dir, name), owner)
	}
	return priv, nil
}

// resolveRequest accepts a full request ID or a unique prefix of 6+ digits.
func resolveRequest(ctx context.Context, q *quorumEnv, s string) (cert.ID, error) {
	if id, err := cert.ParseID(s); err == nil {
		return id, nil
	}
	if len(s) < 6 {
		return "", usagef("request %q: give the ID or at least 6 of its first digits", s)
	}
	rs, err := q.svc.List(ctx, "")
	if err != nil {
		return "", err
	}
	var found []string
	for _, r := range rs {
		if strings.HasPrefix(r.ID, s) {
			found = append(found, r.ID)
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("%w: request %s", quorum.ErrNotFound, s)
	case 1:
		return cert.ID(found[0]), nil
	}
	return "", usagef("request prefix %s matches %d requests", s, len(found))
}
