package retention

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/snapshot"
)

var now = time.Date(2026, 11, 20, 12, 0, 0, 0, time.UTC)

type snapSpec struct {
	name   string
	vault  time.Time // vault time
	client time.Time // client time; zero means equal to vault
	lock   time.Time
	host   string
	tags   []string
	paths  []string
}

func mkSnaps(specs []snapSpec) []repo.SnapshotInfo {
	out := make([]repo.SnapshotInfo, len(specs))
	for i, s := range specs {
		client := s.client
		if client.IsZero() {
			client = s.vault
		}
		host := s.host
		if host == "" {
			host = "db1"
		}
		paths := s.paths
		if paths == nil {
			paths = []string{"/var/lib/postgresql"}
		}
		out[i] = repo.SnapshotInfo{
			ID:        format.Hash([]byte(s.name)),
			Snapshot:  &snapshot.Snapshot{Time: client, Hostname: host, Tags: s.tags, Paths: paths},
			VaultTime: s.vault, LockUntil: s.lock,
		}
	}
	return out
}

func TestPlan(t *testing.T) {
	day := 24 * time.Hour
	at := func(d time.Duration) time.Time { return now.Add(-d) }
	tests := []struct {
		name   string
		snaps  []snapSpec
		policy Policy
		keep   map[string]string // snapshot → a substring of its reason
		forget []string
	}{
		{"within",
			[]snapSpec{{name: "1d", vault: at(day)}, {name: "29d", vault: at(29 * day)}, {name: "31d", vault: at(31 * day)}},
			Policy{Within: 30 * day},
			map[string]string{"1d": "within 30d", "29d": "within 30d"}, []string{"31d"}},
		{"daily buckets across days",
			[]snapSpec{
				{name: "d1 10:00", vault: time.Date(2026, 11, 19, 10, 0, 0, 0, time.UTC)},
				{name: "d1 15:00", vault: time.Date(2026, 11, 19, 15, 0, 0, 0, time.UTC)},
				{name: "d2 09:00", vault: time.Date(2026, 11, 18, 9, 0, 0, 0, time.UTC)},
				{name: "d10", vault: time.Date(2026, 11, 10, 9, 0, 0, 0, time.UTC)},
			},
			Policy{Daily: 7 * day},
			map[string]string{"d1 15:00": "daily 2026-11-19", "d2 09:00": "daily 2026-11-18"},
			[]string{"d1 10:00", "d10"}},
		{"weekly monthly yearly",
			[]snapSpec{
				{name: "w47", vault: time.Date(2026, 11, 17, 0, 0, 0, 0, time.UTC)},
				{name: "w46", vault: time.Date(2026, 11, 10, 0, 0, 0, 0, time.UTC)},
				{name: "oct", vault: time.Date(2026, 10, 5, 0, 0, 0, 0, time.UTC)},
				{name: "2024", vault: time.Date(2024, 6, 1, 0, 0, 0, 0, time.UTC)},
				{name: "2020", vault: time.Date(2020, 6, 1, 0, 0, 0, 0, time.UTC)},
			},
			Policy{Weekly: 14 * day, Monthly: 60 * day, Yearly: 3 * 365 * day},
			map[string]string{"w47": "weekly 2026-W47", "w46": "weekly 2026-W46", "oct": "monthly 2026-10", "2024": "yearly 2024"},
			[]string{"2020"}},
		{"hourly",
			[]snapSpec{
				{name: "11:10", vault: time.Date(2026, 11, 20, 11, 10, 0, 0, time.UTC)},
				{name: "11:50", vault: time.Date(2026, 11, 20, 11, 50, 0, 0, time.UTC)},
				{name: "03:00", vault: time.Date(2026, 11, 20, 3, 0, 0, 0, time.UTC)},
			},
			Policy{Hourly: 6 * time.Hour},
			map[string]string{"11:50": "hourly 2026-11-20T11"}, []string{"11:10", "03:00"}},
		{"locked snapshots are kept whatever the policy",
			[]snapSpec{{name: "old locked", vault: at(400 * day), lock: now.Add(time.Hour)}, {name: "old", vault: at(400 * day), lock: at(time.Hour)}},
			Policy{Within: day},
			map[string]string{"old locked": "locked until 2026-11-20T13:00:00Z"}, []string{"old"}},
		{"vault time, not client time",
			[]snapSpec{{name: "backdated", vault: at(time.Hour), client: at(900 * day)}, {name: "forward dated", vault: at(90 * day), client: now}},
			Policy{Within: 30 * day},
			map[string]string{"backdated": "within"}, []string{"forward dated"}},
		{"tag filter",
			[]snapSpec{{name: "db old", vault: at(60 * day), tags: []string{"db"}}, {name: "db new", vault: at(day), tags: []string{"x", "db"}}, {name: "other old", vault: at(60 * day), tags: []string{"other"}}},
			Policy{Within: 30 * day, Tags: []string{"db"}},
			map[string]string{"db new": "within"}, []string{"db old"}},
		{"host filter",
			[]snapSpec{{name: "db1 old", vault: at(60 * day)}, {name: "db2 old", vault: at(60 * day), host: "db2"}},
			Policy{Within: 30 * day, Host: "db1"},
			map[string]string{}, []string{"db1 old"}},
		{"buckets per source: another path does not displace",
			[]snapSpec{
				{name: "real", vault: time.Date(2026, 11, 10, 1, 0, 0, 0, time.UTC)},
				{name: "junk later same day", vault: time.Date(2026, 11, 10, 23, 0, 0, 0, time.UTC), paths: []string{"/junk"}},
			},
			Policy{Daily: 30 * day},
			map[string]string{"real": "daily 2026-11-10", "junk later same day": "daily 2026-11-10"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snaps := mkSnaps(tt.snaps)
			keep, forget, err := Plan(snaps, tt.policy, now)
			if err != nil {
				t.Fatal(err)
			}
			byID := map[format.ID]string{}
			for _, s := range tt.snaps {
				byID[format.Hash([]byte(s.name))] = s.name
			}
			gotKeep := map[string]string{}
			for _, d := range keep {
				gotKeep[byID[d.Snapshot.ID]] = d.Reason()
			}
			var gotForget []string
			for _, d := range forget {
				gotForget = append(gotForget, byID[d.Snapshot.ID])
				if d.Reason() != "policy" {
					t.Errorf("forget %s: reason %q", byID[d.Snapshot.ID], d.Reason())
				}
			}
			if len(gotKeep) != len(tt.keep) {
				t.Errorf("keep = %v, want %v", gotKeep, tt.keep)
			}
			for name, reason := range tt.keep {
				if got, ok := gotKeep[name]; !ok || !strings.Contains(got, reason) {
					t.Errorf("keep %s: reason %q (kept %v), want %q", name, got, ok, reason)
				}
			}
			slices.Sort(gotForget)
			want := slices.Clone(tt.forget)
			slices.Sort(want)
			if !slices.Equal(gotForget, want) {
				t.Errorf("forget = %v, want %v", gotForget, want)
			}
		})
	}
}

func TestPlanRefusesEmptyPolicy(t *testing.T) {
	snaps := mkSnaps([]snapSpec{{name: "a", vault: now}})
	for _, p := range []Policy{{}, {Tags: []string{"db"}, Host: "db1"}} {
		keep, forget, err := Plan(snaps, p, now)
		if !errors.Is(err, ErrEmptyPolicy) || keep != nil || forget != nil {
			t.Errorf("Plan(%+v) = %v, %v, %v; want ErrEmptyPolicy", p, keep, forget, err)
		}
	}
	if _, _, err := Plan(snaps, Policy{Daily: -time.Hour}, now); err == nil {
		t.Error("a negative span was accepted")
	}
}

// A flood of junk snapshots committed now, from the same host and paths as
// the real ones, leaves every real snapshot kept: time, not count, decides.
func TestPlanFlood(t *testing.T) {
	var specs []snapSpec
	for d := range 20 {
		specs = append(specs, snapSpec{name: fmt.Sprintf("real %d", d), vault: now.Add(-time.Duration(d)*24*time.Hour - time.Hour)})
	}
	for i := range 1000 {
		specs = append(specs, snapSpec{name: fmt.Sprintf("junk %d", i), vault: now.Add(-time.Duration(i) * time.Second)})
	}
	keep, _, err := Plan(mkSnaps(specs), Policy{Within: 2 * 24 * time.Hour, Daily: 30 * 24 * time.Hour}, now)
	if err != nil {
		t.Fatal(err)
	}
	kept := map[format.ID]bool{}
	for _, d := range keep {
		kept[d.Snapshot.ID] = true
	}
	for d := range 20 {
		if !kept[format.Hash(fmt.Appendf(nil, "real %d", d))] {
			t.Errorf("real snapshot of day -%d forgotten", d)
		}
	}
}
