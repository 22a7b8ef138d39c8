package gate

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/gate/classify"
)

// The relay copies the upstream's messages to the client, mostly as raw
// bytes, and keeps a queue of what each message sent upstream will be
// answered with. PostgreSQL answers in order, so the head of the queue
// always says whose response arrives next: that is how the gate swallows
// the answers to statements it injected itself, puts its own error in the
// place of a refused statement, holds back a guarded statement's results
// until its row count is known, and records each statement with its rows.

type entryKind uint8

const (
	ekParse entryKind = iota
	ekBind
	ekDescribe
	ekExecute
	ekClose
	ekSync
	ekQuery
)

// entry is the expected response to one message sent upstream.
type entry struct {
	kind     entryKind
	suppress bool                    // the client never sees this entry's responses...
	keepRFQ  bool                    // ...except its ReadyForQuery
	dropRFQ  bool                    // forward everything but the ReadyForQuery
	replace  *pgproto3.ErrorResponse // send this instead of the entry's ErrorResponse
	undef    undef                   // undone when the message failed or was skipped
	guard    *guard
	probe    *probe     // a dry run's messages: its tag or error goes here, not to the client
	recs     []*stmtRec // statements to record as they complete
	next     int
	pooled   bool // from newEntry: back to the pool once answered
}

// entryPool recycles the entries of the messages every statement sends
// (Bind, Execute, Sync): three allocations per statement under the
// extended protocol. Only the relay's queue refers to such an entry, and
// popLocked returns it when its answer is complete.
var entryPool = sync.Pool{New: func() any { return new(entry) }}

// newEntry is an entry of kind for a message whose entry nothing but the
// queue keeps.
func newEntry(kind entryKind) *entry {
	e := entryPool.Get().(*entry)
	e.kind, e.pooled = kind, true
	return e
}

// stmtRec is one statement's ledger record, completed with its rows.
type stmtRec struct {
	class, text, decision, rule, request string

	audit   string // auditText(text), made at the first completion (a prepared statement's records are reused)
	audited bool
}

// probe collects the outcome of a dry run (session.dryRun).
type probe struct {
	rows      int64  // from the command tag; -1 until it arrives
	code, msg string // the error, if the statement failed
}

type guard struct {
	report chan guardReport
	decide chan guardDecision
	buf    []byte // messages held back, raw
	rows   int64  // -1 once more than maxGuardBuffer was held back
}

type guardReport struct {
	rows     int64
	failed   bool
	overflow bool
}

type guardDecision struct {
	keep    bool // forward what was held back (else drop it)
	dropRFQ bool // and drop the entry's ReadyForQuery
}

// maxGuardBuffer bounds the results held back while a guarded statement is
// measured (its RETURNING rows).
const maxGuardBuffer = 16 << 20

type relay struct {
	s   *session
	rd  *bufio.Reader
	wr  *bufio.Writer
	buf []byte
	hdr [5]byte // read's

	mu       sync.Mutex
	queue    []*entry
	qbuf     []*entry // the array queue began in when it was last empty (push)
	skipPush bool     // upstream skips to Sync: drop entries until a Sync entry
	emptyCh  chan struct{}
	block    bool // in a transaction block
	failed   bool // the block is aborted
	stopped  bool
	parked   bool // the relay ended between messages (park); written before done closes

	done chan struct{}
}

func newRelay(s *session, tx byte) *relay {
	r := &relay{s: s, rd: bufio.NewReaderSize(s.up, 64<<10), wr: bufio.NewWriterSize(s.client, 64<<10), done: make(chan struct{})}
	r.setTx(tx)
	return r
}

func (r *relay) setTx(tx byte) {
	r.block = tx == 'T' || tx == 'E'
	r.failed = tx == 'E'
}

// push queues the response entry of a message about to be sent upstream.
func (r *relay) push(e *entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.skipPush {
		if e.kind != ekSync {
			// PostgreSQL will skip this message: it gets no answer.
			r.s.undefine(&e.undef)
			return
		}
		r.skipPush = false
	}
	// An empty queue starts again at the start of its array: a slice that
	// only walks forward made append reallocate it every few messages (1%
	// of the gate's CPU under pgbench TPC-B).
	if len(r.queue) == 0 {
		r.queue = r.qbuf[:0]
	}
	// An append to a full slice moves the queue to the start of a new
	// array: that is the one to start again in. (Keeping the array of the
	// first push made a queue of Bind, Execute and Sync grow afresh each
	// statement.)
	moves := len(r.queue) == cap(r.queue)
	r.queue = append(r.queue, e)
	if moves || len(r.queue) == 1 {
		r.qbuf = r.queue
	}
}

func (r *relay) head() *entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.queue) == 0 {
		return nil
	}
	return r.queue[0]
}

func (r *relay) pop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.popLocked()
}

func (r *relay) popLocked() {
	if e := r.queue[0]; e.pooled {
		*e = entry{}
		entryPool.Put(e)
	}
	r.queue[0] = nil
	r.queue = r.queue[1:]
	if len(r.queue) == 0 && r.emptyCh != nil {
		close(r.emptyCh)
		r.emptyCh = nil
	}
}

// skipToSync drops the entries PostgreSQL skips after an error in an
// extended-protocol batch: everything up to the next Sync.
func (r *relay) skipToSync() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.queue) > 0 && r.queue[0].kind != ekSync {
		r.s.undefine(&r.queue[0].undef)
		r.popLocked()
	}
	if len(r.queue) == 0 {
		r.skipPush = true
	}
}

// busy reports whether the upstream still owes answers.
func (r *relay) busy() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.queue) > 0
}

// skipping reports whether the upstream is skipping messages until Sync
// after an error in an extended-protocol batch (and nothing is in flight).
func (r *relay) skipping() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.skipPush
}

func (r *relay) txState() (block, failed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.block, r.failed
}

// waitEmpty waits until every queued entry is answered, the relay ends or
// ctx ends, and reports whether the queue emptied: only then may the
// caller read what the relay wrote for those entries (a probe's answer).
func (r *relay) waitEmpty(ctx context.Context) bool {
	r.mu.Lock()
	if len(r.queue) == 0 {
		r.mu.Unlock()
		return true
	}
	if r.emptyCh == nil {
		r.emptyCh = make(chan struct{})
	}
	ch := r.emptyCh
	r.mu.Unlock()
	select {
	case <-ch:
		return true
	case <-r.done:
	case <-ctx.Done():
	}
	return false
}

func (r *relay) dead() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

// stop ends the relay so the session may write to the client itself.
func (r *relay) stop() {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.s.up.Close()
	<-r.done
}

// park ends the relay without closing the upstream connection, so that it
// can be reused: a read deadline in the past wakes the relay's read. True
// only if the relay was waiting for a message's first byte with nothing
// buffered: then the connection is exactly at a message boundary.
func (r *relay) park() bool {
	r.mu.Lock()
	r.stopped = true
	r.mu.Unlock()
	r.s.up.SetReadDeadline(time.Unix(1, 0))
	<-r.done
	r.s.up.SetReadDeadline(time.Time{})
	return r.parked && r.rd.Buffered() == 0
}

// errParked ends the relay's loop when park woke it between messages.
var errParked = errors.New("gate: relay parked")

func (r *relay) run() {
	defer close(r.done)
	err := r.loop()
	r.parked = errors.Is(err, errParked)
	r.wr.Flush()
	r.mu.Lock()
	stopped := r.stopped
	r.mu.Unlock()
	if !stopped {
		// The upstream went away (or the session closed it): end the client too.
		r.s.client.Close()
	}
	if !errors.Is(err, io.EOF) {
		r.s.g.log.Debug("gate: relay ended", "session", r.s.id, "err", err)
	}
}

// read returns the next upstream message: its type and body (valid until
// the next read).
func (r *relay) read() (byte, []byte, error) {
	if r.rd.Buffered() == 0 {
		// About to wait for the upstream: let the client have what we have.
		if err := r.wr.Flush(); err != nil {
			return 0, nil, err
		}
	}
	hdr := &r.hdr // not a local array: io.ReadFull makes it escape
	if n, err := io.ReadFull(r.rd, hdr[:]); err != nil {
		var ne net.Error
		if n == 0 && errors.As(err, &ne) && ne.Timeout() {
			return 0, nil, errParked // only park sets a deadline here
		}
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
	if n < 0 {
		return 0, nil, fmt.Errorf("gate: upstream message of negative length")
	}
	if cap(r.buf) < n {
		r.buf = make([]byte, n)
	}
	r.buf = r.buf[:n]
	if _, err := io.ReadFull(r.rd, r.buf); err != nil {
		return 0, nil, err
	}
	return hdr[0], r.buf, nil
}

// emit writes one message to the client.
func (r *relay) emit(typ byte, body []byte) error {
	// The header is built in the writer's own buffer: a local array
	// passed to Write escapes, an allocation per message.
	if r.wr.Available() < 5 {
		if err := r.wr.Flush(); err != nil {
			return err
		}
	}
	hdr := append(r.wr.AvailableBuffer(), typ, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(body)+4))
	r.wr.Write(hdr)
	_, err := r.wr.Write(body)
	return err
}

func appendMsg(buf []byte, typ byte, body []byte) []byte {
	buf = append(buf, typ, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(buf[len(buf)-4:], uint32(len(body)+4))
	return append(buf, body...)
}

func (r *relay) emitError(e *pgproto3.ErrorResponse) error {
	b, err := e.Encode(nil)
	if err != nil {
		return err
	}
	_, err = r.wr.Write(b)
	return err
}

func (r *relay) loop() error {
	for {
		typ, body, err := r.read()
		if err != nil {
			return err
		}
		if err := r.message(typ, body); err != nil {
			return err
		}
	}
}

// message processes one upstream message (body valid for the call only).
// An error ends the relay.
func (r *relay) message(typ byte, body []byte) error {
	switch typ {
	case 'N', 'A', 'S': // notice, notification, parameter status: asynchronous
		if typ == 'S' {
			if name, value, ok := paramStatus(body); ok && !lexerSafe(name, value) {
				// Reached by a path the classifier did not see (a
				// function's set_config): the gate can no longer read
				// statements as the server does. End the session.
				r.s.g.log.Error("gate: upstream reports a setting that changes how statements are read; session ended",
					"session", r.s.id, "user", r.s.user.Name, "setting", name, "value", value)
				r.emitError(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "XX000",
					Message: fmt.Sprintf("dualkey: the session's %s became %q, which the gate cannot read statements under; session ended", name, value)})
				return fmt.Errorf("gate: upstream %s = %q", name, value)
			}
		}
		if e := r.head(); e != nil && e.suppress && typ != 'A' {
			return nil
		}
		return r.emit(typ, body)
	}
	e := r.head()
	if e == nil {
		// Unsolicited: a FATAL error as the server shuts down, say.
		if typ == 'Z' && len(body) == 1 {
			r.mu.Lock()
			r.setTx(body[0])
			r.mu.Unlock()
		}
		return r.emit(typ, body)
	}
	return r.handle(e, typ, body)
}

// handle processes one response to entry e.
func (r *relay) handle(e *entry, typ byte, body []byte) error {
	switch typ {
	case 'Z':
		drop := e.dropRFQ || (e.suppress && !e.keepRFQ)
		r.mu.Lock()
		if len(body) == 1 {
			r.setTx(body[0])
		}
		r.popLocked() // e may be reused from here on (newEntry)
		r.mu.Unlock()
		if drop {
			return nil
		}
		return r.emit(typ, body)
	case 'C':
		r.commandTag(body)
	case 'E':
		r.mu.Lock()
		if r.block {
			r.failed = true
		}
		r.mu.Unlock()
	}
	terminal := false
	switch e.kind {
	case ekParse:
		terminal = typ == '1' || typ == 'E'
	case ekBind:
		terminal = typ == '2' || typ == 'E'
	case ekDescribe:
		terminal = typ == 'T' || typ == 'n' || typ == 'E'
	case ekExecute:
		terminal = typ == 'C' || typ == 'I' || typ == 's' || typ == 'E'
	case ekClose:
		terminal = typ == '3' || typ == 'E'
	}
	if e.guard == nil && (typ == 'C' || typ == 'I' || typ == 's' || typ == 'E') {
		r.record(e, typ, body)
	}
	if p := e.probe; p != nil {
		switch typ {
		case 'C':
			p.rows = tagRows(body)
		case 'E':
			p.code, p.msg = errorField(body, 'C'), errorField(body, 'M')
		}
	}
	var err error
	switch {
	case e.guard != nil:
		err = r.guarded(e, typ, body)
	case typ == 'E' && e.replace != nil:
		err = r.emitError(e.replace)
	case e.suppress:
		if typ == 'E' && e.probe == nil {
			// An injected statement failed: say so, it is the upstream's word.
			err = r.emit(typ, body)
		}
	default:
		err = r.emit(typ, body)
	}
	if err != nil {
		return err
	}
	if terminal {
		failed := typ == 'E' && e.kind != ekQuery
		if failed {
			r.s.undefine(&e.undef)
		}
		r.pop() // e may be reused from here on (newEntry)
		if failed {
			r.skipToSync()
		}
	}
	return nil
}

// record completes the ledger record of e's next statement.
func (r *relay) record(e *entry, typ byte, body []byte) {
	if e.next >= len(e.recs) {
		return
	}
	rec := e.recs[e.next]
	e.next++
	rows, code := int64(-1), ""
	switch typ {
	case 'C':
		rows = tagRows(body)
	case 'E':
		code = errorCode(body)
	}
	r.s.completed(rec, rows, code)
}

// guarded holds back a guarded statement's results until its command tag
// (or error) arrives, reports the row count to the session and does what
// it decides.
func (r *relay) guarded(e *entry, typ byte, body []byte) error {
	g := e.guard
	if typ != 'C' && typ != 'E' {
		if len(g.buf)+len(body) <= maxGuardBuffer {
			g.buf = appendMsg(g.buf, typ, body)
		} else {
			g.buf = nil
			g.rows = -1 // overflow
		}
		return nil
	}
	rep := guardReport{failed: typ == 'E'}
	if typ == 'C' {
		rep.rows = tagRows(body)
	}
	if g.rows < 0 {
		rep.overflow = true
	}
	g.report <- rep
	var d guardDecision
	select {
	case d = <-g.decide:
	case <-r.s.g.ctx.Done():
		return r.s.g.ctx.Err()
	}
	e.guard = nil
	e.dropRFQ = d.dropRFQ
	if !d.keep {
		return nil // the session records the rolled-back statement with its request
	}
	r.record(e, typ, body)
	if _, err := r.wr.Write(g.buf); err != nil {
		return err
	}
	return r.emit(typ, body)
}

// commandTag follows transaction blocks opened and closed by statements.
func (r *relay) commandTag(body []byte) {
	// Most tags change nothing: they take no lock, and the switch on the
	// converted bytes copies nothing.
	var begin bool
	switch string(bytes.TrimRight(body, "\x00")) {
	case "BEGIN", "START TRANSACTION":
		begin = true
	case "COMMIT", "ROLLBACK", "PREPARE TRANSACTION":
	default:
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if begin {
		r.block = true
	} else {
		r.block, r.failed = false, false
	}
}

// tagRows returns the row count of a command tag ("DELETE 3", "INSERT 0 1",
// "SELECT 5"), or -1 when it has none.
func tagRows(body []byte) int64 {
	tag := bytes.TrimRight(body, "\x00")
	i := bytes.LastIndexByte(tag, ' ')
	if i < 0 || i == len(tag)-1 {
		return -1
	}
	var n int64
	for _, c := range tag[i+1:] {
		if c < '0' || c > '9' || n > (math.MaxInt64-9)/10 {
			return -1
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

func errorCode(body []byte) string { return errorField(body, 'C') }

// errorField returns one field of an ErrorResponse body ('C' the
// SQLSTATE, 'M' the message), or "".
func errorField(body []byte, field byte) string {
	for len(body) > 1 {
		f := body[0]
		end := 1
		for end < len(body) && body[end] != 0 {
			end++
		}
		if f == field {
			return string(body[1:end])
		}
		if end >= len(body) {
			break
		}
		body = body[end+1:]
	}
	return ""
}

// paramStatus splits a ParameterStatus body into name and value.
func paramStatus(body []byte) (name, value string, ok bool) {
	i := bytes.IndexByte(body, 0)
	if i < 0 {
		return "", "", false
	}
	rest := body[i+1:]
	j := bytes.IndexByte(rest, 0)
	if j < 0 {
		return "", "", false
	}
	return string(body[:i]), string(rest[:j]), true
}

// lexerSafe reports whether a reported setting keeps the server reading
// statements as the gate's parser does: standard_conforming_strings on, a
// client_encoding in which quote and backslash bytes are always those
// characters. Other settings are not its business.
func lexerSafe(name, value string) bool {
	switch name {
	case "standard_conforming_strings":
		return value == "on"
	case "client_encoding":
		return classify.SafeClientEncoding(value)
	}
	return true
}
