package gate

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/evloop"
	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/netfd"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/state"
)

// ErrClosed is returned by Serve after Close.
var ErrClosed = errors.New("gate: closed")

// Upstream is one database the gate offers, reached with brokered
// credentials that operators never see.
type Upstream struct {
	// DSN connects to the real database (a pgx connection string with the
	// brokered user and password). The session runs as its user.
	DSN string
	// Role is the database role named in quorum requests; empty means the
	// DSN's user.
	Role string
}

// Decider is what the gate needs from the policy ([policy.Config]): the
// strictest decision over every statement of a classified string.
type Decider interface {
	DecideResult(user string, groups []string, db string, res classify.Result) policy.Decision
}

// Config wires a gate. State, Quorum, Ledger, Policy and Upstreams are
// required.
type Config struct {
	// Upstreams maps the database name clients ask for to the real one.
	// Any other name is refused.
	Upstreams map[string]Upstream
	Policy    Decider
	State     *state.DB
	Quorum    *quorum.Service
	Ledger    *ledger.Ledger

	// TLS, when set, is offered to clients that ask (SSLRequest).
	TLS *tls.Config
	// RequireTLS refuses clients that do not use TLS.
	RequireTLS bool

	Logger *slog.Logger
	// Now is the clock for requests and the login throttle (default time.Now).
	Now func() time.Time

	// RequestLifetime is how long a held statement's request may be
	// approved and run (default one hour).
	RequestLifetime time.Duration
	// MaxMessageSize bounds one client message (default 64 MiB): a query
	// text or a COPY chunk larger than that is refused, and the session
	// closed, before it is read into memory.
	MaxMessageSize int
	// AuthDelay is the wait after the first failed login from an address;
	// it doubles with each further failure from that address within
	// AuthWindow, up to AuthDelayMax. Defaults 200 ms, 15 min, 8 s.
	AuthDelay, AuthDelayMax, AuthWindow time.Duration
	// RecordReads writes a ledger record for every statement classified
	// read. Off by default: reads are counted in the session's close record
	// instead, so a read-heavy workload does not turn into one ledger write
	// per SELECT. Everything else is always recorded one by one.
	RecordReads bool
	// ClassifyCacheSize is the number of classified statement texts kept
	// per database (default 4096).
	ClassifyCacheSize int
	// MaxConnections bounds the sessions at once, everyone together, and
	// MaxConnectionsPerUser one person's (0: no bound). A login beyond
	// either is refused with 53300 after authentication, before the
	// upstream is asked for a connection.
	MaxConnections, MaxConnectionsPerUser int
	// DryRunTimeout is the statement_timeout of a held UPDATE or DELETE's
	// dry run (default 5 s; negative turns dry runs off). The session
	// waits for it, so it bounds how long a hold can take to answer.
	DryRunTimeout time.Duration
	// NoEventLoop serves every session on goroutines and Go's network
	// poller. By default plaintext sessions are served by an event loop
	// while their statements need no waiting (docs/gate.md).
	NoEventLoop bool
	// LoopBackend is what the event loop runs on: evloop.Auto (io_uring
	// where the kernel has it, else epoll), Epoll or IOURing (an error
	// where the kernel lacks it).
	LoopBackend evloop.Backend
	// Loops is the number of event loops the sessions are spread over
	// (default 1, PgBouncer's design). Each is a thread of its own, so
	// one loop caps the gate's relaying at one core; on the project's
	// 2-core VM two loops cost more CPU per transaction than they gained
	// (docs/benchmarks.md), so more is a setting for larger machines.
	Loops int
	// LoopCPUs pins loop i's thread to LoopCPUs[i mod len]; each must be
	// a CPU the gate may run on. Nil: loop i goes to the i-th CPU the gate
	// may run on, unless NoLoopPin leaves the loops to the scheduler.
	// Pinned, the loop waits less for a CPU under load (evloop.RunOn).
	LoopCPUs  []int
	NoLoopPin bool
	// PoolIdle is the number of idle upstream connections kept per
	// database for the next session with the same startup parameters
	// (default 20; negative: none, every session opens its own). A connection is kept
	// only if its session ended outside a transaction with nothing in
	// flight, and only after DISCARD ALL; it closes after PoolIdleTimeout
	// idle (default 10 min) and is not reused past PoolLifetime (default
	// 1 h).
	PoolIdle                      int
	PoolIdleTimeout, PoolLifetime time.Duration
}

// ConfigFrom is the part of a gate's Config that gate.yaml sets: the
// policy, require_tls, request_expiry, the limits and event_loop. The
// caller adds the rest (upstreams, state, quorum, ledger, TLS, logger).
// `dualkey gate` and `dualkey run` both start from it, so a setting in
// gate.yaml means the same under either.
func ConfigFrom(p *policy.Config) Config {
	c := Config{
		Policy: p, RequireTLS: p.TLS.RequireTLS, RequestLifetime: p.RequestExpiry,
		MaxMessageSize: p.Limits.MaxMessageBytes, MaxConnections: p.Limits.MaxConnections,
		MaxConnectionsPerUser: p.Limits.MaxConnectionsPerUser, DryRunTimeout: p.Limits.DryRunTimeout,
		NoEventLoop: p.NoEventLoop, PoolIdle: p.Limits.PoolIdle, PoolIdleTimeout: p.Limits.PoolIdleTimeout,
		PoolLifetime: p.Limits.PoolLifetime, Loops: p.EventLoops, LoopCPUs: p.LoopCPUs, NoLoopPin: p.NoLoopPin,
	}
	switch p.LoopBackend {
	case "epoll":
		c.LoopBackend = evloop.Epoll
	case "io_uring":
		c.LoopBackend = evloop.IOURing
	}
	if p.Limits.NoDryRun {
		c.DryRunTimeout = -1
	}
	return c
}

func (c *Config) applyDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.RequestLifetime <= 0 {
		c.RequestLifetime = time.Hour
	}
	if c.MaxMessageSize <= 0 {
		c.MaxMessageSize = 64 << 20
	}
	if c.AuthDelay <= 0 {
		c.AuthDelay = 200 * time.Millisecond
	}
	if c.AuthDelayMax <= 0 {
		c.AuthDelayMax = 8 * time.Second
	}
	if c.AuthWindow <= 0 {
		c.AuthWindow = 15 * time.Minute
	}
	if c.ClassifyCacheSize <= 0 {
		c.ClassifyCacheSize = 4096
	}
	if c.DryRunTimeout == 0 {
		c.DryRunTimeout = 5 * time.Second
	}
	if c.Loops <= 0 {
		c.Loops = 1
	}
	if c.PoolIdle == 0 {
		c.PoolIdle = defaultPoolIdle
	}
	if c.PoolIdleTimeout <= 0 {
		c.PoolIdleTimeout = defaultPoolIdleTimeout
	}
	if c.PoolLifetime <= 0 {
		c.PoolLifetime = defaultPoolLifetime
	}
}

// Gate is a running PostgreSQL access gateway.
type Gate struct {
	cfg    Config
	log    *slog.Logger
	mock   []byte // secret for mock SCRAM salts of unknown users
	dbs    map[string]*database
	rec    *recorder
	loops  []*loopState // none: every session on goroutines (Config.NoEventLoop)
	pool   *pool        // nil: no upstream connection is reused
	cancel context.CancelFunc
	ctx    context.Context

	mu       sync.Mutex
	ln       []net.Listener
	sessions map[uint32]*session // by the BackendKeyData process ID we gave
	open     int                 // sessions admitted (limits), everyone together
	openBy   map[string]int      // ... by person
	closed   bool
	wg       sync.WaitGroup

	failMu sync.Mutex
	fails  map[string]failure // by source IP
}

type failure struct {
	n    int
	last time.Time
}

// database is one upstream with its connection settings and caches.
type database struct {
	name   string
	up     Upstream
	config *pgconn.Config
	role   string
	cache  *classify.Cache
	lookup *lookup
}

// New checks cfg and returns a gate; Serve starts it.
func New(cfg Config) (*Gate, error) {
	cfg.applyDefaults()
	switch {
	case cfg.State == nil || cfg.Quorum == nil || cfg.Ledger == nil || cfg.Policy == nil:
		return nil, errors.New("gate: config needs state, quorum, ledger and policy")
	case len(cfg.Upstreams) == 0:
		return nil, errors.New("gate: config names no upstream database")
	case cfg.RequireTLS && cfg.TLS == nil:
		return nil, errors.New("gate: require_tls without a TLS certificate")
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := &Gate{cfg: cfg, log: cfg.Logger, dbs: map[string]*database{}, sessions: map[uint32]*session{}, openBy: map[string]int{},
		fails: map[string]failure{}, ctx: ctx, cancel: cancel}
	g.mock = make([]byte, 32)
	if _, err := rand.Read(g.mock); err != nil {
		cancel()
		return nil, err
	}
	for name, up := range cfg.Upstreams {
		pc, err := pgconn.ParseConfig(up.DSN)
		if err != nil {
			cancel()
			// pgconn's error quotes the DSN with its password masked.
			return nil, fmt.Errorf("gate: upstream %s: %w", name, err)
		}
		role := up.Role
		if role == "" {
			role = pc.User
		}
		d := &database{name: name, up: up, config: pc, role: role, cache: classify.NewCache(cfg.ClassifyCacheSize)}
		d.lookup = newLookup(up.DSN, cfg.Logger)
		g.dbs[name] = d
	}
	if !cfg.NoEventLoop {
		cpus, err := loopCPUs(cfg)
		if err != nil {
			cancel()
			return nil, err
		}
		for i := range cfg.Loops {
			cpu := -1
			if len(cpus) > 0 {
				cpu = cpus[i%len(cpus)]
			}
			lp, err := newLoopState(cfg.LoopBackend, cpu, cfg.Logger)
			if err != nil {
				for _, lp := range g.loops {
					lp.stop()
				}
				cancel()
				return nil, fmt.Errorf("gate: event loop: %w", err)
			}
			g.loops = append(g.loops, lp)
		}
	}
	if cfg.PoolIdle > 0 {
		g.pool = newPool(cfg.PoolIdle, cfg.PoolIdleTimeout, cfg.PoolLifetime)
	}
	g.rec = newRecorder(cfg.Ledger, g.log)
	return g, nil
}

// Serve accepts clients on ln until Close. It always returns a non-nil
// error: ErrClosed after Close.
func (g *Gate) Serve(ln net.Listener) error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrClosed
	}
	g.ln = append(g.ln, ln)
	g.mu.Unlock()
	if len(g.loops) > 0 {
		// Accept outside Go's poller, so that sessions can go to the
		// event loop, and on the loop, so that no thread sits in a
		// blocking accept.
		nl, err := netfd.Listen(ln)
		if err == nil {
			return g.serveOnLoop(nl)
		}
		g.log.Warn("gate: sessions from this listener stay off the event loop", "addr", ln.Addr(), "err", err)
	}
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			g.mu.Lock()
			closed := g.closed
			g.mu.Unlock()
			if closed {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return fmt.Errorf("gate: accept: %w", err)
		}
		delay = 0
		if !g.startSession(c) {
			return ErrClosed
		}
	}
}

// startSession serves c on a goroutine of its own, unless the gate is
// closing (false: c closed).
func (g *Gate) startSession(c net.Conn) bool {
	g.mu.Lock()
	if g.closed {
		// Close is waiting for the sessions: none may start now.
		g.mu.Unlock()
		c.Close()
		return false
	}
	g.wg.Add(1)
	g.mu.Unlock()
	go func() {
		defer g.wg.Done()
		g.serveConn(c)
	}()
	return true
}

// EventLoop says what the gate's event loop runs on: "io_uring", "epoll",
// or "off" (every session on goroutines).
func (g *Gate) EventLoop() string {
	if len(g.loops) == 0 {
		return "off"
	}
	return g.loops[0].l.Backend().String()
}

// LoopCPUs returns the CPUs the event loops are pinned to, as Linux
// writes a list of CPUs (0-3,6), or "" if not every loop is.
func (g *Gate) LoopCPUs() string {
	var cpus []int
	for _, lp := range g.loops {
		if lp.l.CPU() < 0 {
			return ""
		}
		cpus = append(cpus, lp.l.CPU())
	}
	slices.Sort(cpus)
	return cpuList(slices.Compact(cpus))
}

// loopCPUs returns the CPUs the loops are to be pinned to, in turn (nil:
// none), checked against those the gate may run on.
func loopCPUs(cfg Config) ([]int, error) {
	if cfg.NoLoopPin {
		return nil, nil
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		if cfg.LoopCPUs != nil {
			return nil, fmt.Errorf("gate: event_loop_cpus: the CPUs the gate may run on: %w", err)
		}
		return nil, nil // auto: the scheduler's, then
	}
	var allowed []int
	for cpu := range 1024 {
		if set.IsSet(cpu) {
			allowed = append(allowed, cpu)
		}
	}
	if cfg.LoopCPUs == nil {
		return allowed, nil
	}
	for _, cpu := range cfg.LoopCPUs {
		if !slices.Contains(allowed, cpu) {
			return nil, fmt.Errorf("gate: event_loop_cpus: CPU %d is not one the gate may run on (%s)", cpu, cpuList(allowed))
		}
	}
	return cfg.LoopCPUs, nil
}

// cpuList writes CPUs as ranges, as Linux does: 0-3,6.
func cpuList(cpus []int) string {
	var b strings.Builder
	for i := 0; i < len(cpus); {
		j := i
		for j+1 < len(cpus) && cpus[j+1] == cpus[j]+1 {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		if j > i {
			fmt.Fprintf(&b, "%d-%d", cpus[i], cpus[j])
		} else {
			fmt.Fprintf(&b, "%d", cpus[i])
		}
		i = j + 1
	}
	return b.String()
}

// Loops returns the number of event loops (0: off).
func (g *Gate) Loops() int { return len(g.loops) }

// pickLoop returns the event loop with the fewest sessions, for a new one.
func (g *Gate) pickLoop() *loopState {
	best := g.loops[0]
	for _, lp := range g.loops[1:] {
		if lp.active.Load() < best.active.Load() {
			best = lp
		}
	}
	return best
}

// loopCounts adds up the loops' counters (for tests and stats).
func (g *Gate) loopCounts() (entered, escaped, stalls int64) {
	for _, lp := range g.loops {
		entered += lp.entered.Load()
		escaped += lp.escaped.Load()
		stalls += lp.stalls.Load()
	}
	return
}

// serveOnLoop accepts from nl on the event loop until Close.
func (g *Gate) serveOnLoop(nl *netfd.Listener) error {
	fl := fdListener{nl}
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		fl.Close()
		return ErrClosed
	}
	g.ln = append(g.ln, fl)
	g.mu.Unlock()
	// Accepting is light: the first loop does it for every session.
	a := &acceptor{g: g, nl: nl, fd: nl.Fd(), l: g.loops[0].l}
	l := a.l
	if !l.Submit(func() {
		if err := l.Add(a.fd, a, evloop.Readable); err != nil {
			g.log.Error("gate: accept on the event loop", "addr", nl.Addr(), "err", err)
		}
	}) {
		return ErrClosed
	}
	<-g.ctx.Done()
	l.Submit(func() { l.Del(a.fd) })
	return ErrClosed
}

// acceptor accepts connections when the event loop finds the listener
// readable.
type acceptor struct {
	g  *Gate
	nl *netfd.Listener
	fd int
	l  *evloop.Loop // the loop it accepts on
}

// acceptPause is how long accepting stops after an error such as running
// out of file descriptors, rather than spin on it.
const acceptPause = 100 * time.Millisecond

func (a *acceptor) Ready(int, uint32) {
	for {
		c, err := a.nl.TryAccept()
		if errors.Is(err, syscall.EAGAIN) {
			return
		}
		if err != nil {
			if a.g.ctx.Err() != nil {
				return
			}
			a.g.log.Warn("gate: accept", "addr", a.nl.Addr(), "err", err, "pause", acceptPause)
			l := a.l
			l.Mod(a.fd, 0)
			time.AfterFunc(acceptPause, func() { l.Submit(func() { l.Mod(a.fd, evloop.Readable) }) })
			return
		}
		if !a.g.startSession(c) {
			return
		}
	}
}

// fdListener is a netfd.Listener as a net.Listener.
type fdListener struct{ *netfd.Listener }

func (l fdListener) Accept() (net.Conn, error) { return l.Listener.Accept() }

// Close stops accepting, ends every session (cancelling their running
// queries upstream), flushes the ledger records and returns when all
// sessions are gone or ctx ends.
func (g *Gate) Close(ctx context.Context) error {
	g.mu.Lock()
	g.closed = true
	for _, ln := range g.ln {
		ln.Close()
	}
	g.mu.Unlock()
	g.cancel()
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = fmt.Errorf("gate: close: %w", ctx.Err())
	}
	for _, lp := range g.loops {
		lp.stop()
	}
	if g.pool != nil {
		g.pool.close()
	}
	g.rec.close()
	for _, d := range g.dbs {
		d.lookup.close()
	}
	return err
}

// register gives s a process ID and cancel key of its own.
func (g *Gate) register(s *session) {
	var b [8]byte
	g.mu.Lock()
	defer g.mu.Unlock()
	for {
		rand.Read(b[:])
		pid := binary.BigEndian.Uint32(b[:4]) & 0x7fffffff
		if pid == 0 || g.sessions[pid] != nil {
			continue
		}
		s.pid, s.secret = pid, binary.BigEndian.Uint32(b[4:])
		g.sessions[pid] = s
		return
	}
}

// admit counts a session of user against the connection limits; it
// returns the refusal's message when a limit is reached. Every admit that
// returns "" needs a release.
func (g *Gate) admit(user string) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if m := g.cfg.MaxConnections; m > 0 && g.open >= m {
		return fmt.Sprintf("sorry, too many clients already: the dualkey gate allows %d sessions at once (limits.max_connections)", m)
	}
	if m := g.cfg.MaxConnectionsPerUser; m > 0 && g.openBy[user] >= m {
		return fmt.Sprintf("too many connections for user %q: the dualkey gate allows %d sessions per person (limits.max_connections_per_user)", user, m)
	}
	g.open++
	g.openBy[user]++
	return ""
}

func (g *Gate) release(user string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.open--
	if g.openBy[user]--; g.openBy[user] <= 0 {
		delete(g.openBy, user)
	}
}

// Sessions returns the number of sessions admitted and not yet ended,
// everyone together and for user.
func (g *Gate) Sessions(user string) (total, ofUser int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.open, g.openBy[user]
}

func (g *Gate) unregister(s *session) {
	g.mu.Lock()
	if g.sessions[s.pid] == s {
		delete(g.sessions, s.pid)
	}
	g.mu.Unlock()
}

// cancelRequest forwards a client's CancelRequest to the upstream backend
// of the session it names, if the key matches. Like PostgreSQL, it never
// answers.
func (g *Gate) cancelRequest(pid uint32, key []byte) {
	g.mu.Lock()
	s := g.sessions[pid]
	g.mu.Unlock()
	if s == nil || len(key) != 4 || binary.BigEndian.Uint32(key) != s.secret {
		g.log.Warn("cancel request with an unknown key", "pid", pid)
		return
	}
	s.cancelUpstream()
}

// authDelay records a failed login from addr and returns how long to wait
// before answering it.
func (g *Gate) authDelay(addr string) time.Duration {
	now := g.cfg.Now()
	g.failMu.Lock()
	defer g.failMu.Unlock()
	f := g.fails[addr]
	if now.Sub(f.last) > g.cfg.AuthWindow {
		f.n = 0
	}
	f.n++
	f.last = now
	g.fails[addr] = f
	if len(g.fails) > 100000 { // bounded: forget stale sources
		for k, v := range g.fails {
			if now.Sub(v.last) > g.cfg.AuthWindow {
				delete(g.fails, k)
			}
		}
	}
	d := g.cfg.AuthDelay
	for i := 1; i < f.n && d < g.cfg.AuthDelayMax; i++ {
		d *= 2
	}
	return min(d, g.cfg.AuthDelayMax)
}
