package quorum

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

// reviewPrefix starts the Subject of a breakglass:review request.
const reviewPrefix = "breakglass/"

// StartBreakGlass opens a break-glass session: person may act in role
// without a quorum for d (at most MaxBreakGlass). Only a person and role
// the current policy's BreakGlass list allows may; a reason is required.
// The ledger record is written before the session exists (no record, no
// session), the webhook is told, and the session stays flagged until an
// approved breakglass:review request signs it off (MarkBreakGlassReviewed).
// It ends by itself: [state.BreakGlass.Active] is computed from its end.
func (s *Service) StartBreakGlass(ctx context.Context, person, role, reason string, d time.Duration) (state.BreakGlass, error) {
	switch {
	case strings.TrimSpace(reason) == "":
		return state.BreakGlass{}, fmt.Errorf("%w: break-glass needs a reason", ErrInvalid)
	case d <= 0 || d > s.opts.MaxBreakGlass:
		return state.BreakGlass{}, fmt.Errorf("%w: break-glass for %s: want more than 0 and at most %s", ErrInvalid, d, s.opts.MaxBreakGlass)
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return state.BreakGlass{}, err
	}
	if !p.AllowsBreakGlass(person, role) {
		return state.BreakGlass{}, fmt.Errorf("%w: the policy does not let %q break glass as %q", ErrNotAllowed, person, role)
	}
	if err := s.checkUser(ctx, person); err != nil {
		return state.BreakGlass{}, err
	}
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return state.BreakGlass{}, fmt.Errorf("quorum: break-glass id: %w", err)
	}
	now := s.now()
	b := state.BreakGlass{ID: hex.EncodeToString(rnd[:]), Person: person, Role: role, Reason: reason,
		Started: now, Ends: now.Add(d)}
	if err := s.record(ctx, ledger.KindBreakGlass, person, map[string]any{"event": "start", "id": b.ID,
		"role": role, "reason": reason, "started": b.Started, "ends": b.Ends}); err != nil {
		return state.BreakGlass{}, err
	}
	if err := s.db.StartBreakGlass(ctx, b); err != nil {
		return state.BreakGlass{}, fmt.Errorf("quorum: %w", err)
	}
	s.notify(Event{Type: EventBreakGlass, By: []string{person}, Reason: reason,
		BreakGlass: &BreakGlassInfo{ID: b.ID, Person: person, Role: role, Started: b.Started, Ends: b.Ends},
		Text: fmt.Sprintf(":rotating_light: BREAK-GLASS: %s acts as %s without a quorum until %s (session %s). Reason: %s",
			person, role, b.Ends.Format(time.RFC3339), b.ID, reason)})
	return b, nil
}

// EndBreakGlass ends a running session now (by its person or anyone
// else); it still needs its review.
func (s *Service) EndBreakGlass(ctx context.Context, id, by string) error {
	if err := s.db.EndBreakGlass(ctx, id, s.now()); err != nil {
		if errors.Is(err, state.ErrNotFound) {
			return fmt.Errorf("%w: break-glass session %s", ErrNotFound, id)
		}
		return fmt.Errorf("quorum: %w", err)
	}
	return s.record(ctx, ledger.KindBreakGlass, by, map[string]any{"event": "end", "id": id})
}

// BreakGlass returns one session.
func (s *Service) BreakGlass(ctx context.Context, id string) (state.BreakGlass, error) {
	b, err := s.db.GetBreakGlass(ctx, id)
	if errors.Is(err, state.ErrNotFound) {
		return b, fmt.Errorf("%w: break-glass session %s", ErrNotFound, id)
	}
	if err != nil {
		return b, fmt.Errorf("quorum: %w", err)
	}
	return b, nil
}

// ListBreakGlass returns sessions, oldest first; only unreviewed ones when
// asked.
func (s *Service) ListBreakGlass(ctx context.Context, unreviewedOnly bool) ([]state.BreakGlass, error) {
	bs, err := s.db.ListBreakGlass(ctx, unreviewedOnly)
	if err != nil {
		return nil, fmt.Errorf("quorum: %w", err)
	}
	return bs, nil
}

// ReviewRequest builds the breakglass:review request for session id, to be
// passed to Open: its subject names the session and its details repeat what
// the reviewers are signing off.
func (s *Service) ReviewRequest(ctx context.Context, id, requester, reason string, expires time.Time) (cert.Request, error) {
	b, err := s.BreakGlass(ctx, id)
	if err != nil {
		return cert.Request{}, err
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return cert.Request{}, err
	}
	return cert.Request{Requester: requester, Action: cert.ActionBreakglassReview, Reason: reason,
		Created: s.now(), Expires: expires, PolicySerial: p.Serial,
		Review: &cert.ReviewAction{Subject: reviewPrefix + b.ID, Details: map[string]string{
			"person": b.Person, "role": b.Role, "reason": b.Reason,
			"started": b.Started.UTC().Format(time.RFC3339), "ends": b.Ends.UTC().Format(time.RFC3339)}}}, nil
}

// reviewSubject returns the session a breakglass:review request is about.
func (s *Service) reviewSubject(ctx context.Context, r *cert.Request) (state.BreakGlass, error) {
	id, ok := strings.CutPrefix(r.Review.Subject, reviewPrefix)
	if !ok {
		return state.BreakGlass{}, fmt.Errorf("%w: review subject %q does not name a break-glass session (%s<id>)", ErrInvalid, r.Review.Subject, reviewPrefix)
	}
	return s.BreakGlass(ctx, id)
}

// MarkBreakGlassReviewed clears a session's flag with approved review
// request reviewID: the certificate must verify under the current policy,
// none of its approvals may be by the person who broke the glass, and the
// session must be over. The review request is consumed (one review, one
// session).
func (s *Service) MarkBreakGlassReviewed(ctx context.Context, reviewID cert.ID, by string) (state.BreakGlass, error) {
	sr, r, err := s.get(ctx, reviewID)
	if err != nil {
		return state.BreakGlass{}, err
	}
	if r.Action != cert.ActionBreakglassReview {
		return state.BreakGlass{}, fmt.Errorf("%w: request %s is %s, not %s", ErrInvalid, short(reviewID), r.Action, cert.ActionBreakglassReview)
	}
	b, err := s.reviewSubject(ctx, r)
	if err != nil {
		return state.BreakGlass{}, err
	}
	now := s.now()
	if b.Active(now) {
		return b, fmt.Errorf("%w: break-glass session %s runs until %s; end it before it is reviewed", ErrInvalid, b.ID, b.Ends.Format(time.RFC3339))
	}
	c, err := s.Certificate(ctx, reviewID)
	if err != nil {
		return b, err
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return b, err
	}
	if _, err := cert.Verify(c, p, now); err != nil {
		return b, fmt.Errorf("quorum: review %s: %w", short(reviewID), err)
	}
	for _, a := range c.Approvals {
		if a.Approver == b.Person && a.Decision == cert.Approve {
			return b, fmt.Errorf("quorum: review %s: %w: %s cannot review their own break-glass", short(reviewID), cert.ErrSelfApproval, b.Person)
		}
	}
	if err := s.claim(ctx, sr, by); err != nil {
		return b, err
	}
	if err := s.db.MarkBreakGlassReviewed(ctx, b.ID, string(reviewID)); err != nil {
		return b, fmt.Errorf("quorum: %w", err)
	}
	var who []string
	for _, a := range c.Approvals {
		who = append(who, a.Approver)
	}
	if err := s.record(ctx, ledger.KindReview, by, map[string]any{"id": b.ID, "request": reviewID, "approvers": who}); err != nil {
		return b, err
	}
	b.Reviewed, b.ReviewRequestID = true, string(reviewID)
	s.notify(Event{Type: EventReviewed, Request: reviewID, By: who,
		BreakGlass: &BreakGlassInfo{ID: b.ID, Person: b.Person, Role: b.Role, Started: b.Started, Ends: b.Ends},
		Text:       fmt.Sprintf("break-glass session %s by %s (%s) reviewed by %v", b.ID, b.Person, b.Role, who)})
	return b, nil
}
