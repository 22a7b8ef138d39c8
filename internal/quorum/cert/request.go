package cert

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// Actions with a fixed meaning. Other actions are namespace:name, where the
// namespace says which payload a request carries (see Request).
const (
	ActionPolicyChange     = "policy:change"
	ActionBreakglassReview = "breakglass:review"
)

// Limits on a request.
const (
	MaxRequestSize = 1 << 20 // the SQL text is most of it
	MaxReasonLen   = 4096
	MaxParams      = 256
)

// RequestVersion is the request format version this code reads and writes.
const RequestVersion = 1

// TimeFormat is the one form times take in requests and signed approvals:
// UTC, whole seconds. Encode truncates to it.
const TimeFormat = "2006-01-02T15:04:05Z"

// Request is a request to do one destructive act. It carries exactly one
// payload, chosen by the namespace of Action:
//
//	sql:<class>        SQL, with SQL.Class == <class>
//	vault:<op>         Vault, with Vault.Op == <op>
//	policy:change      Policy, the proposed policy, with serial PolicySerial+1
//	breakglass:<x>     Review
//
// The payload is exactly what will run, and the action (which picks the
// rule) is tied to it, so a request cannot pass under a lenient rule and run
// something the rule did not cover.
type Request struct {
	Requester    string    // who asks; never counts as an approver
	Action       string    // picks the rule, e.g. "sql:destructive"
	Reason       string    // why, in the requester's words; required
	Created      time.Time // on the requester's clock
	Expires      time.Time // after this, approvals no longer make it run
	PolicySerial uint64    // the serial of the policy it was opened under

	SQL    *SQLAction
	Vault  *VaultAction
	Policy *Policy
	Review *ReviewAction
}

// SQLAction is one SQL statement as the gate will send it.
type SQLAction struct {
	Database string
	Role     string // the database role it runs as
	Text     string // the statement, byte for byte
	Class    string // the gate's classification, e.g. "destructive"
}

// VaultAction is one guarded vault operation, such as shortening a
// snapshot's lock ("lock.shorten") or forgetting a locked snapshot.
type VaultAction struct {
	Op     string
	Repo   string            // the repository's ID
	Params map[string]string // e.g. "snapshot", "until"; nil encodes as {}
}

// ReviewAction is a review of something already done, such as a break-glass
// session: Subject names it, Details say what was seen.
type ReviewAction struct {
	Subject string
	Details map[string]string // nil encodes as {}
}

// ID names a request: the lowercase hex SHA-256 of "dualkey/request/v1\n"
// followed by the request's canonical bytes.
type ID string

func (id ID) String() string { return string(id) }

// ParseID checks that s is 64 lowercase hex digits.
func ParseID(s string) (ID, error) {
	if len(s) != 2*sha256.Size {
		return "", fmt.Errorf("%w: request id %.80q: want %d hex digits", ErrMalformed, s, 2*sha256.Size)
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return "", fmt.Errorf("%w: request id %q: want lowercase hex", ErrMalformed, s)
		}
	}
	return ID(s), nil
}

func idOf(canonical []byte) ID {
	h := sha256.New()
	h.Write([]byte("dualkey/request/v1\n"))
	h.Write(canonical)
	return ID(hex.EncodeToString(h.Sum(nil)))
}

// ID returns the request's ID, the hash of Encode().
func (r *Request) ID() ID { return idOf(r.Encode()) }

// Wire forms; field order here is the canonical order.
type requestWire struct {
	Version      int         `json:"version"`
	Requester    string      `json:"requester"`
	Action       string      `json:"action"`
	Reason       string      `json:"reason"`
	Created      string      `json:"created"`
	Expires      string      `json:"expires"`
	PolicySerial uint64      `json:"policy_serial"`
	SQL          *sqlWire    `json:"sql,omitempty"`
	Vault        *vaultWire  `json:"vault,omitempty"`
	Policy       *policyWire `json:"policy,omitempty"`
	Review       *reviewWire `json:"review,omitempty"`
}

type sqlWire struct {
	Database string `json:"database"`
	Role     string `json:"role"`
	Text     string `json:"text"`
	Class    string `json:"class"`
}

type vaultWire struct {
	Op     string            `json:"op"`
	Repo   string            `json:"repo"`
	Params map[string]string `json:"params"`
}

type reviewWire struct {
	Subject string            `json:"subject"`
	Details map[string]string `json:"details"`
}

func formatTime(t time.Time) string { return t.UTC().Format(TimeFormat) }

// parseTime accepts only what formatTime writes.
func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(TimeFormat, s)
	if err != nil || formatTime(t) != s {
		return time.Time{}, fmt.Errorf("%w: time %.80q: want %s", ErrMalformed, s, TimeFormat)
	}
	return t, nil
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// Encode returns the request's canonical bytes: compact JSON with the field
// order of the wire form, times in TimeFormat, map keys sorted, no HTML
// escaping, no trailing newline. It does not validate; ParseRequest does.
func (r *Request) Encode() []byte {
	w := requestWire{
		Version:      RequestVersion,
		Requester:    r.Requester,
		Action:       r.Action,
		Reason:       r.Reason,
		Created:      formatTime(r.Created),
		Expires:      formatTime(r.Expires),
		PolicySerial: r.PolicySerial,
	}
	if s := r.SQL; s != nil {
		w.SQL = &sqlWire{s.Database, s.Role, s.Text, s.Class}
	}
	if v := r.Vault; v != nil {
		w.Vault = &vaultWire{v.Op, v.Repo, nonNil(v.Params)}
	}
	if r.Policy != nil {
		w.Policy = r.Policy.wire()
	}
	if v := r.Review; v != nil {
		w.Review = &reviewWire{v.Subject, nonNil(v.Details)}
	}
	return marshal(w)
}

// ParseRequest parses canonical request bytes and validates the request.
// It refuses unknown or missing fields, trailing data, and any bytes that
// are not exactly what Encode writes for the result, so that one request has
// exactly one encoding and one ID.
func ParseRequest(data []byte) (*Request, error) {
	if len(data) > MaxRequestSize {
		return nil, fmt.Errorf("%w: request of %d bytes exceeds %d", ErrMalformed, len(data), MaxRequestSize)
	}
	var w requestWire
	if err := unmarshalStrict(data, &w); err != nil {
		return nil, fmt.Errorf("%w: request: %v", ErrMalformed, err)
	}
	if w.Version != RequestVersion {
		return nil, fmt.Errorf("%w: request version %d, want %d", ErrMalformed, w.Version, RequestVersion)
	}
	r := &Request{Requester: w.Requester, Action: w.Action, Reason: w.Reason, PolicySerial: w.PolicySerial}
	var err error
	if r.Created, err = parseTime(w.Created); err != nil {
		return nil, fmt.Errorf("request created: %w", err)
	}
	if r.Expires, err = parseTime(w.Expires); err != nil {
		return nil, fmt.Errorf("request expires: %w", err)
	}
	if s := w.SQL; s != nil {
		r.SQL = &SQLAction{s.Database, s.Role, s.Text, s.Class}
	}
	if v := w.Vault; v != nil {
		r.Vault = &VaultAction{v.Op, v.Repo, v.Params}
	}
	if w.Policy != nil {
		if r.Policy, err = w.Policy.policy(); err != nil {
			return nil, fmt.Errorf("request: proposed %w", err)
		}
	}
	if v := w.Review; v != nil {
		r.Review = &ReviewAction{v.Subject, v.Details}
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	if !bytes.Equal(r.Encode(), data) {
		return nil, fmt.Errorf("%w: request is not in canonical form", ErrMalformed)
	}
	return r, nil
}

// Validate checks every field of r; errors wrap ErrMalformed. It does not
// look at the clock or a policy: Verify does.
func (r *Request) Validate() error {
	if err := ValidName(r.Requester); err != nil {
		return fmt.Errorf("request: requester: %w", err)
	}
	if err := validAction(r.Action); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	if err := text("reason", r.Reason, MaxReasonLen); err != nil {
		return err
	}
	for _, t := range []time.Time{r.Created, r.Expires} {
		if y := t.UTC().Year(); y < 2000 || y > 9999 {
			return fmt.Errorf("%w: request: time %s outside years 2000 to 9999", ErrMalformed, t)
		}
	}
	if !r.Expires.Truncate(time.Second).After(r.Created.Truncate(time.Second)) {
		return fmt.Errorf("%w: request expires %s, not after it was created %s", ErrMalformed, formatTime(r.Expires), formatTime(r.Created))
	}
	if r.PolicySerial == 0 {
		return fmt.Errorf("%w: request: policy serial 0", ErrMalformed)
	}
	n := 0
	for _, set := range []bool{r.SQL != nil, r.Vault != nil, r.Policy != nil, r.Review != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("%w: request carries %d payloads, want exactly one", ErrMalformed, n)
	}
	ns, name, _ := strings.Cut(r.Action, ":")
	switch {
	case ns == "sql" && r.SQL != nil:
		s := r.SQL
		for _, f := range [][2]string{{"database", s.Database}, {"role", s.Role}, {"text", s.Text}} {
			if err := text("sql "+f[0], f[1], MaxRequestSize); err != nil {
				return err
			}
		}
		if s.Class != name {
			return fmt.Errorf("%w: request action %q but statement class %.80q", ErrMalformed, r.Action, s.Class)
		}
	case ns == "vault" && r.Vault != nil:
		v := r.Vault
		if v.Op != name {
			return fmt.Errorf("%w: request action %q but vault op %.80q", ErrMalformed, r.Action, v.Op)
		}
		if err := text("vault repo", v.Repo, 256); err != nil {
			return err
		}
		if err := params("vault params", v.Params); err != nil {
			return err
		}
	case r.Action == ActionPolicyChange && r.Policy != nil:
		if err := r.Policy.Validate(); err != nil {
			return fmt.Errorf("%w: proposed %w", ErrMalformed, err)
		}
		if r.Policy.Serial != r.PolicySerial+1 {
			return fmt.Errorf("%w: proposed policy has serial %d, want %d (the next after %d)", ErrMalformed, r.Policy.Serial, r.PolicySerial+1, r.PolicySerial)
		}
	case ns == "breakglass" && r.Review != nil:
		if err := text("review subject", r.Review.Subject, 1024); err != nil {
			return err
		}
		if err := params("review details", r.Review.Details); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: request action %q does not match its payload", ErrMalformed, r.Action)
	}
	if n := len(r.Encode()); n > MaxRequestSize {
		return fmt.Errorf("%w: request encodes to %d bytes, more than %d", ErrMalformed, n, MaxRequestSize)
	}
	return nil
}

// text checks a required free-text field: not empty, valid UTF-8 (JSON
// would silently replace invalid bytes, so the ID would not cover them).
func text(field, s string, max int) error {
	if s == "" || len(s) > max {
		return fmt.Errorf("%w: request %s: want 1 to %d bytes, have %d", ErrMalformed, field, max, len(s))
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: request %s: not valid UTF-8", ErrMalformed, field)
	}
	return nil
}

func params(field string, m map[string]string) error {
	if len(m) > MaxParams {
		return fmt.Errorf("%w: request %s: %d entries, at most %d", ErrMalformed, field, len(m), MaxParams)
	}
	for k, v := range m {
		if err := text(field+" key", k, 256); err != nil {
			return err
		}
		if !utf8.ValidString(v) {
			return fmt.Errorf("%w: request %s %q: not valid UTF-8", ErrMalformed, field, k)
		}
	}
	return nil
}
