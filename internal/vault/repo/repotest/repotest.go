// Package repotest opens real repositories for tests: a directory vault in a
// temp dir behind the same guard the vault server uses.
package repotest

import (
	"context"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// Password is the password of every test repository.
const Password = "test password"

// Options returns repository options with a cheap KDF and small packs, so
// that tests exercise many packs with little data.
func Options() repo.Options {
	return repo.Options{KDF: crypto.TestKDF, PackSize: 1 << 20}
}

// Env is a test repository and what it stands on.
type Env struct {
	Dir   string
	Store *guard.Store
	Repo  *repo.Repository
}

// New initialises a repository in t.TempDir() with the given minimum
// retention and returns it opened with admin rights.
func New(t testing.TB, minRetention time.Duration) *Env {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	be, err := local.Create(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	gs := guard.New(be, guard.Options{})
	r, err := repo.Init(ctx, gs.Session(guard.Admin), Password, repo.InitOptions{MinRetention: minRetention}, Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return &Env{Dir: dir, Store: gs, Repo: r}
}

// Reopen opens the repository again, as a new process would.
func (e *Env) Reopen(t testing.TB) *repo.Repository {
	t.Helper()
	r, err := repo.Open(context.Background(), e.Store.Session(guard.Admin), Password, Options())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}
