package gate

import (
	"encoding/binary"
	"io"
)

// framedReader gives pgproto3 a client's startup and login messages
// without reading past the end of the message being read. pgproto3's
// reader keeps whatever a read returns, and bytes a client sent ahead of
// the gate's ReadyForQuery (a query in the same write as its last login
// message) stayed in that buffer when the session's sockets moved to the
// event loop: lost, and the client waited for ever. Framed, they stay in
// the socket (or in TLS's buffer) for whoever reads next. Once the
// session relays on goroutines it reads freely (relaying): framing costs a
// read per header and one per body.
type framedReader struct {
	r        io.Reader
	typed    bool    // past the StartupMessage: each message starts with a type byte
	hdr      [8]byte // the current message's header as read so far
	n        int     // bytes of hdr read
	body     int     // bytes of the current message's body still to read
	relaying bool
}

// Startup-format codes after which another startup-format message comes.
const (
	sslRequestCode    = 80877103
	gssEncRequestCode = 80877104
)

func (f *framedReader) headerLen() int {
	if f.typed {
		return 5 // type, length
	}
	return 4 // length (then the protocol version or a request's code)
}

func (f *framedReader) Read(p []byte) (int, error) {
	if f.relaying || len(p) == 0 {
		return f.r.Read(p)
	}
	want := f.body
	if h := f.headerLen(); f.n < h {
		want = h - f.n
	}
	n, err := f.r.Read(p[:min(len(p), want)])
	f.advance(p[:n])
	return n, err
}

// advance moves the framing over b, which never runs past the end of
// the current header or body (Read asks for no more).
func (f *framedReader) advance(b []byte) {
	if h := f.headerLen(); f.n < h {
		f.n += copy(f.hdr[f.n:h], b)
		if f.n < h {
			return
		}
		// The length counts itself but not the type byte. One too small
		// for its header is pgproto3's to refuse: the session ends there.
		if f.typed {
			f.body = max(0, int(binary.BigEndian.Uint32(f.hdr[1:5]))-4)
		} else {
			f.body = max(0, int(binary.BigEndian.Uint32(f.hdr[0:4]))-4)
		}
	} else {
		if !f.typed {
			f.n += copy(f.hdr[f.n:], b) // the code, to tell what comes next
		}
		f.body -= len(b)
	}
	if f.body == 0 {
		f.next()
	}
}

// next starts the next message: after an SSLRequest or a GSSENCRequest
// another startup-format one, after anything else typed ones.
func (f *framedReader) next() {
	if !f.typed {
		code := uint32(0)
		if f.n == len(f.hdr) {
			code = binary.BigEndian.Uint32(f.hdr[4:8])
		}
		f.typed = code != sslRequestCode && code != gssEncRequestCode
	}
	f.n, f.body = 0, 0
}
