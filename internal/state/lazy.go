package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// WithLedgerSync has [LedgerStore.AppendBatch] on SQLite commit without
// waiting for the disk, and makes those commits durable at most every
// d: a gate records every statement it runs, in batches, and flushing the
// disk for each batch (~20 a second under load) slowed the PostgreSQL
// it guards whenever the two shared a disk, by 2-5% under pgbench TPC-B
// (docs/benchmarks.md). Such a commit is in the operating system's
// hands at once, so a killed process loses none of it; only a crash of the
// machine (power, kernel) can lose up to d of batched records, the way a
// PostgreSQL with synchronous_commit off loses its last commits. Every
// other write (single records, requests, approvals, users) still commits
// durably, and makes every batch before it durable too, since SQLite's
// WAL is one file written in order. [LedgerStore.Sync] flushes at once
// (the ledger's mirror does before it copies records out). 0 (the
// default) commits every batch durably. PostgreSQL ignores it: its
// commits share the server's group commit.
func WithLedgerSync(d time.Duration) Option { return func(o *options) { o.ledgerSync = d } }

// lazyLedger is the second SQLite handle batches commit through
// (synchronous=NORMAL), and the flusher that makes them durable.
type lazyLedger struct {
	db    *DB    // the NORMAL handle
	wal   string // SQLite's WAL file, the one file those commits wrote
	log   interface{ Error(string, ...any) }
	dirty atomic.Bool // committed since the last flush
	mu    sync.Mutex  // one flush at a time: Sync waits for one under way
	err   error       // the last flush's failure (mu)
	syncs atomic.Int64
	stop  chan struct{}
	done  chan struct{}
	once  sync.Once // close
	cerr  error
}

func (db *DB) openLazyLedger(ctx context.Context, path string, busy, every time.Duration) error {
	s, err := openSQLiteHandle(ctx, db, path, busy, "NORMAL")
	if err != nil {
		return err
	}
	z := &lazyLedger{
		db:   &DB{sql: s, dialect: SQLite, where: db.where, log: db.log, now: db.now},
		wal:  path + "-wal",
		log:  db.log,
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	db.lazy = z
	go z.run(every)
	return nil
}

func (z *lazyLedger) run(every time.Duration) {
	defer close(z.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-z.stop:
			return
		case <-t.C:
			if err := z.flush(); err != nil {
				z.log.Error("state: ledger records not yet on disk", "err", err)
			}
		}
	}
}

// flush makes every batch committed before it durable.
func (z *lazyLedger) flush() error {
	z.mu.Lock()
	defer z.mu.Unlock()
	if !z.dirty.Swap(false) {
		return z.err
	}
	err := syncFile(z.wal)
	if err != nil {
		z.dirty.Store(true)
		z.err = fmt.Errorf("state: flush %s: %w", z.wal, err)
		return z.err
	}
	z.err = nil
	z.syncs.Add(1)
	return nil
}

// failed is the last flush's failure, tried again first: while the disk
// refuses to flush, batches are refused too, as a durable commit would
// be, so that the gate stops running statements it cannot record.
func (z *lazyLedger) failed() error {
	z.mu.Lock()
	failed := z.err != nil
	z.mu.Unlock()
	if !failed {
		return nil
	}
	return z.flush()
}

// close flushes what is left and closes the handle, once.
func (z *lazyLedger) close() error {
	z.once.Do(func() {
		close(z.stop)
		<-z.done
		z.cerr = errors.Join(z.flush(), z.db.Close())
	})
	return z.cerr
}

// syncFile flushes path's data to its disk; a file that does not exist
// has nothing to flush (SQLite removes its WAL once it has checkpointed
// it, durably, into the database file).
func syncFile(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	err = syncData(f)
	return errors.Join(err, f.Close())
}

// Sync makes every record appended so far durable; with no
// [WithLedgerSync] they already are.
func (l *LedgerStore) Sync(ctx context.Context) error {
	if l.db.lazy == nil {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return l.db.lazy.flush()
}

// batchDB is the handle AppendBatch commits through.
func (l *LedgerStore) batchDB() (*DB, error) {
	if l.db.lazy == nil {
		return l.db, nil
	}
	if err := l.db.lazy.failed(); err != nil {
		return nil, err
	}
	return l.db.lazy.db, nil
}
