package format

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func FuzzIndexHeader(f *testing.F) {
	a, b := Hash([]byte("a")), Hash([]byte("b"))
	f.Add(AppendIndexHeader(nil, nil))
	f.Add(append(AppendIndexHeader(nil, []ID{a, b}), "body"...))
	f.Add(AppendIndexHeader(nil, []ID{a})[:20])
	f.Add([]byte("DKI1\xff\xff\xff\xff"))
	f.Add([]byte("DKI2\x00\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		packs, body, err := ParseIndexHeader(data)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
			return
		}
		// Parse → write round-trips to the input.
		got := append(AppendIndexHeader(nil, packs), body...)
		if !bytes.Equal(got, data) {
			t.Fatalf("round trip changed %x → %x", data, got)
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	seed, _ := json.Marshal(Config{Version: 1, ID: Hash([]byte("r")).String(), Created: time.Unix(1e9, 0).UTC(), MinRetention: Duration(720 * time.Hour)})
	f.Add(seed)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":2,"id":"x"}`))
	f.Add([]byte(`{"version":1,"id":"` + Hash(nil).String() + `","min_retention":"-1h"}`))
	f.Add([]byte(`{"version":1,"id":"` + Hash(nil).String() + `","extra":true}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			return
		}
		if c.Validate() != nil || c.MinRetention < 0 {
			t.Fatalf("accepted invalid %+v", c)
		}
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		c2, err := ParseConfig(b)
		if err != nil {
			t.Fatalf("re-encoded config refused: %v", err)
		}
		if !bytes.Equal(c.CanonicalBytes(), c2.CanonicalBytes()) || c.MAC != c2.MAC {
			t.Fatalf("round trip changed %+v → %+v", c, c2)
		}
	})
}

func FuzzParseLockRecord(f *testing.F) {
	seed, _ := json.Marshal(LockRecord{Snapshot: Hash([]byte("s")), Time: time.Unix(1e9, 0).UTC(), Until: time.Unix(2e9, 0).UTC(), Reason: ReasonCommit, Packs: []ID{Hash([]byte("p"))}})
	f.Add(seed)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"snapshot":"00","time":"x"}`))
	for _, name := range []string{"lock-v1.json", "lock-wal.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := ParseLockRecord(data)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
			return
		}
		if r.Snapshot.IsZero() || r.Time.IsZero() || r.Until.IsZero() {
			t.Fatalf("accepted incomplete %+v", r)
		}
		b, err := json.Marshal(r)
		if err != nil {
			return // e.g. a year outside [0,9999] parses but cannot be written
		}
		r2, err := ParseLockRecord(b)
		if err != nil {
			t.Fatalf("re-encoded record refused: %v", err)
		}
		if r2.Snapshot != r.Snapshot || !r2.Time.Equal(r.Time) || !r2.Until.Equal(r.Until) || r2.Reason != r.Reason || len(r2.Packs) != len(r.Packs) ||
			(r.WAL == nil) != (r2.WAL == nil) || (r.WAL != nil && *r.WAL != *r2.WAL) {
			t.Fatalf("round trip changed %+v → %+v", r, r2)
		}
	})
}

// FuzzQuorumRecords checks the vault's quorum record decoders never panic,
// wrap ErrFormat on refusal, and accept only what re-decodes the same.
func FuzzQuorumRecords(f *testing.F) {
	t0 := time.Unix(1e9, 0).UTC()
	p, _ := json.Marshal(PolicyRecord{Time: t0, Prev: "h", Policy: []byte("{}"), Certificate: []byte("c")})
	c, _ := json.Marshal(ChangeRecord{Time: t0, MinRetention: Duration(time.Hour), Certificate: []byte("c")})
	u, _ := json.Marshal(ConsumedRecord{Time: t0, Op: "key.remove", Nonce: []byte("n"), Certificate: []byte("c")})
	for _, s := range [][]byte{p, c, u, []byte(`{}`), []byte(`{"time":"x"}`), append(p, '{')} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		check := func(err error) {
			if err != nil && !errors.Is(err, ErrFormat) {
				t.Fatalf("error %v does not wrap ErrFormat", err)
			}
		}
		if r, err := ParsePolicyRecord(data); err == nil {
			b, _ := json.Marshal(r)
			if _, err := ParsePolicyRecord(b); err != nil {
				t.Fatalf("policy record does not re-decode: %v", err)
			}
		} else {
			check(err)
		}
		if r, err := ParseChangeRecord(data); err == nil {
			b, _ := json.Marshal(r)
			if _, err := ParseChangeRecord(b); err != nil {
				t.Fatalf("change record does not re-decode: %v", err)
			}
		} else {
			check(err)
		}
		_, err := ParseConsumedRecord(data)
		check(err)
		if body, err := ParseLedgerObject(data); err == nil {
			if !bytes.Equal(append(AppendLedgerHeader(nil), body...), data) {
				t.Fatal("ledger object does not round-trip")
			}
		} else {
			check(err)
		}
	})
}
