package chunker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
	"testing/iotest"
)

func TestPages(t *testing.T) {
	const ps = DefaultPageSize
	tests := []struct {
		size, pageSize int
		want           []int
	}{
		{0, 0, []int{}},
		{1, 0, []int{1}},
		{ps - 1, 0, []int{ps - 1}},
		{ps, 0, []int{ps}},
		{ps + 1, 0, []int{ps, 1}},
		{3 * ps, 0, []int{ps, ps, ps}},
		{10, 4, []int{4, 4, 2}},
		{10, 1, []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
		{3 * 32768, 32768, []int{32768, 32768, 32768}},
	}
	for _, tt := range tests {
		data := randomData(20, tt.size)
		for name, rd := range map[string]io.Reader{
			"bytes":    bytes.NewReader(data),
			"one byte": iotest.OneByteReader(bytes.NewReader(data)),
			"data eof": iotest.DataErrReader(bytes.NewReader(data)),
		} {
			t.Run(fmt.Sprintf("%d/%d/%s", tt.size, tt.pageSize, name), func(t *testing.T) {
				chunks := chunkAll(t, NewPages(rd, tt.pageSize))
				if !bytes.Equal(bytes.Join(chunks, nil), data) {
					t.Fatal("chunks do not join to the input")
				}
				if got := lengths(chunks); !equalInts(got, tt.want) {
					t.Fatalf("lengths %v, want %v", got, tt.want)
				}
			})
		}
	}
}

// TestPagesOneChangedPage is why the PostgreSQL agent uses Pages: a changed
// page is exactly one new chunk.
func TestPagesOneChangedPage(t *testing.T) {
	data := randomData(21, 64*DefaultPageSize)
	mod := bytes.Clone(data)
	mod[17*DefaultPageSize+100] ^= 1
	a := chunkAll(t, NewPages(bytes.NewReader(data), 0))
	b := chunkAll(t, NewPages(bytes.NewReader(mod), 0))
	if len(a) != len(b) {
		t.Fatalf("%d chunks, then %d", len(a), len(b))
	}
	for i := range a {
		if changed := !bytes.Equal(a[i], b[i]); changed != (i == 17) {
			t.Errorf("chunk %d changed = %v", i, changed)
		}
	}
}

func TestPagesReuseAndErrors(t *testing.T) {
	data := randomData(22, 2*DefaultPageSize+5)
	p := NewPages(bytes.NewReader(data), 0)
	buf := make([]byte, DefaultPageSize)
	first, _ := p.Next(buf)
	if &first[0] != &buf[0] {
		t.Error("Next did not reuse a buffer of sufficient capacity")
	}
	if allocs := testing.AllocsPerRun(10, func() {
		p.Reset(bytes.NewReader(data))
		p.Next(buf)
	}); allocs > 1 { // the bytes.Reader
		t.Errorf("Next allocates %v times", allocs)
	}

	boom := errors.New("boom")
	p = NewPages(&errReader{bytes.NewReader(data), boom}, 0)
	var err error
	for err == nil {
		_, err = p.Next(buf)
	}
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want %v", err, boom)
	}
	if _, err2 := p.Next(buf); err2 != err {
		t.Fatalf("error not sticky: %v then %v", err, err2)
	}
}
