package ledger

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memStore is an in-memory Store whose rows a test may edit, delete, swap
// and truncate behind the ledger's back, as someone editing the database
// file would.
type memStore struct {
	mu    sync.Mutex
	rows  map[uint64][]byte
	yield bool // Gosched inside Append, to provoke races
}

var _ Store = (*memStore)(nil)

func newMemStore() *memStore { return &memStore{rows: map[uint64][]byte{}} }

func (s *memStore) Append(ctx context.Context, seq uint64, rec []byte) (bool, error) {
	if s.yield {
		runtime.Gosched()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.rows[seq]; ok {
		return false, nil
	}
	s.rows[seq] = slices.Clone(rec)
	return true, nil
}

func (s *memStore) keys(from uint64) []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ks []uint64
	for k := range s.rows {
		if k >= from {
			ks = append(ks, k)
		}
	}
	slices.Sort(ks)
	return ks
}

func (s *memStore) Read(ctx context.Context, from uint64, fn func(seq uint64, rec []byte) error) error {
	for _, k := range s.keys(from) {
		b, ok := s.get(k)
		if !ok {
			continue
		}
		if err := fn(k, b); err != nil {
			return err
		}
	}
	return nil
}

func (s *memStore) Last(ctx context.Context) (uint64, []byte, error) {
	ks := s.keys(0)
	if len(ks) == 0 {
		return 0, nil, nil
	}
	b, _ := s.get(ks[len(ks)-1])
	return ks[len(ks)-1], b, nil
}

func (s *memStore) get(seq uint64) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.rows[seq]
	return slices.Clone(b), ok
}

func (s *memStore) set(seq uint64, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows[seq] = b
}

func (s *memStore) del(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.rows, seq)
}

// record returns row seq decoded; it fails the test if there is none.
func (s *memStore) record(t *testing.T, seq uint64) Record {
	t.Helper()
	b, ok := s.get(seq)
	if !ok {
		t.Fatalf("no row %d", seq)
	}
	r, err := ParseRecord(b)
	if err != nil {
		t.Fatalf("row %d: %v", seq, err)
	}
	return r
}

// rehash re-links rows from seq on to the row before them and re-hashes them, as an attacker without
// the ledger key would after an edit.
func (s *memStore) rehash(t *testing.T, from uint64) {
	t.Helper()
	var prev Hash
	for _, k := range s.keys(1) {
		if k < from {
			prev = s.record(t, k).Hash
		}
	}
	for _, k := range s.keys(from) {
		r := s.record(t, k)
		r.Prev = prev
		r.Hash = r.ComputeHash()
		s.set(k, r.Encode())
		prev = r.Hash
	}
}

// memMirror is an in-memory Mirror that can be taken down, or made to
// block, to simulate a vault outage.
type memMirror struct {
	mu      sync.Mutex
	objs    map[string][]byte
	down    atomic.Bool
	block   chan struct{} // if non-nil, Put waits for it to close
	puts    atomic.Int64
	clashes atomic.Int64 // Puts refused for other bytes under an existing name
}

var _ Mirror = (*memMirror)(nil)

func newMemMirror() *memMirror { return &memMirror{objs: map[string][]byte{}} }

var errDown = errors.New("mirror down")

func (m *memMirror) Put(ctx context.Context, name string, data []byte) error {
	if m.block != nil {
		select {
		case <-m.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if m.down.Load() {
		return errDown
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.puts.Add(1)
	if old, ok := m.objs[name]; ok {
		if string(old) != string(data) {
			m.clashes.Add(1)
			return fmt.Errorf("%s exists with other bytes", name)
		}
		return nil
	}
	m.objs[name] = slices.Clone(data)
	return nil
}

func (m *memMirror) Get(ctx context.Context, name string) ([]byte, error) {
	if m.down.Load() {
		return nil, errDown
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.objs[name]
	if !ok {
		return nil, fmt.Errorf("%s: not found", name)
	}
	return slices.Clone(b), nil
}

func (m *memMirror) List(ctx context.Context, fn func(name string) error) error {
	if m.down.Load() {
		return errDown
	}
	m.mu.Lock()
	var names []string
	for n := range m.objs {
		names = append(names, n)
	}
	m.mu.Unlock()
	slices.Sort(names)
	for _, n := range names {
		if err := fn(n); err != nil {
			return err
		}
	}
	return nil
}

func (m *memMirror) names() []string {
	var out []string
	_ = m.List(context.Background(), func(n string) error { out = append(out, n); return nil })
	return out
}

// testKey returns a fixed Ed25519 key, so failures reproduce.
func testKey(seed byte) ed25519.PrivateKey {
	s := make([]byte, ed25519.SeedSize)
	for i := range s {
		s[i] = seed
	}
	return ed25519.NewKeyFromSeed(s)
}

// testClock returns a clock that advances one millisecond per call.
func testClock() func() time.Time {
	var mu sync.Mutex
	t := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t = t.Add(time.Millisecond)
		return t
	}
}

func testOptions(every int) Options {
	return Options{CheckpointEvery: every, Now: testClock(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

// batchStore is memStore with AppendBatch: all of a batch or none of it.
type batchStore struct{ *memStore }

var _ BatchStore = batchStore{}

func (s batchStore) AppendBatch(ctx context.Context, first uint64, recs [][]byte) (bool, error) {
	if s.yield {
		runtime.Gosched()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range recs {
		if _, ok := s.rows[first+uint64(i)]; ok {
			return false, nil
		}
	}
	for i, rec := range recs {
		s.rows[first+uint64(i)] = slices.Clone(rec)
	}
	return true, nil
}
