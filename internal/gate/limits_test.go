package gate

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/state"
)

// TestMaxConnections: limits.max_connections (everyone) and
// max_connections_per_user refuse a login beyond them with 53300 and a
// message naming the limit; a session that ends frees its place.
func TestMaxConnections(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxConnections, c.MaxConnectionsPerUser = 3, 2 })
	ctx := ctxT(t, time.Minute)
	v, err := NewVerifier("erin-password", 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.db.AddUser(ctx, state.User{Name: "erin", Groups: []string{"ops"}, Secret: v.String()}); err != nil {
		t.Fatal(err)
	}
	connect := func(user, pw string) (*pgx.Conn, error) {
		c, err := pgx.Connect(ctx, e.url(user, pw, "shop", "disable"))
		if err == nil {
			t.Cleanup(func() { c.Close(context.Background()) })
		}
		return c, err
	}
	refused := func(err error, want string) {
		t.Helper()
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "53300" || !strings.Contains(pe.Message, want) {
			t.Fatalf("got %v, want 53300 saying %q", err, want)
		}
	}
	a1, err := connect("alice", alicePW)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := connect("alice", alicePW); err != nil {
		t.Fatal(err)
	}
	_, err = connect("alice", alicePW)
	refused(err, `too many connections for user "alice": the dualkey gate allows 2 sessions per person (limits.max_connections_per_user)`)
	if _, err := connect("erin", "erin-password"); err != nil {
		t.Fatalf("erin under her own limit: %v", err)
	}
	_, err = connect("erin", "erin-password")
	refused(err, "sorry, too many clients already: the dualkey gate allows 3 sessions at once (limits.max_connections)")
	// A wrong password is told as such, not as a full gate.
	_, err = connect("erin", "wrong")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28P01" {
		t.Fatalf("wrong password at the limit: %v", err)
	}

	// alice leaves: her place is free once her session has ended.
	a1.Close(ctx)
	for {
		if total, _ := e.g.Sessions("alice"); total < 3 {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the closed session was never released")
		case <-time.After(10 * time.Millisecond):
		}
	}
	if _, err := connect("erin", "erin-password"); err != nil {
		t.Fatalf("after a session ended: %v", err)
	}
	if total, erin := e.g.Sessions("erin"); total != 3 || erin != 2 {
		t.Fatalf("sessions = %d, erin %d; want 3, 2", total, erin)
	}
}

// TestClientEncoding: a client-only multibyte client_encoding, in which a
// quote or backslash byte can be half of a character, is refused at
// startup; SET of one is privileged (denied by the test policy).
func TestClientEncoding(t *testing.T) {
	e := newEnv(t, nil)
	ctx := ctxT(t, time.Minute)
	cfg, err := pgx.ParseConfig(e.url("alice", alicePW, "shop", "disable"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["client_encoding"] = "SJIS"
	_, err = pgx.ConnectConfig(ctx, cfg)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "22023" || !strings.Contains(pe.Message, `client_encoding "SJIS" is not allowed`) {
		t.Fatalf("SJIS at startup: %v, want 22023", err)
	}
	c := e.connect("shop")
	for _, q := range []string{"SET client_encoding = 'GBK'", "SET standard_conforming_strings = off"} {
		_, err := c.Exec(ctx, q)
		if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Message, "denied") {
			t.Fatalf("%s: %v, want it denied", q, err)
		}
	}
	if _, err := c.Exec(ctx, "SET standard_conforming_strings = on"); err != nil {
		t.Fatalf("SET standard_conforming_strings = on: %v", err)
	}
}

// TestLexerSettingsUpstream: a setting that changes how the server reads
// statements, reached where the classifier cannot see it (a function made
// around the gate, the role's own settings), ends or refuses the session.
func TestLexerSettingsUpstream(t *testing.T) {
	e := newEnv(t, nil)
	ctx := ctxT(t, time.Minute)
	e.srv.Exec("shop", `CREATE FUNCTION sneaky() RETURNS text LANGUAGE sql VOLATILE
		AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$;
		ALTER FUNCTION sneaky() OWNER TO app_owner`)
	c := e.connect("shop")
	var s string
	err := c.QueryRow(ctx, "SELECT sneaky()").Scan(&s)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Severity != "FATAL" || !strings.Contains(pe.Message, "standard_conforming_strings") {
		t.Fatalf("SELECT sneaky(): %v, want the session ended", err)
	}
	if err := c.Ping(ctx); err == nil {
		t.Fatal("the session lives on with standard_conforming_strings off")
	}

	e.srv.Exec("postgres", "ALTER ROLE app_owner SET standard_conforming_strings = off")
	_, err = pgx.Connect(ctx, e.url("alice", alicePW, "shop", "disable"))
	if !errors.As(err, &pe) || pe.Code != "55000" || !strings.Contains(pe.Message, "standard_conforming_strings") {
		t.Fatalf("role with standard_conforming_strings off: %v, want 55000", err)
	}
	e.srv.Exec("postgres", "ALTER ROLE app_owner RESET standard_conforming_strings")
	c2, err := pgx.Connect(ctx, e.url("alice", alicePW, "shop", "disable"))
	if err != nil {
		t.Fatalf("after RESET: %v", err)
	}
	c2.Close(ctx)
}
