package gate

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// requestReason returns the reason of quorum request id as approvers see it.
func (e *env) requestReason(id string) string {
	e.t.Helper()
	sr, err := e.db.GetRequest(ctxT(e.t, time.Minute), id)
	if err != nil {
		e.t.Fatal(err)
	}
	r, err := cert.ParseRequest(sr.Doc)
	if err != nil {
		e.t.Fatal(err)
	}
	return r.Reason
}

// TestDryRun: an UPDATE or DELETE held by the policy (not by the row
// guard) is run once in a transaction the gate rolls back, and the
// request shows the rows it would touch; nothing changes, whatever the
// protocol and whether or not the client is in a transaction.
func TestDryRun(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.DryRunTimeout = 500 * time.Millisecond })
	e.srv.Exec("shop", `CREATE TABLE dry (id int PRIMARY KEY, v int);
		INSERT INTO dry SELECT g, g FROM generate_series(1, 20) g;
		CREATE SEQUENCE dry_seq; ALTER SEQUENCE dry_seq OWNER TO app_owner;
		CREATE TABLE locked (id int);
		INSERT INTO locked VALUES (1), (2);
		ALTER TABLE dry OWNER TO app_owner; ALTER TABLE locked OWNER TO app_owner`)
	ctx := ctxT(t, 2*time.Minute)
	unchanged := func() {
		t.Helper()
		if got := e.srv.Query("shop", "SELECT count(*) || ':' || sum(v) FROM dry"); got != "20:210" {
			t.Fatalf("dry = %s after a dry run, want 20:210", got)
		}
	}
	hold := func(c *pgx.Conn, sql string, args ...any) string {
		t.Helper()
		_, err := c.Exec(ctx, sql, args...)
		id := heldID(t, err)
		unchanged()
		return e.requestReason(id)
	}
	want := func(reason, sub string) {
		t.Helper()
		if !strings.Contains(reason, sub) {
			t.Fatalf("request reason %q does not say %q", reason, sub)
		}
	}

	simple := e.connect("shop")
	t.Run("simple protocol", func(t *testing.T) {
		_, err := simple.Exec(ctx, "DELETE FROM dry", pgx.QueryExecModeSimpleProtocol)
		id := heldID(t, err)
		unchanged()
		want(e.requestReason(id), "dry run: touches 20 rows")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || !strings.Contains(pe.Detail, "dry run: touches 20 rows") {
			t.Fatalf("the client's detail does not carry the dry run: %q", pe.Detail)
		}
		want(hold(simple, "UPDATE dry SET v = 0 WHERE true", pgx.QueryExecModeSimpleProtocol), "dry run: touches 20 rows")
		want(hold(simple, "DELETE FROM dry WHERE id > 0 OR 1 = 1", pgx.QueryExecModeSimpleProtocol), "dry run: touches 20 rows")
	})
	t.Run("extended protocol", func(t *testing.T) {
		c := e.connect("shop")
		want(hold(c, "DELETE  FROM dry"), "dry run: touches 20 rows")
		want(hold(c, "UPDATE dry SET v = v + 1 WHERE 1 = 1 RETURNING *"), "dry run: touches 20 rows")
		// With a parameter the dry run cannot run at Parse; it says so.
		want(hold(c, "DELETE FROM dry WHERE true OR id = $1", 3), "no dry run: the statement has parameters")
		// A function with effects beyond the rows (a sequence here: a
		// rollback does not undo nextval) is never run unapproved.
		want(hold(c, "UPDATE dry SET v = nextval('dry_seq')"), "no dry run: it calls a function")
		if got := e.srv.Query("shop", "SELECT last_value || ':' || is_called FROM dry_seq"); got != "1:false" {
			t.Fatalf("dry_seq = %s: the held UPDATE's nextval ran", got)
		}
		// The session still works, and nothing of the dry runs is left.
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM dry").Scan(&n); err != nil || n != 20 {
			t.Fatalf("after holds: %d %v", n, err)
		}
	})
	t.Run("inside a transaction", func(t *testing.T) {
		c := e.connect("shop")
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO dry VALUES (21, 0)"); err != nil {
			t.Fatal(err)
		}
		// The savepoint path: the client's own row counts too.
		_, err = tx.Exec(ctx, "DELETE FROM dry ")
		want(e.requestReason(heldID(t, err)), "dry run: touches 21 rows")
		tx.Rollback(ctx)
		unchanged()
		// In an aborted transaction there is nothing to run it in.
		tx, _ = c.Begin(ctx)
		if _, err := tx.Exec(ctx, "SELECT 1/0"); err == nil {
			t.Fatal("1/0 did not fail")
		}
		_, err = tx.Exec(ctx, "DELETE FROM dry  ")
		want(e.requestReason(heldID(t, err)), "no dry run: the session's transaction is aborted")
		tx.Rollback(ctx)
		unchanged()
	})
	t.Run("statement timeout", func(t *testing.T) {
		// Another session holds a lock the dry run needs: the dry run's
		// statement_timeout ends it instead of the gate waiting forever.
		other := e.srv.Conn("shop")
		otx, err := other.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer otx.Rollback(context.Background())
		if _, err := otx.Exec(ctx, "LOCK TABLE locked IN ACCESS EXCLUSIVE MODE"); err != nil {
			t.Fatal(err)
		}
		c := e.connect("shop")
		_, err = c.Exec(ctx, "DELETE FROM locked", pgx.QueryExecModeSimpleProtocol)
		want(e.requestReason(heldID(t, err)), "no dry run count: stopped after 500ms")
		otx.Rollback(ctx)
		if n := count(t, e.srv, "shop", "locked"); n != 2 {
			t.Fatalf("locked has %d rows", n)
		}
		// Asked again, the same open request is named; no second dry run.
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM locked").Scan(&n); err != nil || n != 2 {
			t.Fatalf("session after a timed-out dry run: %d %v", n, err)
		}
	})
	t.Run("after approval it runs once", func(t *testing.T) {
		c := e.connect("shop")
		_, err := c.Exec(ctx, "DELETE FROM dry WHERE v > 10 OR true", pgx.QueryExecModeSimpleProtocol)
		id := heldID(t, err)
		want(e.requestReason(id), "dry run: touches 20 rows")
		e.approve(id)
		tag, err := c.Exec(ctx, "DELETE FROM dry WHERE v > 10 OR true", pgx.QueryExecModeSimpleProtocol)
		if err != nil || tag.RowsAffected() != 20 {
			t.Fatalf("approved: %v %v", tag, err)
		}
	})
}

// TestGuardAfterFailedBatchStatement: a guarded statement after a failed
// one in the same pipeline is skipped by PostgreSQL; the gate must not
// wait for the guard's report (it used to, and the session hung).
func TestGuardAfterFailedBatchStatement(t *testing.T) {
	e := newEnv(t, nil)
	e.srv.Exec("shop", `CREATE TABLE g (id int PRIMARY KEY); INSERT INTO g SELECT generate_series(1, 3);
		ALTER TABLE g OWNER TO app_owner`)
	ctx := ctxT(t, time.Minute) // a hang fails here rather than at the test binary's timeout
	c := e.connect("shop")
	b := &pgx.Batch{}
	b.Queue("INSERT INTO g VALUES (1)") // unique violation
	b.Queue("DELETE FROM g WHERE id = 2")
	err := c.SendBatch(ctx, b).Close()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "23505" {
		t.Fatalf("batch: %v, want the unique violation", err)
	}
	if n := count(t, e.srv, "shop", "g"); n != 3 {
		t.Fatalf("g has %d rows, want 3 (the DELETE was skipped)", n)
	}
	var n int
	if err := c.QueryRow(ctx, "SELECT count(*) FROM g").Scan(&n); err != nil || n != 3 {
		t.Fatalf("session after the batch: %d %v", n, err)
	}
}

// TestReservedNames: a client cannot name a statement or portal as the
// gate names the ones it injects (the dry run would close it under it).
func TestReservedNames(t *testing.T) {
	e := newEnv(t, nil)
	ctx := ctxT(t, time.Minute)
	c := e.connect("shop")
	_, err := c.PgConn().Prepare(ctx, "dualkey_dryrun", "SELECT 1", nil)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42602" || !strings.Contains(pe.Message, "reserved by the dualkey gate") {
		t.Fatalf("Prepare dualkey_dryrun: %v, want 42602", err)
	}
	if _, err := c.PgConn().Prepare(ctx, "mine", "SELECT 1", nil); err != nil {
		t.Fatalf("an ordinary name after the refusal: %v", err)
	}
}
