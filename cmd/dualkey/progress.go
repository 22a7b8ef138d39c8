package main

import (
	"fmt"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"

	"github.com/dualkey/dualkey/internal/vault/archiver"
)

// progress shows a long operation: a bar with rate and ETA on a terminal,
// a plain line every few seconds otherwise, nothing with --quiet or --json.
type progress struct {
	a     *app
	what  string
	mu    sync.Mutex
	bar   *progressbar.ProgressBar
	last  time.Time
	every time.Duration
}

func (a *app) newProgress(what string) *progress {
	return &progress{a: a, what: what, every: 5 * time.Second}
}

func (p *progress) enabled() bool { return !p.a.quiet && !p.a.jsonOut }

// update reports done of total bytes (total may still grow).
func (p *progress) update(done, total int64, final bool) {
	if !p.enabled() {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if isTerminal(p.a.stderr) {
		if p.bar == nil {
			p.bar = progressbar.NewOptions64(max(total, 1), progressbar.OptionSetWriter(p.a.stderr),
				progressbar.OptionSetDescription(p.what), progressbar.OptionShowBytes(true),
				progressbar.OptionSetPredictTime(true), progressbar.OptionThrottle(200*time.Millisecond),
				progressbar.OptionShowElapsedTimeOnFinish(), progressbar.OptionClearOnFinish())
		}
		if total > 0 && total != p.bar.GetMax64() {
			p.bar.ChangeMax64(total)
		}
		_ = p.bar.Set64(done)
		return
	}
	if !final && time.Since(p.last) < p.every {
		return
	}
	p.last = time.Now()
	if total > 0 {
		fmt.Fprintf(p.a.stderr, "%s: %s of %s (%.0f%%)\n", p.what, humanBytes(done), humanBytes(total), 100*float64(done)/float64(total))
	} else {
		fmt.Fprintf(p.a.stderr, "%s: %s\n", p.what, humanBytes(done))
	}
}

func (p *progress) backup(pr archiver.Progress) {
	total := pr.TotalBytes
	if !pr.ScanDone {
		total = max(total, pr.Bytes)
	}
	p.update(pr.Bytes, total, pr.Final)
}

func (p *progress) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		_ = p.bar.Finish()
	}
}
