package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/backend/local"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

// ops is the method set shared by guard.Session and Client; the client-side
// repository package will define its own interface like it.
type ops interface {
	Capability(ctx context.Context) (guard.Capability, error)
	Config(ctx context.Context) (format.Config, error)
	Save(ctx context.Context, h backend.Handle, data []byte) error
	Load(ctx context.Context, h backend.Handle, offset, length int64) ([]byte, error)
	Stat(ctx context.Context, h backend.Handle) (backend.Info, error)
	List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error
	Remove(ctx context.Context, h backend.Handle) error
	Commit(ctx context.Context, req format.CommitRequest) (format.LockRecord, format.ID, error)
	ExtendLock(ctx context.Context, snapshot format.ID, until time.Time) (format.LockRecord, error)
	Locks(ctx context.Context) ([]format.LockRecord, error)
	SnapshotLock(ctx context.Context, id format.ID) (time.Time, []format.LockRecord, error)
}

var (
	_ ops = (*guard.Session)(nil)
	_ ops = (*Client)(nil)
)

var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time  { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Set(t time.Time) { c.mu.Lock(); c.now = t; c.mu.Unlock() }

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// env is a running server over a local backend, initialised with a config
// (MinRetention 24h) and one key, and clients for each capability.
type env struct {
	be                backend.Backend
	store             *guard.Store
	tokens            *TokenStore
	srv               *Server
	clock             *fakeClock
	url, state        string
	log               *syncBuffer
	secret            map[guard.Capability]string
	admin, app, rd    *Client
	cfgBytes, keyData []byte
}

func newEnv(t *testing.T, opts Options) *env {
	t.Helper()
	cfg, _ := json.Marshal(format.Config{Version: 1, ID: strings.Repeat("cd", 32), Created: t0, MinRetention: format.Duration(24 * time.Hour)})
	return newEnvConfig(t, opts, cfg)
}

// newEnvConfig is newEnv with the given config object.
func newEnvConfig(t *testing.T, opts Options, cfg []byte) *env {
	t.Helper()
	ctx := context.Background()
	be, err := local.Create(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{be: be, clock: &fakeClock{now: t0}, state: t.TempDir(), log: &syncBuffer{}}
	e.store = guard.New(be, guard.Options{Now: e.clock.Now})
	if e.tokens, err = OpenTokenStore(e.state); err != nil {
		t.Fatal(err)
	}
	opts.StateDir, opts.Addr = e.state, "127.0.0.1:0"
	opts.Logger = slog.New(slog.NewTextHandler(e.log, nil))
	if e.srv, err = New(e.store, e.tokens, opts); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- e.srv.Serve(sctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	e.url = "https://" + ln.Addr().String()
	e.secret = make(map[guard.Capability]string)
	for _, c := range []guard.Capability{guard.Read, guard.Append, guard.Admin} {
		if e.secret[c], err = e.tokens.CreateToken("test-"+string(c), c); err != nil {
			t.Fatal(err)
		}
	}
	e.admin, e.app, e.rd = e.client(t, e.secret[guard.Admin]), e.client(t, e.secret[guard.Append]), e.client(t, e.secret[guard.Read])

	e.cfgBytes = cfg
	if err := e.admin.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, e.cfgBytes); err != nil {
		t.Fatal(err)
	}
	e.keyData = []byte("wrapped key")
	if err := e.admin.Save(ctx, hd(backend.Key, e.keyData), e.keyData); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) client(t *testing.T, token string) *Client {
	t.Helper()
	c, err := NewClient(e.url, ClientOptions{Token: token, Fingerprint: e.srv.Fingerprint()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// raw sends a request with the given token over a pinned connection and
// returns status and body.
func (e *env) raw(t *testing.T, token, method, path string, body io.Reader, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, e.url+path, body)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	pool := x509.NewCertPool()
	pool.AddCert(e.srv.Certificate())
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func hd(t backend.Type, data []byte) backend.Handle {
	return backend.Handle{Type: t, Name: format.Hash(data).String()}
}

// seed uploads two packs, an index covering them and commits a snapshot.
func (e *env) seed(t *testing.T) (p1, p2, idx, snap []byte, rec format.LockRecord) {
	t.Helper()
	ctx := context.Background()
	p1, p2, snap = []byte("pack 1 bytes"), []byte("pack 2 bytes"), []byte("snapshot doc")
	for _, p := range [][]byte{p1, p2} {
		if err := e.app.Save(ctx, hd(backend.Pack, p), p); err != nil {
			t.Fatal(err)
		}
	}
	idx = append(format.AppendIndexHeader(nil, []format.ID{format.Hash(p1), format.Hash(p2)}), "body"...)
	if err := e.app.Save(ctx, hd(backend.Index, idx), idx); err != nil {
		t.Fatal(err)
	}
	rec, id, err := e.app.Commit(ctx, format.CommitRequest{Snapshot: snap, Packs: []format.ID{format.Hash(p1), format.Hash(p2)}})
	if err != nil {
		t.Fatal(err)
	}
	if id != format.Hash(snap) {
		t.Fatalf("commit id %s, want hash of snapshot", id)
	}
	return p1, p2, idx, snap, rec
}

func listAll(t *testing.T, be backend.Backend) string {
	t.Helper()
	var out []string
	for _, ty := range backend.Types {
		if err := be.List(context.Background(), ty, func(fi backend.Info) error {
			out = append(out, fmt.Sprintf("%s:%d", fi.Handle, fi.Size))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	return strings.Join(out, "\n")
}

func TestAuth(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	for c, s := range e.secret {
		got, err := e.client(t, s).Capability(ctx)
		if err != nil || got != c {
			t.Errorf("whoami with %s token = %q, %v", c, got, err)
		}
	}
	if code, _ := e.raw(t, "", "GET", "/v1/whoami", nil); code != http.StatusUnauthorized {
		t.Errorf("no token: status %d, want 401", code)
	}
	if code, _ := e.raw(t, "", "GET", "/v1/objects/data/", nil, "Authorization", "Basic Zm9vOmJhcg=="); code != http.StatusUnauthorized {
		t.Errorf("basic auth: status %d, want 401", code)
	}
	wrong := e.client(t, "dkv_admin_"+strings.Repeat("a", 52))
	if _, err := wrong.Capability(ctx); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("wrong token: %v, want ErrUnauthorized", err)
	}
	// Revocation takes effect on the running server, also when done by
	// another TokenStore on the same folder (a CLI).
	other, err := OpenTokenStore(e.state)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Revoke("test-append"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.app.Capability(ctx); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("revoked token: %v, want ErrUnauthorized", err)
	}
	p := []byte("x")
	if err := e.app.Save(ctx, hd(backend.Pack, p), p); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("revoked token save: %v, want ErrUnauthorized", err)
	}
	for _, s := range e.secret {
		if strings.Contains(e.log.String(), s) {
			t.Fatal("a token secret appears in the server log")
		}
	}
}

func TestRulesOverHTTP(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	p1, _, idx, snap, rec := e.seed(t)
	b, _ := json.Marshal(rec)
	lockH := hd(backend.Lock, b)
	other := []byte("different")

	tests := []struct {
		name string
		run  func() error
		want error
	}{
		{"append cannot delete pack", func() error { return e.app.Remove(ctx, hd(backend.Pack, p1)) }, guard.ErrForbidden},
		{"append cannot delete index", func() error { return e.app.Remove(ctx, hd(backend.Index, idx)) }, guard.ErrForbidden},
		{"append cannot delete snapshot", func() error { return e.app.Remove(ctx, hd(backend.Snapshot, snap)) }, guard.ErrForbidden},
		{"append cannot delete lock", func() error { return e.app.Remove(ctx, lockH) }, guard.ErrForbidden},
		{"append cannot delete key", func() error { return e.app.Remove(ctx, hd(backend.Key, e.keyData)) }, guard.ErrForbidden},
		{"append cannot delete config", func() error {
			return e.app.Remove(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName})
		}, guard.ErrForbidden},
		{"append cannot overwrite pack", func() error { return e.app.Save(ctx, hd(backend.Pack, p1), other) }, guard.ErrInvalid},
		{"append retries pack", func() error { return e.app.Save(ctx, hd(backend.Pack, p1), p1) }, nil},
		{"append cannot write lock", func() error { return e.app.Save(ctx, hd(backend.Lock, other), other) }, guard.ErrForbidden},
		{"append cannot write snapshot", func() error { return e.app.Save(ctx, hd(backend.Snapshot, other), other) }, guard.ErrForbidden},
		{"admin cannot replace config", func() error {
			b, _ := json.Marshal(format.Config{Version: 1, ID: strings.Repeat("ef", 32), Created: t0})
			return e.admin.Save(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, b)
		}, backend.ErrExists},
		{"read cannot write pack", func() error { return e.rd.Save(ctx, hd(backend.Pack, other), other) }, guard.ErrForbidden},
		{"read cannot commit", func() error { _, _, err := e.rd.Commit(ctx, format.CommitRequest{Snapshot: other}); return err }, guard.ErrForbidden},
		{"read loads pack", func() error { _, err := e.rd.Load(ctx, hd(backend.Pack, p1), 0, 0); return err }, nil},
		{"admin cannot delete locked snapshot", func() error { return e.admin.Remove(ctx, hd(backend.Snapshot, snap)) }, guard.ErrLocked},
		{"admin cannot delete locked pack", func() error { return e.admin.Remove(ctx, hd(backend.Pack, p1)) }, guard.ErrLocked},
		{"admin cannot delete covering index", func() error { return e.admin.Remove(ctx, hd(backend.Index, idx)) }, guard.ErrLocked},
		{"admin cannot delete live lock", func() error { return e.admin.Remove(ctx, lockH) }, guard.ErrLocked},
		{"admin cannot delete last key", func() error { return e.admin.Remove(ctx, hd(backend.Key, e.keyData)) }, guard.ErrForbidden},
		{"shortening refused", func() error { _, err := e.app.ExtendLock(ctx, rec.Snapshot, rec.Until.Add(-time.Hour)); return err }, guard.ErrLocked},
		{"missing object", func() error { _, err := e.rd.Stat(ctx, hd(backend.Pack, other)); return err }, backend.ErrNotExist},
		{"commit with missing pack", func() error {
			_, _, err := e.app.Commit(ctx, format.CommitRequest{Snapshot: other, Packs: []format.ID{format.Hash(other)}})
			return err
		}, backend.ErrNotExist},
	}
	before := listAll(t, e.be)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.run()
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
	if after := listAll(t, e.be); after != before {
		t.Errorf("refused requests changed the vault:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	// Once the lock has passed, on the server's clock, admin may remove.
	e.clock.Set(rec.Until)
	for _, h := range []backend.Handle{hd(backend.Snapshot, snap), hd(backend.Index, idx), hd(backend.Pack, p1), lockH} {
		if err := e.admin.Remove(ctx, h); err != nil {
			t.Errorf("remove %v after expiry: %v", h, err)
		}
	}
	// Append still cannot, even then.
	if err := e.app.Remove(ctx, hd(backend.Pack, []byte("pack 2 bytes"))); !errors.Is(err, guard.ErrForbidden) {
		t.Errorf("append remove after expiry: %v", err)
	}
}

func TestCommitUsesServerClock(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	_, _, _, snap, rec := e.seed(t)
	if !rec.Time.Equal(t0) || !rec.Until.Equal(t0.Add(24*time.Hour)) {
		t.Errorf("lock %v..%v, want the server clock %v + 24h", rec.Time, rec.Until, t0)
	}
	// A lying client can only try to slip times into the JSON; unknown fields
	// are refused and nothing is written.
	before := listAll(t, e.be)
	for _, body := range []string{
		`{"snapshot":"bGll","time":"1999-01-01T00:00:00Z"}`,
		`{"snapshot":"bGll","until":"1999-01-01T00:00:00Z"}`,
		`{"snapshot":"bGll","lock_for":"-720h"}`,
	} {
		if code, msg := e.raw(t, e.secret[guard.Append], "POST", "/v1/commit", strings.NewReader(body)); code != http.StatusBadRequest {
			t.Errorf("commit %s: %d %s, want 400", body, code, msg)
		}
	}
	if after := listAll(t, e.be); after != before {
		t.Errorf("refused commits changed the vault")
	}
	until, recs, err := e.rd.SnapshotLock(ctx, format.Hash(snap))
	if err != nil || !until.Equal(rec.Until) || len(recs) != 1 {
		t.Errorf("SnapshotLock = %v, %d records, %v", until, len(recs), err)
	}
	// Extending works and is recorded on the server's clock too.
	e.clock.Set(t0.Add(time.Hour))
	r2, err := e.app.ExtendLock(ctx, rec.Snapshot, rec.Until.Add(48*time.Hour))
	if err != nil || !r2.Time.Equal(t0.Add(time.Hour)) || r2.Reason != format.ReasonExtend {
		t.Errorf("extend = %+v, %v", r2, err)
	}
	rs, err := e.rd.Locks(ctx)
	if err != nil || len(rs) != 2 {
		t.Errorf("Locks = %d, %v; want 2", len(rs), err)
	}
}

func TestLoadRanges(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	data := []byte("0123456789abcdef")
	h := hd(backend.Pack, data)
	if err := e.app.Save(ctx, h, data); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		off, n int64
		want   string
		err    error
	}{
		{0, 0, string(data), nil},
		{0, 4, "0123", nil},
		{10, 0, "abcdef", nil},
		{15, 1, "f", nil},
		{4, 3, "456", nil},
		{16, 0, "", guard.ErrInvalid},
		{10, 10, "", guard.ErrInvalid}, // past the end
		{-1, 0, "", guard.ErrInvalid},
	}
	for _, tt := range tests {
		got, err := e.rd.Load(ctx, h, tt.off, tt.n)
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("Load(%d, %d) = %q, %v; want %v", tt.off, tt.n, got, err, tt.err)
			}
			continue
		}
		if err != nil || string(got) != tt.want {
			t.Errorf("Load(%d, %d) = %q, %v; want %q", tt.off, tt.n, got, err, tt.want)
		}
	}
	fi, err := e.rd.Stat(ctx, h)
	if err != nil || fi.Size != int64(len(data)) {
		t.Errorf("Stat = %+v, %v", fi, err)
	}
	for _, r := range []string{"bytes=5-2", "bytes=-3", "bytes=a-b", "items=0-1", "bytes=0-1,3-4", "bytes=+1-2"} {
		if code, _ := e.raw(t, e.secret[guard.Read], "GET", "/v1/objects/data/"+h.Name, nil, "Range", r); code != http.StatusBadRequest {
			t.Errorf("Range %q: status %d, want 400", r, code)
		}
	}
	if code, _ := e.raw(t, e.secret[guard.Read], "GET", "/v1/objects/data/"+h.Name, nil, "Range", "bytes=99-"); code != http.StatusRequestedRangeNotSatisfiable {
		t.Errorf("Range past end: status %d, want 416", code)
	}
	var n int
	if err := e.rd.List(ctx, backend.Pack, func(fi backend.Info) error { n++; return nil }); err != nil || n != 1 {
		t.Errorf("List = %d, %v", n, err)
	}
	if err := e.rd.List(ctx, backend.Mark, func(backend.Info) error { n++; return nil }); err != nil || n != 1 {
		t.Errorf("List of empty type = %d, %v", n, err)
	}
	cfg, err := e.rd.Config(ctx)
	if err != nil || cfg.MinRetention != format.Duration(24*time.Hour) {
		t.Errorf("Config = %+v, %v", cfg, err)
	}
}

func TestFingerprintPinning(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	wrongFP := "sha256:" + strings.Repeat("00", 32)
	c, err := NewClient(e.url, ClientOptions{Token: e.secret[guard.Read], Fingerprint: wrongFP})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = c.Capability(ctx)
	if !errors.Is(err, ErrFingerprint) || !strings.Contains(err.Error(), e.srv.Fingerprint()) {
		t.Errorf("wrong fingerprint: %v; want ErrFingerprint naming the presented certificate", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("a fingerprint mismatch was retried")
	}
	// Without a pin, normal CA verification applies: unknown authority fails,
	// the certificate as a root passes.
	c, _ = NewClient(e.url, ClientOptions{Token: e.secret[guard.Read], Retries: -1})
	var ua x509.UnknownAuthorityError
	if _, err := c.Capability(ctx); !errors.As(err, &ua) {
		t.Errorf("unpinned, system roots: %v; want unknown authority", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(e.srv.Certificate())
	c, _ = NewClient(e.url, ClientOptions{Token: e.secret[guard.Read], RootCAs: pool})
	if _, err := c.Capability(ctx); err != nil {
		t.Errorf("with the certificate as root: %v", err)
	}
	if _, err := NewClient(e.url, ClientOptions{Fingerprint: "md5:abc"}); err == nil {
		t.Error("bad fingerprint syntax accepted")
	}
	if _, err := NewClient("http://"+strings.TrimPrefix(e.url, "https://"), ClientOptions{}); err == nil {
		t.Error("plain http accepted")
	}
}

func TestMalformedRequests(t *testing.T) {
	e := newEnv(t, Options{MaxObjectSize: 1 << 10, MaxJSONSize: 4 << 10, MaxCommitPacks: 8})
	p1, _, _, _, rec := e.seed(t)
	admin, app := e.secret[guard.Admin], e.secret[guard.Append]
	hash := format.Hash(p1).String()
	ids := func(n int) string {
		var s []string
		for i := range n {
			s = append(s, `"`+format.Hash([]byte{byte(i), byte(i >> 8)}).String()+`"`)
		}
		return "[" + strings.Join(s, ",") + "]"
	}
	tests := []struct {
		name, method, path, body string
		want                     int
	}{
		{"dot dot", "GET", "/v1/objects/data/../config", "", 400},
		{"dot dot delete", "DELETE", "/v1/objects/../../etc/passwd", "", 400},
		{"encoded dots", "GET", "/v1/objects/data/%2e%2e%2fconfig", "", 400},
		{"encoded slash", "DELETE", "/v1/objects/data%2f" + hash, "", 400},
		{"invalid type", "GET", "/v1/objects/tmp/" + hash, "", 400},
		{"uppercase type", "GET", "/v1/objects/DATA/" + hash, "", 400},
		{"uppercase name", "DELETE", "/v1/objects/data/" + strings.ToUpper(hash), "", 400},
		{"short name", "PUT", "/v1/objects/data/abc", "x", 400},
		{"extra segment", "GET", "/v1/objects/data/" + hash + "/x", "", 400},
		{"query", "DELETE", "/v1/objects/data/" + hash + "?force=1", "", 400},
		{"unknown version", "GET", "/v2/whoami", "", 400},
		{"double slash", "GET", "/v1//objects/data/" + hash, "", 400},
		{"config name under data", "PUT", "/v1/objects/data/config", "x", 400},
		{"wrong method", "GET", "/v1/commit", "", 405},
		{"wrong method on object", "POST", "/v1/objects/data/" + hash, "x", 405},
		{"bad json", "POST", "/v1/commit", "{", 400},
		{"trailing json", "POST", "/v1/commit", `{"snapshot":"eA=="} {}`, 400},
		{"bad pack id", "POST", "/v1/commit", `{"snapshot":"eA==","packs":["XYZ"]}`, 400},
		{"empty snapshot", "POST", "/v1/commit", `{"packs":[]}`, 400},
		{"too many packs", "POST", "/v1/commit", `{"snapshot":"eA==","packs":` + ids(9) + `}`, 400},
		{"huge pack list", "POST", "/v1/commit", `{"snapshot":"eA==","packs":` + ids(100) + `}`, 413},
		{"oversized object", "PUT", "/v1/objects/data/" + format.Hash(make([]byte, 2048)).String(), string(make([]byte, 2048)), 413},
		{"index with bad header", "PUT", "/v1/objects/index/" + format.Hash([]byte("junk")).String(), "junk", 400},
		{"extend bad json", "POST", "/v1/locks/" + rec.Snapshot.String() + "/extend", `{"until":1}`, 400},
		{"extend no until", "POST", "/v1/locks/" + rec.Snapshot.String() + "/extend", `{}`, 400},
		{"extend bad id", "POST", "/v1/locks/xyz/extend", `{"until":"2040-01-01T00:00:00Z"}`, 400},
		{"extend huge body", "POST", "/v1/locks/" + rec.Snapshot.String() + "/extend", strings.Repeat(" ", 8<<10), 413},
	}
	before := listAll(t, e.be)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			tok := app
			if tt.method == "DELETE" {
				tok = admin
			}
			code, msg := e.raw(t, tok, tt.method, tt.path, body)
			if code != tt.want {
				t.Errorf("status %d (%s), want %d", code, strings.TrimSpace(msg), tt.want)
			}
			var er errorResponse
			if err := json.Unmarshal([]byte(msg), &er); err != nil || er.Error == "" {
				t.Errorf("body %q is not a JSON error", msg)
			}
		})
	}
	// A body without Content-Length (chunked) is cut at the limit too.
	pr, pw := io.Pipe()
	go func() { pw.Write(make([]byte, 4096)); pw.Close() }()
	if code, _ := e.raw(t, app, "PUT", "/v1/objects/data/"+format.Hash(make([]byte, 4096)).String(), pr); code != 413 {
		t.Errorf("chunked oversized body: status %d, want 413", code)
	}
	if after := listAll(t, e.be); after != before {
		t.Errorf("malformed requests changed the vault:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if strings.Contains(e.log.String(), "status=500") {
		t.Errorf("a malformed request caused a 500:\n%s", e.log.String())
	}
}

// flakyTransport fails the first n round trips with a connection error.
type flakyTransport struct {
	mu    sync.Mutex
	n     int
	err   error
	calls int
	next  http.RoundTripper
}

func (f *flakyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	f.calls++
	fail := f.calls <= f.n
	f.mu.Unlock()
	if fail {
		if r.Body != nil {
			r.Body.Close()
		}
		return nil, f.err
	}
	return f.next.RoundTrip(r)
}

func TestClientRetries(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	pool := x509.NewCertPool()
	pool.AddCert(e.srv.Certificate())
	next := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	defer next.CloseIdleConnections()
	connErr := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}

	ft := &flakyTransport{n: 2, err: connErr, next: next}
	c, _ := NewClient(e.url, ClientOptions{Token: e.secret[guard.Append], Transport: ft})
	p := []byte("retried pack")
	if err := c.Save(ctx, hd(backend.Pack, p), p); err != nil || ft.calls != 3 {
		t.Errorf("save with 2 failures: %v after %d calls, want success after 3", err, ft.calls)
	}
	// DELETE is not retried.
	ft = &flakyTransport{n: 1, err: connErr, next: next}
	c, _ = NewClient(e.url, ClientOptions{Token: e.secret[guard.Admin], Transport: ft})
	if err := c.Remove(ctx, hd(backend.Pack, p)); err == nil || ft.calls != 1 {
		t.Errorf("remove: %v after %d calls, want failure after 1", err, ft.calls)
	}
	// Bounded count.
	ft = &flakyTransport{n: 100, err: connErr, next: next}
	c, _ = NewClient(e.url, ClientOptions{Token: e.secret[guard.Read], Transport: ft, Retries: 2})
	if _, err := c.Capability(ctx); err == nil || ft.calls != 3 {
		t.Errorf("always failing: %v after %d calls, want failure after 3", err, ft.calls)
	}
	// Certificate errors are not retried.
	ft = &flakyTransport{n: 100, err: fmt.Errorf("tls: %w", ErrFingerprint), next: next}
	c, _ = NewClient(e.url, ClientOptions{Token: e.secret[guard.Read], Transport: ft})
	if _, err := c.Capability(ctx); !errors.Is(err, ErrFingerprint) || ft.calls != 1 {
		t.Errorf("fingerprint error: %v after %d calls", err, ft.calls)
	}
	// A cancelled context stops the backoff.
	ft = &flakyTransport{n: 100, err: connErr, next: next}
	c, _ = NewClient(e.url, ClientOptions{Token: e.secret[guard.Read], Transport: ft, Retries: 50})
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := c.Capability(cctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("cancelled: %v", err)
	}
}

func TestParallelUploads(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(i)}, 100_000)
			errs <- e.app.Save(ctx, hd(backend.Pack, p), p)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestTokenStore(t *testing.T) {
	dir := t.TempDir()
	ts, err := OpenTokenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	s1, err := ts.CreateToken("backup agent", guard.Append)
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := ts.CreateToken("ops", guard.Admin)
	if !strings.HasPrefix(s1, "dkv_append_") || len(s1) != len("dkv_append_")+52 {
		t.Errorf("secret %q has the wrong shape", s1)
	}
	if _, err := ts.CreateToken("x", "root"); err == nil {
		t.Error("created a token with an unknown capability")
	}
	file := filepath.Join(dir, TokensFile)
	data, _ := os.ReadFile(file)
	if strings.Contains(string(data), s1) || strings.Contains(string(data), s1[11:]) {
		t.Error("the token file holds a secret")
	}
	if fi, _ := os.Stat(file); fi.Mode().Perm() != 0o600 {
		t.Errorf("token file mode %v, want 0600", fi.Mode().Perm())
	}
	tok, err := ts.Authenticate(s1)
	if err != nil || tok.Cap != guard.Append || tok.Name != "backup agent" {
		t.Fatalf("Authenticate = %+v, %v", tok, err)
	}
	if _, err := ts.Authenticate(s1 + "x"); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("altered secret: %v", err)
	}
	if err := ts.Revoke(tok.ID); err != nil {
		t.Fatal(err)
	}
	if err := ts.Revoke(tok.ID); err != nil {
		t.Errorf("second revoke: %v", err)
	}
	if err := ts.Revoke("nobody"); err == nil {
		t.Error("revoked a missing token")
	}

	// A crash mid-append leaves a torn line: it is ignored, and the next
	// append starts on a fresh line.
	f, _ := os.OpenFile(file, os.O_WRONLY|os.O_APPEND, 0)
	f.WriteString(`{"id":"torn","na`)
	f.Close()
	ts2, err := OpenTokenStore(dir)
	if err != nil {
		t.Fatalf("reopen with torn line: %v", err)
	}
	if _, err := ts2.Authenticate(s1); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("revocation lost on reopen: %v", err)
	}
	if tok, err := ts2.Authenticate(s2); err != nil || tok.Cap != guard.Admin {
		t.Errorf("admin token after reopen: %+v, %v", tok, err)
	}
	s3, err := ts2.CreateToken("later", guard.Read)
	if err != nil {
		t.Fatal(err)
	}
	ts3, err := OpenTokenStore(dir)
	if err != nil {
		t.Fatalf("reopen after append past torn line: %v", err)
	}
	if _, err := ts3.Authenticate(s3); err != nil {
		t.Errorf("token written after torn line: %v", err)
	}
	// A corrupt line in the middle is an error, never skipped.
	os.WriteFile(file, []byte("garbage\n"+string(data)), 0o600)
	if _, err := OpenTokenStore(dir); err == nil {
		t.Error("a corrupt middle line was accepted")
	}
}

func TestCertificate(t *testing.T) {
	dir := t.TempDir()
	c1, err := loadOrCreateCert(dir, "", "", "192.0.2.7")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{CertFile, KeyFile} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v; want 0600", name, err, fi.Mode().Perm())
		}
	}
	leaf, _ := x509.ParseCertificate(c1.Certificate[0])
	for _, host := range []string{"127.0.0.1", "::1", "localhost", "192.0.2.7"} {
		if err := leaf.VerifyHostname(host); err != nil {
			t.Errorf("certificate not valid for %s: %v", host, err)
		}
	}
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("key algorithm %v, want ECDSA", leaf.PublicKeyAlgorithm)
	}
	c2, err := loadOrCreateCert(dir, "", "", "other")
	if err != nil {
		t.Fatal(err)
	}
	if FingerprintDER(c1.Certificate[0]) != FingerprintDER(c2.Certificate[0]) {
		t.Error("second start generated a new certificate")
	}
	if fp := FingerprintDER(c1.Certificate[0]); !strings.HasPrefix(fp, "sha256:") || len(fp) != 7+64 {
		t.Errorf("fingerprint %q", fp)
	}
	os.Remove(filepath.Join(dir, CertFile))
	if _, err := loadOrCreateCert(dir, "", "", ""); err == nil {
		t.Error("a key without certificate was silently replaced")
	}
}
