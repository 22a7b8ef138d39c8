package repo

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
)

// Location is where a blob is stored.
type Location struct {
	Pack format.ID
	pack.Blob
}

// Index maps blob IDs to their location. It is safe for concurrent use.
type Index struct {
	mu    sync.RWMutex
	blobs map[format.ID]Location
	packs map[format.ID]int // pack → number of blobs indexed in it
	// excluded packs were marked as garbage by a prune run: their blobs are
	// not used for deduplication, so a backup never comes to depend on a pack
	// that the next prune run may delete.
	excluded map[format.ID]bool
}

func newIndex() *Index {
	return &Index{blobs: map[format.ID]Location{}, packs: map[format.ID]int{}, excluded: map[format.ID]bool{}}
}

// Add records the blobs of a pack. A blob already known in a usable pack
// keeps its location.
func (x *Index) Add(packID format.ID, blobs []pack.Blob) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.packs[packID] += len(blobs)
	for _, b := range blobs {
		old, ok := x.blobs[b.ID]
		if ok && !x.excluded[old.Pack] {
			continue
		}
		x.blobs[b.ID] = Location{Pack: packID, Blob: b}
	}
}

// Lookup returns a blob's location.
func (x *Index) Lookup(id format.ID) (Location, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	return l, ok
}

// HasForDedup reports whether a new backup may refer to the stored blob id
// instead of storing it again.
func (x *Index) HasForDedup(id format.ID) bool {
	x.mu.RLock()
	defer x.mu.RUnlock()
	l, ok := x.blobs[id]
	return ok && !x.excluded[l.Pack]
}

// Exclude stops deduplication against the blobs of packs.
func (x *Index) Exclude(packs []format.ID) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, p := range packs {
		x.excluded[p] = true
	}
}

// Packs returns the packs the index knows, with their blob counts.
func (x *Index) Packs() map[format.ID]int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	m := make(map[format.ID]int, len(x.packs))
	for k, v := range x.packs {
		m[k] = v
	}
	return m
}

// Len is the number of distinct blobs.
func (x *Index) Len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.blobs)
}

// Each calls fn for every blob location.
func (x *Index) Each(fn func(format.ID, Location)) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	for id, l := range x.blobs {
		fn(id, l)
	}
}

// An index object's body (sealed, zstd-compressed) is a sequence of packs:
//
//	pack id [32]byte | count uint32 | count × entry
//	entry: type uint8 | flags uint8 | offset uint32 | length uint32 | raw length uint32 | id [32]byte
//
// little-endian; the plaintext header (format.AppendIndexHeader) repeats the
// pack IDs so that the vault server can read them.
const indexEntrySize = 1 + 1 + 4 + 4 + 4 + 32

// IndexPack is one pack's entry in an index object.
type IndexPack struct {
	ID    format.ID
	Blobs []pack.Blob
}

func encodeIndexBody(packs []IndexPack) []byte {
	n := 0
	for _, p := range packs {
		n += 36 + len(p.Blobs)*indexEntrySize
	}
	out := make([]byte, 0, n)
	for _, p := range packs {
		out = append(out, p.ID[:]...)
		out = binary.LittleEndian.AppendUint32(out, uint32(len(p.Blobs)))
		for _, b := range p.Blobs {
			out = append(out, byte(b.Type), b.Flags)
			out = binary.LittleEndian.AppendUint32(out, b.Offset)
			out = binary.LittleEndian.AppendUint32(out, b.Length)
			out = binary.LittleEndian.AppendUint32(out, b.RawLength)
			out = append(out, b.ID[:]...)
		}
	}
	return out
}

func decodeIndexBody(body []byte) ([]IndexPack, error) {
	var packs []IndexPack
	for len(body) > 0 {
		if len(body) < 36 {
			return nil, fmt.Errorf("repo: index body: truncated pack record")
		}
		var p IndexPack
		copy(p.ID[:], body)
		n := binary.LittleEndian.Uint32(body[32:])
		body = body[36:]
		if uint64(n)*indexEntrySize > uint64(len(body)) {
			return nil, fmt.Errorf("repo: index body: pack %s claims %d blobs, %d bytes left", p.ID, n, len(body))
		}
		p.Blobs = make([]pack.Blob, n)
		for i := range p.Blobs {
			e := body[i*indexEntrySize:]
			b := &p.Blobs[i]
			b.Type, b.Flags = pack.BlobType(e[0]), e[1]
			b.Offset = binary.LittleEndian.Uint32(e[2:])
			b.Length = binary.LittleEndian.Uint32(e[6:])
			b.RawLength = binary.LittleEndian.Uint32(e[10:])
			copy(b.ID[:], e[14:46])
			if b.Type != pack.Data && b.Type != pack.Tree {
				return nil, fmt.Errorf("repo: index body: pack %s blob %d: unknown type %d", p.ID, i, e[0])
			}
		}
		body = body[int(n)*indexEntrySize:]
		packs = append(packs, p)
	}
	return packs, nil
}
