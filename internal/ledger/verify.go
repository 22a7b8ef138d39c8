package ledger

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"slices"
	"sort"
	"strings"
)

// Kinds of problems Verify reports.
const (
	ProblemMalformed  = "malformed"  // a stored record does not parse
	ProblemEdited     = "edited"     // a record does not match its own hash
	ProblemReplaced   = "replaced"   // the next record links to another version of this one: replaced, forged, or edited and re-hashed
	ProblemDeleted    = "deleted"    // a gap in seq
	ProblemInserted   = "inserted"   // a second record claims this seq and the chain does not run through it
	ProblemReordered  = "reordered"  // a row holds another seq's record, or two unlinked records claim one seq
	ProblemCheckpoint = "checkpoint" // a checkpoint with a bad signature or covering the wrong record
	ProblemTruncated  = "truncated"  // the store ends before the mirror does
	ProblemMirror     = "mirror"     // a store record differs from the mirror's copy
	ProblemMirrorBad  = "mirror-malformed"
)

// maxProblems bounds a report: one edit re-hashed from seq 1 on would
// otherwise name every record of the ledger.
const maxProblems = 1000

// Problem is one thing Verify found wrong, at the seq it names.
type Problem struct {
	Seq    uint64 // the record concerned (the first of a range); 0 for a mirror object with a bad name
	Kind   string // a Problem constant
	Detail string
}

func (p Problem) String() string { return fmt.Sprintf("seq %d: %s: %s", p.Seq, p.Kind, p.Detail) }

// Report is what Verify found.
type Report struct {
	Records     uint64 // rows read from the store
	Checkpoints uint64 // checkpoints in the store with a valid signature
	LastSeq     uint64 // the store's highest seq
	SignedSeq   uint64 // the highest seq a valid checkpoint in the store covers
	MirroredSeq uint64 // the highest seq in a valid mirror object; 0 without a mirror
	Problems    []Problem
	Omitted     int // problems beyond the first maxProblems, not listed
}

// OK reports whether Verify found nothing wrong.
func (r *Report) OK() bool { return len(r.Problems) == 0 && r.Omitted == 0 }

func (r *Report) add(seq uint64, kind, format string, args ...any) {
	if len(r.Problems) >= maxProblems {
		r.Omitted++
		return
	}
	r.Problems = append(r.Problems, Problem{Seq: seq, Kind: kind, Detail: fmt.Sprintf(format, args...)})
}

// row is what Verify keeps of one stored record: no Data but a checkpoint's.
type row struct {
	row     uint64 // the store's seq for it
	rec     Record
	hashOK  bool
	digest  [32]byte // of the stored bytes
	content [32]byte // of the encoding with Prev and Hash zeroed
}

func contentDigest(r Record) [32]byte {
	r.Prev, r.Hash = Hash{}, Hash{}
	return sha256.Sum256(r.Encode())
}

// Verify walks store and mirror (which may be nil) and reports every
// problem it finds, with its seq; pub is the ledger's public key. The error
// is for I/O failures only: tampering is reported in the Report.
func Verify(ctx context.Context, store Store, mirror Mirror, pub ed25519.PublicKey) (*Report, error) {
	rep := &Report{}
	var rows []row
	malformed := map[uint64]bool{}
	err := store.Read(ctx, 1, func(seq uint64, b []byte) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		rep.Records++
		rep.LastSeq = max(rep.LastSeq, seq)
		r, err := ParseRecord(b)
		if err != nil {
			malformed[seq] = true
			rep.add(seq, ProblemMalformed, "%v", err)
			return nil
		}
		w := row{row: seq, rec: r, hashOK: r.ComputeHash() == r.Hash, digest: sha256.Sum256(b), content: contentDigest(r)}
		if !r.IsCheckpoint() {
			w.rec.Data = nil
		}
		rows = append(rows, w)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("ledger: verify: read store: %w", err)
	}

	// Each row on its own.
	bySeq := map[uint64][]int{}
	for i := range rows {
		w := &rows[i]
		if !w.hashOK {
			rep.add(w.row, ProblemEdited, "record does not match its hash")
		}
		if w.rec.Seq != w.row {
			rep.add(w.row, ProblemReordered, "row %d holds record %d", w.row, w.rec.Seq)
		}
		bySeq[w.rec.Seq] = append(bySeq[w.rec.Seq], i)
	}

	// One record per seq: where several claim a seq, keep the one the next
	// record links to.
	seqs := make([]uint64, 0, len(bySeq))
	for s := range bySeq {
		seqs = append(seqs, s)
	}
	slices.Sort(seqs)
	chain := make(map[uint64]*row, len(bySeq))
	for _, s := range seqs {
		cands := bySeq[s]
		if len(cands) == 1 {
			chain[s] = &rows[cands[0]]
			continue
		}
		linked := -1
		for _, c := range cands {
			for _, n := range bySeq[s+1] {
				if rows[n].hashOK && rows[n].rec.Prev == rows[c].rec.Hash {
					linked = c
				}
			}
		}
		keep := linked
		if keep < 0 {
			keep = cands[0]
			for _, c := range cands {
				if rows[c].row == s {
					keep = c
				}
			}
		}
		chain[s] = &rows[keep]
		for _, c := range cands {
			switch {
			case c == keep:
			case linked >= 0:
				rep.add(s, ProblemInserted, "row %d holds a record %d the chain does not run through (inserted or forged)", rows[c].row, s)
			default:
				rep.add(s, ProblemReordered, "rows %d and %d both hold a record %d", rows[keep].row, rows[c].row, s)
			}
		}
	}

	// Gaps, between the seqs present (a malformed row counts as present).
	present := slices.Clone(seqs)
	for s := range malformed {
		present = append(present, s)
	}
	slices.Sort(present)
	present = slices.Compact(present)
	next := uint64(1)
	for _, s := range present {
		switch {
		case s == next+1:
			rep.add(next, ProblemDeleted, "record %d is missing", next)
		case s > next:
			rep.add(next, ProblemDeleted, "records %d to %d are missing", next, s-1)
		}
		next = s + 1
	}

	// Links and checkpoints.
	for _, s := range seqs {
		w := chain[s]
		if !w.hashOK {
			continue // its Prev cannot be trusted; reported as edited
		}
		if p, ok := chain[s-1]; ok && s > 1 && p.rec.Hash != w.rec.Prev {
			rep.add(s-1, ProblemReplaced, "record %d links to another record %d (replaced, forged, or edited and re-hashed)", s, s-1)
		}
		if w.rec.IsCheckpoint() {
			c, err := ParseCheckpoint(&w.rec, pub)
			if err != nil {
				rep.add(s, ProblemCheckpoint, "%v", err)
				continue
			}
			rep.Checkpoints++
			rep.SignedSeq = max(rep.SignedSeq, c.Seq)
		}
	}

	if mirror != nil {
		if err := verifyMirror(ctx, mirror, pub, chain, rep); err != nil {
			return nil, err
		}
	}
	sort.SliceStable(rep.Problems, func(i, j int) bool { return rep.Problems[i].Seq < rep.Problems[j].Seq })
	return rep, nil
}

type mirrored struct {
	digest, content [32]byte
	name            string
}

func verifyMirror(ctx context.Context, mirror Mirror, pub ed25519.PublicKey, chain map[uint64]*row, rep *Report) error {
	var names []string
	err := mirror.List(ctx, func(name string) error {
		if strings.HasPrefix(name, ObjectPrefix) {
			names = append(names, name)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("ledger: verify: list mirror: %w", err)
	}
	slices.Sort(names)
	copies := map[uint64]mirrored{}
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return err
		}
		from, _, err := ParseObjectName(name)
		if err != nil {
			rep.add(0, ProblemMirrorBad, "%v", err)
			continue
		}
		data, err := mirror.Get(ctx, name)
		if err != nil {
			return fmt.Errorf("ledger: verify: read mirror %s: %w", name, err)
		}
		recs, raw, err := ParseObject(name, data)
		if err != nil {
			rep.add(from, ProblemMirrorBad, "%v", err)
			continue
		}
		last := &recs[len(recs)-1]
		if _, err := ParseCheckpoint(last, pub); err != nil {
			rep.add(last.Seq, ProblemMirrorBad, "%s: %v", name, err)
			continue
		}
		for i, r := range recs {
			m := mirrored{digest: sha256.Sum256(raw[i]), content: contentDigest(r), name: name}
			if old, ok := copies[r.Seq]; ok && old.digest != m.digest {
				rep.add(r.Seq, ProblemMirrorBad, "%s and %s hold different records %d", old.name, name, r.Seq)
				continue
			}
			copies[r.Seq] = m
			rep.MirroredSeq = max(rep.MirroredSeq, r.Seq)
		}
	}

	seqs := make([]uint64, 0, len(copies))
	for s := range copies {
		seqs = append(seqs, s)
	}
	slices.Sort(seqs)
	// A run of records that differ from the mirror only in their hashes
	// follows one edit that was re-hashed; name the run once.
	var rehashFrom, rehashTo uint64
	flush := func() {
		if rehashFrom != 0 {
			rep.add(rehashFrom, ProblemMirror, "records %d to %d carry other hashes than the mirror's copies (re-hashed)", rehashFrom, rehashTo)
			rehashFrom = 0
		}
	}
	for _, s := range seqs {
		m := copies[s]
		w, ok := chain[s]
		if !ok || w.digest == m.digest {
			flush()
			continue // missing ones are reported as deleted or truncated
		}
		if w.content == m.content {
			if rehashFrom == 0 {
				rehashFrom = s
			}
			rehashTo = s
			continue
		}
		flush()
		rep.add(s, ProblemMirror, "record differs from the mirror's copy in %s (edited)", m.name)
	}
	flush()
	if rep.MirroredSeq > rep.LastSeq {
		rep.add(rep.LastSeq+1, ProblemTruncated, "the store ends at %d but the mirror holds records to %d", rep.LastSeq, rep.MirroredSeq)
	}
	return nil
}
