package pgwal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/format"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

var (
	// ErrIncomplete is returned (wrapped) by Segment when some byte of the
	// segment is in no piece; the message names the first missing range.
	ErrIncomplete = errors.New("pgwal: WAL missing from the vault")
	// ErrConflict is returned (wrapped) by Segment when two pieces hold
	// different bytes at the same LSN of one timeline. WAL at an LSN never
	// changes once PostgreSQL has flushed it, so this is damage or forgery
	// by a key holder; the message names both pieces.
	ErrConflict = errors.New("pgwal: overlapping WAL pieces disagree")
)

// segmentLoads is how many pieces Segment loads at once: a 16 MiB segment
// is about four default pieces.
const segmentLoads = 4

// use is the part [from, to) of piece p that may fill a segment: p clipped
// to the segment and, for an ancestor timeline, to before its switch point.
type use struct {
	p        Piece
	from, to LSN
}

// Segment returns the content of WAL segment segno of timeline tli (segSize
// bytes, the file PostgreSQL would archive as SegmentName(tli, segno,
// segSize)), assembled from the pieces in c and read from r's vault. Every
// piece touching the segment is decrypted and checked, and where pieces
// overlap their bytes must agree (ErrConflict otherwise, naming both):
// a forged piece is found even where it alone would cover the segment.
//
// When part of the segment is in no piece of tli and c holds tli's history
// file, the part before tli branched off is taken from the ancestor
// timelines, as PostgreSQL itself copies it into the first segment of a new
// timeline. A damaged piece is skipped if other pieces cover its bytes;
// otherwise its error (wrapping repo.ErrDamaged) is returned. A byte
// missing from every piece gives ErrIncomplete naming the gap.
func Segment(ctx context.Context, r *repo.Repository, c *Catalog, tli uint32, segno uint64, segSize int) ([]byte, error) {
	data, _, err := segment(ctx, r, c, tli, segno, segSize, false)
	return data, err
}

// SegmentHead is Segment for the last segment the vault holds, which is
// usually partial (after a disaster it holds the final commits): it returns
// the segment's contiguous head, from its first byte up to end, zero-padded
// to segSize — PostgreSQL reads the zeros as the end of WAL. A segment held
// whole gives end = its end. ErrIncomplete if not even its first byte is held.
func SegmentHead(ctx context.Context, r *repo.Repository, c *Catalog, tli uint32, segno uint64, segSize int) (data []byte, end LSN, err error) {
	return segment(ctx, r, c, tli, segno, segSize, true)
}

func segment(ctx context.Context, r *repo.Repository, c *Catalog, tli uint32, segno uint64, segSize int, head bool) ([]byte, LSN, error) {
	if err := CheckSegmentSize(segSize); err != nil {
		return nil, 0, err
	}
	if segno > (1<<64-1)/uint64(segSize)-1 {
		return nil, 0, fmt.Errorf("pgwal: segment %d lies beyond the LSN space", segno)
	}
	name := SegmentName(tli, segno, segSize)
	lo := SegmentStart(segno, segSize)
	hi := lo + LSN(segSize)
	fail := func(err error) ([]byte, LSN, error) { return nil, 0, fmt.Errorf("pgwal: segment %s: %w", name, err) }

	uses := clip(c.of(tli), lo, hi, lo, hi)
	ancestors := false
	loaded := map[format.ID][]byte{}
	damaged := map[format.ID]error{}
	for {
		plan, gap := cover(uses, damaged, lo, hi)
		if gap != nil && !ancestors && tli > 1 {
			ancestors = true
			more, err := c.ancestorUses(ctx, tli, lo, hi)
			if err != nil {
				return fail(err)
			}
			uses = append(uses, more...)
			continue
		}
		end := hi
		if gap != nil && head && gap.Start > lo && len(damaged) == 0 {
			// The head up to the gap; pieces past it do not matter.
			end = gap.Start
			uses = clipUses(uses, end)
		} else if gap != nil {
			err := fmt.Errorf("WAL %v missing on timeline %d: %w", gap, tli, ErrIncomplete)
			for _, d := range damaged { // the damage is why; name it first
				return fail(errors.Join(d, err))
			}
			return fail(err)
		}
		// Load every piece touching the segment, not only the plan: then
		// a piece that disagrees is found even where another covers its
		// bytes alone. Without duplicates (the normal case) it is the plan.
		if err := loadPieces(ctx, r, uses, loaded, damaged); err != nil {
			return fail(err)
		}
		if slices.ContainsFunc(plan, func(u use) bool { return damaged[u.p.Name] != nil }) {
			continue // plan again without the damaged pieces
		}
		out, err := assemble(plan, loaded, lo, hi)
		if err == nil {
			err = agree(out, plan, uses, loaded, lo)
		}
		if err != nil {
			return fail(err)
		}
		return out, end, nil
	}
}

// agree checks that every loaded piece outside the plan holds the same bytes
// as the assembled segment where it overlaps it.
func agree(out []byte, plan, uses []use, loaded map[format.ID][]byte, lo LSN) error {
	for _, u := range uses {
		data, ok := loaded[u.p.Name]
		if !ok || slices.ContainsFunc(plan, func(p use) bool { return p.p.Name == u.p.Name }) {
			continue // damaged (others cover it), or in the plan
		}
		got, want := data[u.from-u.p.Start:u.to-u.p.Start], out[u.from-lo:u.to-lo]
		if bytes.Equal(got, want) {
			continue
		}
		i := 0
		for got[i] == want[i] {
			i++
		}
		at := u.from + LSN(i)
		for _, p := range plan {
			if p.from <= at && at < p.to {
				return fmt.Errorf("%v and %v differ at %v: %w", p.p, u.p, at, ErrConflict)
			}
		}
	}
	return nil
}

// clip returns the parts of pieces inside [lo, hi) ∩ [min, max).
func clip(pieces []Piece, lo, hi, minLSN, maxLSN LSN) []use {
	from, to := max(lo, minLSN), min(hi, maxLSN)
	var out []use
	for _, p := range pieces {
		u := use{p: p, from: max(p.Start, from), to: min(p.End, to)}
		if u.from < u.to {
			out = append(out, u)
		}
	}
	return out
}

// ancestorUses returns the parts of ancestor timelines' pieces that belong
// to tli's past within [lo, hi), by tli's history file. None if the vault
// holds no history for tli.
func (c *Catalog) ancestorUses(ctx context.Context, tli uint32, lo, hi LSN) ([]use, error) {
	if !slices.ContainsFunc(c.hist, func(p Piece) bool { return p.Timeline == tli }) {
		return nil, nil
	}
	content, err := c.History(ctx, tli)
	if err != nil {
		return nil, err
	}
	sw, err := ParseHistory(content)
	if err != nil {
		return nil, fmt.Errorf("history of timeline %d: %w", tli, err)
	}
	var out []use
	begin := LSN(0)
	for _, s := range sw {
		// Timeline s.Timeline is tli's past on [begin, s.End).
		out = append(out, clip(c.of(s.Timeline), lo, hi, begin, s.End)...)
		begin = s.End
	}
	return out, nil
}

// cover picks uses covering [lo, hi) greedily (at each position the usable
// piece reaching furthest), skipping damaged pieces. It returns the first
// uncovered range if there is one, with the plan up to it.
func cover(uses []use, damaged map[format.ID]error, lo, hi LSN) ([]use, *Range) {
	var plan []use
	for pos := lo; pos < hi; {
		best := -1
		next := hi
		for i, u := range uses {
			if damaged[u.p.Name] != nil {
				continue
			}
			if u.from <= pos && pos < u.to {
				if best < 0 || u.to > uses[best].to {
					best = i
				}
			} else if u.from > pos {
				next = min(next, u.from)
			}
		}
		if best < 0 {
			return plan, &Range{pos, next}
		}
		plan = append(plan, uses[best])
		pos = uses[best].to
	}
	return plan, nil
}

// loadPieces loads and opens the plan's pieces not loaded yet, recording
// damage per piece. Other errors (the vault unreachable, ctx) are returned.
func loadPieces(ctx context.Context, r *repo.Repository, plan []use, loaded map[format.ID][]byte, damaged map[format.ID]error) error {
	var todo []use
	for _, u := range plan {
		if _, ok := loaded[u.p.Name]; !ok && !slices.ContainsFunc(todo, func(t use) bool { return t.p.Name == u.p.Name }) {
			todo = append(todo, u)
		}
	}
	var mu sync.Mutex // guards loaded and damaged below
	var g errgroup.Group
	g.SetLimit(segmentLoads)
	for _, u := range todo {
		g.Go(func() error {
			obj, err := r.Store().Load(ctx, u.p.handle(), 0, 0)
			if err != nil {
				return fmt.Errorf("load %v: %w", u.p, err)
			}
			data, err := open(r.Key(), u.p, obj)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				damaged[u.p.Name] = err
				return nil
			}
			loaded[u.p.Name] = data
			return nil
		})
	}
	return g.Wait()
}

// assemble copies the plan's bytes into a segment, checking that where
// consecutive pieces overlap they agree.
func assemble(plan []use, loaded map[format.ID][]byte, lo, hi LSN) ([]byte, error) {
	out := make([]byte, hi-lo)
	filled := lo // out holds [lo, filled)
	var prev Piece
	for _, u := range plan {
		data := loaded[u.p.Name]
		// cover chose u with u.from <= filled: [u.from, filled) overlaps
		// what earlier pieces filled and must agree with it.
		from := u.from
		src := data[from-u.p.Start : u.to-u.p.Start]
		if from < filled {
			n := filled - from
			if !bytes.Equal(src[:n], out[from-lo:filled-lo]) {
				return nil, fmt.Errorf("%v and %v differ within %v: %w", prev, u.p, Range{from, filled}, ErrConflict)
			}
		}
		copy(out[from-lo:], src)
		filled = max(filled, u.to)
		prev = u.p
	}
	return out, nil
}

// clipUses cuts uses at end.
func clipUses(uses []use, end LSN) []use {
	var out []use
	for _, u := range uses {
		u.to = min(u.to, end)
		if u.from < u.to {
			out = append(out, u)
		}
	}
	return out
}
