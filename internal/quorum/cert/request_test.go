package cert

import (
	"bytes"
	"errors"
	"testing"
	"time"
)

// The canonical encoding is a format: changing it changes every request ID.
// The ID was checked independently:
//
//	printf 'dualkey/request/v1\n%s' "$want" | sha256sum
func TestRequestGolden(t *testing.T) {
	r := sqlRequest("DELETE FROM t WHERE a < 1 && b > 2")
	r.Created = t0.Add(999 * time.Millisecond) // truncated to the second
	want := `{"version":1,"requester":"alice","action":"sql:destructive","reason":"drop the old audit partition",` +
		`"created":"2030-01-02T03:04:05Z","expires":"2030-01-02T04:04:05Z","policy_serial":1,` +
		`"sql":{"database":"shop","role":"app_owner","text":"DELETE FROM t WHERE a < 1 && b > 2","class":"destructive"}}`
	if got := string(r.Encode()); got != want {
		t.Fatalf("Encode =\n%s\nwant\n%s", got, want)
	}
	if id, want := r.ID(), ID("794f6d77bbea2be692934e246924c43bdf05df92761b73bed5000c7a672ea3d8"); id != want {
		t.Errorf("ID = %s, want %s", id, want)
	}
	got, err := ParseRequest([]byte(want))
	if err != nil {
		t.Fatal(err)
	}
	if !got.Created.Equal(t0) || got.SQL.Text != r.SQL.Text || got.ID() != r.ID() {
		t.Errorf("ParseRequest = %+v", got)
	}
}

func TestRequestRoundTrip(t *testing.T) {
	newPolicy := testPolicy()
	newPolicy.Serial = 8
	reqs := []*Request{
		sqlRequest("DROP TABLE \"ünïcode\"; -- \u2028 \x00 <script>"),
		{Requester: "bob", Action: "vault:snapshot.forget", Reason: "r", Created: t0, Expires: t0.Add(time.Second), PolicySerial: 3,
			Vault: &VaultAction{Op: "snapshot.forget", Repo: "r", Params: map[string]string{"z": "1", "a": "2", "m": ""}}},
		{Requester: "bob", Action: "vault:key.remove", Reason: "r", Created: t0, Expires: t0.Add(time.Second), PolicySerial: 3,
			Vault: &VaultAction{Op: "key.remove", Repo: "r"}},
		{Requester: "bob", Action: ActionPolicyChange, Reason: "r", Created: t0, Expires: t0.Add(time.Second), PolicySerial: 7, Policy: newPolicy},
		{Requester: "bob", Action: ActionBreakglassReview, Reason: "r", Created: t0, Expires: t0.Add(time.Second), PolicySerial: 7, Review: &ReviewAction{Subject: "s", Details: map[string]string{"k": "v"}}},
	}
	for _, r := range reqs {
		if err := r.Validate(); err != nil {
			t.Fatalf("%s: %v", r.Action, err)
		}
		b := r.Encode()
		got, err := ParseRequest(b)
		if err != nil {
			t.Fatalf("ParseRequest(%s): %v", b, err)
		}
		if !bytes.Equal(got.Encode(), b) || got.ID() != r.ID() {
			t.Errorf("round trip of %s changed it", b)
		}
	}
}

func TestParseRequestStrict(t *testing.T) {
	good := string(sqlRequest("DROP TABLE t").Encode())
	vault := `{"version":1,"requester":"bob","action":"vault:lock.shorten","reason":"r","created":"2030-01-02T03:04:05Z","expires":"2030-01-02T04:04:05Z","policy_serial":1,"vault":{"op":"lock.shorten","repo":"r","params":{"a":"1","b":"2"}}}`
	if _, err := ParseRequest([]byte(vault)); err != nil {
		t.Fatalf("vault request: %v", err)
	}
	sqlPart := `"sql":{"database":"shop","role":"app_owner","text":"DROP TABLE t","class":"destructive"}`
	vaultPart := `"vault":{"op":"destructive","repo":"r","params":{}}`
	replace := func(s, old, new string) string {
		if !bytes.Contains([]byte(s), []byte(old)) {
			t.Fatalf("test bug: %q not in %s", old, s)
		}
		return string(bytes.Replace([]byte(s), []byte(old), []byte(new), 1))
	}
	tests := []struct{ name, data string }{
		{"empty", ""},
		{"not json", "DROP TABLE t"},
		{"trailing data", good + "{}"},
		{"trailing newline", good + "\n"},
		{"leading space", " " + good},
		{"indented", replace(good, `,"action"`, `, "action"`)},
		{"unknown field", replace(good, `"version":1,`, `"version":1,"approved":true,`)},
		{"missing field", replace(good, `"reason":"drop the old audit partition",`, ``)},
		{"missing sql field", replace(good, `"role":"app_owner",`, ``)},
		{"duplicate field", replace(good, `"requester":"alice",`, `"requester":"bob","requester":"alice",`)},
		{"field name case", replace(good, `"requester"`, `"Requester"`)},
		{"field order", replace(good, `"version":1,"requester":"alice",`, `"requester":"alice","version":1,`)},
		{"version 2", replace(good, `"version":1`, `"version":2`)},
		{"no payload", replace(good, ","+sqlPart, ``)},
		{"two payloads", replace(good, sqlPart, sqlPart+","+vaultPart)},
		{"null payload", replace(good, sqlPart, `"sql":null,`+vaultPart)},
		{"payload does not match action", replace(good, sqlPart, vaultPart)},
		{"class does not match action", replace(good, `"class":"destructive"`, `"class":"select"`)},
		{"vault op does not match action", replace(vault, `"op":"lock.shorten"`, `"op":"lock.extend"`)},
		{"params unsorted", replace(vault, `{"a":"1","b":"2"}`, `{"b":"2","a":"1"}`)},
		{"params null", replace(vault, `{"a":"1","b":"2"}`, `null`)},
		{"fractional seconds", replace(good, `03:04:05Z"`, `03:04:05.0Z"`)},
		{"time zone offset", replace(good, `03:04:05Z"`, `03:04:05+00:00"`)},
		{"expires before created", replace(good, `"expires":"2030-01-02T04:04:05Z"`, `"expires":"2030-01-02T03:04:04Z"`)},
		{"expires equals created", replace(good, `"expires":"2030-01-02T04:04:05Z"`, `"expires":"2030-01-02T03:04:05Z"`)},
		{"policy serial 0", replace(good, `"policy_serial":1`, `"policy_serial":0`)},
		{"policy serial float", replace(good, `"policy_serial":1`, `"policy_serial":1.0`)},
		{"policy serial exponent", replace(good, `"policy_serial":1`, `"policy_serial":1e0`)},
		{"uppercase requester", replace(good, `"alice"`, `"Alice"`)},
		{"empty reason", replace(good, `"drop the old audit partition"`, `""`)},
		{"escaped html", replace(good, `DROP TABLE t`, `DROP TABLE \u003ct`)},
		{"needless escape", replace(good, `DROP TABLE t`, `DROP TABLE \u0074`)},
		{"invalid utf-8", replace(good, `DROP TABLE t`, "DROP TABLE \xff")},
		{"wildcard action", replace(good, `"action":"sql:destructive"`, `"action":"sql:*"`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r, err := ParseRequest([]byte(tt.data)); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseRequest = %+v, %v; want ErrMalformed", r, err)
			}
		})
	}
}

func TestRequestValidate(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(r *Request)
	}{
		{"policy change with wrong next serial", func(r *Request) {
			p := testPolicy()
			p.Serial = 5
			r.Action, r.SQL, r.Policy = ActionPolicyChange, nil, p
		}},
		{"policy change with invalid policy", func(r *Request) {
			p := testPolicy()
			p.Serial, p.Rules[0].Threshold = 2, 0
			r.Action, r.SQL, r.Policy = ActionPolicyChange, nil, p
		}},
		{"year 1999", func(r *Request) { r.Created = time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC) }},
		{"zero times", func(r *Request) { r.Created, r.Expires = time.Time{}, time.Time{} }},
		{"expires within the same second", func(r *Request) { r.Expires = r.Created.Add(500 * time.Millisecond) }},
		{"oversized reason", func(r *Request) { r.Reason = string(make([]byte, MaxReasonLen+1)) }},
		{"empty role", func(r *Request) { r.SQL.Role = "" }},
		{"invalid utf-8 in param key", func(r *Request) {
			r.Action, r.SQL, r.Vault = "vault:x", nil, &VaultAction{Op: "x", Repo: "r", Params: map[string]string{"\xff": ""}}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := sqlRequest("DROP TABLE t")
			tt.mutate(r)
			if err := r.Validate(); !errors.Is(err, ErrMalformed) {
				t.Errorf("Validate = %v, want ErrMalformed", err)
			}
			if _, err := ParseRequest(r.Encode()); err == nil {
				t.Errorf("ParseRequest accepted %s", r.Encode())
			}
		})
	}
}

func TestParseID(t *testing.T) {
	id := sqlRequest("x").ID()
	if got, err := ParseID(string(id)); err != nil || got != id {
		t.Fatalf("ParseID(%s) = %v, %v", id, got, err)
	}
	for _, bad := range []string{"", string(id[:63]), string(id) + "0", "X" + string(id[1:]), "A" + string(id[1:])} {
		if _, err := ParseID(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseID(%q) = %v, want ErrMalformed", bad, err)
		}
	}
}
