package chunker

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
)

// Splitter yields the chunks of one stream in order.
type Splitter interface {
	// Next returns the next chunk, copied into buf's storage when buf has the
	// capacity and into a new slice otherwise; the chunk stays valid until the
	// caller reuses that storage. At the end of the stream Next returns
	// (nil, io.EOF), and keeps doing so. A read error from the underlying
	// reader is returned wrapped, and returned again by every later call.
	Next(buf []byte) ([]byte, error)
}

var (
	_ Splitter = (*Chunker)(nil)
	_ Splitter = (*Pages)(nil)
)

// MaxSize bounds Params.Max. A chunker buffers about twice Max, and a chunk is
// held in memory whole while it is compressed and encrypted; the limit keeps a
// hostile or mistaken repository config from asking for gigabytes.
const MaxSize = 64 << 20

// Params are the size limits of content-defined chunks.
//
// Every chunk but the last of a stream is at least Min and at most Max bytes
// long. Avg is the size normalized chunking aims at; it must be a power of
// two. Measured mean chunk sizes come out somewhat above Avg, because no cut
// is considered before Min (see the table above [DefaultParams]).
type Params struct {
	Min, Avg, Max int
}

// DefaultParams are the sizes new repositories record in their config.
//
// Chosen with TestMeasureParams (measure_test.go, DUALKEY_CHUNKER_MEASURE=1):
// 64 MiB of log-like records (about 4:1 with gzip), edited three ways; "new"
// is the share of the edited copy in chunks the original lacks, so what a
// second backup uploads (ideal: 5%, 5%, ~0). Means over four keys; MB/s is
// Next from memory, best of 12, one core of a shared 2-vCPU Xeon (AVX-512).
//
//	min/avg/max      chunks   mean  MB/s scattered clustered   inserts  idx/TiB
//	64K/256K/1024K    230.0   284K  1549     95.9%     23.6%      2.6%    377MB
//	128K/512K/2048K   114.5   572K  1575     99.4%     33.2%      4.6%    188MB
//	256K/1024K/4096K   57.5  1139K  1515    100.0%     47.4%      9.2%     94MB
//	512K/1024K/8192K   55.5  1180K  1827    100.0%     51.4%     10.1%     91MB (restic)
//
// scattered: 5% rewritten as 819 4 KiB regions plus five small insertions;
// clustered: 5% as 32 runs of 100 KiB plus the insertions; inserts: five
// insertions of 1-16 bytes. idx/TiB: index and header at ~100 bytes a chunk.
//
// Reading the table: an insertion costs about one mean chunk, so
// boundaries resynchronise at every size. Scattered small writes defeat
// every candidate (an edit every ~80 KiB touches every chunk); that pattern,
// database pages, is what [Pages] is for. Between the rest, new bytes after
// clustered edits grow with chunk size while the index shrinks; per-chunk
// storage (100 bytes) is under 0.04% for all of them. 256K/1M/4M is chosen:
// the index of restic's 512K/1M/8M with less upload after edits, and half
// its Max, which halves a Chunker's buffer (2*Max) and the largest chunk held
// for compression and encryption. Much of what CDC sees here (WAL, files
// rewritten whole) does not deduplicate at all, which argues against paying
// the 2x index of 128K/512K/2M for its better clustered-edit figure.
var DefaultParams = Params{Min: 256 << 10, Avg: 1 << 20, Max: 4 << 20}

// Validate reports whether p can be used to chunk: 1 <= Min <= Avg <= Max <=
// [MaxSize], and Avg a power of two of at least 4.
func (p Params) Validate() error {
	switch {
	case p.Min < 1:
		return fmt.Errorf("chunker: params %v: Min must be at least 1", p)
	case p.Avg < 4 || p.Avg&(p.Avg-1) != 0:
		return fmt.Errorf("chunker: params %v: Avg must be a power of two >= 4", p)
	case p.Min > p.Avg || p.Avg > p.Max:
		return fmt.Errorf("chunker: params %v: want Min <= Avg <= Max", p)
	case p.Max > MaxSize:
		return fmt.Errorf("chunker: params %v: Max above limit %d", p, MaxSize)
	}
	return nil
}

func (p Params) String() string {
	return fmt.Sprintf("%d/%d/%d", p.Min, p.Avg, p.Max)
}

// gearLabel separates the gear derivation from every other use of the key.
const gearLabel = "dualkey vault chunker gear v1"

// Gear is the keyed table of the gear rolling hash. It is immutable once
// built, so one Gear can serve any number of concurrent Chunkers.
type Gear struct {
	table [256]uint64
}

// NewGear derives the gear table from a 32-byte repository secret:
//
//	block[i] = HMAC-SHA-256(key, "dualkey vault chunker gear v1" || byte(i)), i = 0..63
//	table    = the 64 blocks concatenated, read as 256 little-endian uint64
//
// This derivation is part of the vault format.
//
// Keying keeps a party without the key from predicting where a known file
// would be cut, so the stored blob sizes cannot be matched against a
// precomputed list, which a fixed public table would allow. It is not a proof
// that chunk sizes leak nothing: Truong et al., "Breaking and Fixing
// Content-Defined Chunking" (2025), recover keyed tables of Borg, restic and
// others from the sizes of chunks of attacker-chosen or known data. The gear
// hash is no stronger. Where chunk sizes are visible, hiding them (padding,
// packing) is what protects contents, not the key.
func NewGear(key [32]byte) *Gear {
	g := new(Gear)
	mac := hmac.New(sha256.New, key[:])
	var sum [sha256.Size]byte
	for i := range 64 {
		mac.Reset()
		mac.Write([]byte(gearLabel))
		mac.Write([]byte{byte(i)})
		mac.Sum(sum[:0])
		for j := range 4 {
			g.table[4*i+j] = binary.LittleEndian.Uint64(sum[8*j:])
		}
	}
	return g
}

// Chunker cuts a stream into content-defined chunks with FastCDC (Xia et al.,
// "FastCDC: a Fast and Efficient Content-Defined Chunking Approach for Data
// Deduplication", USENIX ATC 2016; extended in IEEE TPDS 2020).
//
// The cut rule, which is part of the vault format: the hash is
// fp = fp<<1 + table[b] over the bytes b of the chunk so far, starting from
// fp = 0 at offset max(Min-64, 0). Because of the shift, the high bits of fp
// depend only on the last 64 bytes, so after that warm-up the test at every
// offset depends on content, not on where the chunk began. With k = log2(Avg),
// the chunk ends after the byte at offset i (0-based, so its length is i+1)
// for the first i >= Min with
//
//	fp>>(64-(k+2)) == 0   while i < Avg  (harder: fewer small chunks)
//	fp>>(64-(k-2)) == 0   while i >= Avg (easier: fewer large chunks)
//
// or at Max bytes, whichever comes first; that is normalized chunking at level
// 2. The final chunk is whatever remains.
//
// A Chunker is not safe for concurrent use.
type Chunker struct {
	r            io.Reader
	table        *[256]uint64
	p            Params
	maskS, maskL uint64

	buf        []byte // allocated on first fill, kept across Reset
	start, end int    // unconsumed input is buf[start:end]
	eof        bool   // r has returned io.EOF
	err        error  // sticky: io.EOF once drained, or the read error
}

// New returns a Chunker reading r. It panics if g is nil or p is invalid
// (check untrusted Params with [Params.Validate] first).
func New(r io.Reader, g *Gear, p Params) *Chunker {
	if g == nil {
		panic("chunker: nil Gear")
	}
	if err := p.Validate(); err != nil {
		panic(err)
	}
	k := bits.TrailingZeros(uint(p.Avg))
	return &Chunker{
		r:     r,
		table: &g.table,
		p:     p,
		maskS: ^uint64(0) << (64 - (k + 2)),
		maskL: ^uint64(0) << (64 - (k - 2)), // k >= 2, so k-2 >= 0 and the shift <= 64
	}
}

// Reset makes c read r from the start, keeping its buffer, so one Chunker can
// chunk many files without allocating.
func (c *Chunker) Reset(r io.Reader) {
	c.r = r
	c.start, c.end = 0, 0
	c.eof = false
	c.err = nil
}

// Next implements [Splitter]. Given a buf of capacity Params.Max it does not
// allocate.
func (c *Chunker) Next(buf []byte) ([]byte, error) {
	for c.err == nil {
		data := c.buf[c.start:c.end]
		if n := c.cut(data, c.eof); n > 0 {
			c.start += n
			return append(buf[:0], data[:n]...), nil
		}
		if c.eof { // and nothing left
			c.err = io.EOF
			break
		}
		c.fill()
	}
	return nil, c.err
}

// readAttempts bounds consecutive empty reads, as bufio does, so a broken
// reader cannot spin Next forever.
const readAttempts = 100

var errNegativeRead = errors.New("chunker: reader returned invalid count")

// fill moves the unconsumed bytes to the front of the buffer and reads until
// the buffer is full, r is at EOF, or r fails. It is called only when the
// unconsumed bytes hold no complete chunk, so fewer than Max bytes move.
func (c *Chunker) fill() {
	if c.buf == nil {
		// Max bytes are enough to place any cut. Reading more per fill makes
		// fills, and so the bytes they move, rare: with Avg far below Max the
		// moved tail averages under Avg per Max bytes read.
		c.buf = make([]byte, c.p.Max+max(c.p.Max, 64<<10))
	}
	if c.start > 0 {
		c.end = copy(c.buf, c.buf[c.start:c.end])
		c.start = 0
	}
	empty := 0
	for c.end < len(c.buf) {
		n, err := c.r.Read(c.buf[c.end:])
		if n < 0 || n > len(c.buf)-c.end {
			c.err = errNegativeRead
			return
		}
		c.end += n
		switch {
		case err == io.EOF:
			c.eof = true
			return
		case err != nil:
			c.err = fmt.Errorf("chunker: read: %w", err)
			return
		case n > 0:
			empty = 0
		default:
			if empty++; empty >= readAttempts {
				c.err = fmt.Errorf("chunker: read: %w", io.ErrNoProgress)
				return
			}
		}
	}
}

// cut returns the length of the chunk at the start of data, or 0 when data
// is empty or holds no complete chunk: shorter than Max, no cut point found,
// and more input may follow (final is false).
func (c *Chunker) cut(data []byte, final bool) int {
	minSize, n := c.p.Min, len(data)
	if n < c.p.Max && !final {
		// Search what there is; a cut found is valid, since the rule looks
		// only backwards. The caller refills only when none is found.
		if n <= minSize {
			return 0
		}
		if i := c.search(data); i < n {
			return i
		}
		return 0
	}
	if n <= minSize {
		return n
	}
	return c.search(data[:min(n, c.p.Max)])
}

// search returns the length of the chunk at the start of data under the cut
// rule, or len(data) when no cut point precedes it. len(data) > Min.
func (c *Chunker) search(data []byte) int {
	minSize, n := c.p.Min, len(data)
	normal := min(c.p.Avg, n)
	t := c.table
	var fp uint64
	for _, b := range data[max(minSize-64, 0):minSize] {
		fp = t[b] + fp*2
	}
	i, fp := scan(t, fp, data[minSize:normal], c.maskS)
	if i >= 0 {
		return minSize + i
	}
	if i, _ = scan(t, fp, data[normal:n], c.maskL); i >= 0 {
		return normal + i
	}
	return n
}

// scan rolls fp over s and returns the length of the prefix of s after which
// fp&mask == 0 first holds, or -1, and fp at that point.
//
// It takes two bytes a step: the next fp, b + 2*(a + 2*fp), is computed from
// fp in one LEA, while the intermediate a + 2*fp, needed only for its test,
// is off the dependency chain; that is about 1.4x the one-byte loop. The
// slice t (not the array pointer) has one nil check, and its known length
// 256 spares the byte-indexed loads their bounds checks.
func scan(table *[256]uint64, fp uint64, s []byte, mask uint64) (int, uint64) {
	t := table[:]
	i := 0
	for ; i+2 <= len(s); i += 2 {
		a, b := t[s[i]], t[s[i+1]]
		fp0 := a + fp*2
		fp = (b + a*2) + fp*4
		if fp0&mask == 0 {
			return i + 1, fp0
		}
		if fp&mask == 0 {
			return i + 2, fp
		}
	}
	if i < len(s) {
		fp = t[s[i]] + fp*2
		if fp&mask == 0 {
			return i + 1, fp
		}
	}
	return -1, fp
}
