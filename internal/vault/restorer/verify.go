package restorer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sync/errgroup"
)

// verify re-reads every file restored without failure and compares it with
// its content blob IDs.
func (rs *restore) verify(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(rs.opts.Workers)
	for fi, fs := range rs.p.files {
		if fs.failed.Load() || fs.missing.Load() {
			continue
		}
		if err := gctx.Err(); err != nil {
			break
		}
		g.Go(func() error {
			err := rs.verifyFile(gctx, int32(fi))
			if gctx.Err() != nil {
				return gctx.Err()
			}
			if err != nil {
				rs.failFile(int32(fi), fmt.Errorf("verify: %w", err))
				return nil
			}
			rs.c.verified.Add(1)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

var errDiffers = errors.New("restored content differs from the snapshot")

func (rs *restore) verifyFile(ctx context.Context, fi int32) error {
	e := &rs.p.entries[rs.p.files[fi].entry]
	n := e.node
	// O_NOATIME keeps the access times just restored; only the owner (or
	// root) may ask for it.
	flags := os.O_RDONLY | syscall.O_NOFOLLOW | syscall.O_CLOEXEC
	f, err := os.OpenFile(e.abs, flags|syscall.O_NOATIME, 0)
	if errors.Is(err, os.ErrPermission) {
		f, err = os.OpenFile(e.abs, flags, 0)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != int64(n.Size) {
		return fmt.Errorf("%w: size %d, want %d", errDiffers, st.Size(), n.Size)
	}
	var buf []byte
	var off int64
	for _, id := range n.Content {
		if err := ctx.Err(); err != nil {
			return err
		}
		loc, ok := rs.r.Index().Lookup(id)
		if !ok {
			return fmt.Errorf("data blob %s is not in the index", id)
		}
		if int64(loc.RawLength) > int64(n.Size)-off {
			return nil // beyond the recorded size: truncated on purpose
		}
		if cap(buf) < int(loc.RawLength) {
			buf = make([]byte, loc.RawLength)
		}
		b := buf[:loc.RawLength]
		if _, err := io.ReadFull(f, b); err != nil {
			return err
		}
		if rs.r.BlobID(b) != id {
			return fmt.Errorf("%w at offset %d", errDiffers, off)
		}
		off += int64(len(b))
	}
	return nil
}
