// Command gatefloor is a PostgreSQL proxy that does nothing: it copies bytes
// between each client and its own upstream connection, parsing nothing,
// recording nothing. bench/gate.sh runs it beside PgBouncer and the gate to
// show what a Go relay costs before any of the gate's work: the floor the
// gate's own design can reach on this machine.
//
//	netpoll  two goroutines per connection and io.Copy: Go's runtime network
//	         poller, as the gate uses it (a read that finds nothing parks the
//	         goroutine and is tried again when epoll reports data)
//	epoll    one OS thread, raw non-blocking sockets and epoll, read then
//	         write inline, as PgBouncer (libevent) works: no goroutine
//	         hand-offs and no speculative reads
//	evloop   the gate's own event loop (internal/evloop, io_uring where the
//	         kernel has it) with the gate's flow control, and nothing else
//
// Loopback only; no TLS, no authentication of its own (the server's SCRAM
// passes through). Not part of dualkey.
package main

import (
	"errors"
	"flag"
	"io"
	"log"
	"net"
	"net/netip"
	"runtime"
	"syscall"
	"unsafe"
)

func main() {
	mode := flag.String("mode", "netpoll", "netpoll, epoll or evloop")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (IPv4 loopback)")
	upstream := flag.String("upstream", "", "PostgreSQL's address (IPv4)")
	flag.Parse()
	if *upstream == "" {
		log.Fatal("gatefloor: -upstream is required")
	}
	switch *mode {
	case "netpoll":
		netpollMain(*listen, *upstream)
	case "epoll":
		epollMain(*listen, *upstream)
	case "evloop":
		evloopMain(*listen, *upstream)
	default:
		log.Fatalf("gatefloor: unknown mode %q", *mode)
	}
}

func netpollMain(listen, upstream string) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		log.Fatal(err)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				log.Print(err)
				c.Close()
				return
			}
			go func() { io.Copy(u, c); u.Close() }()
			io.Copy(c, u)
			c.Close()
		}()
	}
}

func sockaddr(s string) *syscall.SockaddrInet4 {
	ap, err := netip.ParseAddrPort(s)
	if err != nil || !ap.Addr().Is4() {
		log.Fatalf("gatefloor: %q is not an IPv4 address:port", s)
	}
	return &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
}

func epollMain(listen, upstream string) {
	lfd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		log.Fatal(err)
	}
	syscall.SetsockoptInt(lfd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	if err := syscall.Bind(lfd, sockaddr(listen)); err != nil {
		log.Fatal(err)
	}
	if err := syscall.Listen(lfd, 128); err != nil {
		log.Fatal(err)
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		log.Fatal(err)
	}
	peers := map[int32]int32{}
	add := func(fd int) {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(fd)}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
			log.Fatal(err)
		}
	}
	add(lfd)
	runtime.LockOSThread()
	evs := make([]syscall.EpollEvent, 128)
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.EpollWait(epfd, evs, -1)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			log.Fatal(err)
		}
		for _, ev := range evs[:n] {
			fd := int(ev.Fd)
			if fd == lfd {
				cfd, _, err := syscall.Accept4(lfd, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
				if err != nil {
					continue
				}
				ufd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
				if err == nil {
					err = syscall.Connect(ufd, sockaddr(upstream)) // blocking: loopback, at once
				}
				if err != nil {
					log.Print(err)
					syscall.Close(cfd)
					continue
				}
				syscall.SetNonblock(ufd, true)
				for _, s := range []int{cfd, ufd} {
					syscall.SetsockoptInt(s, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
					add(s)
				}
				peers[int32(cfd)], peers[int32(ufd)] = int32(ufd), int32(cfd)
				continue
			}
			peer, ok := peers[int32(fd)]
			if !ok {
				continue
			}
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
			if e == syscall.EAGAIN {
				continue
			}
			if e != 0 || r == 0 || !writeAll(int(peer), buf[:r]) {
				delete(peers, int32(fd))
				delete(peers, peer)
				syscall.Close(fd) // closing removes both from the epoll set
				syscall.Close(int(peer))
			}
		}
	}
}

// writeAll writes data to a non-blocking socket, waiting in poll(2) when
// its send buffer is full (rare: PostgreSQL messages are small).
func writeAll(fd int, data []byte) bool {
	for len(data) > 0 {
		w, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&data[0])), uintptr(len(data)))
		switch e {
		case 0:
			data = data[w:]
		case syscall.EAGAIN:
			pfd := [1]struct {
				fd             int32
				events, revent int16
			}{{fd: int32(fd), events: 0x4}} // POLLOUT
			syscall.Syscall(syscall.SYS_POLL, uintptr(unsafe.Pointer(&pfd[0])), 1, 1000)
		default:
			return false
		}
	}
	return true
}
