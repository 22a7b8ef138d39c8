package quorum

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// hook is a real HTTP server collecting webhook bodies; the first fail
// requests answer 503.
type hook struct {
	srv    *httptest.Server
	mu     sync.Mutex
	bodies [][]byte
	fail   atomic.Int32
	calls  atomic.Int32
}

func newHook(t *testing.T) *hook {
	h := &hook{}
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.calls.Add(1)
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "want a JSON POST", http.StatusBadRequest)
			return
		}
		if h.fail.Add(-1) >= 0 {
			http.Error(w, "try later", http.StatusServiceUnavailable)
			return
		}
		b, _ := io.ReadAll(r.Body)
		h.mu.Lock()
		h.bodies = append(h.bodies, b)
		h.mu.Unlock()
	}))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *hook) events(t *testing.T) []map[string]any {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []map[string]any
	for _, b := range h.bodies {
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("webhook body %s: %v", b, err)
		}
		out = append(out, m)
	}
	return out
}

func TestWebhook(t *testing.T) {
	h := newHook(t)
	h.fail.Store(1) // the first delivery fails once and is retried
	var logs bytes.Buffer
	secretURL := h.srv.URL + "/services/T000/B000/s3cr3t-token"
	w, err := NewWebhook(secretURL, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	w.Backoff = 10 * time.Millisecond
	e := newEnv(t, "", nil, Options{Notifier: w}).init()
	id := e.open(e.sqlRequest("dave", "DROP TABLE audit_2019"))
	e.mustApprove("bob", "carol")(id)
	if _, err := e.svc.StartBreakGlass(ctxT(t), "alice", "dba", "primary down", 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	evs := h.events(t)
	byType := map[string]map[string]any{}
	for _, ev := range evs {
		byType[ev["event"].(string)] = ev
	}
	if len(evs) != 3 {
		t.Fatalf("got %d events, want opened, approved, break-glass: %v", len(evs), evs)
	}
	op := byType[EventOpened]
	if op == nil || op["request"] != string(id) || op["requester"] != "dave" || op["action"] != "sql:destructive" ||
		op["need"] != float64(2) || !strings.Contains(op["text"].(string), "DROP TABLE audit_2019") ||
		!strings.Contains(op["what"].(string), "database shop as role app_owner") {
		t.Errorf("opened event = %v", op)
	}
	ap := byType[EventApproved]
	if ap == nil || ap["status"] != "approved" || ap["approvals"] != float64(2) || !strings.Contains(ap["text"].(string), "approved") {
		t.Errorf("approved event = %v", ap)
	}
	bg := byType[EventBreakGlass]
	if bg == nil || !strings.Contains(bg["text"].(string), "BREAK-GLASS") || bg["breakglass"].(map[string]any)["role"] != "dba" {
		t.Errorf("break-glass event = %v", bg)
	}
	if got := h.calls.Load(); got != 4 {
		t.Errorf("server saw %d calls, want 4 (one retried)", got)
	}
	if !strings.Contains(logs.String(), "webhook attempt failed") {
		t.Errorf("the failed attempt was not logged: %s", logs.String())
	}
	if strings.Contains(logs.String(), "s3cr3t") {
		t.Errorf("a log line holds the webhook URL's secret: %s", logs.String())
	}
}

// TestWebhookDoesNotBlock: a hanging endpoint neither blocks the service
// nor lives past its timeout; the failure is logged without the URL.
func TestWebhookDoesNotBlock(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	var logs syncBuffer
	w, err := NewWebhook(srv.URL+"/hook?token=s3cr3t", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	w.Timeout, w.Attempts, w.Backoff = time.Second, 2, 10*time.Millisecond
	e := newEnv(t, "", nil, Options{Notifier: w}).init()
	start := time.Now()
	e.open(e.sqlRequest("dave", "DROP TABLE t"))
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("Open took %s with a hanging webhook", d)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.Close(ctx); err != nil {
		t.Fatalf("delivery outlived its timeouts: %v", err)
	}
	if !strings.Contains(logs.String(), "webhook delivery failed") || strings.Contains(logs.String(), "s3cr3t") {
		t.Errorf("log = %s", logs.String())
	}
	if _, err := NewWebhook("ftp://x/y", nil); err == nil {
		t.Error("NewWebhook accepted an ftp URL")
	}
}

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
