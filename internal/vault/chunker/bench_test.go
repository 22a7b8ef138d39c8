package chunker

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"
)

// benchData is random, so nearly every cut is content-defined rather than
// forced at Max, which is the slow path of the boundary search.
func benchData(n int) []byte {
	data := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{1})
	rng.Read(data)
	return data
}

// BenchmarkChunker measures Next end to end: reading from memory, the
// boundary search and the copy into the caller's buffer.
func BenchmarkChunker(b *testing.B) {
	for _, p := range []Params{
		DefaultParams,
		{Min: 64 << 10, Avg: 256 << 10, Max: 1 << 20},
	} {
		b.Run(p.String(), func(b *testing.B) {
			data := benchData(64 << 20)
			g := NewGear([32]byte{2})
			rd := bytes.NewReader(data)
			c := New(rd, g, p)
			buf := make([]byte, p.Max)
			pass := func() {
				rd.Reset(data)
				c.Reset(rd)
				for {
					chunk, err := c.Next(buf)
					if err == io.EOF {
						return
					}
					if err != nil {
						b.Fatal(err)
					}
					buf = chunk
				}
			}
			pass() // allocate the Chunker's buffer outside the measurement
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				pass()
			}
		})
	}
}

// BenchmarkCut measures the boundary search alone, on data already in memory.
// "hash every byte" (Min 1) is the raw rate of the gear loop; with a real Min
// the first Min bytes of each chunk are skipped, which is most of FastCDC's
// speed-up.
func BenchmarkCut(b *testing.B) {
	data := benchData(64 << 20)
	for _, bc := range []struct {
		name string
		p    Params
	}{
		{"default", DefaultParams},
		{"hash every byte", Params{Min: 1, Avg: DefaultParams.Avg, Max: DefaultParams.Max}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := New(nil, NewGear([32]byte{2}), bc.p)
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				for rest := data; len(rest) > 0; {
					rest = rest[c.cut(rest, true):]
				}
			}
		})
	}
}

// BenchmarkPages measures the page splitter over memory.
func BenchmarkPages(b *testing.B) {
	data := benchData(64 << 20)
	rd := bytes.NewReader(data)
	p := NewPages(rd, 0)
	buf := make([]byte, DefaultPageSize)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		rd.Reset(data)
		p.Reset(rd)
		for {
			chunk, err := p.Next(buf)
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			buf = chunk
		}
	}
}
