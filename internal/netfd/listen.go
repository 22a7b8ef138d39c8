package netfd

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrTemporary matches (under errors.Is) the Accept errors worth retrying
// after a pause: EMFILE, ENFILE, ENOBUFS, ENOMEM (resource exhaustion) and
// ECONNABORTED (the peer gave up before we accepted). Such an error is a
// *net.OpError whose Timeout() is false; errors.Is also matches its errno.
var ErrTemporary = errors.New("netfd: temporary accept error")

type temporaryError struct{ err error }

func (e temporaryError) Error() string        { return e.err.Error() }
func (e temporaryError) Unwrap() error        { return e.err }
func (e temporaryError) Is(target error) bool { return target == ErrTemporary }
func (e temporaryError) Timeout() bool        { return false }
func (e temporaryError) Temporary() bool      { return true }

// Listener accepts connections as [Conn]s, on its own dup of a Go
// listener's socket. The original listener stays registered with the
// runtime poller, which costs one runtime wake-up per incoming connection
// (never per message); the accepted sockets never touch the poller.
type Listener struct {
	mu     sync.Mutex // guards fd, refs
	fd     int
	refs   int // Accepts using fd outside mu
	closed atomic.Bool
	addr   net.Addr
}

// Listen makes a Listener from a *net.TCPListener or *net.UnixListener.
// The caller still owns ln and closes it (after or before l.Close: each
// closes only its own fd).
func Listen(ln net.Listener) (*Listener, error) {
	var sc syscall.Conn
	switch ln := ln.(type) {
	case *net.TCPListener:
		sc = ln
	case *net.UnixListener:
		sc = ln
	default:
		return nil, fmt.Errorf("netfd: listen: unsupported listener %T", ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("netfd: listen %s: %w", ln.Addr(), err)
	}
	// Dup the fd ourselves rather than via File(): that *os.File would be
	// registered with the runtime poller, and its Fd() makes the shared
	// open file description blocking.
	fd := -1
	var dupErr error
	if err := rc.Control(func(s uintptr) {
		fd, dupErr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("netfd: listen %s: %w", ln.Addr(), err)
	}
	if dupErr != nil {
		return nil, fmt.Errorf("netfd: listen %s: %w", ln.Addr(), os.NewSyscallError("dup", dupErr))
	}
	// Already so (the description is shared with Go's non-blocking fd), but
	// accept4 must never block.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netfd: listen %s: %w", ln.Addr(), os.NewSyscallError("setnonblock", err))
	}
	return &Listener{fd: fd, addr: ln.Addr()}, nil
}

// Addr returns the listener's address.
func (l *Listener) Addr() net.Addr { return l.addr }

func (l *Listener) opErr(err error) error {
	return &net.OpError{Op: "accept", Net: l.addr.Network(), Addr: l.addr, Err: err}
}

// Accept waits for a connection and returns it in the blocking state. A
// Close from another goroutine makes it return net.ErrClosed within about
// 50 ms. Errors matching [ErrTemporary] may be retried.
func (l *Listener) Accept() (*Conn, error) {
	return l.accept(true)
}

// TryAccept returns a waiting connection, or an error matching
// syscall.EAGAIN when there is none: for an event loop that watches Fd.
func (l *Listener) TryAccept() (*Conn, error) {
	return l.accept(false)
}

// Fd returns the Listener's own fd, to watch for readability (a
// connection waits). Only while the Listener is open.
func (l *Listener) Fd() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.fd
}

func (l *Listener) accept(wait bool) (*Conn, error) {
	l.mu.Lock()
	if l.closed.Load() {
		l.mu.Unlock()
		return nil, l.opErr(net.ErrClosed)
	}
	fd := l.fd
	l.refs++
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.refs--
		if l.refs == 0 && l.closed.Load() && l.fd >= 0 {
			unix.Close(l.fd)
			l.fd = -1
		}
		l.mu.Unlock()
	}()

	for {
		nfd, rsa, err := unix.Accept4(fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch err {
		case nil:
			c, err := newConn(nfd, rsa)
			if err != nil {
				unix.Close(nfd)
				return nil, l.opErr(err)
			}
			return c, nil
		case unix.EINTR:
		case unix.EAGAIN:
			if !wait {
				return nil, l.opErr(os.NewSyscallError("accept4", err))
			}
			err := waitFD(fd, unix.POLLIN, func() (time.Duration, error) {
				if l.closed.Load() {
					return 0, net.ErrClosed
				}
				return pollSlice, nil
			})
			if err != nil {
				return nil, l.opErr(err)
			}
		case unix.EMFILE, unix.ENFILE, unix.ENOBUFS, unix.ENOMEM, unix.ECONNABORTED:
			return nil, l.opErr(temporaryError{os.NewSyscallError("accept4", err)})
		default:
			if l.closed.Load() {
				return nil, l.opErr(net.ErrClosed)
			}
			return nil, l.opErr(os.NewSyscallError("accept4", err))
		}
	}
}

// Close closes the Listener's own fd (not the net.Listener it was made
// from), once any Accept blocked in another goroutine has returned. Later
// calls return nil.
func (l *Listener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed.Swap(true) || l.refs > 0 {
		return nil
	}
	err := unix.Close(l.fd)
	l.fd = -1
	if err != nil {
		return l.opErr(os.NewSyscallError("close", err))
	}
	return nil
}
