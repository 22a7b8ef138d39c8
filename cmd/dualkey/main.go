// Command dualkey is the one binary of Dualkey. The commands live in one
// file each; this file only wires the process to them.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"runtime/trace"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// DUALKEY_CPUPROFILE=FILE writes a CPU profile of the whole run: how
	// docs/benchmarks.md's figures were explained.
	if p := os.Getenv("DUALKEY_CPUPROFILE"); p != "" {
		if f, err := os.Create(p); err != nil {
			fmt.Fprintln(os.Stderr, "dualkey: cpu profile:", err)
		} else if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "dualkey: cpu profile:", err)
		}
	}
	// DUALKEY_TRACE=FILE writes a runtime execution trace (go tool trace):
	// which goroutine waited on what, when a profile alone cannot say why
	// the cores sat idle.
	if p := os.Getenv("DUALKEY_TRACE"); p != "" {
		if f, err := os.Create(p); err != nil {
			fmt.Fprintln(os.Stderr, "dualkey: trace:", err)
		} else if err := trace.Start(f); err != nil {
			fmt.Fprintln(os.Stderr, "dualkey: trace:", err)
		}
	}
	code := newApp(os.Stdin, os.Stdout, os.Stderr, os.Getenv).run(ctx, os.Args[1:])
	stop()
	pprof.StopCPUProfile()
	trace.Stop()
	os.Exit(code)
}
