package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

var (
	// ErrFingerprint is returned (wrapped) when the server's certificate
	// does not match the pinned fingerprint. It is never retried.
	ErrFingerprint = errors.New("server: certificate fingerprint mismatch")
	// ErrTooLarge is returned (wrapped) when the server refused a body as
	// too large (413).
	ErrTooLarge = errors.New("server: request too large")
)

// ClientOptions configure a [Client].
type ClientOptions struct {
	// Token is the bearer secret.
	Token string
	// Fingerprint, if set ("sha256:<64 hex digits>", see [Fingerprint]),
	// pins the server's leaf certificate: it is accepted if and only if its
	// SHA-256 matches, with no CA or host name check. Empty means ordinary
	// verification against RootCAs.
	Fingerprint string
	// RootCAs is used when no fingerprint is set; nil means the system pool.
	RootCAs *x509.CertPool
	// Retries is how many times an idempotent request is retried after a
	// connection error or a 502/503/504. Zero means 4; negative means none.
	Retries int
	// MaxIdleConnsPerHost is how many connections are kept for reuse.
	// Default 16: clients upload packs in parallel (8 by default), and a
	// reused TLS connection saves a handshake per pack.
	MaxIdleConnsPerHost int
	// Transport, if set, replaces the client's own (for tests); TLS options
	// above are then ignored.
	Transport http.RoundTripper
}

// Client talks to a vault [Server]. Its methods match [guard.Session]'s,
// and its errors unwrap to the same sentinels, so callers can use either.
// It is safe for concurrent use.
type Client struct {
	base    *url.URL
	token   string
	retries int
	hc      *http.Client
	tr      *http.Transport // nil if a Transport was supplied
}

// NewClient returns a client for the server at baseURL ("https://host:port").
func NewClient(baseURL string, opts ClientOptions) (*Client, error) {
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("server: client: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return nil, fmt.Errorf("server: client: want https://host:port, got %q", baseURL)
	}
	u.Path = ""
	c := &Client{base: u, token: opts.Token, retries: opts.Retries}
	switch {
	case c.retries == 0:
		c.retries = 4
	case c.retries < 0:
		c.retries = 0
	}
	rt := opts.Transport
	if rt == nil {
		tlsConf := &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: opts.RootCAs}
		if opts.Fingerprint != "" {
			want, err := parseFingerprint(opts.Fingerprint)
			if err != nil {
				return nil, err
			}
			// InsecureSkipVerify turns off CA and host name checks only;
			// VerifyPeerCertificate still runs and is the whole check.
			tlsConf.InsecureSkipVerify = true
			tlsConf.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
				if len(raw) == 0 {
					return fmt.Errorf("%w: no certificate", ErrFingerprint)
				}
				got := sha256.Sum256(raw[0])
				if subtle.ConstantTimeCompare(got[:], want) != 1 {
					return fmt.Errorf("%w: server presented %s, pinned %s", ErrFingerprint, FingerprintDER(raw[0]), opts.Fingerprint)
				}
				return nil
			}
		}
		idle := opts.MaxIdleConnsPerHost
		if idle <= 0 {
			idle = 16
		}
		c.tr = &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:     tlsConf,
			TLSHandshakeTimeout: 15 * time.Second,
			MaxIdleConns:        max(idle, 100),
			MaxIdleConnsPerHost: idle,
			IdleConnTimeout:     90 * time.Second,
		}
		rt = c.tr
	}
	c.hc = &http.Client{
		Transport: rt,
		// The API never redirects; following one could send the token
		// elsewhere.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c, nil
}

func parseFingerprint(s string) ([]byte, error) {
	h, ok := strings.CutPrefix(strings.ToLower(s), "sha256:")
	b, err := hex.DecodeString(h)
	if !ok || err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("server: client: fingerprint %q: want sha256:<64 hex digits>", s)
	}
	return b, nil
}

// Close releases idle connections.
func (c *Client) Close() error {
	if c.tr != nil {
		c.tr.CloseIdleConnections()
	}
	return nil
}

// request is one API call.
type request struct {
	method, path string
	body         []byte
	header       http.Header
	// idempotent requests are retried on connection errors.
	idempotent bool
}

// do sends req, retrying as allowed, and returns a response with a 2xx
// status; any other status becomes an error (and the body is closed).
func (c *Client) do(ctx context.Context, req request) (*http.Response, error) {
	u := *c.base
	u.Path = req.path
	for attempt := 0; ; attempt++ {
		var body io.Reader
		if req.body != nil {
			body = bytes.NewReader(req.body)
		}
		hr, err := http.NewRequestWithContext(ctx, req.method, u.String(), body)
		if err != nil {
			return nil, fmt.Errorf("server: %s %s: %w", req.method, req.path, err)
		}
		for k, v := range req.header {
			hr.Header[k] = v
		}
		hr.Header.Set("Authorization", "Bearer "+c.token)
		if req.body != nil {
			hr.ContentLength = int64(len(req.body))
			hr.Header.Set("Content-Type", "application/octet-stream")
		}
		resp, err := c.hc.Do(hr)
		retry := req.idempotent && attempt < c.retries && ctx.Err() == nil
		if err != nil {
			if !retry || !retryable(err) {
				return nil, fmt.Errorf("server: %s %s: %w", req.method, req.path, err)
			}
		} else if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			return resp, nil
		} else if !retry || !retryableStatus(resp.StatusCode) {
			defer resp.Body.Close()
			return nil, statusError(req.method, req.path, resp)
		} else {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		// Exponential backoff with jitter: 100 ms, 200 ms, … capped at 5 s.
		d := min(100*time.Millisecond<<attempt, 5*time.Second)
		d = d/2 + rand.N(d/2+1)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("server: %s %s: %w", req.method, req.path, ctx.Err())
		}
	}
}

// retryable reports whether err is a transport failure worth retrying:
// not a cancelled context and not a certificate problem.
func retryable(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrFingerprint) {
		return false
	}
	var cve *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	var ae tls.AlertError
	if errors.As(err, &cve) || errors.As(err, &ua) || errors.As(err, &he) || errors.As(err, &ci) || errors.As(err, &ae) {
		return false
	}
	return true
}

func retryableStatus(code int) bool {
	return code == http.StatusBadGateway || code == http.StatusServiceUnavailable || code == http.StatusGatewayTimeout
}

// statusError turns a non-2xx response into an error unwrapping to the
// sentinel guard.Session would have returned.
func statusError(method, path string, resp *http.Response) error {
	var e errorResponse
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	msg := resp.Status
	if json.Unmarshal(b, &e) == nil && e.Error != "" {
		msg = e.Error
	}
	var sentinel error
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		sentinel = ErrUnauthorized
	case http.StatusForbidden:
		sentinel = guard.ErrForbidden
	case http.StatusNotFound:
		sentinel = backend.ErrNotExist
	case http.StatusConflict:
		sentinel = backend.ErrExists
	case http.StatusLocked:
		sentinel = guard.ErrLocked
	case http.StatusBadRequest, http.StatusRequestedRangeNotSatisfiable:
		sentinel = guard.ErrInvalid
	case http.StatusRequestEntityTooLarge:
		sentinel = ErrTooLarge
	}
	if sentinel == nil {
		return fmt.Errorf("server: %s %s: %s", method, path, msg)
	}
	return fmt.Errorf("server: %s %s: %s: %w", method, path, msg, sentinel)
}

func objectPath(h backend.Handle) string { return "/v1/objects/" + string(h.Type) + "/" + h.Name }

func checkHandle(op string, h backend.Handle) error {
	if err := h.Validate(); err != nil {
		return fmt.Errorf("server: %s: %w: %w", op, guard.ErrInvalid, err)
	}
	return nil
}

// getJSON GETs path and decodes the JSON answer into v.
func (c *Client) getJSON(ctx context.Context, path string, v any) error {
	resp, err := c.do(ctx, request{method: http.MethodGet, path: path, idempotent: true})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("server: GET %s: decode: %w", path, err)
	}
	return nil
}

// postJSON POSTs in as JSON and decodes the answer into out. Both POSTs of
// the API are safe to repeat (a repeated commit or extension can only
// lengthen a lock), so they are retried like idempotent requests.
func (c *Client) postJSON(ctx context.Context, path string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("server: POST %s: %w", path, err)
	}
	resp, err := c.do(ctx, request{method: http.MethodPost, path: path, body: b, idempotent: true,
		header: http.Header{"Content-Type": {"application/json"}}})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<30)).Decode(out); err != nil {
		return fmt.Errorf("server: POST %s: decode: %w", path, err)
	}
	return nil
}

// Capability asks the server which capability the token has.
func (c *Client) Capability(ctx context.Context) (guard.Capability, error) {
	var w whoami
	if err := c.getJSON(ctx, "/v1/whoami", &w); err != nil {
		return "", err
	}
	return w.Capability, nil
}

// Config returns the repository config.
func (c *Client) Config(ctx context.Context) (format.Config, error) {
	resp, err := c.do(ctx, request{method: http.MethodGet, path: "/v1/config", idempotent: true})
	if err != nil {
		return format.Config{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return format.Config{}, fmt.Errorf("server: GET /v1/config: %w", err)
	}
	cfg, err := format.ParseConfig(b)
	if err != nil {
		return format.Config{}, fmt.Errorf("server: GET /v1/config: %w", err)
	}
	return cfg, nil
}

// Save stores data under h; see [guard.Session.Save]. Saves are retried:
// an object's name is its hash, so a repeat is harmless.
func (c *Client) Save(ctx context.Context, h backend.Handle, data []byte) error {
	if err := checkHandle("save", h); err != nil {
		return err
	}
	if data == nil {
		data = []byte{}
	}
	resp, err := c.do(ctx, request{method: http.MethodPut, path: objectPath(h), body: data, idempotent: true})
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// Load returns length bytes of h from offset; length 0 means to the end.
func (c *Client) Load(ctx context.Context, h backend.Handle, offset, length int64) ([]byte, error) {
	if err := checkHandle("load", h); err != nil {
		return nil, err
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("server: load %v: negative offset or length: %w", h, guard.ErrInvalid)
	}
	req := request{method: http.MethodGet, path: objectPath(h), idempotent: true}
	ranged := offset > 0 || length > 0
	if ranged {
		r := "bytes=" + strconv.FormatInt(offset, 10) + "-"
		if length > 0 {
			r += strconv.FormatInt(offset+length-1, 10)
		}
		req.header = http.Header{"Range": {r}}
	}
	resp, err := c.do(ctx, req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if ranged && resp.StatusCode != http.StatusPartialContent {
		return nil, fmt.Errorf("server: load %v: server ignored the range (status %s)", h, resp.Status)
	}
	if ranged {
		want := fmt.Sprintf("bytes %d-", offset)
		if !strings.HasPrefix(resp.Header.Get("Content-Range"), want) {
			return nil, fmt.Errorf("server: load %v: unexpected Content-Range %q", h, resp.Header.Get("Content-Range"))
		}
	}
	var buf bytes.Buffer
	if resp.ContentLength > 0 {
		buf.Grow(int(resp.ContentLength) + bytes.MinRead)
	}
	if _, err := buf.ReadFrom(resp.Body); err != nil {
		return nil, fmt.Errorf("server: load %v: %w", h, err)
	}
	if length > 0 && int64(buf.Len()) != length {
		// A range past the end is an error in the backend contract too.
		return nil, fmt.Errorf("server: load %v: got %d bytes, want %d: %w", h, buf.Len(), length, guard.ErrInvalid)
	}
	return buf.Bytes(), nil
}

// Stat describes h. ModTime has one-second precision.
func (c *Client) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if err := checkHandle("stat", h); err != nil {
		return backend.Info{}, err
	}
	resp, err := c.do(ctx, request{method: http.MethodHead, path: objectPath(h), idempotent: true})
	if err != nil {
		return backend.Info{}, err
	}
	resp.Body.Close()
	fi := backend.Info{Handle: h, Size: resp.ContentLength}
	if t, err := http.ParseTime(resp.Header.Get("Last-Modified")); err == nil {
		fi.ModTime = t
	}
	return fi, nil
}

// List calls fn for each object of type t. ModTime is not transmitted and
// is zero. The listing is streamed; an error from fn stops it.
func (c *Client) List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error {
	if !t.Valid() {
		return fmt.Errorf("server: list: unknown type %q: %w", t, guard.ErrInvalid)
	}
	path := "/v1/objects/" + string(t) + "/"
	resp, err := c.do(ctx, request{method: http.MethodGet, path: path, idempotent: true})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	if tok, err := dec.Token(); err != nil || tok != json.Delim('[') {
		return fmt.Errorf("server: GET %s: want a JSON array: %v", path, err)
	}
	for dec.More() {
		var e listEntry
		if err := dec.Decode(&e); err != nil {
			return fmt.Errorf("server: GET %s: %w", path, err)
		}
		if err := fn(backend.Info{Handle: backend.Handle{Type: t, Name: e.Name}, Size: e.Size}); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil {
		return fmt.Errorf("server: GET %s: truncated listing: %w", path, err)
	}
	return nil
}

// Remove deletes h; see [guard.Session.Remove]. It is not retried: a repeat
// after a lost answer would report ErrNotExist for a removal that worked.
func (c *Client) Remove(ctx context.Context, h backend.Handle) error {
	if err := checkHandle("remove", h); err != nil {
		return err
	}
	resp, err := c.do(ctx, request{method: http.MethodDelete, path: objectPath(h)})
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// Commit records a snapshot; see [guard.Session.Commit]. The lock's times
// come from the server's clock.
func (c *Client) Commit(ctx context.Context, req format.CommitRequest) (format.LockRecord, format.ID, error) {
	var out commitResponse
	if err := c.postJSON(ctx, "/v1/commit", req, &out); err != nil {
		return format.LockRecord{}, format.ID{}, err
	}
	return out.Lock, out.ID, nil
}

// ExtendLock lengthens snapshot's lock to until; see
// [guard.Session.ExtendLock].
func (c *Client) ExtendLock(ctx context.Context, snapshot format.ID, until time.Time) (format.LockRecord, error) {
	var out extendResponse
	if err := c.postJSON(ctx, "/v1/locks/"+snapshot.String()+"/extend", extendRequest{Until: until}, &out); err != nil {
		return format.LockRecord{}, err
	}
	return out.Lock, nil
}

// Locks returns every lock record, sorted by time.
func (c *Client) Locks(ctx context.Context) ([]format.LockRecord, error) {
	var rs []format.LockRecord
	if err := c.getJSON(ctx, "/v1/locks", &rs); err != nil {
		return nil, err
	}
	return rs, nil
}

// SnapshotLock returns the lock horizon of snapshot id and its records.
func (c *Client) SnapshotLock(ctx context.Context, id format.ID) (until time.Time, records []format.LockRecord, err error) {
	rs, err := c.Locks(ctx)
	if err != nil {
		return time.Time{}, nil, err
	}
	until, records = guard.LockUntil(rs, id)
	return until, records, nil
}

// Quorum returns the vault's verified approver policy; see
// [guard.Session.Quorum].
func (c *Client) Quorum(ctx context.Context) (guard.QuorumState, error) {
	var st guard.QuorumState
	if err := c.getJSON(ctx, "/v1/quorum", &st); err != nil {
		return guard.QuorumState{}, err
	}
	return st, nil
}

// Certified asks the server to perform act under certificate, which the
// server verifies itself; see [guard.Session.Certified]. It is not retried:
// a certificate is used once, so a repeat after a lost answer would be
// refused as consumed.
func (c *Client) Certified(ctx context.Context, act guard.Action, certificate []byte) (guard.Outcome, error) {
	b, err := json.Marshal(certifiedRequest{Action: act, Certificate: certificate})
	if err != nil {
		return guard.Outcome{}, fmt.Errorf("server: POST /v1/certified: %w", err)
	}
	resp, err := c.do(ctx, request{method: http.MethodPost, path: "/v1/certified", body: b,
		header: http.Header{"Content-Type": {"application/json"}}})
	if err != nil {
		return guard.Outcome{}, err
	}
	defer resp.Body.Close()
	var out guard.Outcome
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&out); err != nil {
		return guard.Outcome{}, fmt.Errorf("server: POST /v1/certified: decode: %w", err)
	}
	return out, nil
}
