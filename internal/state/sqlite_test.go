package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"modernc.org/sqlite"
)

func TestSQLite(t *testing.T) {
	runSuite(t, func(t *testing.T) string {
		return "sqlite:" + filepath.Join(t.TempDir(), "state.db")
	})
}

func TestSQLiteOpen(t *testing.T) {
	dir := t.TempDir()
	ctx := ctxT(t)
	for _, tc := range []struct{ name, dsn string }{
		{"plain path", filepath.Join(dir, "a.db")},
		{"sqlite: prefix", "sqlite:" + filepath.Join(dir, "b.db")},
		{"sqlite:// prefix", "sqlite://" + filepath.Join(dir, "c.db")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := open(t, tc.dsn)
			if db.Dialect() != SQLite {
				t.Errorf("Dialect = %s", db.Dialect())
			}
			var mode string
			if err := db.sql.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
				t.Errorf("journal_mode = %q, %v", mode, err)
			}
			var fk, busy int
			if err := db.sql.QueryRowContext(ctx, "PRAGMA foreign_keys").Scan(&fk); err != nil || fk != 1 {
				t.Errorf("foreign_keys = %d, %v", fk, err)
			}
			if err := db.sql.QueryRowContext(ctx, "PRAGMA busy_timeout").Scan(&busy); err != nil || busy != int(DefaultBusyTimeout.Milliseconds()) {
				t.Errorf("busy_timeout = %d, %v", busy, err)
			}
			if runtime.GOOS == "linux" && !sqlite.FdatasyncEnabled() {
				t.Error("SQLite commits with fsync, not fdatasync (syncDataOnly)")
			}
			if err := db.AddUser(ctx, User{Name: "ann"}); err != nil {
				t.Fatal(err)
			}
			// the files hold SCRAM verifiers and the audit trail: owner
			// only, the WAL too (checked while open: Close removes it)
			path := strings.TrimPrefix(strings.TrimPrefix(tc.dsn, "sqlite:"), "//")
			for _, f := range []string{path, path + "-wal"} {
				fi, err := os.Stat(f)
				if err != nil {
					t.Fatal(err)
				}
				if fi.Mode().Perm() != 0o600 {
					t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
				}
			}
		})
	}
	for _, dsn := range []string{"", "sqlite:", ":memory:", "sqlite::memory:", "file:x.db", filepath.Join(dir, "x.db?mode=ro")} {
		if _, err := Open(ctx, dsn); !errors.Is(err, ErrInvalid) {
			t.Errorf("Open(%q) = %v, want ErrInvalid", dsn, err)
		}
	}
	if _, err := Open(ctx, filepath.Join(dir, "missing", "x.db")); err == nil || !strings.HasPrefix(err.Error(), "state: ") {
		t.Errorf("Open in a missing directory = %v", err)
	}
}

// A damaged file gives ErrCorrupt with the path, not a panic or a
// cryptic driver message.
func TestSQLiteCorrupt(t *testing.T) {
	ctx := ctxT(t)
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.db")
	junk := []byte(strings.Repeat("this is not a database ", 400))
	if err := os.WriteFile(garbage, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(ctx, garbage)
	wantErr(t, "garbage", err, ErrCorrupt)
	if !strings.Contains(err.Error(), garbage) {
		t.Errorf("error %q does not name the file", err)
	}

	// a real database whose first page is trashed after the header
	damaged := filepath.Join(dir, "damaged.db")
	db := open(t, damaged)
	if err := db.AddUser(ctx, User{Name: "ann"}); err != nil {
		t.Fatal(err)
	}
	db.Close()
	b, err := os.ReadFile(damaged)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(damaged + "-wal")
	os.Remove(damaged + "-shm")
	for i := 100; i < len(b) && i < 4096; i++ {
		b[i] = 0xa5
	}
	if err := os.WriteFile(damaged, b, 0o600); err != nil {
		t.Fatal(err)
	}
	db2, err := Open(ctx, damaged)
	if err == nil {
		// the header survived; the first real query must say corrupt
		_, err = db2.ListUsers(ctx)
		db2.Close()
	}
	wantErr(t, "damaged", err, ErrCorrupt)
}

// Two handles on one file (two processes) writing at once, with a busy
// timeout so short that SQLite gives up almost at once: the retry loop
// must absorb every SQLITE_BUSY, so no "database is locked" escapes.
func TestSQLiteConcurrentWriters(t *testing.T) {
	ctx := ctxT(t)
	path := filepath.Join(t.TempDir(), "state.db")
	for round, busy := range []time.Duration{DefaultBusyTimeout, time.Millisecond} {
		t.Run(fmt.Sprint("busy=", busy), func(t *testing.T) {
			a, b := open(t, path, WithBusyTimeout(busy)), open(t, path, WithBusyTimeout(busy))
			const writers, ops = 6, 25
			var wg sync.WaitGroup
			for g := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					db := []*DB{a, b}[g%2]
					for i := range ops {
						id := fmt.Sprintf("%02x%02x%02x", g, i, round)
						r := Request{ID: id, Doc: []byte(id), Requester: fmt.Sprint("u", g), Action: "sql"}
						steps := []func() error{
							func() error { return db.AddUser(ctx, User{Name: fmt.Sprintf("%s-%d-%d", busy, g, i)}) },
							func() error { return db.PutRequest(ctx, r) },
							func() error {
								return db.AddApproval(ctx, Approval{RequestID: id, Approver: "x", Decision: "approve", Doc: []byte("s")})
							},
							func() error { return db.SetRequestStatus(ctx, id, StatusOpen, StatusApproved) },
							func() error { return db.Consume(ctx, id, "gate", time.Now()) },
							func() error { _, err := db.ListRequests(ctx, RequestFilter{Limit: 10}); return err },
						}
						for _, step := range steps {
							if err := step(); err != nil {
								t.Errorf("writer %d op %d: %v", g, i, err)
								return
							}
						}
					}
				}()
			}
			wg.Wait()
			rs, err := a.ListRequests(ctx, RequestFilter{Status: StatusConsumed})
			if err != nil {
				t.Fatal(err)
			}
			if busy == time.Millisecond && len(rs) != 2*writers*ops || busy != time.Millisecond && len(rs) != writers*ops {
				t.Errorf("%d consumed requests", len(rs))
			}
		})
	}
}

// BenchmarkLedgerAppendBatch stores records in batches as a busy gate's
// recorder does: statement-sized records 512 at a time (one record per
// statement, as before records were grouped), and the ~2 KiB "statements"
// records of 8 sessions at a time (pgbench TPC-B, 8 clients, one batch per
// recordLinger). ns/op is per record.
func BenchmarkLedgerAppendBatch(b *testing.B) {
	stmt := []byte(`{"seq":0,"time":"2026-12-01T23:22:42.123456789Z","kind":"statement","actor":"bench","data":{"class":"write","db":"bench","decision":"allow","rows":1,"rule":"pgbench reads and writes","session":"7f3a9c2e5b1d4e6f","sql":"UPDATE pgbench_accounts SET abalance = abalance + -1234 WHERE aid = 56789;"},"prev":"` + strings.Repeat("ab", 32) + `","hash":"` + strings.Repeat("cd", 32) + `"}`)
	group := []byte(strings.Repeat(`{"t":3,"us":1234,"rows":1},`, 75))
	for _, bc := range []struct {
		name  string
		rec   []byte
		batch int
		opts  []Option
	}{
		{"statements-512", stmt, 512, nil},
		{"groups-8", group, 8, nil},
		// The gate's default: no flush per batch, so this is the CPU.
		{"groups-8-ledger_sync", group, 8, []Option{WithLedgerSync(time.Second)}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			ctx := context.Background()
			db, err := Open(ctx, "sqlite:"+filepath.Join(b.TempDir(), "state.db"), bc.opts...)
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			l := db.Ledger()
			recs := make([][]byte, bc.batch)
			for i := range recs {
				recs[i] = bc.rec
			}
			b.SetBytes(int64(len(bc.rec)))
			b.ResetTimer()
			seq := uint64(1)
			for n := 0; n < b.N; n += bc.batch {
				k := min(bc.batch, b.N-n)
				if ok, err := l.AppendBatch(ctx, seq, recs[:k]); err != nil || !ok {
					b.Fatalf("AppendBatch at %d: %v, %v", seq, ok, err)
				}
				seq += uint64(k)
			}
		})
	}
}
