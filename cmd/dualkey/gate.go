package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/dualkey/dualkey/internal/gate"
	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/state"
)

func (a *app) gateCmd() *cobra.Command {
	var config string
	cmd := &cobra.Command{
		Use:   "gate --config gate.yaml",
		Short: "Run the PostgreSQL access gateway: each person logs in as themselves, destructive statements wait for a quorum",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := policy.Load(config)
			if err != nil {
				return usageError{err}
			}
			return a.runGate(cmd.Context(), cfg)
		},
	}
	cmd.Flags().StringVar(&config, "config", "gate.yaml", "the gate's YAML config (listen, tls, upstreams, rules)")
	return cmd
}

// gateGCPercent is the gate's GOGC unless the environment sets one. A
// gate's live heap is a few MiB and its garbage short-lived, so at Go's
// default of 100 it collected every 0.7 s under one pgbench TPC-B client;
// each collection stops the event loop twice (preempting it out of its
// wait) and runs a mark burst on the other core. At 400 it collects a
// quarter as often, for a heap goal of ~16 MiB instead of ~4; whether that
// decides the one-client TPC-B row against PgBouncer is not settled
// (docs/benchmarks.md: ahead in 4 of 5 rounds in a focused run, behind in
// 4 of 4 in the full run after it).
const gateGCPercent = 400

func (a *app) runGate(ctx context.Context, cfg *policy.Config) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gateGCPercent)
	}
	if a.q.state == "" && a.getenv("DUALKEY_STATE") == "" {
		a.q.state = cfg.State
	}
	if a.q.webhook == "" && a.getenv("DUALKEY_WEBHOOK") == "" {
		a.q.webhook = cfg.Webhook
	}
	q, err := a.openQuorum(ctx, state.WithLedgerSync(cfg.LedgerSync))
	if err != nil {
		return err
	}
	defer q.close(ctx)

	gc := gate.ConfigFrom(cfg)
	gc.Upstreams, gc.State, gc.Quorum, gc.Ledger, gc.Logger = map[string]gate.Upstream{}, q.db, q.svc, q.led, a.log
	fingerprint := ""
	if cfg.TLS.Cert != "" {
		host, _, _ := net.SplitHostPort(cfg.Listen)
		if gc.TLS, fingerprint, err = gate.TLSConfig(cfg.TLS.Cert, cfg.TLS.Key, cfg.TLS.Generate, []string{host}); err != nil {
			return err
		}
	}
	for name, u := range cfg.Upstreams {
		dsn, err := u.DSN()
		if err != nil {
			return err
		}
		gc.Upstreams[name] = gate.Upstream{DSN: dsn, Role: u.User}
	}
	g, err := gate.New(gc)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("dualkey: gate: %w", err)
	}
	tlsNote := "TLS off (plaintext only)"
	if gc.TLS != nil {
		tlsNote = "TLS fingerprint " + fingerprint
		if !gc.RequireTLS {
			tlsNote += " (plaintext also accepted)"
		}
	}
	fmt.Fprintf(a.stdout, "gate listening on %s; %s; event loop: %s", ln.Addr(), tlsNote, g.EventLoop())
	if n := g.Loops(); n > 1 {
		fmt.Fprintf(a.stdout, " (%d threads)", n)
	}
	if cpus := g.LoopCPUs(); cpus != "" {
		fmt.Fprintf(a.stdout, " on CPU %s", cpus)
	}
	fmt.Fprintln(a.stdout)
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		g.Close(context.Background())
		return err
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	err = g.Close(cctx)
	if serr := <-errc; !errors.Is(serr, gate.ErrClosed) {
		err = errors.Join(err, serr)
	}
	fmt.Fprintln(a.stdout, "gate stopped")
	return err
}
