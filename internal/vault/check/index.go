package check

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// IndexPack is one pack's record in an index object.
type IndexPack = repo.IndexPack

// LoadIndex reads index object name from the store and decodes it. Errors
// unwrap to repo.ErrDamaged for damaged bytes and to backend.ErrNotExist for
// a missing object; KindOf tells which damage it is. hdrPacks is the pack
// list of the plaintext header whenever that much could be parsed, even if
// the rest is damaged.
func LoadIndex(ctx context.Context, r *repo.Repository, name string) (packs []IndexPack, hdrPacks []format.ID, err error) {
	h := backend.Handle{Type: backend.Index, Name: name}
	data, err := r.Store().Load(ctx, h, 0, 0)
	if err != nil {
		if errors.Is(err, backend.ErrNotExist) {
			return nil, nil, kindErr(Missing, fmt.Errorf("check: index %s: %w", name, err))
		}
		return nil, nil, fmt.Errorf("check: load index %s: %w", name, err)
	}
	damaged := func(k Kind, format string, args ...any) error {
		return kindErr(k, fmt.Errorf("%w: index %s: %s", repo.ErrDamaged, name, fmt.Sprintf(format, args...)))
	}
	hdrPacks, sealed, herr := format.ParseIndexHeader(data)
	if id := format.Hash(data); id.String() != name {
		k := HashMismatch
		if indexTruncated(data) || herr == nil && len(sealed) < crypto.Overhead {
			k = Truncated
		}
		return nil, hdrPacks, damaged(k, "content does not match its name (%d bytes hash to %s)", len(data), id.String()[:12])
	}
	if herr != nil {
		return nil, nil, damaged(Malformed, "%v", herr)
	}
	packs, err = r.DecodeIndex(name, data)
	if err != nil {
		k := Malformed
		if errors.Is(err, crypto.ErrUnauthenticated) {
			k = Unauthenticated
		}
		return nil, hdrPacks, kindErr(k, err)
	}
	return packs, hdrPacks, nil
}

// indexTruncated reports whether data is shorter than its own header says.
func indexTruncated(data []byte) bool {
	if len(data) < format.IndexHeaderSize(0) {
		return true
	}
	if string(data[:4]) != "DKI1" {
		return false
	}
	n := binary.BigEndian.Uint32(data[4:])
	return n <= format.MaxIndexPacks && len(data) < format.IndexHeaderSize(int(n))
}

// ReadPackHeader reads the sealed header at the end of pack id, which is
// size bytes long, with two ranged loads.
func ReadPackHeader(ctx context.Context, r *repo.Repository, id format.ID, size int64) ([]pack.Blob, error) {
	h := backend.Handle{Type: backend.Pack, Name: id.String()}
	if size < 4 {
		return nil, kindErr(Truncated, fmt.Errorf("%w: pack %s: %d bytes", repo.ErrDamaged, id, size))
	}
	tail, err := r.Store().Load(ctx, h, size-4, 4)
	if err != nil {
		return nil, loadErr(h, err)
	}
	n, err := pack.HeaderLength(tail, size)
	if err != nil {
		return nil, kindErr(Malformed, fmt.Errorf("%w: pack %s: %v", repo.ErrDamaged, id, err))
	}
	sealed, err := r.Store().Load(ctx, h, size-4-int64(n), int64(n))
	if err != nil {
		return nil, loadErr(h, err)
	}
	blobs, err := pack.ParseHeader(r.Key(), sealed, size)
	if err != nil {
		return nil, headerErr(id, err)
	}
	return blobs, nil
}

func headerErr(id format.ID, err error) error {
	k := Malformed
	if errors.Is(err, crypto.ErrUnauthenticated) {
		k = Unauthenticated
	}
	return kindErr(k, fmt.Errorf("%w: pack %s: %v", repo.ErrDamaged, id, err))
}

func loadErr(h backend.Handle, err error) error {
	if errors.Is(err, backend.ErrNotExist) {
		return kindErr(Missing, fmt.Errorf("check: %v: %w", h, err))
	}
	return fmt.Errorf("check: load %v: %w", h, err)
}

// packSize is the size a pack holding exactly blobs must have: the blobs,
// the sealed header of one entry per blob, and the 4-byte header length.
func packSize(blobs []pack.Blob) int64 {
	var end int64
	for _, b := range blobs {
		end = max(end, int64(b.Offset)+int64(b.Length))
	}
	return end + crypto.Overhead + int64(len(blobs))*pack.EntrySize + 4
}
