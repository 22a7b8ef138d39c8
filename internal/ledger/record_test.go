package ledger

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func sampleRecord() Record {
	r := Record{
		Seq:   2,
		Time:  time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.UTC),
		Kind:  KindStatement,
		Actor: "alice",
		Data:  json.RawMessage(`{"db":"shop","sql":"DROP TABLE orders","class":"destructive","decision":"hold"}`),
		Prev:  sha256.Sum256([]byte("record 1")),
	}
	r.Hash = r.ComputeHash()
	return r
}

// The encoding and the hash are a format other tools may check: pin them.
func TestRecordGolden(t *testing.T) {
	r := sampleRecord()
	body := `{"seq":2,"time":"2025-03-01T12:00:00.123456789Z","kind":"statement","actor":"alice",` +
		`"data":{"db":"shop","sql":"DROP TABLE orders","class":"destructive","decision":"hold"},` +
		`"prev":"` + r.Prev.String() + `"`
	if want := sha256.Sum256([]byte("dualkey ledger record v1\x00" + body + "}")); r.Hash != want {
		t.Errorf("hash %s, want %x", r.Hash, want)
	}
	if got, want := string(r.Encode()), body+`,"hash":"`+r.Hash.String()+`"}`; got != want {
		t.Errorf("Encode:\n got %s\nwant %s", got, want)
	}
	got, err := ParseRecord(r.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if !got.Time.Equal(r.Time) || got.Seq != r.Seq || got.Kind != r.Kind || got.Actor != r.Actor ||
		!bytes.Equal(got.Data, r.Data) || got.Prev != r.Prev || got.Hash != r.Hash {
		t.Errorf("round trip: got %+v, want %+v", got, r)
	}
}

func TestParseRecordStrict(t *testing.T) {
	good := string(sampleRecord().Encode())
	first := Record{Seq: 1, Time: time.Unix(1e9, 0).UTC(), Kind: KindAlert}
	first.Hash = first.ComputeHash()
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"canonical", good, true},
		{"first record, null data", string(first.Encode()), true},
		{"space after colon", strings.Replace(good, `"seq":2`, `"seq": 2`, 1), false},
		{"trailing newline", good + "\n", false},
		{"trailing garbage", good + "{}", false},
		{"fields reordered", strings.Replace(good, `"kind":"statement","actor":"alice"`, `"actor":"alice","kind":"statement"`, 1), false},
		{"unknown field", strings.Replace(good, `{"seq":2,`, `{"x":1,"seq":2,`, 1), false},
		{"duplicate field", strings.Replace(good, `{"seq":2,`, `{"seq":3,"seq":2,`, 1), false},
		{"upper-case key", strings.Replace(good, `"seq"`, `"SEQ"`, 1), false},
		{"upper-case hex", strings.Replace(good, `"prev":"`+sampleRecord().Prev.String(), `"prev":"`+strings.ToUpper(sampleRecord().Prev.String()), 1), false},
		{"time with offset", strings.Replace(good, `12:00:00.123456789Z`, `13:00:00.123456789+01:00`, 1), false},
		{"time trailing zero", strings.Replace(good, `.123456789Z`, `.1234567890Z`, 1), false},
		{"data not compact", strings.Replace(good, `{"db":"shop"`, `{"db": "shop"`, 1), false},
		{"data invalid", strings.Replace(good, `"data":{`, `"data":{{`, 1), false},
		{"seq zero", strings.Replace(good, `"seq":2`, `"seq":0`, 1), false},
		{"seq negative", strings.Replace(good, `"seq":2`, `"seq":-2`, 1), false},
		{"empty kind", strings.Replace(good, `"kind":"statement"`, `"kind":""`, 1), false},
		{"seq 2 with zero prev", strings.Replace(good, sampleRecord().Prev.String(), Hash{}.String(), 1), false},
		{"seq 1 with a prev", strings.Replace(good, `"seq":2`, `"seq":1`, 1), false},
		{"short hash", strings.Replace(good, `"hash":"`, `"hash":"0`, 1), false},
		{"not json", "hello", false},
		{"empty", "", false},
		{"too large", `{"seq":2,"data":"` + strings.Repeat("x", MaxRecordSize) + `"}`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ParseRecord([]byte(tt.in))
			if tt.ok != (err == nil) {
				t.Fatalf("ParseRecord = %+v, %v; want ok %v", r, err, tt.ok)
			}
			if err != nil && !errors.Is(err, ErrFormat) {
				t.Errorf("error %v does not wrap ErrFormat", err)
			}
			if err == nil && string(r.Encode()) != tt.in {
				t.Errorf("round trip changed the bytes")
			}
		})
	}
}

func TestObjectName(t *testing.T) {
	if got, want := ObjectName(1, 64), "ledger/00000000000000000001-00000000000000000064"; got != want {
		t.Fatalf("ObjectName = %q, want %q", got, want)
	}
	from, to, err := ParseObjectName(ObjectName(65, 129))
	if err != nil || from != 65 || to != 129 {
		t.Fatalf("ParseObjectName = %d, %d, %v", from, to, err)
	}
	for _, bad := range []string{"ledger/1-2", "ledger/00000000000000000002-00000000000000000001",
		"ledger/00000000000000000000-00000000000000000001", "x/00000000000000000001-00000000000000000002",
		"ledger/00000000000000000001-00000000000000000002x", "ledger/+0000000000000000001-00000000000000000002"} {
		if _, _, err := ParseObjectName(bad); err == nil {
			t.Errorf("ParseObjectName(%q) accepted", bad)
		}
	}
}

// seal is ComputeHash and Encode in one pass: the same hash, the same bytes.
func TestSealMatchesEncode(t *testing.T) {
	for _, actor := range []string{"", "alice", `o"brien`, "a<b>&c", "zoë", "tab\there", "\u2028", "bad\xffutf8"} {
		r := sampleRecord()
		r.Actor = actor
		r.Hash = Hash{}
		want := r
		want.Hash = want.ComputeHash()
		got := r
		enc := got.seal()
		if got.Hash != want.Hash {
			t.Errorf("actor %q: seal hash %s, ComputeHash %s", actor, got.Hash, want.Hash)
		}
		if !bytes.Equal(enc, want.Encode()) {
			t.Errorf("actor %q: seal\n %s\nEncode\n %s", actor, enc, want.Encode())
		}
	}
}

// appendString must write exactly what json.Marshal writes, or records
// would encode two ways (ParseRecord refuses the other one).
func TestAppendStringAsJSON(t *testing.T) {
	for _, s := range []string{"", "statement", "alice", "x y", `"`, `\`, "<", ">", "&", "\x00", "\x1f", "\x7f", "é", "\u2028", "\u2029", "\xff", "~"} {
		want, _ := json.Marshal(s)
		if got := appendString([]byte("p"), s); string(got) != "p"+string(want) {
			t.Errorf("appendString(%q) = %q, want %q", s, got[1:], want)
		}
	}
}
