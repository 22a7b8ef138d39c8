package check

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/pack"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// Kind says why an object is damaged.
type Kind string

// The kinds of damage Check reports.
const (
	Missing         Kind = "missing"
	Truncated       Kind = "truncated"
	HashMismatch    Kind = "hash mismatch"         // the bytes do not hash to the object's name
	Unauthenticated Kind = "authentication failed" // AES-GCM refused the ciphertext
	Malformed       Kind = "malformed"             // authentic (or plaintext) but does not decode
	SizeMismatch    Kind = "size mismatch"         // larger than its index says
	IndexMismatch   Kind = "differs from index"    // pack header and index disagree
	Unindexed       Kind = "in no index"           // needed blobs are only in a pack no index covers
)

type kindError struct {
	kind Kind
	err  error
}

func (e *kindError) Error() string { return e.err.Error() }
func (e *kindError) Unwrap() error { return e.err }

func kindErr(k Kind, err error) error { return &kindError{kind: k, err: err} }

// KindOf returns the damage kind carried by err (as returned by LoadIndex
// and ReadPackHeader), or "" if err is not a recognised damage.
func KindOf(err error) Kind {
	var ke *kindError
	if errors.As(err, &ke) {
		return ke.kind
	}
	return ""
}

// Inventory is what a repository holds, read afresh from its store rather
// than taken from a Repository's in-memory index (which may be stale, or
// may have skipped an unreadable index at Open).
type Inventory struct {
	// Indexes are the readable index objects.
	Indexes map[string][]IndexPack
	// BadIndexes are the unreadable ones, with the packs their plaintext
	// header lists when that much could be read.
	BadIndexes map[string]BadIndex
	// Indexed maps every pack a readable index covers to its blobs.
	Indexed map[format.ID][]pack.Blob
	// Disk maps every pack in the store to its size.
	Disk map[format.ID]int64
	// Unindexed maps packs on disk that no readable index covers to the
	// blobs their own headers list.
	Unindexed map[format.ID][]pack.Blob
	// BadHeaders are unindexed packs whose header could not be read.
	BadHeaders map[format.ID]error

	blobs map[format.ID][]repo.Location // indexed locations first
}

// BadIndex is an index object that could not be read.
type BadIndex struct {
	Err   error
	Packs []format.ID // from the plaintext header; nil if unreadable
}

// ReadInventory lists and reads every index, lists the packs, and reads the
// headers of packs no readable index covers (so that a lost index hides
// nothing). Errors are returned only for failures to talk to the store;
// damaged objects are recorded in the Inventory.
func ReadInventory(ctx context.Context, r *repo.Repository, workers int) (*Inventory, error) {
	workers = max(workers, 1)
	inv := &Inventory{
		Indexes:    map[string][]IndexPack{},
		BadIndexes: map[string]BadIndex{},
		Indexed:    map[format.ID][]pack.Blob{},
		Disk:       map[format.ID]int64{},
		Unindexed:  map[format.ID][]pack.Blob{},
		BadHeaders: map[format.ID]error{},
		blobs:      map[format.ID][]repo.Location{},
	}
	names, err := listNames(ctx, r, backend.Index)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(workers * 2)
	for _, n := range names {
		g.Go(func() error {
			packs, hdr, err := LoadIndex(gctx, r, n)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				inv.Indexes[n] = packs
			case KindOf(err) == Missing:
				// Removed since the listing (a concurrent prune): not damage.
			case KindOf(err) != "":
				inv.BadIndexes[n] = BadIndex{Err: err, Packs: hdr}
			default:
				return err
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	for _, n := range sortedKeys(inv.Indexes) {
		for _, p := range inv.Indexes[n] {
			inv.Indexed[p.ID] = mergeBlobs(inv.Indexed[p.ID], p.Blobs)
		}
	}

	err = r.Store().List(ctx, backend.Pack, func(fi backend.Info) error {
		id, err := format.ParseID(fi.Name)
		if err == nil {
			inv.Disk[id] = fi.Size
		}
		return ctx.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("check: list packs: %w", err)
	}

	g, gctx = errgroup.WithContext(ctx)
	g.SetLimit(workers * 2)
	for id, size := range inv.Disk {
		if _, ok := inv.Indexed[id]; ok {
			continue
		}
		g.Go(func() error {
			blobs, err := ReadPackHeader(gctx, r, id, size)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				inv.Unindexed[id] = blobs
			case KindOf(err) == Missing:
			case KindOf(err) != "":
				inv.BadHeaders[id] = err
			default:
				return err
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}

	for _, m := range []map[format.ID][]pack.Blob{inv.Indexed, inv.Unindexed} {
		for _, id := range sortedIDs(m) {
			for _, b := range m[id] {
				inv.blobs[b.ID] = append(inv.blobs[b.ID], repo.Location{Pack: id, Blob: b})
			}
		}
	}
	return inv, nil
}

// Lookup returns every known location of blob id, those from readable
// indexes first.
func (inv *Inventory) Lookup(id format.ID) []repo.Location { return inv.blobs[id] }

// IsIndexed reports whether loc's pack is covered by a readable index.
func (inv *Inventory) IsIndexed(loc repo.Location) bool {
	_, ok := inv.Indexed[loc.Pack]
	return ok
}

// LoadBlob reads blob id of type t from the first of its locations that
// yields it intact.
func (inv *Inventory) LoadBlob(ctx context.Context, r *repo.Repository, t pack.BlobType, id format.ID) ([]byte, error) {
	locs := inv.blobs[id]
	if len(locs) == 0 {
		return nil, kindErr(Missing, fmt.Errorf("check: %s blob %s: in no index or pack header", t, id))
	}
	var errs []error
	for _, loc := range locs {
		if loc.Type != t {
			errs = append(errs, kindErr(Malformed, fmt.Errorf("%w: blob %s in pack %s is %s, not %s", repo.ErrDamaged, id, loc.Pack, loc.Type, t)))
			continue
		}
		b, err := loadAt(ctx, r, loc)
		if err == nil {
			return b, nil
		}
		errs = append(errs, err)
	}
	return nil, errs[0]
}

// loadAt loads and decodes the blob at loc, classifying failures.
func loadAt(ctx context.Context, r *repo.Repository, loc repo.Location) ([]byte, error) {
	h := backend.Handle{Type: backend.Pack, Name: loc.Pack.String()}
	sealed, err := r.Store().Load(ctx, h, int64(loc.Offset), int64(loc.Length))
	if err != nil {
		if errors.Is(err, backend.ErrNotExist) {
			return nil, kindErr(Missing, fmt.Errorf("check: blob %s: pack %s: %w", format.ID(loc.ID), loc.Pack, err))
		}
		if ctx.Err() != nil {
			return nil, err
		}
		// A range past the end of the object: the pack was cut short.
		return nil, kindErr(Truncated, fmt.Errorf("check: blob %s in pack %s: %w", format.ID(loc.ID), loc.Pack, err))
	}
	return decodeAt(r, loc, sealed)
}

func decodeAt(r *repo.Repository, loc repo.Location, sealed []byte) ([]byte, error) {
	plain, err := r.DecodeBlob(loc, sealed)
	if err == nil {
		return plain, nil
	}
	if _, oerr := r.Key().Open(nil, sealed); oerr != nil {
		return nil, kindErr(Unauthenticated, err)
	}
	return nil, kindErr(Malformed, err)
}

// mergeBlobs adds to have the blobs of more at offsets not yet present.
func mergeBlobs(have, more []pack.Blob) []pack.Blob {
	if have == nil {
		return slices.Clone(more)
	}
	seen := make(map[uint32]bool, len(have))
	for _, b := range have {
		seen[b.Offset] = true
	}
	for _, b := range more {
		if !seen[b.Offset] {
			have = append(have, b)
			seen[b.Offset] = true
		}
	}
	return have
}

func listNames(ctx context.Context, r *repo.Repository, t backend.Type) ([]string, error) {
	var names []string
	err := r.Store().List(ctx, t, func(fi backend.Info) error {
		names = append(names, fi.Name)
		return ctx.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("check: list %s: %w", t, err)
	}
	slices.Sort(names)
	return names, nil
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

func sortedIDs[V any](m map[format.ID]V) []format.ID {
	out := make([]format.ID, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	SortIDs(out)
	return out
}

// SortIDs sorts ids bytewise, which is also their hex order.
func SortIDs(ids []format.ID) {
	slices.SortFunc(ids, func(a, b format.ID) int { return slices.Compare(a[:], b[:]) })
}
