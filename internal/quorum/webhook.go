package quorum

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/dualkey/dualkey/internal/quorum/cert"
)

// Event types a Notifier receives.
const (
	EventOpened     = "request.opened"
	EventApproved   = "request.approved"
	EventDenied     = "request.denied"
	EventExpired    = "request.expired"
	EventPolicy     = "policy.changed"
	EventBreakGlass = "breakglass.started"
	EventReviewed   = "breakglass.reviewed"
	// EventIncident: the tripwire saw data destroyed in the WAL; the
	// incident (internal/incident's JSON) is in Event.Incident.
	EventIncident = "incident.detected"
)

// Event is one thing people should hear about. Its JSON is a
// Slack-compatible webhook body: "text" is the human line, the other
// fields are for machines.
type Event struct {
	Text       string          `json:"text"`
	Type       string          `json:"event"`
	Time       time.Time       `json:"time"`
	Request    cert.ID         `json:"request,omitempty"`
	Action     string          `json:"action,omitempty"`
	Requester  string          `json:"requester,omitempty"`
	Reason     string          `json:"reason,omitempty"`
	What       string          `json:"what,omitempty"` // Describe: what will run, clipped
	Expires    time.Time       `json:"expires,omitzero"`
	Status     string          `json:"status,omitempty"`
	By         []string        `json:"by,omitempty"`
	Approvals  int             `json:"approvals,omitempty"`
	Need       int             `json:"need,omitempty"`
	BreakGlass *BreakGlassInfo `json:"breakglass,omitempty"`
	// Incident is a tripwire incident, as JSON (EventIncident only).
	Incident json.RawMessage `json:"incident,omitempty"`
}

// BreakGlassInfo describes a break-glass session in an Event.
type BreakGlassInfo struct {
	ID      string    `json:"id"`
	Person  string    `json:"person"`
	Role    string    `json:"role"`
	Started time.Time `json:"started"`
	Ends    time.Time `json:"ends"`
}

// Notifier is told about events. Notify must return quickly: the service
// calls it on the caller's path.
type Notifier interface {
	Notify(ev Event)
}

// Webhook POSTs events as JSON to a URL in the background, with a timeout
// per attempt and a few retries. A failure is logged (with the host only:
// a Slack webhook URL is itself a secret) and never reaches the caller.
// Call Close before the process exits so queued deliveries are not lost.
type Webhook struct {
	url    string
	host   string
	client *http.Client
	log    *slog.Logger

	// Attempts, Timeout and Backoff are read when a delivery starts; set
	// them before the first Notify. Defaults: 3 attempts, 5 s each, 500 ms
	// backoff doubling (about 16 s at worst per event).
	Attempts int
	Timeout  time.Duration
	Backoff  time.Duration

	wg  sync.WaitGroup
	sem chan struct{} // bounds deliveries in flight
}

var _ Notifier = (*Webhook)(nil)

// maxInFlight bounds background deliveries: a dead endpoint must not pile
// up goroutines while requests keep coming. Beyond it events are dropped
// (and logged); the ledger has them all.
const maxInFlight = 32

// NewWebhook returns a webhook for an http or https URL.
func NewWebhook(rawURL string, log *slog.Logger) (*Webhook, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: webhook URL: want an http or https URL with a host", ErrInvalid)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Webhook{url: rawURL, host: u.Host, client: &http.Client{}, log: log,
		Attempts: 3, Timeout: 5 * time.Second, Backoff: 500 * time.Millisecond,
		sem: make(chan struct{}, maxInFlight)}, nil
}

// Notify queues ev for delivery and returns at once.
func (w *Webhook) Notify(ev Event) {
	select {
	case w.sem <- struct{}{}:
	default:
		w.log.Error("webhook: too many deliveries in flight; event dropped", "host", w.host, "event", ev.Type, "request", ev.Request)
		return
	}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer func() { <-w.sem }()
		if err := w.Send(context.Background(), ev); err != nil {
			w.log.Error("webhook delivery failed", "host", w.host, "event", ev.Type, "request", ev.Request, "err", err)
		}
	}()
}

// Send delivers ev now, retrying on network errors, 429 and 5xx; any
// other status is final.
func (w *Webhook) Send(ctx context.Context, ev Event) error {
	body, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("quorum: webhook: %w", err)
	}
	backoff := w.Backoff
	var last error
	for attempt := 1; attempt <= max(1, w.Attempts); attempt++ {
		if attempt > 1 {
			select {
			case <-ctx.Done():
				return fmt.Errorf("quorum: webhook: %w (last: %v)", ctx.Err(), last)
			case <-time.After(backoff):
			}
			backoff *= 2
		}
		retry, err := w.post(ctx, body)
		if err == nil {
			return nil
		}
		last = err
		w.log.Warn("webhook attempt failed", "host", w.host, "event", ev.Type, "attempt", attempt, "err", err)
		if !retry {
			break
		}
	}
	return last
}

func (w *Webhook) post(ctx context.Context, body []byte) (retry bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, w.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url, bytes.NewReader(body))
	if err != nil {
		return false, fmt.Errorf("quorum: webhook: %w", scrub(err))
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "dualkey")
	resp, err := w.client.Do(req)
	if err != nil {
		return true, fmt.Errorf("quorum: webhook POST to %s: %w", w.host, scrub(err))
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return false, nil
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return true, fmt.Errorf("quorum: webhook POST to %s: %s", w.host, resp.Status)
	default:
		return false, fmt.Errorf("quorum: webhook POST to %s: %s", w.host, resp.Status)
	}
}

// scrub drops the URL from a *url.Error: its path or query may hold the
// webhook's secret token.
func scrub(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Close waits for queued deliveries until ctx ends.
func (w *Webhook) Close(ctx context.Context) error {
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("quorum: webhook: deliveries still pending: %w", ctx.Err())
	}
}
