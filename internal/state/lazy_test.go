package state

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// lazyRecs are records 1..n with content that names them.
func lazyRecs(from, n int) [][]byte {
	recs := make([][]byte, n)
	for i := range recs {
		recs[i] = fmt.Appendf(nil, "record %d", from+i)
	}
	return recs
}

// readAll returns every record of the ledger on dsn, by seq, through a
// handle of its own.
func readAll(t *testing.T, dsn string) map[uint64]string {
	t.Helper()
	db := open(t, dsn)
	got := map[uint64]string{}
	if err := db.Ledger().Read(ctxT(t), 1, func(seq uint64, rec []byte) error {
		got[seq] = string(rec)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

func TestLedgerSync(t *testing.T) {
	ctx := ctxT(t)
	dsn := "sqlite:" + filepath.Join(t.TempDir(), "state.db")
	// An hour: only Sync and Close flush here.
	db := open(t, dsn, WithLedgerSync(time.Hour))
	l := db.Ledger()
	if db.lazy == nil {
		t.Fatal("WithLedgerSync on SQLite opened no second handle")
	}
	var sync string
	if err := db.lazy.db.sql.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&sync); err != nil || sync != "1" {
		t.Errorf("batch handle: synchronous = %q, %v; want 1 (NORMAL)", sync, err)
	}
	if err := db.sql.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&sync); err != nil || sync != "2" {
		t.Errorf("main handle: synchronous = %q, %v; want 2 (FULL)", sync, err)
	}

	if ok, err := l.AppendBatch(ctx, 1, lazyRecs(1, 10)); !ok || err != nil {
		t.Fatalf("AppendBatch = %v, %v", ok, err)
	}
	// Committed: every other handle sees it at once, flushed or not.
	if got := readAll(t, dsn); len(got) != 10 || got[10] != "record 10" {
		t.Fatalf("another handle reads %d records (%q), want 10", len(got), got[10])
	}
	if n := db.lazy.syncs.Load(); n != 0 {
		t.Fatalf("%d flushes before Sync, want 0", n)
	}
	if err := l.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.Sync(ctx); err != nil { // nothing new: no second flush
		t.Fatal(err)
	}
	if n := db.lazy.syncs.Load(); n != 1 {
		t.Fatalf("%d flushes after two Syncs of one batch, want 1", n)
	}
	// A batch that loses the race stays refused through the batch handle.
	if ok, err := l.AppendBatch(ctx, 10, lazyRecs(10, 2)); ok || err != nil {
		t.Fatalf("AppendBatch over seq 10 = %v, %v; want false, nil", ok, err)
	}
	// Single appends (requests, decisions) commit durably, on the main handle.
	if ok, err := l.Append(ctx, 11, []byte("record 11")); !ok || err != nil {
		t.Fatalf("Append = %v, %v", ok, err)
	}
	if ok, err := l.AppendBatch(ctx, 12, lazyRecs(12, 3)); !ok || err != nil {
		t.Fatalf("AppendBatch = %v, %v", ok, err)
	}
	lazy := db.lazy
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if n := lazy.syncs.Load(); n != 2 {
		t.Errorf("%d flushes after Close, want 2: Close flushes what is left", n)
	}
	if got := readAll(t, dsn); len(got) != 14 || got[14] != "record 14" || got[11] != "record 11" {
		t.Errorf("after Close %d records, want 14", len(got))
	}
}

// The flusher runs by itself, within the interval.
func TestLedgerSyncInterval(t *testing.T) {
	ctx := ctxT(t)
	db := open(t, "sqlite:"+filepath.Join(t.TempDir(), "state.db"), WithLedgerSync(10*time.Millisecond))
	if ok, err := db.Ledger().AppendBatch(ctx, 1, lazyRecs(1, 3)); !ok || err != nil {
		t.Fatalf("AppendBatch = %v, %v", ok, err)
	}
	deadline := time.Now().Add(time.Minute)
	for db.lazy.syncs.Load() == 0 || db.lazy.dirty.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the batch was not flushed within a minute")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A disk that cannot flush refuses batches, as a durable commit would fail,
// until it flushes again; nothing committed is lost meanwhile.
func TestLedgerSyncFails(t *testing.T) {
	ctx := ctxT(t)
	dsn := "sqlite:" + filepath.Join(t.TempDir(), "state.db")
	db := open(t, dsn, WithLedgerSync(time.Hour))
	l := db.Ledger()
	if ok, err := l.AppendBatch(ctx, 1, lazyRecs(1, 2)); !ok || err != nil {
		t.Fatalf("AppendBatch = %v, %v", ok, err)
	}
	wal := db.lazy.wal
	db.lazy.wal = os.DevNull // fdatasync(2) of a character device: EINVAL
	err := l.Sync(ctx)
	if err == nil || !strings.Contains(err.Error(), "state: flush") {
		t.Fatalf("Sync with a disk that cannot flush = %v", err)
	}
	if ok, err := l.AppendBatch(ctx, 3, lazyRecs(3, 2)); ok || err == nil || !strings.HasPrefix(err.Error(), "state: ledger append 3-4: ") {
		t.Fatalf("AppendBatch while flushing fails = %v, %v; want an error", ok, err)
	}
	db.lazy.wal = wal
	if ok, err := l.AppendBatch(ctx, 3, lazyRecs(3, 2)); !ok || err != nil {
		t.Fatalf("AppendBatch once the disk flushes again = %v, %v", ok, err)
	}
	if err := l.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, dsn); len(got) != 4 || got[4] != "record 4" {
		t.Errorf("%d records, want 4", len(got))
	}
}

// TestChildLazyLedger is the process TestLedgerSyncKilled kills.
func TestChildLazyLedger(t *testing.T) {
	dsn := os.Getenv("STATE_LAZY_CHILD_DSN")
	if dsn == "" {
		t.Skip("helper for TestLedgerSyncKilled")
	}
	ctx := context.Background()
	db, err := Open(ctx, dsn, WithLedgerSync(time.Hour))
	if err != nil {
		fmt.Printf("open error: %v\n", err)
		os.Exit(1)
	}
	for from := 1; from <= 100; from += 25 {
		if ok, err := db.Ledger().AppendBatch(ctx, uint64(from), lazyRecs(from, 25)); !ok || err != nil {
			fmt.Printf("append error: %v %v\n", ok, err)
			os.Exit(1)
		}
	}
	fmt.Printf("appended, %d flushes\n", db.lazy.syncs.Load())
	select {} // until killed
}

// A process killed outright loses no batch it committed, flushed or not:
// the commit wrote SQLite's WAL, which the kernel keeps.
func TestLedgerSyncKilled(t *testing.T) {
	dsn := "sqlite:" + filepath.Join(t.TempDir(), "state.db")
	c := exec.Command(os.Args[0], "-test.run=^TestChildLazyLedger$", "-test.count=1")
	c.Env = append(os.Environ(), "STATE_LAZY_CHILD_DSN="+dsn)
	out, err := c.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	c.Process.Kill()
	c.Wait()
	if err != nil || line != "appended, 0 flushes\n" {
		t.Fatalf("child said %q (%v)", line, err)
	}
	got := readAll(t, dsn)
	if len(got) != 100 {
		t.Fatalf("%d records after the kill, want 100", len(got))
	}
	for seq := uint64(1); seq <= 100; seq++ {
		if want := fmt.Sprintf("record %d", seq); got[seq] != want {
			t.Fatalf("record %d = %q, want %q", seq, got[seq], want)
		}
	}
}
