package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/dualkey/dualkey/internal/tlscert"
)

// The certificate files the server generates in its state folder.
const (
	CertFile = "tls.crt"
	KeyFile  = "tls.key"
)

// Fingerprint returns "sha256:" and the hex SHA-256 of the certificate's DER
// encoding, the form [ClientOptions.Fingerprint] pins.
func Fingerprint(cert *x509.Certificate) string {
	return FingerprintDER(cert.Raw)
}

// FingerprintDER is [Fingerprint] of a DER-encoded certificate.
func FingerprintDER(der []byte) string { return tlscert.Fingerprint(der) }

// loadOrCreateCert loads certFile/keyFile, or, when both are empty, the pair
// in stateDir, generating it on first start for host (the listen host; may
// be empty). A state folder holding only one of the two files is an error,
// never silently replaced.
func loadOrCreateCert(stateDir, certFile, keyFile, host string) (tls.Certificate, error) {
	if certFile != "" || keyFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("server: tls: %w", err)
		}
		return c, nil
	}
	certFile, keyFile = filepath.Join(stateDir, CertFile), filepath.Join(stateDir, KeyFile)
	_, cerr := os.Stat(certFile)
	_, kerr := os.Stat(keyFile)
	switch {
	case cerr == nil && kerr == nil:
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("server: tls: %w", err)
		}
		return c, nil
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
	default:
		return tls.Certificate{}, fmt.Errorf("server: tls: %s and %s must both exist or both be absent", certFile, keyFile)
	}
	certPEM, keyPEM, err := tlscert.SelfSigned("dualkey vault", []string{host}, time.Now())
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return tls.Certificate{}, fmt.Errorf("server: tls: %w", err)
	}
	// Key first: a crash between the two leaves a key without certificate,
	// which the check above reports instead of regenerating silently.
	if err := writeFileAtomic(keyFile, keyPEM); err != nil {
		return tls.Certificate{}, err
	}
	if err := writeFileAtomic(certFile, certPEM); err != nil {
		return tls.Certificate{}, err
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("server: tls: %w", err)
	}
	return c, nil
}

// writeFileAtomic writes data to name with mode 0600 via a fsynced temp file
// and a rename.
func writeFileAtomic(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), ".tmp-"+filepath.Base(name)+"-*")
	if err != nil {
		return fmt.Errorf("server: write %s: %w", name, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		return fmt.Errorf("server: write %s: %w", name, err)
	}
	return nil
}
