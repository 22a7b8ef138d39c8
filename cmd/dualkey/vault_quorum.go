package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// certifiedStore is what guarded actions need from a vault: guard.Session
// (a directory) and server.Client (a server, which verifies itself) both
// have it. The client never decides: it only forwards the certificate.
type certifiedStore interface {
	Quorum(ctx context.Context) (guard.QuorumState, error)
	Certified(ctx context.Context, act guard.Action, certificate []byte) (guard.Outcome, error)
}

func certified(r *repo.Repository) (certifiedStore, error) {
	cs, ok := r.Store().(certifiedStore)
	if !ok {
		return nil, errors.New("dualkey: this vault connection cannot run guarded actions")
	}
	return cs, nil
}

// readCertificate reads a cert.Certificate JSON file.
func readCertificate(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dualkey: certificate: %w", err)
	}
	if _, err := cert.ParseCertificate([]byte(strings.TrimSpace(string(b)))); err != nil {
		return nil, usagef("certificate %s: %v", path, err)
	}
	return []byte(strings.TrimSpace(string(b))), nil
}

// runCertified sends act with the certificate in file and reports.
func (a *app) runCertified(ctx context.Context, r *repo.Repository, act guard.Action, file string) error {
	c, err := readCertificate(file)
	if err != nil {
		return err
	}
	cs, err := certified(r)
	if err != nil {
		return err
	}
	out, err := cs.Certified(ctx, act, c)
	if err != nil {
		return err
	}
	if a.jsonOut {
		return a.printJSON(out)
	}
	a.say("%s done under request %s (the certificate is now used)", out.Op, out.Request[:12])
	return nil
}

// initPolicy builds the policy for vault init from --quorum-policy or
// --approver/--threshold; nil if neither is given.
func initPolicy(file string, approvers []string, threshold int) ([]byte, error) {
	switch {
	case file != "" && len(approvers) > 0:
		return nil, usagef("give --quorum-policy or --approver, not both")
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("dualkey: %w", err)
		}
		p, err := cert.ParsePolicy([]byte(strings.TrimSpace(string(b))))
		if err != nil {
			return nil, usagef("--quorum-policy %s: %v", file, err)
		}
		return p.Encode(), nil
	case len(approvers) == 0:
		if threshold != 0 {
			return nil, usagef("--threshold needs --approver")
		}
		return nil, nil
	}
	p := &cert.Policy{Version: cert.PolicyVersion, Serial: 1, Rules: []cert.Rule{
		{Name: "approvers", Actions: []string{cert.ActionPolicyChange}, Threshold: threshold},
		{Name: "vault", Actions: []string{"vault:*"}, Threshold: threshold},
	}}
	for _, s := range approvers {
		name, key, ok := strings.Cut(s, "=")
		if !ok {
			return nil, usagef("--approver %q: want NAME=ed25519:KEY", s)
		}
		pub, err := cert.ParsePublicKey(key)
		if err != nil {
			return nil, usagef("--approver %s: %v", name, err)
		}
		p.Approvers = append(p.Approvers, cert.Approver{Name: name, PublicKey: ed25519.PublicKey(pub)})
	}
	p, err := cert.ParsePolicy(p.Encode()) // canonical order, then Validate
	if err != nil {
		return nil, usagef("approver policy: %v", err)
	}
	return p.Encode(), nil
}

func (a *app) vaultQuorumCmds() []*cobra.Command {
	var certFile string
	setMin := &cobra.Command{
		Use:   "set-min-retention DURATION --certificate FILE",
		Short: "Lower the repository's minimum retention under a quorum certificate",
		Args:  cobra.ExactArgs(1),
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, args []string) error {
			d, err := time.ParseDuration(args[0])
			if err != nil {
				return usagef("duration: %v", err)
			}
			return a.runCertified(ctx, r, guard.LowerRetentionAction(d), certFile)
		}),
	}
	setMin.Flags().StringVar(&certFile, "certificate", "", "quorum certificate (JSON) approving exactly this change")
	setMin.MarkFlagRequired("certificate")

	var rotCert string
	rotate := &cobra.Command{
		Use:   "rotate-approvers --certificate FILE",
		Short: "Install the approver policy a quorum of the current approvers signed",
		Long: `Replace the vault's approver policy with the one named in the certificate's
request (vault:approvers.rotate, param "policy"). The current approvers must
have signed it; from then on the new set governs.`,
		Args: cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			c, err := readCertificate(rotCert)
			if err != nil {
				return err
			}
			pc, _ := cert.ParseCertificate(c)
			req, err := cert.ParseRequest(pc.Request)
			if err != nil || req.Vault == nil || req.Vault.Op != guard.OpRotate {
				return usagef("certificate is not for vault:%s", guard.OpRotate)
			}
			p, err := cert.ParsePolicy([]byte(req.Vault.Params["policy"]))
			if err != nil {
				return usagef("certificate's policy: %v", err)
			}
			return a.runCertified(ctx, r, guard.RotateAction(p), rotCert)
		}),
	}
	rotate.Flags().StringVar(&rotCert, "certificate", "", "quorum certificate (JSON) for vault:approvers.rotate")
	rotate.MarkFlagRequired("certificate")

	show := &cobra.Command{
		Use:   "approvers",
		Short: "Show the approver policy the vault verified, and ignored records",
		Args:  cobra.NoArgs,
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, _ []string) error {
			cs, err := certified(r)
			if err != nil {
				return err
			}
			st, err := cs.Quorum(ctx)
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(st)
			}
			if st.Policy == nil {
				a.say("no approver policy: guarded actions are never allowed on this vault")
			} else {
				fmt.Fprintf(a.stdout, "%s\n", st.Policy)
				a.say("policy serial %d, minimum retention %s", st.Serial, time.Duration(st.MinRetention))
			}
			for _, n := range st.Rejected {
				fmt.Fprintf(a.stderr, "dualkey: ignored record %s (does not verify)\n", n)
			}
			return nil
		}),
	}

	var (
		requester, reason, until, policyFile string
		expiresIn                            time.Duration
	)
	request := &cobra.Command{
		Use:   "request OP [ARG] --requester NAME --reason TEXT",
		Short: "Print the canonical request for a guarded action, to hand to approvers",
		Long: `Print the canonical request (JSON, one line) for a guarded vault action, bound
to this repository and its current policy serial; its ID goes to stderr.
Approvers sign it; the collected certificate is then passed with --certificate.

  lock.shorten SNAPSHOT --until TIME   shorten a lock
  snapshot.forget SNAPSHOT             forget a snapshot under its lock
  key.remove KEY                       remove a key object
  retention.lower DURATION             lower the minimum retention
  approvers.rotate --policy FILE       replace the approver policy (serial + 1)`,
		Args: cobra.RangeArgs(1, 2),
		RunE: a.withRepo(func(ctx context.Context, r *repo.Repository, args []string) error {
			act, err := a.requestAction(ctx, r, args, until, policyFile)
			if err != nil {
				return err
			}
			cs, err := certified(r)
			if err != nil {
				return err
			}
			st, err := cs.Quorum(ctx)
			if err != nil {
				return err
			}
			if st.Policy == nil {
				return codeError{exitRefused, errors.New("dualkey: this vault holds no approver policy: guarded actions are never allowed")}
			}
			now := time.Now().UTC().Truncate(time.Second)
			req := &cert.Request{Requester: requester, Action: "vault:" + act.Op, Reason: reason, Created: now,
				Expires: now.Add(expiresIn), PolicySerial: st.Serial,
				Vault: &cert.VaultAction{Op: act.Op, Repo: st.Repo, Params: act.Params}}
			if err := req.Validate(); err != nil {
				return usagef("%v", err)
			}
			if a.jsonOut {
				return a.printJSON(map[string]string{"id": req.ID().String(), "request": string(req.Encode())})
			}
			fmt.Fprintf(a.stdout, "%s\n", req.Encode())
			fmt.Fprintf(a.stderr, "request %s\n", req.ID())
			return nil
		}),
	}
	f := request.Flags()
	f.StringVar(&requester, "requester", "", "who asks (never counts as an approver)")
	f.StringVar(&reason, "reason", "", "why")
	f.DurationVar(&expiresIn, "expires-in", time.Hour, "how long approvals may make it run")
	f.StringVar(&until, "until", "", "lock.shorten: the new lock end (RFC 3339)")
	f.StringVar(&policyFile, "policy", "", "approvers.rotate: the new policy (cert.Policy JSON)")
	request.MarkFlagRequired("requester")
	request.MarkFlagRequired("reason")
	return []*cobra.Command{setMin, rotate, show, request}
}

func (a *app) requestAction(ctx context.Context, r *repo.Repository, args []string, until, policyFile string) (guard.Action, error) {
	arg := func() (string, error) {
		if len(args) != 2 {
			return "", usagef("%s needs one argument", args[0])
		}
		return args[1], nil
	}
	switch args[0] {
	case guard.OpShortenLock, guard.OpForget:
		ref, err := arg()
		if err != nil {
			return guard.Action{}, err
		}
		si, err := r.FindSnapshot(ctx, ref)
		if err != nil {
			return guard.Action{}, err
		}
		if args[0] == guard.OpForget {
			return guard.ForgetAction(si.ID), nil
		}
		t, err := time.Parse(time.RFC3339, until)
		if err != nil {
			return guard.Action{}, usagef("--until: %v", err)
		}
		return guard.ShortenLockAction(si.ID, t), nil
	case guard.OpRemoveKey:
		ref, err := arg()
		if err != nil {
			return guard.Action{}, err
		}
		k, err := findKey(ctx, r, ref)
		if err != nil {
			return guard.Action{}, err
		}
		return guard.RemoveKeyAction(k), nil
	case guard.OpLowerRetention:
		ref, err := arg()
		if err != nil {
			return guard.Action{}, err
		}
		d, err := time.ParseDuration(ref)
		if err != nil {
			return guard.Action{}, usagef("duration: %v", err)
		}
		return guard.LowerRetentionAction(d), nil
	case guard.OpRotate:
		b, err := os.ReadFile(policyFile)
		if err != nil {
			return guard.Action{}, usagef("--policy: %v", err)
		}
		p, err := cert.ParsePolicy([]byte(strings.TrimSpace(string(b))))
		if err != nil {
			return guard.Action{}, usagef("--policy: %v", err)
		}
		return guard.RotateAction(p), nil
	}
	return guard.Action{}, usagef("unknown guarded operation %q (want %s, %s, %s, %s or %s)", args[0],
		guard.OpShortenLock, guard.OpForget, guard.OpRemoveKey, guard.OpLowerRetention, guard.OpRotate)
}

// findKey resolves a key ID prefix (4+ digits) to one key object name.
func findKey(ctx context.Context, r *repo.Repository, ref string) (string, error) {
	var match []string
	err := r.Store().List(ctx, backend.Key, func(fi backend.Info) error {
		if len(ref) >= 4 && strings.HasPrefix(fi.Name, ref) {
			match = append(match, fi.Name)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if len(match) != 1 {
		return "", usagef("key %q matches %d keys", ref, len(match))
	}
	return match[0], nil
}
