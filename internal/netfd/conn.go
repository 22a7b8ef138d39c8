package netfd

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrDetached is the error (wrapped in a *net.OpError) of Read and Write on
// a Conn whose fd was handed to an event loop. It matches net.ErrClosed
// under errors.Is, since for this Conn the connection is as good as closed.
var ErrDetached error = detachedError{}

type detachedError struct{}

func (detachedError) Error() string {
	return "use of detached connection (its fd belongs to an event loop)"
}
func (detachedError) Is(target error) bool { return target == net.ErrClosed }

const (
	stateBlocking = iota // I/O on c.fd, waiting in poll(2)
	stateDetached        // c.fd belongs to an event loop
	stateNetpoll         // everything delegates to c.nc
)

type delegate struct{ net.Conn }

// Conn is a net.Conn over a connected stream socket, in one of three states:
//
//   - blocking (initial): Read and Write work on the non-blocking fd and
//     wait in poll(2) in slices of at most 50 ms, so that deadlines set and
//     Close called from other goroutines take effect promptly. Meant for
//     connection startup, not for bulk traffic.
//   - detached ([Conn.Detach]): the fd belongs to an event loop; Read and
//     Write fail with [ErrDetached].
//   - netpoll ([Conn.UseNetpoll]): the socket was handed to Go's runtime
//     poller for good and every method delegates to a net.Conn.
//
// As with any net.Conn, one Read and one Write may run concurrently.
type Conn struct {
	mu     sync.Mutex // guards state, fd, refs
	state  int
	fd     int // -1 once closed or handed to the runtime poller
	refs   int // Reads and Writes using fd outside mu
	closed atomic.Bool
	nc     atomic.Pointer[delegate] // set once, on UseNetpoll

	rmu, wmu sync.Mutex   // one Read and one Write at a time, as net.Conn
	rdl, wdl atomic.Int64 // deadlines in Unix ns; 0 means none

	network      string // "tcp" or "unix", for errors
	laddr, raddr net.Addr
}

// newConn wraps a connected non-blocking socket; raddr is the peer as
// returned by accept4 or passed to connect (getpeername may already fail
// if the peer reset the connection).
func newConn(fd int, rsa unix.Sockaddr) (*Conn, error) {
	lsa, err := unix.Getsockname(fd)
	if err != nil {
		return nil, os.NewSyscallError("getsockname", err)
	}
	c := &Conn{fd: fd, network: "tcp", laddr: sockaddrToAddr(lsa), raddr: sockaddrToAddr(rsa)}
	if _, ok := lsa.(*unix.SockaddrUnix); ok {
		c.network = "unix"
	} else if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		// Package net sets TCP_NODELAY on every TCP conn; so do we.
		return nil, os.NewSyscallError("setsockopt TCP_NODELAY", err)
	}
	return c, nil
}

func sockaddrToAddr(sa unix.Sockaddr) net.Addr {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(append([]byte(nil), sa.Addr[:]...)), Port: sa.Port}
	case *unix.SockaddrInet6:
		a := &net.TCPAddr{IP: net.IP(append([]byte(nil), sa.Addr[:]...)), Port: sa.Port}
		if sa.ZoneId != 0 {
			if ifi, err := net.InterfaceByIndex(int(sa.ZoneId)); err == nil {
				a.Zone = ifi.Name
			} else {
				a.Zone = fmt.Sprint(sa.ZoneId)
			}
		}
		return a
	case *unix.SockaddrUnix:
		return &net.UnixAddr{Name: sa.Name, Net: "unix"}
	}
	return nil
}

func (c *Conn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
}

// enter locks mu (rmu or wmu) and takes a reference on the fd. If the Conn
// was switched to the runtime poller, it returns the delegate instead.
func (c *Conn) enter(mu *sync.Mutex) (int, net.Conn, error) {
	mu.Lock()
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.state == stateNetpoll:
		mu.Unlock()
		return -1, c.nc.Load().Conn, nil
	case c.closed.Load():
		mu.Unlock()
		return -1, nil, net.ErrClosed
	case c.state == stateDetached:
		mu.Unlock()
		return -1, nil, ErrDetached
	}
	c.refs++
	return c.fd, nil, nil
}

// exit drops the reference taken by enter; the last one out after Close
// closes the fd, so its number is never closed (and reused) under a
// concurrent syscall.
func (c *Conn) exit(mu *sync.Mutex) {
	c.mu.Lock()
	c.refs--
	if c.refs == 0 && c.closed.Load() && c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
	c.mu.Unlock()
	mu.Unlock()
}

// Read implements net.Conn.
func (c *Conn) Read(b []byte) (int, error) {
	if d := c.nc.Load(); d != nil {
		return d.Read(b)
	}
	fd, nc, err := c.enter(&c.rmu)
	if nc != nil {
		return nc.Read(b)
	}
	if err != nil {
		return 0, c.opErr("read", err)
	}
	defer c.exit(&c.rmu)
	if err := c.checkDeadline(&c.rdl); err != nil {
		return 0, c.opErr("read", err)
	}
	if len(b) == 0 {
		return 0, nil
	}
	for {
		n, err := unix.Read(fd, b)
		switch {
		case err == nil && n > 0:
			return n, nil
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if err := c.wait(fd, unix.POLLIN, &c.rdl); err != nil {
				return 0, c.opErr("read", err)
			}
			continue
		case c.closed.Load():
			// Close shut the socket down under us: report that, not EOF.
			return 0, c.opErr("read", net.ErrClosed)
		case err != nil:
			return 0, c.opErr("read", os.NewSyscallError("read", err))
		}
		return 0, io.EOF
	}
}

// Write implements net.Conn: it writes all of b or returns an error.
func (c *Conn) Write(b []byte) (int, error) {
	if d := c.nc.Load(); d != nil {
		return d.Write(b)
	}
	fd, nc, err := c.enter(&c.wmu)
	if nc != nil {
		return nc.Write(b)
	}
	if err != nil {
		return 0, c.opErr("write", err)
	}
	defer c.exit(&c.wmu)
	if err := c.checkDeadline(&c.wdl); err != nil {
		return 0, c.opErr("write", err)
	}
	done := 0
	for done < len(b) {
		n, err := unix.Write(fd, b[done:])
		if n > 0 {
			done += n
		}
		switch {
		case err == nil, err == unix.EINTR:
		case err == unix.EAGAIN:
			if err := c.wait(fd, unix.POLLOUT, &c.wdl); err != nil {
				return done, c.opErr("write", err)
			}
		case c.closed.Load():
			return done, c.opErr("write", net.ErrClosed)
		default:
			return done, c.opErr("write", os.NewSyscallError("write", err))
		}
	}
	return done, nil
}

func (c *Conn) checkDeadline(dl *atomic.Int64) error {
	if d := dl.Load(); d != 0 && time.Now().UnixNano() >= d {
		return os.ErrDeadlineExceeded
	}
	return nil
}

// wait polls fd for events, re-checking Close and the deadline every slice.
func (c *Conn) wait(fd int, events int16, dl *atomic.Int64) error {
	return waitFD(fd, events, func() (time.Duration, error) {
		if c.closed.Load() {
			return 0, net.ErrClosed
		}
		if d := dl.Load(); d != 0 {
			return time.Until(time.Unix(0, d)), os.ErrDeadlineExceeded
		}
		return pollSlice, nil
	})
}

// pollSlice bounds each poll(2) so that state changes made by other
// goroutines (deadlines, Close) are noticed within that time.
const pollSlice = 50 * time.Millisecond

// waits counts waitFD calls, so tests can tell that a path was exercised.
var waits atomic.Int64

// waitFD waits until fd is ready for events. check is called before every
// poll slice: it returns how long at most to wait next, or an error to stop
// with; that error is returned if the time left is not positive, else
// ignored.
func waitFD(fd int, events int16, check func() (time.Duration, error)) error {
	waits.Add(1)
	for {
		left, err := check()
		if left <= 0 {
			return err
		}
		ms := int(min(left, pollSlice)+time.Millisecond-1) / int(time.Millisecond)
		fds := []unix.PollFd{{Fd: int32(fd), Events: events}}
		n, err := unix.Poll(fds, ms)
		switch {
		case err == unix.EINTR:
		case err != nil:
			return os.NewSyscallError("poll", err)
		case n > 0:
			// Ready, or POLLERR/POLLHUP: the next syscall will tell which.
			return nil
		}
	}
}

// SetDeadline implements net.Conn.
func (c *Conn) SetDeadline(t time.Time) error { return c.setDeadline(t, true, true) }

// SetReadDeadline implements net.Conn.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.setDeadline(t, true, false) }

// SetWriteDeadline implements net.Conn.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.setDeadline(t, false, true) }

func (c *Conn) setDeadline(t time.Time, r, w bool) error {
	c.mu.Lock()
	if d := c.nc.Load(); d != nil {
		c.mu.Unlock()
		switch {
		case r && w:
			return d.SetDeadline(t)
		case r:
			return d.SetReadDeadline(t)
		}
		return d.SetWriteDeadline(t)
	}
	defer c.mu.Unlock()
	if c.closed.Load() {
		return c.opErr("set", net.ErrClosed)
	}
	var ns int64
	if !t.IsZero() {
		ns = max(t.UnixNano(), 1) // 0 means no deadline
	}
	if r {
		c.rdl.Store(ns)
	}
	if w {
		c.wdl.Store(ns)
	}
	return nil
}

// LocalAddr implements net.Conn.
func (c *Conn) LocalAddr() net.Addr {
	if d := c.nc.Load(); d != nil {
		return d.LocalAddr()
	}
	return c.laddr
}

// RemoteAddr implements net.Conn.
func (c *Conn) RemoteAddr() net.Addr {
	if d := c.nc.Load(); d != nil {
		return d.RemoteAddr()
	}
	return c.raddr
}

// SetNoDelay sets TCP_NODELAY (on by default, as in package net). It is a
// no-op on Unix sockets.
func (c *Conn) SetNoDelay(noDelay bool) error {
	if c.network == "unix" {
		return nil
	}
	if d := c.nc.Load(); d != nil {
		if tc, ok := d.Conn.(*net.TCPConn); ok {
			return tc.SetNoDelay(noDelay)
		}
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fd < 0 || c.closed.Load() {
		return c.opErr("set", net.ErrClosed)
	}
	v := 0
	if noDelay {
		v = 1
	}
	if err := unix.SetsockoptInt(c.fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, v); err != nil {
		return c.opErr("set", os.NewSyscallError("setsockopt TCP_NODELAY", err))
	}
	return nil
}

// Detach hands the fd over to an event loop and returns it. It is valid
// only in the blocking state with no Read or Write in progress; afterwards
// Read and Write fail with [ErrDetached], addresses and deadlines still
// work, and the fd stays open (still O_NONBLOCK) until Close or UseNetpoll.
func (c *Conn) Detach() (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed.Load():
		return -1, fmt.Errorf("netfd: detach: %w", net.ErrClosed)
	case c.state != stateBlocking:
		return -1, errors.New("netfd: detach: connection is not in the blocking state")
	case c.refs > 0:
		return -1, errors.New("netfd: detach: a Read or Write is in progress")
	}
	c.state = stateDetached
	return c.fd, nil
}

// Reattach takes the fd back from an event loop: detached → blocking, so
// that it can be detached again later (a connection kept for reuse). The
// loop must have deregistered the fd and stopped using it.
func (c *Conn) Reattach() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed.Load():
		return fmt.Errorf("netfd: reattach: %w", net.ErrClosed)
	case c.state != stateDetached:
		return errors.New("netfd: reattach: connection is not detached")
	}
	c.state = stateBlocking
	return nil
}

// Quiet reports, without waiting or reading, whether the connection in the
// blocking state is open with nothing to read. A peer that closed (EOF),
// reset, or sent bytes nobody asked for is an error: for a connection kept
// idle, any of these means it cannot be reused.
func (c *Conn) Quiet() error {
	fd, nc, err := c.enter(&c.rmu)
	if nc != nil {
		return QuietConn(nc)
	}
	if err != nil {
		return c.opErr("read", err)
	}
	defer c.exit(&c.rmu)
	if err := peekQuiet(fd); err != nil {
		return c.opErr("read", err)
	}
	return nil
}

// QuietConn is [Conn.Quiet] for any connection with a socket: one of
// package net's, or under TLS (the socket is checked, not what TLS holds).
func QuietConn(c net.Conn) error {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if nc, ok := c.(*Conn); ok {
		return nc.Quiet()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("netfd: quiet: %T has no socket", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("netfd: quiet: %w", err)
	}
	var qerr error
	if err := rc.Read(func(fd uintptr) bool {
		qerr = peekQuiet(int(fd))
		return true // never wait
	}); err != nil {
		return fmt.Errorf("netfd: quiet: %w", err)
	}
	return qerr
}

// peekQuiet looks at fd without waiting or reading: nil when there is
// nothing to read.
func peekQuiet(fd int) error {
	var b [1]byte
	for {
		n, _, err := unix.Recvfrom(fd, b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return nil
		case err != nil:
			return os.NewSyscallError("recvfrom", err)
		case n == 0:
			return io.EOF
		}
		return errors.New("unexpected bytes from an idle peer")
	}
}

// UseNetpoll hands the socket to Go's runtime poller for good: from then on
// every method delegates to a net.Conn made by net.FileConn, and the
// deadlines already set carry over. It is valid in the blocking state with
// no Read or Write in progress, or in the detached state once the event
// loop has deregistered the fd and stopped using it (the fd is closed: a
// dup of it now belongs to the runtime). On error the Conn is closed.
func (c *Conn) UseNetpoll() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.state == stateNetpoll:
		return nil
	case c.closed.Load():
		return fmt.Errorf("netfd: use netpoll: %w", net.ErrClosed)
	case c.refs > 0:
		return errors.New("netfd: use netpoll: a Read or Write is in progress")
	}
	f := os.NewFile(uintptr(c.fd), c.network+" "+c.raddr.String())
	nc, err := net.FileConn(f) // a dup, registered with the runtime poller
	f.Close()
	c.fd = -1
	if err != nil {
		c.closed.Store(true)
		return fmt.Errorf("netfd: use netpoll: %w", err)
	}
	for _, d := range []struct {
		ns  int64
		set func(time.Time) error
	}{{c.rdl.Load(), nc.SetReadDeadline}, {c.wdl.Load(), nc.SetWriteDeadline}} {
		if d.ns != 0 {
			if err := d.set(time.Unix(0, d.ns)); err != nil {
				nc.Close()
				c.closed.Store(true)
				return fmt.Errorf("netfd: use netpoll: %w", err)
			}
		}
	}
	c.state = stateNetpoll
	c.nc.Store(&delegate{nc})
	return nil
}

// Close closes the connection; later calls return nil. In the blocking
// state it shuts the socket down, which wakes a Read or Write blocked in
// another goroutine, and closes the fd once they have returned. In the
// detached state it closes the fd: the event loop must have deregistered it
// and must not use it any more.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed.Load() {
		return nil
	}
	c.closed.Store(true)
	switch c.state {
	case stateNetpoll:
		return c.nc.Load().Close()
	case stateBlocking:
		if c.refs > 0 {
			// Wake them; the last one out closes the fd (see exit).
			unix.Shutdown(c.fd, unix.SHUT_RDWR)
			return nil
		}
	}
	err := unix.Close(c.fd)
	c.fd = -1
	if err != nil {
		return c.opErr("close", os.NewSyscallError("close", err))
	}
	return nil
}
