package gate

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/dualkey/dualkey/internal/tlscert"
)

// TLSConfig returns the gate's server TLS configuration from the PEM files
// certFile and keyFile. With generate, a missing pair is created first: a
// self-signed ECDSA P-256 certificate for hosts (and localhost), kept, so
// that clients pinning it keep working across restarts. It also returns
// the certificate's SHA-256 fingerprint ("sha256:HEX") to print.
func TLSConfig(certFile, keyFile string, generate bool, hosts []string) (*tls.Config, string, error) {
	if generate && certFile != "" && keyFile != "" {
		if _, err := os.Stat(certFile); errors.Is(err, fs.ErrNotExist) {
			if err := generateCert(certFile, keyFile, hosts); err != nil {
				return nil, "", err
			}
		}
	}
	if certFile == "" || keyFile == "" {
		return nil, "", errors.New("gate: tls: give both a certificate and a key file, or neither")
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, "", fmt.Errorf("gate: tls: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}, tlscert.Fingerprint(pair.Certificate[0]), nil
}

func generateCert(certFile, keyFile string, hosts []string) error {
	certPEM, keyPEM, err := tlscert.SelfSigned("dualkey gate", hosts, time.Now())
	if err != nil {
		return fmt.Errorf("gate: tls: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(certFile), 0o700); err != nil {
		return fmt.Errorf("gate: tls: %w", err)
	}
	// The key first, exclusively: two gates starting at once must not
	// end up with one's certificate and the other's key.
	if err := writeNew(keyFile, keyPEM, 0o600); err != nil {
		return err
	}
	return writeNew(certFile, certPEM, 0o644)
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("gate: tls: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("gate: tls: %w", err)
	}
	return nil
}
