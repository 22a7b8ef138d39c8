package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/quorum/cert/certtest"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

var repoID = strings.Repeat("cd", 32)

type approvers = certtest.People

// sign builds a certificate for act by requester on repo under serial.
func sign(t *testing.T, a approvers, requester, repo string, serial uint64, act guard.Action, expires time.Time, signers ...string) []byte {
	t.Helper()
	return a.Cert(t, certtest.Vault{Requester: requester, Op: act.Op, Params: act.Params, Repo: repo, Serial: serial,
		Created: t0.Add(-time.Minute), Expires: expires, Signers: signers})
}

func newQuorumEnv(t *testing.T) (*env, approvers, *cert.Policy) {
	a := certtest.NewPeople("alice", "bob", "carol", "dave")
	pol := a.Policy(t, 1, 2, "alice", "bob", "carol")
	cfg, _ := json.Marshal(format.Config{Version: 1, ID: repoID, Created: t0, MinRetention: format.Duration(24 * time.Hour), QuorumPolicy: pol.Encode()})
	return newEnvConfig(t, Options{}, cfg), a, pol
}

// TestCertifiedOverHTTPS drives every guarded action through the real
// server: the server verifies the certificate itself.
func TestCertifiedOverHTTPS(t *testing.T) {
	ctx := context.Background()
	e, a, _ := newQuorumEnv(t)
	_, _, _, snap, _ := e.seed(t)
	snapID := format.Hash(snap)
	key2 := []byte("wrapped key 2")
	if err := e.admin.Save(ctx, hd(backend.Key, key2), key2); err != nil {
		t.Fatal(err)
	}
	exp := t0.Add(time.Hour)
	acts := []struct {
		act, other guard.Action
	}{
		{guard.ShortenLockAction(snapID, t0.Add(time.Hour)), guard.ShortenLockAction(format.Hash([]byte("x")), t0.Add(time.Hour))},
		{guard.LowerRetentionAction(time.Hour), guard.LowerRetentionAction(time.Minute)},
		{guard.RemoveKeyAction(format.Hash(key2).String()), guard.RemoveKeyAction(format.Hash(e.keyData).String())},
		{guard.ForgetAction(snapID), guard.ForgetAction(format.Hash([]byte("x")))},
		{guard.RotateAction(a.Policy(t, 2, 2, "alice", "bob", "dave")), guard.RotateAction(a.Policy(t, 2, 1, "dave", "alice"))},
	}
	for _, tc := range acts {
		act := tc.act
		good := sign(t, a, "alice", repoID, 1, act, exp, "bob", "carol")
		refused := []struct {
			name string
			c    *Client
			cert []byte
			act  guard.Action
		}{
			{"too few approvals", e.admin, sign(t, a, "alice", repoID, 1, act, exp, "bob"), act},
			{"self approval", e.admin, sign(t, a, "alice", repoID, 1, act, exp, "alice", "bob"), act},
			{"expired", e.admin, sign(t, a, "alice", repoID, 1, act, t0.Add(-time.Second), "bob", "carol"), act},
			{"other repository", e.admin, sign(t, a, "alice", strings.Repeat("ab", 32), 1, act, exp, "bob", "carol"), act},
			{"other parameters", e.admin, good, tc.other},
			{"certificate for other parameters", e.admin, sign(t, a, "alice", repoID, 1, tc.other, exp, "bob", "carol"), act},
			{"append token", e.app, good, act},
			{"read token", e.rd, good, act},
		}
		for _, r := range refused {
			if _, err := r.c.Certified(ctx, r.act, r.cert); !errors.Is(err, guard.ErrForbidden) {
				t.Errorf("%s %s: err = %v, want 403", act.Op, r.name, err)
			}
		}
		out, err := e.admin.Certified(ctx, act, good)
		if err != nil {
			t.Fatalf("%s with a valid certificate: %v", act.Op, err)
		}
		if out.Op != act.Op {
			t.Errorf("outcome %+v", out)
		}
		if _, err := e.admin.Certified(ctx, act, good); !errors.Is(err, guard.ErrForbidden) {
			t.Errorf("%s replay: %v", act.Op, err)
		}
	}
	if _, err := e.be.Stat(ctx, hd(backend.Snapshot, snap)); !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("snapshot not forgotten: %v", err)
	}
	// After the rotation (alice, bob, dave; serial 2), forgetting needs
	// serial 2 and the new set.
	snap2 := []byte("second snapshot")
	_, snap2ID, err := e.app.Commit(ctx, format.CommitRequest{Snapshot: snap2})
	if err != nil {
		t.Fatal(err)
	}
	forget := guard.ForgetAction(snap2ID)
	if _, err := e.admin.Certified(ctx, forget, sign(t, a, "alice", repoID, 1, forget, exp, "bob", "carol")); !errors.Is(err, guard.ErrForbidden) {
		t.Errorf("old policy after rotation: %v", err)
	}
	if _, err := e.admin.Certified(ctx, forget, sign(t, a, "alice", repoID, 2, forget, exp, "bob", "carol")); !errors.Is(err, guard.ErrForbidden) {
		t.Errorf("removed approver carol after rotation: %v", err)
	}
	if err := e.admin.Remove(ctx, hd(backend.Snapshot, snap2)); !errors.Is(err, guard.ErrLocked) {
		t.Errorf("plain forget of a locked snapshot: %v", err)
	}
	if _, err := e.admin.Certified(ctx, forget, sign(t, a, "alice", repoID, 2, forget, exp, "bob", "dave")); err != nil {
		t.Errorf("forget with the new set: %v", err)
	}
	if _, err := e.be.Stat(ctx, hd(backend.Snapshot, snap2)); !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("snapshot not forgotten by the new set: %v", err)
	}
	st, err := e.rd.Quorum(ctx)
	if err != nil || time.Duration(st.MinRetention) != time.Hour || st.Repo != repoID {
		t.Errorf("quorum state %+v, %v", st, err)
	}
	if code, _ := e.raw(t, e.secret[guard.Admin], http.MethodPost, "/v1/certified", strings.NewReader(`{"action":{"op":"x"}}`)); code != http.StatusBadRequest {
		t.Errorf("malformed body: %d", code)
	}
}

func TestNoPolicyRefusesOverHTTPS(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	_, _, _, snap, _ := e.seed(t)
	a := certtest.NewPeople("alice", "bob", "carol")
	act := guard.ForgetAction(format.Hash(snap))
	if _, err := e.admin.Certified(ctx, act, sign(t, a, "alice", repoID, 1, act, t0.Add(time.Hour), "bob", "carol")); !errors.Is(err, guard.ErrForbidden) {
		t.Errorf("vault without a policy: %v", err)
	}
}

func TestForgedPolicyOverHTTPS(t *testing.T) {
	ctx := context.Background()
	e, a, pol := newQuorumEnv(t)
	evil := a.Policy(t, 2, 1, "dave", "alice")
	c := sign(t, a, "dave", repoID, 1, guard.RotateAction(evil), t0.Add(time.Hour), "alice")
	data, _ := json.Marshal(format.PolicyRecord{Time: t0, Prev: pol.Hash(), Policy: evil.Encode(), Certificate: c})
	root := e.be.(*local.Backend).Root()
	if err := os.WriteFile(filepath.Join(root, string(backend.Policy), format.Hash(data).String()), data, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := e.rd.Quorum(ctx)
	if err != nil || st.Serial != 1 || len(st.Rejected) != 1 {
		t.Errorf("planted policy: %+v, %v", st, err)
	}
}

func TestLedgerObjectsOverHTTPS(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	h := backend.Handle{Type: backend.Ledger, Name: strings.Repeat("ef", 32)}
	obj := append(format.AppendLedgerHeader(nil), make([]byte, 40)...)
	if err := e.app.Save(ctx, h, obj); err != nil {
		t.Fatalf("append token saves ledger object: %v", err)
	}
	if err := e.app.Save(ctx, h, obj); err != nil {
		t.Errorf("identical retry: %v", err)
	}
	if err := e.app.Save(ctx, h, append(obj, 1)); !errors.Is(err, backend.ErrExists) {
		t.Errorf("overwrite: %v", err)
	}
	for _, c := range []*Client{e.app, e.admin} {
		if err := c.Remove(ctx, h); !errors.Is(err, guard.ErrForbidden) {
			t.Errorf("remove ledger object: %v", err)
		}
	}
}
