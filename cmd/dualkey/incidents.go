package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/incident"
	"github.com/dualkey/dualkey/internal/state"
)

// exitNoIncident: no incident has the ID given (docs/cli.md).
const exitNoIncident = 17

func (a *app) incidentsCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "incidents",
		Short: "Tripwire incidents: data destroyed in the WAL (drops, truncates, mass deletes), with their restore points",
	}
	c.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List incidents, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withState(cmd.Context(), func(db *state.DB) error {
				ins, err := incident.List(cmd.Context(), db)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(map[string]any{"incidents": ins})
				}
				if len(ins) == 0 {
					a.say("no incidents")
					return nil
				}
				tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tKind\tDatabase\tObjects\tRows\tXID\tCommitted\tDetected after")
				for _, in := range ins {
					rows := ""
					if in.Rows > 0 {
						rows = fmt.Sprint(in.Rows)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", in.ID, in.Kind, in.Database, strings.Join(in.Objects, ","), rows,
						in.XID, in.CommitTime.Local().Format("2006-01-02 15:04:05.000"), time.Duration(in.DelayMS*float64(time.Millisecond)).Round(time.Millisecond))
				}
				return tw.Flush()
			})
		},
	})
	c.AddCommand(&cobra.Command{
		Use:   "show ID",
		Short: "Show one incident and how to restore to just before it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withState(cmd.Context(), func(db *state.DB) error {
				in, err := a.lookupIncident(cmd.Context(), db, args[0])
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(in)
				}
				w := a.stdout
				fmt.Fprintf(w, "incident     %s\n", in.ID)
				fmt.Fprintf(w, "kind         %s\n", in.Kind)
				fmt.Fprintf(w, "database     %s (oid %d)\n", in.Database, in.DatabaseOID)
				fmt.Fprintf(w, "objects      %s\n", strings.Join(in.Objects, ", "))
				if in.Rows > 0 {
					fmt.Fprintf(w, "rows         %d\n", in.Rows)
				}
				fmt.Fprintf(w, "transaction  %d\n", in.XID)
				fmt.Fprintf(w, "commit       %s at %s (timeline %d)\n", in.CommitLSN, in.CommitTime.Format(time.RFC3339Nano), in.Timeline)
				fmt.Fprintf(w, "detected     %s (%.0f ms after the commit)\n", in.Detected.Format(time.RFC3339Nano), in.DelayMS)
				fmt.Fprintf(w, "restore to   just before %s: dualkey pg restore --before-incident %s --target DIR\n", in.RestoreLSN, in.ID)
				for _, r := range in.Relations {
					extra := ""
					if r.Deletes > 0 || r.Updates > 0 {
						extra = fmt.Sprintf(" (%d deletes, %d updates)", r.Deletes, r.Updates)
					}
					if r.Empty {
						extra += " (empty)"
					}
					name := r.Name
					if name == "" {
						name = "?"
					}
					fmt.Fprintf(w, "  relation   %s %s%s\n", r.Node, name, extra)
				}
				return nil
			})
		},
	})
	return c
}

// lookupIncident finds an incident; an unknown or malformed ID exits with
// exitNoIncident or as a usage error.
func (a *app) lookupIncident(ctx context.Context, db *state.DB, id string) (incident.Incident, error) {
	if err := incident.ParseID(id); err != nil {
		return incident.Incident{}, usageError{err}
	}
	in, err := incident.Get(ctx, db, id)
	if errors.Is(err, incident.ErrNotFound) {
		return incident.Incident{}, codeError{exitNoIncident, err}
	}
	return in, err
}

// withState runs fn with the state store open.
func (a *app) withState(ctx context.Context, fn func(db *state.DB) error) error {
	db, err := a.openStateOnly(ctx)
	if err != nil {
		return err
	}
	defer db.Close()
	return fn(db)
}
