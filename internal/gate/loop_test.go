package gate

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/evloop"
)

// TestEventLoop checks what only the event loop does: sessions stay on it
// through large results and COPY, a slow client holds back only its own
// session, a hold in the middle of a pipelined batch leaves the loop
// without losing or reordering a message, and a client that vanishes, an
// oversized message and a closing gate end loop sessions as they end
// goroutine ones.
func TestEventLoop(t *testing.T) {
	for _, b := range loopBackends(t) {
		t.Run(b.String(), func(t *testing.T) { testEventLoop(t, b) })
	}
}

// loopBackends returns the event loop's backends this kernel has.
func loopBackends(t *testing.T) []evloop.Backend {
	l, err := evloop.NewBackend(evloop.IOURing)
	if err != nil {
		t.Logf("on epoll only: %v", err)
		return []evloop.Backend{evloop.Epoll}
	}
	go l.Run()
	l.Stop()
	return []evloop.Backend{evloop.Epoll, evloop.IOURing}
}

func testEventLoop(t *testing.T, b evloop.Backend) {
	e := newEnv(t, func(c *Config) { c.MaxMessageSize = 1 << 20; c.LoopBackend = b })
	if len(e.g.loops) == 0 {
		t.Fatal("no event loop by default")
	}
	for _, lp := range e.g.loops {
		if got := lp.l.Backend(); got != b {
			t.Fatalf("event loop on %s, want %s", got, b)
		}
		if lp.l.CPU() < 0 {
			t.Error("the event loop is not pinned to a CPU by default")
		}
	}
	ctx := ctxT(t, 3*time.Minute)
	c := e.connect("shop")
	if _, err := c.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}
	onLoop := func(t *testing.T, entered, escaped int64) {
		t.Helper()
		if en, esc, _ := e.g.loopCounts(); en != entered || esc != escaped {
			t.Fatalf("%d sessions went on the event loops (want %d), %d left them early (want %d)", en, entered, esc, escaped)
		}
	}

	t.Run("COPY in and large results stay on the loop", func(t *testing.T) {
		var in bytes.Buffer
		for i := range 50000 {
			fmt.Fprintf(&in, "%d\t%s\n", i, strings.Repeat("v", 80)) // ~4.5 MiB
		}
		tag, err := c.PgConn().CopyFrom(ctx, &in, "COPY t FROM STDIN")
		if err != nil || tag.RowsAffected() != 50000 {
			t.Fatalf("copy in: %v %v", tag, err)
		}
		var out bytes.Buffer
		tag, err = c.PgConn().CopyTo(ctx, &out, "COPY (SELECT * FROM t ORDER BY id) TO STDOUT")
		if err != nil || tag.RowsAffected() != 50000 || out.Len() < 4<<20 {
			t.Fatalf("copy out: %v %v, %d bytes", tag, err, out.Len())
		}
		rows, err := c.Query(ctx, "SELECT v || $1 FROM t ORDER BY id", strings.Repeat("w", 300))
		if err != nil {
			t.Fatal(err)
		}
		n, size := 0, 0
		for rows.Next() {
			var v string
			if err := rows.Scan(&v); err != nil {
				t.Fatal(err)
			}
			n, size = n+1, size+len(v)
		}
		if rows.Err() != nil || n != 50000 || size != 50000*380 {
			t.Fatalf("large result: %d rows, %d bytes, %v", n, size, rows.Err())
		}
		onLoop(t, 1, 0)
	})

	t.Run("a slow client holds back only its own session", func(t *testing.T) {
		slow := e.connect("shop")
		stalls := func() int64 { _, _, n := e.g.loopCounts(); return n }
		before := stalls()
		// 30 MB that the client does not read for a while: the socket
		// fills, the loop stops reading this session's upstream.
		rows, err := slow.Query(ctx, "SELECT repeat('x', 1000) FROM generate_series(1, 30000)")
		if err != nil {
			t.Fatal(err)
		}
		// More than the sockets' buffers hold: the loop must come to wait
		// for the slow client's socket, however fast it runs. (Checked
		// only after reading, this raced the loop on a loaded machine.)
		waitFor(t, func() bool { return stalls() > before }, "the slow client's output to wait for its socket")
		for range 20 {
			var n int
			if err := c.QueryRow(ctx, "SELECT count(*) FROM t WHERE id < $1", 10).Scan(&n); err != nil || n != 10 {
				t.Fatalf("other session while one is stalled: %d, %v", n, err)
			}
		}
		n := 0
		for rows.Next() {
			n++
		}
		if rows.Err() != nil || n != 30000 {
			t.Fatalf("the slow client got %d rows, %v", n, rows.Err())
		}
		onLoop(t, 2, 0)
	})

	t.Run("a hold mid-batch leaves the loop, nothing lost or reordered", func(t *testing.T) {
		d := e.connect("shop")
		b := &pgx.Batch{}
		b.Queue("INSERT INTO t VALUES (-1, 'first')")
		b.Queue("SELECT count(*) FROM t")
		b.Queue("DELETE FROM t") // destructive: held
		b.Queue("INSERT INTO t VALUES (-2, 'after')")
		heldID(t, d.SendBatch(ctx, b).Close())
		// one implicit transaction: the refused statement failed it whole
		if n := count(t, e.srv, "shop", "t WHERE id < 0"); n != 0 {
			t.Fatalf("%d rows of the refused batch committed", n)
		}
		onLoop(t, 3, 1)
		// off the loop, the session goes on as before
		b = &pgx.Batch{}
		for i := range 5 {
			b.Queue("SELECT $1::int", i)
		}
		br := d.SendBatch(ctx, b)
		for i := range 5 {
			var got int
			if err := br.QueryRow().Scan(&got); err != nil || got != i {
				t.Fatalf("batch after the hold: %d, %v", got, err)
			}
		}
		if err := br.Close(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a statement seen for the first time is classified off the loop", func(t *testing.T) {
		// Unique texts: every one misses the cache, pauses the session
		// while a goroutine classifies it, and carries on in order.
		b := &pgx.Batch{}
		for i := range 50 {
			b.Queue(fmt.Sprintf("SELECT %d AS n%d", i, i))
		}
		br := c.SendBatch(ctx, b)
		for i := range 50 {
			var got int
			if err := br.QueryRow().Scan(&got); err != nil || got != i {
				t.Fatalf("statement %d: %d, %v", i, got, err)
			}
		}
		if err := br.Close(); err != nil {
			t.Fatal(err)
		}
		onLoop(t, 3, 1)
	})

	t.Run("TLS sessions on the loop, and off it after a hold", func(t *testing.T) {
		x, err := pgx.Connect(ctx, e.url("alice", alicePW, "shop", "require"))
		if err != nil {
			t.Fatal(err)
		}
		defer x.Close(ctx)
		if !x.PgConn().Conn().(interface{ ConnectionState() tls.ConnectionState }).ConnectionState().HandshakeComplete {
			t.Fatal("not TLS")
		}
		var in bytes.Buffer
		for i := range 20000 {
			fmt.Fprintf(&in, "%d\t%s\n", 100000+i, strings.Repeat("t", 200)) // ~4 MiB: many records
		}
		if tag, err := x.PgConn().CopyFrom(ctx, &in, "COPY t FROM STDIN"); err != nil || tag.RowsAffected() != 20000 {
			t.Fatalf("copy in over TLS: %v %v", tag, err)
		}
		var n, size int
		if err := x.QueryRow(ctx, "SELECT count(*), sum(length(v)) FROM t WHERE id >= $1", 100000).Scan(&n, &size); err != nil || n != 20000 || size != 20000*200 {
			t.Fatalf("over TLS: %d rows, %d bytes, %v", n, size, err)
		}
		var out bytes.Buffer
		if tag, err := x.PgConn().CopyTo(ctx, &out, "COPY (SELECT * FROM t WHERE id >= 100000) TO STDOUT"); err != nil || tag.RowsAffected() != 20000 {
			t.Fatalf("copy out over TLS: %v %v", tag, err)
		}
		onLoop(t, 4, 1)
		_, err = x.Exec(ctx, "DELETE FROM t WHERE true")
		heldID(t, err)
		onLoop(t, 4, 2)
		// off the loop, the same TLS connection carries on
		if err := x.QueryRow(ctx, "SELECT count(*) FROM t WHERE id >= $1", 100000).Scan(&n); err != nil || n != 20000 {
			t.Fatalf("over TLS after the hold: %d, %v", n, err)
		}
	})

	t.Run("a client that vanishes mid-query has its query cancelled", func(t *testing.T) {
		pc, err := pgconn.Connect(ctx, e.url("alice", alicePW, "shop", "disable"))
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			pc.Exec(ctx, "SELECT pg_sleep(60) AS vanishing").ReadAll()
			close(done)
		}()
		running := "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(60) AS vanishing%' AND state = 'active'"
		waitFor(t, func() bool { return e.srv.Query("postgres", running) == "1" }, "the query to run upstream")
		onLoop(t, 5, 2)
		pc.Conn().Close()
		<-done
		waitFor(t, func() bool { return e.srv.Query("postgres", running) == "0" }, "the vanished client's query to be cancelled")
	})

	t.Run("an oversized message ends its session only", func(t *testing.T) {
		big := e.connect("shop")
		_, err := big.Exec(ctx, "SELECT '"+strings.Repeat("x", 2<<20)+"'")
		var pe *pgconn.PgError
		if err == nil || (errors.As(err, &pe) && pe.Code != "08P01") {
			t.Fatalf("a 2 MiB query through a 1 MiB limit: %v", err)
		}
		var n int
		if err := c.QueryRow(ctx, "SELECT count(*) FROM t WHERE id < 100000").Scan(&n); err != nil || n != 50000 {
			t.Fatalf("other session after the oversized one: %d, %v", n, err)
		}
	})

	t.Run("a client reset while its session is not read ends the session", func(t *testing.T) {
		pc, err := pgconn.Connect(ctx, e.url("alice", alicePW, "shop", "disable"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pc.Exec(ctx, "SELECT 1").ReadAll(); err != nil {
			t.Fatal(err)
		}
		before, _ := e.g.Sessions("alice")
		// Stop reading the client, as while its next statement is being
		// classified: epoll still reports the reset, every round.
		paused := make(chan bool, len(e.g.loops))
		for _, lp := range e.g.loops {
			lp.l.Submit(func() {
				for ls := range lp.sessions {
					if ls.s.pid == pc.PID() {
						ls.paused = true
						ls.settle()
						paused <- true
						return
					}
				}
				paused <- false
			})
		}
		found := false
		for range e.g.loops {
			found = <-paused || found
		}
		if !found {
			t.Fatal("the session is not on a loop")
		}
		pc.Conn().(*net.TCPConn).SetLinger(0)
		pc.Conn().Close() // RST
		waitFor(t, func() bool { n, _ := e.g.Sessions("alice"); return n == before-1 }, "the reset session to end")
	})

	t.Run("sessions are spread over the loops", func(t *testing.T) {
		e3 := startGate(t, e.srv, func(c *Config) { c.Loops = 3; c.LoopBackend = b })
		if len(e3.g.loops) != 3 {
			t.Fatalf("%d event loops, want 3", len(e3.g.loops))
		}
		var conns []*pgx.Conn
		for range 6 {
			x := e3.connect("shop")
			if _, err := x.Exec(ctx, "SELECT 1"); err != nil {
				t.Fatal(err)
			}
			conns = append(conns, x)
		}
		for i, lp := range e3.g.loops {
			if n := lp.entered.Load(); n != 2 {
				t.Errorf("loop %d has %d sessions, want 2 (the least busy loop takes the next)", i, n)
			}
		}
		// Every session answers its own query while the others run theirs.
		var wg sync.WaitGroup
		errs := make(chan error, len(conns))
		for i, x := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := range 50 {
					var got int
					if err := x.QueryRow(ctx, "SELECT $1::int * 1000 + $2::int", i, j).Scan(&got); err != nil || got != i*1000+j {
						errs <- fmt.Errorf("session %d query %d: %d, %v", i, j, got, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		// A session leaves whichever loop it is on, and its loop counts it
		// out: the next session goes to the loop it left.
		last := conns[len(conns)-1]
		if tag, err := last.Exec(ctx, "UPDATE t SET v = v WHERE id = 1"); err != nil || tag.RowsAffected() != 1 {
			t.Fatalf("guarded update: %v %v", tag, err)
		}
		if _, escaped, _ := e3.g.loopCounts(); escaped != 1 {
			t.Fatalf("%d sessions left the loops, want 1", escaped)
		}
		var left *loopState
		for _, lp := range e3.g.loops {
			if lp.active.Load() == 1 {
				left = lp
			}
		}
		if left == nil {
			t.Fatal("no loop counted the session that left it out")
		}
		x := e3.connect("shop")
		if _, err := x.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		if n := left.active.Load(); n != 2 {
			t.Fatalf("the next session went elsewhere: the loop it left has %d sessions", n)
		}
		for _, c := range append(conns, x) {
			c.Close(ctx)
		}
		waitFor(t, func() bool {
			for _, lp := range e3.g.loops {
				if lp.active.Load() != 0 {
					return false
				}
			}
			return true
		}, "every loop to count its sessions out")
	})

	t.Run("closing the gate ends the sessions on the loop", func(t *testing.T) {
		e2 := startGate(t, e.srv, nil)
		x := e2.connect("shop")
		if _, err := x.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		if entered, _, _ := e2.g.loopCounts(); entered != 1 {
			t.Fatalf("%d sessions on the second gate's loops", entered)
		}
		if err := e2.g.Close(ctxT(t, 30*time.Second)); err != nil {
			t.Fatalf("close with a session on the loop: %v", err)
		}
		if _, err := x.Exec(ctx, "SELECT 1"); err == nil {
			t.Fatal("a session outlived its gate")
		}
	})
}

// TestCloseWhileLeavingLoop closes gates while TLS sessions are being
// handed between the event loop and their goroutines (a first statement,
// then a hold), where closing the client from outside once raced with the
// hand-over of its TLS transport. Run with -race.
// TestLoopCPUs checks which CPUs the loops are pinned to for each
// setting of event_loop_cpus, against the CPUs this test may run on.
func TestLoopCPUs(t *testing.T) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	var allowed []int
	for cpu := range 1024 {
		if set.IsSet(cpu) {
			allowed = append(allowed, cpu)
		}
	}
	last := allowed[len(allowed)-1]
	tests := []struct {
		name string
		cfg  Config
		want []int
		err  string
	}{
		{"auto", Config{}, allowed, ""},
		{"none", Config{NoLoopPin: true, LoopCPUs: []int{last}}, nil, ""},
		{"given", Config{LoopCPUs: []int{last, last}}, []int{last, last}, ""},
		{"not allowed", Config{LoopCPUs: []int{last, 1023}}, nil, "event_loop_cpus: CPU 1023 is not one the gate may run on (" + cpuList(allowed) + ")"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.err != "" && set.IsSet(1023) {
				t.Skip("this machine has CPU 1023")
			}
			got, err := loopCPUs(tc.cfg)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("loopCPUs = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	for in, want := range map[string]string{"0": "0", "0 1 2 3": "0-3", "0 2 3 6": "0,2-3,6", "1 3": "1,3", "": ""} {
		var cpus []int
		for _, f := range strings.Fields(in) {
			n, _ := strconv.Atoi(f)
			cpus = append(cpus, n)
		}
		if got := cpuList(cpus); got != want {
			t.Errorf("cpuList(%v) = %q, want %q", cpus, got, want)
		}
	}
}

func TestCloseWhileLeavingLoop(t *testing.T) {
	e := newEnv(t, nil)
	e.srv.Exec("shop", "CREATE TABLE t (x int)")
	ctx := ctxT(t, 3*time.Minute)
	for round := range 4 {
		e2 := startGate(t, e.srv, nil)
		var wg sync.WaitGroup
		started := make(chan struct{}, 64)
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					x, err := pgx.Connect(ctx, e2.url("alice", alicePW, "shop", "require"))
					if err != nil {
						return // the gate has closed
					}
					select {
					case started <- struct{}{}:
					default:
					}
					x.Exec(ctx, "SELECT 1")
					x.Exec(ctx, "DELETE FROM t WHERE true") // held: leaves the loop
					x.Close(ctx)
				}
			}()
		}
		for range 4 + round*4 {
			<-started
		}
		if err := e2.g.Close(ctxT(t, 30*time.Second)); err != nil {
			t.Fatalf("round %d: close: %v", round, err)
		}
		wg.Wait()
		if n, _ := e2.g.Sessions("alice"); n != 0 {
			t.Fatalf("round %d: %d sessions outlived their gate", round, n)
		}
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// FuzzFrames feeds the event loop's framing and decoding of client
// messages arbitrary bytes. Besides not panicking, what the gate forwards
// (the decoded message encoded again) must read back as the same message:
// otherwise the server could run something other than what was judged.
func FuzzFrames(f *testing.F) {
	f.Add(msg('Q', "SELECT 1\x00"))
	f.Add(append(msg('P', "s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"), msg('S', "")...))
	f.Add(msg('B', "\x00s1\x00\x00\x01\x00\x01\x00\x01\x00\x00\x00\x041234\x00\x01\x00\x01"))
	f.Add(msg('E', "\x00\x00\x00\x00\x00"))
	f.Add(msg('d', "1\t2\n"))
	f.Add([]byte{'Q', 0, 0, 0, 3})
	f.Add([]byte{'Q', 0xff, 0xff, 0xff, 0xff, 'x'})
	f.Fuzz(func(t *testing.T, data []byte) {
		off := 0
		for off < len(data) {
			typ, body, size, ok := frame(data[off:], 1<<16)
			if !ok || size == 0 {
				return
			}
			if size < 5 || off+size > len(data) || len(body) != size-5 || typ != data[off] {
				t.Fatalf("frame at %d: type %q, %d-byte body, size %d of %d bytes", off, typ, len(body), size, len(data)-off)
			}
			off += size
			if typ == 'B' {
				sameBind(t, body)
			}
			m := decodeFrontend(typ, body)
			if m == nil {
				continue
			}
			enc, err := m.Encode(nil)
			if err != nil {
				continue // the upstream write fails and ends the session
			}
			typ2, body2, size2, ok := frame(enc, math.MaxInt32)
			if !ok || size2 != len(enc) || typ2 != typ {
				t.Fatalf("%T encodes to an unreadable frame", m)
			}
			m2 := decodeFrontend(typ2, body2)
			if m2 == nil {
				t.Fatalf("%T as forwarded does not decode", m)
			}
			enc2, err := m2.Encode(nil)
			if err != nil || !bytes.Equal(enc, enc2) {
				t.Fatalf("%T reads back differently: %q then %q (%v)", m, enc, enc2, err)
			}
		}
	})
}

// sameBind checks the loop's Bind against pgproto3's: both accept body or
// neither, with the same names, and the loop forwards what encoding
// pgproto3's would.
func sameBind(t *testing.T, body []byte) {
	t.Helper()
	var raw rawBind
	var pb pgproto3.Bind
	rawErr, pbErr := raw.Decode(body), pb.Decode(body)
	if (rawErr == nil) != (pbErr == nil) {
		t.Fatalf("Bind %q: the loop's decoder says %v, pgproto3's %v", body, rawErr, pbErr)
	}
	if rawErr != nil {
		return
	}
	if raw.portal != pb.DestinationPortal || string(raw.stmt) != pb.PreparedStatement {
		t.Fatalf("Bind %q: names %q %q, pgproto3 %q %q", body, raw.portal, raw.stmt, pb.DestinationPortal, pb.PreparedStatement)
	}
	want, err := pb.Encode(nil)
	if err != nil {
		return
	}
	if got, _ := raw.Encode(nil); !bytes.Equal(got, want) {
		t.Fatalf("Bind %q: the loop forwards %q, pgproto3 would %q", body, got, want)
	}
}
