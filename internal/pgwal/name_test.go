package pgwal

import (
	"strings"
	"testing"
)

func TestLSN(t *testing.T) {
	tests := []struct {
		s    string
		want LSN
		err  bool
	}{
		{"16/B374D848", 0x16B374D848, false},
		{"0/0", 0, false},
		{"FFFFFFFF/FFFFFFFF", 1<<64 - 1, false},
		{"0/3000028", 0x3000028, false},
		{"a/b", 0xA0000000B, false},
		{"", 0, true},
		{"16B374D848", 0, true},
		{"/1", 0, true},
		{"1/", 0, true},
		{"100000000/0", 0, true},
		{"+1/0", 0, true},
		{"g/0", 0, true},
	}
	for _, tt := range tests {
		got, err := ParseLSN(tt.s)
		if (err != nil) != tt.err || got != tt.want {
			t.Errorf("ParseLSN(%q) = %v, %v; want %v, error %v", tt.s, got, err, tt.want, tt.err)
		}
		if err == nil && !strings.EqualFold(got.String(), tt.s) {
			t.Errorf("LSN(%#x).String() = %q, want %q", uint64(got), got.String(), tt.s)
		}
	}
}

func TestSegmentName(t *testing.T) {
	tests := []struct {
		tli     uint32
		segno   uint64
		segSize int
		want    string
	}{
		{1, 10, 16 << 20, "00000001000000000000000A"},
		{1, 0x100, 16 << 20, "000000010000000100000000"},
		{2, 0x1FF, 16 << 20, "0000000200000001000000FF"},
		{3, 0x16B3, 16 << 20, "0000000300000016000000B3"},
		{1, 5, 1 << 30, "000000010000000100000001"},
		{1, 0x1000, 1 << 20, "000000010000000100000000"},
		{0xFFFFFFFF, 0x1FF, 64 << 20, "FFFFFFFF000000070000003F"},
	}
	for _, tt := range tests {
		if got := SegmentName(tt.tli, tt.segno, tt.segSize); got != tt.want {
			t.Errorf("SegmentName(%d, %#x, %d) = %s, want %s", tt.tli, tt.segno, tt.segSize, got, tt.want)
		}
		tli, segno, err := ParseSegmentName(tt.want, tt.segSize)
		if err != nil || tli != tt.tli || segno != tt.segno {
			t.Errorf("ParseSegmentName(%s, %d) = %d, %#x, %v", tt.want, tt.segSize, tli, segno, err)
		}
	}
	for _, bad := range []string{
		"00000001000000000000000a",  // lowercase
		"00000001000000000000000",   // short
		"000000010000000000000000A", // long
		"000000000000000000000001",  // timeline 0
		"000000010000000000000100",  // low part beyond 0xFF at 16 MiB
		"00000002.history",
		"00000001000000000000000A.partial",
	} {
		if _, _, err := ParseSegmentName(bad, DefaultSegmentSize); err == nil {
			t.Errorf("ParseSegmentName(%q) succeeded", bad)
		}
	}
	for _, size := range []int{0, 1 << 19, 3 << 20, 2 << 30} {
		if err := CheckSegmentSize(size); err == nil {
			t.Errorf("CheckSegmentSize(%d) accepted", size)
		}
	}
}

func TestHistoryName(t *testing.T) {
	if got := HistoryName(0x2A); got != "0000002A.history" {
		t.Errorf("HistoryName(42) = %s", got)
	}
	if tli, err := ParseHistoryName("0000002A.history"); err != nil || tli != 42 {
		t.Errorf("ParseHistoryName = %d, %v", tli, err)
	}
	for _, bad := range []string{"00000001.history", "0000002a.history", "2A.history", "0000002A.hist", "00000002000000000000000A"} {
		if _, err := ParseHistoryName(bad); err == nil {
			t.Errorf("ParseHistoryName(%q) succeeded", bad)
		}
	}
}

func TestParseHistory(t *testing.T) {
	got, err := ParseHistory([]byte("1\t0/3000000\tno recovery target specified\n\n# comment\n2\t0/5000A28\tbefore 2024-01-01\n"))
	if err != nil || len(got) != 2 || got[0] != (Switch{1, 0x3000000}) || got[1] != (Switch{2, 0x5000A28}) {
		t.Fatalf("ParseHistory = %v, %v", got, err)
	}
	for _, bad := range []string{"x\t0/1\n", "1\n", "1\tnope\n", "2\t0/5\n1\t0/6\n", "1\t0/6\n2\t0/5\n", "0\t0/1\n"} {
		if _, err := ParseHistory([]byte(bad)); err == nil {
			t.Errorf("ParseHistory(%q) succeeded", bad)
		}
	}
}
