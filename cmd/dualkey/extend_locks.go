package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/guard"
)

// objectLocker is a store that can bring the storage's object locks in
// step with the vault's lock records: an in-process guard session.
type objectLocker interface {
	ExtendObjectLocks(ctx context.Context, log *slog.Logger) (guard.LockReport, error)
}

func (a *app) vaultExtendLocksCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "extend-locks",
		Short: "Extend the storage's Object Lock of every object to the date the vault's locks need",
		Long: `On S3 with Object Lock, extend each object's COMPLIANCE retention to the date
it needs: a snapshot, its lock records, its packs and their indexes until the
snapshot's lock; the config, keys, ledger objects and quorum records until the
latest lock in force (at least the minimum retention from now). Retention is
only ever extended. Run it daily (the vault server runs it every hour); if it
stops, the objects stay locked until the dates last set. The password is not
needed. Costs: docs/object-lock.md.

On a directory vault there is nothing to do.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			st, err := a.openStore(ctx, false)
			if err != nil {
				return err
			}
			l, ok := st.(objectLocker)
			if !ok {
				return usagef("extend-locks runs where the vault's storage is reachable (--repo s3:... or a directory); a vault server runs it itself")
			}
			rep, err := l.ExtendObjectLocks(ctx, a.log)
			if a.jsonOut {
				if perr := a.printJSON(map[string]any{
					"object_lock": rep.ObjectLock, "horizon": rep.Horizon, "checked": rep.Checked,
					"extended": rep.Extended, "failed": rep.Failed,
				}); perr != nil {
					return perr
				}
				return err
			}
			if err != nil {
				return err
			}
			if !rep.ObjectLock {
				a.say("this vault's storage has no object lock: nothing to extend")
				return nil
			}
			a.say("%d objects checked, %d extended; never-removed objects locked until %s",
				rep.Checked, rep.Extended, rep.Horizon.Format(time.RFC3339))
			return nil
		},
	}
}
