// Package cert defines quorum certificates and verifies them: the proof that
// a destructive act was consented to by enough people other than the one
// asking.
//
// Terms:
//   - A [Policy] is the registered approvers (a name and an Ed25519 public key
//     each) and the [Rule]s saying how many of them must approve an action.
//   - A [Request] is a canonical document naming who asks, the action, and
//     exactly what will run (a SQL statement, a vault operation, a new
//     policy). Its [ID] is the domain-separated SHA-256 of its canonical bytes,
//     so one request has exactly one ID and any change makes a new one.
//   - An [Approval] is an approver's Ed25519 signature over a request ID, a
//     decision ("approve" or "deny") and an expiry.
//   - A [Certificate] is the canonical request bytes and its approvals: what a
//     consumer (the gate, the vault server) checks with [Verify] before it
//     runs the request.
//
// The package is a leaf (standard library only) so that the vault server can
// import it and check certificates itself, trusting nothing but its own copy
// of the policy and its own clock.
//
// Single use is not enforced here: Verify is a pure function and accepts the
// same certificate any number of times. A consumer must record the request
// ID as consumed atomically with running it (a unique row in the state
// store; on the vault, a write-once object named after the ID) and refuse an
// ID already consumed. See docs/quorum.md.
package cert

import "errors"

// Errors returned by this package. Each error returned wraps exactly one of
// these, so callers can tell refusals apart with errors.Is.
var (
	// ErrMalformed: bytes that do not parse, are not canonical, or violate a
	// field's syntax.
	ErrMalformed = errors.New("cert: malformed")
	// ErrPolicy: a policy that fails Validate.
	ErrPolicy = errors.New("cert: invalid policy")
	// ErrExpired: the request or an approval has expired.
	ErrExpired = errors.New("cert: expired")
	// ErrNotYetValid: the request was created in the future, beyond MaxClockSkew.
	ErrNotYetValid = errors.New("cert: request created in the future")
	// ErrStalePolicy: the request was opened under another policy serial, or
	// proposes a policy whose serial does not follow the current one.
	ErrStalePolicy = errors.New("cert: request not opened under the current policy")
	// ErrNoRule: no rule matches the action; nothing is allowed by default.
	ErrNoRule = errors.New("cert: no rule for action")
	// ErrUnknownApprover: an approval by a name the policy does not register.
	ErrUnknownApprover = errors.New("cert: unknown approver")
	// ErrBadSignature: an approval whose signature does not verify under the
	// approver's registered key.
	ErrBadSignature = errors.New("cert: bad signature")
	// ErrWrongRequest: an approval of another request.
	ErrWrongRequest = errors.New("cert: approval for another request")
	// ErrSelfApproval: the requester approved their own request.
	ErrSelfApproval = errors.New("cert: requester cannot approve own request")
	// ErrDenied: a registered approver denied the request.
	ErrDenied = errors.New("cert: denied")
	// ErrNotEnough: fewer distinct valid approvals than the rule's threshold.
	ErrNotEnough = errors.New("cert: not enough approvals")
)
