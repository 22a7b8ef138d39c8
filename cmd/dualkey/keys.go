package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/quorum/keyfile"
)

// keysCmd manages approver signing keys (not vault passwords: see key).
func (a *app) keysCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "keys", Short: "Approver signing keys, kept encrypted under a passphrase in your config dir"}
	gen := &cobra.Command{
		Use: "generate NAME", Short: "create NAME's Ed25519 approver key and print its public key", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if err := cert.ValidName(name); err != nil {
				return usageError{err}
			}
			dir, err := a.keyDir()
			if err != nil {
				return err
			}
			if _, err := os.Stat(keyfile.Path(dir, name)); err == nil {
				return fmt.Errorf("dualkey: %s already exists; a key is never overwritten", keyfile.Path(dir, name))
			}
			pass, err := a.passphrase("passphrase for "+name+"'s new key: ", true)
			if err != nil {
				return err
			}
			pub, data, err := keyfile.Generate(name, pass)
			if err != nil {
				return err
			}
			if err := keyfile.Save(dir, name, data); err != nil {
				if errors.Is(err, fs.ErrExist) {
					return fmt.Errorf("dualkey: %s already exists; a key is never overwritten", keyfile.Path(dir, name))
				}
				return err
			}
			if a.jsonOut {
				return a.printJSON(map[string]string{"name": name, "public_key": cert.FormatPublicKey(pub), "file": keyfile.Path(dir, name)})
			}
			fmt.Fprintln(a.stdout, cert.FormatPublicKey(pub))
			if !a.quiet {
				fmt.Fprintf(a.stderr, "saved %s; register it with: dualkey quorum init --approver %s=%s ...\n", keyfile.Path(dir, name), name, cert.FormatPublicKey(pub))
			}
			return nil
		},
	}
	list := &cobra.Command{
		Use: "list", Short: "list the keys in your config dir", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := a.keyDir()
			if err != nil {
				return err
			}
			files, _ := filepath.Glob(filepath.Join(dir, "*.key"))
			type keyJSON struct {
				Name      string `json:"name"`
				PublicKey string `json:"public_key"`
				File      string `json:"file"`
			}
			out := []keyJSON{}
			for _, f := range files {
				data, err := os.ReadFile(f)
				if err != nil {
					return err
				}
				name, pub, err := keyfile.Inspect(data)
				if err != nil {
					fmt.Fprintf(a.stderr, "dualkey: %s: %v\n", f, err)
					continue
				}
				if strings.TrimSuffix(filepath.Base(f), ".key") != name {
					fmt.Fprintf(a.stderr, "dualkey: %s holds %s's key\n", f, name)
				}
				out = append(out, keyJSON{name, cert.FormatPublicKey(pub), f})
			}
			if a.jsonOut {
				return a.printJSON(out)
			}
			for _, k := range out {
				fmt.Fprintf(a.stdout, "%-20s %s\n", k.Name, k.PublicKey)
			}
			return nil
		},
	}
	cmd.AddCommand(gen, list)
	return cmd
}
