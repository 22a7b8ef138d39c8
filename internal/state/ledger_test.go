package state

import (
	"bytes"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// FuzzLedgerRow: whatever someone writes into a ledger row (codec and
// bytes), decoding it returns or fails without panicking, never more than
// maxLedgerRecord bytes; and a record stored by encodeRec decodes to
// itself.
func FuzzLedgerRow(f *testing.F) {
	for _, rec := range [][]byte{[]byte(`{"seq":1}`), statementsJSON(9), bytes.Repeat([]byte{0}, ledgerCompressMin)} {
		c, z := encodeRec(rec)
		f.Add(int16(c), z, rec)
	}
	f.Add(int16(codecZstd), []byte{0x28, 0xb5, 0x2f, 0xfd, 0xa5}, []byte("x"))
	f.Add(int16(7), []byte("x"), []byte("x"))
	f.Fuzz(func(t *testing.T, codec int16, stored, rec []byte) {
		got, err := decodeRec(ledgerRow{seq: 1, codec: ledgerCodec(codec), rec: stored})
		if err == nil && len(got) > maxLedgerRecord {
			t.Fatalf("decoded %d bytes, over the limit", len(got))
		}
		if len(rec) == 0 || len(rec) > 1<<16 {
			return
		}
		c, z := encodeRec(rec)
		back, err := decodeRec(ledgerRow{seq: 1, codec: c, rec: z})
		if err != nil || !bytes.Equal(back, rec) {
			t.Fatalf("a record of %d bytes stored with codec %d reads back %d bytes, %v", len(rec), c, len(back), err)
		}
	})
}

// BenchmarkLedgerCodec: compressing a statements record like the gate's
// under pgbench TPC-B (50 ms of 8 clients: ~400 statements), at each
// level worth considering; it reports the ratio.
func BenchmarkLedgerCodec(b *testing.B) {
	rec := statementsJSON(400)
	for _, lvl := range []zstd.EncoderLevel{zstd.SpeedFastest, zstd.SpeedDefault} {
		b.Run(lvl.String(), func(b *testing.B) {
			e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(lvl), zstd.WithLowerEncoderMem(true))
			if err != nil {
				b.Fatal(err)
			}
			var z []byte
			b.SetBytes(int64(len(rec)))
			for b.Loop() {
				z = e.EncodeAll(rec, z[:0])
			}
			b.ReportMetric(float64(len(rec))/float64(len(z)), "ratio")
		})
	}
}

// TestLedgerRowBomb: a small row that would decompress past
// maxLedgerRecord is refused, not allocated.
func TestLedgerRowBomb(t *testing.T) {
	z := ledgerEncoder().EncodeAll(make([]byte, maxLedgerRecord+1), nil)
	if len(z) > 64<<10 {
		t.Fatalf("the bomb is %d bytes", len(z))
	}
	if rec, err := decodeRec(ledgerRow{seq: 9, codec: codecZstd, rec: z}); err == nil {
		t.Fatalf("decoded %d bytes from a %d-byte row", len(rec), len(z))
	}
}
