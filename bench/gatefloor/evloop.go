package main

import (
	"context"
	"errors"
	"io"
	"log"
	"net"
	"syscall"

	"github.com/dualkey/dualkey/internal/evloop"
	"github.com/dualkey/dualkey/internal/netfd"
)

// evloopMain relays on the gate's event loop: each side read only while
// the other side's output is flushed, as the gate's loop sessions do.
func evloopMain(listen, upstream string) {
	l, err := evloop.New()
	if err != nil {
		log.Fatal(err)
	}
	go l.Run()
	log.Printf("gatefloor: event loop on %s", l.Backend())
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		log.Fatal(err)
	}
	// netfd, as the gate: sockets that never touch Go's poller (one that
	// did would wake the runtime on every event).
	nl, err := netfd.Listen(ln)
	if err != nil {
		log.Fatal(err)
	}
	for {
		c, err := nl.Accept()
		if err != nil {
			log.Fatal(err)
		}
		u, err := netfd.Dial(context.Background(), "tcp", upstream)
		if err != nil {
			log.Print(err)
			c.Close()
			continue
		}
		p := &pipe{l: l, buf: make([]byte, 64<<10), keep: [2]*netfd.Conn{c, u}}
		if p.fds[0], err = c.Detach(); err == nil {
			p.fds[1], err = u.Detach()
		}
		if err != nil {
			log.Print(err)
			c.Close()
			u.Close()
			continue
		}
		l.Submit(p.start)
	}
}

type pipe struct {
	l    *evloop.Loop
	fds  [2]int
	keep [2]*netfd.Conn // closed when the loop lets their fds go
	out  [2]evloop.Out  // to fds[i]
	ev   [2]uint32
	buf  []byte
	done bool
}

func (p *pipe) start() {
	for i, fd := range p.fds {
		p.ev[i] = evloop.Readable
		if err := p.l.AddConn(fd, p, evloop.Readable); err != nil {
			log.Print(err)
			p.end()
			return
		}
	}
}

func (p *pipe) Ready(fd int, _ uint32) {
	if p.done {
		return
	}
	i := 0
	if fd == p.fds[1] {
		i = 1
	}
	if p.out[1-i].Pending() == 0 {
		n, err := p.l.Read(fd, p.buf)
		switch {
		case err == nil:
			p.out[1-i].Write(p.buf[:n])
		case errors.Is(err, syscall.EAGAIN):
		case err == io.EOF || err != nil:
			p.end()
			return
		}
	}
	for j := range p.fds {
		if p.out[j].Pending() > 0 {
			if _, err := p.l.Flush(p.fds[j], &p.out[j]); err != nil {
				p.end()
				return
			}
		}
	}
	for j := range p.fds {
		var ev uint32
		if p.out[1-j].Pending() == 0 {
			ev |= evloop.Readable
		}
		if p.out[j].Pending() > 0 {
			ev |= evloop.Writable
		}
		if ev != p.ev[j] {
			p.ev[j] = ev
			p.l.Mod(p.fds[j], ev)
		}
	}
}

func (p *pipe) end() {
	p.done = true
	for i, fd := range p.fds {
		p.l.Release(fd, func(in, out []byte) { p.keep[i].Close() })
	}
}
