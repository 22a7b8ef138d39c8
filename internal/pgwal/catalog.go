package pgwal

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

// headerReads is how many headers Load reads at once. Each is one small
// ranged read; 32 in flight keep a vault server's round trips overlapped
// (~10^4 pieces over HTTPS in about a second) while a local vault is
// CPU-bound long before.
const headerReads = 32

// Catalog is what WAL a vault holds, from the pieces' plaintext headers.
// Pieces written by several writers over time (agent restarts, retries
// after a lost answer) are merged: they may overlap, and overlapping bytes
// of one timeline are the same WAL. A Catalog is a snapshot taken by Load;
// it is safe for concurrent use.
type Catalog struct {
	r      *repo.Repository
	pieces []Piece // WAL pieces sorted by timeline, start, end, name
	hist   []Piece // history pieces sorted by timeline
	// Errors lists objects that were listed but whose header could not be
	// read or parsed. They are left out, so a damaged header can only make
	// the catalog smaller: the agent then streams that WAL again.
	Errors []error
}

// Range is a span [Start, End) of WAL.
type Range struct{ Start, End LSN }

func (r Range) String() string { return r.Start.String() + "-" + r.End.String() }

// Load lists the WAL objects of r's vault and reads each one's 25-byte
// header (in parallel, bounded). It needs no decryption.
func Load(ctx context.Context, r *repo.Repository) (*Catalog, error) {
	var infos []backend.Info
	if err := r.Store().List(ctx, backend.WAL, func(fi backend.Info) error {
		infos = append(infos, fi)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("pgwal: list WAL: %w", err)
	}
	c := &Catalog{r: r}
	pieces := make([]Piece, len(infos))
	errs := make([]error, len(infos))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(headerReads)
	for i, fi := range infos {
		g.Go(func() error {
			p, err := readHeader(gctx, r.Store(), fi)
			if err != nil {
				if gctx.Err() != nil {
					return gctx.Err()
				}
				errs[i] = err
				return nil
			}
			pieces[i] = p
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("pgwal: load catalog: %w", err)
	}
	for i, p := range pieces {
		switch {
		case errs[i] != nil:
			if !errors.Is(errs[i], backend.ErrNotExist) { // removed since the listing
				c.Errors = append(c.Errors, errs[i])
			}
		case p.History:
			c.hist = append(c.hist, p)
		default:
			c.pieces = append(c.pieces, p)
		}
	}
	slices.SortFunc(c.pieces, comparePieces)
	slices.SortFunc(c.hist, comparePieces)
	return c, nil
}

func comparePieces(a, b Piece) int {
	return cmp.Or(cmp.Compare(a.Timeline, b.Timeline), cmp.Compare(a.Start, b.Start),
		cmp.Compare(a.End, b.End), bytes.Compare(a.Name[:], b.Name[:]))
}

func readHeader(ctx context.Context, store repo.Store, fi backend.Info) (Piece, error) {
	name, err := format.ParseID(fi.Name)
	if err != nil {
		return Piece{}, fmt.Errorf("pgwal: %v: %w", fi.Handle, err)
	}
	head, err := store.Load(ctx, fi.Handle, 0, format.WALHeaderSize)
	if err != nil {
		return Piece{}, fmt.Errorf("pgwal: read header of %v: %w", fi.Handle, err)
	}
	hd, _, err := format.ParseWALHeader(head)
	if err != nil {
		return Piece{}, fmt.Errorf("pgwal: %v: %w: %w", fi.Handle, repo.ErrDamaged, err)
	}
	return pieceOf(hd, name, fi.Size), nil
}

// Pieces returns every piece, WAL and history, sorted by timeline and start.
func (c *Catalog) Pieces() []Piece {
	out := append(slices.Clone(c.pieces), c.hist...)
	slices.SortFunc(out, comparePieces)
	return out
}

// Timelines returns the timelines with WAL or a history file, ascending.
func (c *Catalog) Timelines() []uint32 {
	var out []uint32
	for _, p := range c.Pieces() {
		if len(out) == 0 || out[len(out)-1] != p.Timeline {
			out = append(out, p.Timeline)
		}
	}
	return out
}

// of returns the WAL pieces of tli, sorted by start.
func (c *Catalog) of(tli uint32) []Piece {
	i, _ := slices.BinarySearchFunc(c.pieces, tli, func(p Piece, t uint32) int { return cmp.Compare(p.Timeline, t) })
	j := i
	for j < len(c.pieces) && c.pieces[j].Timeline == tli {
		j++
	}
	return c.pieces[i:j]
}

// Runs returns the maximal gap-free spans of WAL the vault holds on tli,
// ascending. More than one run means a gap: WAL that was never stored (a
// lost slot) or was removed.
func (c *Catalog) Runs(tli uint32) []Range {
	var out []Range
	for _, p := range c.of(tli) {
		if n := len(out); n > 0 && p.Start <= out[n-1].End {
			out[n-1].End = max(out[n-1].End, p.End)
			continue
		}
		out = append(out, Range{p.Start, p.End})
	}
	return out
}

// End returns the end of the first run of tli: the highest LSN such that
// all WAL from the first piece of tli up to it is in the vault. The agent
// resumes streaming there: no gap, no duplicate. Zero if the vault holds no
// WAL of tli. A later run past a gap is not counted: see Runs.
func (c *Catalog) End(tli uint32) LSN {
	if runs := c.Runs(tli); len(runs) > 0 {
		return runs[0].End
	}
	return 0
}

// Contiguous returns how far WAL of tli is present without a gap from
// `from`: every byte of [from, result) is in the vault. It returns from
// itself when the byte at from is missing.
func (c *Catalog) Contiguous(tli uint32, from LSN) LSN {
	for _, r := range c.Runs(tli) {
		if r.Start <= from && from < r.End {
			return r.End
		}
	}
	return from
}

// History returns the content of timeline tli's history file. An error
// unwrapping to backend.ErrNotExist means the vault holds none; if every
// copy is damaged, the error names the first.
func (c *Catalog) History(ctx context.Context, tli uint32) ([]byte, error) {
	var first error
	for _, p := range c.hist {
		if p.Timeline != tli {
			continue
		}
		obj, err := c.r.Store().Load(ctx, p.handle(), 0, 0)
		if err == nil {
			var data []byte
			if data, err = open(c.r.Key(), p, obj); err == nil {
				return data, nil
			}
		} else {
			err = fmt.Errorf("pgwal: load %v: %w", p, err)
		}
		if ctx.Err() != nil {
			return nil, err
		}
		first = cmp.Or(first, err)
	}
	if first != nil {
		return nil, first
	}
	return nil, fmt.Errorf("pgwal: history of timeline %d: %w", tli, backend.ErrNotExist)
}

// Switch is one line of a timeline history file: timeline Timeline ended
// at LSN End, where its child branched off.
type Switch struct {
	Timeline uint32
	End      LSN
}

// ParseHistory parses a timeline history file: lines "parentTLI<TAB>LSN
// <TAB>reason", oldest first; blank lines and "#" comments are skipped, as
// PostgreSQL's readTimeLineHistory does.
func ParseHistory(content []byte) ([]Switch, error) {
	var out []Switch
	sc := bufio.NewScanner(bytes.NewReader(content))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			return nil, fmt.Errorf("pgwal: history line %d: %q: want timeline and LSN", n, line)
		}
		t, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil || t == 0 {
			return nil, fmt.Errorf("pgwal: history line %d: bad timeline %q", n, f[0])
		}
		lsn, err := ParseLSN(f[1])
		if err != nil {
			return nil, fmt.Errorf("pgwal: history line %d: %w", n, err)
		}
		if k := len(out); k > 0 && (uint32(t) <= out[k-1].Timeline || lsn < out[k-1].End) {
			return nil, fmt.Errorf("pgwal: history line %d: timelines and LSNs must ascend", n)
		}
		out = append(out, Switch{Timeline: uint32(t), End: lsn})
	}
	return out, sc.Err()
}
