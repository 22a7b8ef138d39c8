package pgwal

import (
	"fmt"
	"strconv"
)

// DefaultSegmentSize is PostgreSQL's default WAL segment size (initdb
// --wal-segsize=16).
const DefaultSegmentSize = 16 << 20

// CheckSegmentSize reports whether n is a WAL segment size PostgreSQL
// allows: a power of two from 1 MiB to 1 GiB.
func CheckSegmentSize(n int) error {
	if n < 1<<20 || n > 1<<30 || n&(n-1) != 0 {
		return fmt.Errorf("pgwal: WAL segment size %d: want a power of two from 1 MiB to 1 GiB", n)
	}
	return nil
}

// segmentsPerID is PostgreSQL's XLogSegmentsPerXLogId: how many segments
// make up the 4 GiB of one "log id", the middle part of a segment name.
func segmentsPerID(segSize int) uint64 { return 0x100000000 / uint64(segSize) }

// SegmentName returns the file name PostgreSQL gives segment segno of
// timeline tli with segments of segSize bytes (XLogFileName):
// "00000001000000000000000A" is timeline 1, segment 10 at 16 MiB. It panics
// on a segment size CheckSegmentSize refuses.
func SegmentName(tli uint32, segno uint64, segSize int) string {
	if err := CheckSegmentSize(segSize); err != nil {
		panic(err)
	}
	n := segmentsPerID(segSize)
	return fmt.Sprintf("%08X%08X%08X", tli, uint32(segno/n), uint32(segno%n))
}

// ParseSegmentName parses a segment file name (24 uppercase hex digits, as
// PostgreSQL writes them) for segments of segSize bytes.
func ParseSegmentName(name string, segSize int) (tli uint32, segno uint64, err error) {
	if err := CheckSegmentSize(segSize); err != nil {
		return 0, 0, err
	}
	if len(name) != 24 || !upperHex(name) {
		return 0, 0, fmt.Errorf("pgwal: %q is not a WAL segment name (24 uppercase hex digits)", name)
	}
	t, _ := strconv.ParseUint(name[:8], 16, 32)
	hi, _ := strconv.ParseUint(name[8:16], 16, 32)
	lo, _ := strconv.ParseUint(name[16:], 16, 32)
	n := segmentsPerID(segSize)
	if t == 0 || lo >= n {
		return 0, 0, fmt.Errorf("pgwal: %q is not a WAL segment name for %d-byte segments", name, segSize)
	}
	return uint32(t), hi*n + lo, nil
}

// SegmentStart returns the LSN where segment segno begins.
func SegmentStart(segno uint64, segSize int) LSN { return LSN(segno * uint64(segSize)) }

// SegmentOf returns the number of the segment holding lsn.
func SegmentOf(lsn LSN, segSize int) uint64 { return uint64(lsn) / uint64(segSize) }

// HistoryName returns the name of timeline tli's history file
// ("00000002.history").
func HistoryName(tli uint32) string { return fmt.Sprintf("%08X.history", tli) }

// ParseHistoryName parses a history file name.
func ParseHistoryName(name string) (uint32, error) {
	if len(name) != 16 || name[8:] != ".history" || !upperHex(name[:8]) {
		return 0, fmt.Errorf("pgwal: %q is not a timeline history file name", name)
	}
	t, _ := strconv.ParseUint(name[:8], 16, 32)
	if t < 2 {
		return 0, fmt.Errorf("pgwal: %q: timeline %d has no history file", name, t)
	}
	return uint32(t), nil
}

func upperHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'A' || c > 'F') {
			return false
		}
	}
	return true
}
