#!/usr/bin/env bash
# data.sh prepares the three data sets of the vault benchmark, each in two
# states: base/<set> (the first backup) and changed/<set> (about 5% changed,
# the second backup).
#
#   pgbench  the stopped data directory of a PostgreSQL 15 database after
#            `pgbench -i -s 100` (run with wal_level=minimal, so little WAL)
#            and CHECKPOINT: about 1.5 GiB, compresses well. changed: the
#            server started again with default settings, an UPDATE of a
#            contiguous 5% of pgbench_accounts rows, CHECKPOINT, stopped.
#   random   1 GiB of random bytes in 100 files of 10 MiB (incompressible).
#            changed: every 20th file rewritten with new random bytes.
#   source   a copy of /usr/local/go/src (many small files).
#            changed: every 20th file gets one appended line.
#
# Usage: bench/data.sh [WORKDIR]     (default $BENCH_WORK or /tmp/dualkey-bench)
# BENCH_SCALE=small makes a quick version: pgbench scale 5, 50 MiB random in
# 50 files, and only src/net and src/crypto of the Go tree.
# A set already prepared (a .done marker beside it) is left alone; delete
# WORKDIR/base and WORKDIR/changed to start over. Needs root (to run the
# PostgreSQL server as user postgres) and `scripts/setup.sh bench`.
set -euo pipefail

WORK=${1:-${BENCH_WORK:-/tmp/dualkey-bench}}
SCALE=${BENCH_SCALE:-full}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGUSER_OS=${BENCH_PG_OSUSER:-postgres}
GOSRC=${BENCH_GOSRC:-$(go env GOROOT 2>/dev/null || echo /usr/local/go)/src}

case $SCALE in
full)
	pg_scale=100
	random_files=100 random_file_mib=10
	source_dirs=(.)
	;;
small)
	pg_scale=5
	random_files=50 random_file_mib=1
	source_dirs=(net crypto)
	;;
*)
	echo "data.sh: BENCH_SCALE must be full or small, not $SCALE" >&2
	exit 2
	;;
esac

say() { echo "data: $*"; }
die() {
	echo "data: error: $*" >&2
	exit 1
}
done_marker() { echo "$WORK/$1/$2.done"; }

((EUID == 0)) || die "run as root (the PostgreSQL server runs as user $PGUSER_OS via runuser)"
[[ -x $PGBIN/initdb && -x $PGBIN/pgbench ]] || die "PostgreSQL 15 not found in $PGBIN; run scripts/setup.sh bench"
id "$PGUSER_OS" >/dev/null 2>&1 || die "no OS user $PGUSER_OS (the postgresql-15 package creates it)"
command -v rsync >/dev/null || die "rsync missing; run scripts/setup.sh bench"

mkdir -p "$WORK/base" "$WORK/changed"
# The server's user must be able to walk into the work dir.
chmod 755 "$WORK" "$WORK/base" "$WORK/changed"

if [[ -f $WORK/scale && $(cat "$WORK/scale") != "$SCALE" ]]; then
	die "$WORK holds data sets for BENCH_SCALE=$(cat "$WORK/scale"); remove it or choose another work dir"
fi
echo "$SCALE" >"$WORK/scale"

# --- PostgreSQL helpers ----------------------------------------------------------
PG_DATA_RUNNING=
pg_as() { runuser -u "$PGUSER_OS" -- "$@"; }

free_port() {
	local p
	for p in $(seq 54320 54420); do
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	die "no free port in 54320-54420"
}

pg_start() { # DATADIR [SERVER OPTIONS]
	local dir=$1 opts=${2:-}
	PG_PORT=$(free_port)
	PG_SOCK=$(mktemp -d /tmp/dualkey-bench-sock.XXXXXX)
	chown "$PGUSER_OS" "$PG_SOCK"
	install -d -o "$PGUSER_OS" -m 755 "$WORK/logs"
	pg_as "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/logs/postgres-$(basename "$(dirname "$dir")").log" -w -t 120 start \
		-o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_SOCK $opts" >/dev/null
	PG_DATA_RUNNING=$dir
	say "server on 127.0.0.1:$PG_PORT for $dir"
}

pg_stop() {
	[[ -n $PG_DATA_RUNNING ]] || return 0
	pg_as "$PGBIN/pg_ctl" -D "$PG_DATA_RUNNING" -m fast -w -t 300 stop >/dev/null
	say "server for $PG_DATA_RUNNING stopped cleanly"
	PG_DATA_RUNNING=
	rm -rf "$PG_SOCK"
}

psql_do() { pg_as "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -d bench -c "$1"; }

cleanup() {
	local rc=$?
	if [[ -n $PG_DATA_RUNNING ]]; then
		pg_as "$PGBIN/pg_ctl" -D "$PG_DATA_RUNNING" -m immediate -w stop >/dev/null 2>&1 || true
		echo "data: stopped leftover server for $PG_DATA_RUNNING" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- pgbench ---------------------------------------------------------------------------
prepare_pgbench() {
	local base=$WORK/base/pgbench changed=$WORK/changed/pgbench
	if [[ ! -f $(done_marker base pgbench) ]]; then
		rm -rf "$base"
		install -d -o "$PGUSER_OS" -m 700 "$base"
		# Checksums on, as a careful operator would run it; they change nothing in size.
		pg_as "$PGBIN/initdb" -D "$base" -U postgres -A trust --data-checksums -E UTF8 --locale=C.UTF-8 >/dev/null
		# wal_level=minimal lets pgbench -i skip WAL for its COPY, so the data
		# dir is the ~1.5 GiB of tables and indexes rather than that plus as much
		# again of recycled WAL segments. The change below runs with defaults.
		pg_start "$base" "-c wal_level=minimal -c max_wal_senders=0"
		pg_as "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres bench
		local t0=$SECONDS
		pg_as "$PGBIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -q -s "$pg_scale" bench 2>&1 | tail -n 1
		psql_do "CHECKPOINT"
		pg_stop
		touch "$(done_marker base pgbench)"
		say "pgbench base ready: scale $pg_scale in $((SECONDS - t0))s, $(du -sh "$base" | cut -f1)"
	fi
	if [[ ! -f $(done_marker changed pgbench) ]]; then
		rm -rf "$changed"
		cp -a "$base" "$changed"
		pg_start "$changed"
		# A contiguous 5% of the accounts: about 5% of the heap rewritten in place
		# (old versions marked dead) plus new versions and index entries appended.
		local rows=$((pg_scale * 100000)) n
		n=$((rows / 20))
		psql_do "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= $n"
		psql_do "CHECKPOINT"
		pg_stop
		touch "$(done_marker changed pgbench)"
		say "pgbench changed ready: UPDATE of $n of $rows accounts, $(du -sh "$changed" | cut -f1)"
	fi
}

# --- random -----------------------------------------------------------------------------------
prepare_random() {
	local base=$WORK/base/random changed=$WORK/changed/random i
	if [[ ! -f $(done_marker base random) ]]; then
		rm -rf "$base"
		mkdir -p "$base"
		for ((i = 0; i < random_files; i++)); do
			head -c $((random_file_mib << 20)) /dev/urandom >"$(printf '%s/r%03d.bin' "$base" "$i")"
		done
		touch "$(done_marker base random)"
		say "random base ready: $random_files files of $random_file_mib MiB"
	fi
	if [[ ! -f $(done_marker changed random) ]]; then
		rm -rf "$changed"
		cp -a "$base" "$changed"
		local n=0
		for ((i = 0; i < random_files; i += 20)); do
			head -c $((random_file_mib << 20)) /dev/urandom >"$(printf '%s/r%03d.bin' "$changed" "$i")"
			n=$((n + 1))
		done
		touch "$(done_marker changed random)"
		say "random changed ready: $n of $random_files files rewritten"
	fi
}

# --- source -------------------------------------------------------------------------------------
prepare_source() {
	local base=$WORK/base/source changed=$WORK/changed/source d
	if [[ ! -f $(done_marker base source) ]]; then
		rm -rf "$base"
		mkdir -p "$base"
		for d in "${source_dirs[@]}"; do
			mkdir -p "$base/$d"
			cp -a "$GOSRC/$d/." "$base/$d/"
		done
		touch "$(done_marker base source)"
		say "source base ready: $(find "$base" -type f | wc -l) files, $(du -sh "$base" | cut -f1) from $GOSRC"
	fi
	if [[ ! -f $(done_marker changed source) ]]; then
		rm -rf "$changed"
		cp -a "$base" "$changed"
		local n=0 f
		while IFS= read -r -d '' f; do
			printf '\n// changed by dualkey bench/data.sh\n' >>"$f"
			n=$((n + 1))
		done < <(cd "$changed" && find . -type f -print0 | sort -z | awk 'BEGIN{RS=ORS="\0"} NR % 20 == 1' |
			sed -z "s|^\.|$changed|")
		touch "$(done_marker changed source)"
		say "source changed ready: $n files got one more line"
	fi
}

sets=${BENCH_SETS:-pgbench random source}
for s in $sets; do
	case $s in
	pgbench) prepare_pgbench ;;
	random) prepare_random ;;
	source) prepare_source ;;
	*) die "unknown data set $s (pgbench, random, source)" ;;
	esac
done
sync
say "data sets in $WORK (scale $SCALE): $(for s in $sets; do printf '%s=%s ' "$s" "$(du -sh "$WORK/base/$s" | cut -f1)"; done)"
