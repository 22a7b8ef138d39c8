package repo

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
)

// MaxLedgerName bounds a ledger object's logical name.
const MaxLedgerName = 1024

// LedgerMirror stores the ledger's mirror objects in the vault. It has the
// method set of ledger.Mirror (matched structurally: the vault does not
// import the ledger; cmd/dualkey checks the fit at compile time).
//
// A logical name maps to the object ledger/<keyed BLAKE3 of the name>, so
// names need not be hex and reveal nothing to the vault. The object is
// "DKL1" | Seal(len(name) u32be | name | data); the name inside lets List
// return it and lets Get notice an object copied under another name. The
// vault lets an append token add ledger objects but nobody overwrite or
// remove them.
type LedgerMirror struct{ r *Repository }

// LedgerMirror returns the repository's ledger mirror.
func (r *Repository) LedgerMirror() *LedgerMirror { return &LedgerMirror{r} }

func (m *LedgerMirror) handle(name string) backend.Handle {
	id := m.r.key.ID(append([]byte("dualkey/ledger-name/v1\n"), name...))
	return backend.Handle{Type: backend.Ledger, Name: hex.EncodeToString(id[:])}
}

func checkLedgerName(name string) error {
	if name == "" || len(name) > MaxLedgerName {
		return fmt.Errorf("repo: ledger name of %d bytes: want 1 to %d", len(name), MaxLedgerName)
	}
	return nil
}

// encodeLedgerPayload is the plaintext of a ledger object.
func encodeLedgerPayload(name string, data []byte) []byte {
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(name)+len(data)), uint32(len(name)))
	b = append(b, name...)
	return append(b, data...)
}

// decodeLedgerPayload splits a ledger object's plaintext.
func decodeLedgerPayload(p []byte) (string, []byte, error) {
	if len(p) < 4 {
		return "", nil, fmt.Errorf("%w: ledger payload of %d bytes", ErrDamaged, len(p))
	}
	n := binary.BigEndian.Uint32(p)
	if n == 0 || n > MaxLedgerName || uint64(n) > uint64(len(p)-4) {
		return "", nil, fmt.Errorf("%w: ledger payload: name length %d", ErrDamaged, n)
	}
	return string(p[4 : 4+n]), p[4+n:], nil
}

// Put stores data under name. Storing the same bytes again succeeds (a
// retry); other bytes fail with an error wrapping backend.ErrExists.
func (m *LedgerMirror) Put(ctx context.Context, name string, data []byte) error {
	if err := checkLedgerName(name); err != nil {
		return err
	}
	h := m.handle(name)
	obj := m.r.key.Seal(format.AppendLedgerHeader(nil), encodeLedgerPayload(name, data))
	err := m.r.store.Save(ctx, h, obj)
	if err == nil {
		return nil
	}
	if !errors.Is(err, backend.ErrExists) {
		return fmt.Errorf("repo: ledger put %s: %w", name, err)
	}
	// Sealing is randomized, so a retry never has the same bytes: compare
	// what is stored.
	have, gerr := m.Get(ctx, name)
	if gerr != nil {
		return fmt.Errorf("repo: ledger put %s: %w (and reading it back: %v)", name, err, gerr)
	}
	if !bytes.Equal(have, data) {
		return fmt.Errorf("repo: ledger put %s: stored with other bytes: %w", name, backend.ErrExists)
	}
	return nil
}

// Get returns the bytes stored under name; a missing name gives an error
// wrapping backend.ErrNotExist, a damaged or misplaced object ErrDamaged.
func (m *LedgerMirror) Get(ctx context.Context, name string) ([]byte, error) {
	if err := checkLedgerName(name); err != nil {
		return nil, err
	}
	h := m.handle(name)
	obj, err := m.r.store.Load(ctx, h, 0, 0)
	if err != nil {
		return nil, fmt.Errorf("repo: ledger get %s: %w", name, err)
	}
	got, data, err := m.open(obj)
	if err != nil {
		return nil, fmt.Errorf("repo: ledger get %s (%v): %w", name, h, err)
	}
	if got != name {
		return nil, fmt.Errorf("%w: ledger object %v holds %.80q, not %q", ErrDamaged, h, got, name)
	}
	return data, nil
}

func (m *LedgerMirror) open(obj []byte) (string, []byte, error) {
	sealed, err := format.ParseLedgerObject(obj)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %w", ErrDamaged, err)
	}
	p, err := m.r.key.Open(nil, sealed)
	if err != nil {
		return "", nil, fmt.Errorf("%w: %w", ErrDamaged, err)
	}
	return decodeLedgerPayload(p)
}

// List calls fn with the logical name of every ledger object, in no
// particular order. Objects that do not open under this repository's key,
// or whose object name is not the keyed hash of the name inside (junk an
// append token planted), are skipped and logged: the ledger checks what it
// reads anyway.
func (m *LedgerMirror) List(ctx context.Context, fn func(name string) error) error {
	var hs []backend.Handle
	if err := m.r.store.List(ctx, backend.Ledger, func(fi backend.Info) error {
		hs = append(hs, fi.Handle)
		return ctx.Err()
	}); err != nil {
		return fmt.Errorf("repo: ledger list: %w", err)
	}
	for _, h := range hs {
		obj, err := m.r.store.Load(ctx, h, 0, 0)
		if err != nil {
			return fmt.Errorf("repo: ledger list: load %v: %w", h, err)
		}
		name, _, err := m.open(obj)
		if err == nil && m.handle(name) != h {
			err = fmt.Errorf("%w: holds %.80q, stored under another name", ErrDamaged, name)
		}
		if err != nil {
			m.r.opts.Log.Warn("ledger object skipped", "object", h.String(), "err", err)
			continue
		}
		if err := fn(name); err != nil {
			return err
		}
	}
	return nil
}
