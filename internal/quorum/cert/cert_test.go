package cert

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// key returns a deterministic key pair for name.
func key(name string) ed25519.PrivateKey {
	seed := sha256.Sum256([]byte("test key " + name))
	return ed25519.NewKeyFromSeed(seed[:])
}

func pub(name string) ed25519.PublicKey { return key(name).Public().(ed25519.PublicKey) }

// testPolicy: alice, bob, carol, dave; destructive SQL needs 2, other SQL 1,
// vault 2, policy changes 3; nothing else has a rule.
func testPolicy() *Policy {
	p := &Policy{Version: PolicyVersion, Serial: 1}
	for _, n := range []string{"alice", "bob", "carol", "dave"} {
		p.Approvers = append(p.Approvers, Approver{n, pub(n)})
	}
	p.Rules = []Rule{
		{"destructive-sql", []string{"sql:destructive"}, 2},
		{"other-sql", []string{"sql:*"}, 1},
		{"vault", []string{"vault:*"}, 2},
		{"policy", []string{ActionPolicyChange}, 3},
	}
	return p
}

func sqlRequest(text string) *Request {
	return &Request{
		Requester: "alice", Action: "sql:destructive", Reason: "drop the old audit partition",
		Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1,
		SQL: &SQLAction{Database: "shop", Role: "app_owner", Text: text, Class: "destructive"},
	}
}

func approve(r *Request, names ...string) []Approval {
	var as []Approval
	for _, n := range names {
		as = append(as, Sign(key(n), n, r.ID(), Approve, t0.Add(30*time.Minute)))
	}
	return as
}

func TestVerify(t *testing.T) {
	req := sqlRequest("DROP TABLE audit_2019")
	other := sqlRequest("DROP TABLE orders")
	now := t0.Add(10 * time.Minute)
	newPolicy := testPolicy()
	newPolicy.Serial = 2
	newPolicy.Approvers = newPolicy.Approvers[1:] // remove alice
	policyReq := &Request{Requester: "alice", Action: ActionPolicyChange, Reason: "alice leaves",
		Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1, Policy: newPolicy}
	vaultReq := &Request{Requester: "eve", Action: "vault:lock.shorten", Reason: "free space",
		Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1,
		Vault: &VaultAction{Op: "lock.shorten", Repo: "r1", Params: map[string]string{"snapshot": "abc", "until": "2030-02-01T00:00:00Z"}}}
	selectReq := sqlRequest("UPDATE t SET x = 1")
	selectReq.Action, selectReq.SQL.Class = "sql:blast-radius", "blast-radius"
	reviewReq := &Request{Requester: "alice", Action: ActionBreakglassReview, Reason: "review",
		Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1, Review: &ReviewAction{Subject: "session 7"}}

	cert := func(r *Request, as ...Approval) *Certificate { return &Certificate{Request: r.Encode(), Approvals: as} }
	tests := []struct {
		name string
		c    *Certificate
		p    *Policy
		now  time.Time
		want error
	}{
		{"threshold reached exactly", cert(req, approve(req, "bob", "carol")...), nil, now, nil},
		{"more than threshold", cert(req, approve(req, "bob", "carol", "dave")...), nil, now, nil},
		{"one short", cert(req, approve(req, "bob")...), nil, now, ErrNotEnough},
		{"no approvals", cert(req), nil, now, ErrNotEnough},
		{"self-approval", cert(req, approve(req, "alice", "bob")...), nil, now, ErrSelfApproval},
		{"duplicate approval counts once", cert(req, approve(req, "bob", "bob")...), nil, now, ErrNotEnough},
		{"duplicate with another expiry counts once", cert(req, append(approve(req, "bob"),
			Sign(key("bob"), "bob", req.ID(), Approve, t0.Add(40*time.Minute)))...), nil, now, ErrNotEnough},
		{"expired request", cert(req, approve(req, "bob", "carol")...), nil, t0.Add(time.Hour), ErrExpired},
		{"request from the future", cert(req, approve(req, "bob", "carol")...), nil, t0.Add(-MaxClockSkew - time.Second), ErrNotYetValid},
		{"within clock skew", cert(req, approve(req, "bob", "carol")...), nil, t0.Add(-MaxClockSkew), nil},
		{"expired approval", cert(req, approve(req, "bob", "carol")...), nil, t0.Add(30 * time.Minute), ErrExpired},
		{"approval for another request", cert(req, append(approve(req, "bob"), approve(other, "carol")...)...), nil, now, ErrWrongRequest},
		{"approval relabelled to this request", cert(req, append(approve(req, "bob"), relabel(approve(other, "carol")[0], req.ID()))...), nil, now, ErrBadSignature},
		{"unregistered approver", cert(req, append(approve(req, "bob"), Sign(key("mallory"), "mallory", req.ID(), Approve, now.Add(time.Minute)))...), nil, now, ErrUnknownApprover},
		{"unregistered key under a registered name", cert(req, append(approve(req, "bob"), Sign(key("mallory"), "carol", req.ID(), Approve, now.Add(time.Minute)))...), nil, now, ErrBadSignature},
		{"one forged signature", cert(req, append(approve(req, "bob"), forge(approve(req, "carol")[0]))...), nil, now, ErrBadSignature},
		{"signature claimed by another name", cert(req, append(approve(req, "bob"), rename(approve(req, "carol")[0], "dave"))...), nil, now, ErrBadSignature},
		{"expiry extended", cert(req, append(approve(req, "bob"), extend(approve(req, "carol")[0]))...), nil, now, ErrBadSignature},
		{"deny turned into approve", cert(req, append(approve(req, "bob"), flip(Sign(key("carol"), "carol", req.ID(), Deny, now.Add(time.Minute)), Approve))...), nil, now, ErrBadSignature},
		{"deny vetoes", cert(req, append(approve(req, "bob", "carol"), Sign(key("dave"), "dave", req.ID(), Deny, now.Add(time.Minute)))...), nil, now, ErrDenied},
		{"requester's own deny vetoes", cert(req, append(approve(req, "bob", "carol"), Sign(key("alice"), "alice", req.ID(), Deny, now.Add(time.Minute)))...), nil, now, ErrDenied},
		{"request altered after approval", &Certificate{Request: other.Encode(), Approvals: approve(req, "bob", "carol")}, nil, now, ErrWrongRequest},
		{"request bytes tampered", &Certificate{Request: bytes.Replace(req.Encode(), []byte("audit_2019"), []byte("audit_2020"), 1), Approvals: approve(req, "bob", "carol")}, nil, now, ErrWrongRequest},
		{"request bytes not canonical", &Certificate{Request: append(req.Encode(), ' '), Approvals: approve(req, "bob", "carol")}, nil, now, ErrMalformed},
		{"request bytes reordered", &Certificate{Request: bytes.Replace(req.Encode(), []byte(`"version":1,`), nil, 1), Approvals: approve(req, "bob", "carol")}, nil, now, ErrMalformed},
		{"most specific rule: namespace", cert(selectReq, approve(selectReq, "bob")...), nil, now, nil},
		{"vault rule", cert(vaultReq, approve(vaultReq, "alice", "bob")...), nil, now, nil},
		{"vault rule one short", cert(vaultReq, approve(vaultReq, "alice")...), nil, now, ErrNotEnough},
		{"no rule", cert(reviewReq, approve(reviewReq, "bob", "carol", "dave")...), nil, now, ErrNoRule},
		{"policy change", cert(policyReq, approve(policyReq, "bob", "carol", "dave")...), nil, now, nil},
		{"policy change one short", cert(policyReq, approve(policyReq, "bob", "carol")...), nil, now, ErrNotEnough},
		{"policy change replayed under the new policy", cert(policyReq, approve(policyReq, "bob", "carol", "dave")...), newPolicy, now, ErrStalePolicy},
		{"invalid policy", cert(req, approve(req, "bob", "carol")...), &Policy{Version: PolicyVersion, Serial: 1}, now, ErrPolicy},
		{"nil certificate", nil, nil, now, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.p
			if p == nil {
				p = testPolicy()
			}
			got, err := Verify(tt.c, p, tt.now)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("Verify = %v, want %v", err, tt.want)
			}
			if err == nil && !bytes.Equal(got.Encode(), tt.c.Request) {
				t.Errorf("Verify returned a request encoding to %s, want %s", got.Encode(), tt.c.Request)
			}
		})
	}
}

func TestVerifyNotEnoughNamesCounts(t *testing.T) {
	req := sqlRequest("DROP TABLE t")
	_, err := Verify(&Certificate{Request: req.Encode(), Approvals: approve(req, "bob")}, testPolicy(), t0)
	if err == nil || !strings.Contains(err.Error(), "have 1, need 2") {
		t.Errorf("err = %v, want it to name have 1, need 2", err)
	}
}

func relabel(a Approval, id ID) Approval        { a.Request = id; return a }
func rename(a Approval, name string) Approval   { a.Approver = name; return a }
func flip(a Approval, decision string) Approval { a.Decision = decision; return a }
func extend(a Approval) Approval                { a.Expires = a.Expires.Add(time.Hour); return a }
func forge(a Approval) Approval {
	a.Signature = bytes.Clone(a.Signature)
	a.Signature[0] ^= 1
	return a
}

func TestPolicyValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(p *Policy)
	}{
		{"two names same key", func(p *Policy) { p.Approvers[1].PublicKey = p.Approvers[0].PublicKey }},
		{"duplicate name", func(p *Policy) { p.Approvers[1].Name = "alice" }},
		{"threshold zero", func(p *Policy) { p.Rules[0].Threshold = 0 }},
		{"threshold above approvers", func(p *Policy) { p.Rules[0].Threshold = 5 }},
		{"no approvers", func(p *Policy) { p.Approvers = nil }},
		{"no rules", func(p *Policy) { p.Rules = nil }},
		{"no policy:change rule", func(p *Policy) { p.Rules = p.Rules[:3] }},
		{"same pattern in two rules", func(p *Policy) { p.Rules[1].Actions = []string{"sql:destructive"} }},
		{"bad pattern", func(p *Policy) { p.Rules[1].Actions = []string{"sql:drop*"} }},
		{"uppercase name", func(p *Policy) { p.Approvers[0].Name = "Alice" }},
		{"short key", func(p *Policy) { p.Approvers[0].PublicKey = p.Approvers[0].PublicKey[:31] }},
		{"serial zero", func(p *Policy) { p.Serial = 0 }},
		{"wrong version", func(p *Policy) { p.Version = 2 }},
		{"duplicate rule name", func(p *Policy) { p.Rules[1].Name = p.Rules[0].Name }},
	}
	if err := testPolicy().Validate(); err != nil {
		t.Fatalf("test policy: %v", err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := testPolicy()
			tt.mutate(p)
			if err := p.Validate(); !errors.Is(err, ErrPolicy) {
				t.Errorf("Validate = %v, want ErrPolicy", err)
			}
			if _, err := ParsePolicy(p.Encode()); err == nil {
				t.Errorf("ParsePolicy accepted %s", p.Encode())
			}
		})
	}
}

func TestRuleFor(t *testing.T) {
	p := testPolicy()
	p.Rules = append(p.Rules, Rule{"default", []string{"*"}, 4})
	for action, want := range map[string]string{
		"sql:destructive":    "destructive-sql",
		"sql:ddl":            "other-sql",
		"vault:key.remove":   "vault",
		"policy:change":      "policy",
		"breakglass:review":  "default",
		"sqlx:destructive":   "default",
		"policy:changeother": "default",
	} {
		r, err := p.RuleFor(action)
		if err != nil || r.Name != want {
			t.Errorf("RuleFor(%q) = %v, %v; want rule %s", action, r, err, want)
		}
	}
	if _, err := testPolicy().RuleFor("breakglass:review"); !errors.Is(err, ErrNoRule) {
		t.Errorf("RuleFor without a default rule = %v, want ErrNoRule", err)
	}
}

func TestPolicyEncoding(t *testing.T) {
	p := testPolicy()
	b := p.Encode()
	q, err := ParsePolicy(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(q.Encode(), b) || q.Hash() != p.Hash() {
		t.Fatalf("round trip changed the policy")
	}
	// Order of approvers and rules does not change the encoding.
	p.Approvers[0], p.Approvers[3] = p.Approvers[3], p.Approvers[0]
	p.Rules[0], p.Rules[2] = p.Rules[2], p.Rules[0]
	if !bytes.Equal(p.Encode(), b) {
		t.Errorf("reordered policy encodes differently")
	}
	p.Rules[0].Threshold = 1
	if p.Hash() == q.Hash() {
		t.Errorf("changed policy has the same hash")
	}
	for _, bad := range [][]byte{
		append(b, '\n'),
		bytes.Replace(b, []byte(`"serial":1`), []byte(`"serial":1,"serial":1`), 1),
		bytes.Replace(b, []byte(`"name":"alice"`), []byte(`"Name":"alice"`), 1),
		bytes.Replace(b, []byte(`"threshold":3`), []byte(`"threshold":3,"extra":0`), 1),
		[]byte(`{"version":1,"serial":1,"approvers":[],"rules":[]}`),
	} {
		if _, err := ParsePolicy(bad); err == nil {
			t.Errorf("ParsePolicy accepted %s", bad)
		}
	}
}

func TestPublicKey(t *testing.T) {
	k := pub("alice")
	s := FormatPublicKey(k)
	got, err := ParsePublicKey(s)
	if err != nil || !bytes.Equal(got, k) {
		t.Fatalf("round trip %s: %v", s, err)
	}
	// Non-zero trailing bits: the same key under a second spelling.
	last := strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", s[len(s)-2])
	alias := s[:len(s)-2] + string("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[last^1]) + "="
	for _, bad := range []string{"", s[len("ed25519:"):], "ED25519:" + s[8:], s + "=", s[:len(s)-1], s + " ", " " + s, alias, "ed25519:" + strings.Repeat("A", 44)} {
		if _, err := ParsePublicKey(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParsePublicKey(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}
