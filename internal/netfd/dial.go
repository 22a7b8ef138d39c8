package netfd

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// Dial connects to address on network "tcp", "tcp4", "tcp6" or "unix" and
// returns the Conn in the blocking state. Host names are resolved with
// net.DefaultResolver and each address is tried in turn; ctx bounds the
// whole dial. TCP conns get TCP_NODELAY, as package net's.
//
// As pgconn.Config.DialFunc:
//
//	func(ctx context.Context, network, addr string) (net.Conn, error) { return netfd.Dial(ctx, network, addr) }
//
// (on error that net.Conn is a non-nil interface holding a nil *Conn;
// pgconn looks only at the error).
func Dial(ctx context.Context, network, address string) (*Conn, error) {
	fail := func(addr net.Addr, err error) error {
		return fmt.Errorf("netfd: %w", &net.OpError{Op: "dial", Net: network, Addr: addr, Err: err})
	}
	if network == "unix" {
		c, err := dialOne(ctx, unix.AF_UNIX, &unix.SockaddrUnix{Name: address})
		if err != nil {
			return nil, fail(&net.UnixAddr{Name: address, Net: network}, err)
		}
		return c, nil
	}
	addrs, err := resolve(ctx, network, address)
	if err != nil {
		return nil, fail(nil, err)
	}
	var first error
	for _, ap := range addrs {
		family, sa := tcpSockaddr(ap)
		c, err := dialOne(ctx, family, sa)
		if err == nil {
			return c, nil
		}
		if first == nil {
			first = fail(net.TCPAddrFromAddrPort(ap), err)
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, first
}

// resolve returns the addresses to try for a TCP address.
func resolve(ctx context.Context, network, address string) ([]netip.AddrPort, error) {
	var ipNet string
	switch network {
	case "tcp":
		ipNet = "ip"
	case "tcp4":
		ipNet = "ip4"
	case "tcp6":
		ipNet = "ip6"
	default:
		return nil, net.UnknownNetworkError(network)
	}
	host, service, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	port, err := net.DefaultResolver.LookupPort(ctx, network, service)
	if err != nil {
		return nil, err
	}
	var ips []netip.Addr
	if host == "" {
		// As package net: no host means the local system.
		ips = []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1})}
		if network == "tcp6" {
			ips = []netip.Addr{netip.IPv6Loopback()}
		}
	} else if ip, err := netip.ParseAddr(host); err == nil {
		ips = []netip.Addr{ip}
	} else if ips, err = net.DefaultResolver.LookupNetIP(ctx, ipNet, host); err != nil {
		return nil, err
	}
	var out []netip.AddrPort
	for _, ip := range ips {
		if network != "tcp6" {
			ip = ip.Unmap()
		}
		if (network == "tcp4" && !ip.Is4()) || (network == "tcp6" && !ip.Is6()) {
			continue
		}
		out = append(out, netip.AddrPortFrom(ip, uint16(port)))
	}
	if len(out) == 0 {
		return nil, &net.AddrError{Err: "no suitable address found", Addr: host}
	}
	return out, nil
}

func tcpSockaddr(ap netip.AddrPort) (int, unix.Sockaddr) {
	ip, port := ap.Addr(), int(ap.Port())
	if ip.Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Port: port, Addr: ip.As4()}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Port: port, Addr: ip.As16(), ZoneId: zoneID(ip.Zone())}
}

func zoneID(zone string) uint32 {
	if zone == "" {
		return 0
	}
	if ifi, err := net.InterfaceByName(zone); err == nil {
		return uint32(ifi.Index)
	}
	n, _ := strconv.Atoi(zone)
	return uint32(n)
}

// dialOne connects a new non-blocking socket to sa, waiting for the
// connection in poll(2) slices so that ctx is honored.
func dialOne(ctx context.Context, family int, sa unix.Sockaddr) (*Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	if err := connect(ctx, fd, sa); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if family != unix.AF_UNIX {
		// As pgconn's own dialer: a peer that vanished without a word is
		// noticed after minutes, not never.
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveSeconds)
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveSeconds)
	}
	c, err := newConn(fd, sa)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return c, nil
}

// keepAliveSeconds is pgconn's default dialer's TCP keep-alive (5 min).
const keepAliveSeconds = 300

func connect(ctx context.Context, fd int, sa unix.Sockaddr) error {
	switch err := unix.Connect(fd, sa); err {
	case nil:
		return nil
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
		// The connection goes on asynchronously (EINTR included).
	default:
		return err
	}
	for {
		err := waitFD(fd, unix.POLLOUT, func() (time.Duration, error) {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
			if dl, ok := ctx.Deadline(); ok {
				return time.Until(dl), context.DeadlineExceeded
			}
			return pollSlice, nil
		})
		if err != nil {
			return err
		}
		soErr, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			return os.NewSyscallError("getsockopt SO_ERROR", err)
		}
		switch err := unix.Errno(soErr); err {
		case 0, unix.EISCONN:
			return nil
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
		default:
			return err
		}
	}
}
