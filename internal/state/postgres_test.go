package state

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

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
}
