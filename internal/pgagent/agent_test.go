package pgagent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dualkey/dualkey/internal/pgtest"
	"github.com/dualkey/dualkey/internal/pgwal"
	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/guard"
	"github.com/dualkey/dualkey/internal/vault/repo"
	"github.com/dualkey/dualkey/internal/vault/repo/repotest"
)

// These tests prove what the agent promises (issue 4, point 2) against real
// servers: whatever happens to PostgreSQL, the connection or the vault, the
// vault ends up holding one gap-free run of WAL that reaches the server's
// position, overlapping pieces (if any) agree byte for byte, and the slot
// never lets the server drop WAL the vault does not hold.

// logBuf collects an agent's log for assertions (and for t.Log on failure).
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// runningAgent is an Agent.Run in a goroutine.
type runningAgent struct {
	*Agent
	log    *logBuf
	cancel context.CancelFunc
	done   chan error
}

// runAgent starts an agent on r with quick timings unless opts sets them.
func runAgent(t *testing.T, r *repo.Repository, opts AgentOptions) *runningAgent {
	t.Helper()
	lb := &logBuf{}
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	if opts.Retry == 0 {
		opts.Retry = 50 * time.Millisecond
	}
	if opts.FlushEvery == 0 {
		opts.FlushEvery = 50 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{Agent: NewAgent(r, opts), log: lb, cancel: cancel, done: make(chan error, 1)}
	go func() { ra.done <- ra.Run(ctx) }()
	t.Cleanup(func() {
		ra.stop(t)
		if t.Failed() {
			t.Logf("agent log:\n%s", tailString(lb.String(), 6000))
		}
	})
	return ra
}

func tailString(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// stop cancels the agent and waits for Run to return; a second stop is a
// no-op.
func (ra *runningAgent) stop(t *testing.T) {
	t.Helper()
	ra.cancel()
	select {
	case err, ok := <-ra.done:
		if ok && err != nil {
			t.Errorf("Agent.Run: %v", err)
		}
		if ok {
			close(ra.done)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Agent.Run did not return within 30s of its context ending")
	}
}

// waitDurable waits until the agent reports lsn durable.
func (ra *runningAgent) waitDurable(t *testing.T, lsn pgwal.LSN, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for ra.Status().Durable < lsn {
		if time.Now().After(deadline) {
			t.Fatalf("agent durable at %v after %v, server at %v", ra.Status().Durable, within, lsn)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func currentLSN(t *testing.T, pg *pgtest.Server) pgwal.LSN {
	t.Helper()
	l, err := pgwal.ParseLSN(pg.Query("postgres", "SELECT pg_current_wal_lsn()::text"))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// checkVaultWAL checks what the vault holds of timeline tli: exactly one
// gap-free run, reaching at least want; every whole segment in it
// assembles (pgwal.Segment decrypts every piece touching a segment and
// fails with ErrConflict where overlapping pieces disagree); and, with
// strict, no two pieces cover the same byte. If pg is not nil, each whole
// segment is also compared with the server's own pg_wal file when that is
// still there under its name. It returns the catalog.
func checkVaultWAL(t *testing.T, r *repo.Repository, tli uint32, want pgwal.LSN, strict bool, pg *pgtest.Server) *pgwal.Catalog {
	t.Helper()
	ctx := context.Background()
	cat, err := pgwal.Load(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	if len(cat.Errors) > 0 {
		t.Errorf("catalog errors: %v", cat.Errors)
	}
	runs := cat.Runs(tli)
	if len(runs) != 1 {
		t.Fatalf("vault holds %d runs of timeline %d, want 1 (a gap): %v", len(runs), tli, runs)
	}
	if runs[0].End < want {
		t.Errorf("vault holds timeline %d to %v, server reached %v", tli, runs[0].End, want)
	}
	var overlap int64
	var prev pgwal.Piece
	pieces := 0
	for _, p := range cat.Pieces() {
		if p.History || p.Timeline != tli {
			continue
		}
		if pieces > 0 && p.Start < prev.End {
			overlap += int64(min(p.End, prev.End) - p.Start)
			if strict {
				t.Errorf("pieces overlap: %v and %v", prev, p)
			}
		}
		if pieces == 0 || p.End > prev.End {
			prev = p
		}
		pieces++
	}
	const seg = pgwal.DefaultSegmentSize
	first := pgwal.SegmentOf(runs[0].Start+seg-1, seg) // whole segments only
	last := pgwal.SegmentOf(runs[0].End, seg)          // exclusive
	compared := 0
	for s := first; s < last; s++ {
		got, err := pgwal.Segment(ctx, r, cat, tli, s, seg)
		if err != nil {
			t.Errorf("segment %d: %v", s, err)
			continue
		}
		if pg == nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(pg.Dir, "pg_wal", pgwal.SegmentName(tli, s, seg)))
		if err != nil {
			continue // recycled
		}
		compared++
		if !bytes.Equal(b, got) {
			t.Errorf("segment %s differs from the server's pg_wal file", pgwal.SegmentName(tli, s, seg))
		}
	}
	t.Logf("vault: timeline %d %v in %d pieces (%d bytes overlapping), %d whole segments assembled, %d compared with pg_wal",
		tli, runs[0], pieces, overlap, max(0, int(last)-int(first)), compared)
	return cat
}

// checkSlot checks that the slot's restart_lsn is not past what the vault
// holds: the server may drop WAL behind it.
func checkSlot(t *testing.T, pg *pgtest.Server, slot string, r *repo.Repository, tli uint32) {
	t.Helper()
	var restart *string
	c := pg.Conn("postgres")
	if err := c.QueryRow(context.Background(), "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1", slot).Scan(&restart); err != nil {
		t.Fatalf("slot %s: %v", slot, err)
	}
	c.Close(context.Background())
	cat, err := pgwal.Load(context.Background(), r) // after reading restart_lsn: the vault only grows
	if err != nil {
		t.Fatal(err)
	}
	if restart == nil || cat.End(tli) == 0 {
		return
	}
	l, err := pgwal.ParseLSN(*restart)
	if err != nil {
		t.Fatal(err)
	}
	if l > cat.End(tli) {
		t.Errorf("slot restart_lsn %v is past the end of the vault's WAL %v: the server may drop WAL the vault lacks", l, cat.End(tli))
	}
}

// rowWriter inserts rows into known, one transaction each, until stopped;
// it reconnects when the server goes away (a restart, a crash).
type rowWriter struct {
	committed atomic.Int64 // commits that returned
	failed    atomic.Int64 // statements that failed (server away)
	stop      chan struct{}
	done      chan struct{}
}

func startRowWriter(t *testing.T, url string) *rowWriter {
	t.Helper()
	w := &rowWriter{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		var conn *pgx.Conn
		defer func() {
			if conn != nil {
				conn.Close(context.Background())
			}
		}()
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(2 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if conn == nil || conn.IsClosed() {
				var err error
				if conn, err = pgx.Connect(ctx, url); err != nil {
					conn = nil
					cancel()
					time.Sleep(50 * time.Millisecond)
					continue
				}
			}
			_, err := conn.Exec(ctx, "INSERT INTO known (v) VALUES (md5(random()::text))")
			cancel()
			if err != nil {
				w.failed.Add(1)
				conn.Close(context.Background())
				conn = nil
				continue
			}
			w.committed.Add(1)
		}
	}()
	t.Cleanup(w.finish)
	return w
}

func (w *rowWriter) finish() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
}

// waitRows waits until the writer committed n more rows than now.
func (w *rowWriter) waitRows(t *testing.T, n int64) {
	t.Helper()
	want := w.committed.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for w.committed.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("writer committed %d rows, want %d", w.committed.Load(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const knownTable = "CREATE TABLE known (id bigserial PRIMARY KEY, v text, at timestamptz NOT NULL DEFAULT clock_timestamp())"

// TestAgentPostgresRestart restarts PostgreSQL cleanly and then crashes it
// (immediate stop: no checkpoint, as a power cut) while rows are inserted
// continuously: the agent reconnects each time and the vault holds the
// WAL without a gap, byte-identical to the server's own files.
func TestAgentPostgresRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTable)
	env := repotest.New(t, 0)
	ag := runAgent(t, env.Repo, AgentOptions{URL: pg.URL("postgres"), Slot: "restart_test"})
	w := startRowWriter(t, pg.URL("postgres"))
	w.waitRows(t, 100)
	ag.waitDurable(t, currentLSN(t, pg), 20*time.Second)
	checkSlot(t, pg, "restart_test", env.Repo, 1)

	pg.Restart()
	pg.Exec("postgres", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 50000) g") // > a segment of WAL
	w.waitRows(t, 100)
	checkSlot(t, pg, "restart_test", env.Repo, 1)
	pg.Crash()
	time.Sleep(200 * time.Millisecond) // the agent and writer notice the server is gone
	pg.Start()
	w.waitRows(t, 100)
	checkSlot(t, pg, "restart_test", env.Repo, 1)
	w.finish()
	end := currentLSN(t, pg)
	ag.waitDurable(t, end, 30*time.Second)
	checkSlot(t, pg, "restart_test", env.Repo, 1)
	ag.stop(t)
	if n := strings.Count(ag.log.String(), "WAL stream interrupted"); n < 2 {
		t.Errorf("agent reconnected %d times, want at least 2 (restart and crash)", n)
	}
	checkVaultWAL(t, env.Repo, 1, end, true, pg)
	t.Logf("%d rows committed, %d statements failed while the server was away", w.committed.Load(), w.failed.Load())
}

// TestAgentBrokenConnection terminates the agent's walsender on the server
// three times while rows are inserted: the agent reconnects and resumes
// exactly where the vault ends.
func TestAgentBrokenConnection(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTable)
	env := repotest.New(t, 0)
	ag := runAgent(t, env.Repo, AgentOptions{URL: pg.URL("postgres"), Slot: "broken_test"})
	w := startRowWriter(t, pg.URL("postgres"))
	for i := range 3 {
		w.waitRows(t, 100)
		pg.Exec("postgres", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 20000) g")
		deadline := time.Now().Add(20 * time.Second)
		for pg.Query("postgres", "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'broken_test' AND state = 'streaming'") != "1" {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: the agent is not streaming", i)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if got := pg.Query("postgres", "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = 'broken_test'"); got != "1" {
			t.Fatalf("terminated %s walsenders", got)
		}
		checkSlot(t, pg, "broken_test", env.Repo, 1)
	}
	w.waitRows(t, 100)
	w.finish()
	end := currentLSN(t, pg)
	ag.waitDurable(t, end, 30*time.Second)
	checkSlot(t, pg, "broken_test", env.Repo, 1)
	ag.stop(t)
	if n := strings.Count(ag.log.String(), "WAL stream interrupted"); n < 3 {
		t.Errorf("agent reconnected %d times, want 3", n)
	}
	checkVaultWAL(t, env.Repo, 1, end, true, pg)
}

// TestAgentSynchronous runs the agent as a synchronous standby: every
// commit that returned is already durable in the vault, and with the agent
// stopped a commit does not return.
func TestAgentSynchronous(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	ctx := context.Background()
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTable)
	env := repotest.New(t, 0)
	// A long FlushEvery: only synchronous mode may make commits durable fast.
	ag := runAgent(t, env.Repo, AgentOptions{URL: pg.URL("postgres"), Slot: "sync_test", Synchronous: true, FlushEvery: 5 * time.Second})
	t.Cleanup(func() {
		if pg.Running() {
			pg.Exec("postgres", "ALTER SYSTEM RESET synchronous_standby_names")
			pg.Exec("postgres", "SELECT pg_reload_conf()")
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for pg.Query("postgres", "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'sync_test' AND sync_state = 'sync'") != "1" {
		if time.Now().After(deadline) {
			t.Fatal("the agent is not a synchronous standby after 20s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if names := pg.Query("postgres", "SHOW synchronous_standby_names"); !strings.Contains(names, "sync_test") {
		t.Fatalf("synchronous_standby_names = %q", names)
	}

	c := pg.Conn("postgres")
	const n = 100
	late := 0
	t0 := time.Now()
	for i := range n {
		if _, err := c.Exec(ctx, "INSERT INTO known (v) VALUES ($1)", strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		// The commit returned: its WAL, which ends at or before the write
		// position now (nothing else writes), must be in the vault already.
		var s string
		if err := c.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&s); err != nil {
			t.Fatal(err)
		}
		lsn, _ := pgwal.ParseLSN(s)
		if d := ag.Status().Durable; d < lsn {
			late++
			t.Logf("commit %d returned at %v but the vault holds only %v", i, lsn, d)
		}
	}
	t.Logf("%d synchronous commits in %v (%v each)", n, time.Since(t0).Round(time.Millisecond), (time.Since(t0) / n).Round(time.Microsecond))
	if late > 0 {
		t.Errorf("%d of %d commits returned before the vault held them", late, n)
	}

	// With the agent stopped, a commit waits for it.
	ag.stop(t)
	c2 := pg.Conn("postgres")
	tctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	defer cancel()
	t1 := time.Now()
	_, err := c2.Exec(tctx, "INSERT INTO known (v) VALUES ('while the agent is away')")
	if err == nil {
		t.Fatalf("a commit returned after %v with no synchronous standby", time.Since(t1))
	}
	if !errors.Is(err, context.DeadlineExceeded) && tctx.Err() == nil {
		t.Fatalf("commit failed with %v, want it to wait", err)
	}
	t.Logf("with the agent stopped the commit waited %v until cancelled", time.Since(t1).Round(time.Millisecond))
	checkVaultWAL(t, env.Repo, 1, 0, true, pg)
}

// failingStore is a vault store that refuses every write and listing while
// down is set: an unreachable vault.
type failingStore struct {
	repo.Store
	down atomic.Bool
}

var errVaultDown = errors.New("test: vault unreachable")

func (s *failingStore) Save(ctx context.Context, h backend.Handle, data []byte) error {
	if s.down.Load() {
		return errVaultDown
	}
	return s.Store.Save(ctx, h, data)
}

func (s *failingStore) List(ctx context.Context, t backend.Type, fn func(backend.Info) error) error {
	if s.down.Load() {
		return errVaultDown
	}
	return s.Store.List(ctx, t, fn)
}

// TestAgentRetainWarning makes the vault unreachable while the server keeps
// writing: the slot keeps the WAL, and once it holds more than RetainWarn
// the agent says so, and why. When the vault is back, it catches up.
func TestAgentRetainWarning(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL")
	}
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", knownTable)
	env := repotest.New(t, 0)
	fs := &failingStore{Store: env.Store.Session(guard.Admin)}
	r, err := repo.Open(context.Background(), fs, repotest.Password, repotest.Options())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ag := runAgent(t, r, AgentOptions{URL: pg.URL("postgres"), Slot: "retain_test",
		RetainWarn: 2 << 20, CheckEvery: 100 * time.Millisecond, Retry: 100 * time.Millisecond})
	// The agent first catches up with the WAL the slot kept since its
	// creation (initdb's, a few MiB: more than this test's threshold).
	ag.waitDurable(t, currentLSN(t, pg), 20*time.Second)
	caughtUp := len(ag.log.String())
	pg.Exec("postgres", "INSERT INTO known (v) SELECT md5(g::text) FROM generate_series(1, 100) g")
	ag.waitDurable(t, currentLSN(t, pg), 20*time.Second)
	time.Sleep(300 * time.Millisecond) // three checks
	if strings.Contains(ag.log.String()[caughtUp:], "holds more WAL than the threshold") {
		t.Fatal("warned while the vault kept up")
	}

	// The vault goes away; wait until the agent has noticed (its stream
	// failed), as it would in an outage of more than a moment.
	fs.down.Store(true)
	pg.Exec("postgres", "INSERT INTO known (v) SELECT md5(g::text) FROM generate_series(1, 100) g")
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(ag.log.String(), errVaultDown.Error()) {
		if time.Now().After(deadline) {
			t.Fatal("the agent did not notice the vault was down")
		}
		time.Sleep(20 * time.Millisecond)
	}
	mark := len(ag.log.String())
	pg.Exec("postgres", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 30000) g") // ~13 MiB of WAL
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(ag.log.String()[mark:], "holds more WAL than the threshold") {
		if time.Now().After(deadline) {
			t.Fatal("no warning 10s after the slot passed the threshold with the vault down")
		}
		time.Sleep(50 * time.Millisecond)
	}
	var warning string
	for _, line := range strings.Split(ag.log.String()[mark:], "\n") {
		if strings.Contains(line, "holds more WAL than the threshold") {
			warning = line
			break
		}
	}
	t.Logf("warning: %s", warning)
	for _, want := range []string{"retained_bytes=", "threshold=2097152", errVaultDown.Error()} {
		if !strings.Contains(warning, want) {
			t.Errorf("the warning lacks %q", want)
		}
	}
	checkSlot(t, pg, "retain_test", env.Repo, 1)

	fs.down.Store(false)
	end := currentLSN(t, pg)
	ag.waitDurable(t, end, 30*time.Second)
	ag.stop(t)
	checkVaultWAL(t, env.Repo, 1, end, true, nil)
}

// TestAgentTimelineSwitch: the agent streams a primary; it is stopped, the
// primary writes more (the standby receives it, the vault does not), the
// primary goes away and its standby is promoted. A new agent run on the
// promoted server stores timeline 2's history, fills in the end of
// timeline 1 from the promoted server, and streams timeline 2; a restore
// of the latest state from the vault equals the promoted server.
func TestAgentTimelineSwitch(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL servers and restores")
	}
	ctx := context.Background()
	v := newPGVault(t)
	pg := pgtest.Start(t, pgtest.Options{})
	pg.Exec("postgres", "CREATE DATABASE app")
	pg.Exec("app", knownTable)
	standby := pg.StartStandby(t)

	ag := runAgent(t, v.r, AgentOptions{URL: pg.URL("postgres"), Slot: "tl_test"})
	if _, err := BaseBackup(ctx, v.r, pg.ReplicationURL(), BaseBackupOptions{}); err != nil {
		t.Fatal(err)
	}
	w := startRowWriter(t, pg.URL("app"))
	w.waitRows(t, 200)
	ag.waitDurable(t, currentLSN(t, pg), 20*time.Second)
	ag.stop(t)
	// More than a segment the standby receives and the vault does not.
	pg.Exec("app", "INSERT INTO known (v) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 50000) g")
	w.waitRows(t, 200)
	w.finish()
	pg.Stop() // the standby receives the shutdown checkpoint
	rows := standby.Query("app", "SELECT count(*) FROM known")
	if got := standby.Query("postgres", "SELECT pg_promote()"); got != "true" {
		t.Fatalf("pg_promote() = %s", got)
	}
	standby.Exec("app", "INSERT INTO known (v) SELECT md5(g::text) FROM generate_series(1, 500) g")

	ag2 := runAgent(t, v.r, AgentOptions{URL: standby.URL("postgres"), Slot: "tl_test"})
	end := currentLSN(t, standby)
	deadline := time.Now().Add(30 * time.Second)
	for st := ag2.Status(); st.Timeline != 2 || st.Durable < end; st = ag2.Status() {
		if time.Now().After(deadline) {
			t.Fatalf("agent on the promoted server: %+v, server at %v on timeline 2", st, end)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ag2.stop(t)
	cat := checkVaultWAL(t, v.r, 2, end, true, standby)
	h, err := cat.History(ctx, 2)
	if err != nil {
		t.Fatalf("history of timeline 2: %v", err)
	}
	sw, err := pgwal.ParseHistory(h)
	if err != nil || len(sw) != 1 || sw[0].Timeline != 1 {
		t.Fatalf("history of timeline 2: %v %q", err, h)
	}
	if runs := cat.Runs(1); len(runs) != 1 || runs[0].End < sw[0].End {
		t.Errorf("timeline 1 in the vault: %v; timeline 2 branched at %v", runs, sw[0].End)
	}
	want := standby.Query("app", "SELECT count(*) FROM known")
	t.Logf("timeline 2 branched at %v; %s rows at the switch, %s now", sw[0].End, rows, want)

	v.readable(t)
	o := v.opts(newTarget(t))
	o.Latest = true
	if _, err := Restore(ctx, v.r, o); err != nil {
		t.Fatal(err)
	}
	srv := pgtest.Attach(t, o.Target)
	srv.Start()
	waitPrimary(t, srv)
	if got := srv.Query("app", "SELECT count(*) FROM known"); got != want {
		t.Errorf("restored latest holds %s rows, the promoted server %s", got, want)
	}
	if tl := srv.Query("postgres", "SELECT timeline_id FROM pg_control_checkpoint()"); tl == "1" {
		t.Errorf("restored server is on timeline %s: it did not follow timeline 2", tl)
	}
}
