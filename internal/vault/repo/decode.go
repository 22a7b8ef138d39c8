package repo

import (
	"fmt"

	"github.com/klauspost/compress/s2"

	"github.com/dualkey/dualkey/internal/vault/pack"
)

// BlobBuf holds the scratch buffers of DecodeBlobBuf, for a caller that
// decodes many blobs one after another (a restore worker): two fresh
// buffers per 8 KiB page were a quarter of a base backup restore's CPU
// in allocation and garbage collection.
type BlobBuf struct{ opened, plain []byte }

// DecodeBlobBuf is DecodeBlob into b's buffers: the result is valid until
// the next call with b.
func (r *Repository) DecodeBlobBuf(loc Location, sealed []byte, b *BlobBuf) ([]byte, error) {
	if len(sealed) != int(loc.Length) {
		return nil, fmt.Errorf("%w: blob %s in pack %s: %d bytes, want %d", ErrDamaged, loc.ID, loc.Pack, len(sealed), loc.Length)
	}
	plain, err := r.key.Open(b.opened[:0], sealed)
	if err != nil {
		return nil, fmt.Errorf("%w: blob %s in pack %s: %v", ErrDamaged, ID(loc.ID), loc.Pack, err)
	}
	b.opened = plain
	switch loc.Flags {
	case 0:
	case pack.FlagS2:
		n, err := s2.DecodedLen(plain)
		if err != nil || n != int(loc.RawLength) {
			return nil, fmt.Errorf("%w: blob %s in pack %s: S2 block of %d bytes (%v), want %d", ErrDamaged, ID(loc.ID), loc.Pack, n, err, loc.RawLength)
		}
		if cap(b.plain) < n {
			b.plain = make([]byte, n)
		}
		if plain, err = s2.Decode(b.plain[:n], plain); err != nil {
			return nil, fmt.Errorf("%w: blob %s in pack %s: decompress: %v", ErrDamaged, ID(loc.ID), loc.Pack, err)
		}
		b.plain = plain
	case pack.FlagZstd:
		if cap(b.plain) < int(loc.RawLength) {
			b.plain = make([]byte, 0, loc.RawLength)
		}
		plain, err = r.dec.DecodeAll(plain, b.plain[:0])
		if err != nil {
			return nil, fmt.Errorf("%w: blob %s in pack %s: decompress: %v", ErrDamaged, ID(loc.ID), loc.Pack, err)
		}
		b.plain = plain
	default:
		return nil, fmt.Errorf("%w: blob %s in pack %s: unknown flags %#x", ErrDamaged, ID(loc.ID), loc.Pack, loc.Flags)
	}
	if len(plain) != int(loc.RawLength) || r.key.ID(plain) != loc.ID {
		return nil, fmt.Errorf("%w: blob %s in pack %s: content does not match its ID", ErrDamaged, ID(loc.ID), loc.Pack)
	}
	return plain, nil
}
