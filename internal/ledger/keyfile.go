package ledger

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// ErrKeyMissing: the ledger has records but its key file is gone.
var ErrKeyMissing = errors.New("ledger: key missing")

// PubPath is where the public key of the key file keyPath is written:
// ledger.key → ledger.pub.
func PubPath(keyPath string) string { return strings.TrimSuffix(keyPath, ".key") + ".pub" }

// LoadOrCreateKey reads the ledger's signing key from path (a hex seed), or
// creates it (0600, fsynced; the public key "ed25519:<base64>" beside it at
// PubPath, 0644) while store holds no record, and reports whether it did.
// A ledger with records and no key is refused with ErrKeyMissing: a fresh
// key would sign over whatever the store holds now, laundering any edit
// made before. The CLI and dualkey run share this, so either can open the
// other's state.
func LoadOrCreateKey(ctx context.Context, path string, store Store) (ed25519.PrivateKey, bool, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		seed, err := hex.DecodeString(strings.TrimSpace(string(b)))
		if err != nil || len(seed) != ed25519.SeedSize {
			return nil, false, fmt.Errorf("ledger: key %s is damaged", path)
		}
		return ed25519.NewKeyFromSeed(seed), false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("ledger: key: %w", err)
	}
	if last, _, err := store.Last(ctx); err != nil {
		return nil, false, fmt.Errorf("ledger: %w", err)
	} else if last > 0 {
		return nil, false, fmt.Errorf("%w: the ledger has %d records but its key %s is missing: restore the key; a new key would vouch for records it never saw", ErrKeyMissing, last, path)
	}
	seed := make([]byte, ed25519.SeedSize)
	if _, err := rand.Read(seed); err != nil {
		return nil, false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, fmt.Errorf("ledger: key: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, false, fmt.Errorf("ledger: key: %w", err)
	}
	_, err = fmt.Fprintln(f, hex.EncodeToString(seed))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, false, fmt.Errorf("ledger: key: %w", err)
	}
	key := ed25519.NewKeyFromSeed(seed)
	// The quorum's text form of a public key (cert.FormatPublicKey), which
	// `dualkey audit verify --ledger-pub` reads.
	pub := "ed25519:" + base64.StdEncoding.EncodeToString(key.Public().(ed25519.PublicKey))
	if err := os.WriteFile(PubPath(path), []byte(pub+"\n"), 0o644); err != nil {
		return nil, false, fmt.Errorf("ledger: public key: %w", err)
	}
	return key, true, nil
}
