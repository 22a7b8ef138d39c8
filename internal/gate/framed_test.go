package gate

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"testing"
	"testing/iotest"

	"github.com/jackc/pgx/v5/pgproto3"
)

// counted counts the bytes read from r.
type counted struct {
	r io.Reader
	n int
}

func (c *counted) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// loginSteps receives startup-format messages and then typed ones from be
// as the gate does, until an error, and reports after each message what
// it was and how many bytes of the input had been read.
func loginSteps(be *pgproto3.Backend, read *counted) []string {
	be.SetMaxBodyLen(1 << 16) // as the gate does: no allocation of what a length claims
	var steps []string
	typed := false
	for len(steps) < 64 {
		var m any
		var err error
		if !typed {
			m, err = be.ReceiveStartupMessage()
			switch m.(type) {
			case *pgproto3.SSLRequest, *pgproto3.GSSEncRequest:
			default:
				typed = true
			}
			be.SetAuthType(pgproto3.AuthTypeSASL)
		} else {
			m, err = be.Receive()
		}
		if err != nil {
			return append(steps, fmt.Sprintf("error after %d bytes", read.n))
		}
		steps = append(steps, fmt.Sprintf("%T after %d bytes", m, read.n))
	}
	return steps
}

func startupMsg(code uint32, rest string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(8+len(rest)))
	b = binary.BigEndian.AppendUint32(b, code)
	return append(b, rest...)
}

func framedSeeds() [][]byte {
	startup := startupMsg(196608, "user\x00alice\x00database\x00shop\x00\x00")
	sasl := msg('p', "SCRAM-SHA-256\x00\x00\x00\x00\x05n,,n=")
	query := msg('Q', "SELECT 1\x00")
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	return [][]byte{
		cat(startup, sasl, msg('p', "c=biws"), query, query),
		cat(startupMsg(sslRequestCode, ""), startup, sasl, query),
		cat(startupMsg(gssEncRequestCode, ""), startupMsg(sslRequestCode, ""), startup, query),
		cat(startupMsg(80877102, "\x00\x00\x00\x01\x00\x00\x00\x02")), // CancelRequest
		cat(startup, []byte{'p', 0, 0, 0, 2}, query),                  // a length below its own size
		cat(startup, []byte{'p', 0xff, 0xff, 0xff, 0xff}),             // too long
		startup[:11],
		cat(startup, query[:6]),
		{0, 0, 0, 3},
	}
}

// TestFramedReader: through framedReader, pgproto3 reads exactly the bytes
// of the messages it returns, however much each read could return: the
// same as when every read returns one byte, where it cannot read ahead.
func TestFramedReader(t *testing.T) {
	for i, in := range framedSeeds() {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			checkFramed(t, in)
		})
	}
	// And without framing pgproto3 does read ahead: the test can fail.
	in := framedSeeds()[0]
	greedy := &counted{r: bytes.NewReader(in)}
	exact := &counted{r: iotest.OneByteReader(bytes.NewReader(in))}
	if a, b := loginSteps(pgproto3.NewBackend(greedy, io.Discard), greedy), loginSteps(pgproto3.NewBackend(exact, io.Discard), exact); fmt.Sprint(a) == fmt.Sprint(b) {
		t.Fatalf("pgproto3 read no further than its messages without framing: %q", a)
	}
}

func checkFramed(t *testing.T, in []byte) {
	t.Helper()
	exact := &counted{r: iotest.OneByteReader(bytes.NewReader(in))}
	want := loginSteps(pgproto3.NewBackend(exact, io.Discard), exact)
	framed := &counted{r: bytes.NewReader(in)}
	got := loginSteps(pgproto3.NewBackend(&framedReader{r: framed}, io.Discard), framed)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("framed: %q\nwant (one byte per read): %q", got, want)
	}
}

// FuzzFramedReader: the framing is parsed from what a client sends before
// it has logged in.
func FuzzFramedReader(f *testing.F) {
	for _, in := range framedSeeds() {
		f.Add(in)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		checkFramed(t, in)
	})
}
