// Package pgserver runs a PostgreSQL 15 server from Debian's packages:
// initdb into a directory, configure it for the agent (wal_level replica,
// replication slots, loopback only), start it on a loopback port, wait
// until it accepts connections, and stop it. PostgreSQL refuses to run as
// root, so when this process is root every server program runs as the
// unprivileged OS user [OSUser], which then owns the server's directory.
//
// It is the one implementation shared by `dualkey run` (a server of its own
// for a newcomer to protect) and internal/pgtest (the test harness).
//
// Layout: a server lives in a base directory holding the data directory
// ("data"), the server log ("postgres.log") and, when asked for, the Unix
// socket. The base is the OS user's; the data directory is 0700 as
// PostgreSQL demands.
package pgserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// BinDir holds Debian's PostgreSQL 15 programs.
const BinDir = "/usr/lib/postgresql/15/bin"

// OSUser runs the server programs when this process is root: PostgreSQL
// refuses to run as root. Debian's package creates it.
const OSUser = "postgres"

// Errors, tested with errors.Is.
var (
	// ErrNotInstalled means the PostgreSQL 15 programs are missing.
	ErrNotInstalled = errors.New("pgserver: PostgreSQL 15 is not installed (run scripts/setup.sh)")
	// ErrPortInUse means the port asked for is taken by another program.
	ErrPortInUse = errors.New("pgserver: port in use")
)

// Bin returns the path of a PostgreSQL program.
func Bin(name string) string { return filepath.Join(BinDir, name) }

var (
	installOnce sync.Once
	installErr  error
)

// EnsureInstalled installs PostgreSQL 15 from Debian's packages when it is
// missing and this process is root (scripts/setup.sh normally has done it
// already); otherwise a missing installation is ErrNotInstalled.
func EnsureInstalled() error {
	installOnce.Do(func() {
		if _, err := os.Stat(Bin("initdb")); err == nil {
			return
		}
		if os.Geteuid() != 0 {
			installErr = fmt.Errorf("%w: %s missing and not root to install postgresql-15", ErrNotInstalled, Bin("initdb"))
			return
		}
		cmd := exec.Command("sh", "-c", "apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15")
		if out, err := cmd.CombinedOutput(); err != nil {
			installErr = fmt.Errorf("%w: apt-get install postgresql-15: %v\n%s", ErrNotInstalled, err, out)
		}
	})
	return installErr
}

// RunAsOSUser makes c run as OSUser when this process is root. Without
// that user it leaves c alone: PostgreSQL then fails with its own clear
// error about root.
func RunAsOSUser(c *exec.Cmd) {
	if os.Geteuid() != 0 {
		return
	}
	uid, gid, err := osUser()
	if err != nil {
		return
	}
	if c.SysProcAttr == nil {
		c.SysProcAttr = &syscall.SysProcAttr{}
	}
	c.SysProcAttr.Credential = &syscall.Credential{Uid: uid, Gid: gid}
}

func osUser() (uint32, uint32, error) {
	u, err := user.Lookup(OSUser)
	if err != nil {
		return 0, 0, err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uint32(uid), uint32(gid), nil
}

// Own hands path and everything below it to OSUser when this process is
// root; otherwise it does nothing.
func Own(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	uid, gid, err := osUser()
	if err != nil {
		return fmt.Errorf("pgserver: OS user %s (PostgreSQL refuses to run as root): %w", OSUser, err)
	}
	return filepath.Walk(path, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, int(uid), int(gid))
	})
}

// FreePort returns a loopback TCP port nobody listens on at the moment.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pgserver: find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// CheckPort reports ErrPortInUse when something listens on 127.0.0.1:port.
func CheckPort(port int) error {
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("%w: 127.0.0.1:%d: %v", ErrPortInUse, port, err)
	}
	return ln.Close()
}

// Settings are the postgresql.conf lines every server gets: loopback only,
// on port, with what the agent needs (wal_level replica, WAL senders and
// slots). socketDir is the Unix socket directory; "" means none (its path
// must stay under 108 bytes, which a deep working directory exceeds).
func Settings(port int, socketDir string) []string {
	return []string{
		"listen_addresses = '127.0.0.1'",
		"port = " + strconv.Itoa(port),
		"unix_socket_directories = '" + strings.ReplaceAll(socketDir, "'", "''") + "'",
		"wal_level = replica",
		"max_wal_senders = 10",
		"max_replication_slots = 10",
		"wal_keep_size = '256MB'",
		"fsync = on",
		"logging_collector = off",
		"log_min_messages = warning",
	}
}

// HBA returns a pg_hba.conf admitting loopback and local connections,
// ordinary and replication, with method ("trust" or "scram-sha-256").
func HBA(method string) string {
	return fmt.Sprintf("local all all %[1]s\nhost all all 127.0.0.1/32 %[1]s\nhost replication all 127.0.0.1/32 %[1]s\nlocal replication all %[1]s\n", method)
}

// Server is one PostgreSQL server: its data directory, port and log.
// Its methods are not safe for concurrent use.
type Server struct {
	Dir     string // data directory
	Port    int
	LogFile string
	// Base is the directory commands run in (the parent of Dir by default).
	Base string

	running bool
}

// New describes the server whose data directory is base/data, logging
// to base/postgres.log. Nothing is created. A relative base is made
// absolute: the programs run in base, not in the current directory.
func New(base string, port int) *Server {
	if abs, err := filepath.Abs(base); err == nil {
		base = abs
	}
	return &Server{Dir: filepath.Join(base, "data"), Port: port, LogFile: filepath.Join(base, "postgres.log"), Base: base}
}

// Command builds a command running a program (a path, or a name looked
// up in PATH) for this server: as OSUser when this process is root, in
// Base, with PGHOST=127.0.0.1 and LC_ALL=C.
func (s *Server) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, name, args...)
	c.Env = append(os.Environ(), "PGHOST=127.0.0.1", "LC_ALL=C")
	c.Dir = s.Base
	if c.Dir == "" {
		c.Dir = filepath.Dir(s.Dir)
	}
	// A process group of its own: Ctrl-C on a terminal reaches the whole
	// foreground group, and the server (which pg_ctl leaves running) must
	// hear of shutdown from Stop, in order, not from the terminal.
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	RunAsOSUser(c)
	return c
}

// Run runs a program (see Command) and returns its combined output; an
// error includes the output.
func (s *Server) Run(ctx context.Context, name string, args ...string) (string, error) {
	var out bytes.Buffer
	c := s.Command(ctx, name, args...)
	c.Stdout, c.Stderr = &out, &out
	if err := c.Run(); err != nil {
		return out.String(), fmt.Errorf("pgserver: %s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, bytes.TrimSpace(out.Bytes()))
	}
	return out.String(), nil
}

// InitOptions tune initdb.
type InitOptions struct {
	// Superuser is the bootstrap superuser's name (default "postgres").
	Superuser string
	// Password is the superuser's password. Empty means no password: the
	// caller's pg_hba.conf should then trust (tests only).
	Password string
	// Checksums enables data checksums.
	Checksums bool
	// NoSync skips initdb's fsync (tests: faster, and a crash loses a
	// throwaway cluster only).
	NoSync bool
}

// Init runs initdb into Dir, which must be empty or missing (it is
// created 0700). When this process is root, Base is handed to OSUser first.
func (s *Server) Init(ctx context.Context, o InitOptions) error {
	if err := EnsureInstalled(); err != nil {
		return err
	}
	if o.Superuser == "" {
		o.Superuser = "postgres"
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return fmt.Errorf("pgserver: %w", err)
	}
	if err := s.own(); err != nil {
		return err
	}
	args := []string{"-D", s.Dir, "-U", o.Superuser, "-E", "UTF8", "--locale=C"}
	if o.NoSync {
		args = append(args, "--no-sync")
	}
	if o.Checksums {
		args = append(args, "--data-checksums")
	}
	if o.Password == "" {
		args = append(args, "--auth=trust")
	} else {
		// initdb reads the password from a file the OS user can read;
		// it lives only while initdb runs.
		pw := filepath.Join(s.Base, ".initdb-password")
		if err := os.WriteFile(pw, []byte(o.Password+"\n"), 0o600); err != nil {
			return fmt.Errorf("pgserver: %w", err)
		}
		defer os.Remove(pw)
		if err := Own(pw); err != nil {
			return err
		}
		args = append(args, "--auth=scram-sha-256", "--pwfile="+pw)
	}
	_, err := s.Run(ctx, Bin("initdb"), args...)
	return err
}

// own hands Base and Dir to OSUser (root only) and checks that OSUser can
// write Base: a parent directory closed to it (a home directory of mode
// 0700) would otherwise fail deep inside initdb.
func (s *Server) own() error {
	if os.Geteuid() != 0 {
		return nil
	}
	base := s.Base
	if base == "" {
		base = filepath.Dir(s.Dir)
	}
	if err := Own(base); err != nil {
		return err
	}
	if err := os.Chmod(base, 0o755); err != nil {
		return fmt.Errorf("pgserver: %w", err)
	}
	c := exec.Command("/bin/sh", "-c", `test -w "$1" && test -x "$1"`, "sh", base)
	RunAsOSUser(c)
	if err := c.Run(); err != nil {
		return fmt.Errorf("pgserver: the OS user %s cannot reach %s (a parent directory is closed to it; PostgreSQL refuses to run as root, so the server runs as %s): choose a directory outside, e.g. under /var/lib or /tmp", OSUser, base, OSUser)
	}
	return nil
}

// Configure appends settings to postgresql.conf (later lines win) and
// writes pg_hba.conf, as OSUser's files.
func (s *Server) Configure(settings []string, hba string) error {
	conf := filepath.Join(s.Dir, "postgresql.conf")
	f, err := os.OpenFile(conf, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("pgserver: %w", err)
	}
	_, err = fmt.Fprintf(f, "\n# dualkey\n%s\n", strings.Join(settings, "\n"))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pgserver: %w", err)
	}
	if hba != "" {
		if err := os.WriteFile(filepath.Join(s.Dir, "pg_hba.conf"), []byte(hba), 0o600); err != nil {
			return fmt.Errorf("pgserver: %w", err)
		}
	}
	if err := Own(conf); err != nil {
		return err
	}
	return Own(filepath.Join(s.Dir, "pg_hba.conf"))
}

// Start starts the server on Port and waits (up to two minutes) until it
// accepts connections. The log says why when it does not.
func (s *Server) Start(ctx context.Context) error {
	if s.running {
		return nil
	}
	if err := CheckPort(s.Port); err != nil {
		return err
	}
	// The log must be the OS user's to write.
	if f, err := os.OpenFile(s.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err == nil {
		f.Close()
		if err := Own(s.LogFile); err != nil {
			return err
		}
	}
	if _, err := s.Run(ctx, Bin("pg_ctl"), "-D", s.Dir, "-l", s.LogFile, "-w", "-t", "120", "-o", "-p "+strconv.Itoa(s.Port), "start"); err != nil {
		return fmt.Errorf("%w%s", err, s.logTail())
	}
	s.running = true
	return nil
}

// Stop shuts the server down with mode "fast" (clients disconnected, a
// checkpoint written) or "immediate" (as a crash would) and waits until
// it is gone. Stopping a server this Server did not start does nothing.
func (s *Server) Stop(ctx context.Context, mode string) error {
	if !s.running {
		return nil
	}
	s.running = false
	ctx = context.WithoutCancel(ctx)
	_, err := s.Run(ctx, Bin("pg_ctl"), "-D", s.Dir, "-m", mode, "-w", "-t", "120", "stop")
	if err != nil && !s.Status(ctx) {
		return nil // it was gone already (stopped by someone else)
	}
	return err
}

// Running reports whether Start succeeded and Stop has not run since.
func (s *Server) Running() bool { return s.running }

// Status asks pg_ctl whether a server runs on Dir: true when it does.
func (s *Server) Status(ctx context.Context) bool {
	_, err := s.Run(ctx, Bin("pg_ctl"), "-D", s.Dir, "status")
	return err == nil
}

// logTail returns the end of the server log, for an error message.
func (s *Server) logTail() string {
	b, err := os.ReadFile(s.LogFile)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return "\nserver log (" + s.LogFile + "):\n" + string(bytes.TrimSpace(b))
}

// Local is a server of dualkey's own under one directory, created on first
// start and reused afterwards (LocalOptions, StartLocal).
type LocalOptions struct {
	// Dir is the base directory: data/ and postgres.log go there.
	Dir string
	// Port on 127.0.0.1; 0 picks a free one at each start.
	Port int
	// Password of the superuser "postgres", set at initdb; connections
	// (ordinary and replication) authenticate with SCRAM-SHA-256.
	Password string
	// Settings are extra postgresql.conf lines, appended at initdb.
	Settings []string
}

// StartLocal initialises o.Dir on first use (initdb with the password,
// data checksums, SCRAM on loopback, no Unix socket) and starts the server.
// created reports whether initdb ran.
func StartLocal(ctx context.Context, o LocalOptions) (s *Server, created bool, err error) {
	if o.Password == "" {
		return nil, false, errors.New("pgserver: a local server needs a superuser password")
	}
	port := o.Port
	if port == 0 {
		if port, err = FreePort(); err != nil {
			return nil, false, err
		}
	} else if err := CheckPort(port); err != nil {
		return nil, false, err
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("pgserver: %w", err)
	}
	s = New(o.Dir, port)
	if _, err := os.Stat(filepath.Join(s.Dir, "PG_VERSION")); errors.Is(err, os.ErrNotExist) {
		// A data directory left half-made by an interrupted initdb is
		// removed: initdb refuses a non-empty one.
		if err := os.RemoveAll(s.Dir); err != nil {
			return nil, false, fmt.Errorf("pgserver: %w", err)
		}
		if err := s.Init(ctx, InitOptions{Password: o.Password, Checksums: true}); err != nil {
			return nil, false, err
		}
		set := append(Settings(port, ""), "password_encryption = 'scram-sha-256'")
		if err := s.Configure(append(set, o.Settings...), HBA("scram-sha-256")); err != nil {
			return nil, false, err
		}
		created = true
	} else if err != nil {
		return nil, false, fmt.Errorf("pgserver: %w", err)
	} else if err := s.own(); err != nil {
		return nil, false, err
	}
	// A server left running by a process that was killed: stop it, then
	// start it under this process's control on this start's port.
	if s.Status(ctx) {
		if _, err := s.Run(ctx, Bin("pg_ctl"), "-D", s.Dir, "-m", "fast", "-w", "-t", "120", "stop"); err != nil {
			return nil, false, err
		}
	}
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if err := s.Start(sctx); err != nil {
		return nil, created, err
	}
	return s, created, nil
}
