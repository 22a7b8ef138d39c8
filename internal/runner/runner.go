// Package runner is `dualkey run`: the whole system in one process on
// embedded defaults. It creates on first start, and reuses afterwards, a
// data directory holding
//
//	vault/            the vault (a directory repository) the agent writes into
//	secrets/          0700: the vault password, the local server's passwords
//	state.db          the state store (SQLite): people, the quorum policy, requests
//	ledger.key, .pub  the audit ledger's signing key (beside the state, as the CLI expects)
//	people/NAME/      each person's gate password and, for approvers, their
//	                  approver key (keys/NAME.key) and its passphrase
//	pg/               a local PostgreSQL 15 (data/, postgres.log) when no URL is given
//	gate.yaml         the gate's effective config, written at each start (for
//	                  dualkey policy check); gate.crt, gate.key its certificate
//
// and runs the agent (WAL streaming, a first base backup, a schedule), the
// gate, and the local server, stopping all of it on one context.
package runner

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/gate"
	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/incident"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgserver"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/quorum/keyfile"
	"github.com/dualkey/dualkey/internal/state"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// Errors, tested with errors.Is.
var (
	// ErrDataDir means the data directory cannot be created or written.
	ErrDataDir = errors.New("runner: data directory not usable")
	// ErrPortInUse means the gate's (or the local server's) port is taken.
	ErrPortInUse = errors.New("runner: port in use")
	// ErrInUse means another runner uses the data directory.
	ErrInUse = errors.New("runner: data directory in use")
	// ErrUpstream means the PostgreSQL server given by URL cannot be
	// reached, or lacks what the agent needs (replication).
	ErrUpstream = errors.New("runner: PostgreSQL server not usable")
)

// GateRole is the brokered role the gate connects to the local server as.
const GateRole = "dualkey_gate"

// Options are what the caller supplies besides the config.
type Options struct {
	// Log receives the components' logs (default: discarded).
	Log *slog.Logger
	// Exe is how printed commands name the dualkey binary (default "dualkey").
	Exe string
	// OnIncident, if set, is called with each new incident the tripwire
	// raised, after it was stored (from the tripwire's goroutine: return
	// quickly).
	OnIncident func(incident.Incident)
}

// Person is one person of the setup and where their secrets are.
type Person struct {
	Name     string
	Groups   []string
	Approver bool
	// PasswordFile holds the gate login password (0600); "" when the
	// person existed before and their password file is gone.
	PasswordFile string
	// ConfigDir is their DUALKEY_CONFIG_DIR (approvers: keys/NAME.key),
	// PassphraseFile their key's passphrase (DUALKEY_KEY_PASSPHRASE_FILE).
	ConfigDir, PassphraseFile string
}

// Info says what runs where.
type Info struct {
	DataDir           string
	Created           bool // the data directory was set up by this start
	Vault             string
	VaultID           string
	VaultPasswordFile string
	State             string // the state DSN (a SQLite path, or postgres://… redacted)
	LedgerKey         string
	// PG is the server the agent streams from (password redacted).
	PG string
	// Local is set when the runner started its own server.
	Local *LocalInfo
	Slot  string
	// BaseEvery is the base backup schedule (0: none).
	BaseEvery time.Duration
	// Tripwire says the WAL is decoded for drops, truncates, mass deletes.
	Tripwire bool
	// GateAddr is where the gate listens (host:port).
	GateAddr        string
	GateFingerprint string
	GateConfig      string // the effective gate.yaml
	// GateListenNote explains a listen address other than the one asked for.
	GateListenNote string
	Databases      []string
	People         []Person
}

// LocalInfo describes the runner's own server.
type LocalInfo struct {
	Dir, DataDir, LogFile string
	Port                  int
	Superuser             string
	PasswordFile          string
	Created               bool
}

// Runner is the running system. Stop it.
type Runner struct {
	cfg  *Config
	opts Options
	info Info
	log  *slog.Logger

	local *pgserver.Server
	repo  *repo.Repository
	db    *state.DB
	led   *ledger.Ledger
	// ledMirrored says led mirrors into the vault (and is closed before it).
	ledMirrored bool
	svc         *quorum.Service
	agent       *pgagent.Agent
	gate        *gate.Gate
	ln          net.Listener

	agentURL string
	cancel   context.CancelFunc // ends the agent and the first backup
	wg       sync.WaitGroup
	errc     chan error // a component failed
	closers  []func(context.Context) error

	stopOnce sync.Once
	stopErr  error

	backupMu  sync.Mutex
	backupErr error
	backupRan chan struct{} // closed when the first base backup ended (or was not needed)
}

// Start sets up (or reuses) the data directory and starts everything.
// It returns once the gate accepts connections and the agent runs; on
// error, whatever had started is stopped again. ctx bounds the start
// only: call Stop to end the runner.
func Start(ctx context.Context, cfg *Config, opts Options) (_ *Runner, err error) {
	if cfg == nil {
		cfg = Default()
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if opts.Exe == "" {
		opts.Exe = "dualkey"
	}
	r := &Runner{cfg: cfg, opts: opts, log: opts.Log, errc: make(chan error, 4), backupRan: make(chan struct{})}
	defer func() {
		if err != nil {
			r.Stop(context.WithoutCancel(ctx))
		}
	}()
	if err := r.prepareDir(); err != nil {
		return nil, err
	}
	// The gate's port first: a taken one fails the start before anything
	// else is set up or started.
	if err := r.listen(); err != nil {
		return nil, err
	}
	// Then the server: one given by URL is checked before anything is
	// created for it, so a wrong URL leaves no half-made data directory.
	if err := r.startPG(ctx); err != nil {
		return nil, err
	}
	if err := r.openState(ctx); err != nil {
		return nil, err
	}
	pol, err := r.bootstrapPeople(ctx)
	if err != nil {
		return nil, err
	}
	if err := r.openVault(ctx, pol); err != nil {
		return nil, err
	}
	if err := r.openLedger(ctx, true); err != nil {
		return nil, err
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r.cancel = cancel
	if err := r.startAgent(ctx, runCtx); err != nil {
		return nil, err
	}
	if err := r.startGate(ctx); err != nil {
		return nil, err
	}
	return r, nil
}

// Info says what runs where.
func (r *Runner) Info() Info { return r.info }

// Config is the configuration the runner started with.
func (r *Runner) Config() *Config { return r.cfg }

// Err reports a component that failed while running (the gate stopped
// serving); the caller should then Stop.
func (r *Runner) Err() <-chan error { return r.errc }

// AgentStatus is the agent's position: how far the vault holds WAL.
func (r *Runner) AgentStatus() pgagent.Status { return r.agent.Status() }

// FirstBackup waits until the base backup taken at start has ended (or
// was not needed) and returns its error.
func (r *Runner) FirstBackup(ctx context.Context) error {
	select {
	case <-r.backupRan:
	case <-ctx.Done():
		return ctx.Err()
	}
	r.backupMu.Lock()
	defer r.backupMu.Unlock()
	return r.backupErr
}

// Backups lists the base backups in the vault and the recoverable window.
func (r *Runner) Backups(ctx context.Context) ([]pgagent.BaseBackupInfo, pgagent.Window, error) {
	return pgagent.Backups(ctx, r.repo)
}

// Stop ends everything, newest first: the gate (sessions closed, ledger
// records written), the agent (what it received stored in the vault), the
// local server (fast shutdown), the ledger (a signed checkpoint), the vault
// and the state. It is safe to call more than once.
func (r *Runner) Stop(ctx context.Context) error {
	r.stopOnce.Do(func() {
		ctx = context.WithoutCancel(ctx)
		var errs []error
		for i := len(r.closers) - 1; i >= 0; i-- {
			if err := r.closers[i](ctx); err != nil {
				errs = append(errs, err)
			}
		}
		r.stopErr = errors.Join(errs...)
	})
	return r.stopErr
}

func (r *Runner) onStop(f func(context.Context) error) { r.closers = append(r.closers, f) }

// Run starts the runner, writes the banner to out, and runs until ctx
// ends or a component fails; then it stops everything.
func Run(ctx context.Context, cfg *Config, opts Options, out io.Writer) error {
	var mu sync.Mutex
	exe := orDefault(opts.Exe, "dualkey")
	if opts.OnIncident == nil {
		opts.OnIncident = func(in incident.Incident) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Fprintf(out, "INCIDENT %s: %s on database %s: %s, committed %s by transaction %d (seen %.0f ms later)\n",
				in.ID, in.Kind, in.Database, strings.Join(in.Objects, ", "), in.CommitTime.Format(time.RFC3339), in.XID, in.DelayMS)
			fmt.Fprintf(out, "  restore to just before it: %s pg restore --before-incident %s ... (see the banner)\n", exe, in.ID)
		}
	}
	r, err := Start(ctx, cfg, opts)
	if err != nil {
		return err
	}
	mu.Lock()
	io.WriteString(out, r.Banner())
	mu.Unlock()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-r.errc:
	}
	fmt.Fprintln(out, "stopping: gate, agent, PostgreSQL ...")
	if serr := r.Stop(context.WithoutCancel(ctx)); serr != nil {
		err = errors.Join(err, serr)
	}
	if err == nil {
		st := r.agent.Status()
		fmt.Fprintf(out, "stopped; the vault holds WAL up to %s on timeline %d\n", st.Durable, st.Timeline)
	}
	return err
}

// --- the data directory ---------------------------------------------------

func (r *Runner) prepareDir() error {
	c := r.cfg
	r.info.DataDir = c.DataDir
	if err := os.MkdirAll(c.DataDir, 0o700); err != nil {
		return fmt.Errorf("%w: %v", ErrDataDir, err)
	}
	probe, err := os.CreateTemp(c.DataDir, ".probe-*")
	if err != nil {
		return fmt.Errorf("%w: %s is not writable: %v", ErrDataDir, c.DataDir, err)
	}
	probe.Close()
	os.Remove(probe.Name())
	// One runner per data directory: a second would stop the first one's
	// local server (taking it for one left by a killed run) and race it on
	// every file. The lock ends with the process, however it ends.
	lock, err := os.OpenFile(c.Path("run.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrDataDir, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(lock.Name())
		lock.Close()
		return fmt.Errorf("%w: another dualkey run (pid %s) uses %s", ErrInUse, strings.TrimSpace(string(b)), c.DataDir)
	}
	lock.Truncate(0)
	fmt.Fprintf(lock, "%d\n", os.Getpid())
	r.onStop(func(context.Context) error { return lock.Close() })
	if _, err := os.Stat(c.Path(c.Vault.Repo)); errors.Is(err, fs.ErrNotExist) {
		r.info.Created = true
	}
	if c.PG.URL == "" && os.Geteuid() == 0 {
		// The local server runs as the postgres OS user, which must pass
		// through the data directory to reach its own (execute only: it
		// cannot list the directory, and secrets/ is 0700).
		if err := os.Chmod(c.DataDir, 0o711); err != nil {
			return fmt.Errorf("%w: %v", ErrDataDir, err)
		}
	}
	if err := os.MkdirAll(c.Path("secrets"), 0o700); err != nil {
		return fmt.Errorf("%w: %v", ErrDataDir, err)
	}
	return nil
}

// secret reads the secret in path, or creates it with a new random value
// (0600, exclusively). created says which.
func secret(path string) (value string, created bool, err error) {
	b, err := os.ReadFile(path)
	if err == nil {
		v := strings.TrimRight(string(b), "\r\n")
		if v == "" {
			return "", false, fmt.Errorf("runner: %s is empty", path)
		}
		return v, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", false, fmt.Errorf("runner: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", false, fmt.Errorf("runner: %w", err)
	}
	v := newSecret()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", false, fmt.Errorf("runner: %w", err)
	}
	_, err = f.WriteString(v + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", false, fmt.Errorf("runner: %w", err)
	}
	return v, true, nil
}

// newSecret is 144 random bits in URL-safe base64: 24 characters that need
// no quoting in a URL, a shell or SQL.
func newSecret() string {
	b := make([]byte, 18)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// --- state, ledger, people, quorum ------------------------------------------

func (r *Runner) openState(ctx context.Context) error {
	dsn := r.cfg.StateDSN()
	r.info.State = redact(dsn)
	opts := []state.Option{state.WithLogger(r.log)}
	if r.cfg.Gate.Policy != nil {
		opts = append(opts, state.WithLedgerSync(r.cfg.Gate.Policy.LedgerSync))
	}
	db, err := state.Open(ctx, dsn, opts...)
	if err != nil {
		return err
	}
	r.db = db
	r.onStop(func(context.Context) error { return db.Close() })
	if isPostgresDSN(dsn) {
		r.info.LedgerKey = r.cfg.Path("ledger.key")
	} else {
		// Where the CLI looks for it: beside the SQLite file.
		r.info.LedgerKey = filepath.Join(filepath.Dir(dsn), "ledger.key")
	}
	if err := r.openLedger(ctx, false); err != nil {
		return err
	}
	r.onStop(func(ctx context.Context) error {
		if r.led != nil && !r.ledMirrored {
			return r.led.Close(ctx)
		}
		return nil
	})
	return nil
}

// openLedger opens the ledger (mirrored into the vault when mirror and the
// vault is open), closing one opened before.
func (r *Runner) openLedger(ctx context.Context, mirror bool) error {
	if r.led != nil {
		if err := r.led.Close(ctx); err != nil {
			return err
		}
		r.led = nil
	}
	key, created, err := ledgerKey(ctx, r.info.LedgerKey, r.db.Ledger())
	if err != nil {
		return err
	}
	var m ledger.Mirror
	if mirror && r.repo != nil {
		m = r.repo.LedgerMirror()
	}
	led, err := ledger.Open(ctx, r.db.Ledger(), m, key, ledger.Options{Logger: r.log})
	if err != nil {
		return err
	}
	if created {
		pub := cert.FormatPublicKey(key.Public().(ed25519.PublicKey))
		if _, err := led.Append(ctx, ledger.Entry{Kind: "ledger.key", Data: map[string]string{"public_key": pub}}); err != nil {
			led.Close(ctx)
			return err
		}
	}
	r.led = led
	r.svc = quorum.New(r.db, led, quorum.Options{Logger: r.log})
	if m != nil {
		r.ledMirrored = true
		r.onStop(func(ctx context.Context) error { return led.Close(ctx) })
	}
	return nil
}

// ledgerKey is the CLI's ledger key file (ledger.LoadOrCreateKey), so that
// `dualkey audit verify` and `dualkey approvals` work on this state.
func ledgerKey(ctx context.Context, path string, store *state.LedgerStore) (ed25519.PrivateKey, bool, error) {
	key, created, err := ledger.LoadOrCreateKey(ctx, path, store)
	if err != nil {
		return nil, false, fmt.Errorf("runner: %w", err)
	}
	return key, created, nil
}

// bootstrapPeople makes sure every configured person exists in the state
// with a gate password, that approvers have keys, and that a quorum
// policy is in force (made from the approvers on first start). It returns
// the policy in force.
func (r *Runner) bootstrapPeople(ctx context.Context) (*cert.Policy, error) {
	var approvers []cert.Approver
	for _, u := range r.cfg.Users {
		dir := r.cfg.Path(filepath.Join("people", u.Name))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("runner: %w", err)
		}
		p := Person{Name: u.Name, Groups: u.Groups, Approver: u.Approver}
		pwFile := filepath.Join(dir, "password")
		_, err := r.db.GetUser(ctx, u.Name)
		switch {
		case errors.Is(err, state.ErrNotFound):
			pw, _, err := secret(pwFile)
			if err != nil {
				return nil, err
			}
			v, err := gate.NewVerifier(pw, 0)
			if err != nil {
				return nil, err
			}
			if err := r.db.AddUser(ctx, state.User{Name: u.Name, Groups: u.Groups, Secret: v.String()}); err != nil {
				return nil, err
			}
			if _, err := r.led.Append(ctx, ledger.Entry{Kind: "user", Actor: "dualkey-run",
				Data: map[string]any{"event": "add", "name": u.Name, "groups": u.Groups}}); err != nil {
				return nil, err
			}
			p.PasswordFile = pwFile
		case err != nil:
			return nil, err
		default:
			if _, err := os.Stat(pwFile); err == nil {
				p.PasswordFile = pwFile
			}
		}
		if u.Approver {
			p.ConfigDir = dir
			p.PassphraseFile = filepath.Join(dir, "passphrase")
			pub, err := approverKey(dir, u.Name, p.PassphraseFile)
			if err != nil {
				return nil, err
			}
			approvers = append(approvers, cert.Approver{Name: u.Name, PublicKey: pub})
		}
		r.info.People = append(r.info.People, p)
	}
	pol, err := r.svc.Policy(ctx)
	if errors.Is(err, quorum.ErrNoPolicy) {
		pol = &cert.Policy{Version: cert.PolicyVersion, Serial: 1, Approvers: approvers,
			Rules: []cert.Rule{{Name: "default", Actions: []string{"*"}, Threshold: r.cfg.Threshold}}}
		if err := pol.Validate(); err != nil {
			return nil, fmt.Errorf("runner: quorum policy: %w", err)
		}
		if err := r.svc.Init(ctx, pol); err != nil {
			return nil, err
		}
		return pol, nil
	}
	if err != nil {
		return nil, err
	}
	for _, a := range approvers {
		if have, ok := pol.Approver(a.Name); !ok || !have.PublicKey.Equal(a.PublicKey) {
			r.log.Warn("configured approver is not an approver in the policy in force; change the policy with dualkey quorum propose", "name", a.Name)
		}
	}
	return pol, nil
}

// approverKey returns name's public key from their key file in dir/keys,
// creating the key (sealed under a generated passphrase kept in passFile)
// when missing.
func approverKey(dir, name, passFile string) (ed25519.PublicKey, error) {
	keys := filepath.Join(dir, "keys")
	if data, err := keyfile.Load(keys, name); err == nil {
		owner, pub, err := keyfile.Inspect(data)
		if err != nil {
			return nil, fmt.Errorf("runner: %s: %w", keyfile.Path(keys, name), err)
		}
		if owner != name {
			return nil, fmt.Errorf("runner: %s belongs to %s", keyfile.Path(keys, name), owner)
		}
		return pub, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	pass, _, err := secret(passFile)
	if err != nil {
		return nil, err
	}
	pub, data, err := keyfile.Generate(name, []byte(pass))
	if err != nil {
		return nil, err
	}
	if err := keyfile.Save(keys, name, data); err != nil {
		return nil, err
	}
	return pub, nil
}

// --- the vault ---------------------------------------------------------------

func (r *Runner) openVault(ctx context.Context, pol *cert.Policy) error {
	c := r.cfg
	dir := c.Path(c.Vault.Repo)
	r.info.Vault = dir
	r.info.VaultPasswordFile = c.Path(c.Vault.PasswordFile)
	_, statErr := os.Stat(filepath.Join(dir, "config"))
	create := errors.Is(statErr, fs.ErrNotExist)
	if _, err := os.Stat(r.info.VaultPasswordFile); !create && errors.Is(err, fs.ErrNotExist) {
		// A new password would not open the vault that is there.
		return fmt.Errorf("runner: the vault %s exists but its password file %s does not: set vault.password_file to the file holding its password (scripts/demo.sh keeps it in %s)",
			dir, r.info.VaultPasswordFile, c.Path("password"))
	}
	pw, _, err := secret(r.info.VaultPasswordFile)
	if err != nil {
		return err
	}
	var be *local.Backend
	if create {
		be, err = local.Create(ctx, dir)
		if err != nil {
			return fmt.Errorf("runner: vault: %w", err)
		}
	} else if be, err = local.Open(dir); err != nil {
		return fmt.Errorf("runner: vault: %w", err)
	}
	// The same guard the CLI and the server put in front of a directory.
	st := guard.New(be, guard.Options{}).Session(guard.Admin)
	var rp *repo.Repository
	if create {
		// The vault verifies quorum certificates against the same approver
		// set the state holds.
		rp, err = repo.Init(ctx, st, pw, repo.InitOptions{MinRetention: c.Vault.MinRetention, QuorumPolicy: pol.Encode()}, repo.Options{Log: r.log})
	} else {
		rp, err = repo.Open(ctx, st, pw, repo.Options{Log: r.log})
	}
	if err != nil {
		return fmt.Errorf("runner: vault %s: %w", dir, err)
	}
	r.repo = rp
	r.info.VaultID = rp.Config().ID
	r.onStop(func(context.Context) error { return rp.Close() })
	return nil
}

// --- PostgreSQL ------------------------------------------------------------

func (r *Runner) startPG(ctx context.Context) error {
	c := r.cfg
	r.info.Databases = c.PG.Databases
	if c.PG.URL != "" {
		r.agentURL = c.PG.URL
		r.info.PG = redact(c.PG.URL)
		return r.checkUpstream(ctx)
	}
	pwFile := c.Path(filepath.Join("secrets", "pg-postgres.password"))
	pw, _, err := secret(pwFile)
	if err != nil {
		return err
	}
	gatePWFile := c.Path(filepath.Join("secrets", "pg-gate.password"))
	gatePW, _, err := secret(gatePWFile)
	if err != nil {
		return err
	}
	dir := c.Path(c.PG.Local.Dir)
	srv, created, err := pgserver.StartLocal(ctx, pgserver.LocalOptions{Dir: dir, Port: c.PG.Local.Port, Password: pw, Settings: c.PG.Local.Settings})
	if errors.Is(err, pgserver.ErrPortInUse) {
		return fmt.Errorf("%w: pg.local.port %d: %v", ErrPortInUse, c.PG.Local.Port, err)
	}
	if err != nil {
		return err
	}
	r.local = srv
	r.onStop(func(ctx context.Context) error { return srv.Stop(ctx, "fast") })
	r.info.Local = &LocalInfo{Dir: dir, DataDir: srv.Dir, LogFile: srv.LogFile, Port: srv.Port, Superuser: "postgres", PasswordFile: pwFile, Created: created}
	u := url.URL{Scheme: "postgres", User: url.UserPassword("postgres", pw), Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(srv.Port)), Path: "/postgres", RawQuery: "sslmode=disable"}
	r.agentURL = u.String()
	r.info.PG = redact(r.agentURL)
	return r.bootstrapLocal(ctx, gatePW)
}

// bootstrapLocal makes the gate's brokered role and the offered databases
// on the local server, when missing.
func (r *Runner) bootstrapLocal(ctx context.Context, gatePW string) error {
	conn, err := pgx.Connect(ctx, r.agentURL)
	if err != nil {
		return fmt.Errorf("runner: local PostgreSQL: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_roles WHERE rolname = $1", GateRole).Scan(&n); err != nil {
		return fmt.Errorf("runner: local PostgreSQL: %w", err)
	}
	if n == 0 {
		if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD %s", GateRole, quoteLiteral(gatePW))); err != nil {
			return fmt.Errorf("runner: local PostgreSQL: create the gate's role: %w", err)
		}
	}
	for _, db := range r.cfg.PG.Databases {
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM pg_database WHERE datname = $1", db).Scan(&n); err != nil {
			return fmt.Errorf("runner: local PostgreSQL: %w", err)
		}
		if n == 0 {
			if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE DATABASE %s OWNER %s", pgx.Identifier{db}.Sanitize(), GateRole)); err != nil {
				return fmt.Errorf("runner: local PostgreSQL: create database %s: %w", db, err)
			}
		}
	}
	return nil
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// checkUpstream makes sure a server given by URL answers, as the agent
// needs it (a replication connection) and as the gate needs it (each
// offered database, as the gate's role): a wrong URL fails the start with
// a clear error instead of an agent retrying for ever.
func (r *Runner) checkUpstream(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	repURL, err := pgagent.ReplicationURL(r.agentURL)
	if err != nil {
		return fmt.Errorf("%w: pg.url: %v", ErrUpstream, err)
	}
	conn, err := pgconn.Connect(cctx, repURL)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42501" { // insufficient_privilege
		return fmt.Errorf("%w: pg.url %s: the role may not replicate: give it REPLICATION (ALTER ROLE ... REPLICATION) or use a superuser: %v", ErrUpstream, redact(r.agentURL), redactErr(err))
	}
	if err != nil {
		return fmt.Errorf("%w: pg.url %s: cannot connect: %v", ErrUpstream, redact(r.agentURL), redactErr(err))
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := pglogrepl.IdentifySystem(cctx, conn); err != nil {
		return fmt.Errorf("%w: pg.url %s: no replication connection (the role needs REPLICATION or superuser, and pg_hba.conf a replication line): %v", ErrUpstream, redact(r.agentURL), redactErr(err))
	}
	var level string
	res := conn.Exec(cctx, "SHOW wal_level")
	rows, err := res.ReadAll()
	if err == nil && len(rows) == 1 && len(rows[0].Rows) == 1 {
		level = string(rows[0].Rows[0][0])
	}
	if level == "minimal" {
		return fmt.Errorf("%w: pg.url %s: wal_level is minimal; the agent needs replica (or logical)", ErrUpstream, redact(r.agentURL))
	}
	for _, db := range r.cfg.PG.Databases {
		u, err := r.upstream(db)
		if err != nil {
			return err
		}
		dsn, err := u.DSN()
		if err != nil {
			return fmt.Errorf("%w: %v", ErrUpstream, err)
		}
		c, err := pgconn.Connect(cctx, dsn)
		if err != nil {
			return fmt.Errorf("%w: database %s as %s (the gate's role): %v", ErrUpstream, db, u.User, redactErr(err))
		}
		c.Close(context.WithoutCancel(ctx))
	}
	return nil
}

// upstream is how the gate reaches database db.
func (r *Runner) upstream(db string) (*policy.Upstream, error) {
	c := r.cfg
	// Absolute: gate.yaml is read from the data directory, and a relative
	// password_file there would be taken from it.
	if c.PG.URL == "" {
		f, err := filepath.Abs(c.Path(filepath.Join("secrets", "pg-gate.password")))
		if err != nil {
			return nil, err
		}
		return &policy.Upstream{Name: db, Host: "127.0.0.1", Port: r.local.Port, DBName: db, User: GateRole,
			PasswordFile: f, SSLMode: "disable"}, nil
	}
	raw := c.PG.GateURL
	if raw == "" {
		raw = c.PG.URL
	}
	pu, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUpstream, err)
	}
	up := &policy.Upstream{Name: db, Host: pu.Hostname(), Port: 5432, DBName: db, User: pu.User.Username(), SSLMode: "prefer"}
	if p := pu.Port(); p != "" {
		up.Port, _ = strconv.Atoi(p)
	}
	if up.User == "" {
		up.User = "postgres"
	}
	if m := pu.Query().Get("sslmode"); m != "" {
		up.SSLMode = m
	}
	up.SSLRootCert = pu.Query().Get("sslrootcert")
	if pw, ok := pu.User.Password(); ok {
		// The generated gate.yaml names a file, never the password.
		f, err := filepath.Abs(c.Path(filepath.Join("secrets", "upstream.password")))
		if err != nil {
			return nil, err
		}
		if err := writeSecret(f, pw); err != nil {
			return nil, err
		}
		up.PasswordFile = f
	}
	return up, nil
}

// writeSecret replaces path's content with v, 0600.
func writeSecret(path, v string) error {
	if b, err := os.ReadFile(path); err == nil && strings.TrimRight(string(b), "\n") == v {
		return nil
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(v+"\n"), 0o600); err != nil {
		return fmt.Errorf("runner: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("runner: %w", err)
	}
	return nil
}

// --- the agent -------------------------------------------------------------

func (r *Runner) startAgent(ctx, runCtx context.Context) error {
	c := r.cfg
	opts := pgagent.AgentOptions{
		URL:         r.agentURL,
		Slot:        c.Agent.Slot,
		Synchronous: c.Agent.Synchronous,
		FlushEvery:  c.Agent.FlushEvery,
		RetainWarn:  c.Agent.RetainWarn,
		BaseEvery:   c.Agent.BaseEvery,
		DataDir:     r.localDataDir(),
		Log:         r.log.With("part", "agent"),
	}
	// The tripwire: incidents go to the state store, the ledger and the log
	// (and to OnIncident: `dualkey run` prints them).
	if c.Tripwire.Enabled {
		rec := &incident.Recorder{DB: r.db, Ledger: r.led, Log: r.log.With("part", "tripwire"),
			OnRecord: func(in incident.Incident, isNew bool) {
				if isNew && r.opts.OnIncident != nil {
					r.opts.OnIncident(in)
				}
			}}
		opts.OnDetect = func(ctx context.Context, d pgagent.Detection) {
			// A stop arriving while an incident is being recorded must not
			// cut it short (the ledger record was lost so): finish it, in
			// bounded time. The agent's Run waits for this before it
			// returns, and the ledger closes after the agent.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			rec.Detect(dctx, d)
		}
		opts.Tripwire.MassRows = c.Tripwire.MassRows
		opts.NamesEvery = c.Tripwire.NamesEvery
	}
	r.info.Tripwire = c.Tripwire.Enabled
	r.agent = pgagent.NewAgent(r.repo, opts)
	r.info.Slot = opts.Slot
	r.info.BaseEvery = c.Agent.BaseEvery
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.agent.Run(runCtx) // returns nil when runCtx ends; retries any failure before that
	}()
	r.onStop(func(context.Context) error {
		r.cancel() // the agent stores what it received, then returns
		r.wg.Wait()
		return nil
	})
	if !c.Agent.FirstBaseBackup {
		close(r.backupRan)
		return nil
	}
	sys, err := r.systemID(ctx)
	if err != nil {
		close(r.backupRan)
		return err
	}
	bs, _, err := pgagent.Backups(ctx, r.repo)
	if err != nil {
		close(r.backupRan)
		return err
	}
	if slices.ContainsFunc(bs, func(b pgagent.BaseBackupInfo) bool { return b.Meta.SystemID == sys }) {
		close(r.backupRan)
		return nil
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer close(r.backupRan)
		err := r.firstBackup(runCtx)
		r.backupMu.Lock()
		r.backupErr = err
		r.backupMu.Unlock()
	}()
	return nil
}

// localDataDir is the data directory of the server run started itself,
// whose base backups read it directly (a local base backup, faster than
// BASE_BACKUP); "" for a server given by URL, which may be on another host.
func (r *Runner) localDataDir() string {
	if r.local == nil {
		return ""
	}
	return r.local.Dir
}

// firstBackup takes the base backup a fresh vault needs before anything
// can be restored.
func (r *Runner) firstBackup(ctx context.Context) error {
	repURL, err := pgagent.ReplicationURL(r.agentURL)
	if err != nil {
		return err
	}
	res, err := pgagent.BaseBackup(ctx, r.repo, repURL, pgagent.BaseBackupOptions{Label: "dualkey run: first", Log: r.log,
		DataDir: r.localDataDir()})
	if err != nil {
		if ctx.Err() == nil {
			r.log.Error("first base backup failed", "err", err)
		}
		return err
	}
	r.log.Info("first base backup stored", "snapshot", res.ID.String()[:10], "size", res.Meta.Size)
	return nil
}

// systemID is the protected server's system identifier.
func (r *Runner) systemID(ctx context.Context) (uint64, error) {
	repURL, err := pgagent.ReplicationURL(r.agentURL)
	if err != nil {
		return 0, err
	}
	conn, err := pgconn.Connect(ctx, repURL)
	if err != nil {
		return 0, fmt.Errorf("%w: %v", ErrUpstream, redactErr(err))
	}
	defer conn.Close(context.WithoutCancel(ctx))
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return 0, fmt.Errorf("%w: identify system: %v", ErrUpstream, redactErr(err))
	}
	id, err := strconv.ParseUint(sys.SystemID, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("runner: system id %q: %w", sys.SystemID, err)
	}
	return id, nil
}

// --- the gate --------------------------------------------------------------

func (r *Runner) startGate(ctx context.Context) error {
	c := r.cfg
	ups := map[string]Upstream{}
	gups := map[string]gate.Upstream{}
	for _, db := range c.PG.Databases {
		u, err := r.upstream(db)
		if err != nil {
			return err
		}
		ups[db] = Upstream{Host: u.Host, Port: u.Port, DBName: u.DBName, User: u.User, PasswordFile: u.PasswordFile, SSLMode: u.SSLMode}
		dsn, err := u.DSN()
		if err != nil {
			return err
		}
		gups[db] = gate.Upstream{DSN: dsn, Role: u.User}
	}
	dataAbs, err := filepath.Abs(c.DataDir)
	if err != nil {
		return err
	}
	// The effective gate.yaml, for `dualkey policy check` and reading.
	path := c.Path("gate.yaml")
	text := append([]byte("# Written by dualkey run at each start from "+orDefault(c.File, "its defaults")+"; edits here are overwritten.\n"), c.gateYAML(ups, false, dataAbs)...)
	if err := writeSecret(path, string(text)); err != nil {
		return err
	}
	r.info.GateConfig = path
	// Validated with dualkey.yaml's line numbers at Load; this parse
	// differs only in the upstreams, and names the rules by their lines
	// in the file just written ("rules[1] ... (dualkey-data/gate.yaml:20)").
	pc, err := policy.Parse(text, path)
	if err != nil {
		return gateErrors(err)
	}
	if c.Gate.tlsPath && c.File != "" {
		dir := filepath.Dir(c.File)
		for _, p := range []*string{&pc.TLS.Cert, &pc.TLS.Key} {
			if *p != "" && !filepath.IsAbs(*p) {
				*p = filepath.Join(dir, *p)
			}
		}
	} else {
		for _, p := range []*string{&pc.TLS.Cert, &pc.TLS.Key} {
			if *p != "" && !filepath.IsAbs(*p) {
				*p = filepath.Join(dataAbs, *p)
			}
		}
	}
	gc := gate.ConfigFrom(pc)
	gc.Upstreams, gc.State, gc.Quorum, gc.Ledger, gc.Logger = gups, r.db, r.svc, r.led, r.log.With("part", "gate")
	if pc.TLS.Cert != "" {
		host, _, _ := net.SplitHostPort(pc.Listen)
		if gc.TLS, r.info.GateFingerprint, err = gate.TLSConfig(pc.TLS.Cert, pc.TLS.Key, pc.TLS.Generate, []string{host}); err != nil {
			return err
		}
	}
	g, err := gate.New(gc)
	if err != nil {
		return err
	}
	r.gate = g
	ln := r.ln
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := g.Serve(ln); !errors.Is(err, gate.ErrClosed) {
			r.errc <- err
		}
	}()
	r.onStop(func(ctx context.Context) error {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		err := g.Close(cctx)
		<-served
		return err
	})
	return nil
}

// listen opens the gate's listener: gate.listen, or the default address
// (a free port on its host when that one is taken).
func (r *Runner) listen() error {
	c := r.cfg
	addr := c.Gate.Listen
	ln, err := net.Listen("tcp", addr)
	if err != nil && errors.Is(err, syscall.EADDRINUSE) && !c.Gate.listenGiven {
		host, _, _ := net.SplitHostPort(addr)
		r.info.GateListenNote = addr + " was taken; set gate.listen to choose"
		ln, err = net.Listen("tcp", net.JoinHostPort(host, "0"))
	}
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("%w: gate.listen %s: %v", ErrPortInUse, addr, err)
		}
		return fmt.Errorf("runner: gate: %w", err)
	}
	r.ln = ln
	r.info.GateAddr = ln.Addr().String()
	// Closed by the gate once it serves; until then by this.
	r.onStop(func(context.Context) error {
		if r.gate == nil {
			return ln.Close()
		}
		return nil
	})
	return nil
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

var passwordRE = regexp.MustCompile(`(//[^:/@]+):[^@/]*@`)

// redact hides the password in a connection URL.
func redact(u string) string { return passwordRE.ReplaceAllString(u, "$1:***@") }

// redactErr is err's text with any URL password hidden.
func redactErr(err error) string { return redact(err.Error()) }
