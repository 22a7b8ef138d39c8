package ledger

import (
	"bytes"
	"cmp"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// ObjectPrefix starts the name of every mirror object; other names in a
// Mirror are ignored.
const ObjectPrefix = "ledger/"

// maxSpan bounds the records one mirror object may claim to hold, so that a
// malformed name cannot make a reader allocate without bound.
const maxSpan = 1 << 20

// mirrorBatch is how many bytes of records one mirror pass reads from the
// store before writing them, so that catching up after a long vault outage
// neither holds a store cursor open during vault I/O nor the whole backlog
// in memory.
const mirrorBatch = 8 << 20

// ObjectName returns the mirror object name of the span from..to (inclusive):
// "ledger/" and both seqs as 20 decimal digits, so names sort by seq.
func ObjectName(from, to uint64) string {
	return fmt.Sprintf("%s%020d-%020d", ObjectPrefix, from, to)
}

// ParseObjectName is the inverse of ObjectName.
func ParseObjectName(name string) (from, to uint64, err error) {
	rest, ok := strings.CutPrefix(name, ObjectPrefix)
	a, b, ok2 := strings.Cut(rest, "-")
	if !ok || !ok2 || len(a) != 20 || len(b) != 20 {
		return 0, 0, fmt.Errorf("%w: mirror object name %q", ErrFormat, name)
	}
	from, err1 := strconv.ParseUint(a, 10, 64)
	to, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil || from == 0 || to < from || to-from >= maxSpan || ObjectName(from, to) != name {
		return 0, 0, fmt.Errorf("%w: mirror object name %q", ErrFormat, name)
	}
	return from, to, nil
}

// ParseObject decodes a mirror object: the canonical encodings of records
// from..to (as named), each followed by "\n", each with a valid hash and
// linked to the one before, the last one a checkpoint. It does not check
// the checkpoint's signature. raw holds each record's encoding.
func ParseObject(name string, data []byte) (recs []Record, raw [][]byte, err error) {
	from, to, err := ParseObjectName(name)
	if err != nil {
		return nil, nil, err
	}
	if len(data) == 0 || data[len(data)-1] != '\n' {
		return nil, nil, fmt.Errorf("%w: %s: does not end in a newline", ErrFormat, name)
	}
	lines := bytes.Split(data[:len(data)-1], []byte{'\n'})
	if uint64(len(lines)) != to-from+1 {
		return nil, nil, fmt.Errorf("%w: %s: holds %d records, want %d", ErrFormat, name, len(lines), to-from+1)
	}
	for i, line := range lines {
		r, err := ParseRecord(line)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: line %d: %w", name, i+1, err)
		}
		switch {
		case r.Seq != from+uint64(i):
			return nil, nil, fmt.Errorf("%w: %s: line %d holds seq %d", ErrFormat, name, i+1, r.Seq)
		case r.ComputeHash() != r.Hash:
			return nil, nil, fmt.Errorf("%w: %s: seq %d does not match its hash", ErrFormat, name, r.Seq)
		case i > 0 && r.Prev != recs[i-1].Hash:
			return nil, nil, fmt.Errorf("%w: %s: seq %d does not link to seq %d", ErrFormat, name, r.Seq, r.Seq-1)
		}
		recs = append(recs, r)
		raw = append(raw, line)
	}
	if !recs[len(recs)-1].IsCheckpoint() {
		return nil, nil, fmt.Errorf("%w: %s: does not end with a checkpoint", ErrFormat, name)
	}
	return recs, raw, nil
}

func (l *Ledger) kickMirror() {
	if l.mirror == nil {
		return
	}
	select {
	case l.kick <- struct{}{}:
	default: // a pass is already due; it will see this checkpoint too
	}
}

// mirrorLoop runs mirror passes when kicked, until ctx ends, so that a slow
// or absent vault never holds up Append.
func (l *Ledger) mirrorLoop(ctx context.Context) {
	defer l.worker.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.kick:
		}
		mctx, cancel := context.WithTimeout(ctx, l.opts.MirrorTimeout)
		if err := l.mirrorNow(mctx); err != nil && ctx.Err() == nil {
			l.log.Warn("ledger mirror failed; retrying at the next checkpoint", "mirrored", l.mirroredSeq(), "err", err)
		}
		cancel()
	}
}

func (l *Ledger) mirroredSeq() uint64 {
	l.mirrorMu.Lock()
	defer l.mirrorMu.Unlock()
	return l.mirrored
}

// syncStore is a Store whose commits may reach its disk after they return
// (state's WithLedgerSync); Sync makes every one so far durable.
type syncStore interface {
	Sync(ctx context.Context) error
}

// mirrorNow writes every complete span after the mirrored seq to the mirror.
func (l *Ledger) mirrorNow(ctx context.Context) error {
	if l.mirror == nil {
		return nil
	}
	l.mirrorMu.Lock()
	defer l.mirrorMu.Unlock()
	if !l.known {
		if err := l.learnMirrored(ctx); err != nil {
			return err
		}
	}
	for {
		objs, err := l.collectSpans(ctx)
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			return nil
		}
		// What goes into the vault must be on the store's disk first: a
		// record lost to a crash would be written again differently, and
		// the mirror would then accuse the store of tampering.
		if s, ok := l.store.(syncStore); ok {
			if err := s.Sync(ctx); err != nil {
				return fmt.Errorf("ledger: mirror: %w", err)
			}
		}
		for _, o := range objs {
			if err := l.mirror.Put(ctx, o.name, o.data); err != nil {
				return fmt.Errorf("ledger: mirror %s: %w", o.name, err)
			}
			l.mirrored, l.mirroredHash = o.to, o.hash
		}
	}
}

// learnMirrored finds the newest valid mirror object (well-formed, ending
// in a checkpoint signed by our key) and the hash it ends with, so that
// mirroring continues from the mirror's copy, not the store's. Invalid
// objects are logged and skipped: junk planted in the vault must not stop
// the ledger from mirroring (Verify reports it).
func (l *Ledger) learnMirrored(ctx context.Context) error {
	type obj struct {
		name string
		to   uint64
	}
	var objs []obj
	err := l.mirror.List(ctx, func(name string) error {
		if !strings.HasPrefix(name, ObjectPrefix) {
			return nil
		}
		if _, to, err := ParseObjectName(name); err == nil {
			objs = append(objs, obj{name, to})
		} else {
			l.log.Error("ledger mirror holds a malformed object name", "name", name)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("ledger: list mirror: %w", err)
	}
	slices.SortFunc(objs, func(a, b obj) int { return cmp.Compare(b.to, a.to) })
	pub := l.key.Public().(ed25519.PublicKey)
	l.mirrored, l.mirroredHash = 0, Hash{}
	for _, o := range objs {
		data, err := l.mirror.Get(ctx, o.name)
		if err != nil {
			return fmt.Errorf("ledger: read mirror %s: %w", o.name, err)
		}
		recs, _, err := ParseObject(o.name, data)
		if err == nil {
			_, err = ParseCheckpoint(&recs[len(recs)-1], pub)
		}
		if err != nil {
			l.log.Error("ledger mirror holds an invalid object; run dualkey audit verify", "name", o.name, "err", err)
			continue
		}
		l.mirrored, l.mirroredHash = o.to, recs[len(recs)-1].Hash
		break
	}
	if tip, _ := l.Tip(); l.mirrored > tip {
		l.log.Error("ledger store ends before its mirror: truncated, or restored from an older backup; run dualkey audit verify", "store", tip, "mirror", l.mirrored)
	}
	l.known = true
	return nil
}

type span struct {
	name string
	data []byte
	to   uint64
	hash Hash
}

var errBatchFull = errors.New("batch full")

// collectSpans reads complete spans after the mirrored seq from the store,
// up to about mirrorBatch bytes, checking that they continue the mirrored
// chain: a store edited before its records were mirrored must not poison
// the mirror too.
func (l *Ledger) collectSpans(ctx context.Context) ([]span, error) {
	var (
		out   []span
		buf   []byte
		size  int
		from  = l.mirrored + 1
		prev  = l.mirroredHash
		next  = l.mirrored + 1
		total int
	)
	err := l.store.Read(ctx, from, func(seq uint64, b []byte) error {
		r, err := ParseRecord(b)
		if err != nil {
			return fmt.Errorf("ledger: mirror: record %d: %w", seq, err)
		}
		if r.Seq != seq || seq != next || r.ComputeHash() != r.Hash || r.Prev != prev {
			return fmt.Errorf("%w at seq %d: not mirroring; run dualkey audit verify", ErrTampered, seq)
		}
		buf = append(buf, b...)
		buf = append(buf, '\n')
		size += len(b) + 1
		prev, next = r.Hash, seq+1
		if r.IsCheckpoint() {
			out = append(out, span{name: ObjectName(from, seq), data: buf, to: seq, hash: r.Hash})
			total += size
			buf, size, from = nil, 0, seq+1
			if total >= mirrorBatch {
				return errBatchFull
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, errBatchFull) {
		if errors.Is(err, ErrTampered) {
			l.log.Error("ledger chain broken; mirroring stopped", "err", err)
		}
		return nil, err
	}
	return out, nil
}
