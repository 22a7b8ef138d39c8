package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/dualkey/dualkey/internal/vault/format"
)

func FuzzParsePath(f *testing.F) {
	h := strings.Repeat("0a", 32)
	for _, s := range []string{
		"/v1/whoami", "/v1/config", "/v1/commit", "/v1/locks", "/v1/locks/" + h + "/extend",
		"/v1/objects/data/" + h, "/v1/objects/config/config", "/v1/objects/index/", "/v1/objects/data/../config",
		"/v1/objects/DATA/" + h, "/v1//objects", "", "/", "/v1/objects/data/" + h + "/",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		rt, err := parsePath(p)
		if err != nil {
			if !errors.Is(err, errBadPath) {
				t.Fatalf("error %v does not wrap errBadPath", err)
			}
			return
		}
		switch rt.kind {
		case routeObject:
			if err := rt.handle.Validate(); err != nil {
				t.Fatalf("accepted invalid handle %v: %v", rt.handle, err)
			}
			if got := "/v1/objects/" + string(rt.handle.Type) + "/" + rt.handle.Name; got != p {
				t.Fatalf("round trip %q → %q", p, got)
			}
		case routeList:
			if !rt.handle.Type.Valid() || rt.handle.Name != "" {
				t.Fatalf("bad list route %+v", rt)
			}
		case routeExtend:
			if p != "/v1/locks/"+rt.snap.String()+"/extend" {
				t.Fatalf("round trip %q → %s", p, rt.snap)
			}
		}
		if strings.Contains(p, "..") || strings.Contains(p, "%") || strings.ContainsAny(p, "ABCDEF\\") {
			t.Fatalf("accepted %q", p)
		}
	})
}

func FuzzParseRange(f *testing.F) {
	for _, s := range []string{"", "bytes=0-0", "bytes=10-", "bytes=5-2", "bytes=-3", "bytes=0-9223372036854775807", "bytes=1-2,3-4"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		off, n, ok, err := parseRange(s)
		if err != nil {
			if ok || !errors.Is(err, errBadRange) {
				t.Fatalf("parseRange(%q) = ok %v, err %v", s, ok, err)
			}
			return
		}
		if !ok {
			if s != "" {
				t.Fatalf("parseRange(%q) ignored a header", s)
			}
			return
		}
		if off < 0 || n < 0 || n > 0 && off+n-1 < off {
			t.Fatalf("parseRange(%q) = %d, %d", s, off, n)
		}
	})
}

func FuzzCommitRequest(f *testing.F) {
	id := format.Hash([]byte("p")).String()
	for _, s := range []string{
		`{"snapshot":"eA==","packs":["` + id + `"],"lock_for":"720h"}`,
		`{"snapshot":"eA=="}`, `{"snapshot":"eA==","packs":null}`, `{}`, `[]`, `{"snapshot":"eA==","x":1}`,
		`{"snapshot":"eA==","lock_for":"-1s"}`, `{"snapshot":"eA=="} {}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := decodeCommit(data, 16)
		if err != nil {
			return
		}
		if len(req.Snapshot) == 0 || len(req.Packs) > 16 || req.LockFor < 0 {
			t.Fatalf("accepted %+v", req)
		}
		// What was accepted re-encodes to something accepted and equal.
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		req2, err := decodeCommit(b, 16)
		if err != nil {
			t.Fatalf("re-encoded request refused: %v", err)
		}
		if !bytes.Equal(req.Snapshot, req2.Snapshot) || len(req.Packs) != len(req2.Packs) || req.LockFor != req2.LockFor {
			t.Fatalf("round trip changed %+v → %+v", req, req2)
		}
	})
}
