package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/quorum"
	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

func (a *app) approvalsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "approvals", Short: "Requests waiting for a quorum: list, show exactly what will run, approve or deny"}

	var status string
	list := &cobra.Command{
		Use: "list [--status open|approved|denied|consumed|expired|cancelled]", Short: "list requests, newest first", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st := state.Status(status)
			if st != "" && !st.Valid() {
				return usagef("--status %q: want open, approved, denied, consumed, expired or cancelled", status)
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				if _, err := q.svc.ExpireStale(cmd.Context()); err != nil {
					return err
				}
				rs, err := q.svc.List(cmd.Context(), st)
				if err != nil {
					return err
				}
				type reqJSON struct {
					ID        string    `json:"id"`
					Requester string    `json:"requester"`
					Action    string    `json:"action"`
					Status    string    `json:"status"`
					Created   time.Time `json:"created"`
					Expires   time.Time `json:"expires"`
					What      string    `json:"what"`
				}
				out := []reqJSON{}
				for _, r := range rs {
					what := ""
					if cr, err := cert.ParseRequest(r.Doc); err == nil {
						what = quorum.Describe(cr)
					}
					out = append(out, reqJSON{r.ID, r.Requester, r.Action, string(r.Status), r.Created, r.Expires, what})
				}
				if a.jsonOut {
					return a.printJSON(out)
				}
				for _, r := range out {
					fmt.Fprintf(a.stdout, "%s  %-9s %-10s %-18s %s\n", r.ID[:12], r.Status, r.Requester, r.Action, clipLine(r.What, 70))
				}
				return nil
			})
		},
	}
	list.Flags().StringVar(&status, "status", "", "only requests in this status")

	show := &cobra.Command{
		Use: "show ID", Short: "print exactly what will run, who asked, why, the expiry and the votes", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				id, err := resolveRequest(cmd.Context(), q, args[0])
				if err != nil {
					return err
				}
				s, err := q.svc.Show(cmd.Context(), id)
				if err != nil {
					return err
				}
				return a.printSummary(s)
			})
		},
	}

	vote := func(decision string) *cobra.Command {
		var as string
		var valid time.Duration
		c := &cobra.Command{
			Use: decision + " ID", Args: cobra.ExactArgs(1),
			Short: map[string]string{cert.Approve: "sign your approval of a request", cert.Deny: "sign your refusal: one valid deny denies the request"}[decision],
			RunE: func(cmd *cobra.Command, args []string) error {
				return a.actOnRequest(cmd.Context(), as, args[0], func(q *quorumEnv, me string, id cert.ID) error {
					s, err := q.svc.Show(cmd.Context(), id)
					if err != nil {
						return err
					}
					if s.Status != state.StatusOpen {
						return codeError{exitQuorumRefused, fmt.Errorf("%w: request %s is %s", quorum.ErrNotOpen, id[:12], s.Status)}
					}
					if !a.quiet && !a.jsonOut {
						fmt.Fprintf(a.stderr, "%s request %s: %s\n", decision, id[:12], quorum.Describe(s.Request))
					}
					priv, err := a.signer(me)
					if err != nil {
						return err
					}
					// The approval is good until the request expires
					// (or --valid, if sooner): it is useless after that.
					exp := s.Request.Expires
					if valid > 0 && time.Now().Add(valid).Before(exp) {
						exp = time.Now().Add(valid)
					}
					ap := cert.Sign(priv, me, id, decision, exp)
					var st state.Status
					if decision == cert.Approve {
						st, err = q.svc.Approve(cmd.Context(), ap)
					} else {
						st, err = q.svc.Deny(cmd.Context(), ap)
					}
					if err != nil {
						return err
					}
					if a.jsonOut {
						return a.printJSON(map[string]string{"request": string(id), "decision": decision, "by": me, "status": string(st)})
					}
					a.say("%s: %s by %s; request is now %s", id[:12], decision, me, st)
					return nil
				})
			},
		}
		c.Flags().StringVar(&as, "as", "", "whose key signs (default DUALKEY_USER, or your only key)")
		c.Flags().DurationVar(&valid, "valid", 0, "the approval expires after this (default: with the request)")
		return c
	}

	// request opens a request by hand. The gate opens SQL requests itself;
	// this is for trying the flow and for tests.
	var rq struct {
		as, action, database, role, sql, class, reason, vaultOp, vaultRepo string
		params                                                             []string
		expires                                                            time.Duration
		wait                                                               bool
	}
	request := &cobra.Command{
		Use:    "request --action sql:CLASS --database DB --role R --sql TEXT --reason WHY | --action vault:OP --vault-repo R --param K=V",
		Short:  "open a request by hand (for trying the flow; the gate opens SQL requests itself)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			me, err := a.whoAmI(rq.as)
			if err != nil {
				return err
			}
			if rq.reason == "" {
				return usagef("give --reason")
			}
			ns, name, _ := strings.Cut(rq.action, ":")
			req := cert.Request{Requester: me, Action: rq.action, Reason: rq.reason, Created: time.Now(), Expires: time.Now().Add(rq.expires)}
			switch ns {
			case "sql":
				req.SQL = &cert.SQLAction{Database: rq.database, Role: rq.role, Text: rq.sql, Class: name}
			case "vault":
				params := map[string]string{}
				for _, p := range rq.params {
					k, v, ok := strings.Cut(p, "=")
					if !ok {
						return usagef("--param %q: want K=V", p)
					}
					params[k] = v
				}
				req.Vault = &cert.VaultAction{Op: name, Repo: rq.vaultRepo, Params: params}
			default:
				return usagef("--action %q: want sql:CLASS or vault:OP (policy changes: quorum propose; reviews: breakglass review)", rq.action)
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				p, err := q.svc.Policy(cmd.Context())
				if err != nil {
					return err
				}
				req.PolicySerial = p.Serial
				if err := req.Validate(); err != nil {
					return usageError{err}
				}
				id, err := q.svc.Open(cmd.Context(), req)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(map[string]string{"request": string(id)})
				}
				fmt.Fprintf(a.stdout, "request %s\n", id)
				if !rq.wait {
					return nil
				}
				st, err := q.svc.Wait(cmd.Context(), id)
				if err != nil {
					return err
				}
				a.say("request %s is %s", id[:12], st)
				return nil
			})
		},
	}
	f := request.Flags()
	f.StringVar(&rq.as, "as", "", "who asks (default DUALKEY_USER)")
	f.StringVar(&rq.action, "action", "sql:destructive", "sql:CLASS or vault:OP")
	f.StringVar(&rq.database, "database", "", "SQL: the database")
	f.StringVar(&rq.role, "role", "", "SQL: the role it runs as")
	f.StringVar(&rq.sql, "sql", "", "SQL: the statement, byte for byte")
	f.StringVar(&rq.vaultRepo, "vault-repo", "", "vault: the repository ID")
	f.StringArrayVar(&rq.params, "param", nil, "vault: a parameter K=V (repeat)")
	f.StringVar(&rq.reason, "reason", "", "why (required)")
	f.DurationVar(&rq.expires, "expires", time.Hour, "how long the request stays usable")
	f.BoolVar(&rq.wait, "wait", false, "wait until it is decided")

	// consume is what the gate does once a request is approved: verify the
	// certificate, claim the single run. For trying the flow and tests.
	var consumeAs string
	consume := &cobra.Command{
		Use: "consume ID", Short: "claim the single run of an approved request and print its certificate", Hidden: true,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.actOnRequest(cmd.Context(), consumeAs, args[0], func(q *quorumEnv, me string, id cert.ID) error {
				r, c, err := q.svc.Consume(cmd.Context(), id, me)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(map[string]string{"request": string(id), "certificate": base64.StdEncoding.EncodeToString(c.Encode())})
				}
				a.say("consumed %s: run now, once: %s", id[:12], quorum.Describe(r))
				return nil
			})
		},
	}
	consume.Flags().StringVar(&consumeAs, "as", "", "who runs it")
	cmd.AddCommand(list, show, vote(cert.Approve), vote(cert.Deny), request, consume, a.submitCmd(), a.certificateCmd())
	return cmd
}

// maxRequestFile bounds what submit reads: cert.MaxRequestSize plus a newline.
const maxRequestFile = cert.MaxRequestSize + 1

// readInput reads FILE, or stdin for "-", up to limit bytes.
func (a *app) readInput(name string, limit int64) ([]byte, error) {
	var r io.Reader
	if name == "-" {
		r = a.stdin
	} else {
		f, err := os.Open(name)
		if err != nil {
			return nil, fmt.Errorf("dualkey: %w", err)
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, fmt.Errorf("dualkey: read %s: %w", name, err)
	}
	if int64(len(b)) > limit {
		return nil, usagef("%s: more than %d bytes", name, limit)
	}
	return b, nil
}

// submitCmd opens a request made elsewhere (dualkey vault request) in the
// state, so approvers vote on it like on any other.
func (a *app) submitCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "submit FILE|-",
		Short: "open a canonical request made elsewhere (dualkey vault request) for approvers to vote on",
		Long: `Open a request produced elsewhere, e.g. by 'dualkey vault request', so that
approvers sign it with 'approvals approve'. The file (or stdin for -) must hold
exactly one canonical request (one trailing newline allowed): the bytes are
stored as they are and their hash is the request ID the approvals sign, so
a reformatted request is refused, never re-encoded. Its policy serial must
be the state's current one: the vault and the state must share one policy
(dualkey quorum show --json > policy.json; dualkey vault init --quorum-policy
policy.json). Submitting the same request again changes nothing.

The requester the request names is not authenticated here: it only decides
who may not approve it.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := a.readInput(args[0], maxRequestFile)
			if err != nil {
				return err
			}
			b = bytes.TrimSuffix(b, []byte("\n"))
			r, err := cert.ParseRequest(b)
			if err != nil {
				return usagef("request %s: %v", args[0], err)
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				p, err := q.svc.Policy(cmd.Context())
				if err != nil {
					return err
				}
				if r.PolicySerial != p.Serial {
					return codeError{exitQuorumRefused, fmt.Errorf("dualkey: %w: the request was made under policy serial %d, the state's policy is serial %d: "+
						"the vault and the state must hold the same policy (dualkey quorum show --json > policy.json; vault init --quorum-policy policy.json)",
						cert.ErrStalePolicy, r.PolicySerial, p.Serial)}
				}
				id, err := q.svc.Open(cmd.Context(), *r)
				if err != nil {
					return err
				}
				if id != r.ID() {
					// Open stores Encode(r); for a canonical request those are the bytes read.
					panic("dualkey: a canonical request re-encoded to other bytes")
				}
				s, err := q.svc.Show(cmd.Context(), id)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(map[string]string{"request": string(id), "status": string(s.Status)})
				}
				fmt.Fprintf(a.stdout, "request %s\n", id)
				a.say("%s asks for %s; %s; needs %d approvals (the requester never counts), from: %s",
					r.Requester, quorum.Describe(r), s.Status, s.Need, strings.Join(s.Pending, ", "))
				return nil
			})
		},
	}
}

// certificateCmd exports an approved vault request's certificate.
//
// Consuming: the vault records single use itself (consumed/<request ID>,
// written once), but the state's request must not stay "approved" for
// ever. Exporting the certificate is the state's single run of a vault
// request: the first export verifies the certificate and marks the request
// consumed (a ledger decision record names who exported it). Exporting it
// again prints the same certificate: it is built from votes the state holds
// anyway, and the vault accepts it at most once whoever holds a copy.
func (a *app) certificateCmd() *cobra.Command {
	var as, out string
	c := &cobra.Command{
		Use:   "certificate ID [-o FILE]",
		Short: "export the certificate of an approved vault request, for --certificate; marks the request consumed",
		Long: `Print the quorum certificate (the request's exact bytes and its valid
approvals, JSON) of an approved vault request, to pass to forget, lock, key
remove, vault set-min-retention or vault rotate-approvers with --certificate.
The vault verifies it itself and accepts it once.

The first export verifies the certificate under the state's policy and marks
the request consumed (recorded in the ledger with who exported it), so it no
longer shows as pending. A later export prints the same certificate again.
SQL requests are run and consumed by the gate, policy changes by 'quorum
apply', reviews by 'breakglass review': they have no certificate to export.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			me, err := a.whoAmI(as)
			if err != nil {
				return err
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				ctx := cmd.Context()
				id, err := resolveRequest(ctx, q, args[0])
				if err != nil {
					return err
				}
				s, err := q.svc.Show(ctx, id)
				if err != nil {
					return err
				}
				if s.Request.Vault == nil {
					return usagef("request %s is %s: certificates are exported for vault actions only", id[:12], s.Request.Action)
				}
				var c *cert.Certificate
				if s.Status == state.StatusConsumed {
					if c, err = q.svc.Certificate(ctx, id); err != nil {
						return err
					}
					fmt.Fprintf(a.stderr, "dualkey: request %s was already exported by %s at %s; the vault accepts its certificate once\n",
						id[:12], s.ConsumedBy, s.ConsumedAt.Format(time.RFC3339))
				} else if _, c, err = q.svc.Consume(ctx, id, me); err != nil {
					return err
				}
				enc := c.Encode()
				if a.jsonOut {
					return a.printJSON(map[string]any{"request": string(id), "certificate": json.RawMessage(enc)})
				}
				if out != "" {
					if err := os.WriteFile(out, append(enc, '\n'), 0o644); err != nil {
						return fmt.Errorf("dualkey: %w", err)
					}
				} else if _, err := a.stdout.Write(append(enc, '\n')); err != nil {
					return err
				}
				if !a.quiet {
					fmt.Fprintf(a.stderr, "certificate for %s (%d approvals): %s\n", id[:12], len(c.Approvals), quorum.Describe(s.Request))
				}
				return nil
			})
		},
	}
	c.Flags().StringVar(&as, "as", "", "who exports it, recorded as consuming the request (default DUALKEY_USER)")
	c.Flags().StringVarP(&out, "output", "o", "", "write the certificate to FILE instead of stdout")
	return c
}

func clipLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

func (a *app) printSummary(s *quorum.Summary) error {
	r := s.Request
	if a.jsonOut {
		type out struct {
			ID         string             `json:"id"`
			Status     string             `json:"status"`
			Requester  string             `json:"requester"`
			Action     string             `json:"action"`
			Reason     string             `json:"reason"`
			Created    time.Time          `json:"created"`
			Expires    time.Time          `json:"expires"`
			Serial     uint64             `json:"policy_serial"`
			SQL        *cert.SQLAction    `json:"sql,omitempty"`
			Vault      *cert.VaultAction  `json:"vault,omitempty"`
			Policy     string             `json:"policy,omitempty"`
			Review     *cert.ReviewAction `json:"review,omitempty"`
			Rule       string             `json:"rule"`
			Need       int                `json:"need"`
			Approved   []string           `json:"approved"`
			Denied     []string           `json:"denied"`
			Invalid    []string           `json:"invalid"`
			Pending    []string           `json:"pending"`
			ConsumedBy string             `json:"consumed_by,omitempty"`
			ConsumedAt time.Time          `json:"consumed_at,omitzero"`
		}
		o := out{ID: string(s.ID), Status: string(s.Status), Requester: r.Requester, Action: r.Action, Reason: r.Reason,
			Created: r.Created, Expires: r.Expires, Serial: r.PolicySerial, SQL: r.SQL, Vault: r.Vault, Review: r.Review,
			Rule: s.Rule, Need: s.Need, Approved: nonNil(s.Approved), Denied: nonNil(s.Denied), Invalid: nonNil(s.Invalid),
			Pending: nonNil(s.Pending), ConsumedBy: s.ConsumedBy, ConsumedAt: s.ConsumedAt}
		if r.Policy != nil {
			o.Policy = string(r.Policy.Encode())
		}
		return a.printJSON(o)
	}
	w := a.stdout
	fmt.Fprintf(w, "request   %s\nstatus    %s\nasked by  %s\naction    %s\nreason    %s\ncreated   %s\nexpires   %s\n",
		s.ID, s.Status, r.Requester, r.Action, r.Reason, r.Created.Format(time.RFC3339), r.Expires.Format(time.RFC3339))
	switch {
	case r.SQL != nil:
		fmt.Fprintf(w, "database  %s\nrole      %s\nclass     %s\nSQL (exactly what will run):\n%s\n", r.SQL.Database, r.SQL.Role, r.SQL.Class, indent(r.SQL.Text))
	case r.Vault != nil:
		fmt.Fprintf(w, "vault op  %s\nrepo      %s\nparams:\n", r.Vault.Op, r.Vault.Repo)
		keys := make([]string, 0, len(r.Vault.Params))
		for k := range r.Vault.Params {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(w, "    %s = %q\n", k, r.Vault.Params[k])
		}
	case r.Policy != nil:
		fmt.Fprintf(w, "new policy (serial %d):\n", r.Policy.Serial)
		save := a.stdout
		var b strings.Builder
		a.stdout = &b
		a.printPolicy(r.Policy)
		a.stdout = save
		fmt.Fprint(w, indent(b.String()))
	case r.Review != nil:
		fmt.Fprintf(w, "review of %s\n", r.Review.Subject)
		for _, k := range []string{"person", "role", "reason", "started", "ends"} {
			fmt.Fprintf(w, "    %-8s %s\n", k, r.Review.Details[k])
		}
	}
	fmt.Fprintf(w, "rule      %s: %d approvals needed, the requester never counts\n", s.Rule, s.Need)
	fmt.Fprintf(w, "approved  %d: %s\n", len(s.Approved), strings.Join(s.Approved, ", "))
	if len(s.Denied) > 0 {
		fmt.Fprintf(w, "denied    %s\n", strings.Join(s.Denied, ", "))
	}
	for _, inv := range s.Invalid {
		fmt.Fprintf(w, "not counted  %s\n", inv)
	}
	if s.Status == state.StatusOpen {
		fmt.Fprintf(w, "needed    %d more, from: %s\n", max(0, s.Need-len(s.Approved)), strings.Join(s.Pending, ", "))
	}
	if s.Status == state.StatusConsumed {
		fmt.Fprintf(w, "consumed  by %s at %s\n", s.ConsumedBy, s.ConsumedAt.Format(time.RFC3339))
	}
	return nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func indent(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return "    " + strings.Join(lines, "\n    ") + "\n"
}
