package pgwal

import (
	"fmt"
	"strconv"
	"strings"
)

// LSN is a position in PostgreSQL's WAL: a byte offset into the stream.
// The zero LSN is PostgreSQL's InvalidXLogRecPtr.
type LSN uint64

// String formats l as PostgreSQL does: "16/B374D848".
func (l LSN) String() string { return fmt.Sprintf("%X/%X", uint32(l>>32), uint32(l)) }

// IsZero reports whether l is the zero (invalid) LSN.
func (l LSN) IsZero() bool { return l == 0 }

// ParseLSN parses PostgreSQL's "16/B374D848" form (hex, either case).
func ParseLSN(s string) (LSN, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok || hi == "" || lo == "" || len(hi) > 8 || len(lo) > 8 {
		return 0, fmt.Errorf("pgwal: LSN %q: want two hex numbers of at most 8 digits like 16/B374D848", s)
	}
	h, err1 := strconv.ParseUint(hi, 16, 32)
	l, err2 := strconv.ParseUint(lo, 16, 32)
	if err1 != nil || err2 != nil || strings.HasPrefix(hi, "+") || strings.HasPrefix(lo, "+") {
		return 0, fmt.Errorf("pgwal: LSN %q: not hexadecimal", s)
	}
	return LSN(h<<32 | l), nil
}
