package chunker

import (
	"bytes"
	"fmt"
	"io"

	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// measureParams are the candidates DefaultParams was chosen from.
var measureParams = []Params{
	{Min: 64 << 10, Avg: 256 << 10, Max: 1 << 20},
	{Min: 128 << 10, Avg: 512 << 10, Max: 2 << 20},
	{Min: 256 << 10, Avg: 1 << 20, Max: 4 << 20},
	{Min: 512 << 10, Avg: 1 << 20, Max: 8 << 20}, // restic's
}

// TestMeasureParams prints the measurement behind DefaultParams. It takes
// 20-60 seconds, so it runs only when asked:
//
//	DUALKEY_CHUNKER_MEASURE=1 go test -run MeasureParams -v ./internal/vault/chunker/
//
// The data set is 64 MiB of log-like records with random fields (about 4:1
// with gzip, like much of what gets backed up), then three edits of it:
//
//   - scattered: 5% rewritten in 819 4 KiB regions at random offsets, plus
//     five insertions of 1-16 bytes; the worst case, one edit per ~80 KiB
//   - clustered: 5% rewritten as 32 runs of 100 KiB, plus the insertions; a
//     file edited in a few places
//   - inserts: the five insertions alone; tests resynchronisation
//
// "new" is the share of the edited copy's bytes in chunks the original does
// not have, which a second backup must upload; the ideal is the edited share.
func TestMeasureParams(t *testing.T) {
	if os.Getenv("DUALKEY_CHUNKER_MEASURE") == "" {
		t.Skip("set DUALKEY_CHUNKER_MEASURE=1 to measure candidate Params")
	}
	const size = 64 << 20
	rng := rand.New(rand.NewPCG(1, 1))
	orig := logRecords(rng, size)
	scenarios := []struct {
		name string
		data []byte
	}{
		{"scattered", insertBytes(rng, overwrite(rng, orig, 819, 4<<10))},
		{"clustered", insertBytes(rng, overwrite(rng, orig, 32, 100<<10))},
		{"inserts", insertBytes(rng, orig)},
	}
	// Boundaries depend on the key; averaging over several keys keeps the
	// few dozen chunks per run from making the table a coin toss.
	var gears []*Gear
	for k := range 4 {
		gears = append(gears, NewGear([32]byte{'m', byte(k)}))
	}

	var b strings.Builder
	fmt.Fprintf(&b, "%-16s %6s %6s %5s", "min/avg/max", "chunks", "mean", "MB/s")
	for _, s := range scenarios {
		fmt.Fprintf(&b, " %9s", s.name)
	}
	fmt.Fprintf(&b, " %8s\n", "idx/TiB")
	for _, p := range measureParams {
		nChunks, best := 0, time.Duration(1<<62)
		newBytes := make([]int, len(scenarios))
		for _, g := range gears {
			chunks := chunkAll(t, New(bytes.NewReader(orig), g, p))
			nChunks += len(chunks)
			have := make(map[string]bool, len(chunks))
			for _, c := range chunks {
				have[string(c)] = true
			}
			for i, s := range scenarios {
				for _, c := range chunkAll(t, New(bytes.NewReader(s.data), g, p)) {
					if !have[string(c)] {
						newBytes[i] += len(c)
					}
				}
			}
			for range 3 { // best of several: the machine may be shared
				runtime.GC()
				best = min(best, timeChunking(t, orig, g, p))
			}
		}
		mean := len(gears) * size / nChunks
		fmt.Fprintf(&b, "%-16s %6.1f %5dK %5.0f", sizes(p), float64(nChunks)/float64(len(gears)),
			mean>>10, float64(size)/best.Seconds()/1e6)
		for i, s := range scenarios {
			fmt.Fprintf(&b, " %8.1f%%", 100*float64(newBytes[i])/float64(len(gears)*len(s.data)))
		}
		// ~100 bytes of index and header per chunk, per TiB of unique data.
		fmt.Fprintf(&b, " %6.0fMB\n", float64(1<<40)/float64(mean)*100/1e6)
	}
	t.Logf("\n%s", b.String())
}

// timeChunking returns the time Next takes over data, reusing one buffer.
func timeChunking(t *testing.T, data []byte, g *Gear, p Params) time.Duration {
	c := New(bytes.NewReader(data), g, p)
	buf := make([]byte, p.Max)
	start := time.Now()
	for {
		chunk, err := c.Next(buf)
		if err == io.EOF {
			return time.Since(start)
		}
		if err != nil {
			t.Fatal(err)
		}
		buf = chunk
	}
}

func sizes(p Params) string {
	return fmt.Sprintf("%dK/%dK/%dK", p.Min>>10, p.Avg>>10, p.Max>>10)
}

var (
	logLevels  = []string{"INFO", "INFO", "INFO", "WARN", "ERROR", "DEBUG"}
	logSvcs    = []string{"api", "billing", "auth", "search", "mailer", "worker"}
	logStatus  = []string{"ok", "shipped", "pending", "failed", "refunded"}
	logPaths   = []string{"orders", "users", "invoices", "sessions", "items"}
	logWords   = strings.Fields("the request for order user was completed after retry with timeout from upstream cache miss on shard replica lag exceeded budget")
	logLetters = "abcdefghijklmnopqrstuvwxyz"
)

// logRecords returns n bytes of log lines with random fields.
func logRecords(rng *rand.Rand, n int) []byte {
	out := make([]byte, 0, n+512)
	ts := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for len(out) < n {
		ts = ts.Add(time.Duration(rng.IntN(2000)) * time.Millisecond)
		out = ts.AppendFormat(out, time.RFC3339Nano)
		out = fmt.Appendf(out, " level=%s svc=%s user=%c%c%c%c%d order=%016x amount=%d.%02d status=%s path=/api/v1/%s/%d msg=\"",
			logLevels[rng.IntN(len(logLevels))], logSvcs[rng.IntN(len(logSvcs))],
			logLetters[rng.IntN(26)], logLetters[rng.IntN(26)], logLetters[rng.IntN(26)], logLetters[rng.IntN(26)],
			rng.IntN(10000), rng.Uint64(), rng.IntN(1000), rng.IntN(100),
			logStatus[rng.IntN(len(logStatus))], logPaths[rng.IntN(len(logPaths))], rng.IntN(1e6))
		for i := range 3 + rng.IntN(6) {
			if i > 0 {
				out = append(out, ' ')
			}
			out = append(out, logWords[rng.IntN(len(logWords))]...)
		}
		out = append(out, "\"\n"...)
	}
	return out[:n]
}

// overwrite returns a copy of data with count regions of size bytes, at
// random offsets, replaced by fresh records.
func overwrite(rng *rand.Rand, data []byte, count, size int) []byte {
	out := bytes.Clone(data)
	for range count {
		off := rng.IntN(len(out) - size)
		copy(out[off:off+size], logRecords(rng, size))
	}
	return out
}

// insertBytes returns a copy of data with 1-16 random bytes inserted at five
// random offsets.
func insertBytes(rng *rand.Rand, data []byte) []byte {
	out := bytes.Clone(data)
	for range 5 {
		off := rng.IntN(len(out))
		ins := make([]byte, 1+rng.IntN(16))
		for i := range ins {
			ins[i] = byte(rng.Uint32())
		}
		out = append(out[:off], append(ins, out[off:]...)...)
	}
	return out
}
