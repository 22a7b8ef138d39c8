package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/archiver"
)

func (a *app) backupCmd() *cobra.Command {
	var (
		tags      []string
		host      string
		stdin     bool
		stdinName string
		lockFor   time.Duration
		force     bool
	)
	c := &cobra.Command{
		Use:   "backup PATH... | --stdin",
		Short: "Create a snapshot of files or of standard input",
		Long: `Back up PATHs (each stored under its base name) or standard input as a new
snapshot. Files unchanged since the last snapshot of the same paths and host
(same size, times and inode) are not read again. The snapshot is locked on the
vault's clock for at least the repository's minimum retention, or --lock-for.

Exit code 3 means the snapshot was committed but some files could not be read.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if stdin == (len(args) > 0) {
				return usagef("give PATHs or --stdin, not both or neither")
			}
			r, err := a.openRepo(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			prog := a.newProgress("backup")
			opts := archiver.Options{Tags: tags, Hostname: host, LockFor: lockFor, NoParent: force, Log: a.log,
				Progress: prog.backup}
			var res *archiver.Result
			if stdin {
				res, err = archiver.BackupReader(ctx, r, a.stdin, stdinName, opts)
			} else {
				res, err = archiver.Backup(ctx, r, args, opts)
			}
			prog.done()
			if res == nil {
				return err
			}
			s := res.Summary
			if a.jsonOut {
				if jerr := a.printJSON(map[string]any{"snapshot": res.ID.String(), "vault_time": res.Lock.Time,
					"lock_until": res.Lock.Until, "summary": s, "errors": errStrings(res.Errors)}); jerr != nil {
					return jerr
				}
			} else {
				a.say("files: %d new, %d changed, %d unmodified; dirs: %d", s.FilesNew, s.FilesChanged, s.Files-s.FilesNew-s.FilesChanged, s.Dirs)
				a.say("processed %s in %s, added %s in %d new blobs", humanBytes(s.Bytes), s.End.Sub(s.Start).Round(time.Millisecond), humanBytes(s.BytesAdded), s.BlobsAdded)
				a.say("snapshot %s saved at %s (vault clock), locked until %s", res.ID.String()[:10], res.Lock.Time.Format(time.RFC3339), res.Lock.Until.Format(time.RFC3339))
			}
			if errors.Is(err, archiver.ErrPartial) {
				for _, e := range res.Errors {
					fmt.Fprintln(a.stderr, "dualkey: skipped:", e)
				}
				return codeError{exitPartial, fmt.Errorf("dualkey: %d files could not be read; the snapshot holds the rest", len(res.Errors))}
			}
			return err
		},
	}
	f := c.Flags()
	f.StringSliceVar(&tags, "tag", nil, "tag the snapshot (repeatable)")
	defHost, _ := os.Hostname()
	f.StringVar(&host, "host", defHost, "host name to record")
	f.BoolVar(&stdin, "stdin", false, "back up standard input")
	f.StringVar(&stdinName, "stdin-filename", "stdin", "file name for --stdin")
	f.DurationVar(&lockFor, "lock-for", 0, "retention lock longer than the repository minimum")
	f.BoolVar(&force, "force", false, "read every file even if unchanged since the parent snapshot")
	return c
}

func errStrings(errs []error) []string {
	out := make([]string, len(errs))
	for i, e := range errs {
		out[i] = e.Error()
	}
	return out
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
