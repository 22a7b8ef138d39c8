// Package pgtest is the one test harness that starts real PostgreSQL 15
// servers: initdb into a temporary directory, a free loopback port, run as a
// non-root OS user, stopped and removed when the test ends. Every package
// that needs a server uses it; no test depends on a server started by hand.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dualkey/dualkey/internal/pgserver"
)

// BinDir holds Debian's PostgreSQL 15 programs.
const BinDir = pgserver.BinDir

// OSUser runs the servers when the tests run as root: PostgreSQL refuses
// to run as root. Debian's package creates it.
const OSUser = pgserver.OSUser

// Bin returns the path of a PostgreSQL program.
func Bin(name string) string { return pgserver.Bin(name) }

// Options tune a server.
type Options struct {
	// Settings are extra postgresql.conf lines ("name = value").
	Settings []string
	// Checksums enables data checksums at initdb.
	Checksums bool
}

// Server is a running (or stopped) PostgreSQL server owned by a test.
type Server struct {
	t    testing.TB
	Dir  string // data directory
	Port int
	base string // temp folder holding Dir and the log
	srv  *pgserver.Server
}

// Start initialises and starts a new server. It fails the test when that
// cannot be done.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if err := pgserver.EnsureInstalled(); err != nil {
		t.Fatal(err)
	}
	s := newServer(t)
	if err := s.srv.Init(context.Background(), pgserver.InitOptions{Checksums: opts.Checksums, NoSync: true}); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	s.configure(opts.Settings)
	s.Start()
	return s
}

// Attach adopts an existing data directory (a restored backup) and starts
// it on a fresh port with the given extra settings. The directory is handed
// to the server's OS user.
func Attach(t testing.TB, dir string, settings ...string) *Server {
	t.Helper()
	if err := pgserver.EnsureInstalled(); err != nil {
		t.Fatal(err)
	}
	s := newServer(t)
	if err := os.RemoveAll(s.Dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir, s.Dir); err != nil {
		// another file system: copy
		s.run("cp", "-a", dir, s.Dir)
	}
	if err := Own(s.Dir); err != nil {
		t.Fatal(err)
	}
	os.Chmod(s.Dir, 0o700)
	s.configure(settings)
	return s
}

func newServer(t testing.TB) *Server {
	base, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, base: base, Dir: filepath.Join(base, "data"), Port: freePort(t)}
	s.srv = pgserver.New(base, s.Port)
	if err := os.Mkdir(s.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := Own(base); err != nil {
		t.Fatal(err)
	}
	if err := Own(s.Dir); err != nil {
		t.Fatal(err)
	}
	os.Chmod(base, 0o755)
	t.Cleanup(func() {
		if s.srv.Running() {
			s.stop("immediate")
		}
		if t.Failed() {
			if b, err := os.ReadFile(s.LogFile()); err == nil {
				t.Logf("postgres log (%s):\n%s", s.LogFile(), tail(b, 4000))
			}
		}
		os.RemoveAll(base)
	})
	return s
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// configure appends the harness's settings to postgresql.conf: loopback
// only, on this server's port, with replication enabled.
func (s *Server) configure(extra []string) {
	conf := append(pgserver.Settings(s.Port, s.base), extra...)
	if err := s.srv.Configure(conf, pgserver.HBA("trust")); err != nil {
		s.t.Fatal(err)
	}
}

// LogFile is where the server writes its log.
func (s *Server) LogFile() string { return s.srv.LogFile }

// Start starts the server and waits until it accepts connections.
func (s *Server) Start() {
	s.t.Helper()
	if err := s.srv.Start(context.Background()); err != nil {
		s.t.Fatalf("pgtest: %v", err)
	}
}

// Stop shuts the server down cleanly (mode "fast"), or with "immediate"
// as a crash would.
func (s *Server) Stop() { s.t.Helper(); s.stop("fast") }

// Crash stops the server with mode immediate: no checkpoint, as after
// a power cut.
func (s *Server) Crash() { s.t.Helper(); s.stop("immediate") }

func (s *Server) stop(mode string) {
	if err := s.srv.Stop(context.Background(), mode); err != nil {
		s.t.Errorf("pgtest: %v", err)
	}
}

// Restart stops and starts the server.
func (s *Server) Restart() { s.t.Helper(); s.Stop(); s.Start() }

// Running reports whether the harness started the server and has not stopped it.
func (s *Server) Running() bool { return s.srv.Running() }

// URL is a connection string for database db as the superuser.
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.Port, db)
}

// ReplicationURL is a connection string for the physical replication protocol.
func (s *Server) ReplicationURL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable&replication=true", s.Port)
}

// Conn opens a connection to database db, closed when the test ends.
func (s *Server) Conn(db string) *pgx.Conn {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, s.URL(db))
	if err != nil {
		s.t.Fatalf("pgtest: connect %s: %v", db, err)
	}
	s.t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// Exec runs SQL (several statements allowed) in database db.
func (s *Server) Exec(db, sql string) {
	s.t.Helper()
	c := s.Conn(db)
	if _, err := c.Exec(context.Background(), sql); err != nil {
		s.t.Fatalf("pgtest: %s: %v", sql, err)
	}
	c.Close(context.Background())
}

// Query returns the first column of the first row of query as text.
func (s *Server) Query(db, query string, args ...any) string {
	s.t.Helper()
	c := s.Conn(db)
	defer c.Close(context.Background())
	var v any
	if err := c.QueryRow(context.Background(), query, args...).Scan(&v); err != nil {
		s.t.Fatalf("pgtest: %s: %v", query, err)
	}
	return fmt.Sprint(v)
}

// StartStandby makes a streaming standby of s with pg_basebackup -R and
// starts it.
func (s *Server) StartStandby(t testing.TB) *Server {
	t.Helper()
	sb := newServer(t)
	os.Remove(sb.Dir)
	sb.run(Bin("pg_basebackup"), "-h", "127.0.0.1", "-p", strconv.Itoa(s.Port), "-U", "postgres",
		"-D", sb.Dir, "-R", "-X", "stream", "--no-sync", "-c", "fast")
	sb.configure(nil)
	sb.Start()
	return sb
}

// Pgbench runs pgbench against database db with args.
func (s *Server) Pgbench(args ...string) string {
	s.t.Helper()
	all := append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(s.Port), "-U", "postgres"}, args...)
	return s.run(Bin("pgbench"), all...)
}

func (s *Server) run(name string, args ...string) string {
	s.t.Helper()
	out, err := s.srv.Run(context.Background(), name, args...)
	if err != nil {
		s.t.Fatalf("pgtest: %v", err)
	}
	return out
}

// RunAsOSUser makes c run as OSUser when this process is root.
func RunAsOSUser(c *exec.Cmd) { pgserver.RunAsOSUser(c) }

// Own hands path and everything below it to OSUser when running as root.
func Own(path string) error { return pgserver.Own(path) }

var portMu sync.Mutex
var usedPorts = map[int]bool{}

// freePort picks a loopback port nobody listens on, never the same twice
// in one test binary.
func freePort(t testing.TB) int {
	portMu.Lock()
	defer portMu.Unlock()
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if !usedPorts[p] {
			usedPorts[p] = true
			return p
		}
	}
	t.Fatal(errors.New("pgtest: no free port"))
	return 0
}
