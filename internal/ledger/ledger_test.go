package ledger

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite testdata/records.jsonl")

// entries returns n entries of assorted kinds.
func entries(n int) []Entry {
	kinds := []string{KindSessionOpen, KindStatement, KindRequest, KindApproval, KindDenial, KindDecision, KindBreakGlass, KindReview, KindVault, KindAlert, KindSessionClose}
	out := make([]Entry, n)
	for i := range out {
		out[i] = Entry{Kind: kinds[i%len(kinds)], Actor: fmt.Sprintf("user%d", i%3), Data: map[string]any{"i": i, "sql": "DELETE FROM t WHERE id = <1>"}}
	}
	return out
}

// build appends n entries with a checkpoint every `every` records and closes
// the ledger.
func build(t *testing.T, st Store, mir Mirror, every, n int) {
	t.Helper()
	ctx := context.Background()
	l, err := Open(ctx, st, mir, testKey(1), testOptions(every))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries(n) {
		if _, err := l.Append(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

func verify(t *testing.T, st Store, mir Mirror) *Report {
	t.Helper()
	rep, err := Verify(context.Background(), st, mir, testKey(1).Public().(ed25519.PublicKey))
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// A deterministic ledger (fixed key and clock) reproduces the committed
// records byte for byte: the format, hashing and signatures are pinned.
// The file also seeds FuzzParseRecord.
func TestGoldenLedger(t *testing.T) {
	st := newMemStore()
	build(t, st, nil, 4, 9)
	var buf bytes.Buffer
	if err := st.Read(context.Background(), 1, func(seq uint64, b []byte) error {
		buf.Write(b)
		buf.WriteByte('\n')
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile("testdata/records.jsonl", buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile("testdata/records.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), want) {
		t.Errorf("records differ from testdata/records.jsonl (run with -update if the format changed on purpose):\n%s", buf.Bytes())
	}
}

func TestCleanChainVerifies(t *testing.T) {
	st, mir := newMemStore(), newMemMirror()
	build(t, st, mir, 10, 45)
	rep := verify(t, st, mir)
	if !rep.OK() {
		t.Fatalf("clean ledger: %v", rep.Problems)
	}
	// 45 entries: checkpoints at 11, 22, 33, 44 and the final one at 50.
	if rep.Records != 50 || rep.LastSeq != 50 || rep.Checkpoints != 5 || rep.SignedSeq != 49 || rep.MirroredSeq != 50 {
		t.Errorf("report %+v", rep)
	}
	want := []string{ObjectName(1, 11), ObjectName(12, 22), ObjectName(23, 33), ObjectName(34, 44), ObjectName(45, 50)}
	if got := mir.names(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("mirror objects %v, want %v", got, want)
	}
	// Reopening continues the chain.
	ctx := context.Background()
	l, err := Open(ctx, st, mir, testKey(1), testOptions(10))
	if err != nil {
		t.Fatal(err)
	}
	r, err := l.Append(ctx, Entry{Kind: KindAlert, Data: map[string]string{"what": "drop"}})
	if err != nil || r.Seq != 51 {
		t.Fatalf("append after reopen: %+v, %v", r, err)
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if rep := verify(t, st, mir); !rep.OK() || rep.LastSeq != 52 || rep.MirroredSeq != 52 {
		t.Fatalf("after reopen: %+v", rep)
	}
	if err := l.Close(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
	if _, err := l.Append(ctx, Entry{Kind: KindAlert}); !errors.Is(err, ErrClosed) {
		t.Errorf("Append after Close: %v", err)
	}
}

func TestAppendRefuses(t *testing.T) {
	ctx := context.Background()
	l, err := Open(ctx, newMemStore(), nil, testKey(1), testOptions(0))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close(ctx)
	for _, e := range []Entry{
		{Kind: KindCheckpoint},
		{Kind: ""},
		{Kind: "x", Actor: "\xff"},
		{Kind: "x", Data: func() {}},
		{Kind: "x", Data: string(make([]byte, MaxRecordSize))},
	} {
		if _, err := l.Append(ctx, e); !errors.Is(err, ErrInvalid) {
			t.Errorf("Append(%.40v) = %v, want ErrInvalid", e, err)
		}
	}
	if _, err := Open(ctx, newMemStore(), nil, nil, Options{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Open without a key: %v", err)
	}
}

func TestOpenChecksTip(t *testing.T) {
	st := newMemStore()
	build(t, st, nil, 10, 5)
	r := st.record(t, 6)
	r.Actor = "mallory"
	st.set(6, r.Encode())
	if _, err := Open(context.Background(), st, nil, testKey(1), testOptions(10)); !errors.Is(err, ErrTampered) {
		t.Fatalf("Open over an edited tip: %v", err)
	}
}

// Two gateways share one store: many goroutines on two Ledgers append at
// once, and the result is one chain without gaps.
func TestTwoLedgersOneStore(t *testing.T) {
	ctx := context.Background()
	st, mir := newMemStore(), newMemMirror()
	st.yield = true
	var ls [2]*Ledger
	for i := range ls {
		l, err := Open(ctx, st, mir, testKey(1), testOptions(16))
		if err != nil {
			t.Fatal(err)
		}
		ls[i] = l
	}
	const workers, each = 8, 60
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[uint64]bool{}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				r, err := ls[(w+i)%2].Append(ctx, Entry{Kind: KindStatement, Actor: fmt.Sprint("w", w), Data: i})
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if seen[r.Seq] {
					t.Errorf("seq %d returned twice", r.Seq)
				}
				seen[r.Seq] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, l := range ls {
		if err := l.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
	rep := verify(t, st, mir)
	if !rep.OK() {
		t.Fatalf("problems: %v", rep.Problems)
	}
	var stmts, cps uint64
	if err := Read(ctx, st, 1, func(r Record) error {
		if r.IsCheckpoint() {
			cps++
		} else {
			stmts++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if stmts != workers*each || cps != rep.Checkpoints || rep.LastSeq != rep.Records || rep.MirroredSeq != rep.LastSeq {
		t.Errorf("%d statements, %d checkpoints; report %+v", stmts, cps, rep)
	}
	// Checkpoints are not doubled by the race: at most one per 16 records
	// plus the two final ones.
	if max := uint64(workers*each)/16 + 2; cps > max {
		t.Errorf("%d checkpoints, want at most %d", cps, max)
	}
	if n := mir.clashes.Load(); n != 0 {
		t.Errorf("%d mirror objects written twice with different bytes", n)
	}
}

// A mirror outage loses nothing: the spans are mirrored once it is back,
// by the same Ledger or by the next one opened on the store.
func TestMirrorDownThenUp(t *testing.T) {
	ctx := context.Background()
	st, mir := newMemStore(), newMemMirror()
	mir.down.Store(true)
	l, err := Open(ctx, st, mir, testKey(1), testOptions(10))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries(35) {
		if _, err := l.Append(ctx, e); err != nil {
			t.Fatalf("Append while the mirror is down: %v", err)
		}
	}
	if err := l.Checkpoint(ctx); !errors.Is(err, errDown) {
		t.Fatalf("Checkpoint with the mirror down: %v", err)
	}
	mir.down.Store(false)
	if err := l.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	if rep := verify(t, st, mir); !rep.OK() || rep.MirroredSeq != rep.LastSeq {
		t.Fatalf("after the mirror came back: %+v", rep)
	}

	// Down again, across a restart.
	mir.down.Store(true)
	for _, e := range entries(25) {
		if _, err := l.Append(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(ctx); !errors.Is(err, errDown) {
		t.Fatalf("Close with the mirror down: %v", err)
	}
	mir.down.Store(false)
	l, err = Open(ctx, st, mir, testKey(1), testOptions(10))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	rep := verify(t, st, mir)
	if !rep.OK() || rep.MirroredSeq != rep.LastSeq || rep.Records < 60 {
		t.Fatalf("after restart: %+v", rep)
	}
}

// A hung vault does not hold up Append: mirroring runs in the background.
func TestAppendNotBlockedByMirror(t *testing.T) {
	ctx := context.Background()
	st, mir := newMemStore(), newMemMirror()
	mir.block = make(chan struct{})
	l, err := Open(ctx, st, mir, testKey(1), testOptions(5))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for _, e := range entries(50) {
			if _, err := l.Append(ctx, e); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Append blocked behind a hung mirror")
	}
	close(mir.block)
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if rep := verify(t, st, mir); !rep.OK() || rep.MirroredSeq != rep.LastSeq {
		t.Fatalf("%+v", rep)
	}
}

// The ledger does not copy a tampered store into the mirror.
func TestMirrorRefusesBrokenChain(t *testing.T) {
	ctx := context.Background()
	st, mir := newMemStore(), newMemMirror()
	l, err := Open(ctx, st, mir, testKey(1), testOptions(10))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries(5) {
		if _, err := l.Append(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	r := st.record(t, 3)
	r.Actor = "mallory"
	r.Hash = r.ComputeHash()
	st.set(3, r.Encode())
	if err := l.Checkpoint(ctx); !errors.Is(err, ErrTampered) {
		t.Fatalf("Checkpoint over a tampered span: %v", err)
	}
	if n := len(mir.names()); n != 0 {
		t.Errorf("%d objects mirrored", n)
	}
	_ = l.Close(ctx)
}

func TestRead(t *testing.T) {
	st := newMemStore()
	build(t, st, nil, 10, 20)
	var got []uint64
	if err := Read(context.Background(), st, 18, func(r Record) error {
		got = append(got, r.Seq)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "[18 19 20 21 22]" {
		t.Errorf("Read from 18: %v", got)
	}
	st.set(19, []byte("junk"))
	if err := Read(context.Background(), st, 1, func(Record) error { return nil }); !errors.Is(err, ErrFormat) {
		t.Errorf("Read over junk: %v", err)
	}
}

// Junk planted in the vault under a ledger name does not stop mirroring;
// Verify reports it.
func TestMirrorSkipsPlantedObject(t *testing.T) {
	ctx := context.Background()
	st, mir := newMemStore(), newMemMirror()
	build(t, st, mir, 10, 15) // spans 1-11, 12-16
	mir.objs[ObjectName(17, 999)] = []byte("junk\n")
	l, err := Open(ctx, st, mir, testKey(1), testOptions(10))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries(5) {
		if _, err := l.Append(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	rep := verify(t, st, mir)
	if rep.MirroredSeq != rep.LastSeq || len(rep.Problems) != 1 || rep.Problems[0].Kind != ProblemMirrorBad || rep.Problems[0].Seq != 17 {
		t.Fatalf("report %+v", rep)
	}
}

// TestAppendBatch: batches from two ledgers racing on one store, and
// single appends between them, make one chain with no gap that verifies;
// a batch stays together; a store without AppendBatch gets the records one
// by one, in order, with others' records possibly between them.
func TestAppendBatch(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		name  string
		batch bool
		store func() (Store, *memStore)
	}{
		{"batch store", true, func() (Store, *memStore) { m := newMemStore(); m.yield = true; return batchStore{m}, m }},
		{"plain store", false, func() (Store, *memStore) { m := newMemStore(); m.yield = true; return m, m }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st, mem := tt.store()
			mir := newMemMirror()
			var ls [2]*Ledger
			for i := range ls {
				l, err := Open(ctx, st, mir, testKey(1), testOptions(16))
				if err != nil {
					t.Fatal(err)
				}
				ls[i] = l
			}
			const workers, rounds, size = 4, 12, 5
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range rounds {
						var es []Entry
						for j := range size {
							es = append(es, Entry{Kind: KindStatement, Actor: fmt.Sprint("w", w), Data: []int{i, j}})
						}
						recs, err := ls[(w+i)%2].AppendBatch(ctx, es)
						if err != nil {
							t.Error(err)
							return
						}
						for j := 1; j < len(recs); j++ {
							// One transaction keeps a batch together; one by
							// one, the other ledger's records may come between.
							together := recs[j].Seq == recs[j-1].Seq+1 && recs[j].Prev == recs[j-1].Hash
							if tt.batch && !together || recs[j].Seq <= recs[j-1].Seq {
								t.Errorf("batch records %d and %d: not in order or not together", recs[j-1].Seq, recs[j].Seq)
							}
						}
						if _, err := ls[(w+i+1)%2].Append(ctx, Entry{Kind: KindStatement, Actor: "single"}); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			for _, l := range ls {
				if err := l.Close(ctx); err != nil {
					t.Fatal(err)
				}
			}
			if rep := verify(t, mem, mir); !rep.OK() {
				t.Fatalf("problems: %v", rep.Problems)
			}
			var stmts uint64
			if err := Read(ctx, mem, 1, func(r Record) error {
				if !r.IsCheckpoint() {
					stmts++
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if want := uint64(workers * rounds * (size + 1)); stmts != want {
				t.Errorf("%d statement records, want %d", stmts, want)
			}
			if _, err := ls[0].AppendBatch(ctx, []Entry{{Kind: KindStatement}}); !errors.Is(err, ErrClosed) {
				t.Errorf("AppendBatch after Close: %v", err)
			}
		})
	}
}

// countingStore counts the transactions a ledger asks of its store.
type countingStore struct {
	batchStore
	appends, batches int
	lastBatch        int
}

func (s *countingStore) Append(ctx context.Context, seq uint64, rec []byte) (bool, error) {
	s.appends++
	return s.batchStore.Append(ctx, seq, rec)
}

func (s *countingStore) AppendBatch(ctx context.Context, first uint64, recs [][]byte) (bool, error) {
	s.batches++
	s.lastBatch = len(recs)
	return s.batchStore.AppendBatch(ctx, first, recs)
}

// A batch that reaches CheckpointEvery carries its checkpoint in the same
// store transaction (one commit, not two), and the chain verifies.
func TestAppendBatchCheckpointInside(t *testing.T) {
	ctx := context.Background()
	st := &countingStore{batchStore: batchStore{newMemStore()}}
	mir := newMemMirror()
	l, err := Open(ctx, st, mir, testKey(1), testOptions(16))
	if err != nil {
		t.Fatal(err)
	}
	appends0, batches0 := st.appends, st.batches
	for round, n := range []int{10, 10, 20} { // 10 (no checkpoint yet), 20 >= 16, 20 >= 16
		recs, err := l.AppendBatch(ctx, entries(n))
		if err != nil {
			t.Fatal(err)
		}
		if len(recs) != n {
			t.Fatalf("round %d: %d records returned for %d entries", round, len(recs), n)
		}
		want := n
		if round > 0 {
			want = n + 1 // and the checkpoint
		}
		if st.lastBatch != want || st.appends != appends0 || st.batches != batches0+round+1 {
			t.Fatalf("round %d: the store got a batch of %d (want %d), %d single appends (want %d), %d batches (want %d)",
				round, st.lastBatch, want, st.appends-appends0, 0, st.batches-batches0, round+1)
		}
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	rep := verify(t, st.memStore, mir)
	if !rep.OK() {
		t.Fatalf("problems: %v", rep.Problems)
	}
	var cps []uint64
	Read(ctx, st.memStore, 1, func(r Record) error {
		if r.IsCheckpoint() {
			cps = append(cps, r.Seq)
		}
		return nil
	})
	// after 10+10 records (seq 21), after 20 more (seq 42), and Close's over the tip if any
	if len(cps) < 2 || cps[0] != 21 || cps[1] != 42 {
		t.Fatalf("checkpoints at %v, want 21 and 42 first", cps)
	}
}

// lazyStore is a store whose appends reach its disk only at Sync (state's
// WithLedgerSync); durable is the highest seq a Sync covered.
type lazyStore struct {
	batchStore
	durable atomic.Uint64
	syncs   atomic.Int64
}

func (s *lazyStore) Sync(ctx context.Context) error {
	last, _, err := s.Last(ctx)
	s.durable.Store(last)
	s.syncs.Add(1)
	return err
}

// durableMirror refuses any object holding a record its store has not
// made durable.
type durableMirror struct {
	*memMirror
	st *lazyStore
}

func (m durableMirror) Put(ctx context.Context, name string, data []byte) error {
	if _, to, err := ParseObjectName(name); err != nil || to > m.st.durable.Load() {
		return fmt.Errorf("%s mirrored before its records were durable (durable to %d)", name, m.st.durable.Load())
	}
	return m.memMirror.Put(ctx, name, data)
}

// The mirror copies out only records the store has made durable: one a
// crash could still take would be written again differently, and the
// mirror would then accuse the store of tampering.
func TestMirrorSyncsStoreFirst(t *testing.T) {
	ctx := context.Background()
	st := &lazyStore{batchStore: batchStore{newMemStore()}}
	mir := durableMirror{newMemMirror(), st}
	l, err := Open(ctx, st, mir, testKey(1), testOptions(8))
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if _, err := l.AppendBatch(ctx, entries(10)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if st.syncs.Load() == 0 || len(mir.names()) == 0 {
		t.Fatalf("%d syncs, %d objects mirrored", st.syncs.Load(), len(mir.names()))
	}
	if rep := verify(t, st, mir); !rep.OK() || rep.MirroredSeq != rep.LastSeq {
		t.Fatalf("%+v", rep)
	}
}
