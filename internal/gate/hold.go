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

// hold opens (or finds) the quorum request for sql and returns the error
// that tells the client how to get it approved. rows >= 0 is the measured
// impact of a guarded statement.
func (s *session) hold(sql string, v verdict, rows int64, note string) *pgproto3.ErrorResponse {
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
