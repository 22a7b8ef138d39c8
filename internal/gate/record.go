package gate

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/dualkey/dualkey/internal/ledger"
)

// recorder appends ledger records off the query path. Statement records
// describe what already happened, so they need not hold the client up; the
// queue blocks when full rather than drop a record. Records that gate a
// decision (a request, a hold, a consume) are written synchronously by the
// session instead.
type recorder struct {
	led  *ledger.Ledger
	log  *slog.Logger
	q    chan ledger.Entry
	done chan struct{}
	once sync.Once
}

func newRecorder(led *ledger.Ledger, log *slog.Logger) *recorder {
	r := &recorder{led: led, log: log, q: make(chan ledger.Entry, 4096), done: make(chan struct{})}
	go r.run()
	return r
}

func (r *recorder) run() {
	defer close(r.done)
	for e := range r.q {
		r.write(e)
	}
}

func (r *recorder) write(e ledger.Entry) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := r.led.Append(ctx, e); err != nil {
		r.log.Error("gate: ledger record lost", "kind", e.Kind, "actor", e.Actor, "err", err)
	}
}

// add queues e.
func (r *recorder) add(e ledger.Entry) { r.q <- e }

// sync writes e now and returns the ledger's error.
func (r *recorder) sync(ctx context.Context, e ledger.Entry) error {
	_, err := r.led.Append(ctx, e)
	return err
}

// close writes what is queued and stops.
func (r *recorder) close() {
	r.once.Do(func() { close(r.q) })
	<-r.done
}
