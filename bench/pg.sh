#!/usr/bin/env bash
# pg.sh measures PostgreSQL protection: dualkey (agent + pg basebackup + pg
# restore) against pgBackRest and pg_basebackup (+ pg_receivewal), in one run
# on the same server and the same WAL.
#
# For each data set:
#   pgbench  `pgbench -i -s $BENCH_PG_SCALE` (scale 100: ~1.5 GiB, compresses ~15x);
#            workload: `pgbench -c 8 -j 2 -T 60` (TPC-B like)
#   random   a table of random bytea (scale 100: 1M rows of 1 KiB, ~1.1 GiB,
#            incompressible); workload: a pgbench script rewriting random rows
#            with new random bytes and logging each in bench_log
# the steps are:
#   1. seed data dir (cached in WORK/pg/seed; loaded with wal_level=minimal),
#      copied to a live dir, started on a free loopback port as user postgres
#      with archive_command = pgbackrest archive-push (async)          untimed
#   2. dualkey vault init, `dualkey pg agent` and pg_receivewal started: all
#      three WAL consumers run from here to the end, on the same server
#   3. full backup: dualkey pg basebackup --pgdata (the data directory read
#      directly, as pgBackRest does), pgbackrest --type=full,
#      pg_basebackup -Ft (server zstd)                                    timed
#      and, for comparison, dualkey pg basebackup through BASE_BACKUP into a
#      fresh vault of its own (reported in a table of its own)          timed
#   4. pgbench -T 60 at full speed; the dualkey agent's lag is sampled every
#      150 ms (pg_current_wal_lsn() - pg_stat_replication.flush_lsn of
#      application_name 'dualkey')
#   5. T := now; one marker row committed after T; pg_switch_wal(); wait
#      until every consumer holds that WAL                              untimed
#   6. second backup: dualkey pg basebackup --pgdata, pgbackrest --type=incr,
#      pg_basebackup (a full one again)                                   timed
#   7. restore to T from each tool into an empty dir and start it on a free
#      port; timed until the server has left recovery and answers (WAL replay
#      included; T lies before the 2nd backups, so all pick the full one and
#      replay the whole pgbench run); the restored rows are checked
#   8. repository sizes (sum of file sizes, WAL included)
# and for pgbench only:
#   9. a dedicated lag run: archive_command off, pg_receivewal stopped, only
#      the dualkey agent streaming, pgbench -T $BENCH_PG_LAG_SECONDS
#
# Usage: bench/pg.sh [WORKDIR]   (default $BENCH_WORK or /tmp/dualkey-bench)
# Environment: BENCH_PG_SCALE (default 100), BENCH_PG_SETS ("pgbench random"),
# BENCH_PG_SECONDS (60), BENCH_PG_LAG_SECONDS (30), BENCH_PG_CLIENTS (8),
# BENCH_PGBR_COMPRESS (zst or lz4; default zst, see below), DUALKEY_BIN
# (default bin/dualkey), BENCH_RESULTS (markdown appended; default
# bench/results/<date>.md), BENCH_KEEP_REPOS=1 keeps repositories.
# Needs root (servers run as user postgres; page cache dropped before every
# timed step) and `scripts/setup.sh bench`. Never touches port 5432.
#
# Settings:
#   pgBackRest 2.45 (Debian): process-max=2 (the cores), compress-type=zst
#     (level 3), archive-async=y with a spool dir (archive-push and archive-get
#     in parallel, archive-get prefetches), start-fast=y, repo1-bundle=y,
#     repo1-cipher-type=aes-256-cbc (the vault is encrypted too). zst rather
#     than lz4: measured both at scale 100 (BENCH_PGBR_COMPRESS=lz4), zst was
#     as fast on pgbench data (backup 4.6-4.9 s against 5.0 s, restore 15.3-15.7 s
#     against 15.8 s) with less than half the repository (314 against 707 MiB);
#     on incompressible data lz4 backs up faster (8.4 s against 11.7 s) and the
#     sizes are equal. Both runs are in docs/benchmarks.md.
#   pg_basebackup 15: -Ft --compress=server-zstd:level=3,workers=2 -X stream
#     --checkpoint=fast, and pg_receivewal --compress=lz4 for the WAL that a
#     point-in-time restore needs (its restore_command decompresses with lz4).
#   dualkey: defaults; the agent with its defaults (--flush-every 200ms).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-${BENCH_WORK:-/tmp/dualkey-bench}}
SCALE=${BENCH_PG_SCALE:-100}
SETS=${BENCH_PG_SETS:-pgbench random}
RUN_SECONDS=${BENCH_PG_SECONDS:-60}
LAG_SECONDS=${BENCH_PG_LAG_SECONDS:-30}
CLIENTS=${BENCH_PG_CLIENTS:-8}
PGBR_COMPRESS=${BENCH_PGBR_COMPRESS:-zst}
DUALKEY_SRC=${DUALKEY_BIN:-$ROOT/bin/dualkey}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results/$(date +%Y-%m-%d).md}
PGBIN=/usr/lib/postgresql/15/bin
PGBACKREST=/usr/bin/pgbackrest
OSUSER=postgres
TIME=/usr/bin/time
PGW=$WORK/pg

NAME=pg-bench
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

((EUID == 0)) || die "run as root (servers run as user $OSUSER; caches are dropped)"
[[ -x $PGBIN/initdb && -x $PGBIN/pgbench && -x $PGBIN/pg_receivewal ]] || die "PostgreSQL 15 missing; run scripts/setup.sh bench"
[[ -x $PGBACKREST ]] || die "pgbackrest missing; run scripts/setup.sh bench"
[[ -x $TIME ]] || die "/usr/bin/time missing; run scripts/setup.sh bench"
[[ -x $DUALKEY_SRC ]] || die "dualkey binary $DUALKEY_SRC missing; make build (or DUALKEY_BIN=...)"
command -v lz4 >/dev/null && command -v zstd >/dev/null || die "lz4 and zstd needed (Debian: lz4, zstd)"
case $PGBR_COMPRESS in lz4 | zst) ;; *) die "BENCH_PGBR_COMPRESS must be lz4 or zst" ;; esac

if sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
	CACHE_NOTE="page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed step"
	drop_caches() { sync && echo 3 >/proc/sys/vm/drop_caches; }
else
	CACHE_NOTE="page cache NOT dropped (/proc/sys/vm/drop_caches read-only): timed steps read warm data"
	drop_caches() { sync; }
fi

SOCK=$PGW/sock # unix sockets of every server here (short path, owned by postgres)

pg_start() { # DATADIR PORT LOG [extra postgres options]
	as_pg "$PGBIN/pg_ctl" -D "$1" -l "$3" -w -t 600 start \
		-o "-c listen_addresses=127.0.0.1 -p $2 -k $SOCK ${4:-}" >/dev/null
	RUNNING_PG+=("$1")
}
pg_stop() { # DATADIR
	as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 600 stop >/dev/null
}
psql_at() { # PORT DB SQL: one value per line, unaligned
	as_pg "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d "$2" -c "$3"
}

# Sum of file sizes. %.0f, not %d: mawk's %d stops at 2^31-1.
bytes() { [[ -e $1 ]] && find "$@" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }' || echo 0; }
# The database's size: the data dir without pg_wal.
db_bytes() { find "$1" -path "$1/pg_wal" -prune -o -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# timed NAME CMD... runs CMD under time -v after dropping caches; output to
# $RUN/NAME.log; sets WALL (s), CPU (%), RSS (MiB).
timed() {
	local name=$1
	shift
	drop_caches
	if ! "$TIME" -v -o "$RUN/$name.time" "$@" >"$RUN/$name.log" 2>&1; then
		tail -n 30 "$RUN/$name.log" >&2
		die "$name failed: $*"
	fi
	WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {
		n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$RUN/$name.time")
	CPU=$(awk -F': ' '/Percent of CPU/ { sub("%", "", $2); print $2 }' "$RUN/$name.time")
	RSS=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$RUN/$name.time")
}

COMMANDS=()
note() { # LABEL CMD...: record the exact command with this run's paths replaced
	local line="${*:2}"
	line=${line//$PGW\/bin\/dualkey/dualkey}
	line=${line//$SD/SETDIR}
	line=${line//$PGW/PGW}
	line=${line//127.0.0.1:$PORT/127.0.0.1:PORT}
	line=${line//-p $PORT /-p PORT }
	[[ -z ${RPORT:-} ]] || line=${line//--port $RPORT/--port RPORT}
	[[ -z ${T_ISO:-} ]] || line=${line//$T_ISO/T}
	[[ -z ${T_PG:-} ]] || line=${line//$T_PG/T}
	COMMANDS+=("$1: $line")
}

agent_streaming() { # PORT
	[[ $(psql_at "$1" postgres "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'dualkey' AND state = 'streaming'") == 1 ]]
}
agent_holds() { # PORT LSN: the agent reported LSN flushed (durable in the vault)
	[[ $(psql_at "$1" postgres "SELECT flush_lsn >= '$2' FROM pg_stat_replication WHERE application_name = 'dualkey'") == t ]]
}
archived() { # PORT SEGMENT: archive_command succeeded up to SEGMENT
	[[ $(psql_at "$1" postgres "SELECT coalesce(last_archived_wal, '') >= '$2' FROM pg_stat_archiver") == t ]]
}
promoted() { # PORT: the server answers and has left recovery
	[[ $(psql_at "$1" postgres "SELECT pg_is_in_recovery()") == f ]]
}

# --- data sets ----------------------------------------------------------------------------------------
# seed SET: a stopped data directory in $PGW/seed/SET-sSCALE, made once.
seed() {
	local set=$1 dir=$PGW/seed/$1-s$SCALE port
	if [[ -f $dir.done ]]; then
		SEED=$dir
		return
	fi
	rm -rf "$dir"
	install -d -o "$OSUSER" -m 700 "$dir"
	as_pg "$PGBIN/initdb" -D "$dir" -U postgres -A trust --data-checksums -E UTF8 --locale=C.UTF-8 >/dev/null
	cat >>"$dir/pg_hba.conf" <<-EOF
		host replication all 127.0.0.1/32 trust
	EOF
	free_port port
	pg_start "$dir" "$port" "$PGW/logs/seed-$set.log" "-c wal_level=minimal -c max_wal_senders=0"
	as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$port" -U postgres bench
	local t0=$SECONDS rows
	case $set in
	pgbench)
		as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -q -s "$SCALE" bench 2>&1 | tail -n 1 >&2
		;;
	random)
		rows=$((SCALE * 10000)) # scale 100: 1M rows of 1 KiB random bytes, ~1.1 GiB
		psql_at "$port" bench "CREATE EXTENSION pgcrypto;
			CREATE TABLE blobs (id int PRIMARY KEY, data bytea NOT NULL);
			ALTER TABLE blobs ALTER data SET STORAGE EXTERNAL;
			INSERT INTO blobs SELECT i, gen_random_bytes(1024) FROM generate_series(1, $rows) i;
			CREATE TABLE bench_log (n bigserial PRIMARY KEY, id int NOT NULL, at timestamptz DEFAULT clock_timestamp());" >/dev/null
		psql_at "$port" bench "VACUUM ANALYZE blobs" >/dev/null
		;;
	esac
	psql_at "$port" bench "CREATE TABLE bench_marker (at timestamptz DEFAULT clock_timestamp()); CHECKPOINT;" >/dev/null
	pg_stop "$dir"
	touch "$dir.done"
	say "seed $set ready: scale $SCALE in $((SECONDS - t0))s, $(du -sh "$dir" | cut -f1)"
	SEED=$dir
}

# workload SET PORT SECONDS LOGNAME: pgbench at full speed
workload() {
	local set=$1 port=$2 sec=$3 log=$4
	WORKLOAD_CMD=("$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -c "$CLIENTS" -j 2 -T "$sec" -P 10)
	case $set in
	pgbench) WORKLOAD_CMD+=(bench) ;;
	random)
		cat >"$SD/random-update.sql" <<-'EOF'
			\set id random(1, :rows)
			UPDATE blobs SET data = gen_random_bytes(1024) WHERE id = :id;
			INSERT INTO bench_log (id) VALUES (:id);
		EOF
		chmod 644 "$SD/random-update.sql"
		WORKLOAD_CMD+=(-n -D "rows=$((SCALE * 10000))" -f "$SD/random-update.sql" bench)
		;;
	esac
	as_pg "${WORKLOAD_CMD[@]}" >"$RUN/$log.log" 2>&1 || {
		tail "$RUN/$log.log" >&2
		die "pgbench failed"
	}
	TPS=$(awk '/^tps = / { printf "%.0f", $3 }' "$RUN/$log.log")
}

# check_query SET: a value that must be equal on the restored server and at T
check_query() {
	case $1 in
	pgbench) echo "SELECT count(*) || '/' || (SELECT sum(abalance) FROM pgbench_accounts) FROM pgbench_history" ;;
	random) echo "SELECT count(*) || '/' || coalesce(max(n), 0) FROM bench_log" ;;
	esac
}

# --- lag sampler -------------------------------------------------------------------------------------
# sampler_start PORT FILE: every 150 ms, "epoch current_lsn_bytes flush_lsn_bytes flush_lag_s"
sampler_start() {
	printf '%s\n' "SELECT extract(epoch FROM clock_timestamp()), pg_current_wal_lsn() - '0/0',
		(SELECT flush_lsn - '0/0' FROM pg_stat_replication WHERE application_name = 'dualkey'),
		(SELECT extract(epoch FROM flush_lag) FROM pg_stat_replication WHERE application_name = 'dualkey')" \
		'\watch 0.15' >"$PGW/lag.sql"
	chmod 644 "$PGW/lag.sql"
	"${AS_PG[@]}" "$PGBIN/psql" -X -q -At -F ' ' -h 127.0.0.1 -p "$1" -U postgres -d postgres -f "$PGW/lag.sql" >"$2" 2>/dev/null &
	SAMPLER=$!
	BG_PIDS+=("$SAMPLER")
}
# lag_stats FILE T0 T1: samples within [T0, T1] -> LAGSTAT "median/p95/max bytes, seconds at the WAL rate, flush_lag"
lag_stats() {
	local f=$1 t0=$2 t1=$3
	awk -v t0="$t0" -v t1="$t1" '$1 >= t0 && $1 <= t1 && $3 != "" { print }' "$f" >"$f.in"
	local n first last rate
	n=$(wc -l <"$f.in")
	if ((n < 2)); then
		LAGSTAT="no samples (agent not connected?)"
		LAG_ROW="| n/a | | | | |"
		return
	fi
	first=$(head -n 1 "$f.in")
	last=$(tail -n 1 "$f.in")
	rate=$(awk -v a="$first" -v b="$last" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.0f", (y[2] - x[2]) / (y[1] - x[1]) }')
	pct() { # COLUMN-EXPR: median p95 max
		awk "{ v = $1; if (v < 0) v = 0; print v }" "$f.in" | sort -g | awk '{ a[NR] = $1 } END {
			m = a[int((NR + 1) / 2)]; p = a[int(NR * 0.95 + 0.999)]; if (p == "") p = a[NR]; printf "%s %s %s\n", m, p, a[NR] }'
	}
	read -r bm bp bx < <(pct '$2 - $3')
	read -r fm fp fx < <(pct '($4 == "" ? 0 : $4)')
	LAG_RATE=$rate
	LAG_ROW=$(awk -v n="$n" -v r="$rate" -v bm="$bm" -v bp="$bp" -v bx="$bx" -v fm="$fm" -v fp="$fp" -v fx="$fx" 'BEGIN {
		printf "| %d | %.1f | %.0f / %.0f / %.0f KiB | %.3f / %.3f / %.3f s | %.3f / %.3f / %.3f s |",
			n, r / 1048576, bm / 1024, bp / 1024, bx / 1024, bm / r, bp / r, bx / r, fm, fp, fx }')
	LAGSTAT="$n samples, WAL $(mib "$rate") MiB/s, lag median/p95/max $bm/$bp/$bx bytes"
}

# --- one data set -------------------------------------------------------------------------------------
ROWS=()
LAG_ROWS=()
STREAM_ROWS=()
run_set() {
	local set=$1
	SD=$PGW/$set
	RUN=$SD/run
	local data=$SD/data vault=$SD/vault brrepo=$SD/pgbackrest bbdir=$SD/basebackup
	local conf=$SD/pgbackrest.conf
	say "== $set (scale $SCALE)"
	seed "$set"
	rm -rf "$SD"
	install -d -o "$OSUSER" -m 755 "$SD" "$RUN" "$bbdir" "$bbdir/wal" "$SD/spool" "$SD/pgbr-log"
	cp -a "$SEED" "$data"

	local port
	free_port port
	PORT=$port
	# pgBackRest: its config, then the server archiving into it.
	cat >"$conf" <<-EOF
		[global]
		repo1-path=$brrepo
		repo1-retention-full=2
		repo1-cipher-type=aes-256-cbc
		repo1-cipher-pass=$(cat "$PASSFILE")
		repo1-bundle=y
		process-max=2
		compress-type=$PGBR_COMPRESS
		start-fast=y
		archive-async=y
		spool-path=$SD/spool
		log-path=$SD/pgbr-log
		lock-path=$SD/spool/lock
		log-level-console=warn
		log-level-file=info

		[bench]
		pg1-path=$data
		pg1-port=$port
		pg1-socket-path=$SOCK
		pg1-user=postgres
	EOF
	chown "$OSUSER" "$conf"
	chmod 600 "$conf"
	local BR=("$PGBACKREST" "--config=$conf" --stanza=bench)
	cat >>"$data/postgresql.conf" <<-EOF

		# bench/pg.sh
		wal_level = replica
		max_wal_senders = 10
		max_replication_slots = 10
		archive_mode = on
		archive_command = '$PGBACKREST --config=$conf --stanza=bench archive-push %p'
	EOF
	pg_start "$data" "$port" "$SD/postgres.log"
	as_pg "${BR[@]}" stanza-create >"$RUN/stanza-create.log" 2>&1 || {
		cat "$RUN/stanza-create.log" >&2
		die "pgbackrest stanza-create failed"
	}
	note "pgbackrest setup" "${BR[@]}" stanza-create
	note "pgbackrest setup" "archive_command = '$PGBACKREST --config=$conf --stanza=bench archive-push %p'"

	# dualkey: a vault, the agent streaming from now on.
	local DK=("$PGW/bin/dualkey" --repo "$vault")
	as_pg env DUALKEY_PASSWORD_FILE="$PASSFILE" "${DK[@]}" vault init >"$RUN/vault-init.log" 2>&1 || {
		cat "$RUN/vault-init.log" >&2
		die "dualkey vault init failed"
	}
	note "dualkey setup" "${DK[@]}" vault init
	local pgurl="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
	# The tripwire is on, as in production: it keeps incidents in a state store.
	"${AS_PG[@]}" env DUALKEY_PASSWORD_FILE="$PASSFILE" "${DK[@]}" pg agent --pg "$pgurl" --state "$SD/state.db" >"$RUN/agent.log" 2>&1 &
	local agent=$!
	BG_PIDS+=("$agent")
	note "dualkey agent (running throughout)" "${DK[@]}" pg agent --pg "postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable" --state "$SD/state.db"
	wait_until "the dualkey agent to stream" 60 "agent_streaming $port"
	kill -0 "$agent" 2>/dev/null || {
		cat "$RUN/agent.log" >&2
		die "dualkey agent exited"
	}

	# pg_receivewal: pg_basebackup's companion for point-in-time restore.
	as_pg "$PGBIN/pg_receivewal" -h 127.0.0.1 -p "$port" -U postgres --slot=receivewal --create-slot >/dev/null 2>&1
	local RW=("$PGBIN/pg_receivewal" -h 127.0.0.1 -p "$port" -U postgres -D "$bbdir/wal" --slot=receivewal --compress=lz4 --synchronous)
	"${AS_PG[@]}" "${RW[@]}" >"$RUN/receivewal.log" 2>&1 &
	local recv=$!
	BG_PIDS+=("$recv")
	note "pg_receivewal (running throughout)" "${RW[@]}"

	# ---- full backups
	local r
	declare -A full full_cpu second second_cpu added restore restore_split check wal_added size
	# The agent runs on the database host, as pgBackRest does (pg1-path):
	# base backups read the data directory (--pgdata).
	timed dualkey-full "${AS_PG[@]}" env DUALKEY_PASSWORD_FILE="$PASSFILE" "${DK[@]}" pg basebackup --pg "$pgurl" --pgdata "$data"
	full[dualkey]=$WALL full_cpu[dualkey]=$CPU
	note "dualkey full and 2nd" "${DK[@]}" pg basebackup --pg "postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable" --pgdata SETDIR/data
	# For comparison: the same full backup streamed through BASE_BACKUP (the
	# agent on another host), into a fresh vault of its own.
	local svault=$SD/vault-stream
	as_pg env DUALKEY_PASSWORD_FILE="$PASSFILE" "$PGW/bin/dualkey" --repo "$svault" vault init >"$RUN/vault-stream-init.log" 2>&1 || die "dualkey vault init ($svault) failed"
	timed dualkey-full-stream "${AS_PG[@]}" env DUALKEY_PASSWORD_FILE="$PASSFILE" "$PGW/bin/dualkey" --repo "$svault" pg basebackup --pg "$pgurl"
	STREAM_ROWS+=("| $set | $WALL s ($CPU%) | ${full[dualkey]} s (${full_cpu[dualkey]}%) |")
	note "dualkey full through BASE_BACKUP (fresh vault)" "$PGW/bin/dualkey" --repo SETDIR/vault-stream pg basebackup --pg "postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable"
	rm -rf "$svault"
	timed pgbackrest-full "${AS_PG[@]}" "${BR[@]}" --type=full backup
	full[pgbackrest]=$WALL full_cpu[pgbackrest]=$CPU
	note "pgbackrest full" "${BR[@]}" --type=full backup
	local BB=("$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -Ft --compress=server-zstd:level=3,workers=2 -X stream --checkpoint=fast)
	timed pg_basebackup-full "${AS_PG[@]}" "${BB[@]}" -D "$bbdir/b1"
	full[pg_basebackup]=$WALL full_cpu[pg_basebackup]=$CPU
	note "pg_basebackup full (2nd: -D SETDIR/basebackup/b2)" "${BB[@]}" -D "$bbdir/b1"
	say "$set: full backups: dualkey ${full[dualkey]}s, pgbackrest ${full[pgbackrest]}s, pg_basebackup ${full[pg_basebackup]}s"
	local s_dk0 s_br0 s_bb0
	s_dk0=$(bytes "$vault") s_br0=$(bytes "$brrepo") s_bb0=$(bytes "$bbdir")

	# ---- pgbench at full speed, the agent's lag sampled
	sampler_start "$port" "$RUN/lag-main.txt"
	local w0 w1 lsn0 lsn1
	lsn0=$(psql_at "$port" postgres "SELECT pg_current_wal_lsn() - '0/0'")
	w0=$(now)
	workload "$set" "$port" "$RUN_SECONDS" pgbench-main
	note "workload" "${WORKLOAD_CMD[@]}"
	w1=$(now)
	lsn1=$(psql_at "$port" postgres "SELECT pg_current_wal_lsn() - '0/0'")
	sleep 1
	bg_stop "$SAMPLER" TERM
	lag_stats "$RUN/lag-main.txt" "$w0" "$w1"
	LAG_ROWS+=("| $set, during the ${RUN_SECONDS} s run (pgBackRest archiving and pg_receivewal too) | $TPS $LAG_ROW")
	say "$set: pgbench $TPS tps, $(mib $((lsn1 - lsn0))) MiB WAL; agent lag: $LAGSTAT"

	# ---- the point in time, a commit after it, and every consumer caught up
	local expect t_pg t_iso switch seg
	expect=$(psql_at "$port" bench "$(check_query "$set")")
	sleep 0.5
	t_pg=$(psql_at "$port" postgres "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
	t_iso="${t_pg% *}T${t_pg#* }"
	t_iso="${t_iso%+00}Z"
	T_ISO=$t_iso T_PG=$t_pg
	sleep 0.5
	psql_at "$port" bench "INSERT INTO bench_marker DEFAULT VALUES" >/dev/null
	switch=$(psql_at "$port" postgres "SELECT pg_switch_wal()")
	seg=$(psql_at "$port" postgres "SELECT pg_walfile_name('$switch')")
	wait_until "pgBackRest to archive $seg" 600 "archived $port $seg"
	wait_until "pg_receivewal to hold $seg" 600 '[[ -f $bbdir/wal/$seg.lz4 ]]'
	wait_until "the dualkey agent to hold $switch" 600 "agent_holds $port $switch"
	say "$set: T = $t_pg; at T: $expect; WAL switched at $switch ($seg), held by all three"
	local s_dk1 s_br1 s_bb1
	s_dk1=$(bytes "$vault") s_br1=$(bytes "$brrepo") s_bb1=$(bytes "$bbdir")
	wal_added[dualkey]=$((s_dk1 - s_dk0)) wal_added[pgbackrest]=$((s_br1 - s_br0)) wal_added[pg_basebackup]=$((s_bb1 - s_bb0))

	# ---- second backups
	timed dualkey-second "${AS_PG[@]}" env DUALKEY_PASSWORD_FILE="$PASSFILE" "${DK[@]}" pg basebackup --pg "$pgurl" --pgdata "$data"
	second[dualkey]=$WALL second_cpu[dualkey]=$CPU
	timed pgbackrest-second "${AS_PG[@]}" "${BR[@]}" --type=incr backup
	second[pgbackrest]=$WALL second_cpu[pgbackrest]=$CPU
	note "pgbackrest 2nd" "${BR[@]}" --type=incr backup
	timed pg_basebackup-second "${AS_PG[@]}" "${BB[@]}" -D "$bbdir/b2"
	second[pg_basebackup]=$WALL second_cpu[pg_basebackup]=$CPU
	local s_dk2 s_br2 s_bb2
	s_dk2=$(bytes "$vault") s_br2=$(bytes "$brrepo") s_bb2=$(bytes "$bbdir")
	added[dualkey]=$((s_dk2 - s_dk1)) added[pgbackrest]=$((s_br2 - s_br1)) added[pg_basebackup]=$((s_bb2 - s_bb1))
	say "$set: second backups: dualkey ${second[dualkey]}s (+$(mib "${added[dualkey]}") MiB), pgbackrest ${second[pgbackrest]}s (+$(mib "${added[pgbackrest]}") MiB), pg_basebackup ${second[pg_basebackup]}s (+$(mib "${added[pg_basebackup]}") MiB)"
	size[dualkey]=$s_dk2 size[pgbackrest]=$s_br2 size[pg_basebackup]=$s_bb2
	as_pg env DUALKEY_PASSWORD_FILE="$PASSFILE" "${DK[@]}" pg backups >"$RUN/dualkey-backups.txt" 2>&1 || true
	as_pg "${BR[@]}" info >"$RUN/pgbackrest-info.txt" 2>&1 || true

	# ---- restores to T, one at a time, each on its own port
	local tool target rport t0 t1 got log
	for tool in dualkey pgbackrest pg_basebackup; do
		target=$SD/restore-$tool
		free_port rport
		RPORT=$rport
		log=$SD/restore-$tool.log
		rm -rf "$target" "$log"
		install -d -o "$OSUSER" -m 700 "$target"
		drop_caches
		case $tool in
		dualkey)
			local DR=("${DK[@]}" --json pg restore --target "$target" --time "$t_iso" --start --port "$rport"
				--set "unix_socket_directories=$SOCK" --set listen_addresses=127.0.0.1 --set archive_mode=off --log-file "$log")
			t0=$(now)
			as_pg env DUALKEY_PASSWORD_FILE="$PASSFILE" "${DR[@]}" >"$RUN/dualkey-restore.json" 2>"$RUN/dualkey-restore.log" || {
				tail -n 30 "$RUN/dualkey-restore.log" "$RUN/dualkey-restore.json" >&2
				tail -n 30 "$log" >&2 || true
				die "dualkey pg restore failed"
			}
			RUNNING_PG+=("$target")
			t1=$(now)
			# Its own split: files restored, then replay until promoted.
			restore_split[dualkey]=$(awk -F'[:,]' '/"restore_seconds"/ { r = $2 } /"replay_seconds"/ { p = $2 } END { printf "%.1f + %.1f", r, p }' "$RUN/dualkey-restore.json")
			note "dualkey restore to T (one command: files, then start and wait until recovered)" "${DR[@]}"
			;;
		pgbackrest)
			local RR=("${BR[@]}" "--pg1-path=$target" --type=time "--target=$t_pg" --target-action=promote restore)
			t0=$(now)
			as_pg "${RR[@]}" >"$RUN/pgbackrest-restore.log" 2>&1 || {
				cat "$RUN/pgbackrest-restore.log" >&2
				die "pgbackrest restore failed"
			}
			local tm
			tm=$(now)
			pg_start "$target" "$rport" "$log" "-c archive_mode=off" || {
				tail -n 30 "$log" >&2
				die "restored server (pgbackrest) did not start"
			}
			wait_until "the pgbackrest-restored server to leave recovery" 3600 "promoted $rport"
			t1=$(now)
			restore_split[pgbackrest]="$(secs "$t0" "$tm" | awk '{ printf "%.1f", $1 }') + $(secs "$tm" "$t1" | awk '{ printf "%.1f", $1 }')"
			note "pgbackrest restore to T" "${RR[@]}"
			note "pgbackrest restore to T, then" "pg_ctl -D TARGET start -o '-p PORT -c archive_mode=off'; poll SELECT pg_is_in_recovery() every 0.1 s until false"
			;;
		pg_basebackup)
			t0=$(now)
			zstd -dcq "$bbdir/b1/base.tar.zst" | tar -x -C "$target"
			tar -x -C "$target/pg_wal" -f "$bbdir/b1/pg_wal.tar"
			chown -R "$OSUSER:" "$target"
			touch "$target/recovery.signal"
			cat >>"$target/postgresql.auto.conf" <<-EOF
				restore_command = 'test -f $bbdir/wal/%f.lz4 && lz4 -dcq $bbdir/wal/%f.lz4 > %p'
				recovery_target_time = '$t_pg'
				recovery_target_action = 'promote'
			EOF
			local tm
			tm=$(now)
			pg_start "$target" "$rport" "$log" "-c archive_mode=off" || {
				tail -n 30 "$log" >&2
				die "restored server (pg_basebackup) did not start"
			}
			wait_until "the pg_basebackup-restored server to leave recovery" 3600 "promoted $rport"
			t1=$(now)
			restore_split[pg_basebackup]="$(secs "$t0" "$tm" | awk '{ printf "%.1f", $1 }') + $(secs "$tm" "$t1" | awk '{ printf "%.1f", $1 }')"
			note "pg_basebackup restore to T" "zstd -dc SETDIR/basebackup/b1/base.tar.zst | tar -x -C TARGET; tar -x -C TARGET/pg_wal -f SETDIR/basebackup/b1/pg_wal.tar; touch TARGET/recovery.signal; postgresql.auto.conf += restore_command 'test -f WAL/%f.lz4 && lz4 -dcq WAL/%f.lz4 > %p', recovery_target_time = T, recovery_target_action = promote; pg_ctl start, poll pg_is_in_recovery() until false"
			;;
		esac
		restore[$tool]=$(secs "$t0" "$t1")
		got=$(psql_at "$rport" bench "$(check_query "$set")")
		local marker
		marker=$(psql_at "$rport" bench "SELECT count(*) FROM bench_marker")
		if [[ $got == "$expect" && $marker == 0 ]]; then
			check[$tool]=ok
		else
			check[$tool]="WRONG: $got (want $expect), $marker marker rows (want 0)"
		fi
		pg_stop "$target"
		say "$set: $tool restore to T: ${restore[$tool]}s (${restore_split[$tool]:-}), check ${check[$tool]}"
		[[ ${BENCH_KEEP_REPOS:-} == 1 ]] || rm -rf "$target"
	done

	# ---- dedicated lag run: only the agent takes WAL
	if [[ $set == pgbench && $LAG_SECONDS -gt 0 ]]; then
		bg_stop "$recv" TERM
		psql_at "$port" postgres "ALTER SYSTEM SET archive_mode = off" >/dev/null
		pg_stop "$data"
		pg_start "$data" "$port" "$SD/postgres.log"
		wait_until "the dualkey agent to stream again" 120 "agent_streaming $port"
		sampler_start "$port" "$RUN/lag-alone.txt"
		w0=$(now)
		workload "$set" "$port" "$LAG_SECONDS" pgbench-lag
		w1=$(now)
		sleep 1
		bg_stop "$SAMPLER" TERM
		lag_stats "$RUN/lag-alone.txt" "$w0" "$w1"
		LAG_ROWS+=("| $set, ${LAG_SECONDS} s run, the agent the only WAL consumer | $TPS $LAG_ROW")
		say "$set: agent alone: pgbench $TPS tps; lag: $LAGSTAT"
	else
		bg_stop "$recv" TERM
	fi

	bg_stop "$agent"
	kill -0 "$agent" 2>/dev/null && die "agent did not stop"
	pg_stop "$data"
	size[dualkey]=$(bytes "$vault")

	local dsize
	dsize=$(db_bytes "$SEED")
	for tool in dualkey pgbackrest pg_basebackup; do
		ROWS+=("$(printf '| %s | %s | %s s (%s%%) | %s s (%s%%) | %s | %s | %s s (%s) | %s | %s |' \
			"$set ($(mib "$dsize") MiB)" "$tool" "${full[$tool]}" "${full_cpu[$tool]}" "${second[$tool]}" "${second_cpu[$tool]}" \
			"$(mib "${added[$tool]}")" "$(mib "${wal_added[$tool]}")" "${restore[$tool]}" "${restore_split[$tool]}" \
			"$(mib "${size[$tool]}")" "${check[$tool]}")")
	done
	if [[ ${BENCH_KEEP_REPOS:-} != 1 ]]; then
		rm -rf "$vault" "$brrepo" "$bbdir" "$data" "$SD/spool"
	fi
}

# --- main ----------------------------------------------------------------------------------------------------
mkdir -p "$WORK" "$(dirname "$RESULTS")"
chmod 755 "$WORK"
install -d -o "$OSUSER" -m 755 "$PGW" "$PGW/seed" "$PGW/logs" "$PGW/bin" "$SOCK"
# A copy of dualkey the postgres user may run (restore_command runs it too).
install -o root -m 755 "$DUALKEY_SRC" "$PGW/bin/dualkey"
PASSFILE=$PGW/password
[[ -s $PASSFILE ]] || (umask 077 && head -c 24 /dev/urandom | base64 >"$PASSFILE")
chown "$OSUSER" "$PASSFILE"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
for set in $SETS; do
	case $set in pgbench | random) run_set "$set" ;; *) die "unknown set $set (pgbench, random)" ;; esac
done

report() {
	echo "## PostgreSQL benchmark, $START (pgbench scale $SCALE)"
	echo
	echo "Machine: $(lscpu | awk -F': +' '/^Model name/ {print $2; exit}'), $(nproc) cores," \
		"$(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)," \
		"work dir $WORK on $(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || echo '?'). $CACHE_NOTE."
	echo
	echo "Load average (1, 5, 15 min) at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
	echo
	echo "Versions: $("$PGW/bin/dualkey" version | head -n 1); $("$PGBACKREST" version); $("$PGBIN/pg_basebackup" --version);" \
		"workload: pgbench -c $CLIENTS -j 2 -T $RUN_SECONDS; pgBackRest compress-type=$PGBR_COMPRESS, process-max=2."
	echo
	echo "| data | tool | full backup (CPU) | 2nd backup after pgbench -T $RUN_SECONDS (CPU) | 2nd adds MiB | WAL stored during the run MiB | restore to T until it answers (files + replay) | repo MiB (WAL included) | restored rows |"
	echo "|---|---|---|---|---|---|---|---|---|"
	printf '%s\n' "${ROWS[@]}"
	echo
	echo "dualkey's full backup above reads the data directory (--pgdata, the agent on the database host); streamed through BASE_BACKUP instead (the agent elsewhere), into a fresh vault, right after it:"
	echo
	echo "| data | dualkey full through BASE_BACKUP (CPU) | dualkey full with --pgdata (CPU) |"
	echo "|---|---|---|"
	printf '%s\n' "${STREAM_ROWS[@]}"
	echo
	echo "WAL streaming lag of the dualkey agent (pg_current_wal_lsn() - pg_stat_replication.flush_lsn, sampled every 150 ms; seconds = bytes / the run's WAL rate; flush_lag as the server reports it):"
	echo
	echo "| run | tps | samples | WAL MiB/s | lag bytes median / p95 / max | lag at the WAL rate | server's flush_lag median / p95 / max |"
	echo "|---|---|---|---|---|---|---|"
	printf '%s\n' "${LAG_ROWS[@]}"
	echo
	echo "Commands (SETDIR = $PGW/<set>, PGW = $PGW; passwords from a file via DUALKEY_PASSWORD_FILE, pgBackRest's repo1-cipher-pass in its config):"
	echo
	echo '```'
	printf '%s\n' "${COMMANDS[@]}" | sed "s|$WORK|WORK|g" | awk '!seen[$0]++'
	echo '```'
	echo
}
report | tee -a "$RESULTS"
say "appended to ${RESULTS#"$ROOT"/}"
