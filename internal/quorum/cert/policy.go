package cert

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// PolicyVersion is the policy format version this code reads and writes.
const PolicyVersion = 1

// Limits on a policy, so that a hostile document cannot make a verifier
// allocate or loop without bound. Real quorums are a handful of people.
const (
	MaxApprovers   = 256
	MaxRules       = 256
	MaxRuleActions = 64
	maxNameLen     = 64
)

// Approver is a person allowed to approve, and the key their approvals are
// signed with. Name is what requests and approvals call them by.
type Approver struct {
	Name      string
	PublicKey ed25519.PublicKey
}

// Rule says how many distinct approvers, the requester excluded, must approve
// an action matching one of Actions.
//
// A pattern is an exact action ("sql:destructive", "vault:lock.shorten"),
// a namespace ("sql:*", "vault:*"), or "*". For an action, the rule with an
// exact pattern wins over one with its namespace, which wins over "*".
// An action no rule matches is refused (ErrNoRule), never allowed.
type Rule struct {
	Name      string
	Actions   []string
	Threshold int
}

// Policy is the approver set and the rules. Serial counts policy changes:
// the bootstrap policy has serial 1 and each accepted "policy:change" request
// installs a policy with the next serial. Requests name the serial they were
// opened under, so a change of policy voids every pending request.
type Policy struct {
	Version   int // PolicyVersion
	Serial    uint64
	Approvers []Approver
	Rules     []Rule
	// BreakGlass lists who may start a break-glass session (acting without
	// a quorum for a short, logged, always-reviewed time) and in which
	// roles. Nil means nobody may. It is part of the policy, so widening it
	// needs a policy:change under the current rules like everything else.
	// Encoded only when non-empty: policies without it keep their bytes.
	BreakGlass []Grant
}

// Grant lets Person start break-glass sessions in any of Roles.
type Grant struct {
	Person string
	Roles  []string
}

// MaxGrants bounds the break-glass allow-list.
const MaxGrants = 256

// AllowsBreakGlass reports whether person may break glass in role.
func (p *Policy) AllowsBreakGlass(person, role string) bool {
	for _, g := range p.BreakGlass {
		if g.Person == person && slices.Contains(g.Roles, role) {
			return true
		}
	}
	return false
}

const publicKeyPrefix = "ed25519:"

var b64 = base64.StdEncoding.Strict()

// FormatPublicKey returns the text form of an Ed25519 public key:
// "ed25519:" followed by its standard, padded base64.
func FormatPublicKey(pub ed25519.PublicKey) string {
	return publicKeyPrefix + b64.EncodeToString(pub)
}

// ParsePublicKey parses the text form written by FormatPublicKey; it accepts
// nothing else (no other padding, no trailing bits, no whitespace).
func ParsePublicKey(s string) (ed25519.PublicKey, error) {
	rest, ok := strings.CutPrefix(s, publicKeyPrefix)
	if !ok {
		return nil, fmt.Errorf("%w: public key %.80q: want %s<base64>", ErrMalformed, s, publicKeyPrefix)
	}
	b, err := b64.DecodeString(rest)
	if err != nil || len(b) != ed25519.PublicKeySize || FormatPublicKey(b) != s {
		return nil, fmt.Errorf("%w: public key %.80q: want %d bytes of padded base64", ErrMalformed, s, ed25519.PublicKeySize)
	}
	return ed25519.PublicKey(b), nil
}

// ValidName reports whether s may name a person or a rule: 1 to 64
// characters from a-z, 0-9 and "._@-", starting with a letter or digit.
// Lowercase only, so that "Alice" and "alice" can never be two people (or a
// requester and an approver who are the same person).
func ValidName(s string) error {
	if s == "" || len(s) > maxNameLen {
		return fmt.Errorf("%w: name %.80q: want 1 to %d characters", ErrMalformed, s, maxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '@' || c == '-'):
		default:
			return fmt.Errorf("%w: name %q: only a-z, 0-9 and ._@- (not first) allowed", ErrMalformed, s)
		}
	}
	return nil
}

// validAction checks an action such as "sql:destructive": a namespace of
// a-z, 0-9, "_" and "-", a colon, and a name of a-z, 0-9 and "._-".
func validAction(s string) error {
	ns, name, ok := strings.Cut(s, ":")
	if !ok || !token(ns, "_-") || !token(name, "._-") || len(s) > 128 {
		return fmt.Errorf("%w: action %.80q: want namespace:name in lowercase", ErrMalformed, s)
	}
	return nil
}

func token(s, punct string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || i > 0 && strings.IndexByte(punct, c) >= 0) {
			return false
		}
	}
	return true
}

// validPattern checks a rule pattern: "*", "namespace:*" or an action.
func validPattern(s string) error {
	if s == "*" {
		return nil
	}
	if ns, ok := strings.CutSuffix(s, ":*"); ok && token(ns, "_-") {
		return nil
	}
	if validAction(s) != nil {
		return fmt.Errorf("%w: rule pattern %.80q: want an action, namespace:* or *", ErrMalformed, s)
	}
	return nil
}

// Validate checks the invariants every policy must keep: one person, one
// vote (unique names and unique keys), and every threshold between 1 and
// the number of approvers. A threshold of 0 is refused: a quorum that one
// person can pass alone is theatre. A policy must also have a rule for
// "policy:change", or the approver set could never be changed again.
func (p *Policy) Validate() error {
	if p.Version != PolicyVersion {
		return fmt.Errorf("%w: version %d, want %d", ErrPolicy, p.Version, PolicyVersion)
	}
	if p.Serial == 0 {
		return fmt.Errorf("%w: serial 0: the first policy has serial 1", ErrPolicy)
	}
	if len(p.Approvers) == 0 || len(p.Approvers) > MaxApprovers {
		return fmt.Errorf("%w: %d approvers, want 1 to %d", ErrPolicy, len(p.Approvers), MaxApprovers)
	}
	names := map[string]bool{}
	keys := map[string]string{}
	for _, a := range p.Approvers {
		if err := ValidName(a.Name); err != nil {
			return fmt.Errorf("%w: approver: %w", ErrPolicy, err)
		}
		if names[a.Name] {
			return fmt.Errorf("%w: approver %q listed twice", ErrPolicy, a.Name)
		}
		names[a.Name] = true
		if len(a.PublicKey) != ed25519.PublicKeySize {
			return fmt.Errorf("%w: approver %q: public key of %d bytes, want %d", ErrPolicy, a.Name, len(a.PublicKey), ed25519.PublicKeySize)
		}
		if other, dup := keys[string(a.PublicKey)]; dup {
			return fmt.Errorf("%w: approvers %q and %q share one key: one person, one vote", ErrPolicy, other, a.Name)
		}
		keys[string(a.PublicKey)] = a.Name
	}
	if len(p.Rules) == 0 || len(p.Rules) > MaxRules {
		return fmt.Errorf("%w: %d rules, want 1 to %d", ErrPolicy, len(p.Rules), MaxRules)
	}
	rules := map[string]bool{}
	patterns := map[string]string{}
	for _, r := range p.Rules {
		if err := ValidName(r.Name); err != nil {
			return fmt.Errorf("%w: rule: %w", ErrPolicy, err)
		}
		if rules[r.Name] {
			return fmt.Errorf("%w: rule %q listed twice", ErrPolicy, r.Name)
		}
		rules[r.Name] = true
		if r.Threshold < 1 || r.Threshold > len(p.Approvers) {
			return fmt.Errorf("%w: rule %q: threshold %d, want 1 to %d (the number of approvers)", ErrPolicy, r.Name, r.Threshold, len(p.Approvers))
		}
		if len(r.Actions) == 0 || len(r.Actions) > MaxRuleActions {
			return fmt.Errorf("%w: rule %q: %d actions, want 1 to %d", ErrPolicy, r.Name, len(r.Actions), MaxRuleActions)
		}
		for _, a := range r.Actions {
			if err := validPattern(a); err != nil {
				return fmt.Errorf("%w: rule %q: %w", ErrPolicy, r.Name, err)
			}
			if other, dup := patterns[a]; dup {
				return fmt.Errorf("%w: pattern %q in rules %q and %q: which applies would be ambiguous", ErrPolicy, a, other, r.Name)
			}
			patterns[a] = r.Name
		}
	}
	if _, err := p.RuleFor(ActionPolicyChange); err != nil {
		return fmt.Errorf("%w: no rule matches %q, so the policy could never change", ErrPolicy, ActionPolicyChange)
	}
	if len(p.BreakGlass) > MaxGrants {
		return fmt.Errorf("%w: %d break-glass grants, at most %d", ErrPolicy, len(p.BreakGlass), MaxGrants)
	}
	people := map[string]bool{}
	for _, g := range p.BreakGlass {
		if err := ValidName(g.Person); err != nil {
			return fmt.Errorf("%w: break-glass grant: %w", ErrPolicy, err)
		}
		if people[g.Person] {
			return fmt.Errorf("%w: break-glass grant for %q listed twice", ErrPolicy, g.Person)
		}
		people[g.Person] = true
		if len(g.Roles) == 0 || len(g.Roles) > MaxRuleActions {
			return fmt.Errorf("%w: break-glass grant for %q: %d roles, want 1 to %d", ErrPolicy, g.Person, len(g.Roles), MaxRuleActions)
		}
		roles := map[string]bool{}
		for _, r := range g.Roles {
			if err := ValidName(r); err != nil {
				return fmt.Errorf("%w: break-glass grant for %q: role: %w", ErrPolicy, g.Person, err)
			}
			if roles[r] {
				return fmt.Errorf("%w: break-glass grant for %q: role %q listed twice", ErrPolicy, g.Person, r)
			}
			roles[r] = true
		}
	}
	return nil
}

// RuleFor returns the rule that applies to action: the one listing action
// itself, else the one listing its namespace ("sql:*"), else the one listing
// "*". With none, it returns ErrNoRule. The policy should be valid.
func (p *Policy) RuleFor(action string) (*Rule, error) {
	ns, _, _ := strings.Cut(action, ":")
	for _, want := range []string{action, ns + ":*", "*"} {
		for i := range p.Rules {
			if slices.Contains(p.Rules[i].Actions, want) {
				return &p.Rules[i], nil
			}
		}
	}
	return nil, fmt.Errorf("%w %q", ErrNoRule, action)
}

// Approver returns the approver registered under name.
func (p *Policy) Approver(name string) (Approver, bool) {
	for _, a := range p.Approvers {
		if a.Name == name {
			return a, true
		}
	}
	return Approver{}, false
}

// Wire forms. Field order here is the canonical field order.
type approverWire struct {
	Name string `json:"name"`
	Key  string `json:"key"`
}

type ruleWire struct {
	Name      string   `json:"name"`
	Actions   []string `json:"actions"`
	Threshold int      `json:"threshold"`
}

type grantWire struct {
	Person string   `json:"person"`
	Roles  []string `json:"roles"`
}

type policyWire struct {
	Version    int            `json:"version"`
	Serial     uint64         `json:"serial"`
	Approvers  []approverWire `json:"approvers"`
	Rules      []ruleWire     `json:"rules"`
	BreakGlass []grantWire    `json:"breakglass,omitempty"` // absent when empty
}

// wire returns p's canonical wire form: approvers and rules sorted by name,
// each rule's actions sorted, empty lists as [].
func (p *Policy) wire() *policyWire {
	w := &policyWire{Version: p.Version, Serial: p.Serial, Approvers: []approverWire{}, Rules: []ruleWire{}}
	for _, a := range p.Approvers {
		w.Approvers = append(w.Approvers, approverWire{a.Name, FormatPublicKey(a.PublicKey)})
	}
	for _, r := range p.Rules {
		acts := append([]string{}, r.Actions...)
		slices.Sort(acts)
		w.Rules = append(w.Rules, ruleWire{r.Name, acts, r.Threshold})
	}
	for _, g := range p.BreakGlass {
		roles := append([]string{}, g.Roles...)
		slices.Sort(roles)
		w.BreakGlass = append(w.BreakGlass, grantWire{g.Person, roles})
	}
	slices.SortStableFunc(w.Approvers, func(a, b approverWire) int { return strings.Compare(a.Name, b.Name) })
	slices.SortStableFunc(w.Rules, func(a, b ruleWire) int { return strings.Compare(a.Name, b.Name) })
	slices.SortStableFunc(w.BreakGlass, func(a, b grantWire) int { return strings.Compare(a.Person, b.Person) })
	return w
}

func (w *policyWire) policy() (*Policy, error) {
	p := &Policy{Version: w.Version, Serial: w.Serial}
	for _, a := range w.Approvers {
		k, err := ParsePublicKey(a.Key)
		if err != nil {
			return nil, fmt.Errorf("approver %.80q: %w", a.Name, err)
		}
		p.Approvers = append(p.Approvers, Approver{a.Name, k})
	}
	for _, r := range w.Rules {
		p.Rules = append(p.Rules, Rule(r))
	}
	for _, g := range w.BreakGlass {
		p.BreakGlass = append(p.BreakGlass, Grant(g))
	}
	return p, nil
}

// Encode returns p's canonical encoding: compact JSON with a fixed field
// order, approvers and rules sorted by name, actions sorted, no HTML
// escaping. Policies that differ only in list order encode the same.
func (p *Policy) Encode() []byte { return marshal(p.wire()) }

// Hash returns the lowercase hex SHA-256 of p's canonical encoding, domain
// separated, for naming a policy in logs and the ledger.
func (p *Policy) Hash() string {
	h := sha256.New()
	h.Write([]byte("dualkey/policy/v1\n"))
	h.Write(p.Encode())
	return hex.EncodeToString(h.Sum(nil))
}

// MaxPolicySize bounds an encoded policy.
const MaxPolicySize = 256 << 10

// ParsePolicy parses a canonical policy encoding and validates it. Bytes that
// are not exactly what Encode writes for the result are refused.
func ParsePolicy(data []byte) (*Policy, error) {
	if len(data) > MaxPolicySize {
		return nil, fmt.Errorf("%w: policy of %d bytes exceeds %d", ErrMalformed, len(data), MaxPolicySize)
	}
	var w policyWire
	if err := unmarshalStrict(data, &w); err != nil {
		return nil, fmt.Errorf("%w: policy: %v", ErrMalformed, err)
	}
	p, err := w.policy()
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if !bytes.Equal(p.Encode(), data) {
		return nil, fmt.Errorf("%w: policy is not in canonical form", ErrMalformed)
	}
	return p, nil
}

// marshal is the canonical JSON encoder: encoding/json's struct field order
// and sorted map keys, without HTML escaping and without a trailing newline.
func marshal(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic("cert: encode: " + err.Error()) // wire types always encode
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// unmarshalStrict decodes exactly one JSON value with no unknown fields and
// nothing after it.
func unmarshalStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.InputOffset() != int64(len(data)) {
		return fmt.Errorf("trailing data after offset %d", dec.InputOffset())
	}
	return nil
}
