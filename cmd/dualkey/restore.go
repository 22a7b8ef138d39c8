package main

import (
	"context"
	"fmt"
	"path"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/repo"

	"github.com/dualkey/dualkey/internal/vault/restorer"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

func (a *app) restoreCmd() *cobra.Command {
	var (
		target    string
		includes  []string
		overwrite bool
		verify    bool
	)
	c := &cobra.Command{
		Use:   "restore SNAPSHOT --target DIR",
		Short: "Restore a snapshot (or 'latest') into an empty directory",
		Long: `Restore every file of SNAPSHOT byte for byte with its metadata (mode, owner,
times, symlinks, hard links, empty directories, sparse files) into --target,
which must be empty unless --overwrite. Damaged data is reported by path; every
undamaged file is still restored.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if target == "" {
				return usagef("--target is required")
			}
			r, err := a.openRepo(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			si, err := r.FindSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			prog := a.newProgress("restore")
			start := time.Now()
			st, err := restorer.Restore(ctx, r, si.Tree, target, restorer.Options{Include: includes, Overwrite: overwrite,
				Verify: verify, Log: a.log, Progress: func(s restorer.Stats) { prog.update(s.BytesDone, s.Bytes, false) }})
			prog.done()
			if a.jsonOut {
				if jerr := a.printJSON(map[string]any{"snapshot": si.ID.String(), "target": target, "stats": st,
					"seconds": time.Since(start).Seconds(), "error": errString(err)}); jerr != nil {
					return jerr
				}
			} else if err == nil || st.Files > 0 {
				a.say("restored snapshot %s to %s: %d files, %d dirs, %d symlinks, %s in %s",
					si.ID.String()[:10], target, st.Files, st.Dirs, st.Symlinks, humanBytes(st.BytesDone), time.Since(start).Round(time.Millisecond))
			}
			return err
		},
	}
	c.Flags().StringVarP(&target, "target", "t", "", "directory to restore into (required)")
	c.Flags().StringSliceVarP(&includes, "include", "i", nil, "restore only paths matching this glob (repeatable)")
	c.Flags().BoolVar(&overwrite, "overwrite", false, "restore into a non-empty target, replacing what is in the way")
	c.Flags().BoolVar(&verify, "verify", false, "read restored files back and check them")
	return c
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func (a *app) dumpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "dump SNAPSHOT PATH",
		Short: "Write a file's content (or a directory as tar) to standard output",
		Args:  cobra.ExactArgs(2),
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, args []string) error {
			si, err := r.FindSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			return restorer.Dump(ctx, r, si.Tree, cleanSnapPath(args[1]), a.stdout)
		}),
	}
}

func (a *app) lsCmd() *cobra.Command {
	var long bool
	c := &cobra.Command{
		Use:   "ls SNAPSHOT [PATH]",
		Short: "List the files in a snapshot",
		Args:  cobra.RangeArgs(1, 2),
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, args []string) error {
			si, err := r.FindSnapshot(ctx, args[0])
			if err != nil {
				return err
			}
			prefix := ""
			if len(args) == 2 {
				prefix = cleanSnapPath(args[1])
				if _, err := restorer.Lookup(ctx, r, si.Tree, prefix); err != nil {
					return err
				}
			}
			type entry struct {
				Path  string      `json:"path"`
				Type  string      `json:"type"`
				Mode  string      `json:"mode"`
				Size  uint64      `json:"size"`
				MTime time.Time   `json:"mtime"`
				UID   uint32      `json:"uid"`
				GID   uint32      `json:"gid"`
				Link  string      `json:"target,omitempty"`
				Node  interface{} `json:"-"`
			}
			var out []entry
			tw := tabwriter.NewWriter(a.stdout, 0, 0, 1, ' ', 0)
			err = restorer.Walk(ctx, r, si.Tree, func(p string, n *snapshot.Node) error {
				if prefix != "" && p != prefix && !strings.HasPrefix(p, prefix+"/") {
					return nil
				}
				e := entry{Path: "/" + p, Type: string(n.Type), Mode: n.Mode.String(), Size: n.Size, MTime: n.ModTime,
					UID: n.UID, GID: n.GID, Link: n.LinkTarget}
				if a.jsonOut {
					out = append(out, e)
					return nil
				}
				if !long {
					fmt.Fprintln(a.stdout, e.Path)
					return nil
				}
				owner := n.User
				if owner == "" {
					owner = fmt.Sprint(n.UID)
				}
				group := n.Group
				if group == "" {
					group = fmt.Sprint(n.GID)
				}
				name := e.Path
				if n.Type == snapshot.Symlink {
					name += " -> " + n.LinkTarget
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", e.Mode, owner, group, n.Size, n.ModTime.Local().Format("2006-01-02 15:04:05"), name)
				return nil
			})
			tw.Flush()
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(map[string]any{"snapshot": si.ID.String(), "time": si.When(), "paths": si.Paths, "nodes": out})
			}
			_ = path.Clean
			return nil
		}),
	}
	c.Flags().BoolVarP(&long, "long", "l", false, "long listing: mode, owner, size, time")
	return c
}
