package cert

import (
	"crypto/ed25519"
	"fmt"
	"time"
)

// Decisions an approval can carry.
const (
	Approve = "approve"
	Deny    = "deny"
)

// Limits on a certificate.
const (
	MaxCertificateSize = 2 * MaxRequestSize // base64 of the request plus approvals
	MaxApprovals       = MaxApprovers
	// MaxClockSkew is how far in the future a request's creation time may
	// be on the verifier's clock.
	MaxClockSkew = 2 * time.Minute
)

// Approval is one approver's signed decision on one request.
//
// The signature covers ApprovalMessage(Approver, Request, Decision, Expires),
// so it cannot be moved to another request, turned from a deny into an
// approve, given a later expiry, or claimed by another name.
type Approval struct {
	Approver  string
	Request   ID
	Decision  string // Approve or Deny
	Expires   time.Time
	Signature []byte
}

// ApprovalMessage returns the bytes an approval signs:
//
//	"dualkey/approval/v1\n" approver "\n" id "\n" decision "\n" expires
//
// with expires in TimeFormat. No field can contain a newline, so the
// message is unambiguous.
func ApprovalMessage(approver string, id ID, decision string, expires time.Time) []byte {
	return []byte("dualkey/approval/v1\n" + approver + "\n" + string(id) + "\n" + decision + "\n" + formatTime(expires))
}

// Sign returns approver's signed decision on request id, valid until
// expires (truncated to the second). It panics if priv is not an Ed25519
// private key.
func Sign(priv ed25519.PrivateKey, approver string, id ID, decision string, expires time.Time) Approval {
	expires = expires.UTC().Truncate(time.Second)
	return Approval{
		Approver:  approver,
		Request:   id,
		Decision:  decision,
		Expires:   expires,
		Signature: ed25519.Sign(priv, ApprovalMessage(approver, id, decision, expires)),
	}
}

// validate checks an approval's syntax; errors wrap ErrMalformed.
func (a *Approval) validate() error {
	if err := ValidName(a.Approver); err != nil {
		return fmt.Errorf("approval: approver: %w", err)
	}
	if _, err := ParseID(string(a.Request)); err != nil {
		return fmt.Errorf("approval by %s: %w", a.Approver, err)
	}
	if a.Decision != Approve && a.Decision != Deny {
		return fmt.Errorf("%w: approval by %s: decision %.80q, want %q or %q", ErrMalformed, a.Approver, a.Decision, Approve, Deny)
	}
	if y := a.Expires.UTC().Year(); y < 2000 || y > 9999 || !a.Expires.Equal(a.Expires.Truncate(time.Second)) {
		return fmt.Errorf("%w: approval by %s: expiry %s: want whole seconds in years 2000 to 9999", ErrMalformed, a.Approver, a.Expires)
	}
	if len(a.Signature) != ed25519.SignatureSize {
		return fmt.Errorf("%w: approval by %s: signature of %d bytes, want %d", ErrMalformed, a.Approver, len(a.Signature), ed25519.SignatureSize)
	}
	return nil
}

// VerifySignature checks a's syntax and its signature under pub, and
// nothing else: not the expiry, not whether pub belongs to a.Approver.
// A state store can use it to refuse a bad approval when it is submitted.
func (a *Approval) VerifySignature(pub ed25519.PublicKey) error {
	if err := a.validate(); err != nil {
		return err
	}
	if len(pub) != ed25519.PublicKeySize || !ed25519.Verify(pub, ApprovalMessage(a.Approver, a.Request, a.Decision, a.Expires), a.Signature) {
		return fmt.Errorf("%w: approval by %s of %s", ErrBadSignature, a.Approver, a.Request)
	}
	return nil
}

// Certificate is what a consumer checks before it runs a request: the
// request's canonical bytes (not a re-encoding: the bytes that were
// approved) and the approvals collected for it.
type Certificate struct {
	Request   []byte
	Approvals []Approval
}

type approvalWire struct {
	Approver  string `json:"approver"`
	Request   ID     `json:"request"`
	Decision  string `json:"decision"`
	Expires   string `json:"expires"`
	Signature []byte `json:"signature"`
}

type certificateWire struct {
	Request   []byte         `json:"request"` // base64
	Approvals []approvalWire `json:"approvals"`
}

// Encode returns c as JSON: the request bytes in base64 and the approvals in
// order, expiry in TimeFormat.
func (c *Certificate) Encode() []byte {
	w := certificateWire{Request: c.Request, Approvals: []approvalWire{}}
	if w.Request == nil {
		w.Request = []byte{}
	}
	for _, a := range c.Approvals {
		w.Approvals = append(w.Approvals, approvalWire{a.Approver, a.Request, a.Decision, formatTime(a.Expires), a.Signature})
	}
	return marshal(w)
}

// ParseCertificate decodes a certificate strictly (size-limited, no unknown
// fields, no trailing data, every approval well-formed). It does not parse
// the request or check any signature: Verify does.
func ParseCertificate(data []byte) (*Certificate, error) {
	if len(data) > MaxCertificateSize {
		return nil, fmt.Errorf("%w: certificate of %d bytes exceeds %d", ErrMalformed, len(data), MaxCertificateSize)
	}
	var w certificateWire
	if err := unmarshalStrict(data, &w); err != nil {
		return nil, fmt.Errorf("%w: certificate: %v", ErrMalformed, err)
	}
	if len(w.Request) == 0 || len(w.Request) > MaxRequestSize {
		return nil, fmt.Errorf("%w: certificate: request of %d bytes, want 1 to %d", ErrMalformed, len(w.Request), MaxRequestSize)
	}
	if len(w.Approvals) > MaxApprovals {
		return nil, fmt.Errorf("%w: certificate: %d approvals, at most %d", ErrMalformed, len(w.Approvals), MaxApprovals)
	}
	c := &Certificate{Request: w.Request}
	for _, aw := range w.Approvals {
		exp, err := parseTime(aw.Expires)
		if err != nil {
			return nil, fmt.Errorf("certificate: approval by %.80q: %w", aw.Approver, err)
		}
		a := Approval{aw.Approver, aw.Request, aw.Decision, exp, aw.Signature}
		if err := a.validate(); err != nil {
			return nil, fmt.Errorf("certificate: %w", err)
		}
		c.Approvals = append(c.Approvals, a)
	}
	return c, nil
}

// Verify checks that c authorizes its request under policy p at time now
// (the verifier's own clock), and returns the request. It checks, in order:
//
//   - p is valid, and c's request bytes are a canonical, valid request;
//   - the request was not created more than MaxClockSkew after now and has
//     not expired (now before Expires);
//   - it was opened under p (PolicySerial == p.Serial), so a policy change
//     voids pending requests and an old policy:change cannot be replayed;
//   - a rule matches its action (ErrNoRule otherwise);
//   - every approval is for this request's ID, by an approver registered in
//     p, signed with that approver's key, and not expired; any approval that
//     fails is an error, never silently skipped;
//   - no approval by the requester says approve (ErrSelfApproval);
//   - no registered approver denied it (ErrDenied): one valid deny vetoes;
//   - at least the rule's threshold of distinct approvers (and distinct keys)
//     approved; repeated approvals by one approver count once (ErrNotEnough).
//
// Verify does not enforce single use; see the package documentation.
func Verify(c *Certificate, p *Policy, now time.Time) (*Request, error) {
	if c == nil || p == nil {
		return nil, fmt.Errorf("%w: nil certificate or policy", ErrMalformed)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	req, err := ParseRequest(c.Request)
	if err != nil {
		return nil, err
	}
	if req.Created.After(now.Add(MaxClockSkew)) {
		return nil, fmt.Errorf("%w: created %s, now is %s", ErrNotYetValid, formatTime(req.Created), formatTime(now))
	}
	if !now.Before(req.Expires) {
		return nil, fmt.Errorf("%w: request expired at %s", ErrExpired, formatTime(req.Expires))
	}
	if req.PolicySerial != p.Serial {
		return nil, fmt.Errorf("%w: opened under policy serial %d, current is %d", ErrStalePolicy, req.PolicySerial, p.Serial)
	}
	rule, err := p.RuleFor(req.Action)
	if err != nil {
		return nil, err
	}
	id := idOf(c.Request)
	approvers := map[string]bool{}
	keys := map[string]bool{}
	var denied []string
	for i := range c.Approvals {
		a := &c.Approvals[i]
		if err := a.validate(); err != nil {
			return nil, err
		}
		if a.Request != id {
			return nil, fmt.Errorf("%w: approval by %s is for %s, not %s", ErrWrongRequest, a.Approver, a.Request, id)
		}
		reg, ok := p.Approver(a.Approver)
		if !ok {
			return nil, fmt.Errorf("%w: %q", ErrUnknownApprover, a.Approver)
		}
		if err := a.VerifySignature(reg.PublicKey); err != nil {
			return nil, err
		}
		if !now.Before(a.Expires) {
			return nil, fmt.Errorf("%w: approval by %s expired at %s", ErrExpired, a.Approver, formatTime(a.Expires))
		}
		if a.Decision == Deny {
			denied = append(denied, a.Approver)
			continue
		}
		if a.Approver == req.Requester {
			return nil, fmt.Errorf("%w: %s", ErrSelfApproval, a.Approver)
		}
		approvers[a.Approver] = true
		keys[string(reg.PublicKey)] = true
	}
	if len(denied) > 0 {
		return nil, fmt.Errorf("%w by %v", ErrDenied, denied)
	}
	have := min(len(approvers), len(keys))
	if have < rule.Threshold {
		return nil, fmt.Errorf("%w: have %d, need %d (rule %s for %s)", ErrNotEnough, have, rule.Threshold, rule.Name, req.Action)
	}
	return req, nil
}
