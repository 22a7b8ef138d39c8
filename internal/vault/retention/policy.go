// Package retention decides which snapshots to forget and collects the
// packs nothing needs any more.
//
// Retention counts time, never snapshots: a policy keeps what was committed
// within a span of the vault's clock, and the newest snapshot of each hour,
// day, week, month or year within a span. There is deliberately no "keep
// the last N": a client that can append (threat T3 in DESIGN.md) could
// otherwise push every real snapshot out with a flood of junk ones.
//
// Garbage collection is two-phase and needs no lock file: a prune run marks
// unreferenced packs (format.Mark); a later run deletes a pack only if a
// mark older than the grace period listed it and it is still unreferenced.
// A backup opened after a mark never deduplicates against marked packs
// (repo.Index.Exclude), and the vault refuses to delete a pack any live lock
// record lists, so a snapshot committed between the runs keeps its packs.
package retention

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/vault/repo"
)

// ErrEmptyPolicy is returned by Plan for a policy that keeps nothing: a
// forget with no rule is far more likely a mistake than a wish to forget
// everything.
var ErrEmptyPolicy = errors.New("retention: empty policy: say how long to keep snapshots (within, hourly, daily, weekly, monthly or yearly)")

// Policy says which snapshots to keep. Every duration is a span back from
// now on the vault's clock; zero means the rule is off.
type Policy struct {
	// Within keeps every snapshot committed within this span.
	Within time.Duration
	// Hourly, Daily, Weekly, Monthly and Yearly keep the newest snapshot of
	// each hour, day, ISO week, month or year (UTC) whose newest snapshot
	// is within the span. Buckets are per host and path set, so snapshots
	// of one source never displace those of another.
	Hourly, Daily, Weekly, Monthly, Yearly time.Duration
	// Tags, if set, limits the policy to snapshots carrying at least one of
	// them; others are neither kept nor forgotten.
	Tags []string
	// Host, if set, limits the policy to snapshots of this host.
	Host string
}

// Empty reports whether p has no keep rule.
func (p Policy) Empty() bool {
	return p.Within == 0 && p.Hourly == 0 && p.Daily == 0 && p.Weekly == 0 && p.Monthly == 0 && p.Yearly == 0
}

// Validate rejects an empty policy and negative spans.
func (p Policy) Validate() error {
	if p.Empty() {
		return ErrEmptyPolicy
	}
	for _, r := range p.rules() {
		if r.span < 0 {
			return fmt.Errorf("retention: %s span %v is negative", r.name, r.span)
		}
	}
	if p.Within < 0 {
		return fmt.Errorf("retention: within span %v is negative", p.Within)
	}
	return nil
}

type bucketRule struct {
	name string
	span time.Duration
	key  func(time.Time) string
}

func (p Policy) rules() []bucketRule {
	return []bucketRule{
		{"hourly", p.Hourly, func(t time.Time) string { return t.Format("2006-01-02T15") }},
		{"daily", p.Daily, func(t time.Time) string { return t.Format("2006-01-02") }},
		{"weekly", p.Weekly, func(t time.Time) string {
			y, w := t.ISOWeek()
			return fmt.Sprintf("%04d-W%02d", y, w)
		}},
		{"monthly", p.Monthly, func(t time.Time) string { return t.Format("2006-01") }},
		{"yearly", p.Yearly, func(t time.Time) string { return t.Format("2006") }},
	}
}

// matches reports whether p applies to s.
func (p Policy) matches(s repo.SnapshotInfo) bool {
	if p.Host != "" && s.Hostname != p.Host {
		return false
	}
	if len(p.Tags) > 0 && !slices.ContainsFunc(p.Tags, func(t string) bool { return slices.Contains(s.Tags, t) }) {
		return false
	}
	return true
}

// Decision is what Plan decided for one snapshot, and why.
type Decision struct {
	Snapshot repo.SnapshotInfo
	// Reasons say why it is kept ("locked until …", "within 30d", "daily
	// 2026-11-20"), or "policy" when nothing keeps it.
	Reasons []string
}

// Reason joins the reasons.
func (d Decision) Reason() string { return strings.Join(d.Reasons, ", ") }

// Plan applies p to snaps at time now (the vault's time, as SnapshotInfo.When
// is) and returns the snapshots to keep and to forget, each in the order of
// snaps. Snapshots p does not apply to (Tags, Host) are in neither list. A
// snapshot under a live retention lock is always kept, whatever p says; the
// vault would refuse to remove it anyway, and saying so here keeps plans
// honest.
func Plan(snaps []repo.SnapshotInfo, p Policy, now time.Time) (keep, forget []Decision, err error) {
	if err := p.Validate(); err != nil {
		return nil, nil, err
	}
	reasons := make([][]string, len(snaps))
	var idx []int // snapshots p applies to
	for i, s := range snaps {
		if !p.matches(s) {
			continue
		}
		idx = append(idx, i)
		if s.Locked(now) {
			reasons[i] = append(reasons[i], "locked until "+s.LockUntil.UTC().Format(time.RFC3339))
		}
		if p.Within > 0 && now.Sub(s.When()) < p.Within {
			reasons[i] = append(reasons[i], "within "+fmtSpan(p.Within))
		}
	}

	// Newest first within each group of one host and path set.
	groups := map[string][]int{}
	var order []string
	for _, i := range idx {
		k := snaps[i].Hostname + "\x00" + strings.Join(snaps[i].Paths, "\x00")
		if _, ok := groups[k]; !ok {
			order = append(order, k)
		}
		groups[k] = append(groups[k], i)
	}
	for _, k := range order {
		g := groups[k]
		slices.SortStableFunc(g, func(a, b int) int { return snaps[b].When().Compare(snaps[a].When()) })
		for _, rule := range p.rules() {
			if rule.span <= 0 {
				continue
			}
			cutoff := now.Add(-rule.span)
			seen := map[string]bool{}
			for _, i := range g {
				w := snaps[i].When().UTC()
				b := rule.key(w)
				if seen[b] {
					continue
				}
				seen[b] = true // the newest of the bucket decides for it
				if w.After(cutoff) {
					reasons[i] = append(reasons[i], rule.name+" "+b)
				}
			}
		}
	}

	for _, i := range idx {
		if len(reasons[i]) > 0 {
			keep = append(keep, Decision{Snapshot: snaps[i], Reasons: reasons[i]})
		} else {
			forget = append(forget, Decision{Snapshot: snaps[i], Reasons: []string{"policy"}})
		}
	}
	return keep, forget, nil
}

// fmtSpan prints whole days as "30d", anything else as a Go duration.
func fmtSpan(d time.Duration) string {
	if d%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	}
	return d.String()
}
