package pgagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/tripwire"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// AgentOptions tune the streaming agent.
type AgentOptions struct {
	// URL is a connection string to the server to protect; the agent adds
	// replication=true itself for the stream.
	URL string
	// Slot is the physical replication slot, created when missing. It is
	// also the application_name, which is what synchronous_standby_names
	// lists.
	Slot string
	// Synchronous makes the agent a synchronous standby: it acknowledges
	// each flush as soon as the vault holds it, and (if the server does not
	// list it yet) adds itself to synchronous_standby_names. Commits then
	// wait for the vault: RPO zero.
	Synchronous bool
	// FlushEvery bounds how long received WAL waits before it is stored:
	// the RPO when not synchronous. 200 ms keeps it well under a second
	// while making at most five vault writes a second.
	FlushEvery time.Duration
	// FlushBytes stores WAL early once this much is buffered.
	FlushBytes int
	// RetainWarn logs a warning when the slot holds more WAL than this on
	// the server: the vault is not keeping up, or is unreachable.
	RetainWarn int64
	// CheckEvery is how often the slot's retained WAL is checked.
	CheckEvery time.Duration
	// BaseEvery takes a base backup on this schedule (0: never).
	BaseEvery time.Duration
	// DataDir makes the scheduled base backups local ones
	// (BaseBackupOptions.DataDir): the server's data directory, readable
	// by this process on the database host.
	DataDir string
	// Retry is the first delay before reconnecting after a failure; it
	// doubles up to a minute.
	Retry time.Duration
	Log   *slog.Logger
	// OnFlush, if set, is called after each acknowledged flush (tests).
	OnFlush func(Status)

	// OnDetect turns the tripwire on: every WAL byte received is decoded,
	// in order and across reconnects, off the receive loop, and the events
	// of each commit are passed to OnDetect from one goroutine, in WAL
	// order. It should return quickly (store, then notify in the
	// background); while it runs, decoding waits. Nil: no decoding.
	OnDetect func(context.Context, Detection)
	// Tripwire tunes the decoder (MassRows, MaxRecordSize, ...); its Names
	// and OnRecord are the agent's own.
	Tripwire tripwire.Options
	// NamesEvery is how often the tripwire's name cache rereads pg_class
	// without being asked; it also rereads after every commit that created
	// files. Default 30 s.
	NamesEvery time.Duration
}

func (o *AgentOptions) applyDefaults() {
	if o.Slot == "" {
		o.Slot = "dualkey"
	}
	if o.FlushEvery <= 0 {
		o.FlushEvery = 200 * time.Millisecond
	}
	if o.FlushBytes <= 0 {
		o.FlushBytes = 4 << 20
	}
	if o.RetainWarn <= 0 {
		o.RetainWarn = 1 << 30
	}
	if o.CheckEvery <= 0 {
		o.CheckEvery = 30 * time.Second
	}
	if o.Retry <= 0 {
		o.Retry = time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.NamesEvery <= 0 {
		o.NamesEvery = 30 * time.Second
	}
}

// Status is the agent's position.
type Status struct {
	Timeline uint32
	Received pgwal.LSN // end of WAL received from the server
	Durable  pgwal.LSN // end of WAL stored in the vault and acknowledged
	At       time.Time
}

// Agent streams a server's WAL into the vault.
type Agent struct {
	r    *repo.Repository
	opts AgentOptions

	mu      sync.Mutex
	status  Status
	lastErr error // why the last stream ended; nil once a flush succeeds again

	// noCatchUp is set when the server no longer has the WAL to fill in
	// the end of the parent timeline: the next stream starts on the
	// server's timeline. Used by Run's goroutine only.
	noCatchUp bool

	tw *tripwireFeed // nil unless OnDetect is set
}

// NewAgent returns an agent for r.
func NewAgent(r *repo.Repository, opts AgentOptions) *Agent {
	opts.applyDefaults()
	a := &Agent{r: r, opts: opts}
	if opts.OnDetect != nil {
		a.tw = newTripwireFeed(a)
	}
	return a
}

// Status returns the latest position.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status
}

// Run streams until ctx ends, reconnecting after any failure: a restart of
// PostgreSQL, a broken connection, or a vault that cannot store. It resumes
// exactly at the end of what the vault holds, so nothing is skipped and
// nothing stored twice; the slot keeps the server from recycling WAL the
// vault does not hold yet.
func (a *Agent) Run(ctx context.Context) error {
	delay := a.opts.Retry
	if a.opts.BaseEvery > 0 {
		go a.baseSchedule(ctx)
	}
	// The slot is watched for the agent's whole run, not per connection:
	// when the vault is unreachable every stream fails within moments,
	// and that is exactly when the slot grows.
	go a.watchSlot(ctx)
	// An in-process vault on S3 keeps its objects' Object Lock rolling
	// (a vault server does that itself). See docs/object-lock.md.
	type lockKeeper interface {
		KeepObjectLocks(context.Context, *slog.Logger)
	}
	if l, ok := a.r.Store().(lockKeeper); ok {
		go l.KeepObjectLocks(ctx, a.opts.Log)
	}
	if a.tw != nil {
		done := make(chan struct{})
		go func() { defer close(done); a.tw.run(ctx) }()
		defer func() { <-done }() // OnDetect is not called after Run returns
	}
	for {
		start := time.Now()
		err := a.stream(ctx)
		if ctx.Err() != nil {
			return nil
		}
		a.mu.Lock()
		a.lastErr = err
		a.mu.Unlock()
		if time.Since(start) > time.Minute {
			delay = a.opts.Retry
		}
		a.opts.Log.Warn("WAL stream interrupted; reconnecting", "err", err, "in", delay)
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil
		}
		delay = min(delay*2, time.Minute)
	}
}

// ReplicationURL returns u with replication=true, for a walsender connection.
func ReplicationURL(u string) (string, error) {
	return withParam(u, "replication", "true")
}

func withParam(u, k, v string) (string, error) {
	if !strings.Contains(u, "://") {
		return u + " " + k + "=" + v, nil // keyword/value form
	}
	pu, err := url.Parse(u)
	if err != nil {
		return "", fmt.Errorf("pgagent: connection URL: %w", err)
	}
	q := pu.Query()
	q.Set(k, v)
	pu.RawQuery = q.Encode()
	return pu.String(), nil
}

func (a *Agent) setStatus(f func(*Status)) Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(&a.status)
	a.status.At = time.Now()
	return a.status
}

// stream runs one replication connection until it fails.
func (a *Agent) stream(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	repURL, err := ReplicationURL(a.opts.URL)
	if err != nil {
		return err
	}
	repURL, _ = withParam(repURL, "application_name", a.opts.Slot)
	conn, err := pgconn.Connect(ctx, repURL)
	if err != nil {
		return fmt.Errorf("pgagent: connect: %w", err)
	}
	defer conn.Close(context.Background())
	sys, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return fmt.Errorf("pgagent: identify system: %w", err)
	}
	if err := a.ensureSlot(ctx, conn); err != nil {
		return err
	}
	if a.opts.Synchronous {
		if err := a.ensureSynchronous(ctx); err != nil {
			return err
		}
	}
	cat, err := pgwal.Load(ctx, a.r)
	if err != nil {
		return fmt.Errorf("pgagent: read the vault's WAL catalog: %w", err)
	}
	tli := uint32(sys.Timeline)
	if err := a.saveHistories(ctx, conn, cat, tli); err != nil {
		return err
	}
	stli, start, err := a.resumePoint(ctx, conn, cat, tli)
	if err != nil {
		return err
	}
	a.opts.Log.Info("streaming WAL", "system", sys.SystemID, "timeline", stli, "from", start.String(), "slot", a.opts.Slot)
	for {
		next, nextStart, err := a.streamTimeline(ctx, conn, stli, start)
		var pgErr *pgconn.PgError
		if stli < tli && errors.As(err, &pgErr) && pgErr.Code == "58P01" { // undefined_file
			a.noCatchUp = true
			a.opts.Log.Error("the server no longer has the end of the parent timeline: the vault keeps a gap there; streaming the server's timeline",
				"timeline", stli, "from", start.String(), "err", err)
		}
		if err != nil {
			return err
		}
		// The server ended the timeline (it was promoted, or we streamed an
		// old timeline up to its switch point): store the next timeline's
		// history and follow it.
		a.opts.Log.Info("timeline switch", "from", tli, "to", next, "at", nextStart.String())
		if err := a.saveHistory(ctx, conn, next); err != nil {
			return err
		}
		stli, start = next, nextStart
	}
}

// resumePoint is where streaming starts, on the server's timeline tli or
// one it descends from:
//   - the end of what the vault holds of tli;
//   - if the vault holds none of tli but stops short of the point where tli
//     branched off its parent, the end of the parent's WAL in the vault: the
//     server streams the rest of the parent, then switches to tli. That is a
//     promoted standby which had received more than the agent stored;
//   - else the start of the segment holding the later of the branch point
//     and the slot's restart LSN. Not earlier than the branch point's
//     segment: tli has no segment files before it on the server.
func (a *Agent) resumePoint(ctx context.Context, conn *pgconn.PgConn, cat *pgwal.Catalog, tli uint32) (uint32, pgwal.LSN, error) {
	if end := cat.End(tli); end > 0 {
		return tli, end, nil
	}
	restart, err := a.slotRestartLSN(ctx)
	if err != nil {
		return 0, 0, err
	}
	from := restart
	if tli > 1 {
		h, err := pglogrepl.TimelineHistory(ctx, conn, int32(tli))
		if err != nil {
			return 0, 0, fmt.Errorf("pgagent: timeline %d history: %w", tli, err)
		}
		sw, err := pgwal.ParseHistory(h.Content)
		if err != nil {
			return 0, 0, fmt.Errorf("pgagent: timeline %d history: %w", tli, err)
		}
		if n := len(sw); n > 0 {
			parent := sw[n-1]
			if end := cat.End(parent.Timeline); end > 0 && end < parent.End && !a.noCatchUp {
				return parent.Timeline, end, nil
			}
			from = max(from, parent.End)
		}
	}
	// Whole segments only: restore replays segment files, and a first
	// segment missing its head could never be used.
	const seg = 16 << 20
	return tli, pgwal.LSN(uint64(from) / seg * seg), nil
}

func (a *Agent) ensureSlot(ctx context.Context, conn *pgconn.PgConn) error {
	if _, err := a.slotRestartLSN(ctx); err == nil {
		return nil
	}
	// RESERVE_WAL makes the slot hold WAL from now on, before the first
	// START_REPLICATION.
	_, err := conn.Exec(ctx, fmt.Sprintf("CREATE_REPLICATION_SLOT %s PHYSICAL RESERVE_WAL", pgx.Identifier{a.opts.Slot}.Sanitize())).ReadAll()
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42710" { // created meanwhile
		return nil
	}
	if err != nil {
		return fmt.Errorf("pgagent: create replication slot %s: %w", a.opts.Slot, err)
	}
	a.opts.Log.Info("created physical replication slot", "slot", a.opts.Slot)
	return nil
}

var errNoSlot = errors.New("pgagent: no such replication slot")

func (a *Agent) query(ctx context.Context, fn func(*pgx.Conn) error) error {
	c, err := pgx.Connect(ctx, a.opts.URL)
	if err != nil {
		return fmt.Errorf("pgagent: connect: %w", err)
	}
	defer c.Close(context.Background())
	return fn(c)
}

func (a *Agent) slotRestartLSN(ctx context.Context) (pgwal.LSN, error) {
	var lsn *string
	err := a.query(ctx, func(c *pgx.Conn) error {
		return c.QueryRow(ctx, "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'", a.opts.Slot).Scan(&lsn)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, errNoSlot
	}
	if err != nil {
		return 0, err
	}
	if lsn == nil {
		return 0, fmt.Errorf("pgagent: slot %s reserves no WAL", a.opts.Slot)
	}
	v, err := pglogrepl.ParseLSN(*lsn)
	return pgwal.LSN(v), err
}

// ensureSynchronous adds the agent to synchronous_standby_names when it is
// not there, loudly: from then on commits wait for the vault.
func (a *Agent) ensureSynchronous(ctx context.Context) error {
	return a.query(ctx, func(c *pgx.Conn) error {
		var cur string
		if err := c.QueryRow(ctx, "SHOW synchronous_standby_names").Scan(&cur); err != nil {
			return err
		}
		if strings.Contains(cur, a.opts.Slot) {
			return nil
		}
		val := a.opts.Slot
		if cur != "" {
			val = cur + ", " + a.opts.Slot
			if !strings.Contains(strings.ToUpper(cur), "ANY") && !strings.Contains(strings.ToUpper(cur), "FIRST") {
				val = "FIRST 1 (" + a.opts.Slot + ", " + cur + ")"
			}
		}
		if _, err := c.Exec(ctx, "ALTER SYSTEM SET synchronous_standby_names = "+quoteLiteral(val)); err != nil {
			return fmt.Errorf("pgagent: set synchronous_standby_names: %w", err)
		}
		if _, err := c.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
			return err
		}
		a.opts.Log.Warn("synchronous mode: commits on this server now wait until the vault holds their WAL",
			"synchronous_standby_names", val)
		return nil
	})
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// watchSlot warns when the slot holds more WAL than RetainWarn.
func (a *Agent) watchSlot(ctx context.Context) {
	t := time.NewTicker(a.opts.CheckEvery)
	defer t.Stop()
	// Only WAL held back and not shrinking is worth a warning: an agent
	// catching up after a start or an outage is draining the slot.
	prev := int64(math.MaxInt64)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var current, restart *int64
		err := a.query(ctx, func(c *pgx.Conn) error {
			return c.QueryRow(ctx, "SELECT (pg_current_wal_lsn() - '0/0')::bigint, (restart_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1", a.opts.Slot).Scan(&current, &restart)
		})
		if err != nil || current == nil || restart == nil {
			continue
		}
		// The slot's restart_lsn moves only when the server reads the
		// agent's next status update; WAL the vault already holds is
		// released then, so it does not count as held back.
		st := a.Status()
		from := max(*restart, int64(st.Durable))
		retained := *current - from
		shrinking := retained < prev
		prev = retained
		if retained > a.opts.RetainWarn && !shrinking {
			a.mu.Lock()
			why := "the vault stores WAL more slowly than the server writes it"
			if a.lastErr != nil {
				why = a.lastErr.Error()
			}
			a.mu.Unlock()
			a.opts.Log.Warn("the replication slot holds more WAL than the threshold: the server cannot recycle it until the vault stores it; if this grows, the vault is unreachable or slower than the server's WAL rate, and the server's disk may fill",
				"slot", a.opts.Slot, "retained_bytes", retained, "threshold", a.opts.RetainWarn, "durable", st.Durable.String(), "reason", why)
		}
	}
}

func (a *Agent) saveHistories(ctx context.Context, conn *pgconn.PgConn, cat *pgwal.Catalog, tli uint32) error {
	for t := uint32(2); t <= tli; t++ {
		if _, err := cat.History(ctx, t); err == nil {
			continue
		}
		if err := a.saveHistory(ctx, conn, t); err != nil {
			return err
		}
	}
	return nil
}

func (a *Agent) saveHistory(ctx context.Context, conn *pgconn.PgConn, tli uint32) error {
	if tli < 2 {
		return nil
	}
	h, err := pglogrepl.TimelineHistory(ctx, conn, int32(tli))
	if err != nil {
		return fmt.Errorf("pgagent: timeline %d history: %w", tli, err)
	}
	w := pgwal.NewWriter(a.r, pgwal.WriterOptions{Log: a.opts.Log})
	if err := w.SaveHistory(ctx, tli, h.Content); err != nil {
		return fmt.Errorf("pgagent: store timeline %d history: %w", tli, err)
	}
	return nil
}

// streamTimeline streams tli from start until the server ends the timeline
// (returning the next one) or something fails.
func (a *Agent) streamTimeline(ctx context.Context, conn *pgconn.PgConn, tli uint32, start pgwal.LSN) (uint32, pgwal.LSN, error) {
	err := pglogrepl.StartReplication(ctx, conn, a.opts.Slot, pglogrepl.LSN(start),
		pglogrepl.StartReplicationOptions{Timeline: int32(tli), Mode: pglogrepl.PhysicalReplication})
	if next, pos, ok := pglogrepl.IsErrEndTimeline(err); ok {
		return uint32(next), pgwal.LSN(pos), nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("pgagent: start replication at %s on timeline %d: %w", start, tli, err)
	}
	w := pgwal.NewWriter(a.r, pgwal.WriterOptions{Log: a.opts.Log})
	received, durable := start, start
	a.setStatus(func(s *Status) { s.Timeline, s.Received, s.Durable = tli, start, start })
	lastFlush := time.Now()
	lastStatus := time.Now()

	ack := func(ctx context.Context, force bool) error {
		if err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{
			WALWritePosition: pglogrepl.LSN(received),
			// Flush and apply say "safe": only what the vault holds.
			// Zero would make pglogrepl report the write position.
			WALFlushPosition: pglogrepl.LSN(max(durable, 1)),
			WALApplyPosition: pglogrepl.LSN(max(durable, 1)),
			ReplyRequested:   force,
		}); err != nil {
			return fmt.Errorf("pgagent: status update: %w", err)
		}
		lastStatus = time.Now()
		return nil
	}
	// store saves what is buffered in the vault; it tells the server
	// nothing, so it may run after the connection broke.
	store := func(ctx context.Context) error {
		if w.Buffered() == 0 {
			return nil
		}
		d, err := w.Flush(ctx)
		if err != nil {
			return fmt.Errorf("pgagent: store WAL: %w", err)
		}
		durable = d
		st := a.setStatus(func(s *Status) { s.Durable = d })
		a.mu.Lock()
		a.lastErr = nil
		a.mu.Unlock()
		if a.opts.OnFlush != nil {
			a.opts.OnFlush(st)
		}
		return nil
	}
	flush := func(ctx context.Context) error {
		// Ack the LSN only after the vault has fsynced the piece: the
		// server drops WAL behind the slot once acked, so an early ack
		// turns an outage into data loss.
		if err := store(ctx); err != nil {
			return err
		}
		lastFlush = time.Now()
		return ack(ctx, false)
	}

	for {
		wait := a.opts.FlushEvery - time.Since(lastFlush)
		if a.opts.Synchronous && w.Buffered() > 0 {
			// A committing transaction waits for this: store what has
			// arrived as soon as the socket has nothing more queued.
			wait = time.Millisecond
		}
		if w.Buffered() == 0 {
			wait = max(wait, 10*time.Second-time.Since(lastStatus))
		}
		rctx, rcancel := context.WithTimeout(ctx, max(wait, time.Millisecond))
		msg, err := conn.ReceiveMessage(rctx)
		rcancel()
		if err != nil {
			if ctx.Err() != nil {
				// Stopping: store what has arrived, in bounded time (ctx
				// has ended), and tell the server if it still listens.
				fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
				_ = flush(fctx)
				cancel()
				return 0, 0, ctx.Err()
			}
			if pgconn.Timeout(err) {
				if err := flush(ctx); err != nil {
					return 0, 0, err
				}
				continue
			}
			// The server went away (stopped, crashed, promoted elsewhere)
			// or the connection broke: store what has arrived before
			// reconnecting. If the server never comes back, this is the
			// last WAL there is. No ack: pgconn is closing the connection
			// in the background.
			_ = store(ctx)
			return 0, 0, fmt.Errorf("pgagent: receive: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			switch m.Data[0] {
			case pglogrepl.XLogDataByteID:
				x, err := pglogrepl.ParseXLogData(m.Data[1:])
				if err != nil {
					return 0, 0, fmt.Errorf("pgagent: %w", err)
				}
				if err := w.Write(tli, pgwal.LSN(x.WALStart), x.WALData); err != nil {
					return 0, 0, fmt.Errorf("pgagent: %w", err)
				}
				if a.tw != nil {
					a.tw.feed(ctx, tli, pgwal.LSN(x.WALStart), x.WALData)
				}
				received = pgwal.LSN(x.WALStart) + pgwal.LSN(len(x.WALData))
				a.setStatus(func(s *Status) { s.Received = received })
				if w.Buffered() >= a.opts.FlushBytes || time.Since(lastFlush) >= a.opts.FlushEvery {
					if err := flush(ctx); err != nil {
						return 0, 0, err
					}
				}
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				k, err := pglogrepl.ParsePrimaryKeepaliveMessage(m.Data[1:])
				if err != nil {
					return 0, 0, fmt.Errorf("pgagent: %w", err)
				}
				if k.ReplyRequested {
					if err := flush(ctx); err != nil {
						return 0, 0, err
					}
				}
			}
		case *pgproto3.CopyDone:
			// End of timeline: store what we have, then learn the next.
			if err := flush(ctx); err != nil {
				return 0, 0, err
			}
			res, err := pglogrepl.SendStandbyCopyDone(ctx, conn)
			if err != nil {
				return 0, 0, fmt.Errorf("pgagent: end of timeline %d: %w", tli, err)
			}
			if res == nil {
				return 0, 0, fmt.Errorf("pgagent: timeline %d ended without a next timeline", tli)
			}
			return uint32(res.Timeline), pgwal.LSN(res.LSN), nil
		case *pgproto3.ErrorResponse:
			_ = store(ctx) // what arrived before the error is WAL all the same
			return 0, 0, fmt.Errorf("pgagent: server: %w", pgconn.ErrorResponseToPgError(m))
		}
	}
}

func (a *Agent) baseSchedule(ctx context.Context) {
	t := time.NewTicker(a.opts.BaseEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		repURL, err := ReplicationURL(a.opts.URL)
		if err != nil {
			return
		}
		res, err := BaseBackup(ctx, a.r, repURL, BaseBackupOptions{Log: a.opts.Log, DataDir: a.opts.DataDir})
		if err != nil {
			a.opts.Log.Error("scheduled base backup failed", "err", err)
			continue
		}
		a.opts.Log.Info("scheduled base backup stored", "snapshot", res.ID.String()[:10])
	}
}
