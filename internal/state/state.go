package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// Errors returned by DB methods, wrapped with context; test with errors.Is.
var (
	// ErrNotFound: no user, request, policy or break-glass session by that key.
	ErrNotFound = errors.New("state: not found")
	// ErrExists: a user, approval (same approver, same request) or
	// break-glass session with that key already exists.
	ErrExists = errors.New("state: already exists")
	// ErrConflict: a compare-and-set lost: a policy serial that is not
	// current+1, a request status that is not the expected one, a request ID
	// already stored with other bytes, or a transition the status machine
	// does not allow.
	ErrConflict = errors.New("state: conflict")
	// ErrConsumed: the request was already consumed; it runs at most once.
	ErrConsumed = errors.New("state: request already consumed")
	// ErrExpired: the request's expiry has passed; it cannot be consumed.
	ErrExpired = errors.New("state: request expired")
	// ErrSelfApproval: an approval by the request's own requester.
	ErrSelfApproval = errors.New("state: requester cannot approve own request")
	// ErrSchemaTooNew: the database was migrated by a newer Dualkey; this
	// binary refuses to touch it rather than misread it.
	ErrSchemaTooNew = errors.New("state: database schema is newer than this binary")
	// ErrCorrupt: the SQLite file is not a database or is damaged.
	ErrCorrupt = errors.New("state: database file is corrupt or not a SQLite database")
	// ErrInvalid: an argument the store refuses (empty name, bad ID, ...).
	ErrInvalid = errors.New("state: invalid argument")
	// ErrFull: the store's disk is full (SQLite's file, or the PostgreSQL
	// server's). Nothing of the failed write was kept; it can be retried
	// once there is room.
	ErrFull = errors.New("state: the disk of the state store is full")
)

// Dialect names the engine behind a DB.
type Dialect string

const (
	SQLite   Dialect = "sqlite"
	Postgres Dialect = "postgres"
)

// DefaultBusyTimeout is how long a SQLite connection waits for another
// writer's lock before SQLITE_BUSY. Writes here are single small
// transactions (well under a millisecond each), so ten seconds only runs
// out when something holds the file locked by mistake; [DB] also retries a
// busy error until its context ends.
const DefaultBusyTimeout = 10 * time.Second

// DB is the shared state on one SQLite file or one PostgreSQL database.
// It is safe for concurrent use, and several DBs (in one process or many)
// may share one database.
type DB struct {
	sql     *sql.DB
	dialect Dialect
	where   string // path or redacted URL, for messages
	log     *slog.Logger
	now     func() time.Time
	stmts   sync.Map    // SQL -> *sql.Stmt, for statements run so often that parsing them shows (prepared)
	lazy    *lazyLedger // batches committed without waiting for the disk (WithLedgerSync), or nil
}

// Option configures Open.
type Option func(*options)

type options struct {
	log  *slog.Logger
	now  func() time.Time
	busy time.Duration
	// ledgerSync: WithLedgerSync
	ledgerSync time.Duration
}

// WithLogger sets the logger for migrations and warnings (default: discard).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithClock sets the clock used for Created fields left zero (default time.Now).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithBusyTimeout sets SQLite's busy timeout (default [DefaultBusyTimeout]).
// It has no effect on PostgreSQL.
func WithBusyTimeout(d time.Duration) Option { return func(o *options) { o.busy = d } }

// Open opens (creating and migrating if needed) the state named by dsn:
//
//   - postgres://... or postgresql://... : a PostgreSQL database (pgx);
//   - sqlite:PATH, or any other string taken as a file path: a SQLite file,
//     created with mode 0600 if missing, in WAL journal mode with foreign
//     keys on and a busy timeout.
//
// It fails with [ErrSchemaTooNew] when the database was migrated by a newer
// binary, and with [ErrCorrupt] when the SQLite file is not a database.
func Open(ctx context.Context, dsn string, opts ...Option) (*DB, error) {
	o := options{log: slog.New(slog.NewTextHandler(io.Discard, nil)), now: time.Now, busy: DefaultBusyTimeout}
	for _, f := range opts {
		f(&o)
	}
	db := &DB{log: o.log, now: o.now}
	var err error
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		err = db.openPostgres(ctx, dsn)
	} else {
		err = db.openSQLite(ctx, dsn, o.busy)
	}
	if err != nil {
		return nil, err
	}
	if err := db.migrate(ctx); err != nil {
		db.sql.Close()
		return nil, err
	}
	if o.ledgerSync > 0 && db.dialect == SQLite {
		if err := db.openLazyLedger(ctx, db.where, o.busy, o.ledgerSync); err != nil {
			db.sql.Close()
			return nil, err
		}
	}
	return db, nil
}

func (db *DB) openPostgres(ctx context.Context, dsn string) error {
	db.dialect = Postgres
	db.where = redact(dsn)
	s, err := sql.Open("pgx", dsn)
	if err != nil {
		return fmt.Errorf("state: open %s: %w", db.where, err)
	}
	if err := s.PingContext(ctx); err != nil {
		s.Close()
		return fmt.Errorf("state: connect %s: %w", db.where, err)
	}
	db.sql = s
	return nil
}

// syncDataOnly has SQLite commit with fdatasync(2) rather than fsync(2),
// as the SQLite of every Linux distribution does (modernc's is built
// without that check). fdatasync writes the data and the size, so a
// commit is as durable; it skips the file's timestamps, which on ext4 cost
// a journal commit with every fsync. With the ledger on PostgreSQL's disk
// (one machine: the benchmark's case) those journal commits delayed the
// server's own commits: under pgbench TPC-B the gate's tps fell ~5% behind
// what it reached with its state on a tmpfs (docs/benchmarks.md). The
// switch is process-wide; where the platform has no fdatasync SQLite
// keeps fsync.
func syncDataOnly() {
	dataOnly.Do(func() { sqlite.Fdatasync(true) })
}

var dataOnly sync.Once

// redact hides a password in a PostgreSQL URL so it never reaches a log.
func redact(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "postgres://(unparsable URL)"
	}
	return u.Redacted()
}

func (db *DB) openSQLite(ctx context.Context, dsn string, busy time.Duration) error {
	db.dialect = SQLite
	path := strings.TrimPrefix(dsn, "sqlite:")
	path = strings.TrimPrefix(path, "//") // sqlite:///abs/path
	switch {
	case path == "":
		return fmt.Errorf("%w: empty SQLite path", ErrInvalid)
	case path == ":memory:" || strings.HasPrefix(path, "file:"):
		// an in-memory database is one per connection in a pool: state
		// would silently vanish, so it is refused.
		return fmt.Errorf("%w: SQLite path %q: give a file path", ErrInvalid, path)
	case strings.ContainsAny(path, "?#"):
		return fmt.Errorf("%w: SQLite path %q contains ? or #", ErrInvalid, path)
	}
	db.where = path
	// Create the file ourselves so that it is 0600 from the first byte;
	// SQLite gives the -wal and -shm files the same mode.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("state: open %s: %w", path, err)
	}
	if fi, err := f.Stat(); err == nil && fi.Mode().Perm()&0o077 != 0 {
		db.log.Warn("state file readable by others", "path", path, "mode", fi.Mode().Perm().String())
	}
	f.Close()
	syncDataOnly()
	s, err := openSQLiteHandle(ctx, db, path, busy, "FULL")
	if err != nil {
		return err
	}
	db.sql = s
	return nil
}

// openSQLiteHandle opens a database/sql handle on the SQLite file at path
// with the given synchronous level and checks that the file reads.
func openSQLiteHandle(ctx context.Context, db *DB, path string, busy time.Duration, synchronous string) (*sql.DB, error) {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout("+strconv.FormatInt(busy.Milliseconds(), 10)+")")
	q.Add("_pragma", "foreign_keys(1)")
	q.Add("_pragma", "journal_mode(WAL)")
	// FULL: a consumed request or a ledger row must survive power loss;
	// NORMAL in WAL mode may lose the last commits (WithLedgerSync).
	q.Add("_pragma", "synchronous("+synchronous+")")
	// Every transaction takes the write lock at BEGIN: a deferred one that
	// reads and then writes can fail with SQLITE_BUSY at once, without
	// waiting, when another connection wrote in between.
	q.Set("_txlock", "immediate")
	s, err := sql.Open("sqlite", path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("state: open %s: %w", path, err)
	}
	// Connecting runs the pragmas. Switching a new file to WAL while
	// another process does the same can fail busy at once, without SQLite
	// waiting its busy timeout: try again, as for any busy error.
	if err := db.retry(ctx, func() error { return s.PingContext(ctx) }); err != nil {
		s.Close()
		return nil, db.wrap(err, "open %s", path)
	}
	// A read that touches the schema: a file whose header passes but whose
	// first page is damaged fails here rather than at the first query.
	var n int
	if err := db.retry(ctx, func() error { return s.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_schema").Scan(&n) }); err != nil {
		s.Close()
		return nil, db.wrap(err, "open %s", path)
	}
	return s, nil
}

// Close closes the database handle.
func (db *DB) Close() error {
	var lazyErr error
	if db.lazy != nil {
		lazyErr = db.lazy.close()
	}
	db.stmts.Range(func(_, st any) bool {
		st.(*sql.Stmt).Close()
		return true
	})
	if err := db.sql.Close(); err != nil {
		return errors.Join(lazyErr, fmt.Errorf("state: close %s: %w", db.where, err))
	}
	return lazyErr
}

// Dialect reports which engine holds the state.
func (db *DB) Dialect() Dialect { return db.dialect }

// wrap adds "state: <what>: " to err and, for a damaged SQLite file,
// ErrCorrupt so callers can tell it apart from a transient failure.
func (db *DB) wrap(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		// The sentinel first: its text begins "state:" already.
		case sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB:
			return fmt.Errorf("%w: %s (%s): %w", ErrCorrupt, what, db.where, err)
		case sqlite3.SQLITE_FULL:
			return fmt.Errorf("%w: %s (%s): %w", ErrFull, what, db.where, err)
		}
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "53100" { // disk_full
		return fmt.Errorf("%w: %s (%s): %w", ErrFull, what, db.where, err)
	}
	return fmt.Errorf("state: %s: %w", what, err)
}

// retryable reports an error after which the statement or transaction did
// not take effect and is safe to run again: a SQLite lock timeout, or a
// PostgreSQL serialization failure or deadlock (possible when the server's
// default isolation is above read committed).
func retryable(err error) bool {
	var se *sqlite.Error
	if errors.As(err, &se) {
		c := se.Code() & 0xff
		return c == sqlite3.SQLITE_BUSY || c == sqlite3.SQLITE_LOCKED
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code == "40001" || pe.Code == "40P01"
	}
	return false
}

// retry runs fn again while SQLite reports the file busy (or PostgreSQL a
// serialization failure), until ctx ends.
// The busy timeout already waits; this is the backstop for a writer that
// holds the lock longer, so a busy error never escapes while ctx lives.
func (db *DB) retry(ctx context.Context, fn func() error) error {
	delay := 5 * time.Millisecond
	for {
		err := fn()
		if err == nil || !retryable(err) {
			return err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return errors.Join(err, ctx.Err())
		case <-t.C:
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// tx runs fn in one transaction (BEGIN IMMEDIATE on SQLite), retried
// whole while retryable fails it.
func (db *DB) tx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	return db.retry(ctx, func() error {
		tx, err := db.sql.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if err := fn(tx); err != nil {
			tx.Rollback()
			return err
		}
		return tx.Commit()
	})
}

// prepared returns query prepared, once per DB (database/sql prepares it
// again on each connection it runs on, once).
func (db *DB) prepared(ctx context.Context, query string) (*sql.Stmt, error) {
	if st, ok := db.stmts.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := db.sql.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := db.stmts.LoadOrStore(query, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}

// exec runs one statement and returns the rows it affected.
func (db *DB) exec(ctx context.Context, query string, args ...any) (int64, error) {
	var n int64
	err := db.retry(ctx, func() error {
		res, err := db.sql.ExecContext(ctx, query, args...)
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	return n, err
}

// Times are stored as microseconds since the Unix epoch (BIGINT in both
// engines: the same logical schema, exact round trips, no time zone or
// driver formatting in between). The zero time is NULL.

func micros(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: t.UnixMicro(), Valid: true}
}

func fromMicros(n sql.NullInt64) time.Time {
	if !n.Valid {
		return time.Time{}
	}
	return time.UnixMicro(n.Int64).UTC()
}

// seqArg converts a uint64 key to the signed BIGINT both engines store.
func seqArg(what string, v uint64) (int64, error) {
	if v == 0 || v > math.MaxInt64 {
		return 0, fmt.Errorf("%w: %s %d out of range 1..2^63-1", ErrInvalid, what, v)
	}
	return int64(v), nil
}

func (db *DB) stamp(t time.Time) time.Time {
	if t.IsZero() {
		return db.now()
	}
	return t
}

// scanner is a *sql.Row or *sql.Rows.
type scanner interface{ Scan(dest ...any) error }

// queryAll runs query and scans every row, retried whole while SQLite is busy.
func queryAll[T any](ctx context.Context, db *DB, scan func(scanner) (T, error), query string, args ...any) ([]T, error) {
	var out []T
	err := db.retry(ctx, func() error {
		out = nil
		rows, err := db.sql.QueryContext(ctx, query, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			v, err := scan(rows)
			if err != nil {
				return err
			}
			out = append(out, v)
		}
		return rows.Err()
	})
	return out, err
}

// queryOne scans the single row of query; sql.ErrNoRows when there is none.
func queryOne[T any](ctx context.Context, db *DB, scan func(scanner) (T, error), query string, args ...any) (T, error) {
	var v T
	err := db.retry(ctx, func() error {
		var err error
		v, err = scan(db.sql.QueryRowContext(ctx, query, args...))
		return err
	})
	return v, err
}
