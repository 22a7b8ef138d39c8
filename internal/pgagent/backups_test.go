package pgagent

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/format"
)

func TestTimelinePathReach(t *testing.T) {
	// Timeline 1 ran to 0/5000000, where timeline 2 branched off; 2 ran to
	// 0/9000000, where 3 branched off.
	path := timelinePath{{TLI: 1, End: 0x5000000}, {TLI: 2, End: 0x9000000}, {TLI: 3}}
	runs := map[uint32][]pgwal.Range{
		1: {{Start: 0x1000000, End: 0x6000000}},                                     // beyond its switch: an old branch
		2: {{Start: 0x5000000, End: 0x9000000}},                                     //
		3: {{Start: 0x9000000, End: 0xA000000}, {Start: 0xB000000, End: 0xC000000}}, // a gap
	}
	contiguous := func(tli uint32, from pgwal.LSN) pgwal.LSN {
		for _, r := range runs[tli] {
			if r.Start <= from && from < r.End {
				return r.End
			}
		}
		return from
	}
	tests := []struct {
		name  string
		tli   uint32
		start pgwal.LSN
		want  pgwal.LSN
	}{
		{"from timeline 1 through 2 to the gap on 3", 1, 0x2000000, 0xA000000},
		{"from timeline 2", 2, 0x6000000, 0xA000000},
		{"start missing", 1, 0x500, 0x500},
		{"not on the path", 4, 0x1000000, 0},
		{"after the gap", 3, 0xB000000, 0xC000000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := path.reach(contiguous, tt.tli, tt.start); got != tt.want {
				t.Errorf("reach(%d, %v) = %v, want %v", tt.tli, tt.start, got, tt.want)
			}
		})
	}
	// A gap on timeline 2 stops the path there.
	runs[2] = []pgwal.Range{{Start: 0x5000000, End: 0x7000000}}
	if got := path.reach(contiguous, 1, 0x2000000); got != 0x7000000 {
		t.Errorf("reach with a gap on timeline 2 = %v, want 0/7000000", got)
	}
}

func TestChoose(t *testing.T) {
	base := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	id := func(b byte) format.ID { var x format.ID; x[0] = b; return x }
	bs := []BaseBackupInfo{
		{ID: id(1), Usable: true, WALReach: 0x9000000, Meta: BaseMeta{StartLSN: 0x1000000, EndLSN: 0x1100000, EndTime: base}},
		{ID: id(2), Usable: false, WALReach: 0x3000000, Meta: BaseMeta{StartLSN: 0x3000000, EndLSN: 0x3100000, EndTime: base.Add(time.Hour)}},
		{ID: id(3), Usable: true, WALReach: 0x9000000, Meta: BaseMeta{StartLSN: 0x5000000, EndLSN: 0x5100000, EndTime: base.Add(2 * time.Hour)}},
	}
	win := Window{Earliest: base, Latest: base.Add(3 * time.Hour), LatestLSN: 0x9000000, Timeline: 1}
	next := map[byte]uint32{1: 100, 3: 5000}
	nextXID := func(b *BaseBackupInfo) (uint32, error) { return next[b.ID[0]], nil }
	tests := []struct {
		name string
		opts RestoreOptions
		want byte   // chosen backup, 0: error
		err  string // part of the error
	}{
		{"latest takes the newest usable", RestoreOptions{Latest: true}, 3, ""},
		{"time after the newest", RestoreOptions{Time: base.Add(150 * time.Minute)}, 3, ""},
		{"time between skips the unusable one", RestoreOptions{Time: base.Add(90 * time.Minute)}, 1, ""},
		{"time at a backup's end needs an older one", RestoreOptions{Time: base.Add(2 * time.Hour)}, 1, ""},
		{"time before the window", RestoreOptions{Time: base.Add(-time.Minute)}, 0, "before the recoverable window"},
		{"time after the window", RestoreOptions{Time: base.Add(4 * time.Hour)}, 0, "after the last WAL"},
		{"lsn after the newest end", RestoreOptions{LSN: 0x6000000}, 3, ""},
		{"lsn inside the newest", RestoreOptions{LSN: 0x5050000}, 1, ""},
		{"lsn beyond the WAL", RestoreOptions{LSN: 0xA000000}, 0, "reaches only"},
		{"xid after the newest checkpoint", RestoreOptions{BeforeXID: 6000}, 3, ""},
		{"xid older than the newest checkpoint", RestoreOptions{BeforeXID: 4000}, 1, ""},
		{"xid older than every backup", RestoreOptions{BeforeXID: 50}, 0, "had begun"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := choose(bs, win, &tt.opts, nextXID)
			if tt.want == 0 {
				if err == nil || !errors.Is(err, ErrNoBackup) || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("choose = %v, %v; want ErrNoBackup with %q", got, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.ID[0] != tt.want {
				t.Errorf("chose backup %d, want %d", got.ID[0], tt.want)
			}
		})
	}
	if _, err := choose(nil, Window{}, &RestoreOptions{Latest: true}, nil); !errors.Is(err, ErrNoBackup) {
		t.Errorf("no backups: %v", err)
	}
}
