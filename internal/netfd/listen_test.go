package netfd

import (
	"context"
	"errors"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

func (l *Listener) inSyscall() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.refs > 0
}

func TestListenerCloseWakesAccept(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			nl := listen(t, network)
			l, err := Listen(nl)
			if err != nil {
				t.Fatal(err)
			}
			if l.Addr().String() != nl.Addr().String() {
				t.Errorf("Addr = %v, want %v", l.Addr(), nl.Addr())
			}
			done := make(chan error, 1)
			go func() {
				_, err := l.Accept()
				done <- err
			}()
			waitFor(t, "Accept to block", l.inSyscall)
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if err := await(t, done); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Accept after Close = %v, want net.ErrClosed", err)
			}
			if l.fd != -1 {
				t.Errorf("fd %d still open after Accept returned", l.fd)
			}
			if err := l.Close(); err != nil {
				t.Errorf("second Close = %v", err)
			}
			if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
				t.Errorf("Accept on a closed Listener = %v", err)
			}

			// Only the dup was closed: the Go listener still works.
			go func() {
				if c, err := net.Dial(nl.Addr().Network(), nl.Addr().String()); err == nil {
					c.Close()
				}
			}()
			c, err := nl.Accept()
			if err != nil {
				t.Fatalf("original listener after Listener.Close: %v", err)
			}
			c.Close()
		})
	}
}

func TestListenUnsupported(t *testing.T) {
	if _, err := Listen(fakeListener{}); err == nil {
		t.Error("Listen accepted a listener without a socket")
	}
}

type fakeListener struct{ net.Listener }

// TestAcceptEMFILE runs out of fds while a connection is waiting: Accept
// reports a temporary error and succeeds once fds are available again.
func TestAcceptEMFILE(t *testing.T) {
	nl := listen(t, "tcp")
	l, err := Listen(nl)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := Dial(context.Background(), "tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	var saved unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatal(err)
	}
	lowestFree, err := unix.Dup(0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(lowestFree)
	// No fd number below the limit is free: the next one cannot be made.
	lim := saved
	lim.Cur = uint64(lowestFree)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Skipf("setrlimit: %v", err)
	}
	_, err = l.Accept()
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatal(err)
	}
	var ne net.Error
	if !errors.Is(err, ErrTemporary) || !errors.Is(err, unix.EMFILE) || !errors.As(err, &ne) || ne.Timeout() {
		t.Fatalf("Accept out of fds = %v; want ErrTemporary and EMFILE, a net.Error, not a timeout", err)
	}
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept after the limit was restored: %v", err)
	}
	c.Close()
}

// TryAccept never waits: EAGAIN with nobody connecting, the connection
// once its fd polls readable.
func TestTryAccept(t *testing.T) {
	nl := listen(t, "tcp")
	l, err := Listen(nl)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if c, err := l.TryAccept(); !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("TryAccept with nobody connecting: %v, %v", c, err)
	}
	peer, err := Dial(context.Background(), "tcp", nl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	fds := []unix.PollFd{{Fd: int32(l.Fd()), Events: unix.POLLIN}}
	if n, err := unix.Poll(fds, 5000); n != 1 || err != nil {
		t.Fatalf("the listener's fd never became readable: %d, %v", n, err)
	}
	c, err := l.TryAccept()
	if err != nil {
		t.Fatalf("TryAccept with a connection waiting: %v", err)
	}
	defer c.Close()
	if _, err := peer.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil || string(buf) != "hi" {
		t.Fatalf("read %q, %v", buf, err)
	}
}
