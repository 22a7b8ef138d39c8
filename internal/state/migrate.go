package state

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
)

// A migration moves the schema from version-1 to version. Migrations are
// forward only and never edited once released: a fix is a new migration.
// The SQL is written once for both engines in the subset they share;
// [migration.text] maps the one type name that differs (BLOB → BYTEA).
type migration struct {
	version int
	name    string
	sql     string
}

// migrations is the schema's history; the index is version-1.
var migrations = []migration{
	{1, "users, policies, requests, approvals, break-glass, ledger", `
CREATE TABLE users (
	name         TEXT PRIMARY KEY,
	display_name TEXT NOT NULL DEFAULT '',
	groups_json  TEXT NOT NULL DEFAULT '[]',
	secret       TEXT NOT NULL DEFAULT '',
	disabled     BOOLEAN NOT NULL DEFAULT FALSE,
	created      BIGINT NOT NULL
);
CREATE TABLE policies (
	serial  BIGINT PRIMARY KEY CHECK (serial > 0),
	doc     BLOB NOT NULL,
	created BIGINT NOT NULL
);
CREATE TABLE requests (
	id          TEXT PRIMARY KEY,
	doc         BLOB NOT NULL,
	requester   TEXT NOT NULL,
	action      TEXT NOT NULL,
	status      TEXT NOT NULL CHECK (status IN ('open', 'approved', 'denied', 'consumed', 'expired', 'cancelled')),
	created     BIGINT NOT NULL,
	expires     BIGINT,
	consumed_at BIGINT,
	consumed_by TEXT NOT NULL DEFAULT '',
	CHECK ((status = 'consumed') = (consumed_at IS NOT NULL))
);
CREATE INDEX requests_status ON requests (status, created);
CREATE INDEX requests_requester ON requests (requester, created);
CREATE TABLE approvals (
	request_id TEXT NOT NULL REFERENCES requests (id),
	approver   TEXT NOT NULL,
	decision   TEXT NOT NULL,
	doc        BLOB NOT NULL,
	created    BIGINT NOT NULL,
	PRIMARY KEY (request_id, approver)
);
CREATE TABLE breakglass (
	id                TEXT PRIMARY KEY,
	person            TEXT NOT NULL,
	role              TEXT NOT NULL,
	reason            TEXT NOT NULL,
	started           BIGINT NOT NULL,
	ends              BIGINT NOT NULL,
	ended_early       BIGINT,
	review_request_id TEXT NOT NULL DEFAULT '',
	reviewed          BOOLEAN NOT NULL DEFAULT FALSE,
	CHECK (ends > started)
);
CREATE INDEX breakglass_person ON breakglass (person, ends);
CREATE TABLE ledger (
	seq BIGINT PRIMARY KEY CHECK (seq > 0),
	rec BLOB NOT NULL
);
`},
	{2, "incidents", `
CREATE TABLE incidents (
	id         TEXT PRIMARY KEY,
	kind       TEXT NOT NULL,
	timeline   BIGINT NOT NULL CHECK (timeline > 0),
	commit_lsn BIGINT NOT NULL CHECK (commit_lsn > 0),
	xid        BIGINT NOT NULL,
	dbname     TEXT NOT NULL DEFAULT '',
	committed  BIGINT,
	detected   BIGINT NOT NULL,
	doc        BLOB NOT NULL,
	UNIQUE (timeline, commit_lsn, kind)
);
CREATE INDEX incidents_detected ON incidents (detected, id);
`},
	// How rec is stored (ledgerCodec): the rows before it are plain.
	{3, "ledger codec", `
ALTER TABLE ledger ADD COLUMN codec SMALLINT NOT NULL DEFAULT 0;
`},
}

func (m migration) text(d Dialect) string {
	if d == Postgres {
		return strings.ReplaceAll(m.sql, " BLOB ", " BYTEA ")
	}
	return m.sql
}

// pgMigrationLock is the advisory lock key serializing migrations on one
// PostgreSQL database ("dualkey" in ASCII). Advisory locks are scoped to
// the database, so two Dualkey databases on one server do not contend.
const pgMigrationLock = 0x6475616c6b6579

const createSchemaVersion = `CREATE TABLE IF NOT EXISTS schema_version (
	version BIGINT PRIMARY KEY,
	name    TEXT NOT NULL,
	applied BIGINT NOT NULL
)`

// migrate applies the missing migrations one transaction each. Every
// transaction first takes the database-wide migration lock (PostgreSQL:
// pg_advisory_xact_lock; SQLite: BEGIN IMMEDIATE, the file's write lock)
// and then reads the version, so two processes opening a fresh database at
// once apply each migration exactly once: the second waits, then finds it
// done.
func (db *DB) migrate(ctx context.Context) error {
	for {
		var done bool
		var applied migration
		err := db.tx(ctx, func(tx *sql.Tx) error {
			done, applied = false, migration{}
			if db.dialect == Postgres {
				if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", int64(pgMigrationLock)); err != nil {
					return err
				}
			}
			if _, err := tx.ExecContext(ctx, createSchemaVersion); err != nil {
				return err
			}
			var cur int
			if err := tx.QueryRowContext(ctx, "SELECT COALESCE(MAX(version), 0) FROM schema_version").Scan(&cur); err != nil {
				return err
			}
			if cur > len(migrations) {
				return fmt.Errorf("%w: %s is at version %d, this binary knows up to %d; upgrade Dualkey",
					ErrSchemaTooNew, db.where, cur, len(migrations))
			}
			if cur == len(migrations) {
				done = true
				return nil
			}
			m := migrations[cur]
			if _, err := tx.ExecContext(ctx, m.text(db.dialect)); err != nil {
				return fmt.Errorf("migration %d (%s): %w", m.version, m.name, err)
			}
			if _, err := tx.ExecContext(ctx, "INSERT INTO schema_version (version, name, applied) VALUES ($1, $2, $3)",
				m.version, m.name, db.now().UnixMicro()); err != nil {
				return fmt.Errorf("migration %d: record version: %w", m.version, err)
			}
			applied = m
			return nil
		})
		if err != nil {
			return db.wrap(err, "migrate %s", db.where)
		}
		if done {
			return nil
		}
		db.log.Info("state migrated", "where", db.where, "version", applied.version, "name", applied.name)
	}
}

// version returns the schema version recorded in the database.
func (db *DB) version(ctx context.Context) (int, error) {
	var v int
	if err := db.sql.QueryRowContext(ctx, "SELECT COALESCE(MAX(version), 0) FROM schema_version").Scan(&v); err != nil {
		return 0, db.wrap(err, "schema version")
	}
	return v, nil
}
