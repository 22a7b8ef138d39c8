package server

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

// TestWALRangeOverHTTPS checks that a commit's WAL range crosses the wire
// into the lock record, and that the server then refuses an admin's removal
// of WAL the base backup needs past the minimum retention, while other WAL
// of the same age goes.
func TestWALRangeOverHTTPS(t *testing.T) {
	e := newEnv(t, Options{})
	ctx := context.Background()
	seg := uint64(16 << 20)
	piece := func(start, end uint64) []byte {
		return append(format.AppendWALHeader(nil, format.WALHeader{Timeline: 1, Start: start, End: end}), strings.Repeat("s", format.WALSealOverhead)...)
	}
	in, out := piece(seg+512, seg+8192), piece(4*seg, 4*seg+8192)
	var received time.Time
	for _, p := range [][]byte{in, out} {
		if err := e.app.Save(ctx, hd(backend.WAL, p), p); err != nil {
			t.Fatal(err)
		}
		fi, err := e.rd.Stat(ctx, hd(backend.WAL, p))
		if err != nil {
			t.Fatal(err)
		}
		if fi.ModTime.After(received) {
			received = fi.ModTime.UTC()
		}
	}
	e.clock.Set(received)
	rng := format.WALRange{Timeline: 1, Start: seg, End: 2 * seg}
	rec, snap, err := e.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("base backup"), LockFor: format.Duration(365 * 24 * time.Hour), WAL: &rng})
	if err != nil {
		t.Fatal(err)
	}
	if rec.WAL == nil || *rec.WAL != rng {
		t.Fatalf("lock record over HTTPS carries WAL %v, want %v", rec.WAL, rng)
	}
	_, recs, err := e.rd.SnapshotLock(ctx, snap)
	if err != nil || len(recs) != 1 || recs[0].WAL == nil || *recs[0].WAL != rng {
		t.Fatalf("SnapshotLock = %+v, %v; want the record with its range", recs, err)
	}

	e.clock.Set(received.Add(30 * 24 * time.Hour)) // past the 24 h minimum
	err = e.admin.Remove(ctx, hd(backend.WAL, in))
	if !errors.Is(err, guard.ErrLocked) || !strings.Contains(err.Error(), snap.String()) {
		t.Errorf("remove WAL the base backup needs: %v, want ErrLocked naming %s", err, snap)
	}
	if err := e.admin.Remove(ctx, hd(backend.WAL, out)); err != nil {
		t.Errorf("remove WAL outside the range: %v", err)
	}
	if _, err := e.rd.Stat(ctx, hd(backend.WAL, in)); err != nil {
		t.Errorf("the refused piece is gone: %v", err)
	}
}
