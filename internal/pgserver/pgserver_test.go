package pgserver

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// tempBase is a directory the OS user can reach when the tests run as root.
func tempBase(t *testing.T) string {
	d, err := os.MkdirTemp("", "pgserver-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "pg")
}

func url(port int, pw string) string {
	u := "postgres://postgres@127.0.0.1:" + strconv.Itoa(port) + "/postgres?sslmode=disable"
	if pw != "" {
		u = strings.Replace(u, "postgres@", "postgres:"+pw+"@", 1)
	}
	return u
}

// TestLocal: a local server is made with a password and SCRAM on
// loopback, answers with the password only, keeps its data across a stop
// and a second StartLocal, and refuses a port that is taken.
func TestLocal(t *testing.T) {
	ctx := ctxT(t)
	dir := tempBase(t)
	s, created, err := StartLocal(ctx, LocalOptions{Dir: dir, Password: "s3cret-pw"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop(context.Background(), "immediate") })
	if !created {
		t.Fatal("first StartLocal did not initialise")
	}
	c, err := pgx.Connect(ctx, url(s.Port, "s3cret-pw"))
	if err != nil {
		t.Fatal(err)
	}
	var level string
	if err := c.QueryRow(ctx, "SHOW wal_level").Scan(&level); err != nil || level != "replica" {
		t.Fatalf("wal_level = %q, %v", level, err)
	}
	if _, err := c.Exec(ctx, "CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)"); err != nil {
		t.Fatal(err)
	}
	c.Close(ctx)
	if _, err := pgx.Connect(ctx, url(s.Port, "")); err == nil || !strings.Contains(err.Error(), "password") {
		t.Fatalf("connect without a password: %v, want a password failure", err)
	}
	if _, err := pgx.Connect(ctx, url(s.Port, "wrong")); err == nil {
		t.Fatal("connect with a wrong password succeeded")
	}
	if os.Geteuid() == 0 {
		// Run as the OS user, who owns the data directory.
		fi, err := os.Stat(s.Dir)
		if err != nil {
			t.Fatal(err)
		}
		if uid := fi.Sys().(*syscall.Stat_t).Uid; uid == 0 {
			t.Fatalf("data directory owned by root")
		}
	}
	if err := s.Stop(ctx, "fast"); err != nil {
		t.Fatal(err)
	}
	if s.Status(ctx) {
		t.Fatal("server still runs after Stop")
	}

	// A taken port is refused, naming it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	busy := ln.Addr().(*net.TCPAddr).Port
	if _, _, err := StartLocal(ctx, LocalOptions{Dir: dir, Password: "s3cret-pw", Port: busy}); !errors.Is(err, ErrPortInUse) {
		t.Fatalf("StartLocal on a taken port: %v, want ErrPortInUse", err)
	}

	s2, created, err := StartLocal(ctx, LocalOptions{Dir: dir, Password: "s3cret-pw"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s2.Stop(context.Background(), "immediate") })
	if created {
		t.Fatal("second StartLocal initialised again")
	}
	c, err = pgx.Connect(ctx, url(s2.Port, "s3cret-pw"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var x int
	if err := c.QueryRow(ctx, "SELECT x FROM kept").Scan(&x); err != nil || x != 7 {
		t.Fatalf("kept row = %d, %v", x, err)
	}
}

// TestRelativeDir: a relative directory works (the programs run in it,
// so every path handed to them must be absolute).
func TestRelativeDir(t *testing.T) {
	base := tempBase(t)
	wd, _ := os.Getwd()
	if err := os.Chdir(filepath.Dir(base)); err != nil {
		t.Fatal(err)
	}
	defer os.Chdir(wd)
	s, _, err := StartLocal(ctxT(t), LocalOptions{Dir: "pg", Password: "pw"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Stop(context.Background(), "fast"); err != nil {
		t.Fatal(err)
	}
	if !filepath.IsAbs(s.Dir) || !filepath.IsAbs(s.LogFile) {
		t.Fatalf("paths %s, %s", s.Dir, s.LogFile)
	}
}

// TestUnreachableDir: as root, a base directory the OS user cannot reach
// is refused with an error saying so, before initdb.
func TestUnreachableDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root hands the server to another OS user")
	}
	closed, err := os.MkdirTemp("", "pgserver-closed-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(closed)
	os.Chmod(closed, 0o700)
	_, _, err = StartLocal(ctxT(t), LocalOptions{Dir: filepath.Join(closed, "pg"), Password: "x"})
	if err == nil || !strings.Contains(err.Error(), "cannot reach") {
		t.Fatalf("StartLocal under a 0700 root directory: %v, want 'cannot reach'", err)
	}
}
