package state

import (
	"bytes"
	"crypto/rand"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dualkey/dualkey/internal/disktest"
)

// TestLedgerFullDisk fills the state's disk with ledger records: the
// batch that does not fit fails with ErrFull and a message that says so,
// every record acknowledged before it is intact, single appends fail the
// same way, and once the disk has room again appends go on from where
// they stopped, in a file that passes SQLite's integrity check. With the
// ledger's flush per batch and with ledger_sync (the gate's default).
func TestLedgerFullDisk(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []Option
	}{
		{"flush per batch", nil},
		{"ledger_sync", []Option{WithLedgerSync(time.Second)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := disktest.Tmpfs(t, "2m")
			dsn := "sqlite:" + filepath.Join(dir, "state.db")
			ctx := ctxT(t)
			db := open(t, dsn, tc.opts...)
			l := db.Ledger()

			// Random bytes: zstd leaves them as large as they are.
			want := map[uint64][]byte{}
			batch := func(first uint64) [][]byte {
				recs := make([][]byte, 8)
				for i := range recs {
					recs[i] = make([]byte, 4<<10)
					rand.Read(recs[i])
				}
				return recs
			}
			next := uint64(1)
			var full error
			for range 1000 { // 32 MiB: far beyond the disk
				recs := batch(next)
				ok, err := l.AppendBatch(ctx, next, recs)
				if err != nil {
					full = err
					break
				}
				if !ok {
					t.Fatalf("batch at %d: taken", next)
				}
				for i, r := range recs {
					want[next+uint64(i)] = r
				}
				next += uint64(len(recs))
			}
			if full == nil {
				t.Fatal("2 MiB disk never filled")
			}
			if len(want) == 0 {
				t.Fatal("the first batch failed: the test shows nothing about records kept")
			}
			if !errors.Is(full, ErrFull) || !strings.Contains(full.Error(), "full") || !strings.Contains(full.Error(), dir) {
				t.Errorf("full disk: %v; want ErrFull naming %s", full, dir)
			}
			one := make([]byte, 4<<10)
			rand.Read(one)
			if _, err := l.Append(ctx, next, one); !errors.Is(err, ErrFull) {
				t.Errorf("single append on the full disk: %v, want ErrFull", err)
			}

			check := func(db *DB, n int) {
				t.Helper()
				got := 0
				if err := db.Ledger().Read(ctx, 1, func(seq uint64, rec []byte) error {
					if w, ok := want[seq]; !ok || !bytes.Equal(w, rec) {
						t.Errorf("record %d: %d bytes, not the %d acknowledged", seq, len(rec), len(w))
					}
					got++
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				if got != n {
					t.Errorf("%d records, want %d", got, n)
				}
			}
			check(db, len(want))

			disktest.Resize(t, dir, "8m")
			recs := batch(next)
			if ok, err := l.AppendBatch(ctx, next, recs); !ok || err != nil {
				t.Fatalf("after the disk has room: %v, %v", ok, err)
			}
			for i, r := range recs {
				want[next+uint64(i)] = r
			}
			if err := l.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			check(db, len(want))
			var integrity string
			if err := db.sql.QueryRowContext(ctx, "PRAGMA integrity_check").Scan(&integrity); err != nil || integrity != "ok" {
				t.Errorf("integrity_check: %q, %v", integrity, err)
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			check(open(t, dsn), len(want))
		})
	}
}

// TestWrapFull: PostgreSQL's disk_full (53100) is ErrFull too, naming the
// store; other server errors are not.
func TestWrapFull(t *testing.T) {
	db := &DB{where: "postgres://state@db.example/dualkey"}
	for _, tc := range []struct {
		code string
		full bool
	}{
		{"53100", true},
		{"53200", false}, // out of memory
		{"42501", false},
	} {
		err := db.wrap(&pgconn.PgError{Code: tc.code, Message: "could not extend file"}, "ledger append %d", 7)
		if errors.Is(err, ErrFull) != tc.full {
			t.Errorf("%s: %v; ErrFull = %v, want %v", tc.code, err, errors.Is(err, ErrFull), tc.full)
		}
		if tc.full && !strings.Contains(err.Error(), db.where) {
			t.Errorf("%s: %v does not name the store", tc.code, err)
		}
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), "ledger append 7") {
			t.Errorf("%s: %v lost the server's error or the context", tc.code, err)
		}
	}
}
