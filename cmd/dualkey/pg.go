package main

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/incident"
	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

func (a *app) pgCmd() *cobra.Command {
	c := &cobra.Command{Use: "pg", Short: "Protect PostgreSQL: stream WAL, take base backups, restore to any second"}
	c.AddCommand(a.pgAgentCmd())
	for _, f := range pgSubcommands {
		c.AddCommand(f(a))
	}
	return c
}

// pgSubcommands are added by the files that define them.
var pgSubcommands []func(*app) *cobra.Command

func (a *app) pgAgentCmd() *cobra.Command {
	var (
		opts       pgagent.AgentOptions
		noTripwire bool
	)
	c := &cobra.Command{
		Use:   "agent --pg URL",
		Short: "Stream a server's WAL into the vault continuously (and take base backups on a schedule)",
		Long: `Stream WAL over the replication protocol from a physical replication slot
(created when missing) into the vault. The server is told a position is flushed
only once the vault holds it, so the slot keeps every byte that is not yet safe.
With --synchronous the agent is a synchronous standby: commits wait for the vault
(RPO zero). Survives its own kill -9, server restarts, broken connections and vault
restarts: it resumes at the end of what the vault holds. Stop with Ctrl-C.

The tripwire decodes the same WAL as it arrives: a database dropped, tables
dropped or truncated, or more than --mass-rows rows of one table deleted or
updated in one transaction becomes an incident within moments of the commit,
whoever ran it and however they connected. Incidents go into the state store
(--state), the ledger (one alert record each), the webhook (--webhook) and the
log; "dualkey incidents list" shows them and "dualkey pg restore
--before-incident ID" restores to just before one. --no-tripwire turns it off.

--base-every D takes base backups on a schedule, with BASE_BACKUP; add
--pgdata DIR where the agent runs on the database host as root or as the
server's OS user, and they are local base backups that read the data directory
directly (see 'dualkey pg basebackup --help').`,
		Args: cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			if opts.URL == "" {
				opts.URL = a.getenv("DUALKEY_PG")
			}
			if opts.URL == "" {
				return usagef("--pg URL is required (or DUALKEY_PG)")
			}
			if opts.DataDir != "" {
				if opts.BaseEvery == 0 {
					return usagef("--pgdata is for the scheduled base backups: add --base-every")
				}
				if err := pgagent.CheckDataDir(opts.DataDir); err != nil {
					return err
				}
			}
			log := a.log
			if a.verbose == 0 {
				log = newInfoLogger(a.stderr)
			}
			opts.Log = log
			if !noTripwire {
				q, err := a.openQuorum(ctx)
				if err != nil {
					return fmt.Errorf("dualkey: the tripwire records incidents in the state store (or run with --no-tripwire): %w", err)
				}
				defer q.close(ctx)
				rec := &incident.Recorder{DB: q.db, Ledger: q.led, Log: log}
				if q.hook != nil {
					rec.Notifier = q.hook
				}
				opts.OnDetect = rec.Detect
			}
			ag := pgagent.NewAgent(r, opts)
			fmt.Fprintf(a.stdout, "streaming WAL from %s into the vault (slot %q, synchronous %v, tripwire %v)\n", redactURL(opts.URL), opts.Slot, opts.Synchronous, !noTripwire)
			err := ag.Run(ctx)
			st := ag.Status()
			fmt.Fprintf(a.stdout, "agent stopped; vault holds WAL up to %s on timeline %d\n", st.Durable, st.Timeline)
			return err
		}),
	}
	f := c.Flags()
	f.StringVar(&opts.URL, "pg", "", "PostgreSQL connection URL (a superuser or a role with REPLICATION)")
	f.StringVar(&opts.Slot, "slot", "dualkey", "physical replication slot (and application_name)")
	f.BoolVar(&opts.Synchronous, "synchronous", false, "be a synchronous standby: commits wait until the vault holds them")
	f.DurationVar(&opts.FlushEvery, "flush-every", 200*time.Millisecond, "store received WAL at least this often (the RPO when not synchronous)")
	f.Int64Var(&opts.RetainWarn, "retain-warn", 1<<30, "warn when the slot holds more WAL than this many bytes")
	f.DurationVar(&opts.BaseEvery, "base-every", 0, "take a base backup this often (e.g. 24h; 0: never)")
	f.StringVar(&opts.DataDir, "pgdata", "", "scheduled base backups read this data directory directly (on the database host, as root or the server's OS user)")
	f.BoolVar(&noTripwire, "no-tripwire", false, "do not decode the WAL for drops, truncates and mass deletes")
	f.Int64Var(&opts.Tripwire.MassRows, "mass-rows", 10000, "tripwire: rows of one table one transaction must delete or update to raise an incident")
	f.DurationVar(&opts.NamesEvery, "names-every", 30*time.Second, "tripwire: reread table names from the server this often (also after DDL)")
	return c
}

// redactURL hides a password in a connection URL for printing.
func redactURL(u string) string {
	return passwordRE.ReplaceAllString(u, "$1:***@")
}
