package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
)

// LedgerStore keeps the audit ledger's records by sequence number. It
// knows nothing of their hash chain: internal/ledger builds and verifies
// that, and uses LedgerStore through its own interface.
type LedgerStore struct{ db *DB }

// Ledger returns the store of ledger records on db.
func (db *DB) Ledger() *LedgerStore { return &LedgerStore{db: db} }

// Append stores rec as record seq if no record seq exists yet; it returns
// false (and no error) when seq already exists: another writer won the
// race. The primary key decides, so this holds across processes and
// gateways sharing one database. seq counts from 1.
func (l *LedgerStore) Append(ctx context.Context, seq uint64, rec []byte) (bool, error) {
	s, err := seqArg("ledger seq", seq)
	if err != nil {
		return false, err
	}
	if len(rec) == 0 {
		return false, fmt.Errorf("%w: ledger record %d is empty", ErrInvalid, seq)
	}
	n, err := l.db.exec(ctx, "INSERT INTO ledger (seq, rec) VALUES ($1, $2) ON CONFLICT DO NOTHING", s, rec)
	if err != nil {
		return false, l.db.wrap(err, "ledger append %d", seq)
	}
	return n == 1, nil
}

// AppendBatch stores recs as records first, first+1, ... in one
// transaction (one commit, one fsync), all or none: it returns false (and
// no error) when any of those seqs exists already.
func (l *LedgerStore) AppendBatch(ctx context.Context, first uint64, recs [][]byte) (bool, error) {
	if len(recs) == 0 {
		return true, nil
	}
	if _, err := seqArg("ledger seq", first+uint64(len(recs))-1); err != nil {
		return false, err
	}
	s, err := seqArg("ledger seq", first)
	if err != nil {
		return false, err
	}
	for i, rec := range recs {
		if len(rec) == 0 {
			return false, fmt.Errorf("%w: ledger record %d is empty", ErrInvalid, first+uint64(i))
		}
	}
	err = l.db.tx(ctx, func(tx *sql.Tx) error {
		// Many rows per INSERT: one statement per record cost the gate a
		// quarter of its ledger time under pgbench TPC-B (the driver's
		// work per call, not SQLite's per row). Prepared: parsing the
		// INSERT of 128 rows anew for each batch was a fifth of the rest.
		for off := 0; off < len(recs); off += ledgerInsertRows {
			chunk := recs[off:min(off+ledgerInsertRows, len(recs))]
			args := make([]any, 0, 2*len(chunk))
			for i, rec := range chunk {
				args = append(args, s+int64(off+i), rec)
			}
			st, err := l.db.prepared(ctx, ledgerInsertSQL(l.db.dialect, len(chunk)))
			if err != nil {
				return err
			}
			res, err := tx.StmtContext(ctx, st).ExecContext(ctx, args...)
			if err != nil {
				return err
			}
			if n, err := res.RowsAffected(); err != nil {
				return err
			} else if n != int64(len(chunk)) {
				return errLedgerTaken
			}
		}
		return nil
	})
	if errors.Is(err, errLedgerTaken) {
		return false, nil
	}
	if err != nil {
		return false, l.db.wrap(err, "ledger append %d-%d", first, first+uint64(len(recs))-1)
	}
	return true, nil
}

// ledgerInsertRows bounds the rows of one INSERT: 2 parameters each, far
// below SQLite's and PostgreSQL's limits on parameters.
const ledgerInsertRows = 128

// ledgerInsertSQL is the INSERT of n records, built once per dialect and
// n. SQLite gets anonymous parameters: it looks each $N up by name, which
// with hundreds per statement showed in the gate's profile.
func ledgerInsertSQL(d Dialect, n int) string {
	key := ledgerInsertKey{d, n}
	if q, ok := ledgerInserts.Load(key); ok {
		return q.(string)
	}
	var b strings.Builder
	b.WriteString("INSERT INTO ledger (seq, rec) VALUES ")
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		if d == Postgres {
			fmt.Fprintf(&b, "($%d, $%d)", 2*i+1, 2*i+2)
		} else {
			b.WriteString("(?, ?)")
		}
	}
	b.WriteString(" ON CONFLICT DO NOTHING")
	q, _ := ledgerInserts.LoadOrStore(key, b.String())
	return q.(string)
}

type ledgerInsertKey struct {
	d Dialect
	n int
}

var ledgerInserts sync.Map // ledgerInsertKey -> SQL

// errLedgerTaken rolls back a batch one of whose seqs exists.
var errLedgerTaken = errors.New("state: ledger seq taken")

// ledgerPage is how many records Read fetches per query. Read holds no
// query open while fn runs (fn may Append, and SQLite would otherwise keep
// a read snapshot alive), and a page of 512 small records costs one round
// trip instead of 512.
const ledgerPage = 512

type ledgerRow struct {
	seq uint64
	rec []byte
}

func scanLedgerRow(sc scanner) (ledgerRow, error) {
	var r ledgerRow
	var s int64
	if err := sc.Scan(&s, &r.rec); err != nil {
		return ledgerRow{}, err
	}
	r.seq = uint64(s)
	return r, nil
}

// Read calls fn for every record from seq from on, in seq order. It stops
// at fn's first error and returns it unwrapped, and stops when ctx ends.
// Records appended while Read runs may or may not be seen.
func (l *LedgerStore) Read(ctx context.Context, from uint64, fn func(seq uint64, rec []byte) error) error {
	if from > math.MaxInt64 {
		return nil
	}
	next := int64(from)
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("state: ledger read from %d: %w", next, err)
		}
		rows, err := queryAll(ctx, l.db, scanLedgerRow, "SELECT seq, rec FROM ledger WHERE seq >= $1 ORDER BY seq LIMIT $2", next, ledgerPage)
		if err != nil {
			return l.db.wrap(err, "ledger read from %d", next)
		}
		for _, r := range rows {
			if err := fn(r.seq, r.rec); err != nil {
				return err
			}
		}
		if len(rows) < ledgerPage {
			return nil
		}
		next = int64(rows[len(rows)-1].seq) + 1
	}
}

// Last returns the highest seq and its record; 0 and nil when empty.
func (l *LedgerStore) Last(ctx context.Context) (uint64, []byte, error) {
	rows, err := queryAll(ctx, l.db, scanLedgerRow, "SELECT seq, rec FROM ledger ORDER BY seq DESC LIMIT 1")
	if err != nil {
		return 0, nil, l.db.wrap(err, "ledger last")
	}
	if len(rows) == 0 {
		return 0, nil, nil
	}
	return rows[0].seq, rows[0].rec, nil
}
