package main

import (
	"errors"
	"io"
	"log"
	"net"
	"syscall"

	"github.com/dualkey/dualkey/internal/evloop"
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
	for {
		c, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		u, err := net.Dial("tcp", upstream)
		if err != nil {
			log.Print(err)
			c.Close()
			continue
		}
		p := &pipe{l: l, buf: make([]byte, 64<<10)}
		p.fds[0], p.keep[0] = rawFd(c)
		p.fds[1], p.keep[1] = rawFd(u)
		l.Submit(p.start)
	}
}

// rawFd returns a dup of c's socket (non-blocking), and c to keep open.
func rawFd(c net.Conn) (int, net.Conn) {
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		log.Fatal(err)
	}
	fd, err := syscall.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		log.Fatal(err)
	}
	syscall.SetNonblock(fd, true)
	return fd, c
}

type pipe struct {
	l    *evloop.Loop
	fds  [2]int
	keep [2]net.Conn
	out  [2]evloop.Out // to fds[i]
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
		p.l.Release(fd, func(in, out []byte) {
			syscall.Close(fd)
			p.keep[i].Close()
		})
	}
}
