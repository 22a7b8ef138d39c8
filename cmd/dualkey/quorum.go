package main

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// policyEdits are the flags that build or change a policy.
type policyEdits struct {
	approvers, removeApprovers []string // NAME=PUBKEY; NAME
	threshold                  int      // the default rule ("*"); 0 = unchanged
	rules                      []string // ACTION=M
	breakglass                 []string // PERSON=ROLE[,ROLE]
	removeBreakglass           []string // PERSON
}

func (e *policyEdits) flags(cmd *cobra.Command, init bool) {
	f := cmd.Flags()
	name := "add-approver"
	if init {
		name = "approver"
	}
	f.StringArrayVar(&e.approvers, name, nil, "an approver: NAME=ed25519:... (repeat)")
	f.IntVar(&e.threshold, "threshold", 0, "approvals needed for any action without its own rule (the \"*\" rule)")
	f.StringArrayVar(&e.rules, "rule", nil, "a rule for one action or namespace: ACTION=M, e.g. sql:destructive=2, vault:*=3, policy:change=3 (repeat)")
	f.StringArrayVar(&e.breakglass, "breakglass", nil, "allow break-glass: PERSON=ROLE[,ROLE...] (repeat)")
	if !init {
		f.StringArrayVar(&e.removeApprovers, "remove-approver", nil, "remove an approver (repeat)")
		f.StringArrayVar(&e.removeBreakglass, "remove-breakglass", nil, "withdraw a person's break-glass grant (repeat)")
	}
}

// ruleName turns a pattern into a rule name: "sql:destructive" → "sql.destructive", "vault:*" → "vault.all".
func ruleName(pattern string) string {
	if pattern == "*" {
		return "default"
	}
	return strings.ReplaceAll(strings.ReplaceAll(pattern, ":", "."), "*", "all")
}

func setRule(p *cert.Policy, pattern string, m int) {
	for i := range p.Rules {
		if slices.Contains(p.Rules[i].Actions, pattern) {
			if len(p.Rules[i].Actions) == 1 {
				p.Rules[i].Threshold = m
				return
			}
			p.Rules[i].Actions = slices.DeleteFunc(slices.Clone(p.Rules[i].Actions), func(s string) bool { return s == pattern })
		}
	}
	p.Rules = append(p.Rules, cert.Rule{Name: ruleName(pattern), Actions: []string{pattern}, Threshold: m})
}

// apply changes p by the flags.
func (e *policyEdits) apply(p *cert.Policy) error {
	for _, n := range e.removeApprovers {
		i := slices.IndexFunc(p.Approvers, func(a cert.Approver) bool { return a.Name == n })
		if i < 0 {
			return usagef("--remove-approver %s: not an approver", n)
		}
		p.Approvers = slices.Delete(p.Approvers, i, i+1)
	}
	for _, s := range e.approvers {
		name, key, ok := strings.Cut(s, "=")
		if !ok {
			return usagef("approver %q: want NAME=ed25519:...", s)
		}
		if err := cert.ValidName(name); err != nil {
			return usageError{err}
		}
		pub, err := cert.ParsePublicKey(key)
		if err != nil {
			return usagef("approver %s: %v", name, err)
		}
		if _, dup := p.Approver(name); dup {
			return usagef("approver %s is already registered", name)
		}
		p.Approvers = append(p.Approvers, cert.Approver{Name: name, PublicKey: pub})
	}
	if e.threshold != 0 {
		setRule(p, "*", e.threshold)
	}
	for _, s := range e.rules {
		pattern, m, ok := strings.Cut(s, "=")
		n, err := strconv.Atoi(m)
		if !ok || err != nil {
			return usagef("rule %q: want ACTION=M", s)
		}
		setRule(p, pattern, n)
	}
	for _, n := range e.removeBreakglass {
		i := slices.IndexFunc(p.BreakGlass, func(g cert.Grant) bool { return g.Person == n })
		if i < 0 {
			return usagef("--remove-breakglass %s: no grant", n)
		}
		p.BreakGlass = slices.Delete(p.BreakGlass, i, i+1)
	}
	for _, s := range e.breakglass {
		person, roles, ok := strings.Cut(s, "=")
		if !ok || roles == "" {
			return usagef("breakglass %q: want PERSON=ROLE[,ROLE...]", s)
		}
		p.BreakGlass = slices.DeleteFunc(p.BreakGlass, func(g cert.Grant) bool { return g.Person == person })
		p.BreakGlass = append(p.BreakGlass, cert.Grant{Person: person, Roles: strings.Split(roles, ",")})
	}
	return nil
}

func (a *app) quorumCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "quorum", Short: "The approvers, their keys and the M-of-N rules (changed only by quorum)"}

	var ie policyEdits
	initCmd := &cobra.Command{
		Use:   "init --approver NAME=PUBKEY ... --threshold M [--rule ACTION=M ...] [--breakglass PERSON=ROLE ...]",
		Short: "bootstrap the policy, once; later changes need a quorum (quorum propose)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if len(ie.approvers) == 0 || ie.threshold < 1 {
				return usagef("give --approver NAME=PUBKEY at least once and --threshold M (at least 1)")
			}
			p := &cert.Policy{Version: cert.PolicyVersion, Serial: 1}
			if err := ie.apply(p); err != nil {
				return err
			}
			if err := p.Validate(); err != nil {
				return usageError{err}
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				if err := q.svc.Init(cmd.Context(), p); err != nil {
					return err
				}
				if rule, _ := p.RuleFor(cert.ActionPolicyChange); rule.Threshold >= len(p.Approvers) {
					fmt.Fprintf(a.stderr, "dualkey: warning: policy:change needs %d of %d approvers; the requester never counts, so an approver can never change the policy alone with the others absent\n", rule.Threshold, len(p.Approvers))
				}
				return a.printPolicy(p)
			})
		},
	}
	ie.flags(initCmd, true)

	show := &cobra.Command{
		Use: "show [--json]", Short: "print the policy in force (--json: the canonical policy document, for vault init --quorum-policy)", Args: cobra.NoArgs,
		Long: `Print the policy in force. With --json it prints the canonical policy
document itself (one line), the file 'vault init --quorum-policy' and
'vault request approvers.rotate --policy' take, so that the vault and the
state enforce one approver set:

  dualkey quorum show --json > policy.json
  dualkey vault init --quorum-policy policy.json`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				p, err := q.svc.Policy(cmd.Context())
				if err != nil {
					return err
				}
				return a.printPolicy(p)
			})
		},
	}

	var pe policyEdits
	var as, reason string
	var expires time.Duration
	propose := &cobra.Command{
		Use:   "propose [--add-approver NAME=PUBKEY] [--remove-approver NAME] [--threshold M] [--rule ACTION=M] [--breakglass P=R] --reason TEXT",
		Short: "open a policy:change request; it needs a quorum under the current rules",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if reason == "" {
				return usagef("give --reason")
			}
			me, err := a.whoAmI(as)
			if err != nil {
				return err
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				cur, err := q.svc.Policy(cmd.Context())
				if err != nil {
					return err
				}
				next := clonePolicy(cur)
				next.Serial = cur.Serial + 1
				if err := pe.apply(next); err != nil {
					return err
				}
				if err := next.Validate(); err != nil {
					return usageError{err}
				}
				id, err := q.svc.ProposePolicy(cmd.Context(), me, reason, next, time.Now().Add(expires))
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(map[string]string{"request": string(id)})
				}
				rule, _ := cur.RuleFor(cert.ActionPolicyChange)
				fmt.Fprintf(a.stdout, "request %s\n", id)
				a.say("policy change to serial %d opened; it needs %d approvals under the current policy; then: dualkey quorum apply %s", next.Serial, rule.Threshold, id[:12])
				return nil
			})
		},
	}
	pe.flags(propose, false)
	propose.Flags().StringVar(&as, "as", "", "who proposes (default DUALKEY_USER)")
	propose.Flags().StringVar(&reason, "reason", "", "why (required)")
	propose.Flags().DurationVar(&expires, "expires", 24*time.Hour, "how long the proposal stays usable")

	var applyAs string
	apply := &cobra.Command{
		Use: "apply ID", Short: "install the policy of an approved policy:change request", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.actOnRequest(cmd.Context(), applyAs, args[0], func(q *quorumEnv, me string, id cert.ID) error {
				p, err := q.svc.ApplyPolicyChange(cmd.Context(), id, me)
				if err != nil {
					return err
				}
				a.say("policy serial %d is in force", p.Serial)
				return a.printPolicy(p)
			})
		},
	}
	apply.Flags().StringVar(&applyAs, "as", "", "who applies (default DUALKEY_USER)")
	cmd.AddCommand(initCmd, show, propose, apply)
	return cmd
}

func clonePolicy(p *cert.Policy) *cert.Policy {
	q, err := cert.ParsePolicy(p.Encode())
	if err != nil {
		panic("dualkey: a valid policy did not re-parse: " + err.Error())
	}
	return q
}

func (a *app) printPolicy(p *cert.Policy) error {
	if a.jsonOut {
		_, err := a.stdout.Write(append(p.Encode(), '\n'))
		return err
	}
	if a.quiet {
		return nil
	}
	fmt.Fprintf(a.stdout, "policy serial %d (hash %s)\napprovers:\n", p.Serial, p.Hash()[:16])
	for _, ap := range p.Approvers {
		fmt.Fprintf(a.stdout, "  %-20s %s\n", ap.Name, cert.FormatPublicKey(ap.PublicKey))
	}
	fmt.Fprintln(a.stdout, "rules:")
	for _, r := range p.Rules {
		fmt.Fprintf(a.stdout, "  %-20s %d of %d  %s\n", r.Name, r.Threshold, len(p.Approvers), strings.Join(r.Actions, " "))
	}
	if len(p.BreakGlass) > 0 {
		fmt.Fprintln(a.stdout, "break-glass:")
		for _, g := range p.BreakGlass {
			fmt.Fprintf(a.stdout, "  %-20s %s\n", g.Person, strings.Join(g.Roles, ","))
		}
	}
	return nil
}
