package pgwal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// TestStreamRealWAL streams a real server's WAL over the replication
// protocol into the vault while pgbench writes, acknowledging only what
// Flush returned, then compares every fully streamed segment with the
// server's own pg_wal file: the storage is byte-exact against PostgreSQL.
func TestStreamRealWAL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	pg := pgtest.Start(t, pgtest.Options{})
	env := repotest.New(t, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	conn, err := pgconn.Connect(ctx, pg.ReplicationURL())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pglogrepl.CreateReplicationSlot(ctx, conn, "pgwal_test", "",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.PhysicalReplication}); err != nil {
		t.Fatal(err)
	}
	// Whole segments only, as restore needs them: start at the segment
	// holding the current position, which the server still has.
	first := SegmentOf(LSN(sys.XLogPos), DefaultSegmentSize)
	start := SegmentStart(first, DefaultSegmentSize)
	tli := uint32(sys.Timeline)
	if err := pglogrepl.StartReplication(ctx, conn, "pgwal_test", pglogrepl.LSN(start),
		pglogrepl.StartReplicationOptions{Timeline: sys.Timeline, Mode: pglogrepl.PhysicalReplication}); err != nil {
		t.Fatal(err)
	}

	w := NewWriter(env.Repo, WriterOptions{})
	type result struct {
		durable LSN
		flushes []time.Duration
		err     error
	}
	target := make(chan LSN, 1) // stream until durable reaches it
	done := make(chan result, 1)
	go func() {
		res := result{durable: start}
		res.err = replicate(ctx, conn, w, tli, target, &res.durable, &res.flushes)
		done <- res
	}()

	// About 50 MB of WAL: pgbench's initial load, then a short run.
	pg.Pgbench("-i", "-s", "3", "-q", "postgres")
	pg.Pgbench("-T", "3", "-c", "2", "postgres")
	end, err := ParseLSN(pg.Query("postgres", "SELECT pg_current_wal_flush_lsn()::text"))
	if err != nil {
		t.Fatal(err)
	}
	target <- end
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.durable < end {
		t.Fatalf("durable %v, want at least %v", res.durable, end)
	}
	slices.Sort(res.flushes)
	n := len(res.flushes)
	t.Logf("streamed %v-%v (%.1f MiB) in %d flushes; flush latency p50 %v, p90 %v, max %v",
		start, res.durable, float64(res.durable-start)/(1<<20), n,
		res.flushes[n/2], res.flushes[n*9/10], res.flushes[n-1])

	// The slot was told only what is durable.
	if got := pg.Query("postgres", "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgwal_test'"); got == "" {
		t.Error("slot has no restart_lsn")
	}

	r := env.Reopen(t)
	c := load(t, r)
	if c.End(tli) != res.durable {
		t.Errorf("catalog End = %v, Flush said %v", c.End(tli), res.durable)
	}
	last := SegmentOf(res.durable, DefaultSegmentSize) // partial: not compared whole
	if last-first < 2 {
		t.Fatalf("only %d whole segments streamed", last-first)
	}
	for s := first; s < last; s++ {
		compareSegment(t, ctx, r, c, pg, tli, s)
	}
	// The partial last segment: equal up to where streaming stopped.
	name := SegmentName(tli, last, DefaultSegmentSize)
	_, err = Segment(ctx, r, c, tli, last, DefaultSegmentSize)
	if want := fmt.Sprintf("WAL %v-", res.durable); !errors.Is(err, ErrIncomplete) || !bytes.Contains([]byte(err.Error()), []byte(want)) {
		t.Errorf("partial segment %s: %v, want ErrIncomplete from %v", name, err, res.durable)
	}
}

func compareSegment(t *testing.T, ctx context.Context, r *repo.Repository, c *Catalog, pg *pgtest.Server, tli uint32, segno uint64) {
	t.Helper()
	name := SegmentName(tli, segno, DefaultSegmentSize)
	got, err := Segment(ctx, r, c, tli, segno, DefaultSegmentSize)
	if err != nil {
		t.Fatalf("segment %s: %v", name, err)
	}
	want, err := os.ReadFile(filepath.Join(pg.Dir, "pg_wal", name))
	if err != nil {
		t.Fatalf("server's segment: %v", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("segment %s differs from pg_wal's at offset %d (LSN %v)", name, i, SegmentStart(segno, DefaultSegmentSize)+LSN(i))
	}
	t.Logf("segment %s: %d bytes equal to pg_wal/%s", name, len(got), name)
}

// replicate is a minimal agent loop: receive XLogData, Write, Flush every
// 200 ms or 4 MiB, acknowledge only what Flush returned.
func replicate(ctx context.Context, conn *pgconn.PgConn, w *Writer, tli uint32, target <-chan LSN, durable *LSN, flushes *[]time.Duration) error {
	var received LSN
	stop := LSN(1<<64 - 1)
	lastFlush := time.Now()
	flush := func() error {
		if w.Buffered() > 0 {
			t0 := time.Now()
			d, err := w.Flush(ctx)
			if err != nil {
				return err
			}
			*flushes = append(*flushes, time.Since(t0))
			*durable = d
		}
		lastFlush = time.Now()
		return pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
			WALWritePosition: pglogrepl.LSN(max(received, 1)),
			WALFlushPosition: pglogrepl.LSN(max(*durable, 1)),
			WALApplyPosition: pglogrepl.LSN(max(*durable, 1)),
		})
	}
	for {
		select {
		case l := <-target:
			stop = l
		default:
		}
		if *durable >= stop {
			return nil
		}
		rctx, rcancel := context.WithTimeout(ctx, 200*time.Millisecond-time.Since(lastFlush))
		msg, err := conn.ReceiveMessage(rctx)
		rcancel()
		if err != nil {
			if pgconn.Timeout(err) && ctx.Err() == nil {
				if err := flush(); err != nil {
					return err
				}
				continue
			}
			return fmt.Errorf("receive: %w", err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok {
			return fmt.Errorf("unexpected message %T", msg)
		}
		switch cd.Data[0] {
		case pglogrepl.XLogDataByteID:
			x, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return err
			}
			if err := w.Write(tli, LSN(x.WALStart), x.WALData); err != nil {
				return err
			}
			received = LSN(x.WALStart) + LSN(len(x.WALData))
			if w.Buffered() >= 4<<20 || time.Since(lastFlush) >= 200*time.Millisecond {
				if err := flush(); err != nil {
					return err
				}
			}
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			k, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return err
			}
			if k.ReplyRequested {
				if err := flush(); err != nil {
					return err
				}
			}
		}
	}
}
