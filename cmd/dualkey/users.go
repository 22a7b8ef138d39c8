package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

// kindUser is the ledger record of a user added or disabled.
const kindUser = "user"

func (a *app) usersCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "users", Short: "People the gateway and the quorum know (never deleted: the ledger names them)"}
	var display string
	var groups []string
	add := &cobra.Command{
		Use: "add NAME", Short: "add a person", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := cert.ValidName(args[0]); err != nil {
				return usageError{err}
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				if err := q.db.AddUser(cmd.Context(), state.User{Name: args[0], DisplayName: display, Groups: groups}); err != nil {
					return err
				}
				if _, err := q.led.Append(cmd.Context(), ledger.Entry{Kind: kindUser, Actor: a.getenv("DUALKEY_USER"),
					Data: map[string]any{"event": "add", "name": args[0], "groups": groups}}); err != nil {
					return err
				}
				a.say("added user %s", args[0])
				return nil
			})
		},
	}
	add.Flags().StringVar(&display, "display", "", "display name")
	add.Flags().StringArrayVar(&groups, "group", nil, "a group (repeat)")
	list := &cobra.Command{
		Use: "list", Short: "list people", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				us, err := q.db.ListUsers(cmd.Context())
				if err != nil {
					return err
				}
				if a.jsonOut {
					type userJSON struct {
						Name        string    `json:"name"`
						DisplayName string    `json:"display_name"`
						Groups      []string  `json:"groups"`
						Disabled    bool      `json:"disabled"`
						Created     time.Time `json:"created"`
					}
					out := []userJSON{}
					for _, u := range us {
						out = append(out, userJSON{u.Name, u.DisplayName, u.Groups, u.Disabled, u.Created})
					}
					return a.printJSON(out)
				}
				for _, u := range us {
					st := ""
					if u.Disabled {
						st = "  (disabled)"
					}
					fmt.Fprintf(a.stdout, "%-20s %-24s %s%s\n", u.Name, u.DisplayName, strings.Join(u.Groups, ","), st)
				}
				return nil
			})
		},
	}
	disable := &cobra.Command{
		Use: "disable NAME", Short: "disable a person: they can no longer ask, vote or break glass", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				if err := q.db.DisableUser(cmd.Context(), args[0]); err != nil {
					return err
				}
				if _, err := q.led.Append(cmd.Context(), ledger.Entry{Kind: kindUser, Actor: a.getenv("DUALKEY_USER"),
					Data: map[string]any{"event": "disable", "name": args[0]}}); err != nil {
					return err
				}
				a.say("disabled user %s", args[0])
				return nil
			})
		},
	}
	cmd.AddCommand(add, list, disable)
	return cmd
}
