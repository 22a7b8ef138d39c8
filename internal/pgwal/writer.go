package pgwal

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// ErrNotContiguous is returned (wrapped) by Write when data does not start
// exactly where the buffered run ends: the agent must never skip WAL, and
// storing a byte twice in one run would hide a bug that skips another.
var ErrNotContiguous = errors.New("pgwal: WAL is not contiguous")

// WriterOptions tune a Writer. The zero value is completed by ApplyDefaults.
type WriterOptions struct {
	// MaxPiece is the most WAL bytes one piece holds; a longer buffered
	// run is stored as several pieces, in parallel. 4 MiB matches the
	// agent's flush size, so a flush is one object save, and keeps a
	// segment at about four pieces. At most format.MaxWALPiece.
	MaxPiece int
	// Uploads is how many pieces one Flush saves at once when it has
	// several (after an outage of the vault). 4 overlaps the fsyncs.
	Uploads int
	// Log receives one debug line per flush; nil discards.
	Log *slog.Logger
}

// ApplyDefaults fills zero fields and clamps MaxPiece to format.MaxWALPiece.
func (o *WriterOptions) ApplyDefaults() {
	if o.MaxPiece <= 0 {
		o.MaxPiece = 4 << 20
	}
	o.MaxPiece = min(o.MaxPiece, format.MaxWALPiece)
	if o.Uploads <= 0 {
		o.Uploads = 4
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Writer buffers streamed WAL and stores it in the vault on Flush.
//
// A Writer is safe for concurrent use: the agent may Write from its receive
// loop while another goroutine runs Flush, so the replication socket keeps
// draining during a vault fsync. Flushes run one at a time.
//
// Invariant: every byte given to Write is either durable (at or below what
// Flush returned), or buffered, or in a pending piece that the next Flush
// saves; nothing is dropped except by Reset.
type Writer struct {
	r    *repo.Repository
	opts WriterOptions

	flushMu sync.Mutex // serializes Flush and Reset; taken before mu

	mu         sync.Mutex // guards the fields below; never held across I/O
	started    bool
	tli        uint32
	start, end LSN         // the buffered run [start, end)
	buf        []byte      // bytes of [start, end) not yet cut into a piece
	pending    []*walPiece // cut, not yet durable, in WAL order
	durable    LSN
}

// walPiece is a piece on its way to the vault. Its fields other than hd and
// n are touched only by Flush, under flushMu.
type walPiece struct {
	hd    format.WALHeader
	n     int    // len of the raw bytes
	raw   []byte // dropped once sealed
	obj   []byte // the sealed object, kept so a retry saves the same bytes
	saved bool
}

// NewWriter returns a Writer storing WAL in r.
func NewWriter(r *repo.Repository, opts WriterOptions) *Writer {
	opts.ApplyDefaults()
	return &Writer{r: r, opts: opts}
}

// Write buffers data, the WAL of timeline tli starting at LSN start. It
// copies data (pglogrepl reuses its message buffer).
//
// The first Write, the first after Reset, and the first on another timeline
// may start anywhere; every other Write must start exactly at the end of the
// one before, or it fails with ErrNotContiguous and buffers nothing. A
// timeline switch closes the buffered run of the old timeline (it is stored
// by the next Flush, before the new one).
func (w *Writer) Write(tli uint32, start LSN, data []byte) error {
	if tli == 0 {
		return fmt.Errorf("pgwal: write at %s: timeline 0", start)
	}
	if uint64(start)+uint64(len(data)) < uint64(start) {
		return fmt.Errorf("pgwal: write of %d bytes at %s overflows the LSN space", len(data), start)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case !w.started || tli != w.tli:
		w.cut(0)
		w.started, w.tli, w.start, w.end = true, tli, start, start
	case start != w.end:
		what := "a gap"
		if start < w.end {
			what = "an overlap"
		}
		return fmt.Errorf("pgwal: write at %s on timeline %d: the run ends at %s, %s of %d bytes: %w",
			start, tli, w.end, what, absDiff(start, w.end), ErrNotContiguous)
	}
	for len(data) > 0 {
		if w.buf == nil {
			w.buf = make([]byte, 0, w.opts.MaxPiece)
		}
		n := min(len(data), w.opts.MaxPiece-len(w.buf))
		w.buf = append(w.buf, data[:n]...)
		w.end += LSN(n)
		data = data[n:]
		w.cut(w.opts.MaxPiece)
	}
	return nil
}

func absDiff(a, b LSN) uint64 {
	if a > b {
		return uint64(a - b)
	}
	return uint64(b - a)
}

// cut moves the buffer into a pending piece if it holds at least min bytes
// (and any at all). The caller holds mu.
func (w *Writer) cut(min int) {
	if len(w.buf) == 0 || len(w.buf) < min {
		return
	}
	end := w.start + LSN(len(w.buf))
	w.pending = append(w.pending, &walPiece{
		hd:  format.WALHeader{Timeline: w.tli, Start: uint64(w.start), End: uint64(end)},
		n:   len(w.buf),
		raw: w.buf,
	})
	w.start, w.buf = end, nil
}

// Buffered returns how many bytes given to Write are not yet durable.
func (w *Writer) Buffered() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(w.buf)
	for _, p := range w.pending {
		n += p.n
	}
	return n
}

// Durable returns the LSN up to which everything written is in the vault:
// what the last Flush returned.
func (w *Writer) Durable() LSN {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.durable
}

// Flush stores everything buffered as one or more pieces and returns the
// LSN up to which the WAL given to Write is now durable in the vault (each
// piece is saved with an fsync before the backend returns). Only that LSN
// may be reported to PostgreSQL as flushed: the server drops WAL behind the
// slot once acknowledged.
//
// With nothing buffered Flush returns at once. On error, durable is how far
// the flush got (at least what the previous Flush returned), and the rest
// stays pending: the next Flush saves the very same objects again, so a
// retry after a lost answer adds no duplicate. After a timeline switch,
// durable is on the latest timeline only once the old run is stored too.
func (w *Writer) Flush(ctx context.Context) (durable LSN, err error) {
	w.flushMu.Lock()
	defer w.flushMu.Unlock()
	w.mu.Lock()
	w.cut(0)
	todo := append([]*walPiece(nil), w.pending...)
	durable = w.durable
	w.mu.Unlock()
	if len(todo) == 0 {
		return durable, nil
	}

	t0 := time.Now()
	key, store := w.r.Key(), w.r.Store()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(w.opts.Uploads)
	for _, p := range todo {
		if p.saved {
			continue
		}
		g.Go(func() error {
			if p.obj == nil {
				p.obj = seal(key, p.hd, p.raw)
				p.raw = nil
			}
			h := backend.Handle{Type: backend.WAL, Name: format.Hash(p.obj).String()}
			if err := store.Save(gctx, h, p.obj); err != nil {
				return fmt.Errorf("pgwal: save WAL %X-%X of timeline %d: %w", p.hd.Start, p.hd.End, p.hd.Timeline, err)
			}
			p.saved = true
			return nil
		})
	}
	err = g.Wait()

	w.mu.Lock()
	defer w.mu.Unlock()
	done, stored := 0, 0
	for _, p := range todo {
		if !p.saved {
			break
		}
		done++
		stored += len(p.obj)
		w.durable = LSN(p.hd.End)
	}
	// Write only appends to pending and Reset holds flushMu, so todo is
	// still pending's prefix.
	w.pending = append(w.pending[:0], w.pending[done:]...)
	durable = w.durable
	w.opts.Log.Debug("WAL stored", "through", durable.String(), "pieces", done, "stored_bytes", stored,
		"took", time.Since(t0), "pending", len(w.pending))
	return durable, err
}

// Reset drops everything not yet durable, buffered and pending alike, so
// that the next Write may start anywhere: for an agent that reconnects and
// streams again from Durable. It waits for a running Flush.
func (w *Writer) Reset() {
	w.flushMu.Lock()
	defer w.flushMu.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.started, w.buf, w.pending = false, nil, nil
}

// SaveHistory stores the history file of timeline tli (the content of
// "0000000N.history", as TIMELINE_HISTORY returns it). It returns once the
// piece is durable. Saving the same content again stores a second,
// equivalent piece; Catalog.History returns either.
func (w *Writer) SaveHistory(ctx context.Context, tli uint32, content []byte) error {
	hd := format.WALHeader{Timeline: tli, Start: 0, End: uint64(len(content)), History: true}
	if err := hd.Validate(); err != nil {
		return fmt.Errorf("pgwal: save history of timeline %d: %w", tli, err)
	}
	obj := seal(w.r.Key(), hd, content)
	h := backend.Handle{Type: backend.WAL, Name: format.Hash(obj).String()}
	if err := w.r.Store().Save(ctx, h, obj); err != nil {
		return fmt.Errorf("pgwal: save history of timeline %d: %w", tli, err)
	}
	return nil
}
