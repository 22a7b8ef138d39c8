package repo_test

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

func TestLedgerMirrorInVault(t *testing.T) {
	ctx := context.Background()
	env := repotest.New(t, time.Hour)
	// The gate host mirrors with an append token only.
	app, err := repo.Open(ctx, env.Store.Session(guard.Append), repotest.Password, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	m := app.LedgerMirror()
	names := []string{"ledger/00000000000000000001-00000000000000000065", "ledger/00000000000000000066-00000000000000000130"}
	for i, n := range names {
		if err := m.Put(ctx, n, []byte{byte(i), 'x'}); err != nil {
			t.Fatalf("put %s: %v", n, err)
		}
	}
	if err := m.Put(ctx, names[0], []byte{0, 'x'}); err != nil {
		t.Errorf("idempotent put: %v", err)
	}
	if err := m.Put(ctx, names[0], []byte("other")); !errors.Is(err, backend.ErrExists) {
		t.Errorf("conflicting put: %v", err)
	}
	got, err := m.Get(ctx, names[1])
	if err != nil || !bytes.Equal(got, []byte{1, 'x'}) {
		t.Errorf("get = %q, %v", got, err)
	}
	if _, err := m.Get(ctx, "ledger/missing"); !errors.Is(err, backend.ErrNotExist) {
		t.Errorf("get missing: %v", err)
	}
	var listed []string
	if err := env.Repo.LedgerMirror().List(ctx, func(n string) error { listed = append(listed, n); return nil }); err != nil {
		t.Fatal(err)
	}
	slices.Sort(listed)
	if !slices.Equal(listed, names) {
		t.Errorf("list = %v, want %v", listed, names)
	}
	// Nobody removes a ledger object, not even admin; prune leaves them.
	var hs []backend.Handle
	env.Store.Session(guard.Read).List(ctx, backend.Ledger, func(fi backend.Info) error { hs = append(hs, fi.Handle); return nil })
	if len(hs) != 2 {
		t.Fatalf("%d ledger objects stored, want 2", len(hs))
	}
	for _, c := range []guard.Capability{guard.Append, guard.Admin} {
		if err := env.Store.Session(c).Remove(ctx, hs[0]); !errors.Is(err, guard.ErrForbidden) {
			t.Errorf("%s removes a ledger object: %v", c, err)
		}
	}
}
