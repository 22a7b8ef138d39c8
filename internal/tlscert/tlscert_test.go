package tlscert

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/deptest"
)

func TestSelfSigned(t *testing.T) {
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	certPEM, keyPEM, err := SelfSigned("dualkey test", []string{"db.example", "10.1.2.3", "0.0.0.0", "127.0.0.1", "", "localhost"}, now)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatalf("the certificate and key do not pair: %v", err)
	}
	c, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject.CommonName != "dualkey test" || !c.NotBefore.Before(now) || !c.NotAfter.Equal(now.Add(Lifetime)) {
		t.Errorf("subject %q, valid %v to %v", c.Subject.CommonName, c.NotBefore, c.NotAfter)
	}
	if !slices.Equal(c.DNSNames, []string{"localhost", "db.example"}) {
		t.Errorf("DNS names %v", c.DNSNames)
	}
	var ips []string
	for _, ip := range c.IPAddresses {
		ips = append(ips, ip.String())
	}
	if !slices.Equal(ips, []string{"127.0.0.1", "::1", "10.1.2.3"}) {
		t.Errorf("IP addresses %v (unspecified and repeated loopback must add nothing)", ips)
	}
	if err := c.VerifyHostname("db.example"); err != nil {
		t.Error(err)
	}
	if err := c.VerifyHostname(net.IPv4(10, 1, 2, 3).String()); err != nil {
		t.Error(err)
	}
	fp := Fingerprint(c.Raw)
	if !strings.HasPrefix(fp, "sha256:") || len(fp) != len("sha256:")+64 {
		t.Errorf("fingerprint %q", fp)
	}
	other, _, err := SelfSigned("dualkey test", nil, now)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := pem.Decode(other); b == nil || Fingerprint(b.Bytes) == fp {
		t.Error("a second certificate is missing or shares the first one's fingerprint")
	}
}

// tlscert is a leaf both servers import.
func TestDeps(t *testing.T) {
	deptest.Forbid(t, deptest.Module+"internal/tlscert", map[string]string{
		deptest.Module + "internal": "a leaf: the vault server and the gate import it",
		deptest.Module + "cmd":      "nothing under internal imports cmd",
	})
}
