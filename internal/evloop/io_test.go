package evloop_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dualkey/dualkey/internal/evloop"
)

func TestRead(t *testing.T) {
	type result struct {
		data string
		err  error
	}
	tests := []struct {
		name   string
		writes []string
		peer   string // "close", "shutdown" (SHUT_WR) or ""
		buf    int
		want   []result
	}{
		{"nothing yet", nil, "", 16, []result{{"", syscall.EAGAIN}, {"", syscall.EAGAIN}}},
		{"one message", []string{"hello"}, "", 16, []result{{"hello", nil}, {"", syscall.EAGAIN}}},
		{"two writes, one read", []string{"ab", "cd"}, "", 16, []result{{"abcd", nil}, {"", syscall.EAGAIN}}},
		{"buffer smaller than the data", []string{"abcdefg"}, "", 3, []result{{"abc", nil}, {"def", nil}, {"g", nil}, {"", syscall.EAGAIN}}},
		{"peer closed", nil, "close", 16, []result{{"", io.EOF}, {"", io.EOF}}},
		{"data, then peer closed", []string{"bye"}, "close", 16, []result{{"bye", nil}, {"", io.EOF}}},
		{"peer shut down writing", []string{"half"}, "shutdown", 16, []result{{"half", nil}, {"", io.EOF}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t)
			for _, w := range tc.writes {
				writeAll(t, p.b, []byte(w))
			}
			switch tc.peer {
			case "close":
				closeFd(&p.b)
			case "shutdown":
				if err := unix.Shutdown(p.b, unix.SHUT_WR); err != nil {
					t.Fatal(err)
				}
			}
			buf := make([]byte, tc.buf)
			for i, w := range tc.want {
				n, err := evloop.Read(p.a, buf)
				if string(buf[:n]) != w.data || err != w.err {
					t.Fatalf("read %d: (%q, %v), want (%q, %v)", i, buf[:n], err, w.data, w.err)
				}
			}
		})
	}
	t.Run("bad fd", func(t *testing.T) {
		if n, err := evloop.Read(-1, make([]byte, 8)); n != 0 || err != syscall.EBADF {
			t.Errorf("(%d, %v), want (0, EBADF)", n, err)
		}
	})
}

// pattern returns n bytes that differ wherever they are cut, lost or
// repeated.
func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	rand.NewChaCha8([32]byte{seed}).Read(p)
	return p
}

// readN reads exactly n bytes from the non-blocking fd, waiting for them
// at most d. It does not use t: it runs on its own goroutine.
func readN(fd, n int, d time.Duration) ([]byte, error) {
	got := make([]byte, 0, n)
	buf := make([]byte, 64<<10)
	deadline := time.Now().Add(d)
	for len(got) < n {
		k, err := evloop.Read(fd, buf[:min(len(buf), n-len(got))])
		switch {
		case err == nil:
			got = append(got, buf[:k]...)
		case err == syscall.EAGAIN:
			if time.Now().After(deadline) {
				return got, fmt.Errorf("timed out after %d of %d bytes", len(got), n)
			}
			unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 50)
		default:
			return got, fmt.Errorf("after %d of %d bytes: %w", len(got), n, err)
		}
	}
	return got, nil
}

// noMore checks that nothing beyond what was read arrives at fd.
func noMore(t *testing.T, fd int) {
	t.Helper()
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 20)
	var b [1]byte
	if n, err := evloop.Read(fd, b[:]); err != syscall.EAGAIN {
		t.Errorf("more bytes than written arrived: (%d, %v)", n, err)
	}
}

func sameBytes(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	t.Errorf("%s: %d bytes, want %d; first difference at byte %d", what, len(got), len(want), i)
}

type socketKind struct {
	name string
	// small: buffers small enough that a few MiB do not fit
	pair func(t *testing.T, small bool) *pair
}

var socketKinds = []socketKind{
	{"unix", func(t *testing.T, small bool) *pair {
		p := newPair(t)
		if small {
			if err := unix.SetsockoptInt(p.a, unix.SOL_SOCKET, unix.SO_SNDBUF, 16<<10); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}},
	{"tcp", func(t *testing.T, small bool) *pair {
		if small {
			return tcpPair(t, 32<<10, 64<<10)
		}
		return tcpPair(t, 0, 0)
	}},
}

func TestOutWrite(t *testing.T) {
	p := newPair(t)
	var o evloop.Out
	if o.Pending() != 0 {
		t.Fatalf("a new Out has %d pending", o.Pending())
	}
	total := 0
	for _, size := range []int{0, 1, 100, 64 << 10, 300 << 10} {
		n, err := o.Write(pattern(size, byte(size)))
		total += size
		if n != size || err != nil {
			t.Errorf("Write(%d bytes) = (%d, %v)", size, n, err)
		}
		if o.Pending() != total {
			t.Errorf("after writing %d bytes Pending is %d", total, o.Pending())
		}
	}
	// Write made no system call: the peer has nothing. (Out has no fd
	// until Flush; this checks nothing went anywhere else.)
	noMore(t, p.b)
	// Flush with nothing pending makes no system call either: even a bad
	// fd is fine.
	var empty evloop.Out
	if ok, err := empty.Flush(-1); !ok || err != nil {
		t.Errorf("Flush of an empty Out = (%v, %v), want (true, nil)", ok, err)
	}
}

func TestOutFlush(t *testing.T) {
	for _, kind := range socketKinds {
		t.Run(kind.name, func(t *testing.T) {
			p := kind.pair(t, false)
			var o evloop.Out
			for round, sizes := range [][]int{{5, 1000, 20}, {1}, {8 << 10, 8 << 10}} {
				var want []byte
				for i, size := range sizes {
					piece := pattern(size, byte(10*round+i))
					o.Write(piece)
					want = append(want, piece...)
				}
				ok, err := o.Flush(p.a)
				if !ok || err != nil || o.Pending() != 0 {
					t.Fatalf("round %d: Flush = (%v, %v), Pending %d; want (true, nil), 0", round, ok, err, o.Pending())
				}
				got, err := readN(p.b, len(want), patience)
				if err != nil {
					t.Fatal(err)
				}
				sameBytes(t, fmt.Sprint("round ", round), got, want)
				noMore(t, p.b)
			}
		})
	}
}

// TestOutBackpressure fills a socket whose peer does not read, then lets
// the loop flush the rest on Writable readiness, as the gate does, while
// the peer reads: every byte arrives, in order, once.
func TestOutBackpressure(t *testing.T) {
	const size, chunk = 4 << 20, 64 << 10
	for _, kind := range socketKinds {
		for _, appending := range []bool{false, true} {
			name := kind.name + "/all written first"
			if appending {
				name = kind.name + "/written while flushing"
			}
			t.Run(name, func(t *testing.T) {
				data := pattern(size, 42)
				var chunks [][]byte
				for off := 0; off < size; off += chunk {
					chunks = append(chunks, data[off:off+chunk])
				}
				p := kind.pair(t, true)
				var o evloop.Out
				next := len(chunks)
				if appending {
					next = len(chunks) / 4
				}
				for _, c := range chunks[:next] {
					o.Write(c)
				}
				before := o.Pending()
				for i := range 2 {
					ok, err := o.Flush(p.a)
					if ok || err != nil {
						t.Fatalf("Flush %d to a peer that does not read = (%v, %v), want (false, nil)", i, ok, err)
					}
				}
				stuck := o.Pending()
				if stuck <= 0 || stuck >= before {
					t.Fatalf("Pending %d of %d after Flush to a full socket", stuck, before)
				}

				l := startLoop(t)
				var (
					calls    int // on the loop only
					flushErr error
					done     = make(chan struct{})
					finished bool
				)
				h := handlerFunc(func(fd int, events uint32) {
					calls++
					if next < len(chunks) {
						o.Write(chunks[next])
						next++
					}
					ok, err := o.Flush(fd)
					if err != nil {
						flushErr = err
						l.Del(fd)
					} else if !ok || next < len(chunks) {
						return
					} else if err := l.Mod(fd, 0); err != nil {
						flushErr = err
					}
					if !finished {
						finished = true
						close(done)
					}
				})
				fd := p.a
				mustRun(t, l, func() error { return l.Add(fd, h, evloop.Writable) })

				read := make(chan struct{})
				var got []byte
				var readErr error
				go func() { got, readErr = readN(p.b, size, patience); close(read) }()
				waitFor(t, read, "the reader")
				waitFor(t, done, "the flushes")
				if readErr != nil {
					t.Fatal(readErr)
				}
				sameBytes(t, "received", got, data)
				noMore(t, p.b)
				mustRun(t, l, func() error {
					if flushErr != nil {
						t.Errorf("flush on the loop: %v", flushErr)
					}
					if o.Pending() != 0 {
						t.Errorf("%d bytes still pending", o.Pending())
					}
					// Usually many; one when a write met a reader quick
					// enough to keep making room (TCP on another CPU).
					t.Logf("%d Writable calls", calls)
					return nil
				})
			})
		}
	}
}

func TestOutTake(t *testing.T) {
	const big = 1 << 20
	tests := []struct {
		name   string
		first  int  // bytes written before Flush
		flush  bool // flush them (to a socket that takes only part of big)
		second int  // bytes written after
	}{
		{"empty", 0, false, 0},
		{"nothing flushed", 1000, false, 0},
		{"all flushed", 1000, true, 0},
		{"all flushed, more written", 1000, true, 500},
		{"partly flushed", big, true, 0},
		{"partly flushed, more written", big, true, 700},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPair(t)
			if err := unix.SetsockoptInt(p.a, unix.SOL_SOCKET, unix.SO_SNDBUF, 16<<10); err != nil {
				t.Fatal(err)
			}
			data := pattern(tc.first+tc.second, 7)
			var o evloop.Out
			o.Write(data[:tc.first])
			if tc.flush {
				if _, err := o.Flush(p.a); err != nil {
					t.Fatal(err)
				}
			}
			o.Write(data[tc.first:])
			pending := o.Pending()
			rest := o.Take()
			if len(rest) != pending {
				t.Errorf("Take returned %d bytes, Pending was %d", len(rest), pending)
			}
			if o.Pending() != 0 {
				t.Errorf("Pending %d after Take", o.Pending())
			}
			if ok, err := o.Flush(p.a); !ok || err != nil {
				t.Errorf("Flush after Take = (%v, %v), want (true, nil)", ok, err)
			}
			sent, err := readN(p.b, len(data)-len(rest), patience)
			if err != nil {
				t.Fatal(err)
			}
			noMore(t, p.b)
			sameBytes(t, "sent, then taken", append(sent, rest...), data)
			if tc.name == "partly flushed" && (len(sent) == 0 || len(rest) == 0) {
				t.Errorf("sent %d, took %d: the socket should have taken part", len(sent), len(rest))
			}
			// What Take returned is the caller's: writing to o again does
			// not change it.
			keep := append([]byte(nil), rest...)
			o.Write(bytes.Repeat([]byte{0xAA}, len(data)+10))
			if !bytes.Equal(rest, keep) {
				t.Error("writing to the Out changed what Take had returned")
			}
		})
	}
}

// TestOutFlushClosedPeer: a write to a socket whose peer is gone fails
// (EPIPE; the SIGPIPE it raises is ignored by the Go runtime for this fd,
// else the test binary would die here) and loses nothing pending.
func TestOutFlushClosedPeer(t *testing.T) {
	for _, kind := range socketKinds {
		t.Run(kind.name, func(t *testing.T) {
			p := kind.pair(t, false)
			closeFd(&p.b)
			var o evloop.Out
			var err error
			for i := 0; i < 100 && err == nil; i++ {
				// TCP: the first write after the close may still succeed
				// (the peer answers it with a reset).
				o.Write([]byte(strings.Repeat("z", 100)))
				_, err = o.Flush(p.a)
				if err == nil {
					time.Sleep(time.Millisecond)
				}
			}
			if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("Flush to a closed peer: %v, want EPIPE (or ECONNRESET)", err)
			}
			if kind.name == "unix" && !errors.Is(err, syscall.EPIPE) {
				t.Errorf("Flush to a closed unix peer: %v, want EPIPE", err)
			}
			if o.Pending() != 100 {
				t.Errorf("Pending %d after the failed Flush, want 100", o.Pending())
			}
			if rest := o.Take(); string(rest) != strings.Repeat("z", 100) {
				t.Errorf("Take after the failed Flush returned %q", rest)
			}
			// again, now that the error is known
			o.Write([]byte("again"))
			if ok, err := o.Flush(p.a); ok || err == nil {
				t.Errorf("second Flush to a closed peer = (%v, %v), want an error", ok, err)
			}
		})
	}
}
