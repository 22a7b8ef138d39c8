package restorer

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sync/errgroup"

	"github.com/dualkey/dualkey/internal/vault/backend"
	"github.com/dualkey/dualkey/internal/vault/repo"
)

const (
	// maxHandles bounds the files one worker keeps open. Packs hold blobs
	// in the order the backup read them, so a span touches files mostly one
	// after another and a few handles catch nearly every reuse.
	maxHandles = 16
	// maxCombine is how many bytes of consecutive blobs of one file a
	// worker gathers into one write. With 8 KiB page chunks this turns 128
	// pwrite calls into one.
	maxCombine = 1 << 20
)

// fetch loads every span with Options.Workers workers, decodes its blobs and
// writes them into their files. Damage is recorded, not returned; only ctx
// ending stops it early.
func (rs *restore) fetch(ctx context.Context) error {
	if len(rs.p.spans) == 0 {
		return nil
	}
	ch := make(chan *span)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(ch)
		for i := range rs.p.spans {
			select {
			case ch <- &rs.p.spans[i]:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range min(rs.opts.Workers, len(rs.p.spans)) {
		g.Go(func() error {
			w := &writer{rs: rs, pf: -1}
			for s := range ch {
				if err := gctx.Err(); err != nil {
					return err
				}
				w.span(gctx, s)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// writer is one worker's state: its open files and the write it is
// gathering.
type writer struct {
	rs      *restore
	handles []openFile // least recently used first

	bb repo.BlobBuf // the decoded blob's buffers, reused

	pf    int32 // file of the gathered write, -1 if none
	poff  int64
	pbuf  []byte
	puses int64 // blob uses in pbuf
}

type openFile struct {
	file int32
	f    *os.File
}

func (w *writer) span(ctx context.Context, s *span) {
	defer w.closeAll()
	rs := w.rs
	h := backend.Handle{Type: backend.Pack, Name: s.pack.String()}
	data, err := rs.r.Store().Load(ctx, h, s.start, s.end-s.start)
	switch {
	case err == nil:
		rs.c.loaded.Add(int64(len(data)))
		for _, bp := range s.blobs {
			off := int64(bp.loc.Offset) - s.start
			w.blob(bp, data[off:off+int64(bp.loc.Length)])
		}
	case ctx.Err() != nil:
		return
	default:
		// Try the blobs one by one: a pack cut short still gives the blobs
		// before the cut.
		for _, bp := range s.blobs {
			d, err := rs.r.Store().Load(ctx, h, int64(bp.loc.Offset), int64(bp.loc.Length))
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				rs.c.blobsDone.Add(1)
				w.giveUp(bp, fmt.Errorf("load blob %x: %w", bp.loc.ID[:], err))
				continue
			}
			rs.c.loaded.Add(int64(len(d)))
			w.blob(bp, d)
		}
	}
	w.flush()
}

func (w *writer) blob(bp *blobPlan, sealed []byte) {
	rs := w.rs
	plain, err := rs.r.DecodeBlobBuf(bp.loc, sealed, &w.bb) // consumed (written or copied) before the next
	rs.c.blobsDone.Add(1)
	if err != nil {
		w.giveUp(bp, err)
		return
	}
	zero := isZero(plain)
	for _, u := range bp.uses {
		if zero {
			// A hole: the file already has its size, so skipping the
			// write leaves these bytes unallocated and reading as zeros.
			w.done(u.file, 1, int64(len(plain)))
			continue
		}
		if len(plain) >= 2*holeBlock && hasZeroBlock(plain) {
			w.writeSparse(u.file, u.off, plain)
			continue
		}
		w.write(u.file, u.off, plain)
	}
}

// holeBlock is the granularity at which zeros inside a blob become holes:
// a content-defined chunk of a sparse file mixes data with long zero runs.
const holeBlock = 4096

// hasZeroBlock reports whether b has an aligned all-zero block. On data
// without zeros each block is rejected at its first byte, so the scan is
// cheap.
func hasZeroBlock(b []byte) bool {
	for i := 0; i+holeBlock <= len(b); i += holeBlock {
		if b[i] == 0 && isZero(b[i:i+holeBlock]) {
			return true
		}
	}
	return false
}

// writeSparse writes the parts of data that are not aligned zero blocks,
// leaving holes for the rest (the file already has its final size).
func (w *writer) writeSparse(file int32, off int64, data []byte) {
	if w.rs.p.files[file].missing.Load() {
		w.done(file, 1, 0)
		return
	}
	w.flush()
	f, err := w.handle(file)
	for start := 0; err == nil && start < len(data); {
		end := start
		for end < len(data) {
			blk := min(holeBlock, len(data)-end)
			if blk == holeBlock && isZero(data[end:end+blk]) {
				break
			}
			end += blk
		}
		if end > start {
			_, err = f.WriteAt(data[start:end], off+int64(start))
		}
		for end < len(data) && end+holeBlock <= len(data) && isZero(data[end:end+holeBlock]) {
			end += holeBlock
		}
		start = end
	}
	n := int64(len(data))
	if err != nil {
		w.rs.failFile(file, err)
		n = 0
	}
	w.done(file, 1, n)
}

func (w *writer) giveUp(bp *blobPlan, err error) {
	for _, u := range bp.uses {
		w.rs.failFile(u.file, err)
		w.done(u.file, 1, 0)
	}
}

func (w *writer) write(file int32, off int64, data []byte) {
	if w.rs.p.files[file].missing.Load() {
		w.done(file, 1, 0)
		return
	}
	if w.pf == file && w.poff+int64(len(w.pbuf)) == off && len(w.pbuf)+len(data) <= maxCombine {
		w.pbuf = append(w.pbuf, data...)
		w.puses++
		return
	}
	w.flush()
	if len(data) >= maxCombine/4 {
		w.writeAt(file, off, data, 1) // large enough alone; spare the copy
		return
	}
	w.pf, w.poff, w.puses = file, off, 1
	w.pbuf = append(w.pbuf[:0], data...)
}

func (w *writer) flush() {
	if w.puses == 0 {
		return
	}
	file, uses := w.pf, w.puses
	w.pf, w.puses = -1, 0
	w.writeAt(file, w.poff, w.pbuf, uses)
}

func (w *writer) writeAt(file int32, off int64, data []byte, uses int64) {
	f, err := w.handle(file)
	if err == nil {
		_, err = f.WriteAt(data, off)
	}
	n := int64(len(data))
	if err != nil {
		w.rs.failFile(file, err)
		n = 0
	}
	w.done(file, uses, n)
}

// done accounts for uses finished blob uses of file and finishes the file
// when none are left. A use still in pbuf is not done: a file is finished
// only after its last byte was written.
func (w *writer) done(file int32, uses, bytes int64) {
	w.rs.c.bytesDone.Add(bytes)
	if w.rs.p.files[file].remaining.Add(-uses) == 0 {
		w.rs.finishFile(file, w.take(file))
	}
}

// handle returns an open handle for file, opening it (and closing the least
// recently used one) if needed.
func (w *writer) handle(file int32) (*os.File, error) {
	for i, h := range w.handles {
		if h.file == file {
			copy(w.handles[i:], w.handles[i+1:])
			w.handles[len(w.handles)-1] = h
			return h.f, nil
		}
	}
	e := &w.rs.p.entries[w.rs.p.files[file].entry]
	f, err := os.OpenFile(e.abs, os.O_WRONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if len(w.handles) == maxHandles {
		w.handles[0].f.Close()
		w.handles = append(w.handles[:0], w.handles[1:]...)
	}
	w.handles = append(w.handles, openFile{file, f})
	return f, nil
}

// take removes file's handle from the cache and returns it, or nil.
func (w *writer) take(file int32) *os.File {
	for i, h := range w.handles {
		if h.file == file {
			w.handles = append(w.handles[:i], w.handles[i+1:]...)
			return h.f
		}
	}
	return nil
}

func (w *writer) closeAll() {
	for _, h := range w.handles {
		h.f.Close()
	}
	w.handles = w.handles[:0]
}

var zeroBlock [64 << 10]byte

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
