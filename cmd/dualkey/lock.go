package main

import (
	"context"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

func (a *app) lockCmd() *cobra.Command {
	var (
		until    time.Time
		untilStr string
		forDur   time.Duration
		certFile string
	)
	c := &cobra.Command{
		Use:   "lock SNAPSHOT (--until TIME | --for DURATION)",
		Short: "Extend a snapshot's retention lock (locks are never shortened)",
		Long: `Extend the retention lock of SNAPSHOT to --until (RFC 3339) or to now + --for,
on the vault's clock. The vault writes a new lock record; nothing, not even an
admin token, can shorten a lock or remove a live one. An append token may extend.`,
		Args: cobra.ExactArgs(1),
		PreRunE: func(*cobra.Command, []string) error {
			switch {
			case (untilStr == "") == (forDur == 0):
				return usagef("give exactly one of --until and --for")
			case untilStr != "":
				t, err := time.Parse(time.RFC3339, untilStr)
				if err != nil {
					return usagef("--until: %v", err)
				}
				until = t
			default:
				until = time.Now().Add(forDur)
			}
			return nil
		},
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, args []string) error {
			si, err := r.FindSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			if certFile != "" {
				return a.runCertified(ctx, r, guard.ShortenLockAction(si.ID, until), certFile)
			}
			rec, err := r.Store().ExtendLock(ctx, si.ID, until)
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(rec)
			}
			a.say("snapshot %s locked until %s", si.ID.String()[:10], rec.Until.Format(time.RFC3339))
			return nil
		}),
	}
	c.Flags().StringVar(&untilStr, "until", "", "lock until this time (RFC 3339)")
	c.Flags().DurationVar(&forDur, "for", 0, "lock for this long from now")
	c.Flags().StringVar(&certFile, "certificate", "", "shorten under this quorum certificate (JSON)")
	return c
}
