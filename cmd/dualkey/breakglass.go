package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/quorum/cert"
	"github.com/dualkey/dualkey/internal/state"
)

func (a *app) breakglassCmd() *cobra.Command {
	var as, role, reason string
	var dur time.Duration
	cmd := &cobra.Command{
		Use:   "breakglass --reason TEXT --for 30m [--role R]",
		Short: "act without a quorum for a short time: only for granted people and roles; logged, announced, and flagged until others review it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if reason == "" || dur == 0 {
				return usagef("give --reason and --for")
			}
			me, err := a.whoAmI(as)
			if err != nil {
				return err
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				r := role
				if r == "" {
					p, err := q.svc.Policy(cmd.Context())
					if err != nil {
						return err
					}
					for _, g := range p.BreakGlass {
						if g.Person == me && len(g.Roles) == 1 {
							r = g.Roles[0]
						}
					}
					if r == "" {
						return usagef("give --role")
					}
				}
				b, err := q.svc.StartBreakGlass(cmd.Context(), me, r, reason, dur)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(bgJSON(b, time.Now()))
				}
				fmt.Fprintf(a.stdout, "break-glass session %s: %s acts as %s until %s\n", b.ID, b.Person, b.Role, b.Ends.Local().Format(time.RFC3339))
				a.say("this is logged and announced; it stays flagged until others approve its review: dualkey breakglass review %s", b.ID)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&as, "as", "", "who breaks the glass (default DUALKEY_USER)")
	cmd.Flags().StringVar(&role, "role", "", "the role (default: your only granted role)")
	cmd.Flags().StringVar(&reason, "reason", "", "why (required; others will read it)")
	cmd.Flags().DurationVar(&dur, "for", 0, "how long, e.g. 30m (at most 4h)")

	var all bool
	list := &cobra.Command{
		Use: "list [--all]", Short: "break-glass sessions not yet reviewed (all with --all)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				bs, err := q.svc.ListBreakGlass(cmd.Context(), !all)
				if err != nil {
					return err
				}
				now := time.Now()
				if a.jsonOut {
					out := []map[string]any{}
					for _, b := range bs {
						out = append(out, bgJSON(b, now))
					}
					return a.printJSON(out)
				}
				for _, b := range bs {
					st := "ended"
					if b.Active(now) {
						st = "ACTIVE"
					}
					rev := "UNREVIEWED"
					if b.Reviewed {
						rev = "reviewed by " + b.ReviewRequestID[:12]
					}
					fmt.Fprintf(a.stdout, "%s  %-10s %-10s %-6s %s → %s  %s  %s\n", b.ID, b.Person, b.Role, st,
						b.Started.Local().Format(time.RFC3339), b.Ends.Local().Format(time.RFC3339), rev, clipLine(b.Reason, 50))
				}
				return nil
			})
		},
	}
	list.Flags().BoolVar(&all, "all", false, "include reviewed sessions")

	var rAs, rReason string
	var rExpires time.Duration
	review := &cobra.Command{
		Use:   "review SESSION",
		Short: "open the review request of a session, or, once others approved it, mark the session reviewed",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			me, err := a.whoAmI(rAs)
			if err != nil {
				return err
			}
			return a.withQuorum(cmd.Context(), func(q *quorumEnv) error {
				ctx := cmd.Context()
				b, err := q.svc.BreakGlass(ctx, args[0])
				if err != nil {
					return err
				}
				if b.Reviewed {
					a.say("session %s was reviewed by request %s", b.ID, b.ReviewRequestID)
					return nil
				}
				// An approved review of this session: complete it. An open
				// one: say so. None: open one.
				rs, err := q.svc.List(ctx, "")
				if err != nil {
					return err
				}
				for _, r := range rs {
					if r.Action != cert.ActionBreakglassReview || (r.Status != state.StatusApproved && r.Status != state.StatusOpen) {
						continue
					}
					cr, err := cert.ParseRequest(r.Doc)
					if err != nil || cr.Review.Subject != "breakglass/"+b.ID {
						continue
					}
					if r.Status == state.StatusOpen {
						fmt.Fprintf(a.stdout, "request %s\n", r.ID)
						a.say("the review of %s is open; it needs approvals by others: dualkey approvals approve %s", b.ID, r.ID[:12])
						return nil
					}
					if _, err := q.svc.MarkBreakGlassReviewed(ctx, cert.ID(r.ID), me); err != nil {
						return err
					}
					a.say("session %s reviewed (request %s)", b.ID, r.ID[:12])
					return nil
				}
				why := rReason
				if why == "" {
					why = "review of break-glass session " + b.ID + " by " + b.Person + ": " + b.Reason
				}
				req, err := q.svc.ReviewRequest(ctx, b.ID, me, why, time.Now().Add(rExpires))
				if err != nil {
					return err
				}
				id, err := q.svc.Open(ctx, req)
				if err != nil {
					return err
				}
				if a.jsonOut {
					return a.printJSON(map[string]string{"request": string(id), "session": b.ID})
				}
				fmt.Fprintf(a.stdout, "request %s\n", id)
				a.say("review of %s opened; others approve it with: dualkey approvals approve %s; then run this command again", b.ID, id[:12])
				return nil
			})
		},
	}
	review.Flags().StringVar(&rAs, "as", "", "who asks for or completes the review (default DUALKEY_USER)")
	review.Flags().StringVar(&rReason, "reason", "", "what the reviewers should check")
	review.Flags().DurationVar(&rExpires, "expires", 72*time.Hour, "how long the review request stays usable")
	cmd.AddCommand(list, review)
	return cmd
}

func bgJSON(b state.BreakGlass, now time.Time) map[string]any {
	return map[string]any{"id": b.ID, "person": b.Person, "role": b.Role, "reason": strings.TrimSpace(b.Reason),
		"started": b.Started, "ends": b.Ends, "active": b.Active(now), "reviewed": b.Reviewed, "review_request": b.ReviewRequestID}
}
