package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
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
	if err := checkRec(seq, rec); err != nil {
		return false, err
	}
	codec, stored := encodeRec(rec)
	n, err := l.db.exec(ctx, "INSERT INTO ledger (seq, codec, rec) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", s, codec, stored)
	if err != nil {
		return false, l.db.wrap(err, "ledger append %d", seq)
	}
	return n == 1, nil
}

// AppendBatch stores recs as records first, first+1, ... in one
// transaction (one commit, one fsync, or none with WithLedgerSync), all or
// none: it returns false (and no error) when any of those seqs exists
// already.
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
	codecs, stored := make([]ledgerCodec, len(recs)), make([][]byte, len(recs))
	for i, rec := range recs {
		if err := checkRec(first+uint64(i), rec); err != nil {
			return false, err
		}
		codecs[i], stored[i] = encodeRec(rec)
	}
	db, err := l.batchDB()
	if err != nil {
		return false, l.db.wrap(err, "ledger append %d-%d", first, first+uint64(len(recs))-1)
	}
	err = db.tx(ctx, func(tx *sql.Tx) error {
		// Many rows per INSERT: one statement per record cost the gate a
		// quarter of its ledger time under pgbench TPC-B (the driver's
		// work per call, not SQLite's per row). Prepared: parsing the
		// INSERT of 128 rows anew for each batch was a fifth of the rest.
		for off := 0; off < len(recs); off += ledgerInsertRows {
			chunk := stored[off:min(off+ledgerInsertRows, len(recs))]
			args := make([]any, 0, 3*len(chunk))
			for i, rec := range chunk {
				args = append(args, s+int64(off+i), codecs[off+i], rec)
			}
			st, err := db.prepared(ctx, ledgerInsertSQL(db.dialect, len(chunk)))
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
	if db != l.db && err == nil {
		l.db.lazy.dirty.Store(true) // after the commit: a flush from now on covers it
	}
	if errors.Is(err, errLedgerTaken) {
		return false, nil
	}
	if err != nil {
		return false, l.db.wrap(err, "ledger append %d-%d", first, first+uint64(len(recs))-1)
	}
	return true, nil
}

// ledgerInsertRows bounds the rows of one INSERT: 3 parameters each, far
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
	b.WriteString("INSERT INTO ledger (seq, codec, rec) VALUES ")
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		if d == Postgres {
			fmt.Fprintf(&b, "($%d, $%d, $%d)", 3*i+1, 3*i+2, 3*i+3)
		} else {
			b.WriteString("(?, ?, ?)")
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
	seq   uint64
	codec ledgerCodec
	rec   []byte // as stored
}

func scanLedgerRow(sc scanner) (ledgerRow, error) {
	var r ledgerRow
	var s int64
	if err := sc.Scan(&s, &r.codec, &r.rec); err != nil {
		return ledgerRow{}, err
	}
	r.seq = uint64(s)
	return r, nil
}

// ledgerCodec says how a row's rec is stored.
type ledgerCodec int16

const (
	codecPlain ledgerCodec = 0 // the record's bytes; every row before migration 3
	codecZstd  ledgerCodec = 1 // one zstd frame of them, with its checksum
)

// maxLedgerRecord bounds one record, so that a damaged or hostile row
// cannot make a reader allocate without bound. internal/ledger's own
// limit (1 MiB) is lower.
const maxLedgerRecord = 16 << 20

// ledgerCompressMin is the smallest record compressed. The statement
// records that fill a busy ledger are many KiB; below 1 KiB (a session
// opening, a decision) zstd gains little, and the row stays plain JSON
// for anyone reading the table with sqlite3 or psql.
const ledgerCompressMin = 1024

func checkRec(seq uint64, rec []byte) error {
	switch {
	case len(rec) == 0:
		return fmt.Errorf("%w: ledger record %d is empty", ErrInvalid, seq)
	case len(rec) > maxLedgerRecord:
		return fmt.Errorf("%w: ledger record %d is %d bytes, limit %d", ErrInvalid, seq, len(rec), maxLedgerRecord)
	}
	return nil
}

// encodeRec returns how to store rec: compressed when that is smaller.
// The gate's statement records are most of a ledger: ~900 bytes of JSON
// per pgbench TPC-B transaction, much of it the same statements with
// other literals, which zstd shrinks several times over. That is disk
// the ledger does not fill, and bytes the store does not write (SQLite
// writes each twice, WAL then table) on a disk the database may share.
func encodeRec(rec []byte) (ledgerCodec, []byte) {
	if len(rec) < ledgerCompressMin {
		return codecPlain, rec
	}
	z := ledgerEncoder().EncodeAll(rec, make([]byte, 0, len(rec)/2))
	if len(z) >= len(rec) {
		return codecPlain, rec
	}
	return codecZstd, z
}

// decode returns the record row holds. A row that does not decode (a
// flipped byte fails zstd's checksum; a codec this binary does not know)
// is logged and handed on as stored, as garbage written into a plain row
// would be: internal/ledger finds it malformed (a record is JSON, a zstd
// frame is not), and its verify reports it at its seq and goes on, where
// an error here would stop the whole walk at the first damaged row.
func (l *LedgerStore) decode(r ledgerRow) []byte {
	rec, err := decodeRec(r)
	if err != nil {
		l.db.log.Error("state: a ledger row does not decode; handed on as stored", "seq", r.seq, "err", err)
		return r.rec
	}
	return rec
}

func decodeRec(r ledgerRow) ([]byte, error) {
	switch r.codec {
	case codecPlain:
		return r.rec, nil
	case codecZstd:
		rec, err := ledgerDecoder().DecodeAll(r.rec, nil)
		if err != nil {
			return nil, fmt.Errorf("zstd, %d bytes: %w", len(r.rec), err)
		}
		return rec, nil
	}
	return nil, fmt.Errorf("codec %d, which this binary does not know", r.codec)
}

// The codecs are shared: EncodeAll and DecodeAll may run concurrently.
var (
	ledgerEncoder = sync.OnceValue(func() *zstd.Encoder {
		// SpeedFastest: the gate's recorder compresses on its one
		// goroutine (BenchmarkLedgerCodec).
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithLowerEncoderMem(true))
		if err != nil {
			panic(err) // fixed options: a bug
		}
		return e
	})
	ledgerDecoder = sync.OnceValue(func() *zstd.Decoder {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(maxLedgerRecord))
		if err != nil {
			panic(err)
		}
		return d
	})
)

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
		rows, err := queryAll(ctx, l.db, scanLedgerRow, "SELECT seq, codec, rec FROM ledger WHERE seq >= $1 ORDER BY seq LIMIT $2", next, ledgerPage)
		if err != nil {
			return l.db.wrap(err, "ledger read from %d", next)
		}
		for _, r := range rows {
			if err := fn(r.seq, l.decode(r)); err != nil {
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
	rows, err := queryAll(ctx, l.db, scanLedgerRow, "SELECT seq, codec, rec FROM ledger ORDER BY seq DESC LIMIT 1")
	if err != nil {
		return 0, nil, l.db.wrap(err, "ledger last")
	}
	if len(rows) == 0 {
		return 0, nil, nil
	}
	return rows[0].seq, l.decode(rows[0]), nil
}
