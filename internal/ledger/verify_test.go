package ledger

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"strings"
	"testing"
)

// Each way of covering one's tracks is caught and named at the right seq.
// The ledger under attack has 45 entries and a checkpoint every 10 records:
// checkpoints at 11, 22, 33, 44 and 50, mirrored as five objects.
func TestVerifyDetectsTampering(t *testing.T) {
	type want struct {
		kind string
		seq  uint64
	}
	tests := []struct {
		name   string
		tamper func(t *testing.T, st *memStore, mir *memMirror)
		want   []want // each must be reported; others may be too
		exact  bool   // want is the complete list
	}{
		{"edit data", func(t *testing.T, st *memStore, mir *memMirror) {
			r := st.record(t, 15)
			r.Data = json.RawMessage(`{"sql":"SELECT 1"}`)
			st.set(15, r.Encode())
		}, []want{{ProblemEdited, 15}, {ProblemMirror, 15}}, true},

		{"edit actor and re-hash the record", func(t *testing.T, st *memStore, mir *memMirror) {
			r := st.record(t, 15)
			r.Actor = "someone else"
			r.Hash = r.ComputeHash()
			st.set(15, r.Encode())
		}, []want{{ProblemReplaced, 15}, {ProblemMirror, 15}}, true},

		{"edit and re-hash the whole chain after it", func(t *testing.T, st *memStore, mir *memMirror) {
			r := st.record(t, 15)
			r.Data = json.RawMessage(`{"sql":"SELECT 1"}`)
			st.set(15, r.Encode())
			st.rehash(t, 15)
		}, []want{{ProblemMirror, 15}, {ProblemMirror, 16}, {ProblemCheckpoint, 22}, {ProblemCheckpoint, 33}, {ProblemCheckpoint, 44}, {ProblemCheckpoint, 50}}, true},

		{"delete a middle record", func(t *testing.T, st *memStore, mir *memMirror) {
			st.del(15)
		}, []want{{ProblemDeleted, 15}}, true},

		{"delete a middle record and re-link", func(t *testing.T, st *memStore, mir *memMirror) {
			st.del(15)
			st.rehash(t, 16)
		}, []want{{ProblemDeleted, 15}, {ProblemCheckpoint, 22}}, false},

		{"delete the last record", func(t *testing.T, st *memStore, mir *memMirror) {
			st.del(50)
		}, []want{{ProblemTruncated, 50}}, true},

		{"truncate the last span and a half", func(t *testing.T, st *memStore, mir *memMirror) {
			for s := uint64(40); s <= 50; s++ {
				st.del(s)
			}
		}, []want{{ProblemTruncated, 40}}, true},

		{"swap two rows", func(t *testing.T, st *memStore, mir *memMirror) {
			a, _ := st.get(15)
			b, _ := st.get(16)
			st.set(15, b)
			st.set(16, a)
		}, []want{{ProblemReordered, 15}, {ProblemReordered, 16}}, true},

		{"swap two records, renumber and re-hash", func(t *testing.T, st *memStore, mir *memMirror) {
			a, b := st.record(t, 15), st.record(t, 16)
			a.Seq, b.Seq = 16, 15
			st.set(15, b.Encode())
			st.set(16, a.Encode())
			st.rehash(t, 15)
		}, []want{{ProblemMirror, 15}, {ProblemMirror, 16}, {ProblemCheckpoint, 22}}, false},

		{"insert a forged record, shifting the rest", func(t *testing.T, st *memStore, mir *memMirror) {
			for s := uint64(50); s >= 15; s-- {
				b, _ := st.get(s)
				st.set(s+1, b)
			}
			f := forged(t, st, 15)
			st.set(15, f.Encode())
		}, []want{{ProblemInserted, 15}, {ProblemReordered, 16}, {ProblemReordered, 51}}, false},

		{"replace a record with a forged one", func(t *testing.T, st *memStore, mir *memMirror) {
			f := forged(t, st, 15)
			st.set(15, f.Encode())
		}, []want{{ProblemReplaced, 15}, {ProblemMirror, 15}}, true},

		{"forge a checkpoint signature", func(t *testing.T, st *memStore, mir *memMirror) {
			r := st.record(t, 22)
			r.Data = signCheckpoint(testKey(2), 21, r.Prev)
			r.Hash = r.ComputeHash()
			st.set(22, r.Encode())
			st.rehash(t, 23)
		}, []want{{ProblemCheckpoint, 22}}, false},

		{"checkpoint moved to cover another record", func(t *testing.T, st *memStore, mir *memMirror) {
			r := st.record(t, 22)
			r.Data = st.record(t, 11).Data // a valid signature, for seq 10
			r.Hash = r.ComputeHash()
			st.set(22, r.Encode())
			st.rehash(t, 23)
		}, []want{{ProblemCheckpoint, 22}}, false},

		{"garbage in a row", func(t *testing.T, st *memStore, mir *memMirror) {
			st.set(15, []byte(`{"seq":15}`))
		}, []want{{ProblemMalformed, 15}}, true},

		{"mirror object edited", func(t *testing.T, st *memStore, mir *memMirror) {
			name := ObjectName(12, 22)
			mir.objs[name] = []byte(strings.Replace(string(mir.objs[name]), `"actor":"user1"`, `"actor":"user2"`, 1))
		}, []want{{ProblemMirrorBad, 12}}, true},

		{"mirror object edited and re-hashed", func(t *testing.T, st *memStore, mir *memMirror) {
			name := ObjectName(12, 22)
			recs, _, err := ParseObject(name, mir.objs[name])
			if err != nil {
				t.Fatal(err)
			}
			var out []byte
			var prev = recs[0].Prev
			for _, r := range recs {
				if r.Seq == 15 {
					r.Actor = "nobody"
				}
				r.Prev = prev
				r.Hash = r.ComputeHash()
				prev = r.Hash
				out = append(append(out, r.Encode()...), '\n')
			}
			mir.objs[name] = out
		}, []want{{ProblemMirrorBad, 22}}, true},

		{"mirror object with a bad name", func(t *testing.T, st *memStore, mir *memMirror) {
			mir.objs["ledger/junk"] = []byte("x")
		}, []want{{ProblemMirrorBad, 0}}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, mir := newMemStore(), newMemMirror()
			build(t, st, mir, 10, 45)
			tt.tamper(t, st, mir)
			rep := verify(t, st, mir)
			if rep.OK() {
				t.Fatal("tampering not detected")
			}
			got := map[want]bool{}
			for _, p := range rep.Problems {
				got[want{p.Kind, p.Seq}] = true
			}
			for _, w := range tt.want {
				if !got[w] {
					t.Errorf("missing %s at seq %d", w.kind, w.seq)
				}
			}
			if tt.exact && len(rep.Problems) != len(tt.want) {
				t.Errorf("%d problems, want %d", len(rep.Problems), len(tt.want))
			}
			if t.Failed() {
				for _, p := range rep.Problems {
					t.Log(p)
				}
			}
		})
	}
}

// forged returns a record seq a writer without the ledger key could make:
// well-formed, linked to seq-1, with a valid hash of its own.
func forged(t *testing.T, st *memStore, seq uint64) Record {
	t.Helper()
	r := st.record(t, seq)
	r.Actor = "nobody"
	r.Data = json.RawMessage(`{"sql":"SELECT 1"}`)
	r.Prev = st.record(t, seq-1).Hash
	r.Hash = r.ComputeHash()
	return r
}

// What Verify cannot see: without the ledger key an attacker can still
// append well-formed records after the last checkpoint, and without a
// mirror can drop records after it. Both show as an unsigned tail
// (LastSeq > SignedSeq+1), which the report exposes.
func TestVerifyLimits(t *testing.T) {
	st := newMemStore()
	build(t, st, nil, 10, 45)
	last := st.record(t, 50)
	r := Record{Seq: 51, Time: last.Time, Kind: KindApproval, Actor: "mallory", Prev: last.Hash}
	r.Hash = r.ComputeHash()
	st.set(51, r.Encode())
	rep := verify(t, st, nil)
	if !rep.OK() || rep.LastSeq != 51 || rep.SignedSeq != 49 {
		t.Fatalf("report %+v", rep)
	}
	st.del(51)
	st.del(50)
	if rep := verify(t, st, nil); !rep.OK() || rep.LastSeq != 49 || rep.SignedSeq != 43 {
		t.Fatalf("report %+v", rep)
	}
}

func TestVerifyWrongKey(t *testing.T) {
	st, mir := newMemStore(), newMemMirror()
	build(t, st, mir, 10, 20)
	rep, err := Verify(context.Background(), st, mir, testKey(9).Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Checkpoints != 0 {
		t.Fatalf("verified with another key: %+v", rep)
	}
}
