// Package s3test is the one test harness that starts a real S3-compatible
// server: versitygw with its POSIX backend, which implements versioning and
// COMPLIANCE-mode Object Lock (retention that no account, the gateway's
// root included, can shorten or bypass).
//
// One server runs per test binary, on 127.0.0.1 and a free port, storing
// its objects in a temporary folder; each test gets a bucket of its own
// ([NewBucket]). When the test process runs as root, the server runs as the
// unprivileged OS user the PostgreSQL harness uses. A missing versitygw is
// installed with `go install` (scripts/setup.sh normally has done it); if
// that fails, the test fails naming the command. Nothing is skipped.
//
// The server is killed when the test process ends (parent-death signal);
// its folder stays until the next test process using the harness starts,
// which removes the folders of processes no longer running. [StartTLS] is
// a second server speaking HTTPS with a self-signed certificate.
package s3test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/signer"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/tlscert"
	s3be "github.com/dualkey/dualkey/internal/vault/backend/s3"
)

// Version is the versitygw release installed when none is found.
const Version = "v1.8.0"

// InstallCmd is how scripts/setup.sh and the harness install versitygw.
const InstallCmd = "go install github.com/versity/versitygw/cmd/versitygw@" + Version

// Region is the region the server answers for.
const Region = "us-east-1"

// Server is a running versitygw.
type Server struct {
	// Endpoint is 127.0.0.1:port (plain HTTP on loopback).
	Endpoint string
	// AccessKey and SecretKey are the gateway's root account: the
	// strongest credential the server knows.
	AccessKey, SecretKey string
	// Dir holds the server's objects, metadata and log.
	Dir string
	// Secure is set for the server of StartTLS, whose self-signed
	// certificate (for 127.0.0.1) is the PEM file CACert.
	Secure bool
	CACert string

	cmd *exec.Cmd
	log string
}

type once struct {
	sync.Once
	s   *Server
	err error
}

var plainServer, tlsServer once

// Start returns the test binary's server (plain HTTP), starting it on first
// use. It fails t if versitygw cannot be found, installed or started.
func Start(t testing.TB) *Server {
	t.Helper()
	plainServer.Do(func() { plainServer.s, plainServer.err = start(false) })
	if plainServer.err != nil {
		t.Fatalf("s3test: %v", plainServer.err)
	}
	return plainServer.s
}

// StartTLS is Start for a second server speaking HTTPS with a self-signed
// certificate, for tests of a client's CA option.
func StartTLS(t testing.TB) *Server {
	t.Helper()
	tlsServer.Do(func() { tlsServer.s, tlsServer.err = start(true) })
	if tlsServer.err != nil {
		t.Fatalf("s3test: %v", tlsServer.err)
	}
	return tlsServer.s
}

// Bin returns the path of the versitygw binary: DUALKEY_VERSITYGW if set,
// else versitygw on PATH or in the Go bin folder, installed there with
// InstallCmd if missing.
func Bin() (string, error) {
	if p := os.Getenv("DUALKEY_VERSITYGW"); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("DUALKEY_VERSITYGW names %s: %w (unset it to use scripts/setup.sh's)", p, err)
		}
		return p, nil
	}
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, nil
	}
	gobin, err := goBin()
	if err != nil {
		return "", err
	}
	p := filepath.Join(gobin, "versitygw")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	out, err := exec.Command("go", "install", "github.com/versity/versitygw/cmd/versitygw@"+Version).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("versitygw is missing and `%s` failed (run scripts/setup.sh): %v\n%s", InstallCmd, err, out)
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("`%s` did not produce %s: %w", InstallCmd, p, err)
	}
	return p, nil
}

func goBin() (string, error) {
	out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output()
	if err != nil {
		return "", fmt.Errorf("versitygw not found and `go env` failed: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > 0 && strings.TrimSpace(lines[0]) != "" {
		return strings.TrimSpace(lines[0]), nil
	}
	if len(lines) < 2 {
		return "", errors.New("versitygw not found and GOPATH is unknown")
	}
	return filepath.Join(strings.Split(strings.TrimSpace(lines[1]), string(os.PathListSeparator))[0], "bin"), nil
}

const dirPrefix = "dualkey-s3test-"

// sweep removes folders of earlier test processes that no longer run.
func sweep() {
	entries, _ := os.ReadDir(os.TempDir())
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), dirPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == nil || !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			continue // still running, or not ours to judge
		}
		os.RemoveAll(filepath.Join(os.TempDir(), e.Name()))
	}
}

func start(secure bool) (*Server, error) {
	bin, err := Bin()
	if err != nil {
		return nil, err
	}
	sweep()
	dir, err := os.MkdirTemp("", dirPrefix+strconv.Itoa(os.Getpid())+"-")
	if err != nil {
		return nil, err
	}
	for _, d := range []string{"data", "versions", "meta"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	s := &Server{AccessKey: "dualkeyroot", SecretKey: randHex(16), Dir: dir, Secure: secure, log: filepath.Join(dir, "versitygw.log")}
	if secure {
		certPEM, keyPEM, err := tlscert.SelfSigned("s3test", nil, time.Now())
		if err != nil {
			return nil, err
		}
		s.CACert = filepath.Join(dir, "cert.pem")
		if err := os.WriteFile(s.CACert, certPEM, 0o644); err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600); err != nil {
			return nil, err
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	if err := pgtest.Own(dir); err != nil {
		return nil, fmt.Errorf("hand %s to the server's user: %w", dir, err)
	}
	// The server's user may not be able to reach the Go bin folder (often
	// under /root): it runs a hard link (or, across file systems, an 80 MB
	// copy) inside its own folder. Made after Own, which would otherwise
	// hand the shared inode, and so the installed binary, to that user.
	exe := filepath.Join(dir, "versitygw")
	if err := os.Link(bin, exe); err != nil {
		if err := copyFile(bin, exe); err != nil {
			return nil, fmt.Errorf("copy %s: %w", bin, err)
		}
	}
	for attempt := 0; ; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		s.Endpoint = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		err = s.launch(exe)
		if err == nil {
			return s, nil
		}
		if attempt == 2 {
			return nil, err
		}
	}
}

// launch starts the server and waits until it answers.
func (s *Server) launch(exe string) error {
	logf, err := os.OpenFile(s.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{"--region", Region, "--port", s.Endpoint}
	if s.Secure {
		args = append(args, "--cert", s.CACert, "--key", filepath.Join(s.Dir, "key.pem"))
	}
	args = append(args, "posix",
		"--versioning-dir", filepath.Join(s.Dir, "versions"),
		"--sidecar", filepath.Join(s.Dir, "meta"),
		filepath.Join(s.Dir, "data"))
	cmd := exec.Command(exe, args...)
	cmd.Dir = s.Dir
	cmd.Stdout, cmd.Stderr = logf, logf
	// The root keys go in the environment, not on a shared machine's
	// command lines.
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY_ID="+s.AccessKey, "ROOT_SECRET_ACCESS_KEY="+s.SecretKey)
	pgtest.RunAsOSUser(cmd)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	// The parent-death signal fires when the thread that started the child
	// exits; this thread is locked and never exits, so the server lives as
	// long as the test process.
	started := make(chan error, 1)
	exited := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		exited <- cmd.Wait()
		select {} // keep the thread
	}()
	if err := <-started; err != nil {
		return fmt.Errorf("start versitygw: %w", err)
	}
	s.cmd = cmd
	cl, err := s.Client()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("versitygw exited (%v) before answering; log %s:\n%s", err, s.log, tail(s.log))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := cl.ListBuckets(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return fmt.Errorf("versitygw did not answer on %s within 30 s: %v; log %s:\n%s", s.Endpoint, err, s.log, tail(s.log))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Client returns a client holding the server's root credentials.
func (s *Server) Client() (*minio.Client, error) {
	tr, err := s.transport()
	if err != nil {
		return nil, err
	}
	return minio.New(s.Endpoint, &minio.Options{
		Creds:        credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""),
		Region:       Region,
		BucketLookup: minio.BucketLookupPath,
		Secure:       s.Secure,
		Transport:    tr,
	})
}

// transport trusts the server's own certificate.
func (s *Server) transport() (*http.Transport, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if s.Secure {
		b, err := os.ReadFile(s.CACert)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("s3test: no certificate in %s", s.CACert)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return tr, nil
}

// BucketOptions choose how NewBucket creates a bucket.
type BucketOptions struct {
	// NoObjectLock creates a plain bucket: no versioning, no Object Lock.
	NoObjectLock bool
}

// NewBucket creates a bucket with a fresh name (versioned, with Object
// Lock unless opts say otherwise) and returns a vault location config for
// it holding the root credentials.
func (s *Server) NewBucket(t testing.TB, opts BucketOptions) s3be.Config {
	t.Helper()
	cl, err := s.Client()
	if err != nil {
		t.Fatal(err)
	}
	name := "t-" + randHex(8)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.MakeBucket(ctx, name, minio.MakeBucketOptions{Region: Region, ObjectLocking: !opts.NoObjectLock}); err != nil {
		t.Fatalf("s3test: make bucket: %v", err)
	}
	return s3be.Config{
		Endpoint:  s.Endpoint,
		Secure:    s.Secure,
		Bucket:    name,
		Prefix:    "vault",
		AccessKey: s.AccessKey,
		SecretKey: s.SecretKey,
		Region:    Region,
	}
}

// Location returns the s3: location of cfg, as given to --repo.
func Location(cfg s3be.Config) string {
	scheme := "http"
	if cfg.Secure {
		scheme = "https"
	}
	loc := "s3:" + scheme + "://" + cfg.Endpoint + "/" + cfg.Bucket
	if cfg.Prefix != "" {
		loc += "/" + cfg.Prefix
	}
	return loc
}

// Env returns the environment variables that give cfg's credentials.
func Env(cfg s3be.Config) []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + cfg.AccessKey,
		"AWS_SECRET_ACCESS_KEY=" + cfg.SecretKey,
		"AWS_DEFAULT_REGION=" + Region,
	}
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(bytes.TrimSpace(b))
}

// Retention returns the Object Lock mode and retain-until date of one
// version, asked with GET ?retention under the root credentials. (A HEAD
// does not do: versitygw 1.8 omits the lock headers for versions that are
// no longer the latest, and names the GET's XML element
// ObjectLockRetention, which minio-go does not parse. Both are accepted
// here.) A version without retention gives "" and the zero time.
func (s *Server) Retention(ctx context.Context, bucket, key, versionID string) (mode string, until time.Time, err error) {
	scheme := "http"
	if s.Secure {
		scheme = "https"
	}
	u := url.URL{Scheme: scheme, Host: s.Endpoint, Path: "/" + bucket + "/" + key}
	q := url.Values{"retention": {""}}
	if versionID != "" {
		q.Set("versionId", versionID)
	}
	u.RawQuery = strings.Replace(q.Encode(), "retention=", "retention", 1)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return "", time.Time{}, err
	}
	req.Header.Set("X-Amz-Content-Sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
	req = signer.SignV4(*req, s.AccessKey, s.SecretKey, "", Region)
	tr, err := s.transport()
	if err != nil {
		return "", time.Time{}, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return "", time.Time{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", time.Time{}, err
	}
	if bytes.Contains(body, []byte("<Code>NoSuchObjectLockConfiguration<")) {
		return "", time.Time{}, nil
	}
	if resp.StatusCode != http.StatusOK {
		return "", time.Time{}, fmt.Errorf("s3test: GET retention of %s %s: %s: %s", key, versionID, resp.Status, body)
	}
	var r struct {
		Mode            string
		RetainUntilDate time.Time
	}
	if err := xml.Unmarshal(body, &r); err != nil {
		return "", time.Time{}, fmt.Errorf("s3test: retention of %s: %w: %s", key, err, body)
	}
	return r.Mode, r.RetainUntilDate, nil
}
