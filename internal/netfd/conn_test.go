package netfd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var networks = []string{"tcp", "tcp6", "unix"}

// listen returns a Go listener on loopback or in a temporary directory.
func listen(t *testing.T, network string) net.Listener {
	t.Helper()
	var nl net.Listener
	var err error
	switch network {
	case "tcp":
		nl, err = net.Listen("tcp", "127.0.0.1:0")
	case "tcp6":
		if nl, err = net.Listen("tcp6", "[::1]:0"); err != nil {
			t.Skipf("no IPv6 loopback: %v", err)
		}
	case "unix":
		nl, err = net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nl.Close() })
	return nl
}

// newPair returns both ends of a connection made by Dial and Accept.
func newPair(t *testing.T, network string) (client, server *Conn) {
	t.Helper()
	nl := listen(t, network)
	l, err := Listen(nl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	type result struct {
		c   *Conn
		err error
	}
	accepted := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		accepted <- result{c, err}
	}()
	client, err = Dial(context.Background(), network, nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	r := <-accepted
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { r.c.Close() })
	return client, r.c
}

// waitFor waits until cond holds, failing the test after 2 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for start := time.Now(); !cond(); time.Sleep(time.Millisecond) {
		if time.Since(start) > 2*time.Second {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// inSyscall reports whether a Read or Write is using c's fd.
func (c *Conn) inSyscall() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.refs > 0
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.Uint32())
	}
	return b
}

func setBuf(t *testing.T, c *Conn, opt, size int) {
	t.Helper()
	if err := unix.SetsockoptInt(c.fd, unix.SOL_SOCKET, opt, size); err != nil {
		t.Fatal(err)
	}
}

func TestEcho(t *testing.T) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			client, server := newPair(t, network)
			go func() {
				io.Copy(server, server)
				server.Close()
			}()
			want := randomBytes(256 << 10)
			got := make([]byte, len(want))
			readErr := make(chan error, 1)
			go func() {
				_, err := io.ReadFull(client, got)
				readErr <- err
			}()
			if n, err := client.Write(want); err != nil || n != len(want) {
				t.Fatalf("Write = %d, %v", n, err)
			}
			if err := <-readErr; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("echoed bytes differ")
			}
			if got, want := client.RemoteAddr().String(), server.LocalAddr().String(); got != want {
				t.Errorf("client remote %q, server local %q", got, want)
			}
			if network != "unix" {
				if got, want := server.RemoteAddr().String(), client.LocalAddr().String(); got != want {
					t.Errorf("server remote %q, client local %q", got, want)
				}
			}
			// The peer's EOF after Close reaches Read as io.EOF.
			client.Close()
			var b [1]byte
			if _, err := server.Read(b[:]); err != io.EOF && !errors.Is(err, net.ErrClosed) {
				t.Errorf("server Read after client Close = %v", err)
			}
		})
	}
}

func TestEOF(t *testing.T) {
	client, server := newPair(t, "tcp")
	server.Write([]byte("bye"))
	server.Close()
	got, err := io.ReadAll(client)
	if err != nil || string(got) != "bye" {
		t.Fatalf("ReadAll = %q, %v", got, err)
	}
	if n, err := client.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("Read at EOF = %d, %v", n, err)
	}
}

func checkTimeout(t *testing.T, err error) {
	t.Helper()
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("got %v, want a timeout net.Error wrapping os.ErrDeadlineExceeded", err)
	}
}

// block starts a Read (or a Write that cannot complete) on c and returns
// its result channel once the call is waiting on the fd.
func block(t *testing.T, c *Conn, op string) <-chan error {
	t.Helper()
	if op == "write" {
		setBuf(t, c, unix.SO_SNDBUF, 4096)
	}
	done := make(chan error, 1)
	go func() {
		var err error
		if op == "read" {
			_, err = c.Read(make([]byte, 10))
		} else {
			_, err = c.Write(make([]byte, 8<<20))
		}
		done <- err
	}()
	waitFor(t, op+" to block", c.inSyscall)
	return done
}

func await(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(2 * time.Second):
		t.Fatal("blocked call did not return within 2 s")
		return nil
	}
}

func TestDeadline(t *testing.T) {
	for _, op := range []string{"read", "write"} {
		t.Run(op, func(t *testing.T) {
			client, server := newPair(t, "tcp")
			setDeadline := client.SetReadDeadline
			if op == "write" {
				setDeadline = client.SetWriteDeadline
			}
			start := time.Now()
			setDeadline(start.Add(100 * time.Millisecond))
			err := await(t, block(t, client, op))
			checkTimeout(t, err)
			if el := time.Since(start); el < 90*time.Millisecond {
				t.Errorf("timed out after %v, before the deadline", el)
			}
			// An expired deadline fails at once; clearing it lets I/O go on.
			setDeadline(time.Now().Add(-time.Second))
			if op == "read" {
				server.Write([]byte("x"))
				_, err = client.Read(make([]byte, 1))
			} else {
				_, err = client.Write([]byte("x"))
			}
			checkTimeout(t, err)
			setDeadline(time.Time{})
			if op == "read" {
				_, err = client.Read(make([]byte, 1))
			} else {
				go io.Copy(io.Discard, server)
				_, err = client.Write([]byte("x"))
			}
			if err != nil {
				t.Fatalf("%s after clearing the deadline: %v", op, err)
			}
		})
	}
}

func TestDeadlineFromOtherGoroutine(t *testing.T) {
	for _, op := range []string{"read", "write"} {
		t.Run(op, func(t *testing.T) {
			client, _ := newPair(t, "unix")
			done := block(t, client, op)
			if op == "read" {
				client.SetReadDeadline(time.Now())
			} else {
				client.SetDeadline(time.Now())
			}
			checkTimeout(t, await(t, done))
		})
	}
}

func TestCloseWakesBlocked(t *testing.T) {
	for _, op := range []string{"read", "write"} {
		t.Run(op, func(t *testing.T) {
			client, _ := newPair(t, "tcp")
			done := block(t, client, op)
			if err := client.Close(); err != nil {
				t.Fatal(err)
			}
			if err := await(t, done); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("blocked %s after Close = %v, want net.ErrClosed", op, err)
			}
			client.mu.Lock()
			fd := client.fd
			client.mu.Unlock()
			if fd != -1 {
				t.Errorf("fd %d still open after the blocked call returned", fd)
			}
			if err := client.Close(); err != nil {
				t.Errorf("second Close = %v", err)
			}
			if _, err := client.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
				t.Errorf("Write after Close = %v", err)
			}
		})
	}
}

func TestLargeTransferSlowReader(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			client, server := newPair(t, network)
			setBuf(t, client, unix.SO_SNDBUF, 16<<10)
			setBuf(t, server, unix.SO_RCVBUF, 16<<10)
			want := randomBytes(4 << 20)
			before := waits.Load()
			writeErr := make(chan error, 1)
			go func() {
				n, err := client.Write(want)
				if err == nil && n != len(want) {
					err = io.ErrShortWrite
				}
				writeErr <- err
			}()
			got := make([]byte, 0, len(want))
			buf := make([]byte, 64<<10)
			for i := 0; len(got) < len(want); i++ {
				n, err := server.Read(buf)
				if err != nil {
					t.Fatalf("Read after %d bytes: %v", len(got), err)
				}
				got = append(got, buf[:n]...)
				if i%4 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
			if err := <-writeErr; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("received bytes differ")
			}
			if waits.Load()-before < 2 {
				t.Errorf("no waits in poll(2): the EAGAIN paths were not exercised")
			}
		})
	}
}

func TestNoDelay(t *testing.T) {
	client, server := newPair(t, "tcp")
	for _, c := range []*Conn{client, server} {
		if v, err := unix.GetsockoptInt(c.fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || v == 0 {
			t.Errorf("TCP_NODELAY = %d, %v; want on", v, err)
		}
	}
	if err := client.SetNoDelay(false); err != nil {
		t.Fatal(err)
	}
	if v, _ := unix.GetsockoptInt(client.fd, unix.IPPROTO_TCP, unix.TCP_NODELAY); v != 0 {
		t.Errorf("TCP_NODELAY = %d after SetNoDelay(false)", v)
	}
	uc, _ := newPair(t, "unix")
	if err := uc.SetNoDelay(true); err != nil {
		t.Errorf("SetNoDelay on a Unix socket = %v", err)
	}
}

func TestDetach(t *testing.T) {
	client, server := newPair(t, "tcp")
	raddr := client.RemoteAddr().String()
	fd, err := client.Detach()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(fd, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("peer read %q, %v", buf, err)
	}
	server.Write([]byte("pong"))
	if _, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 2000); err != nil {
		t.Fatal(err)
	}
	if n, err := unix.Read(fd, buf); err != nil || string(buf[:n]) != "pong" {
		t.Fatalf("read on detached fd = %q, %v", buf[:n], err)
	}

	if _, err := client.Read(buf); !errors.Is(err, ErrDetached) || !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after Detach = %v", err)
	}
	if _, err := client.Write(buf); !errors.Is(err, ErrDetached) {
		t.Errorf("Write after Detach = %v", err)
	}
	if got := client.RemoteAddr().String(); got != raddr {
		t.Errorf("RemoteAddr after Detach = %q, want %q", got, raddr)
	}
	if _, err := client.Detach(); err == nil {
		t.Error("second Detach succeeded")
	}
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
		t.Errorf("detached fd after Close: fcntl = %v, want EBADF", err)
	}
	if err := client.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

// TestReattachAndQuiet: a connection back from an event loop works in
// the blocking state again and can be detached again; Quiet tells an idle
// peer from one that sent bytes, closed or reset.
func TestReattachAndQuiet(t *testing.T) {
	client, server := newPair(t, "tcp")
	if err := client.Reattach(); err == nil {
		t.Error("Reattach of a connection never detached succeeded")
	}
	if _, err := client.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := client.Quiet(); !errors.Is(err, ErrDetached) {
		t.Errorf("Quiet while detached = %v", err)
	}
	if err := client.Reattach(); err != nil {
		t.Fatal(err)
	}
	if err := client.Quiet(); err != nil {
		t.Errorf("Quiet with an idle peer = %v", err)
	}
	server.Write([]byte("x"))
	waitFor(t, "the byte to arrive", func() bool { return client.Quiet() != nil })
	buf := make([]byte, 1)
	if _, err := io.ReadFull(client, buf); err != nil || buf[0] != 'x' {
		t.Fatalf("Read after Reattach = %q, %v (Quiet must not consume)", buf, err)
	}
	if err := client.Quiet(); err != nil {
		t.Errorf("Quiet after reading = %v", err)
	}
	if _, err := client.Detach(); err != nil {
		t.Errorf("Detach after Reattach = %v", err)
	}
	client.Reattach()
	server.Close()
	waitFor(t, "EOF", func() bool { return errors.Is(client.Quiet(), io.EOF) })
	client.Close()

	// On the runtime poller, and package net's own connections.
	c2, s2 := newPair(t, "tcp")
	if err := c2.UseNetpoll(); err != nil {
		t.Fatal(err)
	}
	if err := c2.Quiet(); err != nil {
		t.Errorf("Quiet on the runtime poller, idle peer = %v", err)
	}
	s2.Write([]byte("y"))
	waitFor(t, "the byte on the runtime poller", func() bool { return c2.Quiet() != nil })
	ln := listen(t, "tcp")
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if err := QuietConn(nc); err != nil {
		t.Errorf("QuietConn, idle peer = %v", err)
	}
	peer.Close()
	waitFor(t, "EOF on a net.Conn", func() bool { return errors.Is(QuietConn(nc), io.EOF) })

	if err := client.Quiet(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Quiet after Close = %v", err)
	}
	if err := client.Reattach(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Reattach after Close = %v", err)
	}
}

func TestDetachWhileReading(t *testing.T) {
	client, _ := newPair(t, "unix")
	done := block(t, client, "read")
	if _, err := client.Detach(); err == nil {
		t.Fatal("Detach succeeded during a Read")
	}
	if err := client.UseNetpoll(); err == nil {
		t.Fatal("UseNetpoll succeeded during a Read")
	}
	client.Close()
	await(t, done)
}

func TestUseNetpoll(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		for _, detach := range []bool{false, true} {
			name := network + "/from-blocking"
			if detach {
				name = network + "/from-detached"
			}
			t.Run(name, func(t *testing.T) { testUseNetpoll(t, network, detach) })
		}
	}
}

func testUseNetpoll(t *testing.T, network string, detach bool) {
	client, server := newPair(t, network)
	// Some bytes are consumed in the blocking state, the rest are still
	// queued in the socket when it changes hands.
	if _, err := server.Write([]byte("hello world")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(client, buf[:5]); err != nil || string(buf[:5]) != "hello" {
		t.Fatalf("blocking read %q, %v", buf[:5], err)
	}
	client.SetReadDeadline(time.Now().Add(-time.Second)) // must carry over
	for _, c := range []*Conn{client, server} {
		if detach {
			if _, err := c.Detach(); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.UseNetpoll(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.Read(buf); err == nil {
		t.Fatal("read deadline set before UseNetpoll was lost")
	} else {
		checkTimeout(t, err)
	}
	client.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != " world" {
		t.Fatalf("netpoll read %q, %v", buf, err)
	}
	if err := client.SetNoDelay(true); err != nil {
		t.Error(err)
	}

	// 1 MiB each way, with a reader and a writer goroutine on each end.
	const size = 1 << 20
	data := map[*Conn][]byte{client: randomBytes(size), server: randomBytes(size)}
	peer := map[*Conn]*Conn{client: server, server: client}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for c := range data {
		wg.Add(2)
		go func() {
			defer wg.Done()
			if _, err := c.Write(data[c]); err != nil {
				errs <- err
			}
		}()
		go func() {
			defer wg.Done()
			got := make([]byte, size)
			if _, err := io.ReadFull(c, got); err != nil {
				errs <- err
			} else if !bytes.Equal(got, data[peer[c]]) {
				errs <- errors.New("bytes received after UseNetpoll differ")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if got, want := client.RemoteAddr().String(), server.LocalAddr().String(); got != want {
		t.Errorf("client remote %q, server local %q", got, want)
	}
	if _, err := client.Detach(); err == nil {
		t.Error("Detach after UseNetpoll succeeded")
	}
	for i := 0; i < 2; i++ {
		if err := client.Close(); err != nil {
			t.Errorf("Close #%d = %v", i+1, err)
		}
	}
	if _, err := client.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after Close = %v", err)
	}
	if _, err := server.Read(buf); err != io.EOF {
		t.Errorf("peer Read after Close = %v, want EOF", err)
	}
}

func TestDoubleCloseBlocking(t *testing.T) {
	client, _ := newPair(t, "tcp")
	for i := 0; i < 2; i++ {
		if err := client.Close(); err != nil {
			t.Errorf("Close #%d = %v", i+1, err)
		}
	}
	if err := client.UseNetpoll(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("UseNetpoll after Close = %v", err)
	}
	if err := client.SetDeadline(time.Now()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("SetDeadline after Close = %v", err)
	}
}
