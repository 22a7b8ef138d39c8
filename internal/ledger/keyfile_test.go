package ledger

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLoadOrCreateKey: created once (0600, its public key beside it), read
// back the same after; a damaged file and a ledger with records but no key
// are refused.
func TestLoadOrCreateKey(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "state", "ledger.key")
	store := newMemStore()
	key, created, err := LoadOrCreateKey(ctx, path, store)
	if err != nil || !created {
		t.Fatalf("first: created %v, %v", created, err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	pub, err := os.ReadFile(PubPath(path))
	want := "ed25519:" + base64.StdEncoding.EncodeToString(key.Public().(ed25519.PublicKey))
	if err != nil || strings.TrimSpace(string(pub)) != want {
		t.Fatalf("public key file %q (%v), want %q", pub, err, want)
	}
	again, created, err := LoadOrCreateKey(ctx, path, store)
	if err != nil || created || !again.Equal(key) {
		t.Fatalf("second: created %v, same %v, %v", created, again.Equal(key), err)
	}

	if err := os.WriteFile(path, []byte("not hex\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateKey(ctx, path, store); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("damaged key: %v", err)
	}

	os.Remove(path)
	if _, err := store.Append(ctx, 1, []byte(`{"seq":1}`)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateKey(ctx, path, store); !errors.Is(err, ErrKeyMissing) {
		t.Fatalf("records without a key: %v, want ErrKeyMissing", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a key was created for a ledger with records: %v", err)
	}
}
