package quorum

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

// Errors of the service itself. Refusals of a signature, an expiry, the
// requester's own vote and the like wrap the cert sentinels
// (cert.ErrSelfApproval, cert.ErrUnknownApprover, cert.ErrBadSignature,
// cert.ErrExpired, cert.ErrStalePolicy, cert.ErrNoRule, cert.ErrNotEnough,
// cert.ErrDenied); test with errors.Is.
var (
	// ErrNoPolicy: no policy has been stored yet; run Init.
	ErrNoPolicy = errors.New("quorum: no policy yet (run quorum init)")
	// ErrInitialized: Init after a policy exists. Changes go through a
	// policy:change request instead.
	ErrInitialized = errors.New("quorum: a policy exists already; change it with an approved policy:change request")
	// ErrNotFound: no such request or break-glass session.
	ErrNotFound = errors.New("quorum: not found")
	// ErrNotOpen: a vote on a request that is no longer open.
	ErrNotOpen = errors.New("quorum: request is not open for votes")
	// ErrDuplicateVote: the approver already voted on this request. One
	// person, one vote; a changed mind needs a new request.
	ErrDuplicateVote = errors.New("quorum: approver already voted on this request")
	// ErrConsumed: the request already ran; it runs at most once.
	ErrConsumed = errors.New("quorum: request already consumed")
	// ErrNotAllowed: a disabled user, or break-glass for a person or role
	// the policy does not list.
	ErrNotAllowed = errors.New("quorum: not allowed")
	// ErrInvalid: an argument the service refuses.
	ErrInvalid = errors.New("quorum: invalid")
	// ErrTampered: the store holds a request whose bytes do not hash to its
	// ID, or a policy whose serial differs from its row.
	ErrTampered = errors.New("quorum: state does not match its own hashes")
)

// Ledger record kinds this package adds to the ledger's own (KindRequest,
// KindApproval, KindDenial, KindDecision, KindBreakGlass, KindReview).
const KindPolicy = "policy" // a policy stored: bootstrap or an applied change

// Defaults for Options.
const (
	// DefaultMaxRequestLifetime bounds how long a request may stay usable:
	// an approval given today should not be usable next month.
	DefaultMaxRequestLifetime = 7 * 24 * time.Hour
	// DefaultMaxBreakGlass bounds one break-glass session. Four hours
	// covers an incident shift; longer is a new session, logged again.
	DefaultMaxBreakGlass = 4 * time.Hour
	// DefaultPollInterval is how often Wait reads the store. Votes arrive
	// from people, so half a second is instant to them and costs one
	// indexed read.
	DefaultPollInterval = 500 * time.Millisecond
)

// Options configure a Service. The zero value is usable.
type Options struct {
	// Now is the service's clock (default time.Now). Every expiry, the
	// certificate check and break-glass ends are judged on it, never on a
	// time taken from a request.
	Now func() time.Time
	// Logger gets warnings (an approval row that no longer verifies) and
	// webhook failures (default: discard).
	Logger *slog.Logger
	// Notifier is told when a request is opened or decided and on
	// break-glass; nil means nobody is. It must not block.
	Notifier Notifier
	// MaxRequestLifetime, MaxBreakGlass and PollInterval default to the
	// constants above.
	MaxRequestLifetime time.Duration
	MaxBreakGlass      time.Duration
	PollInterval       time.Duration
}

// Service runs the quorum protocol over a state store and a ledger. It is
// safe for concurrent use, and several Services (in several processes) may
// share one database: every decision that must happen once is a
// compare-and-set in the store.
type Service struct {
	db   *state.DB
	led  *ledger.Ledger
	opts Options
	log  *slog.Logger
}

// New returns a Service over db, recording to led.
func New(db *state.DB, led *ledger.Ledger, opts Options) *Service {
	if db == nil || led == nil {
		panic("quorum: New needs a state store and a ledger")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.MaxRequestLifetime <= 0 {
		opts.MaxRequestLifetime = DefaultMaxRequestLifetime
	}
	if opts.MaxBreakGlass <= 0 {
		opts.MaxBreakGlass = DefaultMaxBreakGlass
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	return &Service{db: db, led: led, opts: opts, log: opts.Logger}
}

func (s *Service) now() time.Time { return s.opts.Now().UTC() }

// Policy returns the current policy, or ErrNoPolicy before Init.
func (s *Service) Policy(ctx context.Context) (*cert.Policy, error) {
	serial, doc, err := s.db.CurrentPolicy(ctx)
	if errors.Is(err, state.ErrNotFound) {
		return nil, ErrNoPolicy
	}
	if err != nil {
		return nil, fmt.Errorf("quorum: %w", err)
	}
	p, err := cert.ParsePolicy(doc)
	if err != nil {
		return nil, fmt.Errorf("quorum: stored policy %d: %w", serial, err)
	}
	if p.Serial != serial {
		return nil, fmt.Errorf("%w: policy row %d holds serial %d", ErrTampered, serial, p.Serial)
	}
	return p, nil
}

// Init stores the first policy (serial 1). It fails with ErrInitialized
// once any policy exists, also when two Inits race: afterwards the policy
// changes only through ApplyPolicyChange.
func (s *Service) Init(ctx context.Context, p *cert.Policy) error {
	if _, err := s.Policy(ctx); err == nil {
		return ErrInitialized
	} else if !errors.Is(err, ErrNoPolicy) {
		return err
	}
	q := *p
	if q.Version == 0 {
		q.Version = cert.PolicyVersion
	}
	if q.Serial == 0 {
		q.Serial = 1
	}
	if q.Serial != 1 {
		return fmt.Errorf("%w: the first policy has serial 1, not %d", ErrInvalid, q.Serial)
	}
	if err := q.Validate(); err != nil {
		return fmt.Errorf("quorum: init: %w", err)
	}
	if err := s.db.PutPolicy(ctx, 1, q.Encode()); errors.Is(err, state.ErrConflict) {
		return ErrInitialized
	} else if err != nil {
		return fmt.Errorf("quorum: init: %w", err)
	}
	*p = q
	return s.record(ctx, KindPolicy, "", policyData(&q, ""))
}

// record appends one ledger record. A failure is returned: the caller
// decides whether the step it records may stand without it.
func (s *Service) record(ctx context.Context, kind, actor string, data any) error {
	if _, err := s.led.Append(ctx, ledger.Entry{Kind: kind, Actor: actor, Data: data}); err != nil {
		return fmt.Errorf("quorum: ledger: %w", err)
	}
	return nil
}

func (s *Service) notify(ev Event) {
	if s.opts.Notifier == nil {
		return
	}
	ev.Time = s.now()
	s.opts.Notifier.Notify(ev)
}

// checkUser refuses a disabled user. A name the users table does not know
// is allowed: the policy, not the users table, says who approves, and the
// gate authenticates who asks.
func (s *Service) checkUser(ctx context.Context, name string) error {
	u, err := s.db.GetUser(ctx, name)
	if errors.Is(err, state.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("quorum: %w", err)
	}
	if u.Disabled {
		return fmt.Errorf("%w: user %s is disabled", ErrNotAllowed, name)
	}
	return nil
}

// Open stores req as an open request and returns its ID. The request must
// be valid, opened under the current policy, covered by one of its rules,
// not expired and usable for at most MaxRequestLifetime. Opening the same
// request again returns its ID and changes nothing.
func (s *Service) Open(ctx context.Context, req cert.Request) (cert.ID, error) {
	doc := req.Encode()
	r, err := cert.ParseRequest(doc)
	if err != nil {
		return "", fmt.Errorf("quorum: open: %w", err)
	}
	id := r.ID()
	if _, err := s.db.GetRequest(ctx, string(id)); err == nil {
		return id, nil
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return "", err
	}
	now := s.now()
	switch {
	case r.PolicySerial != p.Serial:
		return "", fmt.Errorf("quorum: open: %w: request names serial %d, current is %d", cert.ErrStalePolicy, r.PolicySerial, p.Serial)
	case r.Created.After(now.Add(cert.MaxClockSkew)):
		return "", fmt.Errorf("quorum: open: %w", cert.ErrNotYetValid)
	case !now.Before(r.Expires):
		return "", fmt.Errorf("quorum: open: %w: expires %s", cert.ErrExpired, r.Expires.Format(time.RFC3339))
	case r.Expires.Sub(now) > s.opts.MaxRequestLifetime:
		return "", fmt.Errorf("%w: request usable until %s, more than %s from now", ErrInvalid, r.Expires.Format(time.RFC3339), s.opts.MaxRequestLifetime)
	}
	rule, err := p.RuleFor(r.Action)
	if err != nil {
		return "", fmt.Errorf("quorum: open: %w", err)
	}
	if err := s.checkUser(ctx, r.Requester); err != nil {
		return "", err
	}
	if r.Action == cert.ActionBreakglassReview {
		b, err := s.reviewSubject(ctx, r)
		if err != nil {
			return "", err
		}
		if b.Reviewed {
			return "", fmt.Errorf("%w: break-glass session %s is already reviewed", ErrInvalid, b.ID)
		}
	}
	if err := s.db.PutRequest(ctx, state.Request{ID: string(id), Doc: doc, Requester: r.Requester,
		Action: r.Action, Created: now, Expires: r.Expires}); err != nil {
		return "", fmt.Errorf("quorum: open: %w", err)
	}
	data := requestData(id, r)
	data["rule"], data["need"] = rule.Name, rule.Threshold
	if err := s.record(ctx, ledger.KindRequest, r.Requester, data); err != nil {
		return id, err
	}
	s.notify(Event{Type: EventOpened, Request: id, Action: r.Action, Requester: r.Requester, Reason: r.Reason,
		What: Describe(r), Expires: r.Expires, Status: string(state.StatusOpen), Need: rule.Threshold,
		Text: fmt.Sprintf("%s asks for %s: %s (needs %d approvals; request %s)", r.Requester, r.Action, Describe(r), rule.Threshold, short(id))})
	return id, nil
}

// get reads a request and checks that its bytes still hash to its ID.
func (s *Service) get(ctx context.Context, id cert.ID) (state.Request, *cert.Request, error) {
	if _, err := cert.ParseID(string(id)); err != nil {
		return state.Request{}, nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	sr, err := s.db.GetRequest(ctx, string(id))
	if errors.Is(err, state.ErrNotFound) {
		return state.Request{}, nil, fmt.Errorf("%w: request %s", ErrNotFound, id)
	}
	if err != nil {
		return state.Request{}, nil, fmt.Errorf("quorum: %w", err)
	}
	r, err := cert.ParseRequest(sr.Doc)
	if err != nil {
		return state.Request{}, nil, fmt.Errorf("%w: request %s: %w", ErrTampered, id, err)
	}
	if r.ID() != id {
		return state.Request{}, nil, fmt.Errorf("%w: request row %s holds a document hashing to %s", ErrTampered, id, r.ID())
	}
	return sr, r, nil
}

// Approve records a signed approval. It verifies the signature against the
// key the current policy registers for the approver and refuses the
// requester, an unregistered approver, an expired request or approval, a
// request that is not open, and a second vote. When the valid approvals
// reach the rule's threshold, the request becomes approved. It returns the
// request's status afterwards.
func (s *Service) Approve(ctx context.Context, a cert.Approval) (state.Status, error) {
	return s.vote(ctx, a, cert.Approve)
}

// Deny records a signed refusal under the same checks as Approve; a valid
// deny by a registered approver denies the request.
func (s *Service) Deny(ctx context.Context, a cert.Approval) (state.Status, error) {
	return s.vote(ctx, a, cert.Deny)
}

func (s *Service) vote(ctx context.Context, a cert.Approval, want string) (state.Status, error) {
	if a.Decision != want {
		return "", fmt.Errorf("%w: a %q vote given as %q", ErrInvalid, a.Decision, want)
	}
	sr, r, err := s.get(ctx, a.Request)
	if err != nil {
		return "", err
	}
	if sr.Status != state.StatusOpen {
		return sr.Status, fmt.Errorf("%w: request %s is %s", ErrNotOpen, short(a.Request), sr.Status)
	}
	now := s.now()
	if !now.Before(r.Expires) {
		s.expire(ctx, sr, r)
		return state.StatusExpired, fmt.Errorf("quorum: vote on %s: %w: request expired at %s", short(a.Request), cert.ErrExpired, r.Expires.Format(time.RFC3339))
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return "", err
	}
	if r.PolicySerial != p.Serial {
		return sr.Status, fmt.Errorf("quorum: vote on %s: %w: opened under serial %d, current is %d", short(a.Request), cert.ErrStalePolicy, r.PolicySerial, p.Serial)
	}
	reg, ok := p.Approver(a.Approver)
	if !ok {
		return sr.Status, fmt.Errorf("quorum: vote on %s: %w: %q", short(a.Request), cert.ErrUnknownApprover, a.Approver)
	}
	if err := a.VerifySignature(reg.PublicKey); err != nil {
		return sr.Status, fmt.Errorf("quorum: vote on %s: %w", short(a.Request), err)
	}
	if !now.Before(a.Expires) {
		return sr.Status, fmt.Errorf("quorum: vote on %s: %w: approval by %s expired at %s", short(a.Request), cert.ErrExpired, a.Approver, a.Expires.Format(time.RFC3339))
	}
	if a.Approver == r.Requester {
		return sr.Status, fmt.Errorf("quorum: vote on %s: %w: %s", short(a.Request), cert.ErrSelfApproval, a.Approver)
	}
	if r.Action == cert.ActionBreakglassReview {
		b, err := s.reviewSubject(ctx, r)
		if err != nil {
			return sr.Status, err
		}
		if b.Person == a.Approver {
			return sr.Status, fmt.Errorf("quorum: vote on %s: %w: %s broke the glass and cannot review it", short(a.Request), cert.ErrSelfApproval, a.Approver)
		}
	}
	if err := s.checkUser(ctx, a.Approver); err != nil {
		return sr.Status, err
	}
	err = s.db.AddApproval(ctx, state.Approval{RequestID: string(a.Request), Approver: a.Approver,
		Decision: a.Decision, Doc: encodeApproval(a), Created: now})
	switch {
	case errors.Is(err, state.ErrExists):
		return sr.Status, fmt.Errorf("%w: %s on %s", ErrDuplicateVote, a.Approver, short(a.Request))
	case errors.Is(err, state.ErrSelfApproval):
		return sr.Status, fmt.Errorf("quorum: vote on %s: %w", short(a.Request), cert.ErrSelfApproval)
	case err != nil:
		return sr.Status, fmt.Errorf("quorum: vote: %w", err)
	}
	kind := ledger.KindApproval
	if want == cert.Deny {
		kind = ledger.KindDenial
	}
	if err := s.record(ctx, kind, a.Approver, map[string]any{"request": a.Request, "decision": a.Decision,
		"expires": a.Expires, "signature": base64.StdEncoding.EncodeToString(a.Signature)}); err != nil {
		return sr.Status, err
	}
	return s.decide(ctx, sr, r, p)
}

// decide moves an open request to denied or approved when its votes say
// so. Two deciders racing are fine: the status change is a compare-and-set
// and only the winner records and announces it.
func (s *Service) decide(ctx context.Context, sr state.Request, r *cert.Request, p *cert.Policy) (state.Status, error) {
	id := cert.ID(sr.ID)
	t, err := s.tally(ctx, sr, r, p)
	if err != nil {
		return sr.Status, err
	}
	to := state.StatusOpen
	switch {
	case len(t.Denied) > 0:
		to = state.StatusDenied
	case len(t.Approved) >= t.Need:
		// Verify is the authority, not the count above.
		if _, err := cert.Verify(t.cert, p, s.now()); err != nil {
			return sr.Status, nil
		}
		to = state.StatusApproved
	default:
		return state.StatusOpen, nil
	}
	err = s.db.SetRequestStatus(ctx, string(id), state.StatusOpen, to)
	if errors.Is(err, state.ErrConflict) {
		cur, gerr := s.db.GetRequest(ctx, string(id))
		if gerr != nil {
			return "", fmt.Errorf("quorum: %w", gerr)
		}
		return cur.Status, nil
	}
	if err != nil {
		return "", fmt.Errorf("quorum: decide %s: %w", short(id), err)
	}
	by := t.Approved
	if to == state.StatusDenied {
		by = t.Denied
	}
	if err := s.record(ctx, ledger.KindDecision, "", map[string]any{"request": id, "decision": string(to), "by": by,
		"rule": t.Rule, "need": t.Need}); err != nil {
		return to, err
	}
	s.notify(Event{Type: "request." + string(to), Request: id, Action: r.Action, Requester: r.Requester,
		Reason: r.Reason, What: Describe(r), Expires: r.Expires, Status: string(to), By: by,
		Approvals: len(t.Approved), Need: t.Need,
		Text: fmt.Sprintf("request %s (%s by %s) %s by %v", short(id), r.Action, r.Requester, to, by)})
	return to, nil
}

// expire marks an open or approved request past its expiry as expired,
// once, with a ledger record. Errors are logged: the caller is already
// refusing the request.
func (s *Service) expire(ctx context.Context, sr state.Request, r *cert.Request) {
	if sr.Status != state.StatusOpen && sr.Status != state.StatusApproved {
		return
	}
	err := s.db.SetRequestStatus(ctx, sr.ID, sr.Status, state.StatusExpired)
	if errors.Is(err, state.ErrConflict) {
		return
	}
	if err != nil {
		s.log.Warn("marking request expired failed", "request", sr.ID, "err", err)
		return
	}
	if err := s.record(ctx, ledger.KindDecision, "", map[string]any{"request": sr.ID, "decision": string(state.StatusExpired)}); err != nil {
		s.log.Error("ledger record for an expired request failed", "request", sr.ID, "err", err)
	}
	s.notify(Event{Type: EventExpired, Request: cert.ID(sr.ID), Action: r.Action, Requester: r.Requester,
		Reason: r.Reason, What: Describe(r), Expires: r.Expires, Status: string(state.StatusExpired),
		Text: fmt.Sprintf("request %s (%s by %s) expired without running", short(cert.ID(sr.ID)), r.Action, r.Requester)})
}

// ExpireStale marks every open or approved request whose expiry has
// passed as expired and returns how many it marked.
func (s *Service) ExpireStale(ctx context.Context) (int, error) {
	n := 0
	now := s.now()
	for _, st := range []state.Status{state.StatusOpen, state.StatusApproved} {
		rs, err := s.db.ListRequests(ctx, state.RequestFilter{Status: st})
		if err != nil {
			return n, fmt.Errorf("quorum: %w", err)
		}
		for _, sr := range rs {
			if sr.Expires.IsZero() || now.Before(sr.Expires) {
				continue
			}
			_, r, err := s.get(ctx, cert.ID(sr.ID))
			if err != nil {
				s.log.Warn("skipping unreadable request", "request", sr.ID, "err", err)
				continue
			}
			s.expire(ctx, sr, r)
			n++
		}
	}
	return n, nil
}

// Tally is where a request's votes stand under the current policy.
type Tally struct {
	Rule     string   // the rule that applies
	Need     int      // its threshold
	Approved []string // approvers whose approval verifies now, by name
	Denied   []string // approvers whose deny verifies now
	// Invalid names votes stored but not counted, with why (expired,
	// approver no longer registered, signature does not verify).
	Invalid []string
	// Pending are registered approvers who may still vote: not the
	// requester, not yet voted.
	Pending []string
	cert    *cert.Certificate
}

func (s *Service) tally(ctx context.Context, sr state.Request, r *cert.Request, p *cert.Policy) (*Tally, error) {
	t := &Tally{cert: &cert.Certificate{Request: sr.Doc}}
	if rule, err := p.RuleFor(r.Action); err == nil {
		t.Rule, t.Need = rule.Name, rule.Threshold
	}
	rows, err := s.db.ListApprovals(ctx, sr.ID)
	if err != nil {
		return nil, fmt.Errorf("quorum: %w", err)
	}
	now := s.now()
	voted := map[string]bool{}
	for _, row := range rows {
		voted[row.Approver] = true
		a, err := decodeApproval(row.Doc)
		if err == nil && (a.Approver != row.Approver || string(a.Request) != sr.ID || a.Decision != row.Decision) {
			err = fmt.Errorf("%w: row does not match its document", ErrTampered)
		}
		if err == nil {
			if reg, ok := p.Approver(a.Approver); !ok {
				err = fmt.Errorf("%w: %s", cert.ErrUnknownApprover, a.Approver)
			} else if err = a.VerifySignature(reg.PublicKey); err == nil && !now.Before(a.Expires) {
				err = fmt.Errorf("%w at %s", cert.ErrExpired, a.Expires.Format(time.RFC3339))
			}
		}
		if err != nil {
			if errors.Is(err, cert.ErrBadSignature) || errors.Is(err, ErrTampered) || errors.Is(err, cert.ErrMalformed) {
				s.log.Warn("stored approval does not verify", "request", sr.ID, "approver", row.Approver, "err", err)
			}
			t.Invalid = append(t.Invalid, fmt.Sprintf("%s (%s): %v", row.Approver, row.Decision, err))
			continue
		}
		t.cert.Approvals = append(t.cert.Approvals, a)
		if a.Decision == cert.Deny {
			t.Denied = append(t.Denied, a.Approver)
		} else {
			t.Approved = append(t.Approved, a.Approver)
		}
	}
	for _, ap := range p.Approvers {
		if !voted[ap.Name] && ap.Name != r.Requester {
			t.Pending = append(t.Pending, ap.Name)
		}
	}
	slices.Sort(t.Pending)
	return t, nil
}

// Certificate assembles request id's certificate: its exact bytes and
// every stored vote that verifies now under the current policy (expired
// or no longer registered ones are left out, as cert.Verify requires).
// Whether it suffices is for cert.Verify to say.
func (s *Service) Certificate(ctx context.Context, id cert.ID) (*cert.Certificate, error) {
	sr, r, err := s.get(ctx, id)
	if err != nil {
		return nil, err
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return nil, err
	}
	t, err := s.tally(ctx, sr, r, p)
	if err != nil {
		return nil, err
	}
	return t.cert, nil
}

// Summary is everything a person needs to decide on a request.
type Summary struct {
	ID         cert.ID
	Request    *cert.Request
	Status     state.Status
	Opened     time.Time // on the store's clock
	ConsumedAt time.Time
	ConsumedBy string
	Tally
}

// Show returns request id with its votes so far and what is still needed.
func (s *Service) Show(ctx context.Context, id cert.ID) (*Summary, error) {
	sr, r, err := s.get(ctx, id)
	if err != nil {
		return nil, err
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return nil, err
	}
	if sr.Status == state.StatusOpen || sr.Status == state.StatusApproved {
		if !s.now().Before(r.Expires) {
			s.expire(ctx, sr, r)
			if cur, err := s.db.GetRequest(ctx, sr.ID); err == nil {
				sr = cur
			}
		}
	}
	t, err := s.tally(ctx, sr, r, p)
	if err != nil {
		return nil, err
	}
	return &Summary{ID: id, Request: r, Status: sr.Status, Opened: sr.Created, ConsumedAt: sr.ConsumedAt,
		ConsumedBy: sr.ConsumedBy, Tally: *t}, nil
}

// List returns requests, newest first, optionally only those in status st.
func (s *Service) List(ctx context.Context, st state.Status) ([]state.Request, error) {
	rs, err := s.db.ListRequests(ctx, state.RequestFilter{Status: st})
	if err != nil {
		return nil, fmt.Errorf("quorum: %w", err)
	}
	return rs, nil
}

// Consume is the one way an approved request runs: it verifies the
// certificate against the current policy on the service's clock, then
// claims the request in the store with one conditional UPDATE, so that of
// any number of callers in any number of processes exactly one gets the
// request back; the others get ErrConsumed. Run exactly the returned
// request's payload, and only after Consume returned it. A failure to
// record the run in the ledger is returned too: do not run it then.
func (s *Service) Consume(ctx context.Context, id cert.ID, by string) (*cert.Request, *cert.Certificate, error) {
	sr, r, err := s.get(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	if sr.Status == state.StatusConsumed {
		return nil, nil, fmt.Errorf("%w: %s by %s at %s", ErrConsumed, short(id), sr.ConsumedBy, sr.ConsumedAt.Format(time.RFC3339))
	}
	c, err := s.Certificate(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return nil, nil, err
	}
	if _, err := cert.Verify(c, p, s.now()); err != nil {
		if errors.Is(err, cert.ErrExpired) && !s.now().Before(r.Expires) {
			s.expire(ctx, sr, r)
		}
		return nil, nil, fmt.Errorf("quorum: consume %s: %w", short(id), err)
	}
	if err := s.claim(ctx, sr, by); err != nil {
		return nil, nil, err
	}
	if err := s.record(ctx, ledger.KindDecision, by, map[string]any{"request": id, "decision": string(state.StatusConsumed)}); err != nil {
		return nil, nil, err
	}
	return r, c, nil
}

// claim moves a verified request to consumed, promoting it from open
// first if the vote that reached the threshold did not (a crash between
// storing the vote and deciding).
func (s *Service) claim(ctx context.Context, sr state.Request, by string) error {
	if sr.Status == state.StatusOpen {
		if err := s.db.SetRequestStatus(ctx, sr.ID, state.StatusOpen, state.StatusApproved); err != nil && !errors.Is(err, state.ErrConflict) {
			return fmt.Errorf("quorum: consume %s: %w", short(cert.ID(sr.ID)), err)
		}
	}
	err := s.db.Consume(ctx, sr.ID, by, s.now())
	switch {
	case errors.Is(err, state.ErrConsumed):
		return fmt.Errorf("%w: %v", ErrConsumed, err)
	case errors.Is(err, state.ErrExpired):
		return fmt.Errorf("quorum: consume: %w: %v", cert.ErrExpired, err)
	case errors.Is(err, state.ErrConflict):
		return fmt.Errorf("%w: %v", ErrNotOpen, err)
	case err != nil:
		return fmt.Errorf("quorum: consume: %w", err)
	}
	return nil
}

// Wait blocks until request id is decided (no longer open) or ctx ends,
// and returns its status. It never decides anything itself except that an
// open request past its expiry is expired: a timeout is never an approval.
func (s *Service) Wait(ctx context.Context, id cert.ID) (state.Status, error) {
	tick := time.NewTicker(s.opts.PollInterval)
	defer tick.Stop()
	for {
		sr, r, err := s.get(ctx, id)
		if err != nil {
			if ctx.Err() != nil {
				return state.StatusOpen, fmt.Errorf("quorum: wait %s: %w", short(id), ctx.Err())
			}
			return "", err
		}
		if sr.Status == state.StatusOpen && !s.now().Before(r.Expires) {
			s.expire(ctx, sr, r)
			continue
		}
		if sr.Status != state.StatusOpen {
			return sr.Status, nil
		}
		select {
		case <-ctx.Done():
			return state.StatusOpen, fmt.Errorf("quorum: wait %s: %w", short(id), ctx.Err())
		case <-tick.C:
		}
	}
}

// ProposePolicy opens a policy:change request for next, which must carry
// the current serial + 1 (set when zero).
func (s *Service) ProposePolicy(ctx context.Context, requester, reason string, next *cert.Policy, expires time.Time) (cert.ID, error) {
	cur, err := s.Policy(ctx)
	if err != nil {
		return "", err
	}
	q := *next
	q.Version = cert.PolicyVersion
	if q.Serial == 0 {
		q.Serial = cur.Serial + 1
	}
	return s.Open(ctx, cert.Request{Requester: requester, Action: cert.ActionPolicyChange, Reason: reason,
		Created: s.now(), Expires: expires, PolicySerial: cur.Serial, Policy: &q})
}

// ApplyPolicyChange installs the policy carried by approved request id. The
// certificate is verified under the current (old) policy; storing the new
// one is a compare-and-set on the serial, so of two appliers exactly one
// succeeds, and afterwards the request is stale under the new policy and
// can never be applied again. The request is then marked consumed.
func (s *Service) ApplyPolicyChange(ctx context.Context, id cert.ID, by string) (*cert.Policy, error) {
	sr, r, err := s.get(ctx, id)
	if err != nil {
		return nil, err
	}
	if r.Action != cert.ActionPolicyChange {
		return nil, fmt.Errorf("%w: request %s is %s, not %s", ErrInvalid, short(id), r.Action, cert.ActionPolicyChange)
	}
	c, err := s.Certificate(ctx, id)
	if err != nil {
		return nil, err
	}
	p, err := s.Policy(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := cert.Verify(c, p, s.now()); err != nil {
		return nil, fmt.Errorf("quorum: apply %s: %w", short(id), err)
	}
	next := r.Policy
	if err := s.db.PutPolicy(ctx, next.Serial, next.Encode()); errors.Is(err, state.ErrConflict) {
		return nil, fmt.Errorf("quorum: apply %s: %w: another change was applied first", short(id), cert.ErrStalePolicy)
	} else if err != nil {
		return nil, fmt.Errorf("quorum: apply %s: %w", short(id), err)
	}
	if err := s.record(ctx, KindPolicy, by, policyData(next, id)); err != nil {
		return next, err
	}
	if err := s.claim(ctx, sr, by); err != nil {
		s.log.Warn("policy applied but its request not marked consumed", "request", sr.ID, "err", err)
	}
	s.notify(Event{Type: EventPolicy, Request: id, Action: r.Action, Requester: r.Requester, Reason: r.Reason,
		By: []string{by}, What: Describe(r),
		Text: fmt.Sprintf("policy serial %d is now in force (request %s by %s)", next.Serial, short(id), r.Requester)})
	return next, nil
}

// approvalDoc is how a vote is stored in the approvals table: the signed
// fields, enough to rebuild the cert.Approval and check it again.
type approvalDoc struct {
	Approver  string `json:"approver"`
	Request   string `json:"request"`
	Decision  string `json:"decision"`
	Expires   string `json:"expires"`
	Signature []byte `json:"signature"`
}

func encodeApproval(a cert.Approval) []byte {
	b, err := json.Marshal(approvalDoc{a.Approver, string(a.Request), a.Decision, a.Expires.UTC().Format(cert.TimeFormat), a.Signature})
	if err != nil {
		panic("quorum: encode approval: " + err.Error())
	}
	return b
}

func decodeApproval(b []byte) (cert.Approval, error) {
	var d approvalDoc
	if err := json.Unmarshal(b, &d); err != nil {
		return cert.Approval{}, fmt.Errorf("%w: stored approval: %v", cert.ErrMalformed, err)
	}
	exp, err := time.Parse(cert.TimeFormat, d.Expires)
	if err != nil {
		return cert.Approval{}, fmt.Errorf("%w: stored approval expiry: %v", cert.ErrMalformed, err)
	}
	return cert.Approval{Approver: d.Approver, Request: cert.ID(d.Request), Decision: d.Decision, Expires: exp, Signature: d.Signature}, nil
}

func short(id cert.ID) string {
	if len(id) > 12 {
		return string(id[:12])
	}
	return string(id)
}

// Describe says in one line what request r will do.
func Describe(r *cert.Request) string {
	switch {
	case r.SQL != nil:
		return fmt.Sprintf("SQL on database %s as role %s: %s", r.SQL.Database, r.SQL.Role, clip(r.SQL.Text, 200))
	case r.Vault != nil:
		return fmt.Sprintf("vault %s on repository %s %v", r.Vault.Op, r.Vault.Repo, r.Vault.Params)
	case r.Policy != nil:
		return fmt.Sprintf("install policy serial %d (%d approvers, %d rules)", r.Policy.Serial, len(r.Policy.Approvers), len(r.Policy.Rules))
	case r.Review != nil:
		return "review of " + r.Review.Subject
	}
	return r.Action
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// requestData is a request's ledger record: the ID binds it to the exact
// bytes in the store; the rest lets a reader of the ledger alone follow it.
func requestData(id cert.ID, r *cert.Request) map[string]any {
	d := map[string]any{"request": id, "action": r.Action, "reason": r.Reason, "expires": r.Expires,
		"policy_serial": r.PolicySerial}
	switch {
	case r.SQL != nil:
		d["sql"] = map[string]string{"database": r.SQL.Database, "role": r.SQL.Role, "text": clip(r.SQL.Text, 4096), "class": r.SQL.Class}
	case r.Vault != nil:
		d["vault"] = map[string]any{"op": r.Vault.Op, "repo": r.Vault.Repo, "params": r.Vault.Params}
	case r.Policy != nil:
		d["policy"] = map[string]any{"serial": r.Policy.Serial, "hash": r.Policy.Hash()}
	case r.Review != nil:
		d["review"] = r.Review.Subject
	}
	return d
}

func policyData(p *cert.Policy, via cert.ID) map[string]any {
	var names []string
	for _, a := range p.Approvers {
		names = append(names, a.Name)
	}
	rules := map[string]int{}
	for _, r := range p.Rules {
		rules[r.Name] = r.Threshold
	}
	d := map[string]any{"serial": p.Serial, "hash": p.Hash(), "approvers": names, "rules": rules}
	if via != "" {
		d["request"] = via
	}
	return d
}
