package check

import (
	"context"
	"fmt"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// RebuildResult says what RebuildIndex did.
type RebuildResult struct {
	// Indexed are the packs the new indexes cover.
	Indexed []format.ID
	// NewIndexes are the index objects written.
	NewIndexes []format.ID
	// Unreadable are packs no index covers whose header could not be read:
	// their blobs stay unfindable.
	Unreadable map[format.ID]error
	// RemovedIndexes are damaged indexes removed because every pack their
	// header lists is now covered by a readable index (or gone).
	RemovedIndexes []string
	// KeptIndexes are damaged indexes that could not be removed, with why.
	KeptIndexes map[string]error
}

// RebuildIndex writes new indexes for the packs in r's store that no
// readable index covers, from the packs' own headers, so that a lost or
// damaged index loses nothing; it adds them to r's in-memory index too.
// It then removes damaged indexes made redundant, which needs an admin
// store (a refusal is recorded in KeptIndexes, not returned).
//
// A backup in progress may have packs whose index it has not yet written;
// indexing them too is harmless (a blob indexed twice is found either way).
func RebuildIndex(ctx context.Context, r *repo.Repository) (*RebuildResult, error) {
	inv, err := ReadInventory(ctx, r, 2)
	if err != nil {
		return nil, err
	}
	res := &RebuildResult{Unreadable: inv.BadHeaders, KeptIndexes: map[string]error{}}
	var packs []IndexPack
	for _, id := range sortedIDs(inv.Unindexed) {
		packs = append(packs, IndexPack{ID: id, Blobs: inv.Unindexed[id]})
		res.Indexed = append(res.Indexed, id)
	}
	if len(packs) > 0 {
		names, err := r.SaveIndexes(ctx, packs)
		res.NewIndexes = names
		if err != nil {
			return res, err
		}
		for _, p := range packs {
			r.Index().Add(p.ID, p.Blobs)
		}
	}

	covered := func(p format.ID) bool {
		if _, ok := inv.Indexed[p]; ok {
			return true
		}
		if _, ok := inv.Unindexed[p]; ok {
			return true
		}
		_, onDisk := inv.Disk[p]
		return !onDisk
	}
	for _, n := range sortedKeys(inv.BadIndexes) {
		bi := inv.BadIndexes[n]
		redundant := bi.Packs != nil || len(inv.BadHeaders) == 0
		for _, p := range bi.Packs {
			if !covered(p) {
				redundant = false
				break
			}
		}
		if !redundant {
			res.KeptIndexes[n] = fmt.Errorf("check: it may cover packs no other index does")
			continue
		}
		if err := r.Store().Remove(ctx, backend.Handle{Type: backend.Index, Name: n}); err != nil {
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			res.KeptIndexes[n] = err
			continue
		}
		res.RemovedIndexes = append(res.RemovedIndexes, n)
	}
	return res, nil
}
