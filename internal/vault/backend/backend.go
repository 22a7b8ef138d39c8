// Package backend defines the write-once object store a vault lives in.
//
// A backend knows nothing of encryption, packs or snapshots: it stores opaque
// byte strings under (type, name) handles. Its one promise beyond storage is
// that an object, once saved, is never replaced: Save on an existing name
// succeeds only when the bytes are identical. Every vault rule that makes
// backups hard to destroy builds on that promise.
package backend

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"
)

// Type is the kind of object, which is also its folder in a directory vault.
type Type string

// The object types of a vault. See docs/vault-format.md.
const (
	Config   Type = "config"    // plaintext repository parameters, written once at init
	Key      Type = "keys"      // the master key wrapped by one password
	Pack     Type = "data"      // encrypted blobs packed together
	Index    Type = "index"     // which blob lives in which pack
	Snapshot Type = "snapshots" // an encrypted snapshot document
	Lock     Type = "locks"     // a retention lock record, written only by the vault itself
	Mark     Type = "marks"     // garbage-collection candidates found by a prune run
	WAL      Type = "wal"       // a run of PostgreSQL WAL (or a timeline history file), see format.WALHeader
	Policy   Type = "policies"  // an approver policy replacing the previous one, with its quorum certificate; vault-written
	Change   Type = "changes"   // a repository setting changed under a quorum certificate; vault-written
	Consumed Type = "consumed"  // a used quorum certificate, named by its request ID; vault-written
	Ledger   Type = "ledger"    // one ledger mirror object, named by a keyed hash of its logical name
)

// Types lists every object type in a stable order.
var Types = []Type{Config, Key, Pack, Index, Snapshot, Lock, Mark, WAL, Policy, Change, Consumed, Ledger}

// Valid reports whether t is one of the known object types.
func (t Type) Valid() bool {
	for _, k := range Types {
		if k == t {
			return true
		}
	}
	return false
}

// ConfigName is the only name an object of type Config may have.
const ConfigName = "config"

// Handle names one object.
type Handle struct {
	Type Type
	Name string
}

func (h Handle) String() string { return string(h.Type) + "/" + h.Name }

var nameRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// Validate checks that h names an object a vault may hold: a known type and
// either the config name or 64 lowercase hex digits. Backends call it before
// touching storage so that no name can escape its folder.
func (h Handle) Validate() error {
	if !h.Type.Valid() {
		return fmt.Errorf("backend: invalid type %q", h.Type)
	}
	if h.Type == Config {
		if h.Name != ConfigName {
			return fmt.Errorf("backend: invalid config name %q", h.Name)
		}
		return nil
	}
	if !nameRE.MatchString(h.Name) {
		return fmt.Errorf("backend: invalid name %q for %s", h.Name, h.Type)
	}
	return nil
}

// Info describes a stored object.
type Info struct {
	Handle
	Size    int64
	ModTime time.Time
}

var (
	// ErrNotExist is returned (wrapped) when an object is missing.
	ErrNotExist = errors.New("backend: object does not exist")
	// ErrExists is returned (wrapped) when Save meets an existing object whose
	// bytes differ: objects are never overwritten.
	ErrExists = errors.New("backend: object exists with different content")
	// ErrRetained is returned (wrapped) by Remove when the storage itself
	// retains the object (S3 Object Lock) and refuses to delete it yet.
	ErrRetained = errors.New("backend: object retained by the storage's object lock")
)

// Backend is a write-once object store. Implementations must be safe for
// concurrent use.
type Backend interface {
	// Save stores data under h. It returns only once the object is durable.
	// If h already exists with the same bytes Save returns nil, so a retry
	// after a crash is harmless; with other bytes it returns ErrExists and
	// changes nothing.
	Save(ctx context.Context, h Handle, data []byte) error
	// Load returns length bytes of h starting at offset; length 0 means to
	// the end. A missing object gives an error that unwraps to ErrNotExist.
	Load(ctx context.Context, h Handle, offset, length int64) ([]byte, error)
	// Stat describes h, or returns an error unwrapping to ErrNotExist.
	Stat(ctx context.Context, h Handle) (Info, error)
	// List calls fn once for each object of type t, in no particular order.
	// It stops and returns fn's first error.
	List(ctx context.Context, t Type, fn func(Info) error) error
	// Remove deletes h. Removing a missing object returns ErrNotExist.
	// Whether a removal is allowed is decided above the backend.
	Remove(ctx context.Context, h Handle) error
	// Close releases resources.
	Close() error
}
