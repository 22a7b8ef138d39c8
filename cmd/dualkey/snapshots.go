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
)

type snapshotJSON struct {
	ID        string    `json:"id"`
	ShortID   string    `json:"short_id"`
	Time      time.Time `json:"time"`        // vault clock
	Client    time.Time `json:"client_time"` // the client's claim, for information
	LockUntil time.Time `json:"lock_until"`
	Locked    bool      `json:"locked"`
	Hostname  string    `json:"hostname"`
	Username  string    `json:"username,omitempty"`
	Paths     []string  `json:"paths"`
	Tags      []string  `json:"tags,omitempty"`
	Tree      string    `json:"tree"`
	Parent    string    `json:"parent,omitempty"`
	Summary   any       `json:"summary,omitempty"`
}

func toJSON(s repo.SnapshotInfo, now time.Time) snapshotJSON {
	j := snapshotJSON{ID: s.ID.String(), ShortID: s.ID.String()[:10], Time: s.When(), Client: s.Time, LockUntil: s.LockUntil,
		Locked: s.Locked(now), Hostname: s.Hostname, Username: s.Username, Paths: s.Paths, Tags: s.Tags, Tree: s.Tree.String()}
	if s.Parent != nil {
		j.Parent = s.Parent.String()
	}
	if s.Summary != nil {
		j.Summary = s.Summary
	}
	return j
}

func (a *app) snapshotsCmd() *cobra.Command {
	var tags []string
	var host string
	c := &cobra.Command{
		Use:   "snapshots",
		Short: "List snapshots with their vault time and retention lock",
		Args:  cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			all, bad, err := r.Snapshots(ctx)
			if err != nil {
				return err
			}
			now := time.Now()
			var sel []repo.SnapshotInfo
			for _, s := range all {
				if host != "" && s.Hostname != host || !hasTags(s.Tags, tags) {
					continue
				}
				sel = append(sel, s)
			}
			for _, e := range bad {
				fmt.Fprintln(a.stderr, "dualkey: unreadable snapshot:", e)
			}
			if a.jsonOut {
				out := make([]snapshotJSON, 0, len(sel))
				for _, s := range sel {
					out = append(out, toJSON(s, now))
				}
				return a.printJSON(out)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTime (vault)\tHost\tTags\tLocked until\tPaths\tSize")
			for _, s := range sel {
				size := ""
				if s.Summary != nil {
					size = humanBytes(s.Summary.Bytes)
				}
				lock := s.LockUntil.Local().Format("2006-01-02 15:04")
				if !s.Locked(now) {
					lock = "expired"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID.String()[:10], s.When().Local().Format("2006-01-02 15:04:05"),
					s.Hostname, strings.Join(s.Tags, ","), lock, strings.Join(s.Paths, ","), size)
			}
			tw.Flush()
			a.say("%d snapshots", len(sel))
			return nil
		}),
	}
	c.Flags().StringSliceVar(&tags, "tag", nil, "only snapshots with these tags")
	c.Flags().StringVar(&host, "host", "", "only snapshots of this host")
	return c
}

func hasTags(have, want []string) bool {
	for _, w := range want {
		found := false
		for _, h := range have {
			if h == w {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// cleanSnapPath turns a user's path inside a snapshot into the form the
// restorer uses: slash-separated, no leading slash.
func cleanSnapPath(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}
