package pgagent

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

// oddReader returns at most a few bytes per Read, then err.
type oddReader struct {
	data []byte
	err  error
}

func (r *oddReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := min(len(p), 1+rand.IntN(700), len(r.data))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

func TestReadAhead(t *testing.T) {
	want := make([]byte, 300_000)
	for i := range want {
		want[i] = byte(rand.Uint32())
	}
	boom := errors.New("connection reset")
	for _, tt := range []struct {
		name string
		err  error
	}{{"eof", io.EOF}, {"error after the data", boom}} {
		t.Run(tt.name, func(t *testing.T) {
			ra := newReadAhead(&oddReader{data: bytes.Clone(want), err: tt.err}, 1000, 3)
			var got []byte
			buf := make([]byte, 333)
			var err error
			for {
				var n int
				n, err = ra.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					break
				}
			}
			if !errors.Is(err, tt.err) {
				t.Errorf("err = %v, want %v", err, tt.err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("read %d bytes that differ from the %d written", len(got), len(want))
			}
			if _, err := ra.Read(buf); !errors.Is(err, tt.err) {
				t.Errorf("a Read after the end: %v, want %v again", err, tt.err)
			}
		})
	}
}

// TestReadAheadClose: a consumer that stops reading does not leave the
// goroutine blocked on a full queue.
func TestReadAheadClose(t *testing.T) {
	before := runtime.NumGoroutine()
	ra := newReadAhead(&oddReader{data: make([]byte, 1<<20), err: io.EOF}, 100, 2)
	if _, err := ra.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	ra.Close()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines, %d before: the read-ahead goroutine did not end", runtime.NumGoroutine(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
