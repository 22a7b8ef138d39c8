package netfd

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestDialErrors(t *testing.T) {
	closed := listen(t, "tcp")
	closedAddr := closed.Addr().String()
	closed.Close()
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	live := listen(t, "tcp")

	for _, tc := range []struct {
		name, network, address string
		ctx                    context.Context
		is                     error  // errors.Is target
		msg                    string // substring of the message
	}{
		{"refused", "tcp", closedAddr, nil, unix.ECONNREFUSED, "netfd: dial tcp " + closedAddr + ": connection refused"},
		{"cancelled", "tcp", live.Addr().String(), cancelled, context.Canceled, "netfd: dial tcp"},
		{"no socket file", "unix", filepath.Join(t.TempDir(), "none"), nil, unix.ENOENT, "netfd: dial unix"},
		{"wrong family", "tcp4", "[::1]:5432", nil, nil, "no suitable address"},
		{"bad network", "udp", "127.0.0.1:5432", nil, nil, "unknown network udp"},
		{"no port", "tcp", "127.0.0.1", nil, nil, "missing port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			c, err := Dial(ctx, tc.network, tc.address)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v is not %v", err, tc.is)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not contain %q", err, tc.msg)
			}
		})
	}
}

func TestDialHostName(t *testing.T) {
	nl := listen(t, "tcp")
	_, port, _ := net.SplitHostPort(nl.Addr().String())
	c, err := Dial(context.Background(), "tcp4", net.JoinHostPort("localhost", port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := c.RemoteAddr().String(); got != nl.Addr().String() {
		t.Errorf("RemoteAddr = %s, want %s", got, nl.Addr())
	}
}

// TestDialContextWhileConnecting dials a listener whose accept queue is
// full, so that the SYN is dropped and connect(2) stays in progress until
// the context ends.
func TestDialContextWhileConnecting(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := sockaddrToAddr(sa).String()

	// Fill the queue: dials succeed until one hangs.
	hung := false
	for i := 0; i < 5 && !hung; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		start := time.Now()
		c, err := Dial(ctx, "tcp", addr)
		cancel()
		if err == nil {
			defer c.Close()
			continue
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("dial to a full queue: %v, want context.DeadlineExceeded", err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Fatalf("dial deadline of 200ms took %v", el)
		}
		hung = true
	}
	if !hung {
		t.Fatal("no dial hung on the full accept queue")
	}

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	if c, err := Dial(ctx, "tcp", addr); err == nil {
		c.Close()
		t.Fatal("dial to a full queue succeeded")
	} else if !errors.Is(err, context.Canceled) {
		t.Fatalf("dial cancelled while connecting: %v, want context.Canceled", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("cancelled dial returned after %v", el)
	}
}

// Dialed TCP connections keep alive, as pgconn's own dialer's do.
func TestDialKeepAlive(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := Dial(context.Background(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fd, err := c.Detach()
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []struct{ level, opt, want int }{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveSeconds},
	} {
		if v, err := unix.GetsockoptInt(fd, o.level, o.opt); err != nil || v != o.want {
			t.Errorf("option %d/%d = %d, %v; want %d", o.level, o.opt, v, err, o.want)
		}
	}
}
