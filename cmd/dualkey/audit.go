package main

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/gate"
	"github.com/dualkey/dualkey/internal/ledger"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

func (a *app) auditCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "The ledger: every request, vote, decision, break-glass and policy change, hash-chained and signed"}

	var follow bool
	var from uint64
	var n int
	tail := &cobra.Command{
		Use: "tail [-f] [--from N] [-n N]", Short: "print ledger records (the last 20, or from seq N), and follow new ones with -f", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			db, err := a.openStateOnly(ctx)
			if err != nil {
				return err
			}
			defer db.Close()
			store := db.Ledger()
			next := from
			if next == 0 {
				last, _, err := store.Last(ctx)
				if err != nil {
					return err
				}
				next = 1
				if last > uint64(n) {
					next = last - uint64(n) + 1
				}
			}
			for {
				err := ledger.Read(ctx, store, next, func(r ledger.Record) error {
					next = r.Seq + 1
					return a.printRecord(r)
				})
				if err != nil {
					if follow && ctx.Err() != nil {
						return nil
					}
					return err
				}
				if !follow {
					return nil
				}
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(500 * time.Millisecond):
				}
			}
		},
	}
	tail.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new records")
	tail.Flags().Uint64Var(&from, "from", 0, "start at this seq")
	tail.Flags().IntVarP(&n, "lines", "n", 20, "without --from: how many of the last records")

	var pubFlag string
	verify := &cobra.Command{
		Use: "verify [--ledger-pub ed25519:...]", Short: "check the whole ledger: every edit, deletion, reorder, insertion or forged checkpoint is named", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			dsn, err := a.stateDSN()
			if err != nil {
				return err
			}
			db, err := state.Open(ctx, dsn, state.WithLogger(a.log))
			if err != nil {
				return err
			}
			defer db.Close()
			pub, keyProblems, err := a.ledgerPublicKey(ctx, dsn, pubFlag, db.Ledger())
			if err != nil {
				return err
			}
			mirror, closeMirror, err := a.quorumLedgerMirror(ctx)
			if err != nil {
				return err
			}
			defer closeMirror()
			rep, err := ledger.Verify(ctx, db.Ledger(), mirror, pub)
			if err != nil {
				return err
			}
			rep.Problems = append(keyProblems, rep.Problems...)
			if a.jsonOut {
				if err := a.printJSON(rep); err != nil {
					return err
				}
			} else {
				for _, p := range rep.Problems {
					fmt.Fprintln(a.stdout, p.String())
				}
				if rep.Omitted > 0 {
					fmt.Fprintf(a.stdout, "... and %d more problems\n", rep.Omitted)
				}
				a.say("%d records, last seq %d, signed up to seq %d (%d valid checkpoints), mirrored up to seq %d",
					rep.Records, rep.LastSeq, rep.SignedSeq, rep.Checkpoints, rep.MirroredSeq)
				if mirror == nil {
					a.say("no mirror: a truncation at a checkpoint boundary cannot be seen (docs/ledger.md)")
				}
			}
			if !rep.OK() {
				return codeError{exitDamaged, fmt.Errorf("dualkey: audit verify: the ledger was tampered with: %d problems", len(rep.Problems)+rep.Omitted)}
			}
			a.say("ledger OK")
			return nil
		},
	}
	verify.Flags().StringVar(&pubFlag, "ledger-pub", "", "the ledger's public key (default: ledger.pub or ledger.key beside the state)")
	cmd.AddCommand(tail, verify)
	return cmd
}

// openStateOnly opens the state without the ledger writer: tail reads.
func (a *app) openStateOnly(ctx context.Context) (*state.DB, error) {
	dsn, err := a.stateDSN()
	if err != nil {
		return nil, err
	}
	return state.Open(ctx, dsn, state.WithLogger(a.log))
}

// ledgerPublicKey finds the key checkpoints must verify under: --ledger-pub,
// else ledger.pub, else the public half of ledger.key. Disagreements
// between them, or with the key the ledger recorded when it was created,
// are reported as problems.
func (a *app) ledgerPublicKey(ctx context.Context, dsn, flag string, store *state.LedgerStore) (ed25519.PublicKey, []ledger.Problem, error) {
	keyPath := a.ledgerKeyPath(dsn)
	var cands []string // formatted keys, in order of preference, with their source
	var srcs []string
	if flag != "" {
		cands, srcs = append(cands, flag), append(srcs, "--ledger-pub")
	}
	if b, err := os.ReadFile(ledger.PubPath(keyPath)); err == nil {
		cands, srcs = append(cands, strings.TrimSpace(string(b))), append(srcs, ledger.PubPath(keyPath))
	}
	if _, err := os.Stat(keyPath); err == nil {
		// The file exists, so loadLedgerKey only reads it.
		if k, _, err := loadLedgerKey(ctx, keyPath, store); err == nil {
			cands, srcs = append(cands, cert.FormatPublicKey(k.Public().(ed25519.PublicKey))), append(srcs, keyPath)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, err
	}
	if len(cands) == 0 {
		return nil, nil, usagef("no ledger key to verify with: give --ledger-pub or put ledger.pub beside the state")
	}
	pub, err := cert.ParsePublicKey(cands[0])
	if err != nil {
		return nil, nil, usagef("ledger public key from %s: %v", srcs[0], err)
	}
	var problems []ledger.Problem
	for i := 1; i < len(cands); i++ {
		if cands[i] != cands[0] {
			problems = append(problems, ledger.Problem{Kind: "key", Detail: fmt.Sprintf("%s holds %s, but %s holds %s", srcs[i], cands[i], srcs[0], cands[0])})
		}
	}
	// The key the ledger recorded when it was created.
	err = ledger.Read(ctx, store, 1, func(r ledger.Record) error {
		if r.Kind == kindLedgerKey {
			var d struct {
				PublicKey string `json:"public_key"`
			}
			if json.Unmarshal(r.Data, &d) == nil && d.PublicKey != cands[0] {
				problems = append(problems, ledger.Problem{Seq: r.Seq, Kind: "key",
					Detail: fmt.Sprintf("the ledger was created under %s, verifying with %s", d.PublicKey, cands[0])})
			}
		}
		return errStopRead
	})
	if err != nil && !errors.Is(err, errStopRead) {
		// A damaged first record is Verify's to report.
		a.log.Debug("reading the first ledger record", "err", err)
	}
	return pub, problems, nil
}

var errStopRead = errors.New("stop")

func (a *app) printRecord(r ledger.Record) error {
	if a.jsonOut {
		_, err := a.stdout.Write(append(r.Encode(), '\n'))
		return err
	}
	actor := r.Actor
	if actor == "" {
		actor = "-"
	}
	data := string(r.Data)
	var ran gate.Statements
	switch {
	case r.IsCheckpoint():
		data = "(signed checkpoint)"
	case r.Kind == ledger.KindStatements:
		var err error
		if ran, err = gate.ParseStatements(r.Data); err == nil && len(ran.Statements) > 0 {
			data = fmt.Sprintf("session %s on %s: %d statements, rule %s", ran.Session, ran.DB, len(ran.Statements), ran.Rule)
		}
	}
	if _, err := fmt.Fprintf(a.stdout, "%6d  %s  %-13s %-10s %s\n", r.Seq, r.Time.Local().Format("2006-01-02 15:04:05"), r.Kind, actor, data); err != nil {
		return err
	}
	// One line per statement, under its record: a group holds dozens.
	for _, st := range ran.Statements {
		outcome := "rows ?"
		switch {
		case st.Error != "":
			outcome = "error " + st.Error
		case st.Rows != nil:
			outcome = fmt.Sprintf("rows %d", *st.Rows)
		}
		if st.Request != "" {
			outcome += " request " + st.Request
		}
		if _, err := fmt.Fprintf(a.stdout, "        %s  %-11s %-9s %s  %s\n", st.At.Local().Format("15:04:05.000000"), st.Class, st.Decision, outcome, st.SQL); err != nil {
			return err
		}
	}
	return nil
}
