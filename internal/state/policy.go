package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Policy is one version of the approver set and rules.
type Policy struct {
	Serial uint64
	// Doc is the signed policy document, opaque here (internal/quorum/cert).
	Doc     []byte
	Created time.Time
}

func scanPolicy(sc scanner) (Policy, error) {
	var p Policy
	var serial int64
	var created sql.NullInt64
	if err := sc.Scan(&serial, &p.Doc, &created); err != nil {
		return Policy{}, err
	}
	p.Serial = uint64(serial)
	p.Created = fromMicros(created)
	return p, nil
}

// CurrentPolicy returns the highest serial and its document, or
// ErrNotFound before the first PutPolicy.
func (db *DB) CurrentPolicy(ctx context.Context) (serial uint64, doc []byte, err error) {
	p, err := queryOne(ctx, db, scanPolicy, "SELECT serial, doc, created FROM policies ORDER BY serial DESC LIMIT 1")
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil, fmt.Errorf("state: current policy: %w", ErrNotFound)
	}
	if err != nil {
		return 0, nil, db.wrap(err, "current policy")
	}
	return p.Serial, p.Doc, nil
}

// PutPolicy stores doc as version serial. It is a compare-and-set: it
// succeeds only when serial is the current serial + 1 (1 for the first
// policy) and fails with ErrConflict otherwise, so of two changes prepared
// against the same current policy exactly one is stored. Earlier versions
// are kept (ListPolicies).
func (db *DB) PutPolicy(ctx context.Context, serial uint64, doc []byte) error {
	s, err := seqArg("policy serial", serial)
	if err != nil {
		return err
	}
	if len(doc) == 0 {
		return fmt.Errorf("%w: empty policy document", ErrInvalid)
	}
	// Read the current serial and insert in one transaction; the primary
	// key turns a concurrent insert of the same serial into "no row"
	// (PostgreSQL waits for the other transaction, SQLite holds the write
	// lock from BEGIN), never into a gap or a duplicate.
	var n int64
	err = db.tx(ctx, func(tx *sql.Tx) error {
		n = 0
		var cur int64
		if err := tx.QueryRowContext(ctx, "SELECT COALESCE(MAX(serial), 0) FROM policies").Scan(&cur); err != nil {
			return err
		}
		if cur != s-1 {
			return nil
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO policies (serial, doc, created) VALUES ($1, $2, $3)
			ON CONFLICT DO NOTHING`, s, doc, micros(db.now()))
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	if err != nil {
		return db.wrap(err, "put policy %d", serial)
	}
	if n == 0 {
		return fmt.Errorf("state: put policy %d: not current+1: %w", serial, ErrConflict)
	}
	return nil
}

// ListPolicies returns every stored policy version, oldest first.
func (db *DB) ListPolicies(ctx context.Context) ([]Policy, error) {
	ps, err := queryAll(ctx, db, scanPolicy, "SELECT serial, doc, created FROM policies ORDER BY serial")
	if err != nil {
		return nil, db.wrap(err, "list policies")
	}
	return ps, nil
}
