package cert

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

func requestSeeds() [][]byte {
	p := testPolicy()
	p.Serial = 2
	return [][]byte{
		sqlRequest("DROP TABLE t; -- <&>").Encode(),
		(&Request{Requester: "bob", Action: "vault:lock.shorten", Reason: "r", Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1,
			Vault: &VaultAction{Op: "lock.shorten", Repo: "r", Params: map[string]string{"a": "1", "b": "\u2028"}}}).Encode(),
		(&Request{Requester: "bob", Action: ActionPolicyChange, Reason: "r", Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1, Policy: p}).Encode(),
		(&Request{Requester: "bob", Action: ActionBreakglassReview, Reason: "r", Created: t0, Expires: t0.Add(time.Hour), PolicySerial: 1, Review: &ReviewAction{Subject: "s"}}).Encode(),
		[]byte(`{}`),
		[]byte(`{"version":1,"sql":null}`),
	}
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range requestSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseRequest(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrPolicy) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		if err := r.Validate(); err != nil {
			t.Fatalf("accepted invalid request: %v", err)
		}
		// Canonical: parse → encode gives back the input, so one ID.
		if !bytes.Equal(r.Encode(), data) {
			t.Fatalf("round trip changed %q → %q", data, r.Encode())
		}
		if r.ID() != idOf(data) {
			t.Fatal("ID differs from the hash of the bytes")
		}
	})
}

func FuzzParsePolicy(f *testing.F) {
	f.Add(testPolicy().Encode())
	p := testPolicy()
	p.Rules = append(p.Rules, Rule{"default", []string{"*", "breakglass:review"}, 4})
	f.Add(p.Encode())
	p.BreakGlass = []Grant{{"bob", []string{"dba"}}, {"eve", []string{"admin", "dba"}}}
	f.Add(p.Encode())
	f.Add([]byte(`{"version":1,"serial":1,"approvers":[],"rules":[]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePolicy(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrPolicy) {
				t.Fatalf("error %v wraps no sentinel", err)
			}
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("accepted invalid policy: %v", err)
		}
		if !bytes.Equal(p.Encode(), data) {
			t.Fatalf("round trip changed %q → %q", data, p.Encode())
		}
	})
}

func FuzzParseCertificate(f *testing.F) {
	for _, s := range requestSeeds()[:4] {
		r, err := ParseRequest(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add((&Certificate{Request: s, Approvals: approve(r, "bob", "carol", "dave")}).Encode())
	}
	f.Add([]byte(`{"request":"eA==","approvals":[]}`))
	policy := testPolicy()
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseCertificate(data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		b := c.Encode()
		c2, err := ParseCertificate(b)
		if err != nil {
			t.Fatalf("re-encoded certificate refused: %v", err)
		}
		if !bytes.Equal(c2.Encode(), b) {
			t.Fatalf("round trip changed %s → %s", b, c2.Encode())
		}
		// Verify never panics, and never accepts what the seeds do not:
		// any success must carry enough approvals by policy members.
		if r, err := Verify(c, policy, t0.Add(time.Minute)); err == nil {
			rule, _ := policy.RuleFor(r.Action)
			n := map[string]bool{}
			for _, a := range c.Approvals {
				if a.Decision == Approve && a.Approver != r.Requester {
					n[a.Approver] = true
				}
			}
			if len(n) < rule.Threshold {
				t.Fatalf("Verify accepted %d approvers for threshold %d", len(n), rule.Threshold)
			}
		}
	})
}
