#!/usr/bin/env bash
# limits.sh measures this machine's ceilings for a backup tool, so results can
# say how close each step gets: sequential disk write and cold read in the work
# dir, and per-core throughput of Go's AES-256-GCM and SHA-256 (what the vault
# uses to encrypt and to name chunks), on one and on all cores.
#
# Usage: bench/limits.sh [WORKDIR]   (default $BENCH_WORK or /tmp/dualkey-bench)
# Prints a markdown section on stdout. BENCH_DISK_MIB sets the test file size.
set -euo pipefail

WORK=${1:-${BENCH_WORK:-/tmp/dualkey-bench}}
MIB=${BENCH_DISK_MIB:-$([[ ${BENCH_SCALE:-full} == small ]] && echo 256 || echo 1024)}
mkdir -p "$WORK"
tmp=$(mktemp -d "$WORK/limits.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

drop() { { sync; echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null || true; }
# dd's last line: "N bytes (...) copied, S s, R MB/s"; keep the rate.
dd_rate() { dd "$@" 2>&1 | awk -F', ' '/copied/ { print $NF }'; }

head -c $((MIB << 20)) /dev/urandom >"$tmp/src"
drop
write=$(dd_rate if="$tmp/src" of="$tmp/dst" bs=4M conv=fdatasync)
drop
read=$(dd_rate if="$tmp/dst" of=/dev/null bs=4M)

cat >"$tmp/main.go" <<'GO'
package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"fmt"
	"runtime"
	"sync"
	"time"
)

// rate runs f on a 1 MiB buffer 1000 times in each of n goroutines and
// returns MiB/s for all of them together.
func rate(n int, f func(dst, src []byte)) float64 {
	const ops = 1000
	var wg sync.WaitGroup
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			src := make([]byte, 1<<20)
			dst := make([]byte, 0, len(src)+64)
			for range ops {
				f(dst, src)
			}
		}()
	}
	wg.Wait()
	return float64(n*ops) / time.Since(start).Seconds()
}

func main() {
	key := make([]byte, 32)
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(block)
	nonce := make([]byte, aead.NonceSize())
	seal := func(dst, src []byte) { aead.Seal(dst, nonce, src, nil) }
	hash := func(_, src []byte) { sha256.Sum256(src) }
	cores := runtime.NumCPU()
	fmt.Printf("| Go AES-256-GCM seal | %.0f MiB/s | %.0f MiB/s |\n", rate(1, seal), rate(cores, seal))
	fmt.Printf("| Go SHA-256 | %.0f MiB/s | %.0f MiB/s |\n", rate(1, hash), rate(cores, hash))
}
GO

echo "### Machine limits ($(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "$(lscpu | awk -F': +' '/^Model name/ {print $2; exit}'), $(nproc) cores; $(go version | cut -d' ' -f3)." \
	"Disk: $WORK on $(findmnt -no SOURCE,FSTYPE -T "$WORK" | tr -s ' ' ' ')." \
	"Load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "| what | one core | all $(nproc) cores |"
echo "|---|---|---|"
echo "| sequential write, $MIB MiB, dd bs=4M conv=fdatasync | $write | |"
echo "| sequential cold read, dd bs=4M | $read | |"
(cd "$tmp" && GOFLAGS='' go run main.go)
echo
