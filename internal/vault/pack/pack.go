// Package pack reads and writes pack files: many sealed blobs followed by a
// sealed header that says where each one is.
//
//	blob_1 | ... | blob_n | Seal(header) | uint32 little-endian len(Seal(header))
//
// Each blob is sealed on its own (nonce || ciphertext || tag), so one blob
// can be read with a single ranged load. The header is a sequence of fixed
// 42-byte entries:
//
//	type uint8 | flags uint8 | stored length uint32 | raw length uint32 | id [32]byte
//
// where flags bit 0 means the blob was zstd-compressed before sealing. All
// integers are little-endian. A pack is named by the hash of its bytes (format.Hash).
package pack

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dualkey/dualkey/internal/vault/crypto"
)

// BlobType separates file content from tree metadata.
type BlobType uint8

const (
	Data BlobType = 1
	Tree BlobType = 2
)

func (t BlobType) String() string {
	switch t {
	case Data:
		return "data"
	case Tree:
		return "tree"
	}
	return fmt.Sprintf("blobtype(%d)", uint8(t))
}

// Flag bits: how a blob's plaintext was compressed before sealing (none:
// stored as is). At most one is set.
const (
	FlagZstd = 1 // a zstd frame
	FlagS2   = 2 // an S2 block (github.com/klauspost/compress/s2): database pages
)

// KnownFlags are the flag values a reader understands.
func KnownFlags(f uint8) bool { return f == 0 || f == FlagZstd || f == FlagS2 }

// EntrySize is the encoded size of one header entry.
const EntrySize = 1 + 1 + 4 + 4 + 32

// MaxEntries bounds a header so a forged pack cannot make a reader allocate
// without limit (a 256 MiB pack of 8 KiB pages holds 32768 blobs).
const MaxEntries = 1 << 20

// ErrFormat is wrapped by every structural error.
var ErrFormat = errors.New("pack: malformed")

// Blob describes one blob in a pack.
type Blob struct {
	Type      BlobType
	Flags     uint8
	ID        [32]byte
	Offset    uint32 // of the sealed blob within the pack
	Length    uint32 // sealed length
	RawLength uint32 // plaintext length after decompression
}

// Writer accumulates sealed blobs in memory.
type Writer struct {
	key   *crypto.Key
	buf   []byte
	blobs []Blob
}

// NewWriter returns a Writer sealing its header with key.
func NewWriter(key *crypto.Key, sizeHint int) *Writer {
	return &Writer{key: key, buf: make([]byte, 0, sizeHint)}
}

// NewWriterBuf is NewWriter writing into buf's memory (a buffer recycled
// from an earlier pack: fresh memory costs a page fault per 4 KiB).
func NewWriterBuf(key *crypto.Key, buf []byte) *Writer {
	return &Writer{key: key, buf: buf[:0]}
}

// Add appends an already sealed blob.
func (w *Writer) Add(t BlobType, id [32]byte, flags uint8, rawLen int, sealed []byte) Blob {
	b := Blob{Type: t, Flags: flags, ID: id, Offset: uint32(len(w.buf)), Length: uint32(len(sealed)), RawLength: uint32(rawLen)}
	w.buf = append(w.buf, sealed...)
	w.blobs = append(w.blobs, b)
	return b
}

// Size is the number of bytes written so far, without the header.
func (w *Writer) Size() int { return len(w.buf) }

// Count is the number of blobs added.
func (w *Writer) Count() int { return len(w.blobs) }

// Finish appends the sealed header and returns the pack bytes and its blobs.
// The Writer must not be used afterwards.
func (w *Writer) Finish() ([]byte, []Blob) {
	hdr := make([]byte, 0, len(w.blobs)*EntrySize)
	for _, b := range w.blobs {
		hdr = appendEntry(hdr, b)
	}
	sealed := w.key.Seal(nil, hdr)
	w.buf = append(w.buf, sealed...)
	w.buf = binary.LittleEndian.AppendUint32(w.buf, uint32(len(sealed)))
	return w.buf, w.blobs
}

func appendEntry(dst []byte, b Blob) []byte {
	dst = append(dst, byte(b.Type), b.Flags)
	dst = binary.LittleEndian.AppendUint32(dst, b.Length)
	dst = binary.LittleEndian.AppendUint32(dst, b.RawLength)
	return append(dst, b.ID[:]...)
}

// HeaderLength returns the length of the sealed header from the last four
// bytes of a pack, checked against the pack's size.
func HeaderLength(tail []byte, packSize int64) (int, error) {
	if len(tail) < 4 {
		return 0, fmt.Errorf("%w: pack of %d bytes has no header length", ErrFormat, packSize)
	}
	n := int64(binary.LittleEndian.Uint32(tail[len(tail)-4:]))
	if n < crypto.Overhead || n+4 > packSize || (n-crypto.Overhead)%EntrySize != 0 || (n-crypto.Overhead)/EntrySize > MaxEntries {
		return 0, fmt.Errorf("%w: header length %d does not fit a pack of %d bytes", ErrFormat, n, packSize)
	}
	return int(n), nil
}

// ParseHeader opens a sealed header and decodes its entries, checking that
// every blob lies inside the data part of a pack of packSize bytes.
func ParseHeader(key *crypto.Key, sealed []byte, packSize int64) ([]Blob, error) {
	hdr, err := key.Open(nil, sealed)
	if err != nil {
		return nil, fmt.Errorf("pack: header: %w", err)
	}
	return decodeEntries(hdr, packSize-int64(len(sealed))-4)
}

func decodeEntries(hdr []byte, dataEnd int64) ([]Blob, error) {
	if len(hdr)%EntrySize != 0 {
		return nil, fmt.Errorf("%w: header of %d bytes is not whole entries", ErrFormat, len(hdr))
	}
	blobs := make([]Blob, 0, len(hdr)/EntrySize)
	var off int64
	for p := hdr; len(p) > 0; p = p[EntrySize:] {
		b := Blob{Type: BlobType(p[0]), Flags: p[1],
			Length:    binary.LittleEndian.Uint32(p[2:]),
			RawLength: binary.LittleEndian.Uint32(p[6:])}
		copy(b.ID[:], p[10:42])
		if b.Type != Data && b.Type != Tree {
			return nil, fmt.Errorf("%w: blob %d has unknown type %d", ErrFormat, len(blobs), p[0])
		}
		if !KnownFlags(b.Flags) {
			return nil, fmt.Errorf("%w: blob %d has unknown flags %#x", ErrFormat, len(blobs), b.Flags)
		}
		if b.Length < crypto.Overhead || off+int64(b.Length) > dataEnd {
			return nil, fmt.Errorf("%w: blob %d (%d bytes at %d) runs past the data end %d", ErrFormat, len(blobs), b.Length, off, dataEnd)
		}
		b.Offset = uint32(off)
		off += int64(b.Length)
		blobs = append(blobs, b)
	}
	if off != dataEnd {
		return nil, fmt.Errorf("%w: blobs cover %d bytes, data part is %d", ErrFormat, off, dataEnd)
	}
	return blobs, nil
}

// Parse reads the header of a whole pack held in memory.
func Parse(key *crypto.Key, packBytes []byte) ([]Blob, error) {
	n, err := HeaderLength(packBytes, int64(len(packBytes)))
	if err != nil {
		return nil, err
	}
	end := len(packBytes) - 4
	return ParseHeader(key, packBytes[end-n:end], int64(len(packBytes)))
}
