package pgagent

import (
	"io"
	"sync"
)

// readAhead reads r in its own goroutine, a few buffers ahead of its
// consumer. A base backup arrives as one stream that one goroutine must
// parse (protocol, tar, checksums, pages); moving the socket reads to
// another goroutine takes their syscalls off that path.
//
// The goroutine ends when r fails (a closed connection included) or when
// Close is called; Read returns r's error once the data before it is
// consumed.
type readAhead struct {
	full chan chunk  // filled buffers, in order
	free chan []byte // consumed buffers, for reuse
	done chan struct{}
	cur  chunk // being consumed
	off  int
	once sync.Once
	r    io.Reader
	size int
}

type chunk struct {
	buf []byte // a buffer from free (or new) holding n bytes
	n   int
	err error // r's error after these bytes
}

// newReadAhead returns a reader of r that keeps up to depth buffers of
// size bytes read ahead. Reading starts with the first Read, so a
// connection's startup exchange is not read ahead of its owner.
func newReadAhead(r io.Reader, size, depth int) *readAhead {
	return &readAhead{r: r, size: size, full: make(chan chunk, depth), free: make(chan []byte, depth+1), done: make(chan struct{})}
}

// Close stops the goroutine once r's current Read returns: close the
// connection under it first, or that Read may wait for data.
func (a *readAhead) Close() { close(a.done) }

func (a *readAhead) fill() {
	for {
		var buf []byte
		select {
		case buf = <-a.free:
		default:
			buf = make([]byte, a.size)
		}
		n, err := a.r.Read(buf)
		select {
		case a.full <- chunk{buf: buf, n: n, err: err}:
		case <-a.done:
			return
		}
		if err != nil {
			return
		}
	}
}

func (a *readAhead) Read(p []byte) (int, error) {
	a.once.Do(func() { go a.fill() })
	for a.off == a.cur.n {
		if a.cur.err != nil {
			return 0, a.cur.err
		}
		if a.cur.buf != nil {
			select {
			case a.free <- a.cur.buf:
			default:
			}
		}
		a.cur, a.off = <-a.full, 0
	}
	n := copy(p, a.cur.buf[a.off:a.cur.n])
	a.off += n
	return n, nil
}
