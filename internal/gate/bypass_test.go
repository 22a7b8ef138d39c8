package gate

import (
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// TestProtocolBypasses: the ways around the classifier that go through the
// protocol rather than SQL. Each would run something the gate never
// judged if it slipped through.
func TestProtocolBypasses(t *testing.T) {
	e := newEnv(t, nil)
	ctx := ctxT(t, 2*time.Minute)
	e.srv.Exec("shop", "CREATE TABLE victims (x int); INSERT INTO victims VALUES (1), (2); ALTER TABLE victims OWNER TO app_owner")

	t.Run("options in the startup packet are not forwarded", func(t *testing.T) {
		cfg, err := pgx.ParseConfig(e.url("alice", alicePW, "shop", "disable"))
		if err != nil {
			t.Fatal(err)
		}
		// Replica mode would silence triggers and foreign keys, unjudged.
		cfg.RuntimeParams["options"] = "-c session_replication_role=replica -c statement_timeout=1"
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(ctx)
		var role, timeout string
		if err := c.QueryRow(ctx, "SELECT current_setting('session_replication_role'), current_setting('statement_timeout')").Scan(&role, &timeout); err != nil {
			t.Fatal(err)
		}
		if role != "origin" || timeout != "0" {
			t.Errorf("options reached the server: session_replication_role %q, statement_timeout %q", role, timeout)
		}
	})

	t.Run("replication connections are refused", func(t *testing.T) {
		for _, mode := range []string{"database", "true"} {
			cfg, err := pgx.ParseConfig(e.url("alice", alicePW, "shop", "disable"))
			if err != nil {
				t.Fatal(err)
			}
			cfg.RuntimeParams["replication"] = mode
			c, err := pgx.ConnectConfig(ctx, cfg)
			var pe *pgconn.PgError
			if err == nil {
				c.Close(ctx)
				t.Fatalf("replication=%s let in", mode)
			}
			if !errors.As(err, &pe) || pe.Code != "28000" {
				t.Errorf("replication=%s: %v, want 28000", mode, err)
			}
		}
	})

	// raw sends messages on c's session and reads until ReadyForQuery,
	// returning the error codes seen.
	raw := func(t *testing.T, c *pgx.Conn, msgs ...pgproto3.FrontendMessage) []string {
		t.Helper()
		pc := c.PgConn()
		for _, m := range msgs {
			pc.Frontend().Send(m)
		}
		pc.Frontend().Send(&pgproto3.Sync{})
		if err := pc.Frontend().Flush(); err != nil {
			t.Fatal(err)
		}
		var codes []string
		for {
			m, err := pc.ReceiveMessage(ctx)
			if err != nil {
				t.Fatal(err)
			}
			switch m := m.(type) {
			case *pgproto3.ErrorResponse:
				codes = append(codes, m.Code)
			case *pgproto3.ReadyForQuery:
				// The session carries on afterwards.
				var n int
				if err := c.QueryRow(ctx, "SELECT count(*) FROM victims").Scan(&n); err != nil || n != 2 {
					t.Errorf("after the refusal: %d rows, %v", n, err)
				}
				return codes
			}
		}
	}

	t.Run("function call by OID is refused", func(t *testing.T) {
		var oid uint32
		if err := e.connect("shop").QueryRow(ctx, "SELECT 'pg_terminate_backend'::regproc::oid").Scan(&oid); err != nil {
			t.Fatal(err)
		}
		codes := raw(t, e.connect("shop"), &pgproto3.FunctionCall{Function: oid, ArgFormatCodes: []uint16{1}, Arguments: [][]byte{{0, 0, 0, 1}}, ResultFormatCode: 1})
		if len(codes) != 1 || codes[0] != "0A000" {
			t.Errorf("FunctionCall: errors %v, want [0A000]", codes)
		}
	})

	t.Run("bind to a statement the gate did not see parsed", func(t *testing.T) {
		// A statement made by SQL PREPARE exists upstream, but the gate
		// judges Binds by what it saw parsed: it refuses the name even
		// for a harmless statement, rather than trust the server's.
		c := e.connect("shop")
		if _, err := c.Exec(ctx, "PREPARE peek AS SELECT 1", pgx.QueryExecModeSimpleProtocol); err != nil {
			t.Fatal(err)
		}
		codes := raw(t, c, &pgproto3.Bind{PreparedStatement: "peek"}, &pgproto3.Execute{})
		if len(codes) != 1 || codes[0] != "26000" {
			t.Errorf("Bind to an unseen statement: errors %v, want [26000]", codes)
		}
	})

	t.Run("execute a portal the gate did not see bound", func(t *testing.T) {
		c := e.connect("shop")
		codes := raw(t, c, &pgproto3.Execute{Portal: "cur"})
		if len(codes) != 1 || codes[0] != "34000" {
			t.Errorf("Execute of an unseen portal: errors %v, want [34000]", codes)
		}
	})
	if n := count(t, e.srv, "shop", "victims"); n != 2 {
		t.Fatalf("victims has %d rows, want 2", n)
	}
}
