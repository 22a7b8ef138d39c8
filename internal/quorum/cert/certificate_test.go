package cert

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestCertificateRoundTrip(t *testing.T) {
	req := sqlRequest("DROP TABLE t")
	c := &Certificate{Request: req.Encode(), Approvals: append(approve(req, "bob", "carol"),
		Sign(key("dave"), "dave", req.ID(), Deny, t0.Add(time.Minute)))}
	b := c.Encode()
	got, err := ParseCertificate(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Encode(), b) || !bytes.Equal(got.Request, c.Request) || len(got.Approvals) != 3 {
		t.Fatalf("round trip changed %s", b)
	}
	if _, err := Verify(got, testPolicy(), t0); !errors.Is(err, ErrDenied) {
		t.Errorf("Verify(parsed) = %v, want ErrDenied", err)
	}
}

func TestParseCertificateStrict(t *testing.T) {
	req := sqlRequest("DROP TABLE t")
	good := string((&Certificate{Request: req.Encode(), Approvals: approve(req, "bob")}).Encode())
	if _, err := ParseCertificate([]byte(good)); err != nil {
		t.Fatal(err)
	}
	sub := func(old, new string) string {
		if !strings.Contains(good, old) {
			t.Fatalf("test bug: %q not in %s", old, good)
		}
		return strings.Replace(good, old, new, 1)
	}
	for name, data := range map[string]string{
		"empty":              "",
		"trailing data":      good + "x",
		"unknown field":      sub(`"approvals"`, `"x":1,"approvals"`),
		"no request":         sub(`"request":"`, `"ignored":"`),
		"empty request":      `{"request":"","approvals":[]}`,
		"bad decision":       sub(`"approve"`, `"maybe"`),
		"bad id":             sub(`"request":"`+string(req.ID()), `"request":"`+strings.ToUpper(string(req.ID()))),
		"fractional expiry":  sub(`03:34:05Z`, `03:34:05.5Z`),
		"short signature":    `{"request":"eA==","approvals":[{"approver":"bob","request":"` + string(req.ID()) + `","decision":"approve","expires":"2030-01-02T03:34:05Z","signature":"AAAA"}]}`,
		"uppercase approver": sub(`"approver":"bob"`, `"approver":"Bob"`),
		"oversized":          good + strings.Repeat(" ", MaxCertificateSize),
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseCertificate([]byte(data)); !errors.Is(err, ErrMalformed) {
				t.Errorf("ParseCertificate = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestApprovalMessage(t *testing.T) {
	id := sqlRequest("x").ID()
	got := string(ApprovalMessage("bob", id, Approve, t0.Add(time.Hour+time.Millisecond)))
	want := "dualkey/approval/v1\nbob\n" + string(id) + "\napprove\n2030-01-02T04:04:05Z"
	if got != want {
		t.Errorf("ApprovalMessage = %q, want %q", got, want)
	}
	a := Sign(key("bob"), "bob", id, Approve, t0.Add(time.Hour+time.Millisecond))
	if !a.Expires.Equal(t0.Add(time.Hour)) {
		t.Errorf("Sign kept expiry %s, want it truncated to the second", a.Expires)
	}
	if err := a.VerifySignature(pub("bob")); err != nil {
		t.Error(err)
	}
	if err := a.VerifySignature(pub("carol")); !errors.Is(err, ErrBadSignature) {
		t.Errorf("VerifySignature under another key = %v, want ErrBadSignature", err)
	}
}
