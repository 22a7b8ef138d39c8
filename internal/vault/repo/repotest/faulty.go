package repotest

import (
	"context"
	"sync"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// FaultyStore is a repo.Store whose saves fail or hang when a test asks,
// to see how a repository copes with a failed upload.
type FaultyStore struct {
	repo.Store

	mu   sync.Mutex
	fail map[backend.Type][]error
	hold map[backend.Type]chan backend.Handle
}

// FailSaves makes the next len(errs) saves of objects of type t fail, with
// errs in order, without storing anything.
func (s *FaultyStore) FailSaves(t backend.Type, errs ...error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail == nil {
		s.fail = map[backend.Type][]error{}
	}
	s.fail[t] = append(s.fail[t], errs...)
}

// HoldSaves makes saves of objects of type t wait until their context
// ends and then fail with its error, as uploads in flight when their
// backup is abandoned do. The channel receives the handle of each save
// that starts waiting; it holds 64, and saves beyond that do not block on
// it.
func (s *FaultyStore) HoldSaves(t backend.Type) <-chan backend.Handle {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.hold == nil {
		s.hold = map[backend.Type]chan backend.Handle{}
	}
	ch := make(chan backend.Handle, 64)
	s.hold[t] = ch
	return ch
}

// ReleaseSaves ends HoldSaves for t: later saves go through.
func (s *FaultyStore) ReleaseSaves(t backend.Type) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.hold, t)
}

// Save fails, holds or passes on the save as FailSaves and HoldSaves said.
func (s *FaultyStore) Save(ctx context.Context, h backend.Handle, data []byte) error {
	s.mu.Lock()
	var err error
	if errs := s.fail[h.Type]; len(errs) > 0 {
		err, s.fail[h.Type] = errs[0], errs[1:]
	}
	held := s.hold[h.Type]
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if held != nil {
		select {
		case held <- h:
		default:
		}
		<-ctx.Done()
		return ctx.Err()
	}
	return s.Store.Save(ctx, h, data)
}

// OpenFaulty opens the repository again over a FaultyStore, which passes
// everything on until told otherwise.
func (e *Env) OpenFaulty(t testing.TB) (*repo.Repository, *FaultyStore) {
	t.Helper()
	fs := &FaultyStore{Store: e.Store.Session(guard.Admin)}
	r, err := repo.Open(context.Background(), fs, Password, Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, fs
}
