package quorum

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func key(name string) ed25519.PrivateKey {
	seed := sha256.Sum256([]byte("quorum test key " + name))
	return ed25519.NewKeyFromSeed(seed[:])
}

func pub(name string) ed25519.PublicKey { return key(name).Public().(ed25519.PublicKey) }

// clock is a settable test clock shared by the store, the ledger and the service.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

type env struct {
	t   *testing.T
	db  *state.DB
	led *ledger.Ledger
	svc *Service
	clk *clock
}

var ledgerKey = ed25519.NewKeyFromSeed(make([]byte, 32))

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newEnv opens a service on dsn (a fresh SQLite file when empty).
func newEnv(t *testing.T, dsn string, clk *clock, opts Options) *env {
	t.Helper()
	if dsn == "" {
		dsn = filepath.Join(t.TempDir(), "state.db")
	}
	if clk == nil {
		clk = &clock{t: t0}
	}
	db, err := state.Open(ctxT(t), dsn, state.WithClock(clk.now))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	led, err := ledger.Open(ctxT(t), db.Ledger(), nil, ledgerKey, ledger.Options{Now: clk.now, CheckpointEvery: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { led.Close(context.Background()) })
	opts.Now = clk.now
	opts.PollInterval = 10 * time.Millisecond
	return &env{t: t, db: db, led: led, svc: New(db, led, opts), clk: clk}
}

// testPolicy: alice, bob and carol approve; every action needs 2; alice
// may break glass as dba.
func testPolicy() *cert.Policy {
	p := &cert.Policy{Rules: []cert.Rule{{Name: "default", Actions: []string{"*"}, Threshold: 2}},
		BreakGlass: []cert.Grant{{Person: "alice", Roles: []string{"dba"}}}}
	for _, n := range []string{"alice", "bob", "carol"} {
		p.Approvers = append(p.Approvers, cert.Approver{Name: n, PublicKey: pub(n)})
	}
	return p
}

func (e *env) init() *env {
	e.t.Helper()
	if err := e.svc.Init(ctxT(e.t), testPolicy()); err != nil {
		e.t.Fatal(err)
	}
	return e
}

func (e *env) sqlRequest(requester, text string) cert.Request {
	p, err := e.svc.Policy(ctxT(e.t))
	if err != nil {
		e.t.Fatal(err)
	}
	now := e.clk.now()
	return cert.Request{Requester: requester, Action: "sql:destructive", Reason: "clean up",
		Created: now, Expires: now.Add(time.Hour), PolicySerial: p.Serial,
		SQL: &cert.SQLAction{Database: "shop", Role: "app_owner", Text: text, Class: "destructive"}}
}

func (e *env) open(r cert.Request) cert.ID {
	e.t.Helper()
	id, err := e.svc.Open(ctxT(e.t), r)
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

func (e *env) sign(name string, id cert.ID, decision string) cert.Approval {
	return cert.Sign(key(name), name, id, decision, e.clk.now().Add(90*time.Minute))
}

func (e *env) approve(name string, id cert.ID) (state.Status, error) {
	return e.svc.Approve(ctxT(e.t), e.sign(name, id, cert.Approve))
}

func (e *env) mustApprove(names ...string) func(id cert.ID) {
	return func(id cert.ID) {
		for _, n := range names {
			if _, err := e.approve(n, id); err != nil {
				e.t.Fatalf("approve by %s: %v", n, err)
			}
		}
	}
}

func TestInit(t *testing.T) {
	e := newEnv(t, "", nil, Options{})
	ctx := ctxT(t)
	if _, err := e.svc.Policy(ctx); !errors.Is(err, ErrNoPolicy) {
		t.Fatalf("Policy before init = %v", err)
	}
	bad := testPolicy()
	bad.Rules[0].Threshold = 0
	if err := e.svc.Init(ctx, bad); !errors.Is(err, cert.ErrPolicy) {
		t.Errorf("Init(threshold 0) = %v, want ErrPolicy", err)
	}
	e.init()
	if err := e.svc.Init(ctx, testPolicy()); !errors.Is(err, ErrInitialized) {
		t.Errorf("second Init = %v, want ErrInitialized", err)
	}
	p, err := e.svc.Policy(ctx)
	if err != nil || p.Serial != 1 || len(p.Approvers) != 3 {
		t.Fatalf("Policy = %+v, %v", p, err)
	}
}

func TestVotes(t *testing.T) {
	tests := []struct {
		name    string
		vote    func(e *env, id cert.ID) (state.Status, error)
		want    error
		wantSt  state.Status
		setup   func(e *env, id cert.ID)
		request string // requester; dave by default
	}{
		{name: "self-approval", request: "alice",
			vote: func(e *env, id cert.ID) (state.Status, error) { return e.approve("alice", id) }, want: cert.ErrSelfApproval, wantSt: state.StatusOpen},
		{name: "unregistered approver",
			vote: func(e *env, id cert.ID) (state.Status, error) {
				return e.svc.Approve(ctxT(e.t), cert.Sign(key("mallory"), "mallory", id, cert.Approve, e.clk.now().Add(time.Minute)))
			}, want: cert.ErrUnknownApprover, wantSt: state.StatusOpen},
		{name: "unregistered key under a registered name",
			vote: func(e *env, id cert.ID) (state.Status, error) {
				return e.svc.Approve(ctxT(e.t), cert.Sign(key("mallory"), "bob", id, cert.Approve, e.clk.now().Add(time.Minute)))
			}, want: cert.ErrBadSignature, wantSt: state.StatusOpen},
		{name: "approval for another request",
			vote: func(e *env, id cert.ID) (state.Status, error) {
				other := e.open(e.sqlRequest("dave", "DROP TABLE other"))
				a := e.sign("bob", other, cert.Approve)
				a.Request = id
				return e.svc.Approve(ctxT(e.t), a)
			}, want: cert.ErrBadSignature, wantSt: state.StatusOpen},
		{name: "duplicate vote", setup: func(e *env, id cert.ID) { e.mustApprove("bob")(id) },
			vote: func(e *env, id cert.ID) (state.Status, error) { return e.approve("bob", id) }, want: ErrDuplicateVote, wantSt: state.StatusOpen},
		{name: "approve then deny by the same person", setup: func(e *env, id cert.ID) { e.mustApprove("bob")(id) },
			vote: func(e *env, id cert.ID) (state.Status, error) {
				return e.svc.Deny(ctxT(e.t), e.sign("bob", id, cert.Deny))
			}, want: ErrDuplicateVote, wantSt: state.StatusOpen},
		{name: "expired request", setup: func(e *env, id cert.ID) { e.clk.add(time.Hour) },
			vote: func(e *env, id cert.ID) (state.Status, error) { return e.approve("bob", id) }, want: cert.ErrExpired, wantSt: state.StatusExpired},
		{name: "expired approval",
			vote: func(e *env, id cert.ID) (state.Status, error) {
				return e.svc.Approve(ctxT(e.t), cert.Sign(key("bob"), "bob", id, cert.Approve, e.clk.now().Add(-time.Second)))
			}, want: cert.ErrExpired, wantSt: state.StatusOpen},
		{name: "deny", setup: func(e *env, id cert.ID) { e.mustApprove("bob")(id) },
			vote: func(e *env, id cert.ID) (state.Status, error) {
				return e.svc.Deny(ctxT(e.t), e.sign("carol", id, cert.Deny))
			}, wantSt: state.StatusDenied},
		{name: "one approval is not enough",
			vote: func(e *env, id cert.ID) (state.Status, error) { return e.approve("bob", id) }, wantSt: state.StatusOpen},
		{name: "threshold reached exactly", setup: func(e *env, id cert.ID) { e.mustApprove("bob")(id) },
			vote: func(e *env, id cert.ID) (state.Status, error) { return e.approve("carol", id) }, wantSt: state.StatusApproved},
		{name: "vote after approval", setup: func(e *env, id cert.ID) { e.mustApprove("bob", "carol")(id) },
			vote: func(e *env, id cert.ID) (state.Status, error) { return e.approve("alice", id) }, want: ErrNotOpen, wantSt: state.StatusApproved},
		{name: "approve signature sent as a deny",
			vote: func(e *env, id cert.ID) (state.Status, error) {
				return e.svc.Deny(ctxT(e.t), e.sign("bob", id, cert.Approve))
			}, want: ErrInvalid, wantSt: state.StatusOpen},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, "", nil, Options{}).init()
			requester := tt.request
			if requester == "" {
				requester = "dave"
			}
			id := e.open(e.sqlRequest(requester, "DROP TABLE audit_2019"))
			if tt.setup != nil {
				tt.setup(e, id)
			}
			_, err := tt.vote(e, id)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("vote = %v, want %v", err, tt.want)
			}
			sum, err := e.svc.Show(ctxT(t), id)
			if err != nil {
				t.Fatal(err)
			}
			if sum.Status != tt.wantSt {
				t.Errorf("status = %s, want %s", sum.Status, tt.wantSt)
			}
		})
	}
}

func TestConsume(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	ctx := ctxT(t)
	id := e.open(e.sqlRequest("dave", "DROP TABLE audit_2019"))
	if _, _, err := e.svc.Consume(ctx, id, "gate1"); !errors.Is(err, cert.ErrNotEnough) {
		t.Fatalf("Consume(open) = %v, want ErrNotEnough", err)
	}
	e.mustApprove("bob", "carol")(id)
	c, err := e.svc.Certificate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := e.svc.Policy(ctx)
	if _, err := cert.Verify(c, p, e.clk.now()); err != nil {
		t.Fatalf("cert.Verify(assembled certificate) = %v", err)
	}
	r, _, err := e.svc.Consume(ctx, id, "gate1")
	if err != nil || r.SQL.Text != "DROP TABLE audit_2019" {
		t.Fatalf("Consume = %+v, %v", r, err)
	}
	if _, _, err := e.svc.Consume(ctx, id, "gate2"); !errors.Is(err, ErrConsumed) {
		t.Errorf("second Consume = %v, want ErrConsumed", err)
	}

	// An approved request past its expiry does not run.
	id2 := e.open(e.sqlRequest("dave", "DROP TABLE t2"))
	e.mustApprove("bob", "carol")(id2)
	e.clk.add(2 * time.Hour)
	if _, _, err := e.svc.Consume(ctx, id2, "gate1"); !errors.Is(err, cert.ErrExpired) {
		t.Errorf("Consume(expired) = %v, want ErrExpired", err)
	}
	if s, _ := e.svc.Show(ctx, id2); s.Status != state.StatusExpired {
		t.Errorf("status after expiry = %s", s.Status)
	}
	// Everything above is on the ledger, which verifies.
	if err := e.led.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	rep, err := ledger.Verify(ctx, e.db.Ledger(), nil, ledgerKey.Public().(ed25519.PublicKey))
	if err != nil || !rep.OK() {
		t.Fatalf("ledger.Verify = %+v, %v", rep, err)
	}
	kinds := map[string]int{}
	ledger.Read(ctx, e.db.Ledger(), 1, func(r ledger.Record) error { kinds[r.Kind]++; return nil })
	for k, n := range map[string]int{KindPolicy: 1, ledger.KindRequest: 2, ledger.KindApproval: 4, ledger.KindDecision: 4} {
		if kinds[k] != n {
			t.Errorf("ledger has %d %s records, want %d (all: %v)", kinds[k], k, n, kinds)
		}
	}
}

// TestConsumeTamperedVote: an approval row edited in the store (here: a
// forged signature) does not count.
func TestConsumeTamperedVote(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	ctx := ctxT(t)
	id := e.open(e.sqlRequest("dave", "DROP TABLE t"))
	e.mustApprove("bob")(id)
	forged := e.sign("carol", id, cert.Approve)
	forged.Signature[0] ^= 1
	if err := e.db.AddApproval(ctx, state.Approval{RequestID: string(id), Approver: "carol", Decision: cert.Approve, Doc: encodeApproval(forged)}); err != nil {
		t.Fatal(err)
	}
	if err := e.db.SetRequestStatus(ctx, string(id), state.StatusOpen, state.StatusApproved); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.svc.Consume(ctx, id, "gate"); !errors.Is(err, cert.ErrNotEnough) {
		t.Fatalf("Consume with a forged row = %v, want ErrNotEnough", err)
	}
}

func TestWait(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	id := e.open(e.sqlRequest("dave", "DROP TABLE t"))
	ctx, cancel := context.WithTimeout(ctxT(t), 50*time.Millisecond)
	defer cancel()
	if st, err := e.svc.Wait(ctx, id); !errors.Is(err, context.DeadlineExceeded) || st != state.StatusOpen {
		t.Fatalf("Wait with nobody voting = %s, %v; want open and a deadline (never approve on timeout)", st, err)
	}
	done := make(chan state.Status)
	go func() {
		st, _ := e.svc.Wait(ctxT(t), id)
		done <- st
	}()
	e.mustApprove("bob", "carol")(id)
	if st := <-done; st != state.StatusApproved {
		t.Errorf("Wait = %s, want approved", st)
	}
}

func TestPolicyChange(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	ctx := ctxT(t)
	pending := e.open(e.sqlRequest("dave", "DROP TABLE before_change"))

	next := testPolicy()
	next.Approvers = append(next.Approvers, cert.Approver{Name: "dave", PublicKey: pub("dave")})
	next.Rules[0].Threshold = 3
	id, err := e.svc.ProposePolicy(ctx, "alice", "add dave, raise to 3", next, e.clk.now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	// dave is not an approver yet: under the old policy his vote is refused.
	if _, err := e.svc.Approve(ctx, e.sign("dave", id, cert.Approve)); !errors.Is(err, cert.ErrUnknownApprover) {
		t.Errorf("vote by the approver being added = %v, want ErrUnknownApprover", err)
	}
	e.mustApprove("bob")(id)
	if _, err := e.svc.ApplyPolicyChange(ctx, id, "alice"); !errors.Is(err, cert.ErrNotEnough) {
		t.Fatalf("apply with one approval = %v, want ErrNotEnough", err)
	}
	e.mustApprove("carol")(id)
	p, err := e.svc.ApplyPolicyChange(ctx, id, "alice")
	if err != nil || p.Serial != 2 {
		t.Fatalf("apply = %v, %v", p, err)
	}
	if _, err := e.svc.ApplyPolicyChange(ctx, id, "alice"); !errors.Is(err, cert.ErrStalePolicy) {
		t.Errorf("second apply = %v, want ErrStalePolicy", err)
	}
	cur, _ := e.svc.Policy(ctx)
	if cur.Serial != 2 || len(cur.Approvers) != 4 {
		t.Fatalf("current policy = %+v", cur)
	}
	// A request opened under serial 1 no longer passes.
	if _, err := e.approve("bob", pending); !errors.Is(err, cert.ErrStalePolicy) {
		t.Errorf("vote on a request from the old policy = %v, want ErrStalePolicy", err)
	}
	// Under the new policy, three approvals, and dave's counts.
	r := e.sqlRequest("erin", "DROP TABLE after_change")
	nid := e.open(r)
	e.mustApprove("bob", "carol")(nid)
	if s, _ := e.svc.Show(ctx, nid); s.Status != state.StatusOpen {
		t.Fatalf("two approvals under a 3-of-4 policy: %s", s.Status)
	}
	e.mustApprove("dave")(nid)
	if _, _, err := e.svc.Consume(ctx, nid, "gate"); err != nil {
		t.Fatalf("consume under the new policy: %v", err)
	}
}

func TestBreakGlass(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	ctx := ctxT(t)
	if _, err := e.svc.StartBreakGlass(ctx, "alice", "superuser", "outage", 30*time.Minute); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("break-glass in a role not granted = %v, want ErrNotAllowed", err)
	}
	if _, err := e.svc.StartBreakGlass(ctx, "bob", "dba", "outage", 30*time.Minute); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("break-glass by a person not granted = %v, want ErrNotAllowed", err)
	}
	if _, err := e.svc.StartBreakGlass(ctx, "alice", "dba", "outage", 24*time.Hour); !errors.Is(err, ErrInvalid) {
		t.Errorf("break-glass for a day = %v, want ErrInvalid", err)
	}
	if _, err := e.svc.StartBreakGlass(ctx, "alice", "dba", " ", 30*time.Minute); !errors.Is(err, ErrInvalid) {
		t.Errorf("break-glass without a reason = %v, want ErrInvalid", err)
	}
	b, err := e.svc.StartBreakGlass(ctx, "alice", "dba", "primary down, replica lagging", 30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if !b.Active(e.clk.now()) {
		t.Error("new session not active")
	}
	// The review may be opened at once, but not completed while it runs.
	rr, err := e.svc.ReviewRequest(ctx, b.ID, "alice", "please review my break-glass", e.clk.now().Add(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	rid := e.open(rr)
	e.mustApprove("bob", "carol")(rid)
	if _, err := e.svc.MarkBreakGlassReviewed(ctx, rid, "bob"); !errors.Is(err, ErrInvalid) {
		t.Errorf("review of a running session = %v, want ErrInvalid", err)
	}
	e.clk.add(31 * time.Minute)
	got, _ := e.svc.BreakGlass(ctx, b.ID)
	if got.Active(e.clk.now()) {
		t.Error("session still active after its end: it must end by itself")
	}
	if un, _ := e.svc.ListBreakGlass(ctx, true); len(un) != 1 {
		t.Errorf("unreviewed sessions = %d, want 1 (it stays flagged)", len(un))
	}
	got, err = e.svc.MarkBreakGlassReviewed(ctx, rid, "bob")
	if err != nil || !got.Reviewed {
		t.Fatalf("review = %+v, %v", got, err)
	}
	if un, _ := e.svc.ListBreakGlass(ctx, true); len(un) != 0 {
		t.Errorf("unreviewed sessions after review = %d", len(un))
	}
	if _, err := e.svc.MarkBreakGlassReviewed(ctx, rid, "bob"); !errors.Is(err, ErrConsumed) {
		t.Errorf("second use of the review = %v, want ErrConsumed", err)
	}
}

// TestBreakGlassReviewNotBySelf: the person who broke the glass cannot
// count towards its review, even when someone else opened the review.
func TestBreakGlassReviewNotBySelf(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	ctx := ctxT(t)
	b, err := e.svc.StartBreakGlass(ctx, "alice", "dba", "outage", 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	e.clk.add(11 * time.Minute)
	rr, _ := e.svc.ReviewRequest(ctx, b.ID, "bob", "review alice", e.clk.now().Add(time.Hour))
	rid := e.open(rr)
	if _, err := e.approve("alice", rid); !errors.Is(err, cert.ErrSelfApproval) {
		t.Errorf("alice approving the review of her own session = %v, want ErrSelfApproval", err)
	}
	e.mustApprove("carol")(rid)
	if _, err := e.svc.MarkBreakGlassReviewed(ctx, rid, "bob"); !errors.Is(err, cert.ErrNotEnough) {
		t.Errorf("review with one approval = %v, want ErrNotEnough", err)
	}
	if got, _ := e.svc.BreakGlass(ctx, b.ID); got.Reviewed {
		t.Error("session marked reviewed without a quorum")
	}
}

func TestDisabledUser(t *testing.T) {
	e := newEnv(t, "", nil, Options{}).init()
	ctx := ctxT(t)
	for _, n := range []string{"bob", "dave"} {
		if err := e.db.AddUser(ctx, state.User{Name: n}); err != nil {
			t.Fatal(err)
		}
	}
	id := e.open(e.sqlRequest("dave", "DROP TABLE t"))
	if err := e.db.DisableUser(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.approve("bob", id); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("vote by a disabled user = %v, want ErrNotAllowed", err)
	}
	e.db.DisableUser(ctx, "dave")
	if _, err := e.svc.Open(ctx, e.sqlRequest("dave", "DROP TABLE u")); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("request by a disabled user = %v, want ErrNotAllowed", err)
	}
}

// testConsumeRace has two services on one database (as two gateways)
// race to consume one approved request: exactly one wins.
func testConsumeRace(t *testing.T, dsn string) {
	clk := &clock{t: t0}
	a := newEnv(t, dsn, clk, Options{}).init()
	b := newEnv(t, dsn, clk, Options{})
	for round := 0; round < 5; round++ {
		id := a.open(a.sqlRequest("dave", "DROP TABLE t"+string(rune('a'+round))))
		a.mustApprove("bob", "carol")(id)
		var wg sync.WaitGroup
		var mu sync.Mutex
		wins, consumed := 0, 0
		for i := 0; i < 8; i++ {
			svc := []*Service{a.svc, b.svc}[i%2]
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _, err := svc.Consume(ctxT(t), id, "gate")
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					wins++
				case errors.Is(err, ErrConsumed):
					consumed++
				default:
					t.Errorf("Consume: %v", err)
				}
			}()
		}
		wg.Wait()
		if wins != 1 || consumed != 7 {
			t.Fatalf("round %d: %d winners and %d ErrConsumed, want 1 and 7", round, wins, consumed)
		}
	}
	// Both services wrote to one ledger, still one valid chain.
	if err := a.led.Checkpoint(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	rep, err := ledger.Verify(ctxT(t), a.db.Ledger(), nil, ledgerKey.Public().(ed25519.PublicKey))
	if err != nil || !rep.OK() {
		t.Fatalf("ledger after the race: %+v, %v", rep, err)
	}
}

func TestConsumeRaceSQLite(t *testing.T) {
	testConsumeRace(t, filepath.Join(t.TempDir(), "state.db"))
}

// testApplyRace: two services apply one approved policy change at once;
// exactly one installs it.
func testApplyRace(t *testing.T, dsn string) {
	clk := &clock{t: t0}
	a := newEnv(t, dsn, clk, Options{}).init()
	b := newEnv(t, dsn, clk, Options{})
	next := testPolicy()
	next.Rules[0].Threshold = 3
	id, err := a.svc.ProposePolicy(ctxT(t), "dave", "stricter", next, clk.now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	a.mustApprove("bob", "carol")(id)
	errs := make(chan error, 2)
	for _, s := range []*Service{a.svc, b.svc} {
		go func() { _, err := s.ApplyPolicyChange(ctxT(t), id, "dave"); errs <- err }()
	}
	e1, e2 := <-errs, <-errs
	if (e1 == nil) == (e2 == nil) {
		t.Fatalf("apply race: %v and %v; want exactly one success", e1, e2)
	}
	if p, _ := b.svc.Policy(ctxT(t)); p.Serial != 2 || p.Rules[0].Threshold != 3 {
		t.Fatalf("policy after the race: %+v", p)
	}
}

func TestApplyRaceSQLite(t *testing.T) { testApplyRace(t, filepath.Join(t.TempDir(), "state.db")) }
