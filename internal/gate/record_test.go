package gate

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A statement record's data encodes exactly as the map it replaced did, so
// the ledger's records (and their hashes) are what they were.
func TestStmtDataAsMap(t *testing.T) {
	rows, zero := int64(7), int64(0)
	for _, d := range []stmtData{
		{Class: "write", DB: "shop", Decision: "allow", Rule: "r", Session: "s1", SQL: "UPDATE t SET a = '<&>' WHERE id = 1", Rows: &rows},
		{Class: "read", DB: "shop", Decision: "approved", Rule: "", Session: "s2", SQL: "SELECT 1", Rows: &zero, Request: "abc"},
		{Class: "write", DB: "x", Decision: "allow", Rule: "r", Session: "s3", SQL: "INSERT", Error: "23505"},
	} {
		m := map[string]any{"session": d.Session, "db": d.DB, "class": d.Class, "decision": d.Decision, "rule": d.Rule, "sql": d.SQL}
		if d.Rows != nil {
			m["rows"] = *d.Rows
		}
		if d.Error != "" {
			m["error"] = d.Error
		}
		if d.Request != "" {
			m["request"] = d.Request
		}
		a, err1 := json.Marshal(&d)
		b, err2 := json.Marshal(m)
		if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
			t.Fatalf("struct %s\nmap    %s (%v %v)", a, b, err1, err2)
		}
	}
}

// TestLedgerOutage: while the ledger cannot be written (its state store,
// here a PostgreSQL server, is down) the gate refuses every statement with
// 58000 and keeps the records it could not write; when the store is back
// it writes them, in one chain that verifies, and statements run again.
func TestLedgerOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two PostgreSQL servers")
	}
	upstream := pgtest.Start(t, pgtest.Options{})
	upstream.Exec("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'brokered-secret'")
	upstream.Exec("postgres", "CREATE DATABASE shop OWNER app_owner")
	upstream.Exec("postgres", "CREATE DATABASE bench OWNER app_owner")
	store := pgtest.Start(t, pgtest.Options{})
	store.Exec("postgres", "CREATE DATABASE dualkey_state")
	e := startGateOn(t, upstream, store.URL("dualkey_state"), nil)
	ctx := ctxT(t, 3*time.Minute)
	c := e.connect("shop")
	if _, err := c.Exec(ctx, "CREATE TABLE t (id int)"); err != nil {
		t.Fatal(err)
	}
	refused := func(err error) bool {
		var pe *pgconn.PgError
		return errors.As(err, &pe) && pe.Code == "58000" && strings.Contains(pe.Message, "audit ledger")
	}

	e.g.rec.flush()
	store.Stop()
	// The statement that finds the store down still runs (its record is
	// written after it); the failed write makes the gate refuse the next.
	ran := 0
	for i := 0; ; i++ {
		_, err := c.Exec(ctx, fmt.Sprintf("INSERT INTO t VALUES (%d)", i))
		if refused(err) {
			break
		}
		if err != nil {
			t.Fatalf("insert %d: %v", i, err)
		}
		ran++
		if ctx.Err() != nil || i > 10000 {
			t.Fatal("statements still run with the ledger down")
		}
	}
	if ran == 0 {
		t.Fatal("no statement ran before the outage was noticed: the test shows nothing about records kept")
	}
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeCacheStatement} {
		if _, err := c.Exec(ctx, "SELECT 1", mode); !refused(err) {
			t.Errorf("%v: a read with the ledger down: %v, want 58000", mode, err)
		}
	}
	if n := upstream.Query("shop", "SELECT count(*) FROM t"); n != strconv.Itoa(ran) {
		t.Fatalf("%s rows in t, %d inserts ran", n, ran)
	}

	store.Start()
	for {
		_, err := c.Exec(ctx, "INSERT INTO t VALUES (-1)")
		if err == nil {
			break
		}
		if !refused(err) || ctx.Err() != nil {
			t.Fatalf("after the store came back: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.g.rec.flush()
	inserts := map[string]int{}
	err := e.db.Ledger().Read(ctx, 1, func(_ uint64, rec []byte) error {
		r, err := ledger.ParseRecord(rec)
		if err != nil {
			return err
		}
		var d stmtData
		if r.Kind == ledger.KindStatement && json.Unmarshal(r.Data, &d) == nil && strings.HasPrefix(d.SQL, "INSERT") {
			inserts[d.SQL]++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range ran {
		if sql := fmt.Sprintf("INSERT INTO t VALUES (%d)", i); inserts[sql] != 1 {
			t.Errorf("%q: %d records, want 1 (records %v)", sql, inserts[sql], inserts)
		}
	}
	if inserts["INSERT INTO t VALUES (-1)"] != 1 || len(inserts) != ran+1 {
		t.Errorf("records %v: want the %d inserts that ran and the one after", inserts, ran)
	}
	rep, err := ledger.Verify(ctx, e.db.Ledger(), nil, ed25519.NewKeyFromSeed(make([]byte, 32)).Public().(ed25519.PublicKey))
	if err != nil || !rep.OK() {
		t.Errorf("the ledger does not verify: %v %+v", err, rep)
	}
}
