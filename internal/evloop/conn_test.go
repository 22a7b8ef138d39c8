package evloop_test

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/evloop"
)

// relay moves bytes between sockets a and b on the loop as the gate does:
// AddConn, Read, Flush, and a side read only while what it sent the other
// side is flushed (a reader that does not read holds its writer back).
type relay struct {
	l          *evloop.Loop
	a, b       int
	aout, bout evloop.Out // to a, to b
	aev, bev   uint32
	buf        []byte
	eof        [2]bool
	err        error
	ended      chan struct{} // closed on an error
}

func newRelay(t *testing.T, l *evloop.Loop, a, b int) *relay {
	t.Helper()
	r := &relay{l: l, a: a, b: b, aev: evloop.Readable, bev: evloop.Readable, buf: make([]byte, 8<<10), ended: make(chan struct{})}
	mustRun(t, l, func() error {
		if err := l.AddConn(a, r, r.aev); err != nil {
			return err
		}
		return l.AddConn(b, r, r.bev)
	})
	return r
}

func (r *relay) fail(err error) {
	if r.err == nil {
		r.err = err
		close(r.ended)
	}
}

func (r *relay) Ready(fd int, events uint32) {
	if r.err != nil {
		return
	}
	if fd == r.a && r.bout.Pending() == 0 {
		r.move(r.a, &r.bout, 0)
	}
	if fd == r.b && r.aout.Pending() == 0 {
		r.move(r.b, &r.aout, 1)
	}
	r.settle()
}

func (r *relay) move(from int, to *evloop.Out, side int) {
	n, err := r.l.Read(from, r.buf)
	switch {
	case err == nil:
		to.Write(r.buf[:n])
	case errors.Is(err, syscall.EAGAIN):
	case err == io.EOF:
		r.eof[side] = true
	default:
		r.fail(err)
	}
}

func (r *relay) settle() {
	if r.err != nil {
		return
	}
	for _, o := range []struct {
		fd  int
		out *evloop.Out
	}{{r.a, &r.aout}, {r.b, &r.bout}} {
		if o.out.Pending() > 0 {
			if _, err := r.l.Flush(o.fd, o.out); err != nil {
				r.fail(err)
				return
			}
		}
	}
	var aev, bev uint32
	if r.bout.Pending() == 0 && !r.eof[0] {
		aev |= evloop.Readable
	}
	if r.aout.Pending() > 0 {
		aev |= evloop.Writable
	}
	if r.aout.Pending() == 0 && !r.eof[1] {
		bev |= evloop.Readable
	}
	if r.bout.Pending() > 0 {
		bev |= evloop.Writable
	}
	if aev != r.aev {
		r.aev = aev
		if err := r.l.Mod(r.a, aev); err != nil {
			r.fail(err)
		}
	}
	if bev != r.bev {
		r.bev = bev
		if err := r.l.Mod(r.b, bev); err != nil {
			r.fail(err)
		}
	}
}

// stream writes data to fd from a goroutine; wait returns its error.
func stream(fd int, data []byte) (wait func() error) {
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		deadline := time.Now().Add(patience)
		for len(data) > 0 && err == nil {
			n, e := unix.Write(fd, data[:min(len(data), 24<<10)])
			switch {
			case e == nil:
				data = data[n:]
			case e == unix.EAGAIN && time.Now().Before(deadline):
				unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}, 50)
			default:
				err = e
			}
		}
	}()
	return func() error { <-done; return err }
}

func TestConnRelay(t *testing.T) {
	const size = 4 << 20
	for _, kind := range socketKinds {
		t.Run(kind.name, func(t *testing.T) {
			l := startLoop(t)
			p1, p2 := kind.pair(t, true), kind.pair(t, true)
			r := newRelay(t, l, p1.b, p2.a)
			up, down := pattern(size, 1), pattern(size, 2)
			w1, w2 := stream(p1.a, up), stream(p2.b, down)
			var got1, got2 []byte
			var err1, err2 error
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); got2, err2 = readN(p2.b, size, patience) }()
			go func() { defer wg.Done(); got1, err1 = readN(p1.a, size, patience) }()
			wg.Wait()
			for _, err := range []error{w1(), w2(), err1, err2} {
				if err != nil {
					t.Fatal(err)
				}
			}
			sameBytes(t, "a to b", got2, up)
			sameBytes(t, "b to a", got1, down)
			noMore(t, p2.b)
			noMore(t, p1.a)

			// An end: the relay reads it (after the data) and stops reading
			// that side.
			closeFd(&p1.a)
			deadline := time.Now().Add(patience)
			for {
				var eof bool
				mustRun(t, l, func() error { eof = r.eof[0]; return r.err })
				if eof {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the relay did not see the client's end")
				}
				time.Sleep(5 * time.Millisecond)
			}
		})
	}
}

// TestConnRelease lets both sockets go while the relay's output waits for
// a reader that does not read, and checks that what the loop hands back
// (received and not read, taken and not sent) completes the stream: no
// byte lost, repeated or out of order.
func TestConnRelease(t *testing.T) {
	const size = 4 << 20
	for _, kind := range socketKinds {
		t.Run(kind.name, func(t *testing.T) {
			l := startLoop(t)
			p1, p2 := kind.pair(t, true), kind.pair(t, true)
			r := newRelay(t, l, p1.b, p2.a)
			data := pattern(size, 3)
			w := stream(p1.a, data)
			time.Sleep(200 * time.Millisecond) // until every buffer on the way is full
			type back struct{ in, out []byte }
			var ra, rb back
			var pending []byte
			done := make(chan struct{})
			mustRun(t, l, func() error {
				n := 2
				fin := func(b *back) func(in, out []byte) {
					return func(in, out []byte) {
						b.in, b.out = in, out
						if n--; n == 0 {
							pending = r.bout.Take()
							close(done)
						}
					}
				}
				if err := l.Release(r.a, fin(&ra)); err != nil {
					return err
				}
				return l.Release(r.b, fin(&rb))
			})
			waitFor(t, done, "the release of both sockets")
			if r.err != nil {
				t.Fatal(r.err)
			}
			// What reached b's reader, then what the loop and the relay
			// still held for b, then what the loop had received from a,
			// then what a's socket still holds.
			var got []byte
			buf := make([]byte, 64<<10)
			for {
				n, err := evloop.Read(p2.b, buf)
				if err != nil {
					break
				}
				got = append(got, buf[:n]...)
			}
			t.Logf("reached b %d, loop's unsent %d, relay's %d, loop's unread from a %d", len(got), len(rb.out), len(pending), len(ra.in))
			if len(ra.out) > 0 || len(rb.in) > 0 {
				t.Errorf("nothing went the other way, yet the loop returned %d bytes for a and %d from b", len(ra.out), len(rb.in))
			}
			got = append(append(append(got, rb.out...), pending...), ra.in...)
			rest, err := readN(p1.b, size-len(got), patience)
			if err != nil {
				t.Fatal(err)
			}
			if err := w(); err != nil {
				t.Fatal(err)
			}
			sameBytes(t, "the stream", append(got, rest...), data)
		})
	}
}

// TestConnStarved has more sockets receive in one round than the io_uring
// backend has buffers: those that find none get their data once buffers
// come back.
func TestConnStarved(t *testing.T) {
	const n, size = 40, 3000
	defer evloop.SetBuffers(4)()
	l := startLoop(t)
	got := map[int][]byte{}
	var mu sync.Mutex
	complete := 0
	buf := make([]byte, 1000)
	h := handlerFunc(func(fd int, _ uint32) {
		k, err := l.Read(fd, buf) // a part at a time: buffers come back late
		if err != nil {
			return
		}
		got[fd] = append(got[fd], buf[:k]...)
		if len(got[fd]) == size {
			mu.Lock()
			complete++
			mu.Unlock()
		}
	})
	var pairs []*pair
	mustRun(t, l, func() error {
		for range n {
			p := newPair(t)
			pairs = append(pairs, p)
			if err := l.AddConn(p.a, h, evloop.Readable); err != nil {
				return err
			}
		}
		return nil
	})
	// Hold the loop while every socket gets its data, so that all of it
	// arrives for one round.
	hold, held := make(chan struct{}), make(chan struct{})
	l.Submit(func() { close(held); <-hold })
	waitFor(t, held, "the loop to be held")
	for i, p := range pairs {
		writeAll(t, p.b, pattern(size, byte(i)))
	}
	close(hold)
	deadline := time.Now().Add(patience)
	for {
		mu.Lock()
		c := complete
		mu.Unlock()
		if c == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d sockets got all their data", c, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	mustRun(t, l, func() error {
		for i, p := range pairs {
			sameBytes(t, "socket's data", got[p.a], pattern(size, byte(i)))
		}
		if l.Backend() == evloop.IOURing && l.NoBuffers() == 0 {
			t.Error("no receive ran out of buffers: the test tests nothing")
		}
		t.Logf("%d receives found no buffer", l.NoBuffers())
		for _, p := range pairs {
			if err := l.Release(p.a, func(in, out []byte) {}); err != nil {
				return err
			}
		}
		return nil
	})
}

// TestConnUnreadHoldsNoBuffer: sockets whose data is not read (their
// handlers stopped reading, as the gate's do while the other side's output
// waits) must not hold the io_uring backend's few buffers, or one client
// per buffer that never reads would stop every other session.
func TestConnUnreadHoldsNoBuffer(t *testing.T) {
	defer evloop.SetBuffers(4)()
	l := startLoop(t)
	const n = 10
	stopped, last := make(chan struct{}, n), make(chan []byte, 1)
	var lastFd int
	buf := make([]byte, 64<<10)
	h := handlerFunc(func(fd int, _ uint32) {
		if fd != lastFd {
			l.Mod(fd, 0) // leave the data unread
			stopped <- struct{}{}
			return
		}
		if k, err := l.Read(fd, buf); err == nil {
			last <- append([]byte(nil), buf[:k]...)
		}
	})
	var pairs []*pair
	mustRun(t, l, func() error {
		for range n + 1 {
			p := newPair(t)
			pairs = append(pairs, p)
			if err := l.AddConn(p.a, h, evloop.Readable); err != nil {
				return err
			}
		}
		lastFd = pairs[n].a
		return nil
	})
	for i, p := range pairs[:n] {
		writeAll(t, p.b, pattern(20000, byte(i)))
		select {
		case <-stopped:
		case <-time.After(patience):
			t.Fatalf("socket %d got nothing while %d others held their data unread", i, i)
		}
	}
	writeAll(t, pairs[n].b, []byte("still served"))
	select {
	case b := <-last:
		if string(b) != "still served" {
			t.Fatalf("got %q", b)
		}
	case <-time.After(patience):
		t.Fatal("a socket got nothing while others held their data unread")
	}
	// The unread data is all still there, in order.
	for i, p := range pairs[:n] {
		var got []byte
		mustRun(t, l, func() error {
			for {
				k, err := l.Read(p.a, buf)
				if err != nil {
					return nil
				}
				got = append(got, buf[:k]...)
			}
		})
		want := pattern(20000, byte(i))
		if !bytes.HasPrefix(want, got) || len(got) == 0 {
			t.Errorf("socket %d: %d unread bytes, not the start of what was sent", i, len(got))
		}
	}
}

// TestConnReset: a peer that resets the connection while the loop sends
// to it surfaces as an error from Flush or Read, not as a hang.
func TestConnReset(t *testing.T) {
	l := startLoop(t)
	p1, p2 := tcpPair(t, 32<<10, 64<<10), tcpPair(t, 32<<10, 64<<10)
	r := newRelay(t, l, p1.b, p2.a)
	w := stream(p1.a, pattern(8<<20, 4))
	time.Sleep(100 * time.Millisecond)
	if err := unix.SetsockoptLinger(p2.b, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		t.Fatal(err)
	}
	closeFd(&p2.b) // RST
	// The relay is stuck on b's output until the reset; then it fails, and
	// a, no longer read, holds the writer back until closed.
	select {
	case <-r.ended:
	case <-time.After(patience):
		t.Fatal("the relay did not notice the reset")
	}
	if !errors.Is(r.err, syscall.ECONNRESET) && !errors.Is(r.err, syscall.EPIPE) {
		t.Errorf("relay error %v, want ECONNRESET or EPIPE", r.err)
	}
	closeFd(&p1.b)
	w()
}
