package gate

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/evloop"
	"github.com/dualkey/dualkey/internal/netfd"
)

// The event loop serves the hot path of established plaintext sessions:
// client messages the gate can decide without waiting for anything
// (allowed and unguarded statements whose classification is cached,
// denials, the extended protocol's plumbing, COPY data) are judged and
// forwarded inline on the loop's thread, and upstream messages relayed
// the same way, reading only sockets epoll reports ready and writing once
// per round (docs/gate.md, "The event loop").
//
// Anything else leaves the loop for good: a statement to hold, a guarded
// or approved one, a reused statement name, a malformed or unknown
// message, the end of the session. The loop hands the session's sockets
// and every byte it has not yet dealt with back to the session's
// goroutine, which carries on exactly as a session that never was on the
// loop (goroutines and Go's network poller). A classification that is not
// cached is done by a goroutine while the session's client side pauses.

// loopState is the gate's event loop and what its thread alone uses.
type loopState struct {
	l        *evloop.Loop
	buf      []byte // one read at a time, shared by every session
	sessions map[*loopSession]struct{}

	entered, escaped atomic.Int64 // sessions put on the loop, and those that left it before their end
	active           atomic.Int64 // sessions given to the loop and not yet handed back
	stalls           atomic.Int64 // times a session's output waited for its socket
}

// newLoopState starts an event loop on backend b, pinned to cpu (-1: not
// pinned). A pin that fails, as it should not once the CPU was checked,
// leaves the loop to the scheduler with a warning rather than no gate.
func newLoopState(b evloop.Backend, cpu int, log *slog.Logger) (*loopState, error) {
	l, err := evloop.NewBackend(b)
	if err != nil {
		return nil, err
	}
	ls := &loopState{l: l, buf: make([]byte, loopReadSize), sessions: map[*loopSession]struct{}{}}
	if cpu < 0 {
		go l.Run()
	} else if err := l.RunOn(cpu); err != nil {
		log.Warn("gate: event loop left unpinned", "err", err)
		go l.Run()
	}
	return ls, nil
}

// stop ends the sessions still on the loop and the loop.
func (lp *loopState) stop() {
	lp.l.Submit(func() {
		for ls := range lp.sessions {
			ls.end("client disconnected")
		}
	})
	lp.l.Stop()
}

const loopReadSize = 128 << 10

// loopExit is what the loop hands back to the session's goroutine.
type loopExit struct {
	why        string // the session ends; "" when it carries on off the loop
	cin, uin   []byte // bytes read and not yet handled, from the client and the upstream
	cout, uout []byte // bytes not yet written to the client and the upstream
}

// loopSession is a session on the loop; its fields belong to the loop's
// thread.
type loopSession struct {
	s          *session
	ls         *loopState
	cfd, ufd   int
	cin, uin   []byte // partial messages carried over to the next read
	cout, uout evloop.Out
	cev, uev   uint32 // events the fds are registered for
	paused     bool   // a goroutine classifies the next client message
	ended      bool
	exit       chan loopExit
	dec        decoders

	tc *tls.Conn     // the client's TLS, if any
	tt *tlsTransport // ... and the transport under it
}

// start registers the session's fds (on the loop).
func (ls *loopSession) start() {
	ls.ls.sessions[ls] = struct{}{}
	ls.ls.entered.Add(1)
	ls.cev, ls.uev = evloop.Readable, evloop.Readable
	if err := ls.ls.l.AddConn(ls.cfd, ls, ls.cev); err != nil {
		ls.end("event loop: " + err.Error())
		return
	}
	if err := ls.ls.l.AddConn(ls.ufd, ls, ls.uev); err != nil {
		ls.end("event loop: " + err.Error())
		return
	}
	if ls.tc != nil {
		// TLS may hold plaintext already (a query in the record of the
		// client's last login message): epoll will not say so.
		ls.Ready(ls.cfd, evloop.Readable)
	}
}

// Ready is called by the loop when one of the session's fds is ready.
func (ls *loopSession) Ready(fd int, events uint32) {
	if ls.ended {
		return
	}
	const in = evloop.Readable | syscall.EPOLLERR | syscall.EPOLLHUP
	if events&(syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
		// epoll reports these even for an fd watched for nothing, and
		// again every round: a side the loop is not reading now (paused,
		// or its peer not taking output) would spin. The socket is dead.
		if fd == ls.cfd && (ls.paused || ls.uout.Pending() > 0) {
			ls.end("client disconnected")
			return
		}
		if fd == ls.ufd && ls.cout.Pending() > 0 {
			ls.end("upstream closed")
			return
		}
	}
	if fd == ls.cfd {
		if events&in != 0 {
			ls.readClient()
		}
	} else if events&in != 0 {
		ls.readUp()
	}
	ls.settle()
}

// settle writes what the round produced and watches the fds for what
// comes next: a side's input only while the other side takes its output
// (so a slow reader holds its writer back), output readiness only while
// bytes wait.
func (ls *loopSession) settle() {
	if ls.ended {
		return
	}
	if err := ls.s.r.wr.Flush(); err != nil {
		ls.end("client disconnected: " + err.Error())
		return
	}
	if ls.uout.Pending() > 0 {
		if _, err := ls.ls.l.Flush(ls.ufd, &ls.uout); err != nil {
			ls.end("upstream closed")
			return
		}
	}
	if ls.cout.Pending() > 0 {
		if _, err := ls.ls.l.Flush(ls.cfd, &ls.cout); err != nil {
			ls.end("client disconnected: " + err.Error())
			return
		}
	}
	if (ls.cout.Pending() > 0 && ls.cev&evloop.Writable == 0) || (ls.uout.Pending() > 0 && ls.uev&evloop.Writable == 0) {
		ls.ls.stalls.Add(1)
	}
	var cev, uev uint32
	if ls.uout.Pending() == 0 && !ls.paused {
		cev |= evloop.Readable
	}
	if ls.cout.Pending() > 0 {
		cev |= evloop.Writable
	}
	if ls.cout.Pending() == 0 {
		uev |= evloop.Readable
	}
	if ls.uout.Pending() > 0 {
		uev |= evloop.Writable
	}
	if cev != ls.cev {
		if err := ls.ls.l.Mod(ls.cfd, cev); err != nil {
			ls.end("event loop: " + err.Error())
			return
		}
		ls.cev = cev
	}
	if uev != ls.uev {
		if err := ls.ls.l.Mod(ls.ufd, uev); err != nil {
			ls.end("event loop: " + err.Error())
			return
		}
		ls.uev = uev
	}
}

// read reads fd once (level-triggered: epoll says again if more is
// there) and returns the bytes with carry prepended.
func (ls *loopSession) read(fd int, carry []byte) ([]byte, error) {
	n, err := ls.ls.l.Read(fd, ls.ls.buf)
	if err != nil {
		return nil, err
	}
	if len(carry) > 0 {
		return append(carry, ls.ls.buf[:n]...), nil
	}
	return ls.ls.buf[:n], nil
}

// keep returns rest as the carry of the next read: copied out of the
// shared buffer (or slid to the front of the carry it is part of).
func keep(carry, rest []byte) []byte {
	if len(rest) == 0 {
		return carry[:0]
	}
	return append(carry[:0], rest...)
}

func (ls *loopSession) readClient() {
	if ls.paused || ls.uout.Pending() > 0 {
		return
	}
	if ls.tc != nil {
		ls.readClientTLS()
		return
	}
	data, err := ls.read(ls.cfd, ls.cin)
	if ls.clientReadFailed(err) {
		return
	}
	ls.clientData(data)
}

// clientReadFailed reports whether a read from the client brought nothing
// to handle, ending the session if the client is gone.
func (ls *loopSession) clientReadFailed(err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, syscall.EAGAIN):
	case errors.Is(err, io.EOF):
		ls.end("client disconnected")
	default:
		ls.end("client disconnected: " + err.Error())
	}
	return true
}

// readClientTLS reads the client's records, decrypts what they complete
// and handles the messages in it.
func (ls *loopSession) readClientTLS() {
	n, err := ls.ls.l.Read(ls.cfd, ls.ls.buf)
	// Nothing new on the socket still leaves what TLS holds decrypted.
	if !errors.Is(err, syscall.EAGAIN) && ls.clientReadFailed(err) {
		return
	}
	ls.tt.feed(ls.ls.buf[:n])
	data := ls.cin
	ls.cin = nil
	for {
		m, err := ls.tc.Read(ls.ls.buf)
		data = append(data, ls.ls.buf[:m]...)
		if errors.Is(err, errWouldBlock) {
			break
		}
		if ls.clientReadFailed(err) {
			return // TLS's close_notify (EOF) or a bad record
		}
	}
	ls.clientData(data)
}

// clientData handles the complete messages in data and keeps the rest.
func (ls *loopSession) clientData(data []byte) {
	s := ls.s
	off := 0
	for !ls.ended && !ls.paused {
		typ, body, size, ok := frame(data[off:], s.g.cfg.MaxMessageSize)
		if !ok {
			ls.escape(data[off:], "message length") // the goroutine's decoder refuses it, as always
			return
		}
		if size == 0 {
			break
		}
		msg := ls.dec.decode(typ, body)
		if msg == nil {
			ls.escape(data[off:], fmt.Sprintf("message type %q", typ))
			return
		}
		switch ls.inline(msg) {
		case inlineNo:
			ls.escape(data[off:], fmt.Sprintf("%T needs waiting", msg))
			return
		case inlineLater:
			// off stays: the message is handled again once classified.
			continue
		}
		off += size
		if why := s.dispatch(msg); why != "" {
			ls.end(why)
			return
		}
	}
	if !ls.ended {
		ls.cin = keep(ls.cin, data[off:])
	}
}

// frame finds the first message in data: its type, its body and its
// whole size, which is 0 while data holds only part of it. ok is false
// when the length is impossible (under 4) or the body longer than max.
func frame(data []byte, max int) (typ byte, body []byte, size int, ok bool) {
	if len(data) < 5 {
		return 0, nil, 0, true
	}
	n := int64(binary.BigEndian.Uint32(data[1:]))
	if n < 4 || n-4 > int64(max) {
		return 0, nil, 0, false
	}
	if int64(len(data)) < 1+n {
		return 0, nil, 0, true
	}
	return data[0], data[5 : 1+n], int(1 + n), true
}

// decodeFrontend decodes the messages the loop handles itself, or returns
// nil (anything else, or a body that does not decode).
func decodeFrontend(typ byte, body []byte) pgproto3.FrontendMessage {
	return new(decoders).decode(typ, body)
}

// decoders are the messages a session on the loop decodes into, reused
// from one message to the next (an allocation less per message: three per
// statement under the extended protocol). A decoded message lives only
// until the next is decoded: dispatch encodes what it forwards at once
// and keeps strings, never the message.
type decoders struct {
	q  pgproto3.Query
	p  pgproto3.Parse
	b  rawBind
	d  pgproto3.Describe
	e  pgproto3.Execute
	c  pgproto3.Close
	s  pgproto3.Sync
	h  pgproto3.Flush
	cd pgproto3.CopyData
	cc pgproto3.CopyDone
	cf pgproto3.CopyFail
	x  pgproto3.Terminate
}

func (dc *decoders) decode(typ byte, body []byte) pgproto3.FrontendMessage {
	var m pgproto3.FrontendMessage
	switch typ {
	case 'Q':
		m = &dc.q
	case 'P':
		m = &dc.p
	case 'B':
		m = &dc.b
	case 'D':
		m = &dc.d
	case 'E':
		m = &dc.e
	case 'C':
		m = &dc.c
	case 'S':
		m = &dc.s
	case 'H':
		m = &dc.h
	case 'd':
		m = &dc.cd
	case 'c':
		m = &dc.cc
	case 'f':
		m = &dc.cf
	case 'X':
		m = &dc.x
	default:
		return nil
	}
	if err := m.Decode(body); err != nil {
		return nil
	}
	return m
}

type inlineAnswer int

const (
	inlineYes   inlineAnswer = iota
	inlineNo                 // leave the loop
	inlineLater              // classify off the loop first
)

// inline decides whether dispatching msg can wait for nothing: no hold,
// no guard, no approval, no round trip to the upstream, no parse that may
// look up functions.
func (ls *loopSession) inline(msg pgproto3.FrontendMessage) inlineAnswer {
	s := ls.s
	switch m := msg.(type) {
	case *pgproto3.Query:
		return ls.inlineSQL(m.String)
	case *pgproto3.Parse:
		if s.skipToSync || strings.HasPrefix(m.Name, reservedPrefix) {
			return inlineYes
		}
		if m.Name != "" {
			s.mu.Lock()
			_, had := s.stmts[m.Name]
			s.mu.Unlock()
			if had {
				return inlineNo // parse waits for the upstream's answer (drain)
			}
		}
		return ls.inlineSQL(m.Query)
	case *pgproto3.Execute:
		if s.skipToSync {
			return inlineYes
		}
		s.mu.Lock()
		p := s.portals[m.Portal]
		s.mu.Unlock()
		if p == nil {
			return inlineYes
		}
		if need, _ := guarded(p.v); need || p.approved {
			return inlineNo
		}
	case *pgproto3.Sync:
		if s.afterSync != "" {
			return inlineNo
		}
	}
	return inlineYes
}

func (ls *loopSession) inlineSQL(sql string) inlineAnswer {
	s := ls.s
	v, ok := s.cachedVerdict(sql)
	if !ok {
		ls.classifyLater(sql)
		return inlineLater
	}
	switch v.dec.Action {
	case actAllow:
		if need, _ := guarded(v); need {
			return inlineNo
		}
		return inlineYes
	case actHold:
		return inlineNo // approvals and holds read and write the state store
	}
	return inlineYes // deny: recorded and refused without waiting
}

// classifyLater pauses the client side while a goroutine classifies sql,
// then hands the verdict to the message's judge and carries on.
func (ls *loopSession) classifyLater(sql string) {
	ls.paused = true
	s := ls.s
	go func() {
		v := s.judgeNow(sql)
		ls.ls.l.Submit(func() {
			ls.paused = false
			if ls.ended {
				return
			}
			s.memoSQL, s.memoV, s.memoOK = sql, v, true
			data := ls.cin
			ls.cin = nil
			ls.clientData(data)
			ls.settle()
		})
	}()
}

func (ls *loopSession) readUp() {
	if ls.cout.Pending() > 0 {
		return
	}
	data, err := ls.read(ls.ufd, ls.uin)
	switch {
	case errors.Is(err, syscall.EAGAIN):
		return
	case err != nil:
		ls.end("upstream closed")
		return
	}
	r := ls.s.r
	off := 0
	for {
		typ, body, size, ok := frame(data[off:], math.MaxInt32)
		if !ok {
			ls.s.g.log.Debug("gate: relay ended", "session", ls.s.id, "err", "upstream message of negative length")
			ls.end("upstream closed")
			return
		}
		if size == 0 {
			break
		}
		if err := r.message(typ, body); err != nil {
			ls.s.g.log.Debug("gate: relay ended", "session", ls.s.id, "err", err)
			ls.end("upstream closed")
			return
		}
		off += size
	}
	ls.uin = keep(ls.uin, data[off:])
}

// end ends the session on the loop.
func (ls *loopSession) end(why string) { ls.leave(loopExit{why: why}) }

// escape hands the session to its goroutine, rest (the client's bytes
// from the message the loop did not handle) to be read first.
func (ls *loopSession) escape(rest []byte, why string) {
	ls.ls.escaped.Add(1)
	ls.s.g.log.Debug("gate: session leaves the event loop", "session", ls.s.id, "why", why)
	ls.leave(loopExit{cin: append([]byte(nil), rest...)})
}

func (ls *loopSession) leave(x loopExit) {
	if ls.ended {
		return
	}
	ls.ended = true
	s := ls.s
	s.r.wr.Flush() // into cout
	s.fe.Flush()   // extended-protocol messages not yet flushed: into uout
	x.uin = append([]byte(nil), ls.uin...)
	// The loop may still be receiving or sending on the fds (io_uring):
	// the session gets them back when it is not, with what it received and
	// did not read (after what the session had read) and what it took and
	// did not send (before what the session had not flushed).
	left := 2
	back := func(in, out *[]byte, pending *evloop.Out) func(rin, rout []byte) {
		return func(rin, rout []byte) {
			*in = append(*in, rin...)
			*out = append(rout, pending.Take()...)
			if left--; left == 0 {
				delete(ls.ls.sessions, ls)
				ls.ls.active.Add(-1)
				ls.exit <- x
			}
		}
	}
	if err := ls.ls.l.Release(ls.cfd, back(&x.cin, &x.cout, &ls.cout)); err != nil {
		ls.s.g.log.Debug("gate: release client socket", "session", ls.s.id, "err", err)
	}
	if err := ls.ls.l.Release(ls.ufd, back(&x.uin, &x.uout, &ls.uout)); err != nil {
		ls.s.g.log.Debug("gate: release upstream socket", "session", ls.s.id, "err", err)
	}
}

// tlsTransport is the net.Conn under a client's tls.Conn, so that the
// event loop can serve TLS sessions with crypto/tls, whose reader blocks:
// on the loop, reads take the records the loop fed and then end with
// errWouldBlock, a temporary net.Error after which crypto/tls keeps its
// state (a partial record stays buffered in the tls.Conn), and writes go to
// the loop's output. Off the loop it is the socket, the records the loop
// read and TLS did not take coming first. It changes modes only while
// nothing uses it (before the loop starts, after it hands the session
// back).
type tlsTransport struct {
	raw *netfd.Conn
	in  []byte      // records read by the loop, not yet taken by TLS
	out *evloop.Out // on the loop: where records go
}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "gate: no more TLS records for now" }
func (wouldBlock) Timeout() bool   { return false }
func (wouldBlock) Temporary() bool { return true }

var errWouldBlock net.Error = wouldBlock{}

func (t *tlsTransport) Read(p []byte) (int, error) {
	if len(t.in) > 0 {
		n := copy(p, t.in)
		if t.in = t.in[n:]; len(t.in) == 0 {
			t.in = nil
		}
		return n, nil
	}
	if t.out != nil {
		return 0, errWouldBlock
	}
	return t.raw.Read(p)
}

func (t *tlsTransport) Write(p []byte) (int, error) {
	if t.out != nil {
		return t.out.Write(p)
	}
	return t.raw.Write(p)
}

func (t *tlsTransport) feed(b []byte)                      { t.in = append(t.in, b...) }
func (t *tlsTransport) toLoop(out *evloop.Out)             { t.out = out }
func (t *tlsTransport) fromLoop()                          { t.out = nil }
func (t *tlsTransport) Close() error                       { return t.raw.Close() }
func (t *tlsTransport) LocalAddr() net.Addr                { return t.raw.LocalAddr() }
func (t *tlsTransport) RemoteAddr() net.Addr               { return t.raw.RemoteAddr() }
func (t *tlsTransport) SetDeadline(d time.Time) error      { return t.raw.SetDeadline(d) }
func (t *tlsTransport) SetReadDeadline(d time.Time) error  { return t.raw.SetReadDeadline(d) }
func (t *tlsTransport) SetWriteDeadline(d time.Time) error { return t.raw.SetWriteDeadline(d) }

// rawBind is a Bind the loop forwards as the client sent it. The gate
// needs only its two names; pgproto3's decoder also copies out the
// parameters and format codes, three allocations and a re-encoding per
// statement under the extended protocol (~3 µs of the gate's CPU per
// pgbench TPC-B transaction). Decode checks the whole message as that
// decoder does, and what is forwarded is the part it reads, which is
// exactly what encoding the decoded Bind would give (FuzzFrames).
type rawBind struct {
	portal string // the destination portal
	stmt   []byte // the prepared statement's name, in body
	body   []byte // the message's body up to its last result format code
}

func (*rawBind) Frontend() {}

func (m *rawBind) Decode(src []byte) error {
	*m = rawBind{}
	bad := errBadBind
	portal, rest, ok := cutString(src)
	if !ok {
		return bad
	}
	stmt, rest, ok := cutString(rest)
	if !ok {
		return bad
	}
	// Parameter format codes, parameters (length, or -1 for NULL, then
	// the bytes), result format codes.
	n, rest, ok := count16(rest)
	if !ok || len(rest) < 2*n {
		return bad
	}
	rest = rest[2*n:]
	if n, rest, ok = count16(rest); !ok {
		return bad
	}
	for range n {
		if len(rest) < 4 {
			return bad
		}
		size := int64(int32(binary.BigEndian.Uint32(rest)))
		rest = rest[4:]
		if size == -1 {
			continue
		}
		if size < 0 || int64(len(rest)) < size {
			return bad
		}
		rest = rest[size:]
	}
	if n, rest, ok = count16(rest); !ok || len(rest) < 2*n {
		return bad
	}
	rest = rest[2*n:]
	if len(portal) > 0 {
		m.portal = string(portal)
	}
	m.stmt, m.body = stmt, src[:len(src)-len(rest)]
	return nil
}

var errBadBind = errors.New("gate: malformed Bind message")

// cutString splits a message's NUL-terminated string off b.
func cutString(b []byte) (str, rest []byte, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return nil, b, false
	}
	return b[:i], b[i+1:], true
}

// count16 reads a message's 16-bit count.
func count16(b []byte) (int, []byte, bool) {
	if len(b) < 2 {
		return 0, b, false
	}
	return int(binary.BigEndian.Uint16(b)), b[2:], true
}

func (m *rawBind) Encode(dst []byte) ([]byte, error) { return appendMsg(dst, 'B', m.body), nil }
