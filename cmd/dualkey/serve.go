package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/server"
)

// stateDir is where a vault server keeps its tokens and TLS key: beside the
// objects, never among them, so no object write can reach them.
func (a *app) stateDir(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	loc, err := a.repoLocation()
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(loc, "s3:") {
		return "", usagef("an S3 vault's server keeps its tokens and TLS key on its own host: give --state-dir")
	}
	if strings.Contains(loc, "://") {
		return "", usagef("give --repo as the vault's directory on this host")
	}
	return filepath.Join(loc, ".server"), nil
}

func (a *app) vaultServeCmd() *cobra.Command {
	var listen, state, cert, key string
	c := &cobra.Command{
		Use:   "serve --repo DIR|s3:URL --listen ADDR",
		Short: "Serve a directory or S3 vault over HTTPS to clients holding capability tokens",
		Long: `Serve the vault in --repo over HTTPS. The server, not the client, enforces the
rules: an append token can add packs and commit snapshots but never delete or
overwrite; snapshot times and locks come from this server's clock; only an admin
token can delete, and never what a retention lock protects.

A self-signed certificate is made on first start; clients pin it with
--tls-fingerprint (printed at start). Create tokens with 'dualkey vault token create'.

With --repo s3:https://host/bucket/prefix (credentials from AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, --state-dir required) the server also extends every
object's Object Lock hourly, as 'dualkey vault extend-locks' does.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			loc, err := a.repoLocation()
			if err != nil {
				return err
			}
			var (
				be  backend.Backend
				lbe *local.Backend // a directory vault's, for CleanTemp
			)
			if strings.HasPrefix(loc, "s3:") {
				if state == "" {
					return usagef("an S3 vault's server keeps its tokens and TLS key on this host: give --state-dir")
				}
				if be, err = a.openS3(ctx, loc, false, storeOptions{}); err != nil {
					return err
				}
			} else {
				if _, err := os.Stat(filepath.Join(loc, "config")); err != nil {
					return codeError{exitNoRepo, fmt.Errorf("dualkey: %s is not a vault (run 'dualkey vault init' first): %w", loc, err)}
				}
				if lbe, err = local.Open(loc); err != nil {
					return err
				}
				be = lbe
			}
			sd, err := a.stateDir(state)
			if err != nil {
				return err
			}
			if err := os.MkdirAll(sd, 0o700); err != nil {
				return err
			}
			ts, err := server.OpenTokenStore(sd)
			if err != nil {
				return err
			}
			log := a.log
			if a.verbose == 0 {
				log = newInfoLogger(a.stderr)
			}
			store := guard.New(be, guard.Options{})
			srv, err := server.New(store, ts, server.Options{Addr: listen, StateDir: sd,
				CertFile: cert, KeyFile: key, Logger: log})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "vault server for %s on https://%s\ntls fingerprint: %s\n", loc, listen, srv.Fingerprint())
			if lbe != nil {
				if n, err := lbe.CleanTemp(time.Hour); err == nil && n > 0 {
					log.Info("removed stale temporary files", "count", n)
				}
			}
			// On object-locking storage, keep every object's lock rolling.
			go guard.KeepObjectLocks(ctx, store.Session(guard.Admin), guard.DefaultExtendEvery, log)
			err = srv.ListenAndServe(ctx)
			if err == nil || ctx.Err() != nil {
				fmt.Fprintln(a.stdout, "vault server stopped")
				return nil
			}
			return err
		},
	}
	c.Flags().StringVar(&listen, "listen", "127.0.0.1:8443", "address to listen on")
	c.Flags().StringVar(&state, "state-dir", "", "tokens and TLS key (default DIR/.server)")
	c.Flags().StringVar(&cert, "tls-cert", "", "certificate file (default: generated on first start)")
	c.Flags().StringVar(&key, "tls-key", "", "key file for --tls-cert")
	return c
}

func (a *app) vaultTokenCmd() *cobra.Command {
	var state string
	c := &cobra.Command{Use: "token", Short: "Create, list and revoke the vault server's capability tokens"}
	c.PersistentFlags().StringVar(&state, "state-dir", "", "the server's state folder (default DIR/.server)")
	open := func() (*server.TokenStore, error) {
		sd, err := a.stateDir(state)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(sd, 0o700); err != nil {
			return nil, err
		}
		return server.OpenTokenStore(sd)
	}
	var capName, name string
	create := &cobra.Command{
		Use:   "create --cap read|append|admin",
		Short: "Create a token; its secret is shown once",
		Long: `Create a token. read: restore and list. append: also add packs and commit
snapshots, never delete or overwrite (give this one to backup agents). admin:
also delete what no retention lock protects.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cp, err := guard.ParseCapability(capName)
			if err != nil {
				return usageError{err}
			}
			ts, err := open()
			if err != nil {
				return err
			}
			secret, err := ts.CreateToken(name, cp)
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(map[string]string{"token": secret, "capability": string(cp), "name": name})
			}
			fmt.Fprintln(a.stdout, secret)
			return nil
		},
	}
	create.Flags().StringVar(&capName, "cap", "", "capability: read, append or admin (required)")
	create.Flags().StringVar(&name, "name", "", "a name to recognise the token by")
	_ = create.MarkFlagRequired("cap")
	list := &cobra.Command{
		Use:   "list",
		Short: "List tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ts, err := open()
			if err != nil {
				return err
			}
			toks, err := ts.Tokens()
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(toks)
			}
			tw := tabwriter.NewWriter(a.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tName\tCapability\tCreated\tRevoked")
			for _, t := range toks {
				rev := ""
				if !t.Revoked.IsZero() {
					rev = t.Revoked.Local().Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.ID, t.Name, t.Cap, t.Created.Local().Format(time.RFC3339), rev)
			}
			return tw.Flush()
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke ID|NAME",
		Short: "Revoke a token; a running server notices at once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ts, err := open()
			if err != nil {
				return err
			}
			if err := ts.Revoke(args[0]); err != nil {
				return err
			}
			a.say("token %s revoked", args[0])
			return nil
		},
	}
	c.AddCommand(create, list, revoke)
	return c
}

// openRemote connects to a vault server.
func (a *app) openRemote(ctx context.Context, url string) (vaultStore, error) {
	tok := a.getenv("DUALKEY_TOKEN")
	if f := a.env("DUALKEY_TOKEN_FILE", a.tokenFlag); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("dualkey: token file: %w", err)
		}
		tok = strings.TrimSpace(string(b))
	}
	if tok == "" {
		return nil, usagef("a vault server needs a token: set DUALKEY_TOKEN_FILE or DUALKEY_TOKEN")
	}
	c, err := server.NewClient(url, server.ClientOptions{Token: tok, Fingerprint: a.env("DUALKEY_TLS_FINGERPRINT", a.fingerprint)})
	if err != nil {
		return nil, err
	}
	if _, err := c.Capability(ctx); err != nil {
		return nil, fmt.Errorf("dualkey: vault server %s: %w", url, err)
	}
	return c, nil
}
