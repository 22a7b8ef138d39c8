package main

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/repo"
)

func (a *app) vaultCmd() *cobra.Command {
	c := &cobra.Command{Use: "vault", Short: "Create and serve vaults"}
	c.AddCommand(a.vaultInitCmd(), a.vaultServeCmd(), a.vaultTokenCmd(), a.vaultExtendLocksCmd())
	c.AddCommand(a.vaultQuorumCmds()...)
	return c
}

func (a *app) vaultInitCmd() *cobra.Command {
	var (
		minRet     time.Duration
		policyFile string
		approvers  []string
		threshold  int
		noLock     bool
	)
	c := &cobra.Command{
		Use:   "init",
		Short: "Create a new repository",
		Long: `Create a new repository at --repo with a new master key wrapped by the password.

--min-retention is the shortest retention lock any snapshot gets, counted on the
vault's clock from its commit. Without an approver policy it can never be lowered.

--quorum-policy FILE (a quorum policy document) or --approver NAME=ed25519:KEY
... --threshold M stores the approver policy write-once in the config. Then
shortening a lock, lowering the minimum retention, forgetting a locked
snapshot, removing a key and rotating approvers succeed only with a quorum
certificate the vault verifies itself; without a policy, never.

--repo s3:https://host[:port]/bucket[/prefix] stores the vault in a bucket
that must have versioning and Object Lock (docs/object-lock.md); init refuses
one without them unless --no-object-lock is given.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			pol, err := initPolicy(policyFile, approvers, threshold)
			if err != nil {
				return err
			}
			st, err := a.openStoreWith(ctx, true, storeOptions{noObjectLock: noLock})
			if err != nil {
				return err
			}
			pw, err := a.password("enter a password for the new repository: ", true)
			if err != nil {
				return err
			}
			r, err := repo.Init(ctx, st, pw, repo.InitOptions{MinRetention: minRet, QuorumPolicy: pol}, repo.Options{Log: a.log})
			if err != nil {
				return err
			}
			defer r.Close()
			cfg := r.Config()
			if a.jsonOut {
				return a.printJSON(map[string]any{"id": cfg.ID, "min_retention": time.Duration(cfg.MinRetention).String(), "created": cfg.Created})
			}
			loc, _ := a.repoLocation()
			a.say("created repository %s at %s", cfg.ID[:10], loc)
			a.say("every snapshot is locked for at least %s; keep the password safe: without it the data cannot be read", time.Duration(cfg.MinRetention))
			return nil
		},
	}
	c.Flags().DurationVar(&minRet, "min-retention", 30*24*time.Hour, "shortest retention lock of every snapshot (lowered only by quorum)")
	c.Flags().StringVar(&policyFile, "quorum-policy", "", "approver policy (JSON) the vault enforces for guarded actions")
	c.Flags().StringArrayVar(&approvers, "approver", nil, "an approver NAME=ed25519:KEY (repeat), with --threshold")
	c.Flags().IntVar(&threshold, "threshold", 0, "with --approver: approvals needed for each guarded action")
	c.Flags().BoolVar(&noLock, "no-object-lock", false, "s3: accept a bucket without versioning and Object Lock (its backups are then deletable by whoever holds the bucket's credentials)")
	return c
}
