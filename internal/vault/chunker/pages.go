package chunker

import (
	"fmt"
	"io"
)

// DefaultPageSize is PostgreSQL's default block size (BLCKSZ).
const DefaultPageSize = 8192

// Pages cuts a stream every pageSize bytes; the last chunk may be shorter.
// Database files change a page at a time, so aligned chunks turn one changed
// page into exactly one new chunk, where content-defined boundaries would
// spread the change over a chunk of about Params.Avg bytes.
//
// Pages reads straight into the caller's buffer, at least one Read per page, and
// keeps no buffer of its own. Wrap a raw file in a bufio.Reader when small
// reads are expensive. A Pages is not safe for concurrent use.
type Pages struct {
	r    io.Reader
	size int
	err  error // sticky: io.EOF once drained, or the read error
}

// NewPages returns a Pages reading r. A pageSize of 0 means
// [DefaultPageSize]; it panics if pageSize is negative or above [MaxSize].
func NewPages(r io.Reader, pageSize int) *Pages {
	if pageSize == 0 {
		pageSize = DefaultPageSize
	}
	if pageSize < 0 || pageSize > MaxSize {
		panic(fmt.Sprintf("chunker: page size %d out of range", pageSize))
	}
	return &Pages{r: r, size: pageSize}
}

// Reset makes p read r from the start.
func (p *Pages) Reset(r io.Reader) {
	p.r = r
	p.err = nil
}

// Next implements [Splitter]. Given a buf of capacity pageSize it does not
// allocate.
func (p *Pages) Next(buf []byte) ([]byte, error) {
	if p.err != nil {
		return nil, p.err
	}
	if cap(buf) < p.size {
		buf = make([]byte, p.size)
	}
	buf = buf[:p.size]
	// A loop rather than io.ReadFull: ReadFull reports a short final page as
	// io.ErrUnexpectedEOF, which r may also return as a real error.
	n, empty := 0, 0
	for n < len(buf) {
		m, err := p.r.Read(buf[n:])
		if m < 0 || m > len(buf)-n {
			p.err = errNegativeRead
			return nil, p.err
		}
		n += m
		switch {
		case err == io.EOF:
			p.err = io.EOF
			if n == 0 {
				return nil, io.EOF
			}
			return buf[:n], nil
		case err != nil:
			p.err = fmt.Errorf("chunker: read: %w", err)
			return nil, p.err
		case m > 0:
			empty = 0
		default:
			if empty++; empty >= readAttempts {
				p.err = fmt.Errorf("chunker: read: %w", io.ErrNoProgress)
				return nil, p.err
			}
		}
	}
	return buf, nil
}
