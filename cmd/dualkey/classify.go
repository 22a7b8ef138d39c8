package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/gate/classify"
)

// sqlArg returns the SQL of a command: its arguments joined, or stdin.
func (a *app) sqlArg(args []string) (string, error) {
	if len(args) > 0 {
		return strings.Join(args, " "), nil
	}
	b, err := io.ReadAll(io.LimitReader(a.stdin, 64<<20))
	if err != nil {
		return "", fmt.Errorf("read SQL from stdin: %w", err)
	}
	return string(b), nil
}

// functionFlags turns --function NAME=v|s|i into a Lookup, so that CI can
// classify calls of its own functions the way the gate, which asks the
// database, would.
func functionFlags(fns []string) (classify.Options, error) {
	if len(fns) == 0 {
		return classify.Options{}, nil
	}
	vol := map[string]byte{}
	for _, f := range fns {
		name, v, ok := strings.Cut(f, "=")
		if !ok || name == "" || len(v) != 1 || !strings.Contains("isv", v) {
			return classify.Options{}, usagef("--function %q: want NAME=i, NAME=s or NAME=v (immutable, stable, volatile)", f)
		}
		vol[name] = v[0]
	}
	return classify.Options{Lookup: func(schema, name string) (byte, bool) {
		if schema != "" {
			if v, ok := vol[schema+"."+name]; ok {
				return v, true
			}
		}
		v, ok := vol[name]
		return v, ok
	}}, nil
}

func (a *app) classifyCmd() *cobra.Command {
	var fns []string
	cmd := &cobra.Command{
		Use:   "classify [SQL]",
		Short: "Classify SQL as the gate would: each statement's class, rule and reason",
		Long: `Classify SQL (the arguments, or standard input) with PostgreSQL's own parser
and the gate's rules, without any database. Each statement gets a class (read,
write, ddl, destructive, privileged, unknown), the rule that decided it, and the
reason. Functions that are not built-ins are unknown unless --function says how
volatile they are (the gate asks the database instead). Exits 0 whatever the class.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			opts, err := functionFlags(fns)
			if err != nil {
				return err
			}
			sql, err := a.sqlArg(args)
			if err != nil {
				return err
			}
			res := classify.Classify(sql, opts)
			if a.jsonOut {
				return a.printJSON(res)
			}
			a.printStatements(res)
			fmt.Fprintf(a.stdout, "class: %s\n", res.Class)
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&fns, "function", nil, "a function's volatility, NAME=i|s|v (repeatable; NAME may be schema.name)")
	return cmd
}

// printStatements prints one block per statement.
func (a *app) printStatements(res classify.Result) {
	for i, s := range res.Statements {
		fmt.Fprintf(a.stdout, "%d. %-11s %s\n", i+1, s.Class, oneLine(s.Text, 100))
		fmt.Fprintf(a.stdout, "   rule %s: %s\n", s.Rule, s.Reason)
		if len(s.Tables) > 0 {
			fmt.Fprintf(a.stdout, "   tables: %s\n", strings.Join(s.Tables, ", "))
		}
		if s.RowsGuard {
			how := "measured by the row limit"
			if !s.RowsCounted {
				how = "rows not countable from its result: held when a row limit applies"
			}
			fmt.Fprintf(a.stdout, "   blast radius: %s\n", how)
		}
	}
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n-3] + "..."
	}
	return s
}
