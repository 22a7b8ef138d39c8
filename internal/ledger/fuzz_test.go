package ledger

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"testing"
)

func FuzzParseRecord(f *testing.F) {
	// Seeds: the records of a small ledger (testdata/records.jsonl) and a
	// few near misses.
	data, err := os.ReadFile("testdata/records.jsonl")
	if err != nil {
		f.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, MaxRecordSize)
	for sc.Scan() {
		f.Add(bytes.Clone(sc.Bytes()))
	}
	f.Add([]byte(`{"seq":1}`))
	f.Add([]byte(`{"seq":1,"time":"2025-01-01T00:00:00Z","kind":"x","actor":"","data":null,"prev":"","hash":""}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := ParseRecord(in)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
			return
		}
		// Parse → encode round-trips to the input, and re-parses.
		out := r.Encode()
		if !bytes.Equal(out, in) {
			t.Fatalf("round trip changed %q → %q", in, out)
		}
		if _, err := ParseRecord(out); err != nil {
			t.Fatalf("re-parse: %v", err)
		}
	})
}

// FuzzAppendString holds appendString's fast path to json.Marshal's bytes.
func FuzzAppendString(f *testing.F) {
	for _, s := range []string{"", "alice", `a"b`, "<&>", "\u2028", "\xff", "\x7f"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendString(nil, s); !bytes.Equal(got, want) {
			t.Fatalf("appendString(%q) = %q, want %q", s, got, want)
		}
	})
}
