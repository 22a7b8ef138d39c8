package gate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/ledger"
)

// recorder appends ledger records off the query path. Statement records
// describe what already happened, so they need not hold the client up; the
// queue blocks when full rather than drop a record. Records that gate a
// decision (a request, a hold, a consume) are written synchronously by the
// session instead.
//
// When the ledger cannot be written (its store is down, its disk full)
// the recorder keeps the batch and tries again, and the gate refuses every
// statement until it can (failing): no statement runs without a record,
// as no session opens without one. A write that takes longer than
// recordStall (the store stalls: another process holds SQLite's write
// lock, a disk hangs) counts as failing while it lasts, so that the queue
// does not fill behind it and stop the event loop.
type recorder struct {
	led     *ledger.Ledger
	log     *slog.Logger
	q       chan queued
	closing chan struct{} // closed by close: stop lingering
	done    chan struct{}
	once    sync.Once
	down    atomic.Bool // the last write failed
	gaveUp  bool        // the gate stops with the ledger down: what is left is lost (run's goroutine only)
	gr      grouper     // run's goroutine only
}

func newRecorder(led *ledger.Ledger, log *slog.Logger) *recorder {
	r := &recorder{led: led, log: log, q: make(chan queued, recordQueue), closing: make(chan struct{}), done: make(chan struct{})}
	go r.run()
	return r
}

// queued is a record, a statement a session ran (st set), or (flushed
// set) a request to be told when every record queued before it is written.
type queued struct {
	e       ledger.Entry
	st      *ranStmt
	flushed chan struct{}
}

// ranStmt is one statement a session ran (or tried to), for the ledger.
type ranStmt struct {
	session, db, actor, rule string
	at                       time.Time // when it completed
	text                     stmtText
	err, request             string // SQLSTATE when it failed; the request that approved it
	rows                     int64  // rows it touched; -1 when not known
}

// stmtGroup is the data of a "statements" record: statements one session
// ran, in the order they completed. The recorder groups what each session
// ran within one batch (recordLinger) into one record. One record per
// statement cost the gate ~30 µs of CPU per pgbench TPC-B transaction
// (4 records: the JSON, the hash, a SQLite row of ~500 bytes each, and a
// signed checkpoint every 64 records): more than PgBouncer spends on the
// whole transaction in user space. Grouped, the fields a record repeats
// (seq, time, kind, actor, the two hashes, session, db, rule) are paid
// once per group. Within a group each distinct text (with its class and
// decision) is written once, in texts, and a statement names it by index
// with its time as microseconds after from: an application repeats a few
// statements, and a statement's own time, class, decision and text took
// ~170 bytes, which the ledger hashes and SQLite writes twice (WAL, then
// the table), against ~25 now. A text with literals is kept as its parts
// between them, once per shape, and each statement gives its own literals
// (v): on the simple protocol no two texts are equal, and writing each
// whole was most of the recorder's work per statement (the JSON, the
// hash, the compression and the grouping of ~100 bytes). Every statement
// is still there, byte for byte, in a record of the hash chain.
// ParseStatements reads this and the earlier forms. Fields in key order
// (encoding/json's order for a map).
type stmtGroup struct {
	DB         string      `json:"db"`
	From       time.Time   `json:"from"` // the first statement's time, to the microsecond
	Rule       string      `json:"rule"` // the policy rule that decided them all (a new group when it changes)
	Session    string      `json:"session"`
	Statements []stmtItem  `json:"statements"`
	Texts      []groupText `json:"texts"`

	exact  map[stmtText]int // Texts without literals, by value
	shapes map[string]int   // Texts with literals, by groupKey
	vals   []string         // the literals of Statements (each item's V is a piece of it)
	text   int              // what the SQL in Texts and V costs in JSON at most, over 6 (maxGroupText)
}

// stmtText is a statement's text with what the gate made of it: the
// part statements repeat.
type stmtText struct {
	Class, Decision, SQL string
}

// groupText is a stmtText in a stmtGroup: SQL whole, or when it has
// literals (classify.Literals) Parts, the pieces between them.
type groupText struct {
	Class    string   `json:"class"`
	Decision string   `json:"decision"`
	Parts    []string `json:"parts,omitempty"`
	SQL      string   `json:"sql,omitempty"`
}

// stmtItem is one statement of a stmtGroup.
type stmtItem struct {
	Error   string   `json:"error,omitempty"`   // SQLSTATE, when it failed
	Request string   `json:"request,omitempty"` // the request that approved it
	Rows    *int64   `json:"rows,omitempty"`    // rows it touched, when known
	Text    int      `json:"t"`                 // its index in Texts
	Micros  int64    `json:"us"`                // when it completed, in µs after From
	V       []string `json:"v,omitempty"`       // its literals, between its text's Parts

	rows int64 // Rows points here once the group is complete: no allocation per statement
}

// Bounds on one group, far below ledger.MaxRecordSize: the SQL is clipped
// at 4 KiB per statement (auditText); each piece of it (a text, a part, a
// literal) counts its bytes and 3 more (quotes, comma), and JSON escaping
// at most sextuples that; an item without its literals is at most ~100
// bytes.
const (
	maxGroupStatements = 1024
	maxGroupText       = 128 << 10
)

// grouper turns batches into ledger entries (groupStatements), keeping
// its scratch space from one batch to the next.
type grouper struct {
	spans []int  // classify.Literals of the statement at hand
	key   []byte // its shape's key in stmtGroup.shapes
}

// groupStatements turns a batch into ledger entries: the statements of each
// session become one "statements" record, at the place of its first
// statement in the batch, or several when the rule that decided them
// changes (a session's statements stay in order). Any other record is a
// barrier that no statement crosses: a session's close, a denial or a hold
// stays after the statements that came before it and before those that
// came after.
func (gr *grouper) groupStatements(batch []queued) []ledger.Entry {
	out := make([]ledger.Entry, 0, len(batch))
	open := map[string]*stmtGroup{}
	// How many statements of each session are still to come: a group's
	// slice is made once at its size, where growing it by append cost
	// more than the rest of the grouping.
	left := map[string]int{}
	for _, q := range batch {
		if q.st != nil {
			left[q.st.session]++
		}
	}
	for _, q := range batch {
		st := q.st
		if st == nil {
			clear(open)
			out = append(out, q.e)
			continue
		}
		rest := left[st.session] // this one and those after it
		left[st.session] = rest - 1
		g := open[st.session]
		// A text seen whole needs no cutting (every statement of the
		// extended protocol): look it up first.
		i, seen := 0, false
		if g != nil {
			i, seen = g.exact[st.text]
		}
		lits := false
		if !seen {
			gr.spans, lits = classify.Literals(gr.spans[:0], st.text.SQL)
			if lits && g != nil {
				i, seen = g.shapes[string(gr.shapeKey(st.text))]
			}
		}
		// What the statement adds to g.text: its literals, and its text
		// unless the group has it.
		add, whole := 0, len(st.text.SQL)+3
		if lits {
			nlit := len(gr.spans) / 2
			for k := 0; k < len(gr.spans); k += 2 {
				add += gr.spans[k+1] - gr.spans[k]
			}
			whole = len(st.text.SQL) + 3*(2*nlit+1) // literals and parts
			add += 3 * nlit
		}
		if !seen {
			add = whole
		}
		if g == nil || g.Rule != st.rule || len(g.Statements) >= maxGroupStatements || g.text+add > maxGroupText {
			g = &stmtGroup{DB: st.db, From: st.at.Truncate(time.Microsecond), Rule: st.rule, Session: st.session,
				Statements: make([]stmtItem, 0, min(rest, maxGroupStatements))}
			open[st.session] = g
			out = append(out, ledger.Entry{Kind: ledger.KindStatements, Actor: st.actor, Data: g})
			seen, add = false, whole
		}
		g.text += add
		if !seen {
			i = len(g.Texts)
			t := groupText{Class: st.text.Class, Decision: st.text.Decision, SQL: st.text.SQL}
			if lits {
				t.Parts, t.SQL = cut(t.SQL, gr.spans), ""
				if g.shapes == nil {
					g.shapes = map[string]int{}
				}
				g.shapes[string(gr.shapeKey(st.text))] = i
			} else {
				if g.exact == nil {
					g.exact = map[stmtText]int{}
				}
				g.exact[st.text] = i
			}
			g.Texts = append(g.Texts, t)
		}
		it := stmtItem{Error: st.err, Request: st.request, Text: i,
			Micros: st.at.Truncate(time.Microsecond).Sub(g.From).Microseconds(), rows: st.rows}
		if lits {
			from := len(g.vals)
			for k := 0; k < len(gr.spans); k += 2 {
				g.vals = append(g.vals, st.text.SQL[gr.spans[k]:gr.spans[k+1]])
			}
			// A piece of vals: when it grows, earlier pieces keep the old array.
			it.V = g.vals[from:len(g.vals):len(g.vals)]
		}
		g.Statements = append(g.Statements, it)
	}
	for _, e := range out {
		if g, ok := e.Data.(*stmtGroup); ok {
			for i := range g.Statements {
				if it := &g.Statements[i]; it.rows >= 0 {
					it.Rows = &it.rows
				}
			}
		}
	}
	return out
}

// shapeKey is t's key in stmtGroup.shapes, from gr.spans: its class,
// decision and the parts between its literals, apart by NULs (which no
// class, decision or text that has literals holds).
func (gr *grouper) shapeKey(t stmtText) []byte {
	k := append(gr.key[:0], t.Class...)
	k = append(k, 0)
	k = append(k, t.Decision...)
	last := 0
	for i := 0; i < len(gr.spans); i += 2 {
		k = append(k, 0)
		k = append(k, t.SQL[last:gr.spans[i]]...)
		last = gr.spans[i+1]
	}
	k = append(k, 0)
	k = append(k, t.SQL[last:]...)
	gr.key = k
	return k
}

// cut returns the pieces of sql around the literals at spans.
func cut(sql string, spans []int) []string {
	parts := make([]string, 0, len(spans)/2+1)
	last := 0
	for i := 0; i < len(spans); i += 2 {
		parts = append(parts, sql[last:spans[i]])
		last = spans[i+1]
	}
	return append(parts, sql[last:])
}

// Statements is a "statements" record's data as read back: the group's
// fields, and each statement whole.
type Statements struct {
	DB, Rule, Session string
	Statements        []Statement
}

// Statement is one statement of a "statements" record.
type Statement struct {
	At                   time.Time
	Class, Decision, SQL string
	Error, Request       string
	Rows                 *int64 // nil when not known
}

// ParseStatements reads the data of a "statements" record, in the form
// the gate writes (stmtGroup) or the earlier one, where each statement
// carried its own at, class, decision and sql.
func ParseStatements(data []byte) (Statements, error) {
	var g struct {
		DB         string      `json:"db"`
		From       time.Time   `json:"from"`
		Rule       string      `json:"rule"`
		Session    string      `json:"session"`
		Texts      []groupText `json:"texts"`
		Statements []struct {
			stmtItem
			// the earlier form
			At       time.Time `json:"at"`
			Class    string    `json:"class"`
			Decision string    `json:"decision"`
			SQL      string    `json:"sql"`
		} `json:"statements"`
	}
	if err := json.Unmarshal(data, &g); err != nil {
		return Statements{}, fmt.Errorf("statements record: %w", err)
	}
	out := Statements{DB: g.DB, Rule: g.Rule, Session: g.Session, Statements: make([]Statement, 0, len(g.Statements))}
	for i, it := range g.Statements {
		st := Statement{At: it.At, Class: it.Class, Decision: it.Decision, SQL: it.SQL, Error: it.Error, Request: it.Request, Rows: it.Rows}
		if g.Texts == nil && it.V != nil {
			return Statements{}, fmt.Errorf("statements record: statement %d has literals but the record no texts", i)
		}
		if g.Texts != nil {
			if it.Text < 0 || it.Text >= len(g.Texts) {
				return Statements{}, fmt.Errorf("statements record: statement %d names text %d of %d", i, it.Text, len(g.Texts))
			}
			t := g.Texts[it.Text]
			sql, err := t.with(it.V)
			if err != nil {
				return Statements{}, fmt.Errorf("statements record: statement %d: %w", i, err)
			}
			st.At, st.Class, st.Decision, st.SQL = g.From.Add(time.Duration(it.Micros)*time.Microsecond), t.Class, t.Decision, sql
		}
		out.Statements = append(out.Statements, st)
	}
	return out, nil
}

// with returns the text whole, with the literals v between its parts.
func (t groupText) with(v []string) (string, error) {
	switch {
	case t.Parts == nil && v == nil:
		return t.SQL, nil
	case t.Parts == nil || t.SQL != "":
		return "", fmt.Errorf("literals for a text without parts, or a text with both parts and sql")
	case len(v) != len(t.Parts)-1:
		return "", fmt.Errorf("%d literals for a text of %d parts", len(v), len(t.Parts))
	}
	var b strings.Builder
	for i, p := range t.Parts {
		if i > 0 {
			b.WriteString(v[i-1])
		}
		b.WriteString(p)
	}
	return b.String(), nil
}

// recordBatch bounds how many queued records go into one ledger
// transaction. Written one by one, each record cost a commit with an fsync:
// 59% of the gate's CPU under pgbench TPC-B, and a ceiling of ~400 tps.
const recordBatch = 1024

// recordLinger is how long the recorder lets a batch gather after its
// first record. Taking only what was already queued, most batches under
// pgbench TPC-B (8 clients) held one record, so the ledger still committed
// (with an fsync) once per statement: about 1 ms of the gate's CPU per
// TPC-B transaction. It sleeps rather than receive, so the records that
// arrive meanwhile are queued without waking it one by one. Statement
// records are written off the query path, so the wait delays only their
// arrival in the ledger, never a client; close writes what is queued at
// once. 20 ms rather than 5: under TPC-B with 8 clients (~4000 records a
// second) a quarter of the commits, and 5-15% less of the gate's CPU per
// transaction in three A/B rounds. 50 ms (and batches of up to 1024)
// rather than 20: a commit cost ~0.5 ms of CPU (the WAL's pages, the
// fsync) and was a third of the recorder's time; in three A/B rounds
// 336-420 µs of the gate's CPU per TPC-B transaction against 382-463. The
// price: a gate killed outright loses up to 50 ms of statement records
// (docs/ledger.md).
const recordLinger = 50 * time.Millisecond

func (r *recorder) run() {
	defer close(r.done)
	batch := make([]queued, 0, recordBatch)
	linger := time.NewTimer(recordLinger)
	linger.Stop()
	for it := range r.q {
		if it.flushed != nil {
			close(it.flushed) // everything before it is written
			continue
		}
		batch = append(batch[:0], it)
		var flushed chan struct{}
		if len(r.q) < recordBatch-1 {
			linger.Reset(recordLinger)
			select {
			case <-linger.C:
			case <-r.closing:
				linger.Stop()
			}
		}
	more:
		for len(batch) < recordBatch {
			select {
			case it, ok := <-r.q:
				if !ok {
					break more
				}
				if it.flushed != nil {
					flushed = it.flushed
					break more
				}
				batch = append(batch, it)
			default:
				break more
			}
		}
		r.write(r.gr.groupStatements(batch))
		recycle(batch)
		clear(batch) // let the statements' text go
		if flushed != nil {
			close(flushed)
		}
	}
}

func (r *recorder) write(es []ledger.Entry) {
	var flushes []chan struct{} // flush requests taken while retrying
	defer func() {
		for _, f := range flushes {
			close(f)
		}
	}()
	if r.gaveUp {
		r.log.Error("gate: ledger cannot be written; records lost as the gate stops", "records", len(es))
		return
	}
	for wait := recordRetry; ; wait = min(2*wait, maxRecordRetry) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		fired := make(chan struct{})
		stalled := time.AfterFunc(recordStall, func() {
			defer close(fired)
			if !r.down.Swap(true) {
				r.log.Error("gate: a ledger write has not finished; statements are refused until it does", "after", recordStall, "records", len(es))
			}
		})
		_, err := r.led.AppendBatch(ctx, es)
		if !stalled.Stop() {
			<-fired // it ran: it must not set down after the outcome below
		}
		cancel()
		switch {
		case err == nil || errors.Is(err, ledger.ErrInvalid):
			if err != nil {
				r.oneByOne(es) // a record the ledger refuses, not a store that fails
			}
			if r.down.Swap(false) {
				r.log.Info("gate: ledger writable again; statements run again", "records", len(es))
			}
			return
		case errors.Is(err, ledger.ErrClosed):
			r.log.Error("gate: ledger closed; records lost", "records", len(es))
			return
		}
		if r.down.Swap(true) && wait > recordRetry {
			r.log.Warn("gate: ledger still cannot be written", "err", err)
		} else {
			r.log.Error("gate: ledger cannot be written; statements are refused until it can", "err", err)
		}
		if !r.idle(wait, &es, &flushes) {
			// One last try: a stopping gate must not wait for ever.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := r.led.AppendBatch(ctx, es)
			cancel()
			if err != nil {
				r.gaveUp = true
				r.log.Error("gate: ledger cannot be written; records lost as the gate stops", "records", len(es), "err", err)
			}
			return
		}
	}
}

// idle waits d before the next try, taking what is queued meanwhile into
// es (and flush requests into flushes): the event loop queues records and
// must not block on a full queue while the ledger is away. Little comes,
// as statements are refused meanwhile. It returns false when the gate
// closes.
func (r *recorder) idle(d time.Duration, es *[]ledger.Entry, flushes *[]chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return true
		case <-r.closing:
			return false
		case it, ok := <-r.q:
			switch {
			case !ok:
				return false
			case it.flushed != nil:
				*flushes = append(*flushes, it.flushed)
			default:
				*es = append(*es, r.gr.groupStatements([]queued{it})...)
				recycle([]queued{it})
			}
		}
	}
}

// Retries of an unwritable ledger: soon, then every few seconds.
const (
	recordRetry    = 50 * time.Millisecond
	maxRecordRetry = 2 * time.Second
)

// recordStall is how long a ledger write may take before statements are
// refused (a var for tests). A commit takes milliseconds; the queue
// (recordQueue) holds a few seconds of a busy gate's records, so
// statements stop before it fills.
var recordStall = 2 * time.Second

// recordQueue bounds the records waiting for the recorder: ~3 s of
// pgbench TPC-B with 8 clients, at most 64 MiB of clipped statement text
// (a var for tests).
var recordQueue = 16384

// oneByOne appends es one at a time, so that one bad record does not take
// its batch with it.
func (r *recorder) oneByOne(es []ledger.Entry) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, e := range es {
		if _, err := r.led.Append(ctx, e); err != nil {
			r.log.Error("gate: ledger record lost", "kind", e.Kind, "actor", e.Actor, "err", err)
		}
	}
}

// failing reports whether the ledger's last write failed: statements are
// refused until one succeeds.
func (r *recorder) failing() bool { return r.down.Load() }

// add queues e.
func (r *recorder) add(e ledger.Entry) { r.q <- queued{e: e} }

// ran queues a statement a session ran (from newRanStmt).
func (r *recorder) ran(st *ranStmt) { r.q <- queued{st: st} }

// ranPool recycles the statements queued for the recorder, one per
// statement a session runs: groupStatements copies what it keeps of them.
var ranPool = sync.Pool{New: func() any { return new(ranStmt) }}

func newRanStmt() *ranStmt { return ranPool.Get().(*ranStmt) }

// recycle returns batch's statements to ranPool, once grouped.
func recycle(batch []queued) {
	for _, q := range batch {
		if q.st != nil {
			*q.st = ranStmt{}
			ranPool.Put(q.st)
		}
	}
}

// flush returns when every record queued before it is written.
func (r *recorder) flush() {
	ch := make(chan struct{})
	r.q <- queued{flushed: ch}
	<-ch
}

// sync writes e now and returns the ledger's error.
func (r *recorder) sync(ctx context.Context, e ledger.Entry) error {
	_, err := r.led.Append(ctx, e)
	return err
}

// close writes what is queued and stops.
func (r *recorder) close() {
	r.once.Do(func() { close(r.closing); close(r.q) })
	<-r.done
}
