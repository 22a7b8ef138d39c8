package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/guard"
)

// Options configure a [Server]. Zero fields take the defaults noted.
type Options struct {
	// Addr is the listen address (host:port) for ListenAndServe. Its host
	// also goes into a generated certificate.
	Addr string
	// StateDir holds tokens.jsonl, tls.crt and tls.key. Required unless
	// CertFile and KeyFile are given. Keep it outside the vault directory.
	StateDir string
	// CertFile and KeyFile, if set, are used instead of a generated
	// self-signed certificate.
	CertFile, KeyFile string

	// MaxObjectSize bounds a PUT body. Default 256 MiB: packs are cut at
	// 16 MiB by default, so this leaves room for larger pack sizes while
	// bounding what one request can make the server buffer.
	MaxObjectSize int64
	// MaxJSONSize bounds a JSON request body (commit, extend). Default
	// 96 MiB: a commit carries the snapshot document (base64) and one
	// 67-byte entry per pack, so MaxCommitPacks packs fit.
	MaxJSONSize int64
	// MaxCommitPacks bounds the pack list of one commit. Default
	// format.MaxIndexPacks (about a million packs, 16 TiB at 16 MiB each).
	MaxCommitPacks int
	// MaxHeaderBytes bounds request headers. Default 64 KiB; ours are tiny.
	MaxHeaderBytes int
	// ReadHeaderTimeout defaults to 10 s, which stops slow-header attacks.
	ReadHeaderTimeout time.Duration
	// ReadTimeout and WriteTimeout bound a whole request and response.
	// Default 10 min: a 256 MiB object at 0.5 MB/s.
	ReadTimeout, WriteTimeout time.Duration
	// IdleTimeout closes idle keep-alive connections. Default 2 min.
	IdleTimeout time.Duration

	// Logger receives access and error logs. Default slog.Default().
	Logger *slog.Logger
}

// ApplyDefaults fills zero fields.
func (o *Options) ApplyDefaults() {
	def := func(p *time.Duration, d time.Duration) {
		if *p <= 0 {
			*p = d
		}
	}
	if o.MaxObjectSize <= 0 {
		o.MaxObjectSize = 256 << 20
	}
	if o.MaxJSONSize <= 0 {
		o.MaxJSONSize = 96 << 20
	}
	if o.MaxCommitPacks <= 0 {
		o.MaxCommitPacks = format.MaxIndexPacks
	}
	if o.MaxHeaderBytes <= 0 {
		o.MaxHeaderBytes = 64 << 10
	}
	def(&o.ReadHeaderTimeout, 10*time.Second)
	def(&o.ReadTimeout, 10*time.Minute)
	def(&o.WriteTimeout, 10*time.Minute)
	def(&o.IdleTimeout, 2*time.Minute)
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
}

// Server serves a guard.Store over HTTPS. Create it with [New].
type Server struct {
	store  *guard.Store
	tokens *TokenStore
	opts   Options
	log    *slog.Logger
	cert   tls.Certificate
	leaf   *x509.Certificate
}

// New returns a server for store authenticating with tokens. It loads the
// TLS certificate, generating a self-signed one in StateDir on first start.
func New(store *guard.Store, tokens *TokenStore, opts Options) (*Server, error) {
	opts.ApplyDefaults()
	if opts.StateDir == "" && (opts.CertFile == "" || opts.KeyFile == "") {
		return nil, errors.New("server: a state folder or a certificate and key are required")
	}
	host, _, _ := net.SplitHostPort(opts.Addr)
	cert, err := loadOrCreateCert(opts.StateDir, opts.CertFile, opts.KeyFile, host)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("server: tls: %w", err)
	}
	cert.Leaf = leaf
	return &Server{store: store, tokens: tokens, opts: opts, log: opts.Logger, cert: cert, leaf: leaf}, nil
}

// Certificate returns the server's leaf certificate.
func (s *Server) Certificate() *x509.Certificate { return s.leaf }

// Fingerprint returns the fingerprint clients pin; see [Fingerprint].
func (s *Server) Fingerprint() string { return Fingerprint(s.leaf) }

// TLSConfig returns the server's TLS configuration: TLS 1.3, HTTP/1.1 only.
func (s *Server) TLSConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{s.cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"http/1.1"},
	}
}

// HTTPServer returns an http.Server with the configured limits and
// timeouts, serving [Server.Handler] over HTTP/1.1.
func (s *Server) HTTPServer() *http.Server {
	var p http.Protocols
	p.SetHTTP1(true)
	return &http.Server{
		Handler:           s.Handler(),
		TLSConfig:         s.TLSConfig(),
		Protocols:         &p,
		ReadHeaderTimeout: s.opts.ReadHeaderTimeout,
		ReadTimeout:       s.opts.ReadTimeout,
		WriteTimeout:      s.opts.WriteTimeout,
		IdleTimeout:       s.opts.IdleTimeout,
		MaxHeaderBytes:    s.opts.MaxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// Serve serves HTTPS on ln until ctx ends, then shuts down gracefully
// (waiting up to 30 s for requests in flight). It returns nil after a
// shutdown caused by ctx, and otherwise the error that stopped serving.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := s.HTTPServer()
	s.log.Info("vault server listening", "addr", ln.Addr().String(), "fingerprint", s.Fingerprint())
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("server: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := srv.Shutdown(sctx)
	<-errc
	if err != nil {
		return fmt.Errorf("server: shutdown: %w", err)
	}
	return nil
}

// ListenAndServe listens on Options.Addr and calls Serve.
func (s *Server) ListenAndServe(ctx context.Context) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.opts.Addr)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	return s.Serve(ctx, ln)
}

// Handler returns the API handler (without TLS; for tests and for running
// behind a TLS-terminating listener of one's own).
func (s *Server) Handler() http.Handler { return http.HandlerFunc(s.serveHTTP) }

// responseWriter records the status and size for the access log.
type responseWriter struct {
	http.ResponseWriter
	status int
	n      int64
}

func (w *responseWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	return n, err
}

func (s *Server) serveHTTP(rw http.ResponseWriter, r *http.Request) {
	start := time.Now()
	w := &responseWriter{ResponseWriter: rw}
	var tok Token
	defer func() {
		// Never the Authorization header: only the token's id.
		s.log.Info("request", "method", r.Method, "path", r.URL.Path, "status", w.status,
			"bytes", w.n, "dur", time.Since(start).Round(time.Microsecond), "token", tok.ID, "remote", r.RemoteAddr)
	}()

	secret, ok := bearer(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", `Bearer realm="dualkey vault"`)
		s.fail(w, r, fmt.Errorf("%w: missing bearer token", ErrUnauthorized))
		return
	}
	var err error
	tok, err = s.tokens.Authenticate(secret)
	if err != nil {
		w.Header().Set("WWW-Authenticate", `Bearer realm="dualkey vault", error="invalid_token"`)
		s.fail(w, r, err)
		return
	}
	if r.URL.RawPath != "" || r.URL.RawQuery != "" || r.URL.Fragment != "" {
		s.fail(w, r, fmt.Errorf("%w: encoded characters or query not allowed: %w", errBadPath, guard.ErrInvalid))
		return
	}
	rt, err := parsePath(r.URL.Path)
	if err != nil {
		s.fail(w, r, fmt.Errorf("%w: %w", err, guard.ErrInvalid))
		return
	}
	sess := s.store.Session(tok.Cap)
	ctx := r.Context()

	switch rt.kind {
	case routeWhoami:
		if s.method(w, r, http.MethodGet) {
			s.json(w, http.StatusOK, whoami{Capability: tok.Cap, Token: tok.ID, Name: tok.Name})
		}
	case routeConfig:
		if s.method(w, r, http.MethodGet) {
			data, err := sess.Load(ctx, backend.Handle{Type: backend.Config, Name: backend.ConfigName}, 0, 0)
			if err != nil {
				s.fail(w, r, err)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data)
		}
	case routeObject:
		switch r.Method {
		case http.MethodGet:
			s.getObject(w, r, sess, rt.handle)
		case http.MethodHead:
			fi, err := sess.Stat(ctx, rt.handle)
			if err != nil {
				s.fail(w, r, err)
				return
			}
			w.Header().Set("Content-Length", strconv.FormatInt(fi.Size, 10))
			w.Header().Set("Last-Modified", fi.ModTime.UTC().Format(http.TimeFormat))
			w.WriteHeader(http.StatusOK)
		case http.MethodPut:
			data, err := s.readBody(w, r, s.opts.MaxObjectSize)
			if err != nil {
				s.fail(w, r, err)
				return
			}
			if err := sess.Save(ctx, rt.handle, data); err != nil {
				s.fail(w, r, err)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		case http.MethodDelete:
			if err := sess.Remove(ctx, rt.handle); err != nil {
				s.fail(w, r, err)
				return
			}
			w.WriteHeader(http.StatusNoContent)
		default:
			s.notAllowed(w, r, "GET, HEAD, PUT, DELETE")
		}
	case routeList:
		if s.method(w, r, http.MethodGet) {
			s.list(w, r, sess, rt.handle.Type)
		}
	case routeCommit:
		if !s.method(w, r, http.MethodPost) {
			return
		}
		data, err := s.readBody(w, r, s.opts.MaxJSONSize)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		req, err := decodeCommit(data, s.opts.MaxCommitPacks)
		if err != nil {
			s.fail(w, r, fmt.Errorf("%w: %w", err, guard.ErrInvalid))
			return
		}
		rec, id, err := sess.Commit(ctx, req)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.log.Info("snapshot committed", "snapshot", id.String(), "until", rec.Until, "packs", len(rec.Packs), "token", tok.ID)
		s.json(w, http.StatusOK, commitResponse{ID: id, Lock: rec})
	case routeLocks:
		if s.method(w, r, http.MethodGet) {
			rs, err := sess.Locks(ctx)
			if err != nil {
				s.fail(w, r, err)
				return
			}
			if rs == nil {
				rs = []format.LockRecord{}
			}
			s.json(w, http.StatusOK, rs)
		}
	case routeExtend:
		if !s.method(w, r, http.MethodPost) {
			return
		}
		data, err := s.readBody(w, r, 4<<10)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		var req extendRequest
		if err := decodeJSON(bytes.NewReader(data), &req); err != nil || req.Until.IsZero() {
			s.fail(w, r, fmt.Errorf("extend request: bad JSON or no until: %w", guard.ErrInvalid))
			return
		}
		rec, err := sess.ExtendLock(ctx, rt.snap, req.Until)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.log.Info("lock extended", "snapshot", rt.snap.String(), "until", rec.Until, "token", tok.ID)
		s.json(w, http.StatusOK, extendResponse{Lock: rec})
	case routeQuorum:
		if s.method(w, r, http.MethodGet) {
			st, err := sess.Quorum(ctx)
			if err != nil {
				s.fail(w, r, err)
				return
			}
			s.json(w, http.StatusOK, st)
		}
	case routeCertified:
		if !s.method(w, r, http.MethodPost) {
			return
		}
		data, err := s.readBody(w, r, 2*format.MaxCertificate)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		req, err := decodeCertified(data)
		if err != nil {
			s.fail(w, r, fmt.Errorf("%w: %w", err, guard.ErrInvalid))
			return
		}
		// The vault checks the certificate itself: the client's word decides
		// nothing here.
		out, err := sess.Certified(ctx, req.Action, req.Certificate)
		if err != nil {
			s.log.Warn("guarded action refused", "op", req.Action.Op, "token", tok.ID, "err", err)
			s.fail(w, r, err)
			return
		}
		s.log.Info("guarded action done", "op", out.Op, "request", out.Request, "token", tok.ID)
		s.json(w, http.StatusOK, out)
	default:
		panic("server: unhandled route") // parsePath returned a kind we forgot
	}
}

// Request and response bodies.
type (
	whoami struct {
		Capability guard.Capability `json:"capability"`
		Token      string           `json:"token"`
		Name       string           `json:"name"`
	}
	listEntry struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
	}
	commitResponse struct {
		ID   format.ID         `json:"id"`
		Lock format.LockRecord `json:"lock"`
	}
	extendRequest struct {
		Until time.Time `json:"until"`
	}
	extendResponse struct {
		Lock format.LockRecord `json:"lock"`
	}
	errorResponse struct {
		Error string `json:"error"`
	}
)

func bearer(r *http.Request) (string, bool) {
	v := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", false
	}
	return tok, true
}

func (s *Server) method(w *responseWriter, r *http.Request, m string) bool {
	if r.Method == m || m == http.MethodGet && r.Method == http.MethodHead {
		return true
	}
	s.notAllowed(w, r, m)
	return false
}

func (s *Server) notAllowed(w *responseWriter, r *http.Request, allow string) {
	w.Header().Set("Allow", allow)
	s.writeError(w, http.StatusMethodNotAllowed, "method "+r.Method+" not allowed")
}

// errTooLarge marks a body over its limit.
var errTooLarge = errors.New("request body too large")

// readBody reads the whole body, refusing more than limit bytes.
func (s *Server) readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	if r.ContentLength > limit {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", errTooLarge, r.ContentLength, limit)
	}
	body := http.MaxBytesReader(w, r.Body, limit)
	var buf bytes.Buffer
	// bytes.Buffer.ReadFrom wants MinRead spare bytes before each read;
	// growing by that much up front keeps a body of known length in one
	// allocation instead of doubling at the end.
	buf.Grow(int(max(r.ContentLength, 0)) + bytes.MinRead)
	if _, err := buf.ReadFrom(body); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, fmt.Errorf("%w: limit %d", errTooLarge, limit)
		}
		return nil, fmt.Errorf("read body: %w", err)
	}
	return buf.Bytes(), nil
}

func (s *Server) getObject(w *responseWriter, r *http.Request, sess *guard.Session, h backend.Handle) {
	ctx := r.Context()
	off, n, ranged, err := parseRange(r.Header.Get("Range"))
	if err != nil {
		s.fail(w, r, fmt.Errorf("%w: %w", err, guard.ErrInvalid))
		return
	}
	if !ranged {
		data, err := sess.Load(ctx, h, 0, 0)
		if err != nil {
			s.fail(w, r, err)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Header().Set("Accept-Ranges", "bytes")
		w.WriteHeader(http.StatusOK)
		w.Write(data)
		return
	}
	fi, err := sess.Stat(ctx, h)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if off >= fi.Size {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", fi.Size))
		s.writeError(w, http.StatusRequestedRangeNotSatisfiable, fmt.Sprintf("range starts at %d, object has %d bytes", off, fi.Size))
		return
	}
	if n == 0 || n > fi.Size-off {
		n = fi.Size - off
	}
	data, err := sess.Load(ctx, h, off, n)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", off, off+int64(len(data))-1, fi.Size))
	w.WriteHeader(http.StatusPartialContent)
	w.Write(data)
}

// list streams a JSON array. An error after the first byte aborts the
// connection, so the client sees a broken response, never a short list that
// looks complete.
func (s *Server) list(w *responseWriter, r *http.Request, sess *guard.Session, t backend.Type) {
	started := false
	enc := json.NewEncoder(w)
	err := sess.List(r.Context(), t, func(fi backend.Info) error {
		if !started {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			io.WriteString(w, "[")
			started = true
		} else {
			io.WriteString(w, ",")
		}
		return enc.Encode(listEntry{Name: fi.Name, Size: fi.Size})
	})
	switch {
	case err != nil && started:
		s.log.Error("list failed mid-stream", "type", string(t), "err", err)
		panic(http.ErrAbortHandler)
	case err != nil:
		s.fail(w, r, err)
	case !started:
		s.json(w, http.StatusOK, []listEntry{})
	default:
		io.WriteString(w, "]\n")
	}
}

func (s *Server) json(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("server: marshal %T: %v", v, err)) // our own types: a bug
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(code)
	w.Write(append(b, '\n'))
}

func (s *Server) writeError(w http.ResponseWriter, code int, msg string) {
	s.json(w, code, errorResponse{Error: msg})
}

// statusOf maps an error to its HTTP status; see the package comment.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrUnauthorized):
		return http.StatusUnauthorized
	case errors.Is(err, errTooLarge):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, guard.ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, guard.ErrLocked):
		return http.StatusLocked
	case errors.Is(err, backend.ErrNotExist):
		return http.StatusNotFound
	case errors.Is(err, backend.ErrExists):
		return http.StatusConflict
	case errors.Is(err, guard.ErrInvalid), errors.Is(err, format.ErrFormat), errors.Is(err, errBadPath):
		return http.StatusBadRequest
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// fail answers with err's status. Internal errors are logged in full and
// answered with a generic message.
func (s *Server) fail(w *responseWriter, r *http.Request, err error) {
	code := statusOf(err)
	msg := err.Error()
	if code == http.StatusInternalServerError {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		msg = "internal error"
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(code)
		return
	}
	s.writeError(w, code, msg)
}
