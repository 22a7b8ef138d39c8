package retention

import (
	"context"
	"errors"
	"fmt"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// ForgetResult is the outcome for one snapshot.
type ForgetResult struct {
	ID format.ID
	// Err is nil if the snapshot object was removed. It unwraps to
	// guard.ErrLocked when a retention lock protects the snapshot.
	Err error
}

// Locked reports whether the vault refused because of a retention lock.
func (f ForgetResult) Locked() bool { return errors.Is(f.Err, guard.ErrLocked) }

// Forget removes the snapshot objects ids through r's store, which needs an
// admin store. The vault refuses snapshots under a live lock; Forget records
// that per snapshot and goes on with the others. The error joins every
// failure (nil if all were removed) and is also returned alone if ctx ends.
// Forgetting frees no space by itself: Prune collects the packs.
func Forget(ctx context.Context, r *repo.Repository, ids []format.ID) ([]ForgetResult, error) {
	out := make([]ForgetResult, 0, len(ids))
	var errs []error
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		err := r.Store().Remove(ctx, backend.Handle{Type: backend.Snapshot, Name: id.String()})
		if err != nil {
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			err = fmt.Errorf("retention: forget snapshot %s: %w", id, err)
			errs = append(errs, err)
		}
		out = append(out, ForgetResult{ID: id, Err: err})
	}
	return out, errors.Join(errs...)
}
