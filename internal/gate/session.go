package gate

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/netfd"
	"github.com/dualkey/dualkey/internal/state"
)

// startupTimeout bounds the time from connect to a ready session, as
// PostgreSQL's authentication_timeout (one minute) does.
const startupTimeout = time.Minute

// forwardedParams are the startup parameters passed on to the upstream.
// Anything else is dropped: "options" could carry -c settings such as
// session_replication_role past the classifier, and "replication" would
// open the replication protocol, which the gate does not speak.
var forwardedParams = []string{"application_name", "client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "extra_float_digits"}

const (
	actAllow = policy.Allow
	actHold  = policy.Hold
)

// session is one client connection and its upstream connection.
type session struct {
	g      *Gate
	id     string // for the ledger
	client net.Conn
	be     *pgproto3.Backend
	login  *framedReader // under be until the session relays
	remote string        // the client's IP
	tls    string        // TLS version, "" for plaintext

	user    state.User
	dbName  string
	db      *database
	appName string
	pid     uint32 // ours, given to the client
	secret  uint32

	up       net.Conn
	fe       *pgproto3.Frontend
	upPID    uint32
	upSecret []byte
	upParams map[string]string // ParameterStatus values at login
	r        *relay

	// The upstream pool (pool.go).
	poolKey  string
	upBorn   time.Time // when the upstream connection was opened
	upReused bool      // it came from the pool
	reuseUp  bool      // the session left it reusable
	pooled   bool      // it went back to the pool
	started  time.Time

	// Read and written by the session goroutine; entries' callbacks run
	// on the relay goroutine, hence mu.
	mu      sync.Mutex
	stmts   map[string]*prepared
	portals map[string]*prepared
	counts  map[string]int // statements forwarded, by class

	skipToSync  bool   // a message of this batch was refused: drop until Sync, as PostgreSQL does
	afterSync   string // a statement to run (suppressed) right after the client's next Sync
	copyPending int    // bytes of CopyData buffered towards upstream
	holds       int    // requests opened by this session

	// The verdict judged last ahead of its message (event loop): judge
	// takes it instead of classifying again.
	memoSQL string
	memoV   verdict
	memoOK  bool
	// The session's last few cache hits with their decisions: a client
	// repeating its statements is judged without the shared cache (event
	// loop only).
	recent *classify.Recent[policy.Decision]
	query1 pgproto3.Query // sendQuery's message

	rawClient, rawUp *netfd.Conn   // the sockets, when outside Go's poller (event loop)
	tlsT             *tlsTransport // under the client's TLS, when it may go to the event loop
	onLoop           bool          // the event loop serves the session (mu)
	closing          bool          // closeClient ran (mu)
	ls               *loopSession
}

// prepared is a statement as the gate judged it at Parse.
type prepared struct {
	sql string
	v   verdict
	// approved: a held statement with an approved request; every Execute
	// must consume an approval of its own.
	approved bool
	// allowRecs: the records of an allowed Execute, made at the first and
	// shared by the rest (they are only read): a prepared statement runs
	// many times, and two allocations per Execute showed in the profile.
	allowRecs []*stmtRec
}

type verdict struct {
	res classify.Result
	dec policy.Decision
}

func (g *Gate) serveConn(c net.Conn) {
	s := &session{g: g, client: c, stmts: map[string]*prepared{}, portals: map[string]*prepared{}, counts: map[string]int{}}
	s.rawClient, _ = c.(*netfd.Conn)
	defer func() { s.client.Close() }()
	s.remote, _, _ = net.SplitHostPort(c.RemoteAddr().String())
	c.SetDeadline(time.Now().Add(startupTimeout))
	fr := &framedReader{r: c}
	be := pgproto3.NewBackend(fr, c)
	be.SetMaxBodyLen(g.cfg.MaxMessageSize)
	for {
		m, err := be.ReceiveStartupMessage()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				g.log.Debug("gate: startup", "from", s.remote, "err", err)
			}
			return
		}
		switch m := m.(type) {
		case *pgproto3.SSLRequest:
			if s.tls != "" || g.cfg.TLS == nil {
				if _, err := s.client.Write([]byte{'N'}); err != nil {
					return
				}
				continue
			}
			if _, err := s.client.Write([]byte{'S'}); err != nil {
				return
			}
			transport := s.client
			if s.rawClient != nil && len(g.loops) > 0 {
				// Under TLS the event loop feeds the records to the
				// same tls.Conn; see tlsTransport.
				s.tlsT = &tlsTransport{raw: s.rawClient}
				transport = s.tlsT
			}
			tc := tls.Server(transport, g.cfg.TLS)
			ctx, cancel := context.WithTimeout(g.ctx, startupTimeout)
			err := tc.HandshakeContext(ctx)
			cancel()
			if err != nil {
				g.log.Info("gate: TLS handshake failed", "from", s.remote, "err", err)
				return
			}
			s.client = tc
			s.tls = tls.VersionName(tc.ConnectionState().Version)
			fr = &framedReader{r: tc}
			be = pgproto3.NewBackend(fr, tc)
			be.SetMaxBodyLen(g.cfg.MaxMessageSize)
		case *pgproto3.GSSEncRequest:
			if _, err := s.client.Write([]byte{'N'}); err != nil {
				return
			}
		case *pgproto3.CancelRequest:
			g.cancelRequest(m.ProcessID, m.SecretKey)
			return
		case *pgproto3.StartupMessage:
			s.be, s.login = be, fr
			s.run(m)
			return
		default:
			return
		}
	}
}

// fatal sends a FATAL error to the client before the relay runs.
func (s *session) fatal(code, msg string) {
	s.be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: code, Message: msg})
	s.be.Flush()
}

func (s *session) run(m *pgproto3.StartupMessage) {
	g := s.g
	params := maps.Clone(m.Parameters)
	user := params["user"]
	s.dbName = params["database"]
	if s.dbName == "" {
		s.dbName = user
	}
	s.appName = params["application_name"]
	if user == "" {
		s.fatal("28000", "no PostgreSQL user name specified in startup packet")
		return
	}
	if r := params["replication"]; r != "" && r != "false" && r != "off" && r != "0" && r != "no" {
		s.fatal("28000", "replication connections are not allowed through the dualkey gate")
		return
	}
	if enc, ok := params["client_encoding"]; ok && !classify.SafeClientEncoding(enc) {
		s.refused(user, "client_encoding "+enc)
		s.fatal("22023", fmt.Sprintf("client_encoding %q is not allowed through the dualkey gate: in it a quote or backslash byte can be half of a character, and the gate would read statements differently from the server; use UTF8", enc))
		return
	}
	if g.cfg.RequireTLS && s.tls == "" {
		s.refused(user, "no TLS")
		s.fatal("28000", "the dualkey gate requires TLS: connect with sslmode=require (or stronger)")
		return
	}
	var unknownOpts []string
	for k := range params {
		if strings.HasPrefix(k, "_pq_.") {
			unknownOpts = append(unknownOpts, k)
		}
	}
	if m.ProtocolVersion != pgproto3.ProtocolVersion30 || len(unknownOpts) > 0 {
		s.be.Send(&pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: unknownOpts})
	}
	if !s.authenticate(user) {
		return
	}
	d := g.dbs[s.dbName]
	if d == nil {
		s.refused(user, "unknown database "+s.dbName)
		s.fatal("3D000", fmt.Sprintf("database %q does not exist", s.dbName))
		return
	}
	s.db, s.recent = d, classify.NewRecent(d.cache, s.decision)
	if msg := g.admit(user); msg != "" {
		g.log.Warn("gate: connection limit", "user", user, "db", s.dbName, "from", s.remote)
		s.refused(user, msg)
		s.fatal("53300", msg)
		return
	}
	defer g.release(user)
	ctx, cancel := context.WithTimeout(g.ctx, startupTimeout)
	defer cancel()
	hj, err := s.upstream(ctx, params)
	if err != nil {
		g.log.Error("gate: upstream connect failed", "db", s.dbName, "user", user, "err", err)
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "53300" {
			s.fatal("53300", "sorry, too many clients already (upstream)")
			return
		}
		s.fatal("08006", "the dualkey gate could not reach the database; the gate's log says why")
		return
	}
	s.up, s.fe, s.upPID, s.upSecret, s.upParams = hj.Conn, pgproto3.NewFrontend(hj.Conn, hj.Conn), hj.PID, hj.SecretKey, hj.ParameterStatuses
	defer func() {
		if !s.pooled {
			s.up.Close()
		}
	}()
	for _, k := range []string{"standard_conforming_strings", "client_encoding"} {
		if v, ok := hj.ParameterStatuses[k]; ok && !lexerSafe(k, v) {
			// Set for the role or database upstream (ALTER ROLE ... SET).
			g.log.Error("gate: upstream session reads statements differently from the gate; refused", "db", s.dbName, "setting", k, "value", v)
			s.refused(user, fmt.Sprintf("upstream %s = %s", k, v))
			s.fatal("55000", fmt.Sprintf("the upstream session has %s = %q, under which the gate cannot read statements as the server does; the database's administrator must change it", k, v))
			return
		}
	}
	s.started = g.cfg.Now()
	s.id = newSessionID()
	g.register(s)
	defer g.unregister(s)

	if err := g.rec.sync(ctx, ledger.Entry{Kind: ledger.KindSessionOpen, Actor: s.user.Name, Data: map[string]any{
		"session": s.id, "user": s.user.Name, "db": s.dbName, "from": s.client.RemoteAddr().String(),
		"tls": s.tls != "", "tls_version": s.tls, "application_name": s.appName, "upstream_pid": s.upPID, "upstream_reused": s.upReused,
	}}); err != nil {
		g.log.Error("gate: ledger: session not recorded, refusing it", "user", s.user.Name, "err", err)
		s.fatal("58000", "the dualkey gate cannot write its audit ledger; no session without a record")
		return
	}
	g.log.Info("gate: session open", "session", s.id, "user", s.user.Name, "db", s.dbName, "from", s.remote, "tls", s.tls)

	for k, v := range hj.ParameterStatuses {
		s.be.Send(&pgproto3.ParameterStatus{Name: k, Value: v})
	}
	var key [4]byte
	binary.BigEndian.PutUint32(key[:], s.secret)
	s.be.Send(&pgproto3.BackendKeyData{ProcessID: s.pid, SecretKey: key[:]})
	s.be.Send(&pgproto3.ReadyForQuery{TxStatus: hj.TxStatus})
	if err := s.be.Flush(); err != nil {
		s.closeRecord("client gone")
		return
	}
	s.client.SetDeadline(time.Time{})

	s.r = newRelay(s, hj.TxStatus)
	stop := context.AfterFunc(g.ctx, s.closeClient)
	defer stop()
	why := s.serve()
	s.finish(why)
}

// serve relays until the session ends and returns why: on the event loop
// while it can, then (or from the start: TLS, no loop) on this goroutine
// and the relay's.
func (s *session) serve() string {
	if ls := s.toLoop(); ls != nil {
		why, carryOn := s.fromLoop(<-ls.exit)
		if !carryOn {
			close(s.r.done) // the relay never ran on a goroutine
			return why
		}
	}
	s.login.relaying = true // s.be reads the client from here on, its buffer empty
	go s.r.run()
	return s.loop()
}

// toLoop puts the session on the event loop if it can go there: plaintext
// on both sides, over sockets outside Go's poller. Otherwise the sockets
// go to Go's poller for good and it returns nil.
//
// The hand-over and closeClient exclude each other (mu): closeClient must
// never close an fd the loop is about to use, nor write to the client
// through a transport that is changing modes.
func (s *session) toLoop() *loopSession {
	g := s.g
	tc, _ := s.client.(*tls.Conn)
	plainClient := s.tls == "" && s.client == net.Conn(s.rawClient)
	tlsClient := s.tls != "" && tc != nil && s.tlsT != nil
	eligible := len(g.loops) > 0 && s.rawClient != nil && s.rawUp != nil && (plainClient || tlsClient) &&
		s.up == net.Conn(s.rawUp)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		eligible = false // closeClient closed the client: the goroutines see it
	}
	var cfd, ufd int
	var err error
	if eligible {
		if cfd, err = s.rawClient.Detach(); err == nil {
			if ufd, err = s.rawUp.Detach(); err != nil {
				s.rawClient.UseNetpoll()
			}
		}
		if err != nil {
			g.log.Warn("gate: session stays off the event loop", "session", s.id, "err", err)
			eligible = false
		}
	}
	if !eligible {
		s.netpoll()
		return nil
	}
	lp := g.pickLoop()
	lp.active.Add(1)
	ls := &loopSession{s: s, ls: lp, cfd: cfd, ufd: ufd, exit: make(chan loopExit, 1)}
	s.fe = pgproto3.NewFrontend(s.up, &ls.uout)
	if tlsClient {
		ls.tc, ls.tt = tc, s.tlsT
		s.tlsT.toLoop(&ls.cout)
		s.r.wr = bufio.NewWriterSize(tc, 64<<10) // records, encrypted into cout
	} else {
		s.r.wr = bufio.NewWriterSize(&ls.cout, 64<<10)
	}
	s.onLoop, s.ls = true, ls
	if !lp.l.Submit(ls.start) {
		// The loop has stopped: the gate is closing.
		lp.active.Add(-1)
		ls.exit <- loopExit{why: "client disconnected"}
	}
	return ls
}

// netpoll hands the session's own sockets to Go's poller (mu held).
func (s *session) netpoll() {
	for _, c := range []*netfd.Conn{s.rawClient, s.rawUp} {
		if c != nil {
			if err := c.UseNetpoll(); err != nil && !s.closing {
				s.g.log.Warn("gate: socket to Go's poller", "session", s.id, "err", err)
			}
		}
	}
}

// fromLoop takes the session back from the event loop: the sockets to
// Go's poller, the bytes the loop had not written written, the bytes it
// had not handled read first. carryOn is false when the session ended.
func (s *session) fromLoop(x loopExit) (why string, carryOn bool) {
	reuse := x.why != "" && s.reusable(x)
	s.mu.Lock()
	s.onLoop = false
	if reuse && !s.closing && s.rawUp.Reattach() == nil {
		// The upstream stays outside Go's poller for the next session.
		s.reuseUp = true
		if err := s.rawClient.UseNetpoll(); err != nil {
			s.g.log.Debug("gate: socket to Go's poller", "session", s.id, "err", err)
		}
	} else {
		s.netpoll()
	}
	if s.tlsT != nil {
		s.tlsT.fromLoop() // the records the loop read and TLS did not take are read first
	}
	closing := s.closing
	s.mu.Unlock()
	s.fe = pgproto3.NewFrontend(s.up, s.up)
	s.r.wr = bufio.NewWriterSize(s.client, 64<<10)
	why = x.why
	clientRaw := s.client
	if s.tlsT != nil {
		clientRaw = s.rawClient // x.cout holds records, already encrypted
	}
	if len(x.cout) > 0 {
		if _, err := clientRaw.Write(x.cout); err != nil && why == "" {
			why = "client disconnected: " + err.Error()
		}
	}
	if len(x.uout) > 0 {
		if _, err := s.up.Write(x.uout); err != nil && why == "" {
			why = "upstream closed"
		}
	}
	if why == "" && closing {
		why = "client disconnected" // the gate closes; closeClient found the session on the loop, which had let it go
	}
	if why != "" {
		return why, false
	}
	s.be = pgproto3.NewBackend(io.MultiReader(bytes.NewReader(x.cin), s.client), s.client)
	s.be.SetMaxBodyLen(s.g.cfg.MaxMessageSize)
	s.r.rd = bufio.NewReaderSize(io.MultiReader(bytes.NewReader(x.uin), s.up), 64<<10)
	return "", true
}

// closeClient ends the session from outside (the gate closes). On the
// loop the loop ends it; off the loop it closes the client's socket, under
// TLS the raw one: a close_notify would be written through the transport
// while its mode may change, and the session's own Close sends none to a
// closed socket anyway.
func (s *session) closeClient() {
	s.mu.Lock()
	s.closing = true
	on, ls := s.onLoop, s.ls
	if !on && s.rawClient != nil {
		s.rawClient.Close()
	}
	s.mu.Unlock()
	switch {
	case on:
		if !ls.ls.l.Submit(func() { ls.end("client disconnected") }) {
			s.rawClient.Close() // the loop has stopped and uses the fd no more
		}
	case s.rawClient == nil:
		s.client.Close() // no mode changes: TLS may say goodbye
	}
}

// refused records a session that did not get in.
func (s *session) refused(user, why string) {
	s.g.rec.add(ledger.Entry{Kind: ledger.KindSessionOpen, Actor: user, Data: map[string]any{
		"user": user, "db": s.dbName, "from": s.client.RemoteAddr().String(), "tls": s.tls != "",
		"application_name": s.appName, "refused": why,
	}})
}

func newSessionID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// authenticate runs SCRAM-SHA-256 for user against the state's verifier.
// Unknown users and users without a verifier go through the same exchange
// with a mock verifier and fail at the end, so that the answer does not
// tell which names exist. A failure waits the per-address delay first.
func (s *session) authenticate(user string) bool {
	g := s.g
	ctx, cancel := context.WithTimeout(g.ctx, startupTimeout)
	defer cancel()
	u, err := g.cfg.State.GetUser(ctx, user)
	mock := false
	var v Verifier
	switch {
	case errors.Is(err, state.ErrNotFound):
		mock = true
	case err != nil:
		g.log.Error("gate: state: read user", "user", user, "err", err)
		s.fatal("58000", "the dualkey gate cannot read its user list")
		return false
	default:
		if v, err = ParseVerifier(u.Secret); err != nil {
			mock = true
		}
	}
	if mock {
		v = mockVerifier(g.mock, user)
	}
	sc := &scramServer{v: v, mock: mock}
	s.be.Send(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}})
	if err := s.be.Flush(); err != nil {
		return false
	}
	fail := func(why string) bool {
		d := g.authDelay(s.remote)
		g.log.Warn("gate: authentication failed", "user", user, "from", s.remote, "why", why, "delay", d)
		s.refused(user, "authentication failed: "+why)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
		s.fatal("28P01", fmt.Sprintf("password authentication failed for user %q", user))
		return false
	}
	s.be.SetAuthType(pgproto3.AuthTypeSASL)
	m, err := s.be.Receive()
	if err != nil {
		return false
	}
	init, ok := m.(*pgproto3.SASLInitialResponse)
	if !ok || init.AuthMechanism != "SCRAM-SHA-256" {
		s.fatal("28000", "expected a SCRAM-SHA-256 SASL response")
		return false
	}
	first, err := sc.first(init.Data)
	if err != nil {
		return fail(err.Error())
	}
	s.be.Send(&pgproto3.AuthenticationSASLContinue{Data: []byte(first)})
	if err := s.be.Flush(); err != nil {
		return false
	}
	s.be.SetAuthType(pgproto3.AuthTypeSASLContinue)
	m, err = s.be.Receive()
	if err != nil {
		return false
	}
	resp, ok := m.(*pgproto3.SASLResponse)
	if !ok {
		s.fatal("28000", "expected a SASL response")
		return false
	}
	final, err := sc.final(resp.Data)
	if err != nil {
		why := "wrong password"
		if mock {
			why = "unknown user or no password set"
		}
		return fail(why)
	}
	s.be.Send(&pgproto3.AuthenticationSASLFinal{Data: []byte(final)})
	s.be.Send(&pgproto3.AuthenticationOk{})
	if u.Disabled {
		s.refused(user, "user disabled")
		s.fatal("28000", fmt.Sprintf("user %q is disabled in dualkey", user))
		return false
	}
	s.user = u
	return true
}

// connectUpstream opens the session's own upstream connection with the
// brokered credentials and hands over the raw connection.
func (s *session) connectUpstream(ctx context.Context, params map[string]string) (*pgconn.HijackedConn, error) {
	cfg := s.db.config.Copy()
	cfg.RuntimeParams = maps.Clone(cfg.RuntimeParams)
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	for _, k := range forwardedParams {
		if v, ok := params[k]; ok {
			cfg.RuntimeParams[k] = v
		}
	}
	if len(s.g.loops) > 0 {
		// Dial outside Go's poller, so that the session can go to the
		// event loop; pgconn dials again for each fallback, and the last
		// connection is the one it keeps.
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := netfd.Dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			s.rawUp = c
			return c, nil
		}
	}
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("gate: upstream %s: %w", s.dbName, err)
	}
	if err := pc.SyncConn(ctx); err != nil {
		pc.Close(ctx)
		return nil, fmt.Errorf("gate: upstream %s: %w", s.dbName, err)
	}
	hj, err := pc.Hijack()
	if err != nil {
		return nil, fmt.Errorf("gate: upstream %s: %w", s.dbName, err)
	}
	return hj, nil
}

// cancelUpstream sends a CancelRequest for the session's upstream backend,
// over a connection of its own to the same address.
func (s *session) cancelUpstream() {
	if s.up == nil {
		return
	}
	addr := s.up.RemoteAddr()
	c, err := net.DialTimeout(addr.Network(), addr.String(), 10*time.Second)
	if err != nil {
		s.g.log.Warn("gate: cancel: dial upstream", "session", s.id, "err", err)
		return
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := (&pgproto3.CancelRequest{ProcessID: s.upPID, SecretKey: s.upSecret}).Encode(nil)
	if err == nil {
		_, err = c.Write(b)
	}
	if err != nil {
		s.g.log.Warn("gate: cancel: send", "session", s.id, "err", err)
		return
	}
	// Wait for the server to close: the cancel has been read by then.
	io.Copy(io.Discard, c)
	s.g.log.Info("gate: cancel forwarded", "session", s.id)
}

// finish ends the session: a client that vanished mid-query gets its
// upstream query cancelled, then the upstream connection closes.
func (s *session) finish(why string) {
	if (s.reuseUp || (!s.r.dead() && s.parkable(why))) && s.release() {
		s.pooled = true
		<-s.r.done
		s.closeRecord(why)
		return
	}
	if s.r.busy() {
		s.cancelUpstream()
	}
	s.fe.Send(&pgproto3.Terminate{})
	s.fe.Flush()
	s.up.Close()
	<-s.r.done
	s.closeRecord(why)
}

func (s *session) closeRecord(why string) {
	s.mu.Lock()
	counts := maps.Clone(s.counts)
	s.mu.Unlock()
	s.g.rec.add(ledger.Entry{Kind: ledger.KindSessionClose, Actor: s.user.Name, Data: map[string]any{
		"session": s.id, "user": s.user.Name, "db": s.dbName, "why": why,
		"seconds": s.g.cfg.Now().Sub(s.started).Seconds(), "statements": counts,
	}})
	s.g.log.Info("gate: session closed", "session", s.id, "user", s.user.Name, "why", why)
}

// loop reads client messages until the client leaves, and returns why.
func (s *session) loop() string {
	for {
		msg, err := s.be.Receive()
		if err != nil {
			if s.r.dead() {
				return "upstream closed"
			}
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) {
				return "client disconnected"
			}
			var ne net.Error
			if errors.As(err, &ne) {
				return "client disconnected: " + err.Error()
			}
			// Oversized or malformed: PostgreSQL closes such a connection too.
			s.r.stop()
			s.be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "08P01",
				Message: "invalid frontend message: " + err.Error()})
			s.be.Flush()
			return "protocol violation: " + err.Error()
		}
		if why := s.dispatch(msg); why != "" {
			return why
		}
		if s.r.dead() {
			return "upstream closed"
		}
	}
}

// dispatch handles one client message; it returns why the session ends,
// or "".
func (s *session) dispatch(msg pgproto3.FrontendMessage) string {
	switch m := msg.(type) {
	case *pgproto3.Query:
		s.query(m.String)
	case *pgproto3.Parse:
		s.parse(m)
	case *pgproto3.Bind:
		s.bind(m.DestinationPortal, s.stmtNamed(m.PreparedStatement), m.PreparedStatement, m)
	case *rawBind:
		s.bind(m.portal, s.stmtNamedRaw(m.stmt), "", m)
	case *pgproto3.Describe:
		if !s.skipToSync {
			s.send(m, newEntry(ekDescribe))
		}
	case *pgproto3.Execute:
		s.execute(m)
	case *pgproto3.Close:
		s.closeMsg(m)
	case *pgproto3.Sync:
		s.sync()
	case *pgproto3.Flush:
		if !s.skipToSync {
			s.fe.Send(m)
		}
		s.flushUp()
	case *pgproto3.CopyData:
		s.fe.Send(m)
		s.copyPending += len(m.Data)
		if s.copyPending > 64<<10 {
			s.flushUp()
		}
	case *pgproto3.CopyDone, *pgproto3.CopyFail:
		s.fe.Send(m)
		s.flushUp()
	case *pgproto3.FunctionCall:
		// The fast-path interface calls any function by OID, past any
		// SQL the classifier could read.
		s.refuseQuery(errorResponse("0A000", "the function call protocol is not supported through the dualkey gate", "", ""))
	case *pgproto3.Terminate:
		return "client terminated"
	default:
		s.r.stop()
		s.be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "08P01",
			Message: fmt.Sprintf("unexpected message %T", msg)})
		s.be.Flush()
		return fmt.Sprintf("protocol violation: %T", msg)
	}
	return ""
}

// send forwards m upstream with its response entry queued first.
func (s *session) send(m pgproto3.FrontendMessage, e *entry) {
	s.r.push(e)
	s.fe.Send(m)
}

// sendQuery is send of a Query, with the session's own message: Send
// encodes it at once, and a new one each time would be garbage.
func (s *session) sendQuery(sql string, e *entry) {
	s.query1.String = sql
	s.send(&s.query1, e)
	s.query1.String = ""
}

func (s *session) flushUp() {
	s.copyPending = 0
	if err := s.fe.Flush(); err != nil {
		s.g.log.Debug("gate: write upstream", "session", s.id, "err", err)
		s.up.Close()
	}
}

func (s *session) judge(sql string) verdict {
	if s.memoOK && s.memoSQL == sql {
		s.memoOK = false
		return s.memoV
	}
	return s.judgeNow(sql)
}

// judgeNow classifies sql (parsing it unless cached, which may look up
// functions in the database) and decides it. Safe off the session's
// goroutine: it reads only what does not change.
func (s *session) judgeNow(sql string) verdict {
	res := s.db.cache.Classify(sql, classify.Options{Lookup: s.db.lookup.volatility})
	return s.decide(res)
}

func (s *session) decide(res classify.Result) verdict {
	return verdict{res: res, dec: s.decision(res)}
}

func (s *session) decision(res classify.Result) policy.Decision {
	return s.g.cfg.Policy.DecideResult(s.user.Name, s.user.Groups, s.dbName, res)
}

// cachedVerdict returns sql's verdict if that needs no parse, and keeps it
// for the judge that follows.
func (s *session) cachedVerdict(sql string) (verdict, bool) {
	if s.memoOK && s.memoSQL == sql {
		return s.memoV, true
	}
	res, dec, ok := s.recent.Cached(sql)
	if !ok {
		return verdict{}, false
	}
	s.memoSQL, s.memoV, s.memoOK = sql, verdict{res: res, dec: dec}, true
	return s.memoV, true
}

// guarded reports whether v needs the blast-radius guard, and whether it
// can be measured at all (one statement whose command tag counts its rows).
func guarded(v verdict) (need, measurable bool) {
	if v.dec.Action != actAllow || v.dec.RowLimit <= 0 {
		return false, false
	}
	for _, st := range v.res.Statements {
		if st.RowsGuard {
			need = true
		}
	}
	return need, need && len(v.res.Statements) == 1 && v.res.Statements[0].RowsCounted
}

// query handles a simple-protocol query: the whole string is judged, every
// statement in it, and the strictest class decides.
func (s *session) query(sql string) {
	s.skipToSync = false
	if s.g.rec.failing() {
		s.refuseQuery(ledgerDown())
		return
	}
	v := s.judge(sql)
	switch v.dec.Action {
	case actAllow:
		if need, ok := guarded(v); need {
			if !ok {
				s.refuseQuery(s.hold(sql, v, impact{guardRows: -1, dryRows: -1, note: "the row limit cannot be measured for this statement (several statements, or a write hidden in WITH, DO or a function): send the UPDATE or DELETE on its own"}))
				return
			}
			s.guardRun(sql, v, nil)
			return
		}
		e := newEntry(ekQuery)
		e.recs = s.recs(v, "allow", "")
		s.sendQuery(sql, e)
		s.flushUp()
	case actHold:
		if id, ok := s.consumeApproved(sql, v.res.Class); ok {
			s.sendQuery(sql, &entry{kind: ekQuery, recs: s.recs(v, "approved", id)})
			s.flushUp()
			return
		}
		s.refuseQuery(s.holdPolicy(sql, v))
	default:
		s.deny(sql, v)
		s.refuseQuery(denyError(v))
	}
}

// refuseQuery answers a simple query (or a function call) with err. The
// error comes back through the upstream: a statement that cannot parse is
// sent in its place, so PostgreSQL itself fails the transaction exactly
// as the refused statement failing would have, and the answer arrives in
// order with everything still in flight.
func (s *session) refuseQuery(err *pgproto3.ErrorResponse) {
	s.sendQuery(refusedSQL, &entry{kind: ekQuery, replace: err})
	s.flushUp()
}

// refuseExt answers an extended-protocol message with err and skips the
// rest of the batch up to Sync, as PostgreSQL does after an error.
func (s *session) refuseExt(err *pgproto3.ErrorResponse) {
	s.send(&pgproto3.Parse{Name: refusedName, Query: refusedSQL}, &entry{kind: ekParse, replace: err})
	s.skipToSync = true
}

// refusedSQL never parses: PostgreSQL answers it with a syntax error, which
// the relay replaces with the gate's own error.
const (
	refusedSQL  = "dualkey_refused"
	refusedName = "dualkey_refused"
)

// reservedPrefix begins the names of the statements and portals the gate
// injects (dualkey_guard, dualkey_dryrun, dualkey_refused): a client's own
// of that name would be closed under it.
const reservedPrefix = "dualkey_"

func reservedName(name string) *pgproto3.ErrorResponse {
	return errorResponse("42602", fmt.Sprintf("invalid name %q: names beginning with %q are reserved by the dualkey gate", name, reservedPrefix), "", "")
}

func (s *session) parse(m *pgproto3.Parse) {
	if s.skipToSync {
		return
	}
	if strings.HasPrefix(m.Name, reservedPrefix) {
		s.refuseExt(reservedName(m.Name))
		return
	}
	v := s.judge(m.Query)
	p := &prepared{sql: m.Query, v: v}
	switch v.dec.Action {
	case actAllow:
	case actHold:
		if s.hasApproved(m.Query, v.res.Class) {
			p.approved = true // consumed at each Execute
			break
		}
		s.refuseExt(s.holdPolicy(m.Query, v))
		return
	default:
		s.deny(m.Query, v)
		s.refuseExt(denyError(v))
		return
	}
	e := &entry{kind: ekParse}
	had := s.define(s.stmts, m.Name, p, &e.undef)
	s.send(m, e)
	if had && m.Name != "" {
		// Reusing a name: if PostgreSQL refuses it ("already exists"), the
		// old statement stays; settle which before judging anything else.
		s.drain()
	}
}

// bind handles a Bind of statement p (nil: none by that name; name is
// for the error, "" when the caller has it only as bytes) into portal.
func (s *session) bind(portal string, p *prepared, name string, m pgproto3.FrontendMessage) {
	if s.skipToSync {
		return
	}
	if strings.HasPrefix(portal, reservedPrefix) {
		s.refuseExt(reservedName(portal))
		return
	}
	if p == nil {
		if rb, ok := m.(*rawBind); ok {
			name = string(rb.stmt)
		}
		// Also a statement made by SQL PREPARE: the gate judges what it
		// saw parsed, and did not see this.
		s.refuseExt(errorResponse("26000", fmt.Sprintf("prepared statement %q does not exist", name), "", ""))
		return
	}
	e := newEntry(ekBind)
	s.define(s.portals, portal, p, &e.undef)
	s.send(m, e)
}

func (s *session) stmtNamed(name string) *prepared {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stmts[name]
}

// stmtNamedRaw is stmtNamed of a name still in the message's bytes: a map
// index by string(name) copies nothing.
func (s *session) stmtNamedRaw(name []byte) *prepared {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stmts[string(name)]
}

// define sets name in table (the statements or the portals) to p, and
// fills u with what undoes that when PostgreSQL refuses the message (a
// field of the message's entry, not a closure: one allocation less per
// Bind). had: name was defined before.
func (s *session) define(table map[string]*prepared, name string, p *prepared, u *undef) (had bool) {
	s.mu.Lock()
	prev, had := table[name]
	table[name] = p
	s.mu.Unlock()
	*u = undef{table: table, name: name, p: p, prev: prev, had: had}
	return had
}

// undef undoes a definition PostgreSQL refused: a named statement or
// portal keeps its old definition, the unnamed one (dropped before the new
// one is parsed or bound) is gone.
type undef struct {
	table   map[string]*prepared // nil: nothing to undo
	name    string
	p, prev *prepared
	had     bool
}

func (s *session) undefine(u *undef) {
	if u.table == nil {
		return
	}
	s.mu.Lock()
	if u.table[u.name] == u.p {
		if u.had && u.name != "" {
			u.table[u.name] = u.prev
		} else {
			delete(u.table, u.name)
		}
	}
	s.mu.Unlock()
}

func (s *session) execute(m *pgproto3.Execute) {
	if s.skipToSync {
		return
	}
	s.mu.Lock()
	p := s.portals[m.Portal]
	s.mu.Unlock()
	if p == nil {
		s.refuseExt(errorResponse("34000", fmt.Sprintf("portal %q does not exist", m.Portal), "", ""))
		return
	}
	if s.g.rec.failing() {
		s.refuseExt(ledgerDown())
		return
	}
	decision := "allow"
	var reqID string
	if p.approved {
		id, ok := s.consumeApproved(p.sql, p.v.res.Class)
		if !ok {
			s.refuseExt(s.holdPolicy(p.sql, p.v))
			return
		}
		decision, reqID = "approved", id
	} else if need, ok := guarded(p.v); need {
		if !ok {
			s.refuseExt(s.hold(p.sql, p.v, impact{guardRows: -1, dryRows: -1, note: "the row limit cannot be measured for this statement: a write hidden in WITH, DO or a function"}))
			return
		}
		exec := *m
		s.guardRun(p.sql, p.v, &exec)
		return
	}
	recs := p.allowRecs
	if decision != "allow" {
		recs = s.recs(p.v, decision, reqID)
	} else if recs == nil {
		recs = s.recs(p.v, decision, "")
		p.allowRecs = recs
	}
	e := newEntry(ekExecute)
	e.recs = recs
	s.send(m, e)
}

func (s *session) closeMsg(m *pgproto3.Close) {
	if s.skipToSync {
		return
	}
	s.mu.Lock()
	if m.ObjectType == 'S' {
		delete(s.stmts, m.Name)
	} else {
		delete(s.portals, m.Name)
	}
	s.mu.Unlock()
	s.send(m, &entry{kind: ekClose})
}

func (s *session) sync() {
	s.skipToSync = false
	if s.afterSync != "" {
		// The guard opened a transaction that an error then aborted: end it,
		// and answer the client with the status that follows.
		sql := s.afterSync
		s.afterSync = ""
		s.send(&pgproto3.Sync{}, &entry{kind: ekSync, dropRFQ: true})
		s.inject(sql)
		s.send(&pgproto3.Sync{}, &entry{kind: ekSync, suppress: true, keepRFQ: true})
	} else {
		s.send(&pgproto3.Sync{}, newEntry(ekSync))
	}
	s.flushUp()
}

// inject runs sql upstream as a named extended-protocol statement whose
// responses the client never sees. Named, so that the client's unnamed
// statement and portal survive it.
func (s *session) inject(sql string) {
	const name = "dualkey_guard"
	s.send(&pgproto3.Parse{Name: name, Query: sql}, &entry{kind: ekParse, suppress: true})
	s.send(&pgproto3.Bind{DestinationPortal: name, PreparedStatement: name}, &entry{kind: ekBind, suppress: true})
	s.send(&pgproto3.Execute{Portal: name}, &entry{kind: ekExecute, suppress: true})
	s.send(&pgproto3.Close{ObjectType: 'P', Name: name}, &entry{kind: ekClose, suppress: true})
	s.send(&pgproto3.Close{ObjectType: 'S', Name: name}, &entry{kind: ekClose, suppress: true})
}

// drain waits until the upstream has answered everything sent so far.
func (s *session) drain() {
	s.fe.Send(&pgproto3.Flush{})
	s.flushUp()
	s.r.waitEmpty(s.g.ctx)
}

// guardRun runs a statement the policy allows with a row limit: inside a
// savepoint (or a transaction of its own when the client is not in one),
// reading the rows it touched from its command tag. Within the limit it is
// released (committed) and its results reach the client; beyond it, it is
// rolled back and held like a destructive statement, the request showing
// the measured rows. exec is nil for a simple query.
func (s *session) guardRun(sql string, v verdict, exec *pgproto3.Execute) {
	s.drain()
	block, failed := s.r.txState()
	if failed || s.r.skipping() {
		// PostgreSQL refuses it anyway ("current transaction is aborted"),
		// or skips it (an earlier message of the batch failed: waiting
		// for a guard report that never comes would hang the session).
		if exec == nil {
			s.sendQuery(sql, &entry{kind: ekQuery, recs: s.recs(v, "allow", "")})
			s.flushUp()
		} else {
			s.send(exec, &entry{kind: ekExecute, recs: s.recs(v, "allow", "")})
		}
		return
	}
	if block {
		s.inject("SAVEPOINT dualkey_guard")
	} else {
		s.inject("BEGIN")
	}
	gd := &guard{report: make(chan guardReport, 1), decide: make(chan guardDecision, 1)}
	recs := s.recs(v, "allow", "")
	if exec == nil {
		s.sendQuery(sql, &entry{kind: ekQuery, guard: gd, recs: recs})
	} else {
		s.send(exec, &entry{kind: ekExecute, guard: gd, recs: recs})
		s.fe.Send(&pgproto3.Flush{})
	}
	s.flushUp()
	var rep guardReport
	select {
	case rep = <-gd.report:
	case <-s.r.done:
		return
	}
	limit := v.dec.RowLimit
	switch {
	case rep.failed:
		// The statement failed by itself: the client sees its error.
		gd.decide <- guardDecision{keep: true, dropRFQ: exec == nil && !block}
		if !block {
			if exec == nil {
				s.inject("ROLLBACK")
				s.send(&pgproto3.Sync{}, &entry{kind: ekSync, suppress: true, keepRFQ: true})
				s.flushUp()
			} else {
				s.afterSync = "ROLLBACK"
			}
		}
		return
	case rep.rows <= limit && !rep.overflow:
		s.guardKeep(gd, block, exec == nil)
		return
	}
	note := fmt.Sprintf("touches %d rows, more than the limit of %d (measured in a transaction rolled back by the gate)", rep.rows, limit)
	if rep.overflow {
		note = fmt.Sprintf("returns more than the gate can hold back while measuring (%d rows so far, limit %d)", rep.rows, limit)
	}
	if id, ok := s.consumeApproved(sql, v.res.Class); ok && !rep.overflow {
		s.g.log.Info("gate: guarded statement runs on approval", "session", s.id, "request", id, "rows", rep.rows)
		recs[0].decision, recs[0].request = "approved", id
		s.guardKeep(gd, block, exec == nil)
		return
	}
	recs[0].decision = "rolled back"
	gd.decide <- guardDecision{keep: false, dropRFQ: exec == nil}
	if block {
		s.inject("ROLLBACK TO SAVEPOINT dualkey_guard")
		s.inject("RELEASE SAVEPOINT dualkey_guard")
	} else {
		s.inject("ROLLBACK")
	}
	herr := s.hold(sql, v, impact{guardRows: rep.rows, dryRows: -1, note: note})
	if exec == nil {
		s.refuseQuery(herr)
	} else {
		s.refuseExt(herr)
		s.flushUp()
	}
}

func (s *session) guardKeep(gd *guard, block, simple bool) {
	gd.decide <- guardDecision{keep: true, dropRFQ: simple}
	if block {
		s.inject("RELEASE SAVEPOINT dualkey_guard")
	} else {
		s.inject("COMMIT")
	}
	if simple {
		s.send(&pgproto3.Sync{}, &entry{kind: ekSync, suppress: true, keepRFQ: true})
	}
	s.flushUp()
}

// recs returns the ledger records to fill in as v's statements complete.
func (s *session) recs(v verdict, decision, request string) []*stmtRec {
	if len(v.res.Statements) > 1 {
		out := make([]*stmtRec, len(v.res.Statements))
		for i, st := range v.res.Statements {
			out[i] = &stmtRec{class: string(st.Class), text: st.Text, decision: decision, rule: v.dec.Rule, request: request}
		}
		return out
	}
	// One record and its slice in one allocation: this is on the path of
	// every simple query.
	one := new(struct {
		ptr [1]*stmtRec
		rec stmtRec
	})
	one.rec = stmtRec{class: string(v.res.Class), decision: decision, rule: v.dec.Rule, request: request}
	if len(v.res.Statements) == 1 {
		st := v.res.Statements[0]
		one.rec.class, one.rec.text = string(st.Class), st.Text
	}
	one.ptr[0] = &one.rec
	return one.ptr[:]
}

// completed records one statement that ran (rows >= 0) or failed (code).
func (s *session) completed(r *stmtRec, rows int64, code string) {
	s.mu.Lock()
	s.counts[r.class]++
	s.mu.Unlock()
	if r.class == string(classify.Read) && r.decision == "allow" && !s.g.cfg.RecordReads && code == "" {
		return
	}
	if !r.audited {
		r.audit, r.audited = auditText(r.text), true
	}
	st := newRanStmt()
	*st = ranStmt{session: s.id, db: s.dbName, actor: s.user.Name, rule: r.rule, at: time.Now().UTC(),
		text: stmtText{Class: r.class, Decision: r.decision, SQL: r.audit}, err: code, request: r.request, rows: rows}
	s.g.rec.ran(st)
}

// auditText is the statement as the ledger keeps it: clipped, and without
// its text when it may carry a password (CREATE/ALTER ROLE ... PASSWORD).
func auditText(sql string) string {
	if containsPassword(sql) {
		return "(text withheld: it may contain a password)"
	}
	if len(sql) > 4096 {
		return sql[:4096] + "…"
	}
	return sql
}

// containsPassword reports whether sql has "password" in any mix of case.
// PostgreSQL folds only ASCII letters in keywords, so an ASCII fold is
// exact, and it spares each recorded statement strings.ToLower's copy
// (4 µs of the gate's CPU per pgbench TPC-B transaction).
func containsPassword(sql string) bool {
	const word = "password"
	for i := 0; i+len(word) <= len(sql); i++ {
		if sql[i]|0x20 != 'p' {
			continue
		}
		j := 1
		for ; j < len(word) && sql[i+j]|0x20 == word[j]; j++ {
		}
		if j == len(word) {
			return true
		}
	}
	return false
}

func (s *session) deny(sql string, v verdict) {
	s.g.log.Info("gate: statement denied", "session", s.id, "user", s.user.Name, "db", s.dbName, "class", v.res.Class, "rule", v.dec.Rule)
	s.g.rec.add(ledger.Entry{Kind: ledger.KindStatement, Actor: s.user.Name, Data: map[string]any{
		"session": s.id, "db": s.dbName, "class": string(v.res.Class), "decision": "deny", "rule": v.dec.Rule,
		"reason": v.res.Reason, "sql": auditText(sql)}})
}

func errorResponse(code, msg, detail, hint string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{Severity: "ERROR", SeverityUnlocalized: "ERROR", Code: code, Message: msg, Detail: detail, Hint: hint}
}

// ledgerDown answers every statement while the ledger cannot be written
// (recorder.failing): the gate runs nothing it cannot record.
func ledgerDown() *pgproto3.ErrorResponse {
	return errorResponse("58000", "dualkey: the gate cannot write its audit ledger; no statement runs until it can", "",
		"The gate's log says why. It retries on its own; try again shortly.")
}

func denyError(v verdict) *pgproto3.ErrorResponse {
	rule := v.dec.Rule
	if rule == "" {
		rule = "(default: nothing is allowed unless a rule says so)"
	}
	return errorResponse("42501", fmt.Sprintf("dualkey: statement denied by %s", rule),
		fmt.Sprintf("class %s: %s", v.res.Class, v.res.Reason), v.dec.Message)
}
