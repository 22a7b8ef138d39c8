package ledger

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
	"unicode/utf8"
)

// Kinds of records. Data is kind-specific JSON chosen by the caller, except
// for KindCheckpoint, which only the ledger writes.
const (
	KindSessionOpen  = "session.open"  // a client connected to a gateway
	KindSessionClose = "session.close" // a client disconnected
	KindStatement    = "statement"     // a statement denied or held: its class, the gate's decision, the request
	KindStatements   = "statements"    // statements one session ran, in order, each with its time, class and rows
	KindDecision     = "decision"      // a request decided: approved by quorum, denied, expired, consumed
	KindRequest      = "request"       // a request opened for quorum
	KindApproval     = "approval"      // one approver's signature on a request
	KindDenial       = "denial"        // one approver's refusal of a request
	KindBreakGlass   = "breakglass"    // a break-glass session began or ended
	KindReview       = "review"        // a break-glass session reviewed by others
	KindVault        = "vault"         // a guarded vault action (lock, forget, key, approvers)
	KindAlert        = "alert"         // a tripwire alert
	KindCheckpoint   = "checkpoint"    // a signed checkpoint, see [Checkpoint]
)

// Limits on one record, so that a hostile row cannot make a reader allocate
// without bound. A statement's SQL text is the largest thing callers log;
// 1 MiB holds any statement a person types, and the gate truncates the rest.
const (
	MaxRecordSize = 1 << 20
	MaxKindLen    = 64
	MaxActorLen   = 256
)

// Errors. Every parse error wraps ErrFormat.
var (
	ErrFormat   = errors.New("ledger: malformed record")
	ErrInvalid  = errors.New("ledger: invalid entry")
	ErrTampered = errors.New("ledger: chain broken")
	ErrClosed   = errors.New("ledger: closed")
)

// Hash is the SHA-256 hash of a record's canonical encoding. SHA-256 rather
// than BLAKE3 so that an auditor can check a chain with any standard tool;
// the ledger hashes a few hundred bytes per record, so speed does not matter.
type Hash [32]byte

func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// IsZero reports whether h is the zero hash, the Prev of record 1.
func (h Hash) IsZero() bool { return h == Hash{} }

// ParseHash parses 64 lowercase hex digits.
func ParseHash(s string) (Hash, error) {
	var h Hash
	if len(s) != 64 {
		return h, fmt.Errorf("%w: hash %q: want 64 hex digits", ErrFormat, s)
	}
	if _, err := hex.Decode(h[:], []byte(s)); err != nil {
		return h, fmt.Errorf("%w: hash %q: %v", ErrFormat, s, err)
	}
	if h.String() != s {
		return h, fmt.Errorf("%w: hash %q: not lowercase", ErrFormat, s)
	}
	return h, nil
}

// MarshalText implements encoding.TextMarshaler.
func (h Hash) MarshalText() ([]byte, error) { return []byte(h.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (h *Hash) UnmarshalText(b []byte) error {
	v, err := ParseHash(string(b))
	if err != nil {
		return err
	}
	*h = v
	return nil
}

// Record is one entry of the ledger.
//
// Its canonical encoding is one line of JSON with the fields in this order
// and no insignificant whitespace:
//
//	{"seq":7,"time":"2025-01-02T03:04:05.123456789Z","kind":"statement","actor":"alice","data":{...},"prev":"<64 hex>","hash":"<64 hex>"}
//
// Time is in UTC, formatted as [time.RFC3339Nano]; Kind and Actor are JSON
// strings as encoding/json writes them; Data is compact JSON (null when
// empty). Hash is SHA-256 over "dualkey ledger record v1\x00" followed by the
// encoding without its hash field (the same bytes, ending `"prev":"…"}`).
type Record struct {
	Seq   uint64          // 1 for the first record, then +1 each
	Time  time.Time       // when the ledger appended it, on the appender's clock
	Kind  string          // one of the Kind constants (or a caller's own)
	Actor string          // who did it; empty for the system itself
	Data  json.RawMessage // kind-specific compact JSON
	Prev  Hash            // Hash of record Seq-1; zero for record 1
	Hash  Hash            // hash of this record's canonical encoding, see above
}

const recordDomain = "dualkey ledger record v1\x00"

// appendBody appends the canonical encoding of r without its hash field and
// without the closing brace.
func (r Record) appendBody(b []byte) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, r.Seq, 10)
	b = append(b, `,"time":"`...)
	b = r.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","kind":`...)
	b = appendString(b, r.Kind)
	b = append(b, `,"actor":`...)
	b = appendString(b, r.Actor)
	b = append(b, `,"data":`...)
	if len(r.Data) == 0 {
		b = append(b, "null"...)
	} else {
		b = append(b, r.Data...)
	}
	b = append(b, `,"prev":"`...)
	b = hex.AppendEncode(b, r.Prev[:])
	return append(b, '"')
}

// appendString appends s as encoding/json writes it. Kinds and actors are
// plain ASCII nearly always; they skip json.Marshal's allocation.
func appendString(b []byte, s string) []byte {
	plain := true
	for i := 0; i < len(s) && plain; i++ {
		c := s[i]
		// encoding/json escapes controls, quotes, backslashes and (for
		// HTML) <, > and &; it also rewrites invalid UTF-8 and U+2028/9.
		plain = c >= 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&'
	}
	if plain {
		b = append(b, '"')
		b = append(b, s...)
		return append(b, '"')
	}
	q, err := json.Marshal(s)
	if err != nil {
		panic(err) // a string always marshals
	}
	return append(b, q...)
}

// ComputeHash returns the hash r should carry: over everything but r.Hash.
func (r Record) ComputeHash() Hash {
	b := r.appendBody([]byte(recordDomain))
	b = append(b, '}')
	return sha256.Sum256(b)
}

// Encode returns the canonical encoding of r, Hash included as it is (see
// [Record.ComputeHash]). Data must be compact JSON, as [Ledger.Append] and
// [ParseRecord] ensure; other bytes encode a record ParseRecord refuses.
func (r Record) Encode() []byte {
	b := r.appendBody(make([]byte, 0, 256+len(r.Data)))
	b = append(b, `,"hash":"`...)
	b = hex.AppendEncode(b, r.Hash[:])
	return append(b, `"}`...)
}

// seal sets r.Hash and returns r's canonical encoding: ComputeHash and
// then Encode, building the body once for both (the gate's recorder seals
// every statement record).
func (r *Record) seal() []byte {
	b := make([]byte, 0, len(recordDomain)+len(r.Kind)+len(r.Actor)+len(r.Data)+256)
	b = append(b, recordDomain...)
	b = r.appendBody(b)
	r.Hash = sha256.Sum256(append(b, '}'))
	b = append(b[len(recordDomain):], `,"hash":"`...)
	b = hex.AppendEncode(b, r.Hash[:])
	return append(b, `"}`...)
}

// IsCheckpoint reports whether r is a checkpoint record.
func (r Record) IsCheckpoint() bool { return r.Kind == KindCheckpoint }

type wireRecord struct {
	Seq   uint64          `json:"seq"`
	Time  string          `json:"time"`
	Kind  string          `json:"kind"`
	Actor string          `json:"actor"`
	Data  json.RawMessage `json:"data"`
	Prev  Hash            `json:"prev"`
	Hash  Hash            `json:"hash"`
}

// ParseRecord decodes one record in canonical encoding. It is strict: any
// input that is not exactly what [Record.Encode] writes for the decoded
// record is refused, so one record has one encoding. It does not check
// r.Hash against the content: [Verify] does, to name what is wrong.
func ParseRecord(b []byte) (Record, error) {
	if len(b) > MaxRecordSize {
		return Record{}, fmt.Errorf("%w: %d bytes, limit %d", ErrFormat, len(b), MaxRecordSize)
	}
	var w wireRecord
	if err := json.Unmarshal(b, &w); err != nil {
		return Record{}, fmt.Errorf("%w: %v", ErrFormat, err)
	}
	t, err := time.Parse(time.RFC3339Nano, w.Time)
	if err != nil {
		return Record{}, fmt.Errorf("%w: time: %v", ErrFormat, err)
	}
	r := Record{Seq: w.Seq, Time: t.UTC(), Kind: w.Kind, Actor: w.Actor, Data: w.Data, Prev: w.Prev, Hash: w.Hash}
	if err := r.validate(); err != nil {
		return Record{}, err
	}
	if !bytes.Equal(r.Encode(), b) {
		return Record{}, fmt.Errorf("%w: not in canonical encoding", ErrFormat)
	}
	return r, nil
}

// validate checks the fields' own rules (not the hash).
func (r *Record) validate() error {
	switch {
	case r.Seq == 0:
		return fmt.Errorf("%w: seq 0", ErrFormat)
	case r.Time.IsZero():
		return fmt.Errorf("%w: seq %d: no time", ErrFormat, r.Seq)
	case r.Kind == "" || len(r.Kind) > MaxKindLen || !utf8.ValidString(r.Kind):
		return fmt.Errorf("%w: seq %d: kind must be 1 to %d bytes of UTF-8", ErrFormat, r.Seq, MaxKindLen)
	case len(r.Actor) > MaxActorLen || !utf8.ValidString(r.Actor):
		return fmt.Errorf("%w: seq %d: actor must be at most %d bytes of UTF-8", ErrFormat, r.Seq, MaxActorLen)
	case r.Seq == 1 && !r.Prev.IsZero():
		return fmt.Errorf("%w: seq 1 with a prev hash", ErrFormat)
	case r.Seq > 1 && r.Prev.IsZero():
		return fmt.Errorf("%w: seq %d without a prev hash", ErrFormat, r.Seq)
	}
	if len(r.Data) > 0 {
		var c bytes.Buffer
		if err := json.Compact(&c, r.Data); err != nil {
			return fmt.Errorf("%w: seq %d: data: %v", ErrFormat, r.Seq, err)
		}
		if !bytes.Equal(c.Bytes(), r.Data) {
			return fmt.Errorf("%w: seq %d: data is not compact JSON", ErrFormat, r.Seq)
		}
	}
	return nil
}
