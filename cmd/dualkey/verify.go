package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/repo"

	"github.com/dualkey/dualkey/internal/vault/check"
)

func (a *app) verifyCmd() *cobra.Command {
	var readData bool
	c := &cobra.Command{
		Use:     "verify",
		Aliases: []string{"check"},
		Short:   "Check the repository; with --read-data, read and authenticate every byte",
		Long: `Check that every index, snapshot and tree is readable and that every blob a
snapshot needs is stored. With --read-data also read every pack whole, check its
hash and decrypt every blob. Names exactly what is damaged and which snapshots
it affects. Exit code 14 when anything is damaged.`,
		Args: cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			prog := a.newProgress("verify")
			start := time.Now()
			rep, err := check.Check(ctx, r, check.Options{ReadData: readData, Log: a.log,
				Progress: func(done, total int64) { prog.update(done, total, done == total) }})
			prog.done()
			if err != nil {
				return err
			}
			if a.jsonOut {
				type snapJSON struct {
					ID       string    `json:"id"`
					Time     time.Time `json:"time"`
					Intact   bool      `json:"intact"`
					Problems []string  `json:"problems,omitempty"`
				}
				var snaps []snapJSON
				for _, s := range rep.Snapshots {
					snaps = append(snaps, snapJSON{s.ID.String(), s.Time, s.Intact(), s.Problems})
				}
				dmg := make([]string, len(rep.Damage))
				for i, d := range rep.Damage {
					dmg[i] = d.String()
				}
				if err := a.printJSON(map[string]any{"ok": rep.OK(), "read_data": readData, "counts": rep.Counts,
					"damage": dmg, "snapshots": snaps, "unindexed_packs": len(rep.Unindexed)}); err != nil {
					return err
				}
			} else {
				ct := rep.Counts
				a.say("checked %d indexes, %d packs, %d snapshots, %d trees, %d data blobs%s in %s", ct.Indexes, ct.Packs,
					ct.Snapshots, ct.Trees, ct.DataBlobs, map[bool]string{true: fmt.Sprintf(" (%s read)", humanBytes(ct.BytesRead)), false: ""}[readData],
					time.Since(start).Round(time.Millisecond))
				if len(rep.Unindexed) > 0 {
					a.say("%d packs are in no index (a backup in progress or killed, or a lost index: 'dualkey rebuild-index' indexes them)", len(rep.Unindexed))
				}
				for _, d := range rep.Damage {
					fmt.Fprintln(a.stdout, "damaged:", d.String())
				}
				for _, s := range rep.Snapshots {
					if !s.Intact() {
						fmt.Fprintf(a.stdout, "snapshot %s (%s) is affected:\n", s.ID.String()[:10], s.Time.Local().Format(time.RFC3339))
						for _, p := range s.Problems {
							fmt.Fprintln(a.stdout, "  ", p)
						}
					}
				}
				if rep.OK() {
					a.say("no damage found")
				} else {
					a.say("%d snapshots intact, %d affected", len(rep.Intact()), len(rep.Affected()))
				}
			}
			if !rep.OK() {
				return codeError{exitDamaged, fmt.Errorf("dualkey: verify found %d damaged objects affecting %d snapshots", len(rep.Damage), len(rep.Affected()))}
			}
			return nil
		}),
	}
	c.Flags().BoolVar(&readData, "read-data", false, "read and authenticate every pack")
	return c
}

func (a *app) rebuildIndexCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rebuild-index",
		Short: "Index packs that no readable index covers, from their own headers",
		Args:  cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			res, err := check.RebuildIndex(ctx, r)
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(map[string]any{"indexed_packs": len(res.Indexed), "new_indexes": res.NewIndexes,
					"unreadable_packs": len(res.Unreadable), "removed_indexes": res.RemovedIndexes})
			}
			a.say("indexed %d packs in %d new index objects; removed %d damaged indexes", len(res.Indexed), len(res.NewIndexes), len(res.RemovedIndexes))
			for p, e := range res.Unreadable {
				fmt.Fprintf(a.stdout, "pack %s unreadable: %v\n", p, e)
			}
			if len(res.Unreadable) > 0 {
				return codeError{exitDamaged, fmt.Errorf("dualkey: %d packs could not be read", len(res.Unreadable))}
			}
			return nil
		}),
	}
}
