package state

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Separate OS processes, not just separate handles: each child is this
// test binary re-run with STATE_CHILD_DSN set. Phase "open" races on
// migrating a fresh database; phase "race" consumes one request and
// appends ledger seqs 1..processSeqs, printing what it won.
const processSeqs = 30

func TestChildProcess(t *testing.T) {
	dsn := os.Getenv("STATE_CHILD_DSN")
	if dsn == "" {
		t.Skip("helper for TestProcesses*")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db, err := Open(ctx, dsn)
	if err != nil {
		fmt.Printf("open error: %v\n", err)
		os.Exit(1)
	}
	defer db.Close()
	if os.Getenv("STATE_CHILD_PHASE") != "race" {
		return
	}
	switch err := db.Consume(ctx, "ff00", fmt.Sprint("pid-", os.Getpid()), t0.Add(time.Minute)); {
	case err == nil:
		fmt.Println("consume won")
	case errors.Is(err, ErrConsumed):
		fmt.Println("consume lost")
	default:
		fmt.Printf("consume error: %v\n", err)
		os.Exit(1)
	}
	for s := uint64(1); s <= processSeqs; s++ {
		ok, err := db.Ledger().Append(ctx, s, fmt.Appendf(nil, "%d by %d", s, os.Getpid()))
		if err != nil {
			fmt.Printf("append error: %v\n", err)
			os.Exit(1)
		}
		if ok {
			fmt.Printf("append won %d\n", s)
		}
	}
}

func runProcesses(t *testing.T, dsn string) {
	const n = 4
	run := func(phase string) []string {
		t.Helper()
		cmds := make([]*exec.Cmd, n)
		outs := make([]*strings.Builder, n)
		for i := range n {
			c := exec.Command(os.Args[0], "-test.run=^TestChildProcess$", "-test.count=1")
			c.Env = append(os.Environ(), "STATE_CHILD_DSN="+dsn, "STATE_CHILD_PHASE="+phase)
			outs[i] = &strings.Builder{}
			c.Stdout, c.Stderr = outs[i], outs[i]
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			cmds[i] = c
		}
		var lines []string
		for i, c := range cmds {
			if err := c.Wait(); err != nil {
				t.Fatalf("%s child %d: %v\n%s", phase, i, err, outs[i])
			}
			lines = append(lines, strings.Split(outs[i].String(), "\n")...)
		}
		return lines
	}
	run("open") // n processes migrate one fresh database at once
	db := open(t, dsn)
	var rows int
	if err := db.sql.QueryRowContext(ctxT(t), "SELECT count(*) FROM schema_version").Scan(&rows); err != nil || rows != len(migrations) {
		t.Fatalf("schema_version has %d rows (%v), want %d", rows, err, len(migrations))
	}
	approve(t, db, req("ff00", "ann"))
	won, appends := 0, map[string]int{}
	for _, l := range run("race") {
		switch {
		case l == "consume won":
			won++
		case strings.HasPrefix(l, "append won "):
			appends[l]++
		}
	}
	if won != 1 {
		t.Errorf("%d processes consumed the request, want exactly 1", won)
	}
	if len(appends) != processSeqs {
		t.Errorf("%d seqs won, want %d", len(appends), processSeqs)
	}
	for l, c := range appends {
		if c != 1 {
			t.Errorf("%q by %d processes", l, c)
		}
	}
}

func TestProcessesSQLite(t *testing.T) {
	runProcesses(t, "sqlite:"+filepath.Join(t.TempDir(), "state.db"))
}
