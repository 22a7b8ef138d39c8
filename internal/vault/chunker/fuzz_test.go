package chunker

import (
	"bytes"
	"io"
	"testing"
)

// FuzzChunker checks, for arbitrary input and small arbitrary Params, that
// chunks reassemble the input, respect the size bounds, agree with the
// reference cut rule, and do not depend on the reader's read sizes.
//
//	go test -fuzz FuzzChunker -fuzzminimizetime 2s ./internal/vault/chunker/
//
// (the default minimization budget of 60s per new input stalls the exec
// count for long stretches; it is not a hang).
func FuzzChunker(f *testing.F) {
	f.Add([]byte(nil), uint16(1), uint8(0), uint16(0), byte(0), uint16(1))
	f.Add([]byte("hello, world"), uint16(2), uint8(1), uint16(3), byte(1), uint16(5))
	f.Add(make([]byte, 5000), uint16(16), uint8(4), uint16(100), byte(2), uint16(7))
	f.Add(randomData(30, 6000), uint16(300), uint8(8), uint16(2000), byte(3), uint16(333))
	f.Add(randomData(31, 4096), uint16(64), uint8(6), uint16(64), byte(4), uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, minSize uint16, avgShift uint8, spread uint16, key byte, readSize uint16) {
		if len(data) > 1<<16 {
			t.Skip("long inputs add run time, not coverage") // Params are small
		}
		avg := 4 << (avgShift % 11) // 4 .. 4096
		p := Params{
			Min: 1 + int(minSize)%avg,
			Avg: avg,
			Max: avg + int(spread)%(4*avg+1),
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("derived invalid params: %v", err)
		}
		g := fuzzGears[key]

		chunks := chunkAll(t, New(bytes.NewReader(data), g, p))
		checkChunks(t, data, chunks, p)
		got := lengths(chunks)
		if ref := refLengths(data, g, p); !equalInts(got, ref) {
			t.Fatalf("params %v: lengths %v, reference %v", p, got, ref)
		}

		rd := &sizedReader{data: data, n: 1 + int(readSize)%(2*p.Max)}
		if got2 := lengths(chunkAll(t, New(rd, g, p))); !equalInts(got2, got) {
			t.Fatalf("params %v, reads of %d: lengths %v, want %v", p, rd.n, got2, got)
		}
	})
}

// fuzzGears is built once: NewGear costs 64 HMACs, more than chunking a
// typical fuzz input.
var fuzzGears = func() (gs [256]*Gear) {
	for i := range gs {
		gs[i] = NewGear([32]byte{byte(i)})
	}
	return gs
}()

// sizedReader returns at most n bytes per Read, and io.EOF with the last ones.
type sizedReader struct {
	data []byte
	n    int
}

func (r *sizedReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.n)], r.data)
	r.data = r.data[n:]
	if len(r.data) == 0 {
		return n, io.EOF
	}
	return n, nil
}
