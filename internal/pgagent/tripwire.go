package pgagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/tripwire"
)

// Detection is what the tripwire found in one commit record: the events it
// raised, with the tables they concern and when the agent saw them.
type Detection struct {
	Timeline uint32
	// Events all come from one commit record (one CommitLSN), in the
	// decoder's order: several for a commit that, say, deleted many rows
	// of two tables.
	Events []tripwire.Event
	// Objects[i] are the tables (schema.name) Events[i] destroyed or
	// changed, each once: an index or TOAST table is reported as its
	// table. For a database drop, the database. A relation the cache
	// never saw is given as its relfilenode ("1663/16384/16390").
	Objects [][]string
	// Received is when the agent received the WAL holding the end of the
	// commit record; Detected when the decoder had decoded it.
	Received, Detected time.Time
}

// walChunk is WAL received from the server, copied off the connection's
// buffer, on its way to the decoder.
type walChunk struct {
	tli  uint32
	lsn  pgwal.LSN
	data []byte
	at   time.Time
}

// feedQueue bounds the WAL waiting for the decoder: 256 messages of at
// most 128 KiB each (the walsender's largest), 32 MiB. The decoder reads
// several hundred MB/s (BenchmarkTripwireFeed), far above any server's
// WAL rate, so the queue only fills if the decoder's goroutine is starved;
// then the receive loop waits rather than lose WAL the tripwire must see.
const feedQueue = 256

// tripwireFeed runs the decoder beside the agent's receive loop.
type tripwireFeed struct {
	a     *Agent
	names *NameCache
	q     chan walChunk
	kick  chan struct{} // asks the name refresher for a refresh now
	log   *slog.Logger

	// Used by run's goroutine only.
	dec     *tripwire.Decoder
	tli     uint32
	ddlSeen bool
	// written holds every relfilenode a decoded record wrote a block of,
	// for this process's life; overflow is set once it would exceed
	// maxWritten, and from then on no file counts as empty by the cache.
	written  map[tripwire.RelFileNode]struct{}
	overflow bool
}

// maxWritten bounds the written set (about 40 bytes an entry): far more
// relations than a server writes to between agent restarts, usually.
const maxWritten = 1 << 18

func newTripwireFeed(a *Agent) *tripwireFeed {
	return &tripwireFeed{a: a, names: NewNameCache(a.opts.URL), q: make(chan walChunk, feedQueue),
		kick: make(chan struct{}, 1), log: a.opts.Log, written: map[tripwire.RelFileNode]struct{}{}}
}

// feed hands data (valid only during the call) to the decoder's goroutine.
func (f *tripwireFeed) feed(ctx context.Context, tli uint32, lsn pgwal.LSN, data []byte) {
	c := walChunk{tli: tli, lsn: lsn, data: slices.Clone(data), at: time.Now()}
	select {
	case f.q <- c:
	case <-ctx.Done():
	}
}

// run decodes what feed queues until ctx ends.
func (f *tripwireFeed) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		f.refresher(ctx)
	}()
	defer wg.Wait()
	// Names first, bounded: events decoded before the cache has loaded
	// would name nothing.
	wait, cancel := context.WithTimeout(ctx, 10*time.Second)
	for f.names.Refreshed().IsZero() && wait.Err() == nil {
		select {
		case <-wait.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	cancel()
	for {
		select {
		case <-ctx.Done():
			// Decode what was queued before the stop, in bounded time:
			// it is in the vault (or will be streamed again), and an
			// event in it should not wait for the next start.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			for {
				select {
				case c := <-f.q:
					f.decode(dctx, c)
				default:
					return
				}
			}
		case c := <-f.q:
			f.decode(ctx, c)
		}
	}
}

// refresher keeps the name cache fresh: at once, every NamesEvery, and
// soon after a transaction that created files commits (new tables,
// indexes, truncations, rewrites, databases), so a table created a moment
// ago is named when it is dropped.
func (f *tripwireFeed) refresher(ctx context.Context) {
	t := time.NewTicker(f.a.opts.NamesEvery)
	defer t.Stop()
	failing := false
	for {
		if err := f.names.Refresh(ctx); err != nil && ctx.Err() == nil {
			if !failing {
				f.log.Warn("tripwire: cannot read relation names; alerts name relfilenodes instead", "err", err)
			}
			failing = true
		} else {
			failing = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-f.kick:
			// A migration commits DDL many times a second: at most four
			// refreshes a second (each reads every database's pg_class).
			if wait := minRefreshGap - time.Since(f.names.Refreshed()); wait > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
			}
		}
	}
}

// minRefreshGap spaces refreshes asked for by DDL.
const minRefreshGap = 250 * time.Millisecond

func (f *tripwireFeed) newDecoder() *tripwire.Decoder {
	o := f.a.opts.Tripwire
	o.Names = f.names
	o.OnRecord = f.onRecord
	return tripwire.NewDecoder(o)
}

// onRecord watches for DDL: a file created (smgr create, database
// create); the next commit after one asks for a name refresh.
func (f *tripwireFeed) onRecord(r *tripwire.Record) {
	for i := range r.Blocks {
		n := r.Blocks[i].Node
		if _, ok := f.written[n]; !ok && !f.overflow {
			if len(f.written) >= maxWritten {
				f.overflow = true
				clear(f.written)
			} else {
				f.written[n] = struct{}{}
			}
		}
	}
	switch {
	case r.RmID == tripwire.RmSmgr && r.Info&0xF0 == 0x10, r.RmID == tripwire.RmDbase && r.Info&0xF0 <= 0x10:
		f.ddlSeen = true
	case r.RmID == tripwire.RmXact && f.ddlSeen:
		f.ddlSeen = false
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
}

// decode feeds one chunk, starting or restarting the decoder when the
// chunk does not continue what it has decoded.
func (f *tripwireFeed) decode(ctx context.Context, c walChunk) {
	if f.dec != nil && c.tli == f.tli {
		next := pgwal.LSN(f.dec.Next())
		end := c.lsn + pgwal.LSN(len(c.data))
		switch {
		case end <= next:
			return // sent again after a reconnect: decoded already
		case c.lsn < next:
			c.data, c.lsn = c.data[next-c.lsn:], next
		}
	} else if f.dec != nil && c.lsn == pgwal.LSN(f.dec.Next()) {
		f.tli = c.tli // a timeline switch at the point the old one ended
	}
	if f.dec == nil || c.lsn != pgwal.LSN(f.dec.Next()) {
		f.restart(ctx, c.tli, c.lsn)
		if f.dec == nil {
			// The vault could not give the head of the page: start at the
			// next page boundary of the stream.
			skip := (pageSize - c.lsn%pageSize) % pageSize
			if pgwal.LSN(len(c.data)) <= skip {
				return
			}
			c.data, c.lsn = c.data[skip:], c.lsn+skip
			f.dec, f.tli = f.newDecoder(), c.tli
		}
	}
	events, err := f.dec.Feed(tripwire.LSN(c.lsn), c.data)
	if err != nil {
		f.log.Warn("tripwire: WAL the decoder could not read (skipped; decoding goes on)", "at", c.lsn.String(), "err", err)
		if errors.Is(err, tripwire.ErrGap) || errors.Is(err, tripwire.ErrNotPageAligned) {
			f.dec = nil
			return
		}
	}
	f.report(ctx, c, events)
}

const pageSize = 8192

// restart makes a new decoder for the stream at lsn of tli. The decoder
// must start on a page boundary, and a transaction's earlier records (the
// rows a mass delete counted, the files a transaction created and so may
// drop without loss) may lie before lsn: it first decodes what the vault
// holds from the start of lsn's segment, for that context only. Events
// committed there are not reported: the run that received that WAL
// decoded it (decoding trails the receive loop by well under a
// millisecond), and the decoder, itself starting mid-stream, would take
// files created before its start for files holding data (pgbench -i's
// TRUNCATE of the tables it had just created looked like a drop).
func (f *tripwireFeed) restart(ctx context.Context, tli uint32, lsn pgwal.LSN) {
	f.dec, f.tli = nil, tli
	const seg = 16 << 20
	from := lsn / seg * seg
	if from == lsn {
		f.dec = f.newDecoder()
		return
	}
	cat, err := pgwal.Load(ctx, f.a.r)
	var head []byte
	var end pgwal.LSN
	if err == nil {
		head, end, err = pgwal.SegmentHead(ctx, f.a.r, cat, tli, uint64(lsn)/seg, seg)
	}
	if err == nil && end < lsn {
		err = fmt.Errorf("the vault holds %s only up to %s", pgwal.SegmentName(tli, uint64(lsn)/seg, seg), end)
	}
	if err != nil {
		f.log.Warn("tripwire: cannot read the WAL before the resume point from the vault; decoding from the next page", "at", lsn.String(), "err", err)
		return
	}
	d := f.newDecoder()
	if _, err := d.Feed(tripwire.LSN(from), head[:lsn-from]); err != nil && (errors.Is(err, tripwire.ErrGap) || errors.Is(err, tripwire.ErrNotPageAligned)) {
		f.log.Warn("tripwire: WAL from the vault", "err", err)
		return
	}
	f.dec = d
}

// report groups events by commit record and hands them on.
func (f *tripwireFeed) report(ctx context.Context, c walChunk, events []tripwire.Event) {
	if len(events) == 0 {
		return
	}
	detected := time.Now()
	events = slices.Clone(events) // the decoder reuses its slice
	for len(events) > 0 {
		n := 1
		for n < len(events) && events[n].CommitLSN == events[0].CommitLSN {
			n++
		}
		d := Detection{Timeline: c.tli, Received: c.at, Detected: detected}
		for _, e := range events[:n] {
			if f.lostNothing(&e) {
				continue
			}
			d.Events = append(d.Events, e)
			d.Objects = append(d.Objects, f.objects(ctx, e))
		}
		if len(d.Events) > 0 {
			f.a.opts.OnDetect(ctx, d)
		}
		events = events[n:]
	}
}

// lostNothing marks as Empty the dropped files of a truncate or drop that
// the name cache last saw without a page and that no record decoded since
// wrote to, and reports whether every dropped file is then empty. The
// decoder knows only the files it saw created; a new agent (or one whose
// decoding starts mid-stream) learns the rest from the cache: pgbench's
// TRUNCATE pgbench_history on a table that never held a row destroys
// nothing. The cache's size is read before it is stored, so a write after
// that read is in WAL the decoder sees.
func (f *tripwireFeed) lostNothing(e *tripwire.Event) bool {
	if e.Kind != tripwire.Truncate && e.Kind != tripwire.RelationsDropped {
		return false
	}
	all := true
	for i := range e.Relations {
		r := &e.Relations[i]
		if !r.Empty && !f.overflow && f.names.KnownEmpty(r.Node) {
			if _, w := f.written[r.Node]; !w {
				r.Empty = true
			}
		}
		all = all && r.Empty
	}
	return all && len(e.Relations) > 0
}

// objects names what e destroyed, each table once. When a relation with
// data has no name (created after the cache last looked), the cache is
// refreshed once: a truncated table is then found under its new file.
func (f *tripwireFeed) objects(ctx context.Context, e tripwire.Event) []string {
	if e.Kind == tripwire.DatabaseDrop {
		name, ok := f.names.Database(e.DB)
		if !ok {
			name = fmt.Sprintf("database %d", e.DB)
		}
		return []string{name}
	}
	tables := func() ([]string, bool) {
		var out []string
		missing := false
		add := func(s string) {
			if !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
		for _, r := range e.Relations {
			if r.Empty && e.Kind != tripwire.MassDelete && e.Kind != tripwire.MassUpdate {
				continue
			}
			if name, ok := f.names.Table(r.Node); ok {
				add(name)
			} else {
				missing = true
			}
		}
		if e.Kind == tripwire.Truncate {
			for _, r := range e.Created {
				if name, ok := f.names.Table(r.Node); ok {
					add(name)
				}
			}
		}
		for i, oid := range e.RelationOIDs {
			if name, ok := f.names.RelationOID(e.DB, oid); ok {
				add(name)
			} else if i < len(e.RelationOIDNames) && e.RelationOIDNames[i] != "" {
				add(e.RelationOIDNames[i])
			}
		}
		return out, missing
	}
	out, missing := tables()
	// A dropped table is gone from pg_class: a refresh can only name a
	// table that still exists (truncated, rewritten, rows deleted).
	stillThere := e.Kind == tripwire.Truncate || e.Kind == tripwire.MassDelete || e.Kind == tripwire.MassUpdate || len(e.Created) > 0
	if stillThere && (missing || len(out) == 0) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := f.names.Refresh(rctx)
		cancel()
		if err != nil {
			f.log.Warn("tripwire: refreshing names for an alert", "err", err)
		}
		out, _ = tables()
	}
	for _, r := range e.Relations {
		if _, ok := f.names.Table(r.Node); !ok && !r.Empty {
			out = append(out, r.Node.String())
		}
	}
	return out
}
