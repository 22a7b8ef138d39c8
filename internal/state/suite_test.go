package state

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The conformance suite: every engine behind DB passes the same tests.
// newDSN returns the DSN of a fresh, empty store; the suite opens as many
// handles on it as a test needs (two handles stand for two processes or
// two gateways: each has its own connection pool).
func runSuite(t *testing.T, newDSN func(t *testing.T) string) {
	tests := []struct {
		name string
		fn   func(t *testing.T, dsn string)
	}{
		{"Migrate", testMigrate},
		{"ConcurrentMigrate", testConcurrentMigrate},
		{"NewerSchemaRefused", testNewerSchema},
		{"Users", testUsers},
		{"Policy", testPolicy},
		{"PolicyRace", testPolicyRace},
		{"Requests", testRequests},
		{"Approvals", testApprovals},
		{"Consume", testConsume},
		{"ConsumeRace", testConsumeRace},
		{"BreakGlass", testBreakGlass},
		{"Ledger", testLedger},
		{"LedgerBatch", testLedgerBatch},
		{"LedgerAppendRace", testLedgerRace},
		{"LedgerCodec", testLedgerCodec},
		{"LedgerPlainRowsMigrated", testLedgerPlainRows},
		{"Incidents", testIncidents},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.fn(t, newDSN(t)) })
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func open(t *testing.T, dsn string, opts ...Option) *DB {
	t.Helper()
	db, err := Open(ctxT(t), dsn, opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func wantErr(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: err = %v, want %v", what, err, want)
	}
	if err != nil && !strings.HasPrefix(err.Error(), "state: ") {
		t.Errorf("%s: error %q lacks the state: prefix", what, err)
	}
}

// t0 is a fixed time with microseconds, the precision the store keeps.
var t0 = time.Date(2025, 3, 4, 5, 6, 7, 891011000, time.UTC)

func testMigrate(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	if v, err := db.version(ctx); err != nil || v != len(migrations) {
		t.Fatalf("version = %d, %v; want %d", v, err, len(migrations))
	}
	if err := db.AddUser(ctx, User{Name: "ann"}); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db = open(t, dsn) // reopen: nothing to migrate, data kept
	if v, err := db.version(ctx); err != nil || v != len(migrations) {
		t.Fatalf("after reopen: version = %d, %v", v, err)
	}
	if _, err := db.GetUser(ctx, "ann"); err != nil {
		t.Fatalf("after reopen: %v", err)
	}
	var rows int
	if err := db.sql.QueryRowContext(ctx, "SELECT count(*) FROM schema_version").Scan(&rows); err != nil || rows != len(migrations) {
		t.Fatalf("schema_version has %d rows (%v), want %d", rows, err, len(migrations))
	}
}

// Several processes opening a fresh database at once: each migration is
// applied once, and every open succeeds.
func testConcurrentMigrate(t *testing.T, dsn string) {
	const n = 4
	var wg sync.WaitGroup
	dbs := make([]*DB, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dbs[i], errs[i] = Open(ctxT(t), dsn)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("open %d: %v", i, errs[i])
		}
		defer dbs[i].Close()
	}
	var rows int
	if err := dbs[0].sql.QueryRowContext(ctxT(t), "SELECT count(*) FROM schema_version").Scan(&rows); err != nil || rows != len(migrations) {
		t.Fatalf("schema_version has %d rows (%v), want %d", rows, err, len(migrations))
	}
}

func testNewerSchema(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	if _, err := db.sql.ExecContext(ctx, "INSERT INTO schema_version (version, name, applied) VALUES ($1, 'from the future', 0)", len(migrations)+1); err != nil {
		t.Fatal(err)
	}
	db.Close()
	_, err := Open(ctx, dsn)
	wantErr(t, "open newer", err, ErrSchemaTooNew)
	if !strings.Contains(err.Error(), fmt.Sprintf("version %d", len(migrations)+1)) {
		t.Errorf("error %q does not name the version", err)
	}
}

func testUsers(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn, WithClock(func() time.Time { return t0 }))
	bob := User{Name: "bob", DisplayName: "Bob B.", Groups: []string{"dba", "oncall"}, Secret: "SCRAM-SHA-256$4096:c2FsdA==$a:b"}
	if err := db.AddUser(ctx, bob); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "add again", db.AddUser(ctx, User{Name: "bob"}), ErrExists)
	wantErr(t, "empty name", db.AddUser(ctx, User{}), ErrInvalid)
	if err := db.AddUser(ctx, User{Name: "ann", Created: t0.Add(-time.Hour)}); err != nil {
		t.Fatal(err)
	}
	got, err := db.GetUser(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	if got.DisplayName != bob.DisplayName || strings.Join(got.Groups, ",") != "dba,oncall" || got.Secret != bob.Secret ||
		got.Disabled || !got.Created.Equal(t0) {
		t.Errorf("GetUser = %+v", got)
	}
	_, err = db.GetUser(ctx, "nobody")
	wantErr(t, "get missing", err, ErrNotFound)

	if err := db.DisableUser(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "disable missing", db.DisableUser(ctx, "nobody"), ErrNotFound)
	if err := db.SetUserSecret(ctx, "ann", "v2"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "secret missing", db.SetUserSecret(ctx, "nobody", "x"), ErrNotFound)
	us, err := db.ListUsers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(us) != 2 || us[0].Name != "ann" || us[1].Name != "bob" {
		t.Fatalf("ListUsers = %+v", us)
	}
	if us[0].Secret != "v2" || us[0].Disabled || !us[1].Disabled || !us[0].Created.Equal(t0.Add(-time.Hour)) || len(us[0].Groups) != 0 {
		t.Errorf("ListUsers = %+v", us)
	}
}

func testPolicy(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	_, _, err := db.CurrentPolicy(ctx)
	wantErr(t, "no policy", err, ErrNotFound)
	wantErr(t, "first is not 2", db.PutPolicy(ctx, 2, []byte("p2")), ErrConflict)
	wantErr(t, "serial 0", db.PutPolicy(ctx, 0, []byte("p0")), ErrInvalid)
	if err := db.PutPolicy(ctx, 1, []byte("p1")); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "1 again", db.PutPolicy(ctx, 1, []byte("p1'")), ErrConflict)
	wantErr(t, "skip to 3", db.PutPolicy(ctx, 3, []byte("p3")), ErrConflict)
	if err := db.PutPolicy(ctx, 2, []byte("p2")); err != nil {
		t.Fatal(err)
	}
	s, doc, err := db.CurrentPolicy(ctx)
	if err != nil || s != 2 || string(doc) != "p2" {
		t.Fatalf("CurrentPolicy = %d, %q, %v", s, doc, err)
	}
	ps, err := db.ListPolicies(ctx)
	if err != nil || len(ps) != 2 || ps[0].Serial != 1 || string(ps[0].Doc) != "p1" || ps[1].Serial != 2 || ps[0].Created.IsZero() {
		t.Fatalf("ListPolicies = %+v, %v", ps, err)
	}
}

// Two admins (on two handles) race to store the next policy: one wins.
func testPolicyRace(t *testing.T, dsn string) {
	ctx := ctxT(t)
	a, b := open(t, dsn), open(t, dsn)
	if err := a.PutPolicy(ctx, 1, []byte("p1")); err != nil {
		t.Fatal(err)
	}
	var wins atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db := []*DB{a, b}[i%2]
			err := db.PutPolicy(ctx, 2, fmt.Appendf(nil, "p2 by %d", i))
			switch {
			case err == nil:
				wins.Add(1)
			case !errors.Is(err, ErrConflict):
				t.Errorf("PutPolicy: %v", err)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Fatalf("%d winners, want 1", wins.Load())
	}
}

func req(id, requester string) Request {
	return Request{ID: id, Doc: []byte("doc of " + id), Requester: requester, Action: "sql", Created: t0, Expires: t0.Add(time.Hour)}
}

func testRequests(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	r := req("aa01", "ann")
	if err := db.PutRequest(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := db.PutRequest(ctx, r); err != nil {
		t.Fatalf("same request again: %v", err)
	}
	other := r
	other.Doc = []byte("DROP TABLE orders")
	wantErr(t, "same ID, other bytes", db.PutRequest(ctx, other), ErrConflict)
	for _, id := range []string{"", "AA01", "aa0", "zz", strings.Repeat("a", 130)} {
		wantErr(t, "bad id "+id, db.PutRequest(ctx, req(id, "ann")), ErrInvalid)
	}
	approved := req("aa02", "ann")
	approved.Status = StatusApproved
	wantErr(t, "put approved", db.PutRequest(ctx, approved), ErrInvalid)

	got, err := db.GetRequest(ctx, "aa01")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != r.ID || !bytes.Equal(got.Doc, r.Doc) || got.Requester != "ann" || got.Action != "sql" || got.Status != StatusOpen ||
		!got.Created.Equal(t0) || !got.Expires.Equal(r.Expires) || !got.ConsumedAt.IsZero() || got.ConsumedBy != "" {
		t.Errorf("GetRequest = %+v", got)
	}
	_, err = db.GetRequest(ctx, "ffff")
	wantErr(t, "get missing", err, ErrNotFound)

	for i, who := range []string{"bob", "ann", "bob"} {
		x := req(fmt.Sprintf("bb%02d", i), who)
		x.Created = t0.Add(time.Duration(i+1) * time.Minute)
		x.Expires = time.Time{}
		if err := db.PutRequest(ctx, x); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.SetRequestStatus(ctx, "bb00", StatusOpen, StatusDenied); err != nil {
		t.Fatal(err)
	}
	ids := func(rs []Request, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		var s []string
		for _, r := range rs {
			s = append(s, r.ID)
		}
		return strings.Join(s, " ")
	}
	for _, tc := range []struct {
		f    RequestFilter
		want string
	}{
		{RequestFilter{}, "bb02 bb01 bb00 aa01"},
		{RequestFilter{Limit: 2}, "bb02 bb01"},
		{RequestFilter{Requester: "bob"}, "bb02 bb00"},
		{RequestFilter{Status: StatusOpen}, "bb02 bb01 aa01"},
		{RequestFilter{Status: StatusOpen, Requester: "bob", Limit: 5}, "bb02"},
		{RequestFilter{Status: StatusConsumed}, ""},
	} {
		if got := ids(db.ListRequests(ctx, tc.f)); got != tc.want {
			t.Errorf("ListRequests(%+v) = %q, want %q", tc.f, got, tc.want)
		}
	}
	if x, _ := db.GetRequest(ctx, "bb01"); !x.Expires.IsZero() {
		t.Errorf("zero Expires came back as %v", x.Expires)
	}

	// compare-and-set on the status
	wantErr(t, "wrong from", db.SetRequestStatus(ctx, "aa01", StatusApproved, StatusCancelled), ErrConflict)
	wantErr(t, "missing", db.SetRequestStatus(ctx, "ffff", StatusOpen, StatusApproved), ErrNotFound)
	if err := db.SetRequestStatus(ctx, "aa01", StatusOpen, StatusApproved); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "again", db.SetRequestStatus(ctx, "aa01", StatusOpen, StatusApproved), ErrConflict)
	// forbidden moves, whatever the current status
	for _, m := range [][2]Status{
		{StatusApproved, StatusConsumed}, {StatusOpen, StatusConsumed}, {StatusConsumed, StatusApproved},
		{StatusDenied, StatusApproved}, {StatusExpired, StatusOpen}, {StatusApproved, StatusOpen}, {"bogus", StatusOpen},
	} {
		wantErr(t, fmt.Sprintf("%s→%s", m[0], m[1]), db.SetRequestStatus(ctx, "aa01", m[0], m[1]), ErrInvalid)
	}
}

func testApprovals(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	if err := db.PutRequest(ctx, req("ab", "ann")); err != nil {
		t.Fatal(err)
	}
	ap := func(who string, at time.Time) Approval {
		return Approval{RequestID: "ab", Approver: who, Decision: "approve", Doc: []byte("sig by " + who), Created: at}
	}
	if err := db.AddApproval(ctx, ap("carl", t0.Add(2*time.Second))); err != nil {
		t.Fatal(err)
	}
	if err := db.AddApproval(ctx, ap("bob", t0.Add(time.Second))); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "twice", db.AddApproval(ctx, ap("bob", t0)), ErrExists)
	wantErr(t, "self", db.AddApproval(ctx, ap("ann", t0)), ErrSelfApproval)
	unknown := ap("bob", t0)
	unknown.RequestID = "cd"
	wantErr(t, "unknown request", db.AddApproval(ctx, unknown), ErrNotFound)
	wantErr(t, "no doc", db.AddApproval(ctx, Approval{RequestID: "ab", Approver: "dan", Decision: "approve"}), ErrInvalid)
	as, err := db.ListApprovals(ctx, "ab")
	if err != nil {
		t.Fatal(err)
	}
	if len(as) != 2 || as[0].Approver != "bob" || as[1].Approver != "carl" || string(as[0].Doc) != "sig by bob" ||
		as[0].Decision != "approve" || !as[0].Created.Equal(t0.Add(time.Second)) {
		t.Fatalf("ListApprovals = %+v", as)
	}
	if as, err := db.ListApprovals(ctx, "cd"); err != nil || len(as) != 0 {
		t.Fatalf("ListApprovals(unknown) = %v, %v", as, err)
	}
}

func approve(t *testing.T, db *DB, r Request) {
	t.Helper()
	ctx := ctxT(t)
	if err := db.PutRequest(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := db.SetRequestStatus(ctx, r.ID, StatusOpen, StatusApproved); err != nil {
		t.Fatal(err)
	}
}

func testConsume(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	at := t0.Add(time.Minute)
	if err := db.PutRequest(ctx, req("c1", "ann")); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "open", db.Consume(ctx, "c1", "gate-a", at), ErrConflict)
	wantErr(t, "unknown", db.Consume(ctx, "ffff", "gate-a", at), ErrNotFound)
	wantErr(t, "no by", db.Consume(ctx, "c1", "", at), ErrInvalid)
	if err := db.SetRequestStatus(ctx, "c1", StatusOpen, StatusApproved); err != nil {
		t.Fatal(err)
	}
	if err := db.Consume(ctx, "c1", "gate-a", at); err != nil {
		t.Fatal(err)
	}
	err := db.Consume(ctx, "c1", "gate-b", at)
	wantErr(t, "second", err, ErrConsumed)
	if !strings.Contains(err.Error(), "gate-a") {
		t.Errorf("ErrConsumed does not name the winner: %v", err)
	}
	r, err := db.GetRequest(ctx, "c1")
	if err != nil || r.Status != StatusConsumed || r.ConsumedBy != "gate-a" || !r.ConsumedAt.Equal(at) {
		t.Fatalf("after Consume: %+v, %v", r, err)
	}
	// a consumed request never becomes approved again
	wantErr(t, "reuse", db.SetRequestStatus(ctx, "c1", StatusConsumed, StatusApproved), ErrInvalid)
	wantErr(t, "cancel consumed", db.SetRequestStatus(ctx, "c1", StatusApproved, StatusCancelled), ErrConflict)

	// expiry: at or after Expires, the approved request cannot run
	approve(t, db, req("c2", "ann"))
	wantErr(t, "at expiry", db.Consume(ctx, "c2", "gate-a", t0.Add(time.Hour)), ErrExpired)
	if r, _ := db.GetRequest(ctx, "c2"); r.Status != StatusApproved {
		t.Fatalf("expired consume changed status to %s", r.Status)
	}
	if err := db.Consume(ctx, "c2", "gate-a", t0.Add(time.Hour-time.Microsecond)); err != nil {
		t.Fatalf("just before expiry: %v", err)
	}
	// denied and cancelled requests do not run
	if err := db.PutRequest(ctx, req("c3", "ann")); err != nil {
		t.Fatal(err)
	}
	if err := db.SetRequestStatus(ctx, "c3", StatusOpen, StatusDenied); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "denied", db.Consume(ctx, "c3", "gate-a", at), ErrConflict)
}

// Many goroutines on two handles (two gateways) race to run each approved
// request: exactly one wins, every other one gets ErrConsumed.
func testConsumeRace(t *testing.T, dsn string) {
	ctx := ctxT(t)
	a, b := open(t, dsn), open(t, dsn)
	const requests, racers = 5, 12
	for i := range requests {
		approve(t, a, req(fmt.Sprintf("ee%02d", i), "ann"))
	}
	for i := range requests {
		id := fmt.Sprintf("ee%02d", i)
		var wins atomic.Int32
		var winner atomic.Value
		var wg sync.WaitGroup
		start := make(chan struct{})
		for g := range racers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				db := []*DB{a, b}[g%2]
				by := fmt.Sprintf("gate-%d", g)
				err := db.Consume(ctx, id, by, t0.Add(time.Minute))
				switch {
				case err == nil:
					wins.Add(1)
					winner.Store(by)
				case !errors.Is(err, ErrConsumed):
					t.Errorf("Consume %s by %s: %v", id, by, err)
				}
			}()
		}
		close(start)
		wg.Wait()
		if wins.Load() != 1 {
			t.Fatalf("%s: %d winners, want exactly 1", id, wins.Load())
		}
		r, err := b.GetRequest(ctx, id)
		if err != nil || r.ConsumedBy != winner.Load().(string) {
			t.Fatalf("%s consumed by %q, winner %v (%v)", id, r.ConsumedBy, winner.Load(), err)
		}
	}
}

func testBreakGlass(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	s1 := BreakGlass{ID: "bg1", Person: "ann", Role: "dba", Reason: "outage", Started: t0, Ends: t0.Add(30 * time.Minute)}
	s2 := BreakGlass{ID: "bg2", Person: "ann", Role: "vault", Reason: "restore", Started: t0.Add(time.Minute), Ends: t0.Add(10 * time.Minute)}
	for _, s := range []BreakGlass{s1, s2} {
		if err := db.StartBreakGlass(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	wantErr(t, "dup", db.StartBreakGlass(ctx, s1), ErrExists)
	bad := s1
	bad.ID, bad.Ends = "bg3", bad.Started
	wantErr(t, "zero length", db.StartBreakGlass(ctx, bad), ErrInvalid)
	bad = s1
	bad.ID, bad.Reason = "bg3", ""
	wantErr(t, "no reason", db.StartBreakGlass(ctx, bad), ErrInvalid)
	bad = s1
	bad.ID, bad.Reviewed = "bg3", true
	wantErr(t, "born reviewed", db.StartBreakGlass(ctx, bad), ErrInvalid)

	active := func(person string, at time.Time) string {
		t.Helper()
		bs, err := db.ActiveBreakGlass(ctx, person, at)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, b := range bs {
			if !b.Active(at) {
				t.Errorf("%s returned as active at %v but Active says no", b.ID, at)
			}
			ids = append(ids, b.ID)
		}
		return strings.Join(ids, " ")
	}
	for _, tc := range []struct {
		person string
		at     time.Time
		want   string
	}{
		{"ann", t0.Add(-time.Second), ""},
		{"ann", t0, "bg1"},
		{"ann", t0.Add(5 * time.Minute), "bg1 bg2"},
		{"ann", t0.Add(10 * time.Minute), "bg1"},
		{"ann", t0.Add(30 * time.Minute), ""},
		{"bob", t0.Add(5 * time.Minute), ""},
	} {
		if got := active(tc.person, tc.at); got != tc.want {
			t.Errorf("active(%s, %v) = %q, want %q", tc.person, tc.at, got, tc.want)
		}
	}
	// ending early
	if err := db.EndBreakGlass(ctx, "bg1", t0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if got := active("ann", t0.Add(5*time.Minute)); got != "bg2" {
		t.Errorf("after ending bg1: active = %q", got)
	}
	wantErr(t, "end twice", db.EndBreakGlass(ctx, "bg1", t0.Add(3*time.Minute)), ErrConflict)
	wantErr(t, "end after its end", db.EndBreakGlass(ctx, "bg2", t0.Add(10*time.Minute)), ErrConflict)
	wantErr(t, "end unknown", db.EndBreakGlass(ctx, "nope", t0), ErrNotFound)
	b1, err := db.GetBreakGlass(ctx, "bg1")
	if err != nil || !b1.EndedEarly.Equal(t0.Add(2*time.Minute)) || b1.Reason != "outage" || !b1.Ends.Equal(s1.Ends) {
		t.Fatalf("GetBreakGlass = %+v, %v", b1, err)
	}

	// review: only with an approved (or consumed) request, once
	if err := db.PutRequest(ctx, req("7e", "bob")); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "review with open request", db.MarkBreakGlassReviewed(ctx, "bg1", "7e"), ErrConflict)
	wantErr(t, "review with unknown request", db.MarkBreakGlassReviewed(ctx, "bg1", "7f"), ErrNotFound)
	if err := db.SetRequestStatus(ctx, "7e", StatusOpen, StatusApproved); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "review unknown session", db.MarkBreakGlassReviewed(ctx, "nope", "7e"), ErrNotFound)
	if err := db.MarkBreakGlassReviewed(ctx, "bg1", "7e"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, "review twice", db.MarkBreakGlassReviewed(ctx, "bg1", "7e"), ErrConflict)
	all, err := db.ListBreakGlass(ctx, false)
	if err != nil || len(all) != 2 || all[0].ID != "bg1" || !all[0].Reviewed || all[0].ReviewRequestID != "7e" {
		t.Fatalf("ListBreakGlass(all) = %+v, %v", all, err)
	}
	open, err := db.ListBreakGlass(ctx, true)
	if err != nil || len(open) != 1 || open[0].ID != "bg2" || open[0].Reviewed {
		t.Fatalf("ListBreakGlass(unreviewed) = %+v, %v", open, err)
	}
}

// ledgerStore is internal/ledger's interface, copied: LedgerStore must
// keep matching it.
type ledgerStore interface {
	Append(ctx context.Context, seq uint64, rec []byte) (bool, error)
	Read(ctx context.Context, from uint64, fn func(seq uint64, rec []byte) error) error
	Last(ctx context.Context) (uint64, []byte, error)
}

var _ ledgerStore = (*LedgerStore)(nil)

// internal/ledger's BatchStore, matched structurally.
var _ interface {
	ledgerStore
	AppendBatch(ctx context.Context, first uint64, recs [][]byte) (bool, error)
} = (*LedgerStore)(nil)

// testLedgerBatch: a batch is stored whole, or not at all when one of its
// seqs is taken.
func testLedgerBatch(t *testing.T, dsn string) {
	ctx := ctxT(t)
	l := open(t, dsn).Ledger()
	batch := func(first uint64, n int, tag string) [][]byte {
		var recs [][]byte
		for i := range n {
			recs = append(recs, fmt.Appendf(nil, "%s %d", tag, first+uint64(i)))
		}
		return recs
	}
	// 300 records: more than one INSERT (ledgerInsertRows) in the batch.
	if ok, err := l.AppendBatch(ctx, 1, batch(1, 300, "rec")); !ok || err != nil {
		t.Fatalf("AppendBatch 1-300 = %v, %v", ok, err)
	}
	if ok, err := l.Append(ctx, 590, []byte("single 590")); !ok || err != nil {
		t.Fatalf("Append 590 = %v, %v", ok, err)
	}
	// 301-600 collides at 590, in its third INSERT: nothing of it is
	// stored, not even the two INSERTs before.
	if ok, err := l.AppendBatch(ctx, 301, batch(301, 300, "lost")); ok || err != nil {
		t.Fatalf("AppendBatch over 590 = %v, %v; want false, nil", ok, err)
	}
	var got []string
	if err := l.Read(ctx, 1, func(seq uint64, rec []byte) error {
		if want := fmt.Sprintf(" %d", seq); !strings.HasSuffix(string(rec), want) {
			t.Errorf("record %d reads %q", seq, rec)
		}
		got = append(got, string(rec))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 301 || got[0] != "rec 1" || got[299] != "rec 300" || got[300] != "single 590" {
		t.Fatalf("after a refused batch the ledger holds %d records: %q ... %q", len(got), got[0], got[len(got)-1])
	}
	if _, err := l.AppendBatch(ctx, 200, [][]byte{[]byte("x"), nil}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a batch with an empty record: %v", err)
	}
}

func testLedger(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	var l ledgerStore = db.Ledger()
	if seq, rec, err := l.Last(ctx); seq != 0 || rec != nil || err != nil {
		t.Fatalf("Last on empty = %d, %q, %v", seq, rec, err)
	}
	const n = ledgerPage*2 + 7 // crosses Read's pages
	for i := uint64(1); i <= n; i++ {
		if ok, err := l.Append(ctx, i, fmt.Appendf(nil, "rec %d", i)); !ok || err != nil {
			t.Fatalf("Append %d = %v, %v", i, ok, err)
		}
	}
	if ok, err := l.Append(ctx, 3, []byte("forged 3")); ok || err != nil {
		t.Fatalf("Append over 3 = %v, %v; want false, nil", ok, err)
	}
	if _, err := l.Append(ctx, 0, []byte("x")); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Append 0: %v", err)
	}
	seq, rec, err := l.Last(ctx)
	if err != nil || seq != n || string(rec) != fmt.Sprintf("rec %d", n) {
		t.Fatalf("Last = %d, %q, %v", seq, rec, err)
	}
	for _, from := range []uint64{0, 1, 3, ledgerPage, n, n + 1} {
		want := max(from, 1)
		err := l.Read(ctx, from, func(seq uint64, rec []byte) error {
			if seq != want || string(rec) != fmt.Sprintf("rec %d", seq) {
				return fmt.Errorf("got %d %q, want %d", seq, rec, want)
			}
			want++
			return nil
		})
		if err != nil || want != n+1 {
			t.Fatalf("Read from %d: %v (stopped before %d)", from, err, want)
		}
	}
	stop := errors.New("stop")
	calls := 0
	if err := l.Read(ctx, 1, func(uint64, []byte) error { calls++; return stop }); err != stop || calls != 1 {
		t.Fatalf("Read with failing fn = %v after %d calls", err, calls)
	}
	// fn may append while Read runs (Read holds no query open)
	err = l.Read(ctx, n, func(seq uint64, _ []byte) error {
		_, err := l.Append(ctx, seq+1000, []byte("during read"))
		return err
	})
	if err != nil {
		t.Fatalf("Append inside Read: %v", err)
	}
}

// Two handles, many goroutines, every one trying to write every seq:
// exactly one winner per seq, and the stored record is the winner's.
func testLedgerRace(t *testing.T, dsn string) {
	ctx := ctxT(t)
	a, b := open(t, dsn), open(t, dsn)
	const seqs, writers = 40, 8
	var mu sync.Mutex
	winners := map[uint64][]string{}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for g := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			l := []*DB{a, b}[g%2].Ledger()
			for s := uint64(1); s <= seqs; s++ {
				rec := fmt.Sprintf("seq %d by %d", s, g)
				ok, err := l.Append(ctx, s, []byte(rec))
				if err != nil {
					t.Errorf("Append %d by %d: %v", s, g, err)
					return
				}
				if ok {
					mu.Lock()
					winners[s] = append(winners[s], rec)
					mu.Unlock()
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	err := b.Ledger().Read(ctx, 1, func(seq uint64, rec []byte) error {
		if w := winners[seq]; len(w) != 1 || w[0] != string(rec) {
			return fmt.Errorf("seq %d: stored %q, winners %q", seq, rec, w)
		}
		delete(winners, seq)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(winners) != 0 {
		t.Fatalf("winners for seqs not stored: %v", winners)
	}
}

// statementsJSON is a record like the gate's statement groups: the same
// few statements with other literals.
func statementsJSON(n int) []byte {
	b := []byte(`{"statements":[`)
	for i := range n {
		if i > 0 {
			b = append(b, ',')
		}
		b = fmt.Appendf(b, `{"class":"write","decision":"allow","sql":"UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;","us":%d}`,
			(i*7919)%10000-5000, (i*104729)%1000000, i*173)
	}
	return append(b, "]}"...)
}

// testLedgerCodec: records come back byte for byte whatever the codec
// chosen for them; a large repetitive one is stored compressed, a small
// or incompressible one plain; a damaged row is an error naming it, not
// a record.
func testLedgerCodec(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	l := db.Ledger()
	random := make([]byte, 4096)
	rand.NewChaCha8([32]byte{1}).Read(random)
	recs := []struct {
		rec   []byte
		codec ledgerCodec
	}{
		{statementsJSON(300), codecZstd},
		{[]byte(`{"kind":"session.open","actor":"ann"}`), codecPlain},
		{random, codecPlain},
		{bytes.Repeat([]byte("a"), ledgerCompressMin), codecZstd},
		{[]byte(strings.Repeat("b", ledgerCompressMin-1)), codecPlain},
	}
	if ok, err := l.AppendBatch(ctx, 1, [][]byte{recs[0].rec, recs[1].rec}); !ok || err != nil {
		t.Fatalf("AppendBatch = %v, %v", ok, err)
	}
	for i, r := range recs[2:] {
		if ok, err := l.Append(ctx, uint64(i+3), r.rec); !ok || err != nil {
			t.Fatalf("Append %d = %v, %v", i+3, ok, err)
		}
	}
	stored := func(seq int) (ledgerCodec, int) {
		t.Helper()
		var c ledgerCodec
		var n int
		if err := db.sql.QueryRowContext(ctx, "SELECT codec, length(rec) FROM ledger WHERE seq = $1", seq).Scan(&c, &n); err != nil {
			t.Fatal(err)
		}
		return c, n
	}
	for i, r := range recs {
		seq := i + 1
		if c, n := stored(seq); c != r.codec || c == codecZstd && n >= len(r.rec)/3 || c == codecPlain && n != len(r.rec) {
			t.Errorf("record %d (%d bytes) stored with codec %d in %d bytes; want codec %d", seq, len(r.rec), c, n, r.codec)
		}
	}
	read := func() error {
		want := uint64(1)
		return l.Read(ctx, 1, func(seq uint64, rec []byte) error {
			if seq != want || !bytes.Equal(rec, recs[seq-1].rec) {
				return fmt.Errorf("record %d reads back %d bytes, not the %d appended", seq, len(rec), len(recs[seq-1].rec))
			}
			want++
			return nil
		})
	}
	if err := read(); err != nil {
		t.Fatal(err)
	}
	if seq, rec, err := l.Last(ctx); seq != 5 || !bytes.Equal(rec, recs[4].rec) || err != nil {
		t.Fatalf("Last = %d, %d bytes, %v", seq, len(rec), err)
	}
	if _, err := l.Append(ctx, 9, make([]byte, maxLedgerRecord+1)); !errors.Is(err, ErrInvalid) {
		t.Errorf("Append of %d bytes: %v; want ErrInvalid", maxLedgerRecord+1, err)
	}

	// One byte of the compressed record flipped: zstd's checksum (or its
	// framing) catches it, and Read hands the row on as stored, which is
	// not JSON, and goes on to the next; so does Last with a codec from
	// the future.
	var z []byte
	if err := db.sql.QueryRowContext(ctx, "SELECT rec FROM ledger WHERE seq = 1").Scan(&z); err != nil {
		t.Fatal(err)
	}
	z[len(z)/2] ^= 0x20
	if _, err := db.sql.ExecContext(ctx, "UPDATE ledger SET rec = $1 WHERE seq = 1", z); err != nil {
		t.Fatal(err)
	}
	if _, err := db.sql.ExecContext(ctx, "UPDATE ledger SET codec = 7 WHERE seq = 4"); err != nil {
		t.Fatal(err)
	}
	var got [][]byte
	if err := l.Read(ctx, 1, func(_ uint64, rec []byte) error { got = append(got, rec); return nil }); err != nil {
		t.Fatalf("Read over damaged rows: %v", err)
	}
	if len(got) != 5 || !bytes.Equal(got[0], z) || !bytes.Equal(got[1], recs[1].rec) || !bytes.Equal(got[2], recs[2].rec) || !bytes.Equal(got[4], recs[4].rec) {
		t.Fatalf("Read over damaged rows handed on %d records", len(got))
	}
	if json.Valid(got[0]) || json.Valid(got[3]) || bytes.Equal(got[3], recs[3].rec) {
		t.Error("a damaged row reads as JSON")
	}
	if _, err := db.sql.ExecContext(ctx, "DELETE FROM ledger WHERE seq = 5"); err != nil {
		t.Fatal(err)
	}
	if seq, rec, err := l.Last(ctx); seq != 4 || err != nil || bytes.Equal(rec, recs[3].rec) {
		t.Fatalf("Last with an unknown codec = %d, %q, %v", seq, rec, err)
	}
}

// testLedgerPlainRows: a ledger written before migration 3 (no codec
// column) reads back the same after it, and takes compressed records
// after its plain ones.
func testLedgerPlainRows(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	// back to version 2, with a record as version 2 stored it
	old := statementsJSON(50)
	for _, q := range []string{
		"DELETE FROM schema_version WHERE version = 3",
		"ALTER TABLE ledger DROP COLUMN codec",
	} {
		if _, err := db.sql.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if _, err := db.sql.ExecContext(ctx, "INSERT INTO ledger (seq, rec) VALUES (1, $1)", old); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db = open(t, dsn)
	if v, err := db.version(ctx); err != nil || v != 3 {
		t.Fatalf("version after reopen = %d, %v", v, err)
	}
	l := db.Ledger()
	next := statementsJSON(60)
	if ok, err := l.Append(ctx, 2, next); !ok || err != nil {
		t.Fatalf("Append 2 = %v, %v", ok, err)
	}
	var got [][]byte
	if err := l.Read(ctx, 1, func(_ uint64, rec []byte) error { got = append(got, rec); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !bytes.Equal(got[0], old) || !bytes.Equal(got[1], next) {
		t.Fatalf("read back %d records, first equal %v", len(got), len(got) > 0 && bytes.Equal(got[0], old))
	}
}
