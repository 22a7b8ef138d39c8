package format

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// WAL objects hold one piece of PostgreSQL's write-ahead log: a contiguous
// run of WAL bytes of one timeline, or one timeline history file. They start
// with a fixed plaintext header, so the vault server (which holds no key)
// knows what it stores and clients list pieces with one 25-byte ranged read
// per object:
//
//	"DKW1" | timeline u32be | start u64be | end u64be | flags u8 | sealed body
//
// The sealed body is Seal(header || zstd(bytes)): the header is repeated
// inside the ciphertext so that a client notices a header relabelled by
// anyone without the key. End-Start is the length of the bytes.
var walMagic = []byte("DKW1")

// WALHeaderSize is the size of a WAL object's plaintext header.
const WALHeaderSize = 4 + 4 + 8 + 8 + 1

// MaxWALPiece bounds End-Start of one piece: what a client decompresses for
// one object. 64 MiB is 16 times the writer's default piece and 4 default
// WAL segments, small enough that a hostile header cannot make a reader
// allocate without limit.
const MaxWALPiece = 64 << 20

// WALSealOverhead is the least a sealed body can be: a 12-byte nonce and a
// 16-byte tag (crypto.Overhead; format is a leaf and does not import crypto).
const WALSealOverhead = 12 + 16

// WAL header flags.
const (
	// WALHistory marks a timeline history file ("00000002.history")
	// instead of WAL. Its Start is 0 and End the file's length.
	WALHistory = 1 << 0

	walKnownFlags = WALHistory
)

// WALHeader is the plaintext header of a WAL object.
//
// Invariants (checked by Validate): Timeline is at least 1; Start < End and
// End-Start <= MaxWALPiece; a history piece belongs to a timeline of at
// least 2 (timeline 1 has no history file) and has Start 0.
type WALHeader struct {
	Timeline uint32
	Start    uint64 // LSN of the first byte
	End      uint64 // LSN just past the last byte
	History  bool   // a timeline history file, not WAL
}

// Len is the number of bytes the piece holds.
func (h WALHeader) Len() int64 { return int64(h.End - h.Start) }

// Validate checks the invariants above.
func (h WALHeader) Validate() error {
	switch {
	case h.Timeline == 0:
		return fmt.Errorf("%w: wal: timeline 0", ErrFormat)
	case h.End <= h.Start:
		return fmt.Errorf("%w: wal: end %X is not after start %X", ErrFormat, h.End, h.Start)
	case h.End-h.Start > MaxWALPiece:
		return fmt.Errorf("%w: wal: piece of %d bytes exceeds limit %d", ErrFormat, h.End-h.Start, MaxWALPiece)
	case h.History && h.Timeline < 2:
		return fmt.Errorf("%w: wal: history for timeline %d (the first timeline has none)", ErrFormat, h.Timeline)
	case h.History && h.Start != 0:
		return fmt.Errorf("%w: wal: history with start %X, want 0", ErrFormat, h.Start)
	}
	return nil
}

// AppendWALHeader appends the encoding of h to dst. It does not validate h.
func AppendWALHeader(dst []byte, h WALHeader) []byte {
	dst = append(dst, walMagic...)
	dst = binary.BigEndian.AppendUint32(dst, h.Timeline)
	dst = binary.BigEndian.AppendUint64(dst, h.Start)
	dst = binary.BigEndian.AppendUint64(dst, h.End)
	var flags byte
	if h.History {
		flags |= WALHistory
	}
	return append(dst, flags)
}

// ParseWALHeader decodes and validates the header at the start of data and
// returns what follows it (the sealed body, or nothing after a ranged read
// of WALHeaderSize bytes). Unknown flags are refused, so a future kind of
// piece is never mistaken for WAL.
func ParseWALHeader(data []byte) (WALHeader, []byte, error) {
	if len(data) < WALHeaderSize {
		return WALHeader{}, nil, fmt.Errorf("%w: wal: header truncated (%d of %d bytes)", ErrFormat, len(data), WALHeaderSize)
	}
	if !bytes.Equal(data[:4], walMagic) {
		return WALHeader{}, nil, fmt.Errorf("%w: wal: bad magic", ErrFormat)
	}
	flags := data[24]
	if flags&^walKnownFlags != 0 {
		return WALHeader{}, nil, fmt.Errorf("%w: wal: unknown flags %#x", ErrFormat, flags)
	}
	h := WALHeader{
		Timeline: binary.BigEndian.Uint32(data[4:]),
		Start:    binary.BigEndian.Uint64(data[8:]),
		End:      binary.BigEndian.Uint64(data[16:]),
		History:  flags&WALHistory != 0,
	}
	if err := h.Validate(); err != nil {
		return WALHeader{}, nil, err
	}
	return h, data[WALHeaderSize:], nil
}
