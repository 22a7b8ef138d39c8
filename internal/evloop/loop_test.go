package evloop_test

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/evloop"
)

// patience bounds every wait: generous, as it only turns a hang into a
// failure; the tests themselves take milliseconds.
const patience = 5 * time.Second

type handlerFunc func(fd int, events uint32)

func (f handlerFunc) Ready(fd int, events uint32) { f(fd, events) }

// startLoop returns a running loop, stopped when the test ends.
func startLoop(t *testing.T) *evloop.Loop {
	t.Helper()
	l, err := newLoop()
	if err != nil {
		t.Fatal(err)
	}
	go l.Run()
	t.Cleanup(func() {
		stopped := make(chan struct{})
		go func() { l.Stop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(patience):
			t.Error("Stop did not return")
		}
	})
	return l
}

// run runs f on the loop and waits for it.
func run(t *testing.T, l *evloop.Loop, f func() error) error {
	t.Helper()
	done := make(chan struct{})
	var err error
	if !l.Submit(func() { defer close(done); err = f() }) {
		t.Fatal("Submit refused a function on a running loop")
	}
	waitFor(t, done, "a submitted function")
	return err
}

// mustRun runs f on the loop and fails the test if it returns an error.
func mustRun(t *testing.T, l *evloop.Loop, f func() error) {
	t.Helper()
	if err := run(t, l, f); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(patience):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// pair is two connected non-blocking stream sockets, closed when the test
// ends unless closed before (then -1).
type pair struct{ a, b int }

func newPair(t *testing.T) *pair {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{a: fds[0], b: fds[1]}
	t.Cleanup(func() { closeFd(&p.a); closeFd(&p.b) })
	return p
}

// tcpPair returns a connected TCP loopback pair: a dialled with send
// buffer sndbuf, b accepted with receive buffer rcvbuf (0: the defaults).
func tcpPair(t *testing.T, sndbuf, rcvbuf int) *pair {
	t.Helper()
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ln)
	if rcvbuf > 0 {
		if err := unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvbuf); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(ln, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(ln, 1); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(ln)
	if err != nil {
		t.Fatal(err)
	}
	c, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{a: c, b: -1}
	t.Cleanup(func() { closeFd(&p.a); closeFd(&p.b) })
	if sndbuf > 0 {
		if err := unix.SetsockoptInt(c, unix.SOL_SOCKET, unix.SO_SNDBUF, sndbuf); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Connect(c, sa); err != nil {
		t.Fatal(err)
	}
	s, _, err := unix.Accept4(ln, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	p.b = s
	if err := unix.SetNonblock(c, true); err != nil {
		t.Fatal(err)
	}
	return p
}

func closeFd(fd *int) {
	if *fd >= 0 {
		unix.Close(*fd)
		*fd = -1
	}
}

// writeAll writes p to the non-blocking fd (small payloads: one write).
func writeAll(t *testing.T, fd int, p []byte) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for len(p) > 0 {
		n, err := unix.Write(fd, p)
		switch {
		case err == nil:
			p = p[n:]
		case err == unix.EAGAIN && time.Now().Before(deadline):
			unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}, 50)
		default:
			t.Fatalf("write fd %d: %v", fd, err)
		}
	}
}

// sentinel is a socket pair on the loop whose handler signals each time
// it is ready. Events caused before sync's write are reported by epoll
// no later than the sentinel's (the ready list is in order), and sync
// waits for the rest of that round, so after sync every handler that was
// going to be called for them has been called.
type sentinel struct {
	t   *testing.T
	l   *evloop.Loop
	p   *pair
	got chan struct{}
}

func newSentinel(t *testing.T, l *evloop.Loop) *sentinel {
	t.Helper()
	s := &sentinel{t: t, l: l, p: newPair(t), got: make(chan struct{}, 1)}
	buf := make([]byte, 64)
	h := handlerFunc(func(fd int, _ uint32) {
		for {
			if _, err := evloop.Read(fd, buf); err == syscall.EAGAIN {
				break
			} else if err != nil {
				l.Del(fd)
				return
			}
		}
		select {
		case s.got <- struct{}{}:
		default:
		}
	})
	fd := s.p.a
	mustRun(t, l, func() error { return l.Add(fd, h, evloop.Readable) })
	return s
}

func (s *sentinel) sync() {
	s.t.Helper()
	writeAll(s.t, s.p.b, []byte{1})
	waitFor(s.t, s.got, "the sentinel's handler")
	mustRun(s.t, s.l, func() error { return nil })
}

func TestSubmitOrder(t *testing.T) {
	tests := []struct {
		name             string
		goroutines, each int
	}{
		{"one goroutine", 1, 5000},
		{"8 goroutines", 8, 1000},
		{"64 goroutines", 64, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := startLoop(t)
			seen := make([][]int, tc.goroutines) // on the loop only
			var refused atomic.Int64
			start := make(chan struct{})
			var wg sync.WaitGroup
			for g := range tc.goroutines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					for i := range tc.each {
						if !l.Submit(func() { seen[g] = append(seen[g], i) }) {
							refused.Add(1)
						}
					}
				}()
			}
			close(start)
			wg.Wait()
			if n := refused.Load(); n != 0 {
				t.Fatalf("Submit refused %d functions on a running loop", n)
			}
			var got [][]int
			mustRun(t, l, func() error { got = seen; return nil }) // runs after all the others
			for g, s := range got {
				if len(s) != tc.each {
					t.Errorf("goroutine %d: %d of its %d functions ran", g, len(s), tc.each)
				}
				for i, v := range s {
					if v != i {
						t.Errorf("goroutine %d: function %d ran in place %d", g, v, i)
						break
					}
				}
			}
		})
	}
}

func TestSubmitStop(t *testing.T) {
	t.Run("after Stop", func(t *testing.T) {
		l, err := newLoop()
		if err != nil {
			t.Fatal(err)
		}
		go l.Run()
		var ran atomic.Bool
		stopped := make(chan struct{})
		go func() { l.Stop(); close(stopped) }()
		waitFor(t, stopped, "Stop")
		if l.Submit(func() { ran.Store(true) }) {
			t.Error("Submit after Stop returned true")
		}
		again := make(chan struct{})
		go func() { l.Stop(); close(again) }()
		waitFor(t, again, "a second Stop")
		if ran.Load() {
			t.Error("a function submitted after Stop ran")
		}
	})

	t.Run("pending tasks run before Run returns", func(t *testing.T) {
		l, err := newLoop()
		if err != nil {
			t.Fatal(err)
		}
		runDone := make(chan struct{})
		go func() { l.Run(); close(runDone) }()
		entered, release := make(chan struct{}), make(chan struct{})
		l.Submit(func() { close(entered); <-release })
		waitFor(t, entered, "the blocking task")
		var ran []int // on the loop only
		const n = 100
		for i := range n {
			if !l.Submit(func() { ran = append(ran, i) }) {
				t.Fatal("Submit refused before Stop")
			}
		}
		stopped := make(chan struct{})
		go func() { l.Stop(); close(stopped) }()
		waitRefused(t, l)
		select {
		case <-stopped:
			t.Fatal("Stop returned while the loop still ran a task")
		case <-runDone:
			t.Fatal("Run returned while the loop still ran a task")
		default:
		}
		close(release)
		waitFor(t, stopped, "Stop")
		if len(ran) != n {
			t.Fatalf("Stop returned after %d of the %d tasks submitted before it ran", len(ran), n)
		}
		for i, v := range ran {
			if v != i {
				t.Fatalf("task %d ran in place %d", v, i)
			}
		}
		waitFor(t, runDone, "Run to return")
	})

	t.Run("Stop before Run", func(t *testing.T) {
		l, err := newLoop()
		if err != nil {
			t.Fatal(err)
		}
		var ran []int
		for i := range 10 {
			l.Submit(func() { ran = append(ran, i) })
		}
		stopped := make(chan struct{})
		go func() { l.Stop(); close(stopped) }()
		waitRefused(t, l)
		runDone := make(chan struct{})
		go func() { l.Run(); close(runDone) }()
		waitFor(t, runDone, "Run to return")
		waitFor(t, stopped, "Stop")
		if fmt.Sprint(ran) != "[0 1 2 3 4 5 6 7 8 9]" {
			t.Errorf("ran %v", ran)
		}
	})

	t.Run("Submit racing Stop", func(t *testing.T) {
		l, err := newLoop()
		if err != nil {
			t.Fatal(err)
		}
		go l.Run()
		const goroutines, each = 8, 20000
		ran := make([][]bool, goroutines)      // written on the loop
		accepted := make([][]bool, goroutines) // written by goroutine g
		var submitted atomic.Int64
		var wg sync.WaitGroup
		for g := range goroutines {
			ran[g], accepted[g] = make([]bool, each), make([]bool, each)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range each {
					accepted[g][i] = l.Submit(func() { ran[g][i] = true })
					submitted.Add(1)
				}
			}()
		}
		deadline := time.Now().Add(patience)
		for submitted.Load() < 2000 && time.Now().Before(deadline) {
			time.Sleep(100 * time.Microsecond)
		}
		stopped := make(chan struct{})
		go func() { l.Stop(); close(stopped) }()
		waitFor(t, stopped, "Stop")
		wg.Wait()
		var yes, no int
		for g := range goroutines {
			refused := false
			for i := range each {
				if accepted[g][i] {
					yes++
					if refused {
						t.Fatalf("goroutine %d: Submit %d accepted after an earlier one was refused", g, i)
					}
				} else {
					no++
					refused = true
				}
				if ran[g][i] != accepted[g][i] {
					t.Fatalf("goroutine %d, function %d: accepted %v, ran %v", g, i, accepted[g][i], ran[g][i])
				}
			}
		}
		t.Logf("%d accepted (and ran), %d refused (and did not)", yes, no)
	})
}

// waitRefused waits until a concurrent Stop has marked l stopped. The
// probes it submits before then do nothing.
func waitRefused(t *testing.T, l *evloop.Loop) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for l.Submit(func() {}) {
		if time.Now().After(deadline) {
			t.Fatal("Submit still accepted functions long after Stop")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestReadable(t *testing.T) {
	l := startLoop(t)
	p := newPair(t)
	type call struct {
		fd     int
		data   string
		err    error
		events uint32
	}
	calls := make(chan call, 100)
	buf := make([]byte, 1024)
	h := handlerFunc(func(fd int, events uint32) {
		c := call{fd: fd, events: events}
		var got []byte
		for {
			n, err := evloop.Read(fd, buf)
			if err != nil {
				c.err = err
				break
			}
			got = append(got, buf[:n]...)
		}
		c.data = string(got)
		if c.err != syscall.EAGAIN {
			l.Del(fd)
		}
		calls <- c
	})
	fd := p.a
	mustRun(t, l, func() error { return l.Add(fd, h, evloop.Readable) })
	s := newSentinel(t, l)

	steps := []struct {
		name      string
		write     string
		closePeer bool
		want      string
		wantErr   error
		wantEv    uint32
	}{
		{"short", "hello", false, "hello", syscall.EAGAIN, unix.EPOLLIN},
		{"longer than one read", strings.Repeat("0123456789", 500), false, strings.Repeat("0123456789", 500), syscall.EAGAIN, unix.EPOLLIN},
		{"again", "world", false, "world", syscall.EAGAIN, unix.EPOLLIN},
		{"last words, then close", "bye", true, "bye", io.EOF, unix.EPOLLIN | unix.EPOLLRDHUP},
	}
	for _, st := range steps {
		// Hold the loop while the peer acts, so that one call sees it all.
		entered, release := make(chan struct{}), make(chan struct{})
		l.Submit(func() { close(entered); <-release })
		waitFor(t, entered, "the loop to be held")
		writeAll(t, p.b, []byte(st.write))
		if st.closePeer {
			closeFd(&p.b)
		}
		close(release)
		var c call
		select {
		case c = <-calls:
		case <-time.After(patience):
			t.Fatalf("%s: handler not called", st.name)
		}
		if c.fd != fd {
			t.Errorf("%s: handler called with fd %d, want %d", st.name, c.fd, fd)
		}
		if c.data != st.want {
			t.Errorf("%s: read %q, want %q", st.name, c.data, st.want)
		}
		if c.err != st.wantErr {
			t.Errorf("%s: last Read returned %v, want %v", st.name, c.err, st.wantErr)
		}
		if c.events&st.wantEv != st.wantEv {
			t.Errorf("%s: events %#x, want %#x set", st.name, c.events, st.wantEv)
		}
	}
	s.sync()
	if n := len(calls); n != 0 {
		t.Errorf("%d calls after the handler Del'd its fd at EOF: %+v", n, <-calls)
	}
}

func TestLevelTriggered(t *testing.T) {
	payload := []byte(strings.Repeat("abcdefghij", 10))
	for _, chunk := range []int{1, 7, 64, 1000} {
		t.Run(fmt.Sprintf("read %d a call", chunk), func(t *testing.T) {
			l := startLoop(t)
			p := newPair(t)
			var (
				got    []byte // on the loop only
				calls  int
				errs   []error
				signal = make(chan struct{})
			)
			buf := make([]byte, chunk)
			h := handlerFunc(func(fd int, _ uint32) {
				calls++
				n, err := evloop.Read(fd, buf) // once, whatever is left
				if err != nil {
					errs = append(errs, err)
					return
				}
				got = append(got, buf[:n]...)
				if len(got) == len(payload) {
					close(signal)
				}
			})
			fd := p.a
			mustRun(t, l, func() error { return l.Add(fd, h, evloop.Readable) })
			s := newSentinel(t, l)
			writeAll(t, p.b, payload) // once: later calls come from level triggering
			waitFor(t, signal, "the whole payload")
			s.sync()
			mustRun(t, l, func() error {
				if string(got) != string(payload) {
					t.Errorf("read %q, want %q", got, payload)
				}
				if want := (len(payload) + chunk - 1) / chunk; calls != want {
					t.Errorf("handler called %d times, want %d", calls, want)
				}
				if len(errs) != 0 {
					t.Errorf("called when nothing was there: %v", errs)
				}
				return nil
			})
		})
	}
}

// counter is a handler that counts its calls and the events seen, and
// reads what is there unless told not to. Its fields belong to the loop.
type counter struct {
	calls  int
	events uint32
	data   []byte
	noRead bool
	onCall func(fd int, events uint32)
	called chan struct{} // signalled (not blocking) on each call
}

func newCounter() *counter { return &counter{called: make(chan struct{}, 1)} }

func (c *counter) Ready(fd int, events uint32) {
	c.calls++
	c.events |= events
	if !c.noRead && events&unix.EPOLLIN != 0 {
		buf := make([]byte, 4096)
		for {
			n, err := evloop.Read(fd, buf)
			if err != nil {
				break
			}
			c.data = append(c.data, buf[:n]...)
		}
	}
	if c.onCall != nil {
		c.onCall(fd, events)
	}
	select {
	case c.called <- struct{}{}:
	default:
	}
}

// state reads a counter's calls and data on the loop.
func (c *counter) state(t *testing.T, l *evloop.Loop) (calls int, events uint32, data string) {
	t.Helper()
	mustRun(t, l, func() error { calls, events, data = c.calls, c.events, string(c.data); return nil })
	return
}

func TestMod(t *testing.T) {
	t.Run("Readable, Writable, none, Readable", func(t *testing.T) {
		l := startLoop(t)
		p := newPair(t)
		s := newSentinel(t, l)
		c := newCounter()
		fd := p.a
		mustRun(t, l, func() error { return l.Add(fd, c, evloop.Readable) })
		s.sync()
		if calls, _, _ := c.state(t, l); calls != 0 {
			t.Fatalf("%d calls with nothing to read", calls)
		}

		// Writable: a socket with room is ready at once; the handler turns
		// it off on its first call, else level triggering calls it forever.
		mustRun(t, l, func() error {
			c.onCall = func(fd int, events uint32) {
				if events&unix.EPOLLOUT != 0 {
					if err := l.Mod(fd, 0); err != nil {
						panic(err)
					}
				}
			}
			return l.Mod(fd, evloop.Writable)
		})
		waitFor(t, c.called, "a Writable call")
		s.sync()
		s.sync()
		calls, events, _ := c.state(t, l)
		if calls != 1 || events != unix.EPOLLOUT {
			t.Fatalf("after Mod(Writable) and Mod(0) in the handler: %d calls, events %#x; want 1 call, EPOLLOUT", calls, events)
		}

		// None: data arrives, nobody is told.
		writeAll(t, p.b, []byte("while unwatched"))
		s.sync()
		if calls, _, _ := c.state(t, l); calls != 1 {
			t.Fatalf("%d calls for data that arrived with events 0", calls-1)
		}

		// Readable again: the data that came meanwhile is reported.
		mustRun(t, l, func() error { c.onCall = nil; return l.Mod(fd, evloop.Readable) })
		waitFor(t, c.called, "a Readable call")
		s.sync()
		calls, events, data := c.state(t, l)
		if calls != 2 || events&unix.EPOLLIN == 0 || data != "while unwatched" {
			t.Fatalf("after Mod(Readable): %d calls, events %#x, data %q", calls, events, data)
		}
	})

	// Events 0 still reports a hang-up (epoll always does): a handler
	// left with 0 must Del its fd when told, or be called in a loop.
	t.Run("none still reports hang-up", func(t *testing.T) {
		l := startLoop(t)
		p := newPair(t)
		c := newCounter()
		c.noRead = true
		var hup atomic.Bool
		c.onCall = func(fd int, events uint32) {
			if events&unix.EPOLLHUP != 0 {
				hup.Store(true)
				l.Del(fd)
			}
		}
		fd := p.a
		mustRun(t, l, func() error { return l.Add(fd, c, 0) })
		closeFd(&p.b)
		waitFor(t, c.called, "a call after the peer closed")
		if !hup.Load() {
			_, ev, _ := c.state(t, l)
			t.Errorf("events %#x, want EPOLLHUP", ev)
		}
	})
}

func TestDel(t *testing.T) {
	t.Run("from a submitted function", func(t *testing.T) {
		l := startLoop(t)
		p := newPair(t)
		s := newSentinel(t, l)
		c := newCounter()
		fd := p.a
		mustRun(t, l, func() error { return l.Add(fd, c, evloop.Readable) })
		writeAll(t, p.b, []byte("one"))
		waitFor(t, c.called, "the first call")
		if err := run(t, l, func() error { return l.Del(fd) }); err != nil {
			t.Fatalf("Del: %v", err)
		}
		writeAll(t, p.b, []byte("two"))
		s.sync()
		if calls, _, data := c.state(t, l); calls != 1 || data != "one" {
			t.Fatalf("after Del: %d calls, read %q; want 1 call, %q", calls, data, "one")
		}
		// Added again, with another handler: that one is told of what came.
		c2 := newCounter()
		mustRun(t, l, func() error { return l.Add(fd, c2, evloop.Readable) })
		waitFor(t, c2.called, "the new handler")
		s.sync()
		if calls, _, _ := c.state(t, l); calls != 1 {
			t.Errorf("the old handler was called again after the fd was re-added")
		}
		if _, _, data := c2.state(t, l); data != "two" {
			t.Errorf("the new handler read %q, want %q", data, "two")
		}
	})

	t.Run("from its own handler, data left", func(t *testing.T) {
		l := startLoop(t)
		p := newPair(t)
		s := newSentinel(t, l)
		c := newCounter()
		c.noRead = true // level-triggered: without Del it would be called again
		var delErr error
		c.onCall = func(fd int, _ uint32) { delErr = l.Del(fd) }
		fd := p.a
		mustRun(t, l, func() error { return l.Add(fd, c, evloop.Readable) })
		writeAll(t, p.b, []byte("unread"))
		waitFor(t, c.called, "the call")
		writeAll(t, p.b, []byte("more"))
		s.sync()
		s.sync()
		var err error
		mustRun(t, l, func() error { err = delErr; return nil })
		if err != nil {
			t.Errorf("Del in the handler: %v", err)
		}
		if calls, _, _ := c.state(t, l); calls != 1 {
			t.Errorf("%d calls, want 1", calls)
		}
	})

	// Two fds ready in one round: whichever handler runs first Dels the
	// other, whose event, already collected, must be dropped.
	t.Run("drops events already collected", func(t *testing.T) {
		l := startLoop(t)
		p1, p2 := newPair(t), newPair(t)
		s := newSentinel(t, l)
		var order []int
		other := map[int]int{p1.a: p2.a, p2.a: p1.a}
		var delErr error
		h := handlerFunc(func(fd int, _ uint32) {
			order = append(order, fd)
			evloop.Read(fd, make([]byte, 64))
			if len(order) == 1 {
				delErr = l.Del(other[fd])
			}
		})
		fd1, fd2 := p1.a, p2.a
		mustRun(t, l, func() error {
			if err := l.Add(fd1, h, evloop.Readable); err != nil {
				return err
			}
			return l.Add(fd2, h, evloop.Readable)
		})
		entered, release := make(chan struct{}), make(chan struct{})
		l.Submit(func() { close(entered); <-release }) // hold the loop while both become ready
		waitFor(t, entered, "the loop to be held")
		writeAll(t, p1.b, []byte("x"))
		writeAll(t, p2.b, []byte("y"))
		close(release)
		s.sync()
		mustRun(t, l, func() error {
			if delErr != nil {
				t.Errorf("Del: %v", delErr)
			}
			if len(order) != 1 {
				t.Errorf("handlers called for fds %v, want only the first of %d and %d", order, fd1, fd2)
			}
			return nil
		})
	})

	t.Run("errors", func(t *testing.T) {
		l := startLoop(t)
		p := newPair(t)
		registered, unknown := p.a, p.b
		first, second := newCounter(), newCounter()
		mustRun(t, l, func() error { return l.Add(registered, first, evloop.Readable) })
		bad := newPair(t)
		closed := bad.a
		closeFd(&bad.a)
		tests := []struct {
			name string
			op   func() error
			want syscall.Errno
		}{
			{"Del unknown fd", func() error { return l.Del(unknown) }, unix.ENOENT},
			{"Del closed fd", func() error { return l.Del(closed) }, unix.EBADF},
			{"Del -1", func() error { return l.Del(-1) }, unix.EBADF},
			{"Mod unknown fd", func() error { return l.Mod(unknown, evloop.Readable) }, unix.ENOENT},
			{"Add closed fd", func() error { return l.Add(closed, second, evloop.Readable) }, unix.EBADF},
			{"Add twice", func() error { return l.Add(registered, second, evloop.Readable) }, unix.EEXIST},
		}
		for _, tc := range tests {
			err := run(t, l, tc.op)
			if !errors.Is(err, tc.want) {
				t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
			}
		}
		// The failed Add kept the first handler.
		writeAll(t, unknown, []byte("to the first")) // unknown is registered's peer
		waitFor(t, first.called, "the first handler")
		if calls, _, _ := second.state(t, l); calls != 0 {
			t.Errorf("the handler of a failed Add was called %d times", calls)
		}
	})
}

// TestProcessorReturned checks that an idle loop does not keep other
// goroutines from running: the garbage collector's stop-the-world and a
// timer. The bound is only against a hang.
func TestProcessorReturned(t *testing.T) {
	tests := []struct {
		name          string
		before, after int // GOMAXPROCS set before New and after it (0: unchanged)
	}{
		{"current GOMAXPROCS", 0, 0},
		{"GOMAXPROCS 1", 1, 0},
		{"GOMAXPROCS 1 after New", 0, 1}, // a loop that chose to keep its processor, left with one
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prev := runtime.GOMAXPROCS(0)
			t.Cleanup(func() { runtime.GOMAXPROCS(prev) }) // after the loop's Stop
			if tc.before > 0 {
				runtime.GOMAXPROCS(tc.before)
			}
			atNew := runtime.GOMAXPROCS(0)
			l := startLoop(t)
			if tc.after > 0 {
				runtime.GOMAXPROCS(tc.after)
			}
			t.Logf("GOMAXPROCS %d at New, %d now", atNew, runtime.GOMAXPROCS(0))
			p := newPair(t)
			c := newCounter()
			fd := p.a
			mustRun(t, l, func() error { return l.Add(fd, c, evloop.Readable) })
			for i := range 3 {
				time.Sleep(20 * time.Millisecond) // let the loop go idle in its wait
				gc := make(chan struct{})
				go func() { runtime.GC(); close(gc) }()
				waitFor(t, gc, "runtime.GC")
				slept := make(chan struct{})
				go func() { time.Sleep(10 * time.Millisecond); close(slept) }()
				waitFor(t, slept, "time.Sleep(10ms)")
				// and the loop still serves its fd and its tasks
				msg := fmt.Sprint("round ", i)
				writeAll(t, p.b, []byte(msg))
				waitFor(t, c.called, "the handler")
				if _, _, data := c.state(t, l); !strings.HasSuffix(data, msg) {
					t.Fatalf("read %q, want it to end with %q", data, msg)
				}
			}
		})
	}
}

func TestManyFds(t *testing.T) {
	for _, n := range []int{200, 600} { // 600: more than one wait's 256 events
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			l := startLoop(t)
			pairs := make([]*pair, n)
			for i := range pairs {
				pairs[i] = newPair(t)
			}
			payload := func(i int) string {
				return fmt.Sprintf("payload %d:%s", i, strings.Repeat(string(rune('a'+i%26)), i%97))
			}
			var (
				done     = make(chan struct{})
				finished int      // on the loop only
				problems []string // on the loop only
			)
			mustRun(t, l, func() error {
				for i, p := range pairs {
					want, myFd := payload(i), p.a
					var got []byte
					buf := make([]byte, 256)
					h := handlerFunc(func(fd int, _ uint32) {
						if fd != myFd {
							problems = append(problems, fmt.Sprintf("handler %d called with fd %d, not %d", i, fd, myFd))
						}
						for {
							k, err := evloop.Read(fd, buf)
							if err == syscall.EAGAIN {
								break
							}
							if err != nil {
								problems = append(problems, fmt.Sprintf("handler %d: %v", i, err))
								l.Del(fd)
								return
							}
							got = append(got, buf[:k]...)
						}
						if len(got) < len(want) {
							return
						}
						if string(got) != want {
							problems = append(problems, fmt.Sprintf("handler %d read %q, want %q", i, got, want))
						}
						if err := l.Del(fd); err != nil {
							problems = append(problems, fmt.Sprintf("handler %d: Del: %v", i, err))
						}
						if finished++; finished == n {
							close(done)
						}
					})
					if err := l.Add(myFd, h, evloop.Readable); err != nil {
						return err
					}
				}
				return nil
			})
			for i, p := range pairs {
				writeAll(t, p.b, []byte(payload(i)))
			}
			waitFor(t, done, "every handler to read its payload")
			mustRun(t, l, func() error {
				for _, p := range problems {
					t.Error(p)
				}
				return nil
			})
		})
	}
}

// A loop that waits in raw system calls keeps its processor while it
// sleeps: the first takes one of the program's, each further one adds one
// to GOMAXPROCS while it runs; with one processor loops wait in ordinary
// system calls and add none.
func TestRunKeepsProcessors(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	for _, tc := range []struct {
		procs, loops, added int
	}{{2, 1, 0}, {2, 2, 1}, {2, 3, 2}, {1, 2, 0}} {
		t.Run(fmt.Sprintf("GOMAXPROCS=%d,loops=%d", tc.procs, tc.loops), func(t *testing.T) {
			runtime.GOMAXPROCS(tc.procs)
			var loops []*evloop.Loop
			for range tc.loops {
				l, err := newLoop()
				if err != nil {
					t.Fatal(err)
				}
				ran := make(chan struct{})
				go l.Run()
				if !l.Submit(func() { close(ran) }) {
					t.Fatal("Submit refused on a new loop")
				}
				<-ran // Run counts itself in before its first round
				loops = append(loops, l)
			}
			if got := runtime.GOMAXPROCS(0); got != tc.procs+tc.added {
				t.Fatalf("GOMAXPROCS %d while the loops run, want %d", got, tc.procs+tc.added)
			}
			for _, l := range loops {
				l.Stop()
			}
			if got := runtime.GOMAXPROCS(0); got != tc.procs {
				t.Fatalf("GOMAXPROCS %d after Stop, want %d", got, tc.procs)
			}
		})
	}
}

// TestRunOn checks that RunOn runs the loop on a thread pinned to the CPU
// asked for, that the thread ends with the loop rather than going back to
// the runtime with its affinity, and that a CPU the process cannot have
// is an error that leaves the loop free to run unpinned.
func TestRunOn(t *testing.T) {
	var all unix.CPUSet
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		t.Fatal(err)
	}
	cpu := -1
	for i := range 1024 {
		if all.IsSet(i) {
			cpu = i // the last: not the default placement when there are several
		}
	}
	l, err := newLoop()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.RunOn(cpu); err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			l.Stop()
		}
	})
	if l.CPU() != cpu {
		t.Errorf("CPU() = %d, want %d", l.CPU(), cpu)
	}
	var set unix.CPUSet
	var tid int
	mustRun(t, l, func() error {
		tid = unix.Gettid()
		return unix.SchedGetaffinity(0, &set)
	})
	if set.Count() != 1 || !set.IsSet(cpu) {
		t.Errorf("the loop's thread may run on %d CPUs (CPU %d among them: %v), want only CPU %d", set.Count(), cpu, set.IsSet(cpu), cpu)
	}
	// It still serves an fd.
	p := newPair(t)
	c := newCounter()
	mustRun(t, l, func() error { return l.Add(p.a, c, evloop.Readable) })
	writeAll(t, p.b, []byte("pinned"))
	waitFor(t, c.called, "the handler")
	if _, _, data := c.state(t, l); data != "pinned" {
		t.Errorf("read %q through the pinned loop", data)
	}
	l.Stop()
	stopped = true
	if tid == os.Getpid() {
		// The main thread cannot exit: the runtime parks it for good
		// instead, which also keeps it from other goroutines.
		t.Log("the loop ran on the main thread")
		tid = -1
	}
	deadline := time.Now().Add(patience)
	for tid > 0 {
		if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			st, _ := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/status", tid))
			t.Fatalf("the pinned thread %d outlived its loop: %s", tid, st)
		}
		time.Sleep(time.Millisecond)
	}

	for _, bad := range []int{-1, 1023, 4096} {
		l, err := newLoop()
		if err != nil {
			t.Fatal(err)
		}
		if bad == 1023 && all.IsSet(1023) {
			continue
		}
		if err := l.RunOn(bad); err == nil || !strings.Contains(err.Error(), fmt.Sprint("CPU ", bad)) {
			t.Errorf("RunOn(%d) = %v, want an error naming the CPU", bad, err)
		}
		if l.CPU() != -1 {
			t.Errorf("after a failed RunOn(%d), CPU() = %d", bad, l.CPU())
		}
		go l.Run() // unpinned after all
		mustRun(t, l, func() error { return nil })
		l.Stop()
	}
}
