package incident

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/state"
	"github.com/dualkey/dualkey/internal/tripwire"
)

var commit = time.Date(2026, 12, 1, 13, 0, 0, 123456000, time.UTC)

// A commit that deleted many rows of two tables and updated many of one:
// two incidents (one per kind), rows summed, objects named once.
func TestFromDetection(t *testing.T) {
	node := func(rel uint32) tripwire.RelFileNode { return tripwire.RelFileNode{Spc: 1663, DB: 16384, Rel: rel} }
	ev := func(k tripwire.Kind, rels ...tripwire.Relation) tripwire.Event {
		return tripwire.Event{Kind: k, LSN: 0x3000A28, CommitLSN: 0x3000A28, XID: 771, Time: commit, DB: 16384, DBName: "app", Relations: rels}
	}
	d := pgagent.Detection{Timeline: 1, Received: commit.Add(time.Millisecond), Detected: commit.Add(2 * time.Millisecond),
		Events: []tripwire.Event{
			ev(tripwire.MassDelete, tripwire.Relation{Node: node(1), Name: "public.a", Deletes: 12000}),
			ev(tripwire.MassDelete, tripwire.Relation{Node: node(2), Name: "public.b", Deletes: 30000}),
			ev(tripwire.MassUpdate, tripwire.Relation{Node: node(1), Name: "public.a", Updates: 10000}),
		},
		Objects: [][]string{{"public.a"}, {"public.b"}, {"public.a"}}}
	ins := FromDetection(d)
	if len(ins) != 2 {
		t.Fatalf("%d incidents, want 2: %+v", len(ins), ins)
	}
	del, upd := ins[0], ins[1]
	if del.ID != "1.3000A28.mass-delete" || del.Rows != 42000 || len(del.Objects) != 2 || del.Objects[1] != "public.b" ||
		del.XID != 771 || del.CommitLSN != "0/3000A28" || del.RestoreLSN != "0/3000A28" || del.Database != "app" || del.DelayMS != 2 {
		t.Errorf("mass delete: %+v", del)
	}
	if upd.ID != "1.3000A28.mass-update" || upd.Rows != 10000 || len(upd.Objects) != 1 {
		t.Errorf("mass update: %+v", upd)
	}
	if l, err := del.RestorePoint(); err != nil || l != 0x3000A28 {
		t.Errorf("RestorePoint = %v, %v", l, err)
	}
	for _, bad := range []string{"", "x", "1.3000A28", "one.3000A28.truncate", "1.nothex.truncate"} {
		if err := ParseID(bad); err == nil {
			t.Errorf("ParseID(%q) accepted", bad)
		}
	}
	if err := ParseID(del.ID); err != nil {
		t.Error(err)
	}
}

// Record stores, appends one alert to the ledger, posts the webhook once;
// the same incident decoded again records nothing more.
func TestRecord(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	_, key, _ := ed25519.GenerateKey(nil)
	led, err := ledger.Open(ctx, db.Ledger(), nil, key, ledger.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var posts []quorum.Event
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var ev quorum.Event
		if err := json.Unmarshal(b, &ev); err != nil {
			t.Error(err)
		}
		mu.Lock()
		posts = append(posts, ev)
		mu.Unlock()
	}))
	defer srv.Close()
	hook, err := quorum.NewWebhook(srv.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec := &Recorder{DB: db, Ledger: led, Notifier: hook}
	d := pgagent.Detection{Timeline: 1, Detected: commit.Add(3 * time.Millisecond), Objects: [][]string{{"public.orders"}},
		Events: []tripwire.Event{{Kind: tripwire.RelationsDropped, LSN: 0x5000028, CommitLSN: 0x5000028, XID: 900, Time: commit, DB: 16384, DBName: "shop",
			Relations: []tripwire.Relation{{Node: tripwire.RelFileNode{Spc: 1663, DB: 16384, Rel: 16390}, Name: "public.orders"}}}}}
	rec.Detect(ctx, d)
	rec.Detect(ctx, d) // an agent restart decoding the same WAL
	if err := hook.Close(ctx); err != nil {
		t.Fatal(err)
	}
	ins, err := List(ctx, db)
	if err != nil || len(ins) != 1 {
		t.Fatalf("List: %+v, %v", ins, err)
	}
	in, err := Get(ctx, db, "1.5000028.relations-dropped")
	if err != nil || in.Objects[0] != "public.orders" || in.XID != 900 || !in.CommitTime.Equal(commit) || in.Database != "shop" {
		t.Fatalf("Get: %+v, %v", in, err)
	}
	var alerts []ledger.Record
	if err := ledger.Read(ctx, db.Ledger(), 1, func(r ledger.Record) error {
		if r.Kind == ledger.KindAlert {
			alerts = append(alerts, r)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(alerts) != 1 {
		t.Fatalf("%d alert records in the ledger, want 1", len(alerts))
	}
	var inLedger Incident
	if err := json.Unmarshal(alerts[0].Data, &inLedger); err != nil || inLedger.ID != in.ID {
		t.Errorf("ledger record %s: %v", alerts[0].Data, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(posts) != 1 || posts[0].Type != quorum.EventIncident || len(posts[0].Incident) == 0 {
		t.Fatalf("webhook posts: %+v", posts)
	}
	var inHook Incident
	if err := json.Unmarshal(posts[0].Incident, &inHook); err != nil || inHook.ID != in.ID || inHook.RestoreLSN != "0/5000028" {
		t.Errorf("webhook incident %s: %v", posts[0].Incident, err)
	}
	led.Close(ctx)
}

func TestGetUnknown(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := Get(ctx, db, "1.ABC.truncate"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown incident: %v, want ErrNotFound", err)
	}
	if _, err := Get(ctx, db, "nonsense"); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("malformed ID: %v", err)
	}
}
