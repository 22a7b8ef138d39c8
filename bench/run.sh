#!/usr/bin/env bash
# run.sh is `make bench`: prepare the data sets, measure the machine's limits,
# then time dualkey, restic and borg on the same data, then dualkey's
# PostgreSQL protection against pgBackRest and pg_basebackup (bench/pg.sh),
# then the gate against PgBouncer and direct connections (bench/gate.sh).
# Never run by make test.
#
# Usage: bench/run.sh [WORKDIR]   (default $BENCH_WORK or /tmp/dualkey-bench)
# Environment (see data.sh and vault.sh): BENCH_SCALE=full|small,
# BENCH_SETS, BENCH_TOOLS, BENCH_RESULTS, BENCH_KEEP_REPOS=1; pg.sh: BENCH_PG_SCALE,
# BENCH_PG_SETS, BENCH_PGBR_COMPRESS...; BENCH_PG=0 skips the PostgreSQL step;
# gate.sh: BENCH_GATE_SECONDS, BENCH_GATE_ROUNDS...; BENCH_GATE=0 skips it.
# The full scale needs about 10 GiB free in WORKDIR and an idle machine.
set -euo pipefail

cd "$(dirname "$0")/.."
WORK=${1:-${BENCH_WORK:-/tmp/dualkey-bench}}
export BENCH_RESULTS=${BENCH_RESULTS:-$PWD/bench/results/$(date +%Y-%m-%d).md}
mkdir -p "$(dirname "$BENCH_RESULTS")"

((EUID == 0)) || echo "bench: warning: not root; data.sh needs root and caches cannot be dropped" >&2
if (($(awk '{ printf "%d", $1 }' /proc/loadavg) >= 1)); then
	echo "bench: warning: load average $(cut -d' ' -f1-3 /proc/loadavg); other work will skew the numbers" >&2
fi

echo "bench: preparing data sets in $WORK (scale ${BENCH_SCALE:-full})" >&2
bench/data.sh "$WORK" >&2
echo "bench: measuring machine limits" >&2
bench/limits.sh "$WORK" | tee -a "$BENCH_RESULTS"
echo "bench: timing backup tools" >&2
bench/vault.sh "$WORK"
if [[ ${BENCH_PG:-1} != 0 ]]; then
	echo "bench: timing PostgreSQL protection: dualkey vs pgBackRest vs pg_basebackup" >&2
	bench/pg.sh "$WORK"
fi
if [[ ${BENCH_GATE:-1} != 0 ]]; then
	echo "bench: timing the gate: direct vs PgBouncer vs dualkey gate" >&2
	bench/gate.sh "$WORK"
fi
echo "bench: results appended to $BENCH_RESULTS" >&2
