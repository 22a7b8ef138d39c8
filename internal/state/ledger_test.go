package state

import (
	"testing"

	"github.com/klauspost/compress/zstd"
)

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
