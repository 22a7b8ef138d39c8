package state

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgtest"
)

// TestPostgres runs the conformance suite against a real PostgreSQL 15,
// one fresh database per test.
func TestPostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL server")
	}
	srv := pgtest.Start(t, pgtest.Options{})
	var n atomic.Int32
	newDSN := func(t *testing.T) string {
		name := fmt.Sprintf("state_%d", n.Add(1))
		srv.Exec("postgres", "CREATE DATABASE "+name)
		return srv.URL(name)
	}
	t.Run("Open", func(t *testing.T) {
		dsn := newDSN(t)
		// both URL schemes select PostgreSQL
		db := open(t, strings.Replace(dsn, "postgres://", "postgresql://", 1))
		if db.Dialect() != Postgres {
			t.Errorf("Dialect = %s", db.Dialect())
		}
		if _, err := Open(ctxT(t), srv.URL("no_such_db")); err == nil || !strings.HasPrefix(err.Error(), "state: ") {
			t.Errorf("Open(missing database) = %v", err)
		}
	})
	runSuite(t, newDSN)
	// PostgreSQL's commits join the server's group commit: WithLedgerSync
	// opens no second handle, and every batch is durable at once.
	t.Run("LedgerSyncIgnored", func(t *testing.T) {
		db := open(t, newDSN(t), WithLedgerSync(time.Second))
		if db.lazy != nil {
			t.Error("WithLedgerSync opened a second handle on PostgreSQL")
		}
		if err := db.Ledger().Sync(ctxT(t)); err != nil {
			t.Error(err)
		}
	})

	// A server whose default isolation is serializable makes a losing
	// UPDATE fail with 40001 instead of seeing the winner's row: the
	// store retries, so the losers still get ErrConsumed, and the ledger
	// race still has one winner per seq.
	serializable := func(t *testing.T) string {
		dsn := newDSN(t)
		name := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
		srv.Exec("postgres", "ALTER DATABASE "+name+" SET default_transaction_isolation = 'serializable'")
		return dsn
	}
	t.Run("Processes", func(t *testing.T) { runProcesses(t, newDSN(t)) })
	t.Run("Serializable", func(t *testing.T) {
		t.Run("ConsumeRace", func(t *testing.T) { testConsumeRace(t, serializable(t)) })
		t.Run("LedgerAppendRace", func(t *testing.T) { testLedgerRace(t, serializable(t)) })
		t.Run("PolicyRace", func(t *testing.T) { testPolicyRace(t, serializable(t)) })
	})
}
