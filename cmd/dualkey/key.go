package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/repo"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/crypto"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

func (a *app) keyCmd() *cobra.Command {
	c := &cobra.Command{Use: "key", Short: "Manage the passwords that open the repository"}
	var newPwFile string
	add := &cobra.Command{
		Use:   "add",
		Short: "Add a password (a new key object wrapping the same master key)",
		Args:  cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			var (
				pw  string
				err error
			)
			if newPwFile != "" {
				sub := newApp(a.stdin, a.stdout, a.stderr, a.getenv)
				sub.passwordFile = newPwFile
				pw, err = sub.password("", false)
			} else {
				pw, err = a.password("enter the new password: ", true)
			}
			if err != nil {
				return err
			}
			if err := r.AddKey(ctx, pw); err != nil {
				return err
			}
			a.say("key added")
			return nil
		}),
	}
	add.Flags().StringVar(&newPwFile, "new-password-file", "", "read the new password from this file")

	list := &cobra.Command{
		Use:   "list",
		Short: "List key objects",
		Args:  cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			type keyJSON struct {
				ID       string    `json:"id"`
				Created  time.Time `json:"created"`
				Username string    `json:"username"`
				Hostname string    `json:"hostname"`
			}
			var keys []keyJSON
			err := r.Store().List(ctx, backend.Key, func(fi backend.Info) error {
				data, err := r.Store().Load(ctx, fi.Handle, 0, 0)
				if err != nil {
					return err
				}
				kf, err := crypto.ParseKeyFile(data)
				if err != nil {
					fmt.Fprintf(a.stderr, "dualkey: key %s unreadable: %v\n", fi.Name, err)
					return nil
				}
				keys = append(keys, keyJSON{fi.Name, kf.Created, kf.Username, kf.Hostname})
				return nil
			})
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(keys)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tUser\tHost\tCreated")
			for _, k := range keys {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", k.ID[:10], k.Username, k.Hostname, k.Created.Local().Format("2006-01-02 15:04:05"))
			}
			return tw.Flush()
		}),
	}
	var certFile string
	remove := &cobra.Command{
		Use:   "remove ID [--certificate FILE]",
		Short: "Remove a key object (never the last one; under a quorum certificate if the vault has approvers)",
		Args:  cobra.ExactArgs(1),
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, args []string) error {
			if certFile != "" {
				k, err := findKey(ctx, r, args[0])
				if err != nil {
					return err
				}
				return a.runCertified(ctx, r, guard.RemoveKeyAction(k), certFile)
			}
			var match []string
			err := r.Store().List(ctx, backend.Key, func(fi backend.Info) error {
				if len(args[0]) >= 4 && fi.Name[:min(len(fi.Name), len(args[0]))] == args[0] {
					match = append(match, fi.Name)
				}
				return nil
			})
			if err != nil {
				return err
			}
			if len(match) != 1 {
				return usagef("key %q matches %d keys", args[0], len(match))
			}
			if _, err := format.ParseID(match[0]); err != nil {
				return err
			}
			if err := r.Store().Remove(ctx, handle(backend.Key, match[0])); err != nil {
				return err
			}
			a.say("key %s removed", match[0][:10])
			return nil
		}),
	}
	remove.Flags().StringVar(&certFile, "certificate", "", "quorum certificate (JSON) for vault:key.remove")
	c.AddCommand(add, list, remove)
	return c
}
