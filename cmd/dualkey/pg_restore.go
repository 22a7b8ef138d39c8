package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/pgagent"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/state"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/restorer"
)

func init() {
	pgSubcommands = append(pgSubcommands, (*app).pgRestoreCmd, (*app).pgBackupsCmd, (*app).pgWalFetchCmd)
}

func (a *app) pgBackupsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "backups",
		Short: "List base backups and the recoverable window (earliest and latest restorable time)",
		Long: `List the base backups in the vault, oldest first, with how far the WAL in the
vault reaches from each, and the recoverable window: from the end of the oldest
usable base backup to the last WAL the vault holds. The latest time is when the
vault received that WAL (an upper bound of the last commit); a restore with
--latest replays every byte regardless.`,
		Args: cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			bs, w, err := pgagent.Backups(ctx, r)
			if err != nil {
				return err
			}
			if a.jsonOut {
				if bs == nil {
					bs = []pgagent.BaseBackupInfo{}
				}
				return a.printJSON(map[string]any{"backups": bs, "window": w})
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tVault time\tTimeline\tStart LSN\tEnd LSN\tEnd time\tSize\tWAL reaches\tUsable")
			for _, b := range bs {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%v\n", b.ID.String()[:10], b.VaultTime.Local().Format("2006-01-02 15:04:05"),
					b.Meta.Timeline, b.Meta.StartLSN, b.Meta.EndLSN, b.Meta.EndTime.Local().Format("2006-01-02 15:04:05"),
					humanBytes(b.Meta.Size), b.WALReach, b.Usable)
			}
			tw.Flush()
			if w.IsZero() {
				a.say("nothing restorable: no base backup has its WAL in the vault")
				return nil
			}
			a.say("recoverable window: %s to %s (timeline %d, WAL to %s)", w.Earliest.Local().Format(time.RFC3339),
				w.Latest.Local().Format(time.RFC3339), w.Timeline, w.LatestLSN)
			return nil
		}),
	}
}

func (a *app) pgRestoreCmd() *cobra.Command {
	var (
		opts       pgagent.RestoreOptions
		timeFlag   string
		lsnFlag    string
		xidFlag    string
		incidentID string
		fetchCmd   string
		serverSet  []string
		tsMap      []string
	)
	c := &cobra.Command{
		Use:   "restore --target DIR (--time T | --lsn L | --before-xid X | --before-incident ID | --latest)",
		Short: "Restore a PostgreSQL cluster to a point in time from base backups and WAL in the vault",
		Long: `Restore the newest base backup that can reach the target into --target (missing
or empty unless --delta), in parallel, and prepare it to recover from the vault:
pg_wal emptied, recovery.signal created, and postgresql.auto.conf given
restore_command (dualkey pg wal-fetch), the recovery target, timeline 'latest'
and recovery_target_action 'promote'. Exactly one target:

  --time T         every transaction committed at or before T (RFC 3339, or
                   "2006-01-02 15:04:05[.ffffff][+00]"; no zone: local time)
  --lsn L          WAL up to L (16/B374D848)
  --before-xid X   the state just before transaction X committed (txid_current())
  --before-incident ID
                   the state just before a tripwire incident (dualkey incidents
                   list): WAL up to, not including, its restore point
  --latest         every byte of WAL the vault holds

The server's restore_command needs the password: give it as a file
(--password-file or DUALKEY_PASSWORD_FILE), which restore_command names; the
password itself is never written. From an S3 vault, the bucket's settings
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_DEFAULT_REGION, AWS_REGION, DUALKEY_S3_CACERT, DUALKEY_S3_INSECURE_TLS) go
into TARGET.dualkey-env, mode 0600 and owned by the server's OS user, which
restore_command names as DUALKEY_ENV_FILE; the secret key is never written into
postgresql.auto.conf. With --start the server is started on --port
and the command waits until recovery has finished and it accepts connections.

Each tablespace is restored into a directory of its own, outside --target, and
pg_tblspc/<oid> links to it, as pg_basebackup does: its original location
unless --tablespace-map OLD=NEW (repeatable; OLD is the tablespace's OID or
its original location; write \= for an = in a path) moves it. A location must
be missing or empty unless --delta, which compares and rewrites inside it as in
the target.`,
		Args: cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			if opts.Target == "" {
				return usagef("--target is required")
			}
			n := 0
			if incidentID != "" {
				n++
				err := a.withState(ctx, func(db *state.DB) error {
					in, err := a.lookupIncident(ctx, db, incidentID)
					if err != nil {
						return err
					}
					if opts.BeforeLSN, err = in.RestorePoint(); err != nil {
						return err
					}
					a.say("incident %s: %s; restoring to just before %s", in.ID, in.Summary(), in.RestoreLSN)
					return nil
				})
				if err != nil {
					return err
				}
			}
			if timeFlag != "" {
				n++
				t, err := pgagent.ParseTargetTime(timeFlag)
				if err != nil {
					return usageError{err}
				}
				opts.Time = t
			}
			if lsnFlag != "" {
				n++
				l, err := pgwal.ParseLSN(lsnFlag)
				if err != nil {
					return usageError{err}
				}
				opts.LSN = l
			}
			if xidFlag != "" {
				n++
				x, err := parseXID(xidFlag)
				if err != nil {
					return usageError{err}
				}
				opts.BeforeXID = x
			}
			if opts.Latest {
				n++
			}
			if n != 1 {
				return usagef("give exactly one of --time, --lsn, --before-xid, --before-incident, --latest")
			}
			if opts.Start && opts.Port == 0 {
				return usagef("--start needs --port")
			}
			for _, m := range tsMap {
				old, dir, err := pgagent.ParseTablespaceMapping(m)
				if err != nil {
					return usageError{err}
				}
				if opts.TablespaceMap == nil {
					opts.TablespaceMap = map[string]string{}
				}
				if prev, ok := opts.TablespaceMap[old]; ok && prev != dir {
					return usagef("--tablespace-map: %s is mapped twice (%s and %s)", old, prev, dir)
				}
				opts.TablespaceMap[old] = dir
			}
			loc, err := a.repoLocation()
			if err != nil {
				return err
			}
			opts.Repo = loc
			if !strings.Contains(loc, "://") {
				if abs, err := filepath.Abs(strings.TrimPrefix(loc, "local:")); err == nil {
					opts.Repo = abs
				}
			}
			if pf := a.env("DUALKEY_PASSWORD_FILE", a.passwordFile); pf != "" {
				abs, err := filepath.Abs(pf)
				if err != nil {
					return err
				}
				opts.PasswordFile = abs
			} else if fetchCmd == "" {
				return usagef("the restored server's restore_command must read the vault: give the password as a file (--password-file or DUALKEY_PASSWORD_FILE); it is named in postgresql.auto.conf, never copied")
			}
			if tf := a.env("DUALKEY_TOKEN_FILE", a.tokenFlag); tf != "" {
				abs, err := filepath.Abs(tf)
				if err != nil {
					return err
				}
				opts.Env = append(opts.Env, "DUALKEY_TOKEN_FILE="+abs)
			}
			if fp := a.env("DUALKEY_TLS_FINGERPRINT", a.fingerprint); fp != "" {
				opts.Env = append(opts.Env, "DUALKEY_TLS_FINGERPRINT="+fp)
			}
			envFile := ""
			if strings.HasPrefix(loc, "s3:") && fetchCmd == "" {
				if envFile, err = a.writeS3EnvFile(opts.Target); err != nil {
					return err
				}
				if envFile != "" {
					opts.Env = append(opts.Env, "DUALKEY_ENV_FILE="+envFile)
				}
			}
			opts.WalFetchCommand = fetchCmd
			opts.ServerSettings = serverSet
			opts.Log = a.log
			prog := a.newProgress("restore")
			opts.Progress = func(s restorer.Stats) { prog.update(s.BytesDone, s.Bytes, false) }
			res, err := pgagent.Restore(ctx, r, opts)
			prog.done()
			if a.jsonOut && res != nil {
				if jerr := a.printJSON(map[string]any{"result": res, "restore_seconds": res.RestoreTook.Seconds(),
					"replay_seconds": res.ReplayTook.Seconds(), "error": errString(err)}); jerr != nil {
					return jerr
				}
			}
			if err != nil {
				if errors.Is(err, pgagent.ErrTargetNotEmpty) || errors.Is(err, pgagent.ErrTablespaceInTarget) {
					if envFile != "" {
						os.Remove(envFile) // nothing restored needs it
					}
					return usageError{err}
				}
				return err
			}
			for _, w := range res.Warnings {
				fmt.Fprintln(a.stderr, "dualkey: warning:", w)
			}
			b := res.Backup
			a.say("restored base backup %s (ended %s, %s) to %s in %s", b.ID.String()[:10],
				b.Meta.EndTime.Local().Format(time.RFC3339), b.Meta.EndLSN, res.Target, res.RestoreTook.Round(time.Millisecond))
			for _, ts := range res.Tablespaces {
				a.say("tablespace %d restored to %s (was %s), linked from pg_tblspc/%d", ts.OID, ts.Location, ts.Original, ts.OID)
			}
			if opts.Delta {
				a.say("delta: %d files rewritten, %d unchanged, %d removed", res.Rewritten, res.Unchanged, res.Removed)
			}
			if opts.Start {
				a.say("server recovered and running on port %d after %s of replay (log: %s)", opts.Port, res.ReplayTook.Round(time.Millisecond), res.LogFile)
			} else {
				a.say("recovery settings appended to postgresql.auto.conf; start the server to replay WAL from the vault")
			}
			return nil
		}),
	}
	f := c.Flags()
	f.StringVarP(&opts.Target, "target", "t", "", "data directory to restore into (missing or empty unless --delta)")
	f.StringVar(&timeFlag, "time", "", "restore every transaction committed at or before this time")
	f.StringVar(&lsnFlag, "lsn", "", "restore up to this WAL position")
	f.StringVar(&xidFlag, "before-xid", "", "restore the state just before this transaction committed")
	f.BoolVar(&opts.Latest, "latest", false, "restore everything the vault holds")
	f.StringVar(&incidentID, "before-incident", "", "restore to just before a tripwire incident (dualkey incidents list)")
	f.BoolVar(&opts.Delta, "delta", false, "restore into a non-empty target, rewriting only files that differ")
	f.StringArrayVar(&tsMap, "tablespace-map", nil, "restore a tablespace to NEW instead of its original location: OLD=NEW, OLD its OID or original location (repeatable)")
	f.BoolVar(&opts.Start, "start", false, "start the server and wait until recovery has finished")
	f.IntVar(&opts.Port, "port", 0, "port to start the restored server on (with --start)")
	f.StringArrayVar(&serverSet, "set", nil, "with --start, a server setting name=value (repeatable)")
	f.StringVar(&opts.LogFile, "log-file", "", "with --start, the server's log (default: TARGET.log)")
	f.StringVar(&fetchCmd, "restore-command", "", "instead of 'dualkey pg wal-fetch --repo …', this command (%f %p appended)")
	return c
}

// s3EnvNames are the settings openS3 reads, which the restored server's
// restore_command needs to reach an S3 vault.
var s3EnvNames = []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
	"AWS_DEFAULT_REGION", "AWS_REGION", "DUALKEY_S3_CACERT", "DUALKEY_S3_INSECURE_TLS"}

// envFileSuffix names the env file written next to a restore's target.
const envFileSuffix = ".dualkey-env"

// writeS3EnvFile writes the S3 settings this process has into
// TARGET.dualkey-env (NAME=VALUE lines), mode 0600 and, as root, owned by
// the OS user the restored server runs as, and returns its absolute path;
// "" when there is nothing to write. The secret key is thus in a file only
// the server's user reads, like the password file, and restore_command
// names the file, never the secret. The file is written under a temporary
// name and renamed, so a second restore replaces it whole.
func (a *app) writeS3EnvFile(target string) (string, error) {
	var b strings.Builder
	for _, k := range s3EnvNames {
		v := a.getenv(k)
		if v == "" {
			continue
		}
		if strings.ContainsAny(v, "\n\r\x00") {
			return "", usagef("%s holds a line break", k)
		}
		if k == "DUALKEY_S3_CACERT" {
			abs, err := filepath.Abs(v)
			if err != nil {
				return "", err
			}
			v = abs
		}
		fmt.Fprintf(&b, "%s=%s\n", k, v)
	}
	if b.Len() == 0 {
		return "", nil
	}
	abs, err := filepath.Abs(filepath.Clean(target) + envFileSuffix)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o755); err != nil {
		return "", fmt.Errorf("dualkey: env file for restore_command: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(abs), filepath.Base(abs)+".tmp*")
	if err != nil {
		return "", fmt.Errorf("dualkey: env file for restore_command: %w", err)
	}
	defer os.Remove(tmp.Name()) // after the rename, a no-op
	err = tmp.Chmod(0o600)
	if err == nil && os.Geteuid() == 0 {
		var u *user.User
		if u, err = user.Lookup(pgagent.PGOSUser); err == nil {
			uid, _ := strconv.Atoi(u.Uid)
			gid, _ := strconv.Atoi(u.Gid)
			err = tmp.Chown(uid, gid)
		}
	}
	if err == nil {
		_, err = tmp.WriteString(b.String())
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), abs)
	}
	if err != nil {
		return "", fmt.Errorf("dualkey: env file for restore_command: %w", err)
	}
	return abs, nil
}

// readEnvFile reads NAME=VALUE lines (blank lines and # comments skipped)
// from a file that only its owner may read: it may hold a secret key.
func readEnvFile(name string) (map[string]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("dualkey: env file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("dualkey: env file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("dualkey: env file %s: mode %v lets others read it; want 0600", name, fi.Mode().Perm())
	}
	data, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("dualkey: env file: %w", err)
	}
	env := map[string]string{}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("dualkey: env file %s:%d: want NAME=VALUE", name, i+1)
		}
		env[k] = v
	}
	return env, nil
}

// parseXID accepts a transaction ID as txid_current() prints it: a 64-bit
// value whose high half is the epoch, or a plain 32-bit xid.
func parseXID(s string) (uint32, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("transaction ID %q: %w", s, err)
	}
	x := uint32(v & math.MaxUint32)
	if x < 3 {
		return 0, fmt.Errorf("transaction ID %q is not a user transaction", s)
	}
	return x, nil
}

func (a *app) pgWalFetchCmd() *cobra.Command {
	var (
		spool      string
		noSpool    bool
		prefetch   int
		prefetcher bool
		envFile    string
	)
	c := &cobra.Command{
		Use:   "wal-fetch NAME DEST",
		Short: "Write WAL segment or history file NAME from the vault to DEST (PostgreSQL's restore_command)",
		Long: `Write the WAL segment or timeline history file NAME to DEST atomically. This is
the restore_command 'dualkey pg restore' writes. Exit code 1 when the vault has no
such file, which PostgreSQL expects for files that do not exist. Following
segments are fetched ahead into DEST's directory (pg_wal/dualkey-prefetch) by a
process of its own that keeps --prefetch segments ahead of replay while
PostgreSQL replays, so the vault is opened once, not once per segment, and
replay does not wait for it. The prefetcher stops after a minute without
requests. --env-file (or DUALKEY_ENV_FILE) names a file of NAME=VALUE lines,
readable by its owner only, whose settings (such as an S3 vault's credentials,
which 'dualkey pg restore' writes there) take precedence over the environment.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if f := a.env("DUALKEY_ENV_FILE", envFile); f != "" {
				fileEnv, err := readEnvFile(f)
				if err != nil {
					return err
				}
				getenv := a.getenv
				a.getenv = func(k string) string {
					if v, ok := fileEnv[k]; ok {
						return v
					}
					return getenv(k)
				}
			}
			var r *repo.Repository
			defer func() {
				if r != nil {
					r.Close()
				}
			}()
			open := func(ctx context.Context) (*repo.Repository, error) {
				var err error
				r, err = a.openRepo(ctx)
				return r, err
			}
			if spool == "" && !noSpool {
				spool = pgagent.DefaultSpool(args[1])
			}
			if noSpool {
				spool = ""
			}
			opts := pgagent.FetchOptions{Spool: spool, Prefetch: prefetch, Log: a.log}
			if prefetcher {
				return pgagent.RunPrefetcher(ctx, open, opts)
			}
			if spool != "" {
				opts.Background = func() error { return a.startPrefetcher(spool) }
			}
			err := pgagent.FetchWAL(ctx, args[0], args[1], open, opts)
			if errors.Is(err, pgagent.ErrWALNotFound) {
				return codeError{exitError, fmt.Errorf("dualkey: %s: not in the vault", args[0])}
			}
			return err
		},
	}
	c.Flags().StringVar(&spool, "spool", "", "directory for segments fetched ahead (default: DEST's dir/dualkey-prefetch inside pg_wal)")
	c.Flags().BoolVar(&noSpool, "no-prefetch", false, "fetch only NAME")
	c.Flags().IntVar(&prefetch, "prefetch", 0, "segments to keep fetched ahead (default 16)")
	c.Flags().StringVar(&envFile, "env-file", "", "read settings (NAME=VALUE lines, mode 0600) from this file (env DUALKEY_ENV_FILE)")
	c.Flags().BoolVar(&prefetcher, "prefetcher", false, "run as the background prefetcher for DEST's spool (started by wal-fetch itself)")
	c.Flags().MarkHidden("prefetcher")
	return c
}

// startPrefetcher runs this same wal-fetch command again with --prefetcher,
// detached (its own session, no terminal, stdio to a log in the spool), so
// it outlives the restore_command that started it.
func (a *app) startPrefetcher(spool string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(spool, "prefetch.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(exe, append(slices.Clone(a.args), "--prefetcher")...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	return cmd.Process.Release()
}
