package gate

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/dualkey/dualkey/internal/gate/classify"
	"github.com/dualkey/dualkey/internal/gate/policy"
	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/state"
)

// benchPolicy is bench/gate.sh's: reads and writes allowed, no max_rows,
// so the blast-radius guard stays out but every write is classified and
// recorded.
const benchPolicy = `
tls: {require_tls: false}
upstreams:
  shop: {host: 127.0.0.1, port: %d, user: app_owner, password: brokered-secret, sslmode: disable}
  bench: {host: 127.0.0.1, port: %d, user: app_owner, password: brokered-secret, sslmode: disable}
rules:
  - {name: bench, users: [alice], databases: [bench], classes: [read, write], action: allow}
`

// BenchmarkPgbench runs pgbench straight to a real PostgreSQL and through
// the gate, back to back (direct, gate, gate, direct, so drift in the load
// of a shared machine lands on both alike), and reports the gate's share
// of direct's tps: the number issue 6 is about. Each sub-benchmark runs
// once whatever b.N; DUALKEY_BENCH_SECONDS (default 5) is the length of
// one pgbench run, DUALKEY_BENCH_CLIENTS (default 8) the clients,
// DUALKEY_BENCH_ONLY a part of the workloads' names to run.
//
//	go test -run XXX -bench Pgbench -benchtime 1x -cpuprofile cpu.out ./internal/gate/
//
// The profile is the gate's alone: pgbench and PostgreSQL are processes
// of their own.
func BenchmarkPgbench(b *testing.B) {
	if testing.Short() {
		b.Skip("starts PostgreSQL")
	}
	secs := envInt("DUALKEY_BENCH_SECONDS", 5)
	clients := envInt("DUALKEY_BENCH_CLIENTS", 8)
	srv := pgtest.Start(b, pgtest.Options{Settings: []string{"shared_buffers = 128MB"}})
	srv.Exec("postgres", "CREATE ROLE app_owner LOGIN PASSWORD 'brokered-secret'")
	srv.Exec("postgres", "CREATE DATABASE shop OWNER app_owner")
	srv.Exec("postgres", "CREATE DATABASE bench OWNER app_owner")
	e := startGate(b, srv, func(c *Config) {
		pc, err := policy.Parse(fmt.Appendf(nil, benchPolicy, srv.Port, srv.Port), "bench.yaml")
		if err != nil {
			b.Fatal(err)
		}
		c.Policy, c.RecordReads = pc, false
	})
	srv.Pgbench("-i", "-s", "10", "-q", "bench")
	srv.Exec("bench", "GRANT ALL ON ALL TABLES IN SCHEMA public TO app_owner")
	direct := srv.URL("bench")
	gate := e.url("alice", alicePW, "bench", "disable")
	for _, w := range []struct{ name, mode, script string }{
		{"select-simple", "simple", "-S"},
		{"select-prepared", "prepared", "-S"},
		{"tpcb-simple", "simple", ""},
		{"tpcb-prepared", "prepared", ""},
	} {
		if only := os.Getenv("DUALKEY_BENCH_ONLY"); only != "" && !strings.Contains(w.name, only) {
			continue
		}
		b.Run(w.name, func(b *testing.B) {
			var d, g float64
			var cpu time.Duration
			var txns int64
			for _, target := range []string{"direct", "gate", "gate", "direct"} {
				url := direct
				if target == "gate" {
					url = gate
				}
				c0 := cpuTime()
				tps, n := runPgbench(b, url, w.mode, w.script, clients, secs)
				if target == "gate" {
					g += tps
					cpu += cpuTime() - c0
					txns += n
				} else {
					d += tps
				}
			}
			b.ReportMetric(d/2, "direct-tps")
			b.ReportMetric(g/2, "gate-tps")
			b.ReportMetric(g/d, "gate/direct")
			// The gate's own CPU per transaction (this process: the gate
			// runs in it, pgbench and PostgreSQL do not): less at the
			// mercy of a shared machine's load than tps.
			b.ReportMetric(float64(cpu.Microseconds())/float64(max(txns, 1)), "gate-cpu-µs/txn")
		})
	}
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

var tpsRE = regexp.MustCompile(`tps = ([0-9.]+)`)

// cpuTime is this process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var txnsRE = regexp.MustCompile(`number of transactions actually processed: ([0-9]+)`)

// runPgbench returns pgbench's tps and transactions.
func runPgbench(b *testing.B, url, mode, script string, clients, secs int) (float64, int64) {
	b.Helper()
	args := []string{"-n", "-M", mode, "-c", strconv.Itoa(clients), "-j", "2", "-T", strconv.Itoa(secs)}
	if script != "" {
		args = append(args, script)
	}
	cmd := exec.Command(pgtest.Bin("pgbench"), append(args, url)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		b.Fatalf("pgbench %v: %v\n%s", args, err, out.String())
	}
	m := tpsRE.FindStringSubmatch(out.String())
	if m == nil || strings.Contains(out.String(), "number of failed transactions: ") && !strings.Contains(out.String(), "number of failed transactions: 0 ") {
		b.Fatalf("pgbench %v:\n%s", args, out.String())
	}
	tps, _ := strconv.ParseFloat(m[1], 64)
	var n int64
	if m := txnsRE.FindStringSubmatch(out.String()); m != nil {
		n, _ = strconv.ParseInt(m[1], 10, 64)
	}
	return tps, n
}

// BenchmarkStatementPath is the gate's own CPU for one statement of
// pgbench's TPC-B UPDATE as a session on the event loop handles it,
// without sockets or a server: the client's messages framed, decoded and
// dispatched, the upstream's answers relayed, and the statement's ledger
// record written by the recorder (SQLite in a temporary directory). The
// machine's scatter drowns a few µs per transaction in pgbench's tps;
// here they show. cpu-ns/op is this process's user and system time per
// statement, the recorder's goroutine included.
//
//   - prepared: Bind, Execute and Sync of a prepared statement;
//   - simple: a Query with other literals each time (pgbench -M simple),
//     looked up by the loop (cachedVerdict) before it is dispatched, as
//     loopSession.inline does; the gate's per-statement work that the
//     prepared protocol does not have (the text's shape, a text per
//     statement in the record).
func BenchmarkStatementPath(b *testing.B) {
	e := startGate(b, &pgtest.Server{Port: 1}, func(c *Config) {
		pc, err := policy.Parse(fmt.Appendf(nil, benchPolicy, 1, 1), "bench.yaml")
		if err != nil {
			b.Fatal(err)
		}
		c.Policy, c.RecordReads = pc, false
	})
	newSession := func(id string) *session {
		s := &session{g: e.g, id: id, user: state.User{Name: "alice", Groups: []string{"ops"}}, dbName: "bench",
			stmts: map[string]*prepared{}, portals: map[string]*prepared{}, counts: map[string]int{}}
		s.db = e.g.dbs["bench"]
		s.recent = classify.NewRecent(s.db.cache, s.decision)
		s.fe = pgproto3.NewFrontend(nil, io.Discard)
		s.r = &relay{s: s, wr: bufio.NewWriterSize(io.Discard, 64<<10), done: make(chan struct{})}
		return s
	}
	run := func(b *testing.B, s *session, ins [][]byte, out []backendMsg, lookup bool) {
		var dec decoders
		statement := func(in []byte) {
			for off := 0; off < len(in); {
				typ, body, size, _ := frame(in[off:], 1<<20)
				m := dec.decode(typ, body)
				if q, ok := m.(*pgproto3.Query); ok && lookup {
					if _, ok := s.cachedVerdict(q.String); !ok {
						// The loop would classify it on a goroutine; the
						// bench measures the cached path only.
						s.judgeNow(q.String)
					}
				}
				if why := s.dispatch(m); why != "" {
					b.Fatal(why)
				}
				off += size
			}
			for _, m := range out {
				if err := s.r.message(m.typ, m.body); err != nil {
					b.Fatal(err)
				}
			}
			s.r.wr.Flush()
		}
		statement(ins[0]) // the session's first record of the statement
		e.g.rec.flush()
		b.ReportAllocs()
		b.ResetTimer()
		c0 := cpuTime()
		for i := range b.N {
			statement(ins[i%len(ins)])
		}
		e.g.rec.flush()
		b.StopTimer()
		b.ReportMetric(float64(cpuTime()-c0)/float64(b.N), "cpu-ns/op")
		if s.r.busy() {
			b.Fatal("the relay still waits for answers")
		}
	}

	b.Run("prepared", func(b *testing.B) {
		s := newSession("bench-prepared")
		const sql = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"
		v := s.judgeNow(sql)
		if v.dec.Action != actAllow {
			b.Fatalf("%s: %+v, want allowed", sql, v.dec)
		}
		s.stmts["P0_1"] = &prepared{sql: sql, v: v}
		in, _ := (&pgproto3.Bind{PreparedStatement: "P0_1", ParameterFormatCodes: []int16{0, 0},
			Parameters: [][]byte{[]byte("-1234"), []byte("734512")}, ResultFormatCodes: []int16{}}).Encode(nil)
		in, _ = (&pgproto3.Execute{}).Encode(in)
		in, _ = (&pgproto3.Sync{}).Encode(in)
		run(b, s, [][]byte{in}, []backendMsg{{'2', nil}, {'C', []byte("UPDATE 1\x00")}, {'Z', []byte("T")}}, false)
	})

	b.Run("simple", func(b *testing.B) {
		s := newSession("bench-simple")
		ins := make([][]byte, 1024)
		for i := range ins {
			// Deltas of both signs, as pgbench's: two shapes ("+ -?" too).
			sql := fmt.Sprintf("UPDATE pgbench_accounts SET abalance = abalance + %d WHERE aid = %d;", i*37%10001-5000, 1+i*7919%1000000)
			ins[i], _ = (&pgproto3.Query{String: sql}).Encode(nil)
		}
		_, miss0 := s.db.cache.Stats()
		run(b, s, ins, []backendMsg{{'C', []byte("UPDATE 1\x00")}, {'Z', []byte("T")}}, true)
		// Parsed once per shape (two), not once per statement.
		if _, miss := s.db.cache.Stats(); miss-miss0 > 2 {
			b.Fatalf("%d statements classified anew, want at most 2", miss-miss0)
		}
	})
}

// backendMsg is one message of the upstream's answer.
type backendMsg struct {
	typ  byte
	body []byte
}
