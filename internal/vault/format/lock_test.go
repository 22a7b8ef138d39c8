package format

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestLockRecordFiles parses lock records as vaults wrote them: lock-v1.json
// before records carried a WAL range (it must still parse, with no range),
// lock-wal.json with one.
func TestLockRecordFiles(t *testing.T) {
	tests := []struct {
		file string
		want *WALRange
	}{
		{"lock-v1.json", nil},
		{"lock-wal.json", &WALRange{Timeline: 2, Start: 0x3000000, End: 0x6000000}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			r, err := ParseLockRecord(data)
			if err != nil {
				t.Fatalf("ParseLockRecord: %v", err)
			}
			if r.Snapshot.IsZero() || r.Reason != ReasonCommit || len(r.Packs) != 1 {
				t.Errorf("record %+v", r)
			}
			switch {
			case tt.want == nil && r.WAL != nil:
				t.Errorf("WAL = %v, want none", *r.WAL)
			case tt.want != nil && (r.WAL == nil || *r.WAL != *tt.want):
				t.Errorf("WAL = %v, want %v", r.WAL, *tt.want)
			}
			// A record without a range encodes as before: no "wal" key, so
			// an older vault reads what a newer one writes and vice versa.
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			var keys map[string]json.RawMessage
			if err := json.Unmarshal(b, &keys); err != nil {
				t.Fatal(err)
			}
			if _, ok := keys["wal"]; ok != (tt.want != nil) {
				t.Errorf("encoding %s: wal key present = %v", b, ok)
			}
		})
	}
}

func TestLockRecordBadWALRange(t *testing.T) {
	for _, wal := range []string{
		`{"timeline":0,"start":0,"end":16}`,
		`{"timeline":1,"start":16,"end":16}`,
		`{"timeline":1,"start":32,"end":16}`,
	} {
		data := []byte(`{"snapshot":"043a718774c572bd8a25adbeb1bfcd5c0256ae11cecf9f9c3f925d0e52beaf89",` +
			`"time":"2026-03-01T10:00:00Z","until":"2027-03-01T10:00:00Z","reason":"commit","wal":` + wal + `}`)
		if _, err := ParseLockRecord(data); !errors.Is(err, ErrFormat) {
			t.Errorf("range %s: %v, want ErrFormat", wal, err)
		}
	}
}

func TestWALRangeNeeds(t *testing.T) {
	r := WALRange{Timeline: 2, Start: 0x3000000, End: 0x5000000}
	tests := []struct {
		name string
		hd   WALHeader
		want bool
	}{
		{"inside", WALHeader{Timeline: 2, Start: 0x3100000, End: 0x3500000}, true},
		{"straddles start", WALHeader{Timeline: 2, Start: 0x2F00000, End: 0x3000001}, true},
		{"straddles end", WALHeader{Timeline: 2, Start: 0x4FFFFFF, End: 0x5100000}, true},
		{"covers all", WALHeader{Timeline: 2, Start: 0x2000000, End: 0x6000000}, true},
		{"ends at start", WALHeader{Timeline: 2, Start: 0x2F00000, End: 0x3000000}, false},
		{"starts at end", WALHeader{Timeline: 2, Start: 0x5000000, End: 0x5100000}, false},
		{"ancestor timeline in range", WALHeader{Timeline: 1, Start: 0x3000000, End: 0x3400000}, true},
		{"ancestor timeline before range", WALHeader{Timeline: 1, Start: 0x1000000, End: 0x1400000}, false},
		{"later timeline in range", WALHeader{Timeline: 3, Start: 0x3000000, End: 0x3400000}, false},
		{"own history", WALHeader{Timeline: 2, End: 40, History: true}, true},
		{"later history", WALHeader{Timeline: 3, End: 40, History: true}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := r.Needs(tt.hd); got != tt.want {
				t.Errorf("%v.Needs(%+v) = %v, want %v", r, tt.hd, got, tt.want)
			}
		})
	}
	if got, want := r.String(), "timeline 2, 0/3000000-0/5000000"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}
