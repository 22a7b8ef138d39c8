package state

import (
	"bytes"
	"sync"
	"testing"
	"time"
)

func testIncidents(t *testing.T, dsn string) {
	ctx := ctxT(t)
	db := open(t, dsn)
	if ins, err := db.ListIncidents(ctx); err != nil || len(ins) != 0 {
		t.Fatalf("empty store: %v, %v", ins, err)
	}
	a := Incident{ID: "1.3000A28.truncate", Kind: "truncate", Timeline: 1, CommitLSN: 0x3000A28, XID: 4000000000,
		Database: "app", Committed: t0, Detected: t0.Add(40 * time.Millisecond), Doc: []byte(`{"a":1}`)}
	ok, err := db.PutIncident(ctx, a)
	if err != nil || !ok {
		t.Fatalf("put: %v, %v", ok, err)
	}
	got, err := db.GetIncident(ctx, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != a.ID || got.Kind != a.Kind || got.Timeline != 1 || got.CommitLSN != a.CommitLSN || got.XID != a.XID ||
		got.Database != "app" || !got.Committed.Equal(a.Committed) || !got.Detected.Equal(a.Detected) || !bytes.Equal(got.Doc, a.Doc) {
		t.Fatalf("got %+v, want %+v", got, a)
	}

	// The same commit and kind decoded again (an agent restart): nothing
	// stored, whatever ID or detection time the second decoding has.
	again := a
	again.ID, again.Detected = "other-id", t0.Add(time.Hour)
	if ok, err := db.PutIncident(ctx, again); err != nil || ok {
		t.Fatalf("duplicate (timeline, lsn, kind): stored %v, %v", ok, err)
	}
	again = a
	again.CommitLSN++
	if ok, err := db.PutIncident(ctx, again); err != nil || ok {
		t.Fatalf("duplicate id: stored %v, %v", ok, err)
	}
	// Same LSN, another kind or another timeline: distinct incidents.
	b := a
	b.ID, b.Kind, b.Detected = "1.3000A28.mass-delete", "mass-delete", t0.Add(time.Second)
	c := a
	c.ID, c.Timeline, c.Detected = "2.3000A28.truncate", 2, t0.Add(2*time.Second)
	for _, in := range []Incident{c, b} {
		if ok, err := db.PutIncident(ctx, in); err != nil || !ok {
			t.Fatalf("put %s: %v, %v", in.ID, ok, err)
		}
	}
	ins, err := db.ListIncidents(ctx)
	if err != nil || len(ins) != 3 || ins[0].ID != a.ID || ins[1].ID != b.ID || ins[2].ID != c.ID {
		t.Fatalf("list: %+v, %v", ins, err)
	}

	_, err = db.GetIncident(ctx, "no-such-incident")
	wantErr(t, "get unknown", err, ErrNotFound)
	for _, bad := range []Incident{
		{Kind: "truncate", Timeline: 1, CommitLSN: 1, Detected: t0, Doc: []byte("{}")},
		{ID: "x", Timeline: 1, CommitLSN: 1, Detected: t0, Doc: []byte("{}")},
		{ID: "x", Kind: "truncate", CommitLSN: 1, Detected: t0, Doc: []byte("{}")},
		{ID: "x", Kind: "truncate", Timeline: 1, Detected: t0, Doc: []byte("{}")},
		{ID: "x", Kind: "truncate", Timeline: 1, CommitLSN: 1, Doc: []byte("{}")},
		{ID: "x", Kind: "truncate", Timeline: 1, CommitLSN: 1, Detected: t0},
	} {
		_, err := db.PutIncident(ctx, bad)
		wantErr(t, "put invalid", err, ErrInvalid)
	}

	// Two agents (two handles) racing to store one incident: one wins.
	db2 := open(t, dsn)
	d := a
	d.ID, d.CommitLSN = "1.5000000.relations-dropped", 0x5000000
	var wg sync.WaitGroup
	var mu sync.Mutex
	won := 0
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := db
			if i%2 == 1 {
				h = db2
			}
			ok, err := h.PutIncident(ctx, d)
			if err != nil {
				t.Error(err)
			}
			if ok {
				mu.Lock()
				won++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if won != 1 {
		t.Fatalf("%d writers stored the same incident, want 1", won)
	}
}
