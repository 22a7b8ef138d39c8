// Package format holds the plaintext records of a vault: the parts the vault
// server must read to enforce its rules without ever holding a decryption key.
//
// Everything else in a vault (packs' contents, trees, snapshot documents,
// index bodies) is encrypted by clients; see docs/vault-format.md.
package format

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/zeebo/blake3"
)

// Version is the repository format version this code writes.
const Version = 1

// MaxIndexPacks bounds the pack list of one index header, so that a hostile
// upload cannot make the server allocate without limit.
const MaxIndexPacks = 1 << 20

// ErrFormat is wrapped by every parse error in this package.
var ErrFormat = errors.New("vault format")

// ID is the content-derived name of an object: the BLAKE3 hash (256 bits)
// of its stored bytes. Blob IDs are IDs too, but keyed (crypto.Key.ID).
type ID [32]byte

// Hash returns the ID of data. BLAKE3 because the vault server hashes every
// byte it receives to check names: about twice SHA-256's speed here.
func Hash(data []byte) ID { return blake3.Sum256(data) }

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// IsZero reports whether id is the zero ID.
func (id ID) IsZero() bool { return id == ID{} }

// ParseID parses 64 lowercase hex digits.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 64 {
		return id, fmt.Errorf("%w: id %q: want 64 hex digits", ErrFormat, s)
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("%w: id %q: %v", ErrFormat, s, err)
	}
	if id.String() != s { // reject uppercase: names must be canonical
		return id, fmt.Errorf("%w: id %q: not lowercase", ErrFormat, s)
	}
	return id, nil
}

// MarshalText implements encoding.TextMarshaler.
func (id ID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *ID) UnmarshalText(b []byte) error {
	v, err := ParseID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}

// Config is the plaintext repository configuration, stored once at init as
// object config/config and never rewritten. Secrets (the encryption, ID and
// chunker keys) are not here: they live in the master key inside key objects.
type Config struct {
	Version int       `json:"version"`
	ID      string    `json:"id"`      // random repository id, 64 hex digits
	Created time.Time `json:"created"` // on the clock of whoever ran init
	// MinRetention is the shortest lock any snapshot gets, counted on the
	// vault's clock from the moment the snapshot is committed. It can never
	// be lowered.
	MinRetention Duration `json:"min_retention"`
	// QuorumPolicy, when set, is the canonical encoding of the approver
	// policy (a quorum/cert Policy) fixed at init: the first link of the
	// vault's policy chain (see PolicyRecord). With it, the vault performs
	// guarded actions (shortening a lock, lowering MinRetention, forgetting a
	// locked snapshot, removing a key, rotating approvers) on a valid quorum
	// certificate; without it, never. The vault server parses it when the
	// config is saved.
	QuorumPolicy []byte `json:"quorum_policy,omitempty"`
	// MAC binds the fields above to the master key (keyed BLAKE3 with the
	// repository's MAC key over CanonicalBytes), so a client notices a swapped
	// config. The server cannot check it and does not need to.
	MAC string `json:"mac,omitempty"`
}

// CanonicalBytes is what Config.MAC authenticates.
func (c Config) CanonicalBytes() []byte {
	c.MAC = ""
	b, _ := json.Marshal(c)
	return b
}

// Validate checks the fields a server relies on.
func (c Config) Validate() error {
	if c.Version < 1 || c.Version > Version {
		return fmt.Errorf("%w: config version %d not supported (this build reads 1..%d)", ErrFormat, c.Version, Version)
	}
	if _, err := ParseID(c.ID); err != nil {
		return fmt.Errorf("%w: config id: %v", ErrFormat, err)
	}
	if c.MinRetention < 0 {
		return fmt.Errorf("%w: config min_retention is negative", ErrFormat)
	}
	return nil
}

// ParseConfig decodes and validates a config object.
func ParseConfig(data []byte) (Config, error) {
	var c Config
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("%w: config: %v", ErrFormat, err)
	}
	return c, c.Validate()
}

// Duration is a time.Duration that reads and writes as a Go duration string
// ("720h") in JSON.
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}

// LockRecord is written by the vault (never by a client) when a snapshot is
// committed or its lock extended. A snapshot's lock is the latest Until of
// all its records; a pack is locked while any live record lists it. Records
// are named by the hash of their bytes, so extending writes a new record
// and nothing is ever shortened.
type LockRecord struct {
	Snapshot ID        `json:"snapshot"`
	Time     time.Time `json:"time"`  // vault clock at commit or extension
	Until    time.Time `json:"until"` // vault clock
	Reason   string    `json:"reason"`
	// Packs the snapshot needs, as declared by the client at commit and
	// checked by the vault to exist then.
	Packs []ID `json:"packs,omitempty"`
	// Supersedes, in a record with reason "shorten", names the lock records
	// (by object name) whose Until this record replaces. The vault honours it
	// only while Certificate verifies; see docs/vault-format.md.
	Supersedes []ID `json:"supersedes,omitempty"`
	// Certificate is the quorum certificate that authorized a shortening.
	Certificate []byte `json:"certificate,omitempty"`
	// WAL, in the record of a PostgreSQL base backup, is the WAL the
	// backup needs to become consistent, as declared by the client at
	// commit. While the record is live the vault keeps every WAL piece
	// the range needs ([WALRange.Needs]). Nil in other records and in
	// records written before the field existed.
	WAL *WALRange `json:"wal,omitempty"`
}

// WALRange is the WAL a base backup needs: bytes [Start, End) of Timeline.
// The agent widens the backup's StartLSN and EndLSN to whole WAL segments,
// since restore fetches whole segments. Carried in plaintext so the vault,
// which has no key, can match it against WAL piece headers.
//
// Invariants (checked by Validate): Timeline is at least 1; Start < End.
type WALRange struct {
	Timeline uint32 `json:"timeline"`
	Start    uint64 `json:"start"` // LSN of the first byte needed
	End      uint64 `json:"end"`   // LSN just past the last byte needed
}

// Validate checks the invariants above.
func (r WALRange) Validate() error {
	switch {
	case r.Timeline == 0:
		return fmt.Errorf("%w: wal range: timeline 0", ErrFormat)
	case r.End <= r.Start:
		return fmt.Errorf("%w: wal range: end %X is not after start %X", ErrFormat, r.End, r.Start)
	}
	return nil
}

// Needs reports whether the WAL piece with header hd may hold bytes a
// restore of the range reads: a piece of Timeline or of an earlier timeline
// whose bytes overlap [Start, End), or the history file of Timeline or of
// an earlier one. Earlier timelines count because a timeline's first
// segment takes the bytes before its switch point from its ancestors; that
// keeps a little WAL of a branch not taken too, never too little.
func (r WALRange) Needs(hd WALHeader) bool {
	if hd.Timeline > r.Timeline {
		return false
	}
	if hd.History {
		return true
	}
	return hd.Start < r.End && r.Start < hd.End
}

// String formats the range as PostgreSQL writes positions:
// "timeline 1, 0/1000000-0/3000000".
func (r WALRange) String() string {
	return fmt.Sprintf("timeline %d, %X/%X-%X/%X", r.Timeline, r.Start>>32, uint32(r.Start), r.End>>32, uint32(r.End))
}

// Lock reasons.
const (
	ReasonCommit  = "commit"
	ReasonExtend  = "extend"
	ReasonShorten = "shorten" // under a quorum certificate
)

// Live reports whether the record still protects at time now.
func (r LockRecord) Live(now time.Time) bool { return now.Before(r.Until) }

// ParseLockRecord decodes a lock record.
func ParseLockRecord(data []byte) (LockRecord, error) {
	var r LockRecord
	if err := json.Unmarshal(data, &r); err != nil {
		return r, fmt.Errorf("%w: lock record: %v", ErrFormat, err)
	}
	if r.Snapshot.IsZero() || r.Until.IsZero() || r.Time.IsZero() {
		return r, fmt.Errorf("%w: lock record: missing snapshot, time or until", ErrFormat)
	}
	if r.WAL != nil {
		if err := r.WAL.Validate(); err != nil {
			return r, fmt.Errorf("lock record: %w", err)
		}
	}
	return r, nil
}

// Index objects start with a plaintext header naming the packs they cover,
// so the vault can tell whether deleting an index would orphan a locked pack:
//
//	"DKI1" | count uint32 big-endian | count × 32-byte pack ID | encrypted body
var indexMagic = []byte("DKI1")

// IndexHeaderSize returns the size of the plaintext header for n packs.
func IndexHeaderSize(n int) int { return len(indexMagic) + 4 + 32*n }

// AppendIndexHeader appends the plaintext header for packs to dst.
func AppendIndexHeader(dst []byte, packs []ID) []byte {
	dst = append(dst, indexMagic...)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(packs)))
	for _, p := range packs {
		dst = append(dst, p[:]...)
	}
	return dst
}

// ParseIndexHeader returns the packs an index covers and the encrypted body
// that follows the header.
func ParseIndexHeader(data []byte) (packs []ID, body []byte, err error) {
	if len(data) < len(indexMagic)+4 || !bytes.Equal(data[:4], indexMagic) {
		return nil, nil, fmt.Errorf("%w: index: bad magic", ErrFormat)
	}
	n := binary.BigEndian.Uint32(data[4:8])
	if n > MaxIndexPacks {
		return nil, nil, fmt.Errorf("%w: index: %d packs exceeds limit %d", ErrFormat, n, MaxIndexPacks)
	}
	need := IndexHeaderSize(int(n))
	if len(data) < need {
		return nil, nil, fmt.Errorf("%w: index: header truncated (%d of %d bytes)", ErrFormat, len(data), need)
	}
	packs = make([]ID, n)
	for i := range packs {
		copy(packs[i][:], data[8+32*i:])
	}
	return packs, data[need:], nil
}

// CommitRequest asks the vault to record a snapshot. The snapshot document is
// encrypted; the vault names it by its hash, checks that every declared pack
// exists, and writes a LockRecord on its own clock.
type CommitRequest struct {
	Snapshot []byte `json:"snapshot"` // encrypted snapshot object
	Packs    []ID   `json:"packs"`
	// LockFor is the retention the client asks for; the vault grants
	// max(LockFor, MinRetention).
	LockFor Duration `json:"lock_for,omitempty"`
	// WAL, for a PostgreSQL base backup, is the WAL it needs; the vault
	// copies it into the lock record and keeps that WAL as long as the
	// lock. The vault cannot check it against the sealed snapshot: a
	// wrong range keeps other WAL (bounded by the vault's maximum lock),
	// or leaves the backup's own WAL to the minimum retention, as before.
	WAL *WALRange `json:"wal,omitempty"`
}

// Mark lists packs that a prune run found unreferenced. A later prune deletes
// a pack only if an earlier mark, older than the grace period, listed it and
// it is still unreferenced: two phases, no lock file.
type Mark struct {
	Time  time.Time `json:"time"`
	Packs []ID      `json:"packs"`
}
