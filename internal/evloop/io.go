package evloop

import (
	"io"
	"syscall"
	"unsafe"
)

// Read reads what a non-blocking fd has: n > 0 bytes, or io.EOF, or
// syscall.EAGAIN when nothing is there yet, or the socket's error. Raw
// system calls: on a non-blocking socket they never block, and the
// runtime need not be told.
func Read(fd int, p []byte) (int, error) {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch {
		case e == syscall.EINTR:
			continue
		case e != 0:
			return 0, e
		case r == 0:
			return 0, io.EOF
		}
		return int(r), nil
	}
}

func write(fd int, p []byte) (int, error) {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(r), nil
	}
}

// Out collects what is to be written to a non-blocking fd: Write only
// appends, Flush writes what the socket takes and keeps the rest, so one
// system call carries everything a round of events produced.
type Out struct {
	buf []byte
	off int
}

// maxIdleOut is the capacity an emptied Out keeps: a large result set
// should not pin its buffer for the rest of the session.
const maxIdleOut = 256 << 10

// Write appends p. It never fails.
func (o *Out) Write(p []byte) (int, error) {
	o.buf = append(o.buf, p...)
	return len(p), nil
}

// Pending returns the number of bytes not yet written.
func (o *Out) Pending() int { return len(o.buf) - o.off }

// Flush writes to fd until everything is written (true) or the socket's
// buffer is full (false, nil: wait for Out readiness and flush again).
func (o *Out) Flush(fd int) (bool, error) {
	for o.off < len(o.buf) {
		n, err := write(fd, o.buf[o.off:])
		if err == syscall.EAGAIN {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		o.off += n
	}
	o.reset()
	return true, nil
}

func (o *Out) reset() {
	o.off = 0
	if cap(o.buf) > maxIdleOut {
		o.buf = nil
	} else {
		o.buf = o.buf[:0]
	}
}

// Take returns the bytes not yet written and empties o: for handing the
// fd over to a writer of another kind.
func (o *Out) Take() []byte {
	p := append([]byte(nil), o.buf[o.off:]...)
	o.reset()
	return p
}
