package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/dualkey/dualkey/internal/gate"
	"github.com/dualkey/dualkey/internal/ledger"
)

// addUsersPasswd hangs "users passwd" under the users command.
func (a *app) addUsersPasswd(root *cobra.Command) {
	for _, c := range root.Commands() {
		if c.Name() == "users" {
			c.AddCommand(a.usersPasswdCmd())
		}
	}
}

func (a *app) usersPasswdCmd() *cobra.Command {
	var fromStdin bool
	cmd := &cobra.Command{
		Use:   "passwd NAME",
		Short: "set the password a person logs in to the gate with (stored as a SCRAM-SHA-256 verifier, never in clear)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			pw, err := a.newPassword(fromStdin)
			if err != nil {
				return err
			}
			v, err := gate.NewVerifier(pw, 0)
			if err != nil {
				return err
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				if err := q.db.SetUserSecret(cmd.Context(), args[0], v.String()); err != nil {
					return err
				}
				if _, err := q.led.Append(cmd.Context(), ledger.Entry{Kind: kindUser, Actor: a.getenv("DUALKEY_USER"),
					Data: map[string]any{"event": "passwd", "name": args[0]}}); err != nil {
					return err
				}
				a.say("password of %s set", args[0])
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&fromStdin, "password-stdin", false, "read the password from the first line of standard input")
	return cmd
}

// newPassword reads a new password from stdin or, twice, from the terminal.
func (a *app) newPassword(fromStdin bool) (string, error) {
	var pw string
	if fromStdin {
		line, err := bufio.NewReader(a.stdin).ReadString('\n')
		if err != nil && line == "" {
			return "", fmt.Errorf("dualkey: read password from stdin: %w", err)
		}
		pw = strings.TrimRight(line, "\r\n")
	} else {
		tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
		if err != nil || !term.IsTerminal(int(tty.Fd())) {
			return "", usagef("no terminal: give --password-stdin")
		}
		defer tty.Close()
		read := func(p string) (string, error) {
			fmt.Fprint(tty, p)
			b, err := term.ReadPassword(int(tty.Fd()))
			fmt.Fprintln(tty)
			return string(b), err
		}
		if pw, err = read("new password: "); err != nil {
			return "", err
		}
		again, err := read("again: ")
		if err != nil {
			return "", err
		}
		if again != pw {
			return "", errors.New("dualkey: the passwords do not match")
		}
	}
	if len(pw) < 8 {
		return "", usagef("a password of at least 8 characters, please")
	}
	return pw, nil
}
