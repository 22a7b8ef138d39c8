package gate

import (
	"errors"
	"strings"
	"testing"
)

func TestVerifier(t *testing.T) {
	v, err := NewVerifier("correct horse", 0)
	if err != nil {
		t.Fatal(err)
	}
	s := v.String()
	if !strings.HasPrefix(s, "SCRAM-SHA-256$4096:") {
		t.Fatalf("format: %s", s)
	}
	back, err := ParseVerifier(s)
	if err != nil || back.String() != s {
		t.Fatalf("round trip: %v %s", err, back)
	}
	// PostgreSQL's own verifier for "postgres" (from pg_authid) parses too.
	const pg = "SCRAM-SHA-256$4096:3sVUJN31RTt1ptPxG64Bbw==$hvF7hKrqW0Lo9u/CI/zExZZQ/cfuE9RFRCTWb8u3R1c=:d8o68e7iZzvM2Lt6YDsYCBm7mSX1wiSeuDaaFjJGTAs="
	if _, err := ParseVerifier(pg); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", "md5abc", "SCRAM-SHA-256$x:AA==$AA==:AA==", "SCRAM-SHA-256$4096:AA==$AA==:AA==", pg[:len(pg)-4]} {
		if _, err := ParseVerifier(bad); !errors.Is(err, ErrBadVerifier) {
			t.Errorf("ParseVerifier(%q) = %v", bad, err)
		}
	}
}
