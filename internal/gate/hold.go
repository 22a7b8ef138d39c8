package gate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

// quorumTimeout bounds one exchange with the state store on the query path.
const quorumTimeout = 30 * time.Second

// matches reports whether r asks for exactly this statement, in this
// database, as this session's role, with this class, by this person.
func (s *session) matches(r *cert.Request, sql string, class classify.Class) bool {
	return r.SQL != nil && r.Requester == s.user.Name && r.SQL.Text == sql && r.SQL.Database == s.dbName &&
		r.SQL.Role == s.db.role && r.SQL.Class == string(class) && r.Action == "sql:"+string(class)
}

// find returns the IDs of this person's requests in status st that match.
func (s *session) find(ctx context.Context, st state.Status, sql string, class classify.Class) ([]cert.ID, error) {
	rs, err := s.g.cfg.State.ListRequests(ctx, state.RequestFilter{Status: st, Requester: s.user.Name})
	if err != nil {
		return nil, err
	}
	var ids []cert.ID
	for _, sr := range rs {
		r, err := cert.ParseRequest(sr.Doc)
		if err != nil || string(r.ID()) != sr.ID {
			continue // quorum refuses tampered rows itself
		}
		if s.matches(r, sql, class) {
			ids = append(ids, cert.ID(sr.ID))
		}
	}
	return ids, nil
}

// hasApproved reports whether an approved request for sql exists.
func (s *session) hasApproved(sql string, class classify.Class) bool {
	ctx, cancel := context.WithTimeout(s.g.ctx, quorumTimeout)
	defer cancel()
	ids, err := s.find(ctx, state.StatusApproved, sql, class)
	if err != nil {
		s.g.log.Error("gate: state: list requests", "session", s.id, "err", err)
	}
	return len(ids) > 0
}

// consumeApproved consumes one approved request for exactly sql, so that
// it runs once. It returns the request's ID.
func (s *session) consumeApproved(sql string, class classify.Class) (string, bool) {
	ctx, cancel := context.WithTimeout(s.g.ctx, quorumTimeout)
	defer cancel()
	ids, err := s.find(ctx, state.StatusApproved, sql, class)
	if err != nil {
		s.g.log.Error("gate: state: list requests", "session", s.id, "err", err)
		return "", false
	}
	for _, id := range ids {
		r, _, err := s.g.cfg.Quorum.Consume(ctx, id, s.user.Name)
		if err != nil {
			s.g.log.Info("gate: approved request not usable", "session", s.id, "request", id, "err", err)
			continue
		}
		// Run exactly what was approved: Consume returned the request.
		if !s.matches(r, sql, class) {
			continue
		}
		s.g.log.Info("gate: statement runs on approval", "session", s.id, "user", s.user.Name, "request", id)
		return string(id), true
	}
	return "", false
}

// impact is what the gate measured of a statement it holds.
type impact struct {
	guardRows int64  // rows the blast-radius guard counted and rolled back; -1 none
	dryRows   int64  // rows a dry run counted and rolled back; -1 none
	note      string // for the request's reason and the client's detail
}

// hold opens (or finds) the quorum request for sql and returns the error
// that tells the client how to get it approved.
func (s *session) hold(sql string, v verdict, im impact) *pgproto3.ErrorResponse {
	rows, note := im.guardRows, im.note
	ctx, cancel := context.WithTimeout(s.g.ctx, quorumTimeout)
	defer cancel()
	class := v.res.Class
	reason := fmt.Sprintf("held by the gate (rule %s): %s", orDefault(v.dec.Rule, "default"), v.res.Reason)
	if note != "" {
		reason += "; " + note
	}
	id, err := s.openRequest(ctx, sql, class, reason)
	data := map[string]any{"session": s.id, "db": s.dbName, "class": string(class), "decision": "hold",
		"rule": v.dec.Rule, "reason": v.res.Reason, "sql": auditText(sql)}
	if rows >= 0 {
		data["rows"] = rows
		data["decision"] = "rolled back and held"
	}
	if im.dryRows >= 0 {
		data["dry_run_rows"] = im.dryRows
	}
	if err != nil {
		data["error"] = err.Error()
	} else {
		data["request"] = string(id)
	}
	s.g.rec.add(ledger.Entry{Kind: ledger.KindStatement, Actor: s.user.Name, Data: data})
	if err != nil {
		s.g.log.Error("gate: statement held but no request opened", "session", s.id, "user", s.user.Name, "err", err)
		return errorResponse("42501", "dualkey: statement held for approval, but no request could be opened: "+err.Error(),
			fmt.Sprintf("class %s: %s", class, v.res.Reason), "")
	}
	s.g.log.Info("gate: statement held", "session", s.id, "user", s.user.Name, "db", s.dbName, "class", class, "request", id, "rule", v.dec.Rule)
	detail := fmt.Sprintf("class %s: %s", class, v.res.Reason)
	if note != "" {
		detail += "; " + note
	}
	return errorResponse("42501",
		fmt.Sprintf("dualkey: statement held for approval: request %s; approvers run: dualkey approvals approve %s", id, id),
		detail, "Once approved, send exactly the same statement again as the same user: it then runs once.")
}

// openRequest returns the ID of this person's open request for exactly
// sql, opening one if there is none.
func (s *session) openRequest(ctx context.Context, sql string, class classify.Class, reason string) (cert.ID, error) {
	if ids, err := s.find(ctx, state.StatusOpen, sql, class); err == nil && len(ids) > 0 {
		return ids[0], nil
	}
	p, err := s.g.cfg.Quorum.Policy(ctx)
	if err != nil {
		return "", err
	}
	now := s.g.cfg.Now().UTC()
	// A request is named by the hash of its bytes, times in whole seconds:
	// the session and a counter keep a new request (after one was consumed
	// or denied) from coinciding with the old one.
	s.holds++
	reason = fmt.Sprintf("%s [session %s, hold %d]", clip(reason, cert.MaxReasonLen-64), s.id, s.holds)
	id, err := s.g.cfg.Quorum.Open(ctx, cert.Request{
		Requester: s.user.Name, Action: "sql:" + string(class), Reason: reason,
		Created: now, Expires: now.Add(s.g.cfg.RequestLifetime), PolicySerial: p.Serial,
		SQL: &cert.SQLAction{Database: s.dbName, Role: s.db.role, Text: sql, Class: string(class)},
	})
	if errors.Is(err, cert.ErrNoRule) {
		return "", fmt.Errorf("no quorum rule covers sql:%s (add one with dualkey quorum propose)", class)
	}
	if err != nil && errors.Is(err, quorum.ErrNoPolicy) {
		return "", errors.New("no quorum policy yet (run dualkey quorum init)")
	}
	return id, err
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && s[n]&0xc0 == 0x80 {
		n--
	}
	return s[:n]
}

// holdPolicy holds a statement the policy holds. An UPDATE, DELETE or
// MERGE whose command tag counts its rows is dry-run first, so that the
// approvers see what it would touch; not when this person's request for it
// is already open (its reason has the count of the first time), and not
// when it calls a function that could act outside the transaction.
func (s *session) holdPolicy(sql string, v verdict) *pgproto3.ErrorResponse {
	im := impact{guardRows: -1, dryRows: -1}
	if len(v.res.Statements) == 1 && v.res.Statements[0].Counted {
		ctx, cancel := context.WithTimeout(s.g.ctx, quorumTimeout)
		open, err := s.find(ctx, state.StatusOpen, sql, v.res.Class)
		cancel()
		switch {
		case err != nil || len(open) > 0:
		case v.res.Statements[0].SideEffects:
			// Running it would run the function, approved or not, and a
			// rollback does not undo a sequence, dblink or a signal.
			im.note = "no dry run: it calls a function that may act beyond its rows (volatile, unknown, or with side effects a rollback does not undo)"
		default:
			im.dryRows, im.note = s.dryRun(sql)
		}
	}
	return s.hold(sql, v, im)
}

// dryRunName names the dry run's prepared statement and portal.
const dryRunName = "dualkey_dryrun"

// dryRun measures the rows a held UPDATE, DELETE or MERGE would touch: it
// runs it inside a transaction of the gate's own (a savepoint inside the
// client's), under SET LOCAL statement_timeout, reads the command tag and
// rolls back. Nothing it did survives, and the client sees none of it. It
// returns the rows (-1 when there is no count) and a note for the request
// saying what was measured or why nothing was.
func (s *session) dryRun(sql string) (int64, string) {
	timeout := s.g.cfg.DryRunTimeout
	if timeout < 0 {
		return -1, "no dry run: dry runs are turned off"
	}
	s.drain()
	if s.r.dead() {
		return -1, ""
	}
	if s.r.skipping() {
		return -1, "no dry run: an earlier statement of the same pipeline failed, so the database skips what follows"
	}
	block, failed := s.r.txState()
	if failed {
		return -1, "no dry run: the session's transaction is aborted, so the database would refuse the statement"
	}
	if block {
		s.inject("SAVEPOINT " + dryRunName)
	} else {
		s.inject("BEGIN")
	}
	s.inject(fmt.Sprintf("SET LOCAL statement_timeout = %d", timeout.Milliseconds()))
	pr := &probe{rows: -1}
	s.send(&pgproto3.Parse{Name: dryRunName, Query: sql}, &entry{kind: ekParse, suppress: true, probe: pr})
	s.send(&pgproto3.Bind{DestinationPortal: dryRunName, PreparedStatement: dryRunName}, &entry{kind: ekBind, suppress: true, probe: pr})
	s.send(&pgproto3.Execute{Portal: dryRunName}, &entry{kind: ekExecute, suppress: true, probe: pr})
	// An error skips everything up to this Sync; inside the block it
	// commits nothing. Then the cleanup, which an error cannot skip:
	// closing the statement (which survives a rollback) and rolling back.
	s.send(&pgproto3.Sync{}, &entry{kind: ekSync, suppress: true})
	s.send(&pgproto3.Close{ObjectType: 'S', Name: dryRunName}, &entry{kind: ekClose, suppress: true})
	if block {
		s.inject("ROLLBACK TO SAVEPOINT " + dryRunName)
		s.inject("RELEASE SAVEPOINT " + dryRunName)
	} else {
		s.inject("ROLLBACK")
	}
	s.send(&pgproto3.Sync{}, &entry{kind: ekSync, suppress: true})
	s.flushUp()
	if !s.r.waitEmpty(s.g.ctx) {
		// The relay may still be writing the probe: read nothing of it.
		return -1, ""
	}
	switch {
	case pr.code == "57014":
		return -1, fmt.Sprintf("no dry run count: stopped after %s (%s)", timeout, pr.msg)
	case pr.code == "08P01" || pr.code == "42P02":
		return -1, "no dry run: the statement has parameters, whose values the gate does not have when it holds it"
	case pr.code != "":
		return -1, fmt.Sprintf("dry run failed: %s (SQLSTATE %s); as it stands the statement would fail", pr.msg, pr.code)
	case pr.rows < 0:
		return -1, "no dry run count: the database gave none"
	}
	s.g.log.Info("gate: held statement dry-run", "session", s.id, "rows", pr.rows)
	return pr.rows, fmt.Sprintf("dry run: touches %d rows (run in a transaction the gate rolled back)", pr.rows)
}
