package tripwire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Sizes and flags of PostgreSQL 15's WAL format (access/xlogrecord.h,
// access/xlog_internal.h). WAL is written in the server's byte order; the
// decoder reads little-endian, the order of every platform PostgreSQL 15
// is packaged for here (a big-endian server fails the page magic check).
const (
	pageSize    = 8192 // XLOG_BLCKSZ
	blockSize   = 8192 // BLCKSZ, for full-page images
	shortHeader = 24   // MAXALIGN(sizeof(XLogPageHeaderData))
	longHeader  = 40   // MAXALIGN(sizeof(XLogLongPageHeaderData))
	recHeader   = 24   // SizeOfXLogRecord
	pageMagic   = 0xD110

	xlpFirstIsContRecord   = 0x0001
	xlpLongHeader          = 0x0002
	xlpFirstIsOverwriteCon = 0x0008

	maxBlockID       = 32
	blockIDTopXID    = 252
	blockIDOrigin    = 253
	blockIDDataLong  = 254
	blockIDDataShort = 255

	bkpBlockForkMask = 0x0F
	bkpBlockHasImage = 0x10
	bkpBlockHasData  = 0x20
	bkpBlockWillInit = 0x40
	bkpBlockSameRel  = 0x80

	bkpImageHasHole      = 0x01
	bkpImageApply        = 0x02
	bkpImageCompressMask = 0x04 | 0x08 | 0x10 // pglz, lz4, zstd
)

// Resource manager ids (access/rmgrlist.h).
const (
	RmXLOG    = 0
	RmXact    = 1
	RmSmgr    = 2
	RmDbase   = 4
	RmStandby = 8
	RmHeap2   = 9
	RmHeap    = 10
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one decoded WAL record. Its byte slices point into the
// decoder's buffer and are valid only during the [Options.OnRecord] call.
type Record struct {
	LSN    LSN // where the record starts
	End    LSN // just past its last byte
	TotLen uint32
	XID    uint32
	Prev   LSN
	Info   uint8 // xl_info; the high 4 bits belong to the resource manager
	RmID   uint8
	// TopXID is the top-level xid logged with the first record of a
	// subtransaction at wal_level=logical, else 0.
	TopXID uint32
	// Origin is the replication origin, 0 when none was logged.
	Origin   uint16
	Blocks   []BlockRef
	MainData []byte
}

// BlockRef is one block reference of a record.
type BlockRef struct {
	ID       uint8
	Node     RelFileNode
	Fork     uint8
	Block    uint32
	WillInit bool
	// HasImage is set when the record carries a full-page image; the
	// image fields below describe it.
	HasImage   bool
	ImageLen   uint16
	HoleOffset uint16
	HoleLength uint16
	ImageInfo  uint8 // BKPIMAGE flags
	Image      []byte
	Data       []byte

	dataLen int // from the block header, until the data is sliced
}

// ImageCompressed reports whether the full-page image is compressed.
func (b *BlockRef) ImageCompressed() bool { return b.ImageInfo&bkpImageCompressMask != 0 }

// ImageApply reports whether redo restores the image (BKPIMAGE_APPLY).
func (b *BlockRef) ImageApply() bool { return b.ImageInfo&bkpImageApply != 0 }

var errShort = errors.New("truncated")

// reader walks a record's bytes; every read is bounds-checked so that a
// corrupt length can never index past the record.
type reader struct {
	b   []byte
	off int
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil || n < 0 || n > len(r.b)-r.off {
		r.err = errShort
		return nil
	}
	s := r.b[r.off : r.off+n]
	r.off += n
	return s
}

func (r *reader) u8() uint8 {
	if s := r.take(1); s != nil {
		return s[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if s := r.take(2); s != nil {
		return binary.LittleEndian.Uint16(s)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if s := r.take(4); s != nil {
		return binary.LittleEndian.Uint32(s)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if s := r.take(8); s != nil {
		return binary.LittleEndian.Uint64(s)
	}
	return 0
}

func (r *reader) node() RelFileNode {
	return RelFileNode{Spc: r.u32(), DB: r.u32(), Rel: r.u32()}
}

// recordCRC computes xl_crc as PostgreSQL does: CRC-32C over the record
// after the header, then over the header up to (not including) xl_crc.
func recordCRC(b []byte) uint32 {
	c := crc32.Update(0, castagnoli, b[recHeader:])
	return crc32.Update(c, castagnoli, b[:20])
}

// decodeRecord parses a complete record (len(b) == xl_tot_len) into rec,
// reusing rec.Blocks. It checks the CRC and that the block headers account
// for exactly the record's bytes, as PostgreSQL's DecodeXLogRecord does.
func decodeRecord(b []byte, rec *Record) error {
	if len(b) < recHeader {
		return fmt.Errorf("record of %d bytes, shorter than its header", len(b))
	}
	rec.TotLen = binary.LittleEndian.Uint32(b[0:])
	rec.XID = binary.LittleEndian.Uint32(b[4:])
	rec.Prev = LSN(binary.LittleEndian.Uint64(b[8:]))
	rec.Info = b[16]
	rec.RmID = b[17]
	if want, got := binary.LittleEndian.Uint32(b[20:]), recordCRC(b); want != got {
		return fmt.Errorf("CRC mismatch: record has %08x, bytes give %08x", want, got)
	}
	rec.TopXID, rec.Origin = 0, 0
	rec.Blocks = rec.Blocks[:0]
	rec.MainData = nil

	r := reader{b: b, off: recHeader}
	datatotal := 0
	mainLen := 0
	var lastNode *RelFileNode
	maxID := -1
	done := false // the main data header comes last
	for !done && len(b)-r.off > datatotal && r.err == nil {
		id := r.u8()
		switch {
		case id == blockIDDataShort:
			mainLen = int(r.u8())
			datatotal += mainLen
			done = true
		case id == blockIDDataLong:
			mainLen = int(r.u32())
			if mainLen < 0 || mainLen > len(b) {
				return fmt.Errorf("main data length %d exceeds record", mainLen)
			}
			datatotal += mainLen
			done = true
		case id == blockIDOrigin:
			rec.Origin = r.u16()
		case id == blockIDTopXID:
			rec.TopXID = r.u32()
		case id <= maxBlockID:
			if int(id) <= maxID {
				return fmt.Errorf("block id %d out of order", id)
			}
			maxID = int(id)
			var blk BlockRef
			blk.ID = id
			flags := r.u8()
			blk.Fork = flags & bkpBlockForkMask
			blk.WillInit = flags&bkpBlockWillInit != 0
			blk.HasImage = flags&bkpBlockHasImage != 0
			hasData := flags&bkpBlockHasData != 0
			dataLen := int(r.u16())
			if hasData != (dataLen != 0) {
				return fmt.Errorf("block %d: data flag %v with data length %d", id, hasData, dataLen)
			}
			datatotal += dataLen
			if blk.HasImage {
				blk.ImageLen = r.u16()
				blk.HoleOffset = r.u16()
				blk.ImageInfo = r.u8()
				hole := blk.ImageInfo&bkpImageHasHole != 0
				if blk.ImageCompressed() {
					if hole {
						blk.HoleLength = r.u16()
					}
				} else {
					blk.HoleLength = uint16(blockSize - int(blk.ImageLen))
				}
				if err := checkImage(&blk, hole); err != nil {
					return fmt.Errorf("block %d: %w", id, err)
				}
				datatotal += int(blk.ImageLen)
			}
			if flags&bkpBlockSameRel == 0 {
				n := r.node()
				lastNode = &n
			} else if lastNode == nil {
				return fmt.Errorf("block %d: BKPBLOCK_SAME_REL without a previous relation", id)
			}
			if lastNode != nil {
				blk.Node = *lastNode
			}
			blk.Block = r.u32()
			blk.dataLen = dataLen
			rec.Blocks = append(rec.Blocks, blk)
		default:
			return fmt.Errorf("invalid block id %d", id)
		}
	}
	if r.err != nil {
		return fmt.Errorf("block headers: %w", r.err)
	}
	// Block images and data follow in block order, then the main data.
	for i := range rec.Blocks {
		blk := &rec.Blocks[i]
		if blk.HasImage {
			blk.Image = r.take(int(blk.ImageLen))
		}
		if blk.dataLen > 0 {
			blk.Data = r.take(blk.dataLen)
		}
	}
	if mainLen > 0 {
		rec.MainData = r.take(mainLen)
	}
	if r.err != nil {
		return fmt.Errorf("block data: %w", r.err)
	}
	if r.off != len(b) {
		return fmt.Errorf("%d bytes left after the main data", len(b)-r.off)
	}
	return nil
}

// checkImage applies PostgreSQL's consistency rules for a page image header.
func checkImage(blk *BlockRef, hole bool) error {
	switch {
	case int(blk.ImageLen) > blockSize:
		return fmt.Errorf("image of %d bytes", blk.ImageLen)
	case hole && (blk.HoleOffset == 0 || blk.HoleLength == 0 || blk.ImageLen == blockSize):
		return fmt.Errorf("image with hole: offset %d length %d image %d", blk.HoleOffset, blk.HoleLength, blk.ImageLen)
	case !hole && (blk.HoleOffset != 0 || blk.HoleLength != 0):
		return fmt.Errorf("image without hole has offset %d length %d", blk.HoleOffset, blk.HoleLength)
	case blk.ImageCompressed() && blk.ImageLen == blockSize:
		return fmt.Errorf("compressed image of a full block")
	case !hole && !blk.ImageCompressed() && blk.ImageLen != blockSize:
		return fmt.Errorf("uncompressed image without hole of %d bytes", blk.ImageLen)
	}
	return nil
}
