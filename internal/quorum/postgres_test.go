package quorum

import (
	"testing"

	"github.com/dualkey/dualkey/internal/pgtest"
)

// TestPostgres runs the race on a real PostgreSQL, the engine several
// gateways share: two services, two handles, one database.
func TestPostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL server")
	}
	srv := pgtest.Start(t, pgtest.Options{})
	srv.Exec("postgres", "CREATE DATABASE quorum_race")
	t.Run("ConsumeRace", func(t *testing.T) { testConsumeRace(t, srv.URL("quorum_race")) })
	srv.Exec("postgres", "CREATE DATABASE quorum_policy")
	t.Run("PolicyApplyRace", func(t *testing.T) { testApplyRace(t, srv.URL("quorum_policy")) })
}
