package ledger

import (
	"bufio"
	"bytes"
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
