package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/retention"
)

func (a *app) forgetCmd() *cobra.Command {
	var (
		p      retention.Policy
		dryRun bool
		prune  bool
		grace  time.Duration
		certF  string
	)
	c := &cobra.Command{
		Use:   "forget [SNAPSHOT...] | --keep-within D ...",
		Short: "Remove snapshots by ID or by a time-based policy (never a locked one)",
		Long: `Remove snapshots named by ID, or all that a time-based policy does not keep.
Policies count time on the vault's clock, never numbers of snapshots, so a
flood of junk snapshots cannot push real ones out: there is no --keep-last.
A snapshot under a retention lock is always kept; the vault refuses it anyway.
Forgetting frees no space until 'dualkey prune' (or --prune).

With --certificate FILE (a quorum certificate for vault:snapshot.forget), one
SNAPSHOT is forgotten even under its lock, after the vault verified the
certificate itself; its packs stay locked until the lock records expire.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if len(args) > 0 && !p.Empty() {
				return usagef("give snapshot IDs or a policy, not both")
			}
			if len(args) == 0 && p.Empty() {
				return usageError{retention.ErrEmptyPolicy}
			}
			r, err := a.openRepo(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			if certF != "" {
				if len(args) != 1 {
					return usagef("--certificate forgets exactly one snapshot")
				}
				si, err := r.FindSnapshot(ctx, args[0])
				if err != nil {
					return err
				}
				return a.runCertified(ctx, r, guard.ForgetAction(si.ID), certF)
			}
			var ids []format.ID
			if len(args) > 0 {
				for _, ref := range args {
					si, err := r.FindSnapshot(ctx, ref)
					if err != nil {
						return err
					}
					ids = append(ids, si.ID)
				}
			} else {
				snaps, _, err := r.Snapshots(ctx)
				if err != nil {
					return err
				}
				keep, forget, err := retention.Plan(snaps, p, time.Now())
				if err != nil {
					return usageError{err}
				}
				for _, d := range keep {
					a.say("keep   %s  %s  %s", d.Snapshot.ID.String()[:10], d.Snapshot.When().Local().Format("2006-01-02 15:04:05"), d.Reason())
				}
				for _, d := range forget {
					a.say("forget %s  %s", d.Snapshot.ID.String()[:10], d.Snapshot.When().Local().Format("2006-01-02 15:04:05"))
					ids = append(ids, d.Snapshot.ID)
				}
			}
			if dryRun {
				a.say("dry run: nothing removed")
				return nil
			}
			res, ferr := retention.Forget(ctx, r, ids)
			locked := 0
			var out []map[string]string
			for _, fr := range res {
				status := "removed"
				if fr.Err != nil {
					status = fr.Err.Error()
					if fr.Locked() {
						locked++
					}
				}
				out = append(out, map[string]string{"id": fr.ID.String(), "status": status})
				a.say("%s: %s", fr.ID.String()[:10], status)
			}
			if a.jsonOut {
				if err := a.printJSON(out); err != nil {
					return err
				}
			}
			if ferr != nil {
				if locked > 0 {
					return codeError{exitRefused, fmt.Errorf("dualkey: %d snapshots are under a retention lock and were kept: %w", locked, ferr)}
				}
				return ferr
			}
			if prune {
				return a.runPrune(cmd, r, retention.PruneOptions{Grace: grace})
			}
			return nil
		},
	}
	f := c.Flags()
	f.DurationVar(&p.Within, "keep-within", 0, "keep every snapshot from this long ago until now")
	f.DurationVar(&p.Hourly, "keep-hourly", 0, "keep the newest snapshot of each hour within this span")
	f.DurationVar(&p.Daily, "keep-daily", 0, "keep the newest snapshot of each day within this span")
	f.DurationVar(&p.Weekly, "keep-weekly", 0, "keep the newest snapshot of each week within this span")
	f.DurationVar(&p.Monthly, "keep-monthly", 0, "keep the newest snapshot of each month within this span")
	f.DurationVar(&p.Yearly, "keep-yearly", 0, "keep the newest snapshot of each year within this span")
	f.StringSliceVar(&p.Tags, "tag", nil, "apply the policy only to snapshots with one of these tags")
	f.StringVar(&p.Host, "host", "", "apply the policy only to snapshots of this host")
	f.BoolVarP(&dryRun, "dry-run", "n", false, "show what would be removed")
	f.BoolVar(&prune, "prune", false, "run prune afterwards")
	f.StringVar(&certF, "certificate", "", "forget one locked snapshot under this quorum certificate (JSON)")
	f.DurationVar(&grace, "grace", retention.DefaultGrace, "with --prune: the grace period (see prune)")
	return c
}

func (a *app) pruneCmd() *cobra.Command {
	var opts retention.PruneOptions
	c := &cobra.Command{
		Use:   "prune",
		Short: "Delete packs no snapshot needs, in two phases, without a lock file",
		Long: `Delete packs that no snapshot needs. A pack is deleted only when an earlier
prune run marked it and the grace period has passed since, and when no live
retention lock lists it: two phases, safe against a backup running meanwhile,
with no lock file. A first run only marks.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := a.openRepo(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Close()
			return a.runPrune(cmd, r, opts)
		},
	}
	c.Flags().DurationVar(&opts.Grace, "grace", retention.DefaultGrace, "how long a pack must stay marked before it is deleted")
	c.Flags().BoolVarP(&opts.DryRun, "dry-run", "n", false, "show what would be deleted")
	return c
}

func (a *app) runPrune(cmd *cobra.Command, r *repo.Repository, opts retention.PruneOptions) error {
	opts.Log = a.log
	rep, err := retention.Prune(cmd.Context(), r, opts)
	if err != nil {
		return err
	}
	if a.jsonOut {
		return a.printJSON(rep)
	}
	a.say("%d snapshots need %d packs; %d packs unused", rep.Snapshots, rep.UsedPacks, len(rep.Candidates))
	a.say("deleted %d packs (%s freed); marked %d for a later run; %d kept (%s)", len(rep.Deleted), humanBytes(rep.BytesFreed),
		len(rep.Marked), len(rep.Kept), "see -v for why")
	for p, why := range rep.Kept {
		a.log.Info("pack kept", "pack", p.String()[:12], "why", why)
	}
	if len(rep.Missing) > 0 {
		fmt.Fprintf(a.stderr, "dualkey: %d blobs that snapshots need are missing: run 'dualkey verify --read-data'\n", len(rep.Missing))
	}
	if rep.DryRun {
		a.say("dry run: nothing removed")
	}
	return nil
}
