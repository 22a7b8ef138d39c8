package guard

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/quorum/cert/certtest"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// people are approvers with deterministic keys.
type people = certtest.People

var newPeople = certtest.NewPeople

const testRepo = "abababababababababababababababababababababababababababababababab"

// certReq describes a certificate to build.
type certReq struct {
	requester string
	act       Action
	repo      string // default testRepo
	serial    uint64 // default 1
	expires   time.Time
	signers   []string
}

func signed(t testing.TB, pp people, r certReq) []byte {
	t.Helper()
	if r.repo == "" {
		r.repo = testRepo
	}
	if r.serial == 0 {
		r.serial = 1
	}
	if r.expires.IsZero() {
		r.expires = t0.Add(time.Hour)
	}
	return pp.Cert(t, certtest.Vault{Requester: r.requester, Op: r.act.Op, Params: r.act.Params, Repo: r.repo,
		Serial: r.serial, Created: t0.Add(-time.Minute), Expires: r.expires, Signers: r.signers})
}

func quorumConfig(t testing.TB, p *cert.Policy) []byte {
	t.Helper()
	b, err := json.Marshal(format.Config{Version: 1, ID: testRepo, Created: t0.Add(-time.Hour),
		MinRetention: format.Duration(minRetention), QuorumPolicy: p.Encode()})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// quorumFixture is a fixture whose vault holds a 2-of-3 policy of alice,
// bob and carol, with a second key (key2) so that one may be removed.
type quorumFixture struct {
	*fixture
	pp   people
	pol  *cert.Policy
	key2 string
}

func newQuorumFixture(t testing.TB) *quorumFixture {
	pp := newPeople("alice", "bob", "carol", "mallory")
	pol := pp.Policy(t, 1, 2, "alice", "bob", "carol")
	f := newFixtureWith(t, quorumConfig(t, pol))
	k2 := []byte("wrapped key 2")
	if err := f.admin.Save(context.Background(), h(backend.Key, k2), k2); err != nil {
		t.Fatal(err)
	}
	return &quorumFixture{fixture: f, pp: pp, pol: pol, key2: format.Hash(k2).String()}
}

func TestCertifiedRefusals(t *testing.T) {
	ctx := context.Background()
	other := format.Hash([]byte("another snapshot"))
	actions := map[string]func(q *quorumFixture) (Action, Action){
		// each returns the action and a variant with other parameters
		OpShortenLock: func(q *quorumFixture) (Action, Action) {
			return ShortenLockAction(q.snap, t0.Add(time.Hour)), ShortenLockAction(q.snap, t0.Add(time.Minute))
		},
		OpLowerRetention: func(q *quorumFixture) (Action, Action) {
			return LowerRetentionAction(time.Hour), LowerRetentionAction(time.Minute)
		},
		OpForget: func(q *quorumFixture) (Action, Action) { return ForgetAction(q.snap), ForgetAction(other) },
		OpRemoveKey: func(q *quorumFixture) (Action, Action) {
			return RemoveKeyAction(q.key2), RemoveKeyAction(q.keyName)
		},
		OpRotate: func(q *quorumFixture) (Action, Action) {
			return RotateAction(q.pp.Policy(t, 2, 2, "alice", "bob", "carol", "mallory")),
				RotateAction(q.pp.Policy(t, 2, 1, "mallory", "alice"))
		},
	}
	for op, mk := range actions {
		t.Run(op, func(t *testing.T) {
			q := newQuorumFixture(t)
			act, variant := mk(q)
			good := certReq{requester: "alice", act: act, signers: []string{"bob", "carol"}}
			refusals := []struct {
				name string
				c    certReq
				sess *Session
				use  Action
				want error
			}{
				{"no certificate", certReq{requester: "alice", act: act}, q.admin, act, cert.ErrNotEnough},
				{"too few approvals", certReq{requester: "alice", act: act, signers: []string{"bob"}}, q.admin, act, cert.ErrNotEnough},
				{"self approval", certReq{requester: "alice", act: act, signers: []string{"alice", "bob"}}, q.admin, act, cert.ErrSelfApproval},
				{"unregistered approver", certReq{requester: "alice", act: act, signers: []string{"bob", "mallory"}}, q.admin, act, cert.ErrUnknownApprover},
				{"expired", certReq{requester: "alice", act: act, signers: []string{"bob", "carol"}, expires: t0.Add(-time.Second)}, q.admin, act, cert.ErrExpired},
				{"other parameters", good, q.admin, variant, ErrForbidden},
				{"other repository", certReq{requester: "alice", act: act, repo: strings.Repeat("cd", 32), signers: []string{"bob", "carol"}}, q.admin, act, ErrForbidden},
				{"stale policy serial", certReq{requester: "alice", act: act, serial: 2, signers: []string{"bob", "carol"}}, q.admin, act, cert.ErrStalePolicy},
				{"append token", good, q.app, act, ErrForbidden},
				{"read token", good, q.rd, act, ErrForbidden},
			}
			if op == OpForget || op == OpShortenLock {
				refusals = append(refusals, struct {
					name string
					c    certReq
					sess *Session
					use  Action
					want error
				}{"another snapshot's certificate", certReq{requester: "alice", act: variant, signers: []string{"bob", "carol"}}, q.admin, act, ErrForbidden})
			}
			before := listAll(t, q.be)
			for _, r := range refusals {
				_, err := r.sess.Certified(ctx, r.use, signed(t, q.pp, r.c))
				if !errors.Is(err, r.want) || !errors.Is(err, ErrForbidden) {
					t.Errorf("%s: err = %v, want %v and ErrForbidden", r.name, err, r.want)
				}
			}
			if after := listAll(t, q.be); strings.Join(before, "\n") != strings.Join(after, "\n") {
				t.Errorf("refusals changed the vault:\nbefore %v\nafter  %v", before, after)
			}

			c := signed(t, q.pp, good)
			out, err := q.admin.Certified(ctx, act, c)
			if err != nil {
				t.Fatalf("valid certificate refused: %v", err)
			}
			if out.Op != op || out.Request == "" {
				t.Errorf("outcome = %+v", out)
			}
			if _, err := q.be.Stat(ctx, backend.Handle{Type: backend.Consumed, Name: out.Request}); err != nil {
				t.Errorf("request not recorded as consumed: %v", err)
			}
			if _, err := q.admin.Certified(ctx, act, c); !errors.Is(err, ErrForbidden) ||
				!errors.Is(err, ErrConsumed) && !(op == OpRotate && errors.Is(err, cert.ErrStalePolicy)) {
				t.Errorf("replay: err = %v, want ErrConsumed", err)
			}
			// Restarted vault: the consumed record is in the backend.
			st2 := New(q.be, Options{Now: q.clock.Now})
			if _, err := st2.Session(Admin).Certified(ctx, act, c); !errors.Is(err, ErrConsumed) && op != OpRotate {
				t.Errorf("replay after restart: err = %v, want ErrConsumed", err)
			} else if op == OpRotate && !errors.Is(err, cert.ErrStalePolicy) {
				t.Errorf("replayed rotation after restart: err = %v, want ErrStalePolicy", err)
			}
		})
	}
}

func TestAdminAloneCannot(t *testing.T) {
	ctx := context.Background()
	q := newQuorumFixture(t)
	if err := q.admin.Remove(ctx, h(backend.Snapshot, q.snapDoc)); !errors.Is(err, ErrLocked) {
		t.Errorf("forget locked snapshot: %v", err)
	}
	if err := q.admin.Remove(ctx, backend.Handle{Type: backend.Key, Name: q.key2}); !errors.Is(err, ErrForbidden) {
		t.Errorf("remove key under a policy without certificate: %v", err)
	}
	if _, err := q.admin.ExtendLock(ctx, q.snap, t0.Add(time.Hour)); !errors.Is(err, ErrLocked) {
		t.Errorf("shorten through extend: %v", err)
	}
	for _, ty := range []backend.Type{backend.Policy, backend.Change, backend.Consumed, backend.Lock} {
		data := []byte(`{}`)
		if err := q.admin.Save(ctx, h(ty, data), data); !errors.Is(err, ErrForbidden) {
			t.Errorf("admin saves %s: %v", ty, err)
		}
	}
	// A vault without a policy refuses guarded actions, certificate or not.
	f := newFixture(t)
	pp := newPeople("alice", "bob", "carol")
	c := signed(t, pp, certReq{requester: "alice", act: ForgetAction(f.snap), signers: []string{"bob", "carol"}})
	if _, err := f.admin.Certified(ctx, ForgetAction(f.snap), c); !errors.Is(err, ErrForbidden) {
		t.Errorf("no policy: %v", err)
	}
}

func TestCertifiedEffects(t *testing.T) {
	ctx := context.Background()
	q := newQuorumFixture(t)
	sign := func(act Action) []byte {
		return signed(t, q.pp, certReq{requester: "carol", act: act, signers: []string{"alice", "bob"}})
	}

	// Shorten to an hour: the snapshot and its packs are free after it.
	out, err := q.admin.Certified(ctx, ShortenLockAction(q.snap, t0.Add(time.Hour)), sign(ShortenLockAction(q.snap, t0.Add(time.Hour))))
	if err != nil {
		t.Fatal(err)
	}
	if out.Lock == nil || !out.Lock.Until.Equal(t0.Add(time.Hour)) || out.Lock.Reason != format.ReasonShorten {
		t.Errorf("shorten record = %+v", out.Lock)
	}
	until, _, err := q.rd.SnapshotLock(ctx, q.snap)
	if err != nil || !until.Equal(t0.Add(time.Hour)) {
		t.Errorf("lock after shortening = %v, %v; want %v", until, err, t0.Add(time.Hour))
	}
	// Another store (a restarted server) sees the same.
	if until, _, _ := New(q.be, Options{Now: q.clock.Now}).Session(Read).SnapshotLock(ctx, q.snap); !until.Equal(t0.Add(time.Hour)) {
		t.Errorf("restarted vault sees lock until %v", until)
	}
	// Extending again works as before.
	if _, err := q.app.ExtendLock(ctx, q.snap, t0.Add(2*time.Hour)); err != nil {
		t.Errorf("extend after shortening: %v", err)
	}
	q.clock.Set(t0.Add(3 * time.Hour))
	if err := q.admin.Remove(ctx, h(backend.Pack, q.p1)); err != nil {
		t.Errorf("pack after the shortened lock: %v", err)
	}
	if err := q.admin.Remove(ctx, h(backend.Snapshot, q.snapDoc)); err != nil {
		t.Errorf("snapshot after the shortened lock: %v", err)
	}
	// The superseded commit record is still live by its own Until, so the
	// shortening record stays while it exists.
	if err := q.admin.Remove(ctx, backend.Handle{Type: backend.Lock, Name: q.lockName}); !errors.Is(err, ErrLocked) {
		t.Errorf("remove superseded live record: %v", err)
	}

	// Lower the minimum retention: new commits get the lower lock.
	if _, err := q.admin.Certified(ctx, LowerRetentionAction(time.Hour), sign(LowerRetentionAction(time.Hour))); err == nil {
		t.Fatal("certificate expired by now, still accepted")
	}
	q.clock.Set(t0)
	if _, err := q.admin.Certified(ctx, LowerRetentionAction(time.Hour), sign(LowerRetentionAction(time.Hour))); err != nil {
		t.Fatal(err)
	}
	rec, _, err := q.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("snapshot two"), Packs: ids(q.p2)})
	if err != nil || !rec.Until.Equal(t0.Add(time.Hour)) {
		t.Errorf("commit after lowering: %+v, %v; want until %v", rec, err, t0.Add(time.Hour))
	}
	st, err := q.rd.Quorum(ctx)
	if err != nil || time.Duration(st.MinRetention) != time.Hour {
		t.Errorf("quorum state %+v, %v", st, err)
	}
	if _, err := q.admin.Certified(ctx, LowerRetentionAction(2*time.Hour), sign(LowerRetentionAction(2*time.Hour))); !errors.Is(err, ErrInvalid) {
		t.Errorf("raising through retention.lower: %v", err)
	}

	// Forget a snapshot under its lock.
	snap3 := []byte("snapshot three")
	_, id3, err := q.app.Commit(ctx, format.CommitRequest{Snapshot: snap3, Packs: ids(q.p3), LockFor: format.Duration(48 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.admin.Certified(ctx, ForgetAction(id3), sign(ForgetAction(id3))); err != nil {
		t.Fatal(err)
	}
	if _, err := q.be.Stat(ctx, h(backend.Snapshot, snap3)); !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("snapshot still there: %v", err)
	}
	if err := q.admin.Remove(ctx, h(backend.Pack, q.p3)); !errors.Is(err, ErrLocked) {
		t.Errorf("the forgotten snapshot's packs stay locked: %v", err)
	}

	// Remove a key; never the last.
	if _, err := q.admin.Certified(ctx, RemoveKeyAction(q.key2), sign(RemoveKeyAction(q.key2))); err != nil {
		t.Fatal(err)
	}
	if _, err := q.admin.Certified(ctx, RemoveKeyAction(q.keyName), sign(RemoveKeyAction(q.keyName))); !errors.Is(err, ErrForbidden) {
		t.Errorf("last key: %v", err)
	}
}

func TestPolicyRotation(t *testing.T) {
	ctx := context.Background()
	q := newQuorumFixture(t)
	dave := newPeople("dave", "erin")
	for n, k := range dave {
		q.pp[n] = k
	}
	next := q.pp.Policy(t, 2, 2, "bob", "dave", "erin")
	rot := RotateAction(next)

	// The new set cannot sign its own installation.
	c := signed(t, q.pp, certReq{requester: "alice", act: rot, signers: []string{"dave", "erin"}})
	if _, err := q.admin.Certified(ctx, rot, c); !errors.Is(err, cert.ErrUnknownApprover) {
		t.Errorf("rotation signed by the new set: %v", err)
	}
	c = signed(t, q.pp, certReq{requester: "alice", act: rot, signers: []string{"bob", "carol"}})
	if _, err := q.admin.Certified(ctx, rot, c); err != nil {
		t.Fatal(err)
	}
	st, err := q.rd.Quorum(ctx)
	if err != nil || st.Serial != 2 || st.PolicyHash != next.Hash() {
		t.Fatalf("after rotation: %+v, %v", st, err)
	}

	// The old approvers no longer govern: a certificate under serial 1 is stale,
	// and alice and carol are not in the new set.
	forget := ForgetAction(q.snap)
	if _, err := q.admin.Certified(ctx, forget, signed(t, q.pp, certReq{requester: "bob", act: forget, signers: []string{"alice", "carol"}})); !errors.Is(err, cert.ErrStalePolicy) {
		t.Errorf("old serial: %v", err)
	}
	if _, err := q.admin.Certified(ctx, forget, signed(t, q.pp, certReq{requester: "bob", act: forget, serial: 2, signers: []string{"alice", "carol"}})); !errors.Is(err, cert.ErrUnknownApprover) {
		t.Errorf("old approvers under serial 2: %v", err)
	}
	if _, err := q.admin.Certified(ctx, forget, signed(t, q.pp, certReq{requester: "bob", act: forget, serial: 2, signers: []string{"dave", "erin"}})); err != nil {
		t.Errorf("new approvers: %v", err)
	}

	// A restarted vault verifies the chain from the config and agrees.
	st2, err := New(q.be, Options{Now: q.clock.Now}).Session(Read).Quorum(ctx)
	if err != nil || st2.Serial != 2 || len(st2.Rejected) != 0 {
		t.Errorf("reopened: %+v, %v", st2, err)
	}
}

func TestForgedPolicyRejected(t *testing.T) {
	ctx := context.Background()
	q := newQuorumFixture(t)
	evil := q.pp.Policy(t, 2, 1, "mallory", "alice")
	plant := func(name string, c []byte) string {
		data, _ := json.Marshal(format.PolicyRecord{Time: t0, Prev: q.pol.Hash(), Policy: evil.Encode(), Certificate: c})
		n := format.Hash(data).String()
		if err := os.WriteFile(filepath.Join(q.dir, string(backend.Policy), n), data, 0o600); err != nil {
			t.Fatal(err)
		}
		return n
	}
	rot := RotateAction(evil)
	forged := []string{
		plant("self-signed by mallory", signed(t, q.pp, certReq{requester: "mallory", act: rot, signers: []string{"mallory"}})),
		plant("one real approval", signed(t, q.pp, certReq{requester: "mallory", act: rot, signers: []string{"alice"}})),
		plant("another repository", signed(t, q.pp, certReq{requester: "mallory", act: rot, repo: strings.Repeat("cd", 32), signers: []string{"alice", "bob"}})),
	}
	// Junk under a name that is not its hash.
	junk := strings.Repeat("0", 64)
	os.WriteFile(filepath.Join(q.dir, string(backend.Policy), junk), []byte("{}"), 0o600)

	st, err := New(q.be, Options{Now: q.clock.Now}).Session(Read).Quorum(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Serial != 1 || st.PolicyHash != q.pol.Hash() {
		t.Errorf("forged policy took effect: %+v", st)
	}
	if len(st.Rejected) != len(forged)+1 {
		t.Errorf("rejected = %v, want the %d planted records", st.Rejected, len(forged)+1)
	}
	// mallory's policy does not govern.
	forget := ForgetAction(q.snap)
	if _, err := q.admin.Certified(ctx, forget, signed(t, q.pp, certReq{requester: "alice", act: forget, serial: 2, signers: []string{"mallory"}})); err == nil {
		t.Error("forged policy's approvers accepted")
	}

	// A planted shortening record without a valid certificate shortens nothing.
	fake := format.LockRecord{Snapshot: q.snap, Time: t0, Until: t0.Add(time.Second), Reason: format.ReasonShorten,
		Supersedes:  []format.ID{format.ID(mustID(t, q.lockName))},
		Certificate: signed(t, q.pp, certReq{requester: "mallory", act: ShortenLockAction(q.snap, t0.Add(time.Second)), signers: []string{"alice"}})}
	data, _ := json.Marshal(fake)
	os.WriteFile(filepath.Join(q.dir, string(backend.Lock), format.Hash(data).String()), data, 0o600)
	q.clock.Set(t0.Add(time.Hour))
	if err := New(q.be, Options{Now: q.clock.Now}).Session(Admin).Remove(ctx, h(backend.Snapshot, q.snapDoc)); !errors.Is(err, ErrLocked) {
		t.Errorf("planted shortening honoured: %v", err)
	}
	// Nor does a planted change record lower the minimum.
	ch, _ := json.Marshal(format.ChangeRecord{Time: t0, MinRetention: 0, Certificate: signed(t, q.pp, certReq{requester: "mallory", act: LowerRetentionAction(0), signers: []string{"bob"}})})
	os.WriteFile(filepath.Join(q.dir, string(backend.Change), format.Hash(ch).String()), ch, 0o600)
	if st, _ := New(q.be, Options{Now: q.clock.Now}).Session(Read).Quorum(ctx); time.Duration(st.MinRetention) != minRetention {
		t.Errorf("planted change lowered the minimum to %v", time.Duration(st.MinRetention))
	}
}

func mustID(t testing.TB, s string) format.ID {
	t.Helper()
	id, err := format.ParseID(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestLedgerObjects(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	name := strings.Repeat("1f", 32)
	obj := append(format.AppendLedgerHeader(nil), make([]byte, format.LedgerSealOverhead+5)...)
	hd := backend.Handle{Type: backend.Ledger, Name: name}
	if err := f.rd.Save(ctx, hd, obj); !errors.Is(err, ErrForbidden) {
		t.Errorf("read saves ledger: %v", err)
	}
	if err := f.app.Save(ctx, hd, []byte("junk without header")); !errors.Is(err, ErrInvalid) {
		t.Errorf("junk ledger object: %v", err)
	}
	if err := f.app.Save(ctx, hd, obj); err != nil {
		t.Fatalf("append saves ledger object: %v", err)
	}
	if err := f.app.Save(ctx, hd, obj); err != nil {
		t.Errorf("identical retry: %v", err)
	}
	other := append(format.AppendLedgerHeader(nil), make([]byte, format.LedgerSealOverhead+6)...)
	if err := f.app.Save(ctx, hd, other); !errors.Is(err, backend.ErrExists) {
		t.Errorf("overwrite: %v", err)
	}
	for _, s := range []*Session{f.app, f.admin} {
		if err := s.Remove(ctx, hd); !errors.Is(err, ErrForbidden) {
			t.Errorf("%s removes ledger object: %v", s.cap, err)
		}
	}
}

// TestShortenKeepsWALRange: a certified shortening supersedes a base
// backup's records, so it carries their WAL range: the WAL stays protected
// until the shortened date, and no longer.
func TestShortenKeepsWALRange(t *testing.T) {
	ctx := context.Background()
	q := newQuorumFixture(t)
	rng := format.WALRange{Timeline: 1, Start: 16 << 20, End: 32 << 20}
	piece := walPiece(format.WALHeader{Timeline: 1, Start: 16 << 20, End: 16<<20 + 8192})
	if err := q.app.Save(ctx, h(backend.WAL, piece), piece); err != nil {
		t.Fatal(err)
	}
	_, snap, err := q.app.Commit(ctx, format.CommitRequest{Snapshot: []byte("base backup"), LockFor: format.Duration(48 * time.Hour), WAL: &rng})
	if err != nil {
		t.Fatal(err)
	}
	act := ShortenLockAction(snap, t0.Add(2*time.Hour))
	out, err := q.admin.Certified(ctx, act, signed(t, q.pp, certReq{requester: "carol", act: act, signers: []string{"alice", "bob"}}))
	if err != nil {
		t.Fatal(err)
	}
	if out.Lock == nil || out.Lock.WAL == nil || *out.Lock.WAL != rng {
		t.Fatalf("shorten record = %+v, want WAL %v", out.Lock, rng)
	}
	// The piece arrived long before t0 on the vault's clock: only the
	// range keeps it.
	q.clock.Set(t0.Add(time.Hour))
	if err := q.admin.Remove(ctx, h(backend.WAL, piece)); !errors.Is(err, ErrLocked) {
		t.Errorf("remove WAL within the shortened lock: %v, want ErrLocked", err)
	}
	q.clock.Set(t0.Add(3 * time.Hour))
	if err := q.admin.Remove(ctx, h(backend.WAL, piece)); err != nil {
		t.Errorf("remove WAL after the shortened lock: %v", err)
	}
}
