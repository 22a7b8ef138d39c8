package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/gate/policy"
)

// Exit codes of policy check, for CI (docs/cli.md).
const (
	exitPolicyDeny = 20 // the policy denies the SQL
	exitPolicyHold = 21 // the policy holds the SQL for a quorum
)

func (a *app) policyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check a gate policy (gate.yaml) without a database",
	}
	cmd.AddCommand(a.policyCheckCmd(), a.policyValidateCmd())
	return cmd
}

func (a *app) policyValidateCmd() *cobra.Command {
	var config string
	cmd := &cobra.Command{
		Use:   "validate --config gate.yaml",
		Short: "Validate a gate config; every problem is named with its file and line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := policy.Load(config)
			if err != nil {
				return err
			}
			if a.jsonOut {
				return a.printJSON(map[string]any{"config": config, "valid": true, "rules": len(c.Rules), "upstreams": len(c.Upstreams)})
			}
			a.say("%s: valid (%d rules, %d upstreams)", config, len(c.Rules), len(c.Upstreams))
			return nil
		},
	}
	cmd.Flags().StringVar(&config, "config", "gate.yaml", "the gate config")
	return cmd
}

func (a *app) policyCheckCmd() *cobra.Command {
	var config, user, db string
	var groups, fns []string
	cmd := &cobra.Command{
		Use:   "check --config gate.yaml --user U [--group G]... --db D [SQL]",
		Short: "What the gate would do with SQL from a person on a database, and the rule that decides",
		Long: `Classify SQL (the arguments, or standard input) and decide it with the policy,
as the gate would for --user (a member of --group, as the state store would say)
on upstream --db. No database is needed. Prints the decision, the rule that made
it (file:line) and each statement's class. Exits 0 when allowed, 20 when denied,
21 when held for a quorum, so CI can assert what a policy does.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if user == "" || db == "" {
				return usagef("policy check needs --user and --db")
			}
			opts, err := functionFlags(fns)
			if err != nil {
				return err
			}
			c, err := policy.Load(config)
			if err != nil {
				return err
			}
			if c.Upstreams[db] == nil {
				return usagef("--db %q is not an upstream of %s", db, config)
			}
			sql, err := a.sqlArg(args)
			if err != nil {
				return err
			}
			res := classify.Classify(sql, opts)
			d := c.DecideResult(user, groups, db, res)
			if a.jsonOut {
				err = a.printJSON(map[string]any{"decision": d.Action, "rule": d.Rule, "row_limit": d.RowLimit,
					"message": d.Message, "class": res.Class, "statements": res.Statements})
			} else {
				fmt.Fprintf(a.stdout, "decision: %s\nrule: %s\n", d.Action, d.Rule)
				if d.RowLimit > 0 {
					fmt.Fprintf(a.stdout, "row limit: %d (an UPDATE/DELETE touching more is rolled back and held)\n", d.RowLimit)
				}
				if d.Message != "" {
					fmt.Fprintf(a.stdout, "message: %s\n", d.Message)
				}
				a.printStatements(res)
			}
			if err != nil {
				return err
			}
			switch d.Action {
			case policy.Deny:
				a.exitCode = exitPolicyDeny
			case policy.Hold:
				a.exitCode = exitPolicyHold
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&config, "config", "gate.yaml", "the gate config")
	f.StringVar(&user, "user", "", "the person sending the SQL")
	f.StringArrayVar(&groups, "group", nil, "a group the person belongs to in the state store (repeatable)")
	f.StringVar(&db, "db", "", "the upstream database name")
	f.StringArrayVar(&fns, "function", nil, "a function's volatility, NAME=i|s|v (repeatable)")
	return cmd
}
