package main

import (
	"context"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

func init() { pgSubcommands = append(pgSubcommands, (*app).pgBasebackupCmd) }

func (a *app) pgBasebackupCmd() *cobra.Command {
	var (
		pgURL     string
		opts      pgagent.BaseBackupOptions
		checksums string
	)
	c := &cobra.Command{
		Use:   "basebackup --pg URL",
		Short: "Take a base backup of a PostgreSQL server into the vault now",
		Long: `Take a base backup over the replication protocol (BASE_BACKUP with a manifest)
and store it as a snapshot, streamed straight into the vault: nothing is written
to local disk. Table and index files are stored in 8 KiB pages, so a page
unchanged since an earlier base backup costs nothing. Every file is checked
against the server's backup manifest before the snapshot is committed; a
mismatch fails the backup and commits nothing.

WAL is not included: run 'dualkey pg agent' to stream it. The backup can be
restored once the vault holds WAL up to its end LSN.

--pgdata DIR takes a local base backup instead: when dualkey runs on the
database host as root or as the server's OS user, it reads the data directory
(and the tablespaces) itself between pg_backup_start and pg_backup_stop on an
ordinary connection, leaving out what BASE_BACKUP leaves out, and writes the
backup manifest itself. The server's walsender then neither reads nor sends the
files, which makes the backup faster and lighter on the server. DIR must be
that server's data directory (its system identifier is checked). Elsewhere,
omit --pgdata: the backup is streamed with BASE_BACKUP.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if pgURL == "" {
				pgURL = a.getenv("DUALKEY_PG")
			}
			if pgURL == "" {
				return usagef("--pg URL is required (or DUALKEY_PG)")
			}
			repURL, err := pgagent.ReplicationURL(pgURL)
			if err != nil {
				return usagef("--pg: %v", err)
			}
			opts.ManifestChecksums = checksums
			if opts.DataDir != "" {
				if opts.MaxRate != 0 {
					return usagef("--max-rate throttles BASE_BACKUP; a local base backup (--pgdata) is not throttled")
				}
				if err := pgagent.CheckDataDir(opts.DataDir); err != nil {
					return err
				}
			}
			opts.Log = a.log
			prog := a.newProgress("base backup")
			opts.Progress = prog.backup
			// The vault is opened while the server checkpoints.
			var r *repo.Repository
			defer func() {
				if r != nil {
					r.Close()
				}
			}()
			opts.Open = func(ctx context.Context) (*repo.Repository, error) {
				var err error
				r, err = a.openRepo(ctx)
				return r, err
			}
			res, err := pgagent.BaseBackup(ctx, nil, repURL, opts)
			prog.done()
			if err != nil {
				return err
			}
			m, s := res.Meta, res.Summary
			if a.jsonOut {
				return a.printJSON(map[string]any{"snapshot": res.ID.String(), "vault_time": res.Lock.Time,
					"lock_until": res.Lock.Until, "meta": m, "summary": s})
			}
			a.say("base backup of system %d (PostgreSQL %s), timeline %d, WAL %s to %s", m.SystemID, m.ServerVersion, m.Timeline, m.StartLSN, m.EndLSN)
			a.say("%d files, %s, checked against the manifest (%s); added %s in %d new blobs",
				m.Files, humanBytes(m.Size), m.FileChecksums, humanBytes(s.BytesAdded), s.BlobsAdded)
			a.say("took %s", m.EndTime.Sub(m.StartTime).Round(time.Millisecond))
			a.say("snapshot %s saved at %s (vault clock), locked until %s", res.ID.String()[:10], res.Lock.Time.Format(time.RFC3339), res.Lock.Until.Format(time.RFC3339))
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&pgURL, "pg", "", "PostgreSQL connection URL (a superuser or a role with REPLICATION; env DUALKEY_PG)")
	f.StringVar(&opts.Label, "label", "", `backup label (default "dualkey <time>")`)
	f.StringSliceVar(&opts.Tags, "tag", nil, "tag the snapshot, besides pg-base (repeatable)")
	f.StringVar(&opts.Hostname, "host", "", `host name to record (default "pg-<system identifier>")`)
	f.DurationVar(&opts.LockFor, "lock-for", 0, "retention lock longer than the repository minimum")
	f.StringVar(&checksums, "manifest-checksums", "CRC32C", "per-file checksum in the manifest: CRC32C, SHA256, SHA512, ...")
	f.IntVar(&opts.MaxRate, "max-rate", 0, "limit the server's sending to this many KiB/s (0: unlimited)")
	f.StringVar(&opts.DataDir, "pgdata", "", "take a local base backup by reading this data directory (on the database host, as root or the server's OS user)")
	return c
}
