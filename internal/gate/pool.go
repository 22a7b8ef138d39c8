package gate

import (
	"context"
	"errors"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/netfd"
)

// Defaults of Config.PoolIdle, PoolIdleTimeout and PoolLifetime: those of
// PgBouncer's default_pool_size, server_idle_timeout and server_lifetime.
const (
	defaultPoolIdle        = 20
	defaultPoolIdleTimeout = 10 * time.Minute
	defaultPoolLifetime    = time.Hour
	// resetTimeout bounds DISCARD ALL when a session leaves its upstream
	// connection for the next one.
	resetTimeout = 5 * time.Second
)

// pool keeps the upstream connections that sessions left idle, reset with
// DISCARD ALL, for the next session of the same database and startup
// parameters, as PgBouncer's session pooling does. A new PostgreSQL
// backend costs a fork and a login, and runs slower for its first seconds
// while it warms its caches; a client that connects, runs a little and
// leaves pays that every time without a pool.
//
// A connection is kept only when its session ended with nothing in
// flight, outside a transaction (session.reusable, session.parkable). One
// back from the event loop stays outside Go's poller, so the next session
// can go to the loop too; one a session used on goroutines is kept only if
// it could never have gone to the loop (upstream TLS, or no loop), so that
// it does not keep a plaintext session off the loop.
type pool struct {
	max              int
	idleFor, maxLife time.Duration

	mu     sync.Mutex
	idle   map[string][]*pooled // by poolKey; the most recently used last
	closed bool
	stop   chan struct{}
}

// pooled is an idle upstream connection and what its login told the
// first session, which the next is told again.
type pooled struct {
	c      net.Conn    // as the session used it (under TLS, the tls.Conn)
	raw    *netfd.Conn // c outside Go's poller, for the event loop; else nil
	pid    uint32
	secret []byte
	params map[string]string // ParameterStatus values
	born   time.Time         // connected
	since  time.Time         // idle
}

func newPool(max int, idleFor, maxLife time.Duration) *pool {
	p := &pool{max: max, idleFor: idleFor, maxLife: maxLife, idle: map[string][]*pooled{}, stop: make(chan struct{})}
	go p.reap()
	return p
}

// poolKey is what two sessions must share to use one backend: the
// database and the startup parameters the gate forwards, which are the
// backend's session defaults (DISCARD ALL returns to them).
func poolKey(db string, params map[string]string) string {
	var b strings.Builder
	b.WriteString(db)
	for _, k := range forwardedParams {
		if v, ok := params[k]; ok {
			b.WriteString("\x00" + k + "=" + v)
		}
	}
	return b.String()
}

// take returns an idle connection for key that is still open and quiet,
// or nil. Connections found dead (the server closed them, or an
// administrator terminated the backend) are closed on the way.
func (p *pool) take(key string) *pooled {
	now := time.Now()
	for {
		p.mu.Lock()
		l := p.idle[key]
		if len(l) == 0 {
			p.mu.Unlock()
			return nil
		}
		pc := l[len(l)-1]
		p.idle[key] = l[:len(l)-1]
		p.mu.Unlock()
		if now.Sub(pc.born) < p.maxLife && now.Sub(pc.since) < p.idleFor && netfd.QuietConn(pc.c) == nil {
			return pc
		}
		pc.close()
	}
}

// put keeps pc for key, or closes it when the pool is closed or pc too
// old. Beyond max idle connections for the database, whatever the startup
// parameters, the one idle longest goes: clients with many different
// application_names must not fill the server's connection slots.
func (p *pool) put(key string, pc *pooled) {
	pc.since = time.Now()
	p.mu.Lock()
	if p.closed || pc.since.Sub(pc.born) >= p.maxLife {
		p.mu.Unlock()
		pc.close()
		return
	}
	p.idle[key] = append(p.idle[key], pc)
	var out []*pooled
	db := keyDB(key)
	for p.count(db) > p.max {
		out = append(out, p.oldest(db))
	}
	p.mu.Unlock()
	for _, pc := range out {
		pc.close()
	}
}

// keyDB is the database of a poolKey.
func keyDB(key string) string {
	db, _, _ := strings.Cut(key, "\x00")
	return db
}

// count is the number of idle connections to db (mu held).
func (p *pool) count(db string) int {
	n := 0
	for k, l := range p.idle {
		if keyDB(k) == db {
			n += len(l)
		}
	}
	return n
}

// oldest removes and returns db's connection idle longest, or nil (mu
// held). Each list is in the order connections were put back.
func (p *pool) oldest(db string) *pooled {
	var key string
	var pc *pooled
	for k, l := range p.idle {
		if keyDB(k) == db && len(l) > 0 && (pc == nil || l[0].since.Before(pc.since)) {
			key, pc = k, l[0]
		}
	}
	if pc != nil {
		if l := slices.Delete(p.idle[key], 0, 1); len(l) > 0 {
			p.idle[key] = l
		} else {
			delete(p.idle, key)
		}
	}
	return pc
}

// evict closes db's connection idle longest and waits until its backend
// has exited, so that its server connection slot is free. False: none.
func (p *pool) evict(db string) bool {
	p.mu.Lock()
	pc := p.oldest(db)
	p.mu.Unlock()
	if pc == nil {
		return false
	}
	pc.close()
	return true
}

// size is the number of idle connections.
func (p *pool) size() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.idle {
		n += len(l)
	}
	return n
}

// reap closes connections idle past idleFor or older than maxLife.
func (p *pool) reap() {
	t := time.NewTicker(min(p.idleFor, p.maxLife)/4 + time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		now := time.Now()
		var out []*pooled
		p.mu.Lock()
		for k, l := range p.idle {
			keep := l[:0]
			for _, pc := range l {
				if now.Sub(pc.since) >= p.idleFor || now.Sub(pc.born) >= p.maxLife {
					out = append(out, pc)
				} else {
					keep = append(keep, pc)
				}
			}
			if len(keep) == 0 {
				delete(p.idle, k)
			} else {
				p.idle[k] = keep
			}
		}
		p.mu.Unlock()
		for _, pc := range out {
			pc.close()
		}
	}
}

// close closes every idle connection; later puts close theirs.
func (p *pool) close() {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	idle := p.idle
	p.idle = map[string][]*pooled{}
	p.mu.Unlock()
	close(p.stop)
	var wg sync.WaitGroup
	for _, l := range idle {
		for _, pc := range l {
			wg.Go(pc.close)
		}
	}
	wg.Wait()
}

// close says goodbye to the server (Terminate), waits (up to a second)
// until the server closes its end, by which time the backend has released
// its connection slot, and closes the socket.
func (pc *pooled) close() {
	pc.c.SetDeadline(time.Now().Add(time.Second))
	if _, err := pc.c.Write([]byte{'X', 0, 0, 0, 4}); err == nil {
		io.Copy(io.Discard, pc.c)
	}
	pc.c.Close()
}

// reusable reports whether the session's upstream connection may serve
// another session once reset: the client left (rather than the upstream,
// the gate or an error), and the upstream is idle outside a transaction
// with nothing in flight either way. Called as the session leaves the
// event loop, with x what the loop handed back.
func (s *session) reusable(x loopExit) bool {
	if s.g.pool == nil || s.g.ctx.Err() != nil || !strings.HasPrefix(x.why, "client") {
		return false
	}
	if len(x.uin) > 0 || len(x.uout) > 0 || s.afterSync != "" || s.skipToSync {
		return false
	}
	block, failed := s.r.txState()
	return !block && !failed && !s.r.busy() && !s.r.skipping()
}

// parkable reports whether a session that relayed on goroutines may
// leave its upstream connection to another once reset (see reusable), and
// if so stops the relay without closing the connection.
func (s *session) parkable(why string) bool {
	g := s.g
	if g.pool == nil || g.ctx.Err() != nil || !strings.HasPrefix(why, "client") || s.afterSync != "" || s.skipToSync {
		return false
	}
	if len(g.loops) > 0 && s.rawUp != nil && s.up == net.Conn(s.rawUp) {
		return false // plaintext, on Go's poller for good: it would keep the next session off the loop
	}
	block, failed := s.r.txState()
	if block || failed || s.r.busy() || s.r.skipping() {
		return false
	}
	return s.r.park()
}

// release resets the session's upstream connection with DISCARD ALL
// (prepared statements, cursors, temporary tables, settings, LISTENs,
// advisory locks: what one session could leave for the next) and puts it
// in the pool. False: the reset failed and the caller closes it.
func (s *session) release() bool {
	s.up.SetDeadline(time.Now().Add(resetTimeout))
	s.fe.Send(&pgproto3.Query{String: "DISCARD ALL"})
	if err := s.fe.Flush(); err != nil {
		return false
	}
	params := maps.Clone(s.upParams)
	discarded := false
	for {
		m, err := s.fe.Receive()
		if err != nil {
			s.g.log.Debug("gate: upstream reset", "session", s.id, "err", err)
			return false
		}
		switch m := m.(type) {
		case *pgproto3.CommandComplete:
			discarded = string(m.CommandTag) == "DISCARD ALL"
		case *pgproto3.ParameterStatus:
			params[m.Name] = m.Value // a setting the session changed, back to its default
		case *pgproto3.NoticeResponse, *pgproto3.NotificationResponse:
		case *pgproto3.ReadyForQuery:
			if !discarded || m.TxStatus != 'I' {
				return false
			}
			s.up.SetDeadline(time.Time{})
			pc := &pooled{c: s.up, pid: s.upPID, secret: s.upSecret, params: params, born: s.upBorn}
			if s.reuseUp {
				pc.raw = s.rawUp // back from the loop, outside Go's poller
			}
			s.g.pool.put(s.poolKey, pc)
			return true
		default:
			s.g.log.Debug("gate: upstream reset", "session", s.id, "unexpected", m)
			return false
		}
	}
}

// upstream is the session's upstream connection: an idle one from the
// pool when there is one, else a new one.
func (s *session) upstream(ctx context.Context, params map[string]string) (*pgconn.HijackedConn, error) {
	if p := s.g.pool; p != nil {
		s.poolKey = poolKey(s.dbName, params)
		if pc := p.take(s.poolKey); pc != nil {
			s.rawUp, s.upReused, s.upBorn = pc.raw, true, pc.born
			return &pgconn.HijackedConn{Conn: pc.c, PID: pc.pid, SecretKey: pc.secret, ParameterStatuses: maps.Clone(pc.params), TxStatus: 'I'}, nil
		}
	}
	s.upBorn = time.Now()
	hj, err := s.connectUpstream(ctx, params)
	var pe *pgconn.PgError
	for err != nil && errors.As(err, &pe) && pe.Code == "53300" && s.g.pool != nil && s.g.pool.evict(s.dbName) {
		// The server is full, and an idle connection of ours holds a slot.
		s.g.log.Info("gate: upstream full; closed an idle upstream connection for this session", "db", s.dbName)
		hj, err = s.connectUpstream(ctx, params)
	}
	return hj, err
}
