// Package certtest gives tests approvers with deterministic keys, the
// policies they form and the vault certificates they sign. Tests only.
package certtest

import (
	"crypto/ed25519"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// People are approvers by name.
type People map[string]ed25519.PrivateKey

// NewPeople gives each name a key seeded by its place and the name, the
// same in every run.
func NewPeople(names ...string) People {
	p := People{}
	for i, n := range names {
		seed := make([]byte, ed25519.SeedSize)
		seed[0] = byte(i + 1)
		copy(seed[1:], n)
		p[n] = ed25519.NewKeyFromSeed(seed)
	}
	return p
}

// Policy returns the policy, in canonical form, in which m of names
// approve vault actions and policy changes.
func (p People) Policy(t testing.TB, serial uint64, m int, names ...string) *cert.Policy {
	t.Helper()
	pol := &cert.Policy{Version: cert.PolicyVersion, Serial: serial, Rules: []cert.Rule{
		{Name: "policy", Actions: []string{cert.ActionPolicyChange}, Threshold: m},
		{Name: "vault", Actions: []string{"vault:*"}, Threshold: m},
	}}
	for _, n := range names {
		pol.Approvers = append(pol.Approvers, cert.Approver{Name: n, PublicKey: p[n].Public().(ed25519.PublicKey)})
	}
	pol, err := cert.ParsePolicy(pol.Encode())
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

// Vault describes a certificate for a vault action.
type Vault struct {
	Requester string
	Op        string
	Params    map[string]string
	Repo      string // the repository's ID
	Serial    uint64 // the policy's
	Created   time.Time
	Expires   time.Time // of the request and of every approval
	Signers   []string  // who approve, by name
}

// Cert returns the encoded certificate v describes.
func (p People) Cert(t testing.TB, v Vault) []byte {
	t.Helper()
	req := &cert.Request{Requester: v.Requester, Action: "vault:" + v.Op, Reason: "test",
		Created: v.Created, Expires: v.Expires, PolicySerial: v.Serial,
		Vault: &cert.VaultAction{Op: v.Op, Repo: v.Repo, Params: v.Params}}
	if err := req.Validate(); err != nil {
		t.Fatal(err)
	}
	c := &cert.Certificate{Request: req.Encode()}
	for _, s := range v.Signers {
		c.Approvals = append(c.Approvals, cert.Sign(p[s], s, req.ID(), cert.Approve, v.Expires))
	}
	return c.Encode()
}
