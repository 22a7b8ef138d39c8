#!/usr/bin/env bash
# gate.sh measures the gate's cost: pgbench straight to PostgreSQL ("direct")
# against pgbench through PgBouncer and through `dualkey gate`, in one run on
# the same PostgreSQL 15 server and the same data (issue 6, point 9).
#
#   data      `pgbench -i -s $BENCH_GATE_SCALE` (default 10: ~160 MiB, in
#             shared_buffers), tables owned by the role bench
#   workloads pgbench select-only (-S) and TPC-B like (the default script),
#             -M simple and -M prepared, 8 clients (-j 2) and 1 client,
#             -n (pgbench's own vacuum would TRUNCATE pgbench_history, which
#             the gate holds);
#             before every TPC-B run, straight to the server and untimed:
#             TRUNCATE pgbench_history, VACUUM the small tables, CHECKPOINT
#   timing    each run is -T $BENCH_GATE_WARMUP + $BENCH_GATE_SECONDS
#             (default 8 + 15) with -P 1, and only the seconds after the
#             warm-up count: tps is the mean of pgbench's per-second tps,
#             latency their mean weighted by tps, the proxy's CPU its time
#             over the same seconds. A new PostgreSQL backend is slow for its
#             first seconds on this machine (select-only 8 clients: 5000 tps
#             in the first second, full speed after about 5): it maps the
#             shared buffers it touches one page fault at a time, and page
#             faults are dear in this VM. pgbench opens new backends on every
#             run, directly and through the gate, while PgBouncer keeps its
#             server connections in its pool between runs: timed from the
#             start, direct and the gate paid the warm-up and PgBouncer did
#             not (its share of direct was inflated, once past 100%).
#   targets   direct, pgbouncer, gate; for every workload the three run one
#             after the other in an order rotated per round, and the whole
#             set repeats $BENCH_GATE_ROUNDS times (default 3): tps and
#             latency are the medians, so load from other processes lands on
#             all three alike. Each goal line adds the gate against PgBouncer
#             round by round (tps ratio, or latency difference), its median
#             and, from 6 rounds, a 95% interval of that median: rounds here
#             scatter by +-10%, so one run's verdict can be luck either way
#   floor     with 8 clients also bench/gatefloor, a Go relay that copies
#             bytes and nothing else, in two designs: one thread on raw
#             epoll (as PgBouncer) and the gate's event loop (io_uring where
#             the kernel has it): what the gate pays before its own work
#   state     the gate's state store, so its ledger, in GW/state on the
#             data's disk, as a gate beside its database would have it;
#             $BENCH_GATE_STATE_DIR puts it in a folder of its own there
#             (on a tmpfs, to tell the ledger's fsyncs from its CPU), and
#             BENCH_GATE_STATE_PG=1 in a database of the benchmarked server
#             (dualkey_state, owned by bench; the password from GW/pgpass),
#             where the ledger's commits share the server's WAL flushes;
#             BENCH_GATE_LEDGER_SYNC sets gate.yaml's ledger_sync (default
#             not given: the gate's default, 1s; 0 flushes every batch)
#   profile   afterwards, a gate started with DUALKEY_CPUPROFILE runs the
#             four 8-client workloads once each (select-only and TPC-B,
#             simple and prepared); stopped with
#             SIGINT so the profile is flushed; `go tool pprof -top` of each
#
# Settings, chosen to make the proxies' jobs alike:
#   TLS off for all three (sslmode=disable; the gate with require_tls: false
#     and no certificate), so no side pays for encryption.
#   Authentication SCRAM-SHA-256 everywhere: the server's pg_hba for the role
#     bench; PgBouncer's auth_type=scram-sha-256 against the role's verifier
#     (copied from pg_authid into its auth_file); the gate against the
#     verifier `dualkey users passwd` stored. pgbench connects once per client
#     (no -C), so login costs are outside the timed part anyway.
#   Brokered upstream credentials in both proxies: PgBouncer's [databases]
#     entry carries user= and password=, the gate's upstreams: entry a
#     password_file; so both log in upstream with a secret the client never
#     sent, as the gate always does.
#   PgBouncer 1.18 (Debian bookworm) in pool_mode=session: one server
#     connection per client connection for its whole life, as the gate works.
#     Transaction pooling would break -M prepared (1.18 has no prepared
#     statement tracking) and does something the gate does not.
#     default_pool_size 20 >= clients. PgBouncer is one thread; the gate uses
#     every core (GOMAXPROCS = 2 here).
#   The gate's policy allows read and write for the person bench on the
#     database bench and sets no max_rows: TPC-B's UPDATEs are not measured by
#     the blast-radius guard (its cost, a round trip and two injected
#     statements per guarded statement, is described in docs/gate.md). Every
#     write statement is still classified and recorded in the ledger (SQLite
#     state beside the config); reads are counted per session.
#   PostgreSQL: shared_buffers=256MB, everything else default; proxies and
#     server on 127.0.0.1.
#   Sessions: each server runs in its own session (setsid), as a daemon
#     does: PgBouncer and the gate (and the floor's relays) as PostgreSQL's
#     backends already do, each of which calls setsid. With autogroups on
#     (kernel.sched_autogroup_enabled=1, Debian's default) a session is a
#     scheduling group, and a proxy started from this script would share one
#     with pgbench. BENCH_GATE_SESSIONS=shared starts them the old way.
#
# Usage: bench/gate.sh [WORKDIR]   (default $BENCH_WORK or /tmp/dualkey-bench)
# Environment: BENCH_GATE_SCALE (10), BENCH_GATE_SECONDS (15),
# BENCH_GATE_WARMUP (8),
# BENCH_GATE_ROUNDS (3), BENCH_GATE_PROFILE (1; 0 skips the profile runs),
# BENCH_GATE_FLOOR (1; 0 skips the bench/gatefloor relays),
# BENCH_GATE_SESSIONS (own: each server in its own session; shared: in this
# script's, with pgbench),
# BENCH_GATE_CASES (all by default; else a comma-separated subset of
# select-simple-8, select-prepared-8, tpcb-simple-8, tpcb-prepared-8 and the
# same with -1: to look at a few workloads with more rounds),
# DUALKEY_BIN (default bin/dualkey), BENCH_RESULTS (markdown appended;
# default bench/results/<date>.md), BENCH_LOCK (a file created for each timed
# window and removed after it, so cooperating users of the machine can keep
# off the CPU; none by default).
# Needs root (servers run as user postgres) and `scripts/setup.sh bench`.
# Never touches port 5432 or 6432.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-${BENCH_WORK:-/tmp/dualkey-bench}}
SCALE=${BENCH_GATE_SCALE:-10}
RUN_SECONDS=${BENCH_GATE_SECONDS:-15}
WARM_SECONDS=${BENCH_GATE_WARMUP:-8}
ROUNDS=${BENCH_GATE_ROUNDS:-3}
PROFILE=${BENCH_GATE_PROFILE:-1}
FLOOR=${BENCH_GATE_FLOOR:-1}
ONLY=${BENCH_GATE_CASES:-}
SESSIONS=${BENCH_GATE_SESSIONS:-own}
LOCK=${BENCH_LOCK:-}
DUALKEY_SRC=${DUALKEY_BIN:-$ROOT/bin/dualkey}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results/$(date +%Y-%m-%d).md}
PGBIN=/usr/lib/postgresql/15/bin
PGBOUNCER=/usr/sbin/pgbouncer
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
OSUSER=postgres
GW=$WORK/gate

# The gate's ledger must not be mirrored into whatever vault the caller uses.
AS_PG_ENV=(-u DUALKEY_REPO -u DUALKEY_STATE)
NAME=gate-bench
lock_cleanup() { [[ -z $LOCK ]] || rm -f "$LOCK"; }
CLEANUP_HOOK=lock_cleanup
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

((EUID == 0)) || die "run as root (servers run as user $OSUSER)"
[[ -x $PGBIN/initdb && -x $PGBIN/pgbench ]] || die "PostgreSQL 15 missing; run scripts/setup.sh bench"
[[ -x $PGBOUNCER ]] || die "pgbouncer missing; run scripts/setup.sh bench"
# own_session PID NAME: with BENCH_GATE_SESSIONS=own, PID (the pid the CPU
# is read from) must lead its own session.
own_session() {
	[[ $SESSIONS == shared || $(ps -o sid= -p "$1" | tr -d ' ') == "$1" ]] || die "$2 (pid $1) is not in its own session"
}
case $SESSIONS in
own) DAEMON=(setsid) ;; # not a process group leader here, so setsid execs: $! stays the server's pid
shared) DAEMON=() ;;
*) die "BENCH_GATE_SESSIONS must be own or shared, not $SESSIONS" ;;
esac
[[ -x $DUALKEY_SRC ]] || die "dualkey binary $DUALKEY_SRC missing; make build (or DUALKEY_BIN=...)"
[[ ($PROFILE == 0 && $FLOOR == 0) || -x $GO ]] || die "go needed for go tool pprof and bench/gatefloor (or BENCH_GATE_PROFILE=0 BENCH_GATE_FLOOR=0)"

lock_on() { [[ -z $LOCK ]] || touch "$LOCK"; }
lock_off() { [[ -z $LOCK ]] || rm -f "$LOCK"; }

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# cpu_ticks PID: user + system clock ticks the process has used so far
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

SOCK=$GW/sock
psql_sock() { # DB SQL: as the superuser over the unix socket (trust)
	as_pg "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PGPORT" -U postgres -d "$1" -c "$2"
}

COMMANDS=()
note() { # LABEL CMD...: record the exact command with this run's paths replaced
	local line="${*:2}"
	line=${line//$GW\/bin\/dualkey/dualkey}
	line=${line//$GW/GW}
	COMMANDS+=("$1: $line")
}

# --- setup: server, data, role, PgBouncer, gate ------------------------------------------
mkdir -p "$WORK" "$(dirname "$RESULTS")"
chmod 755 "$WORK"
rm -rf "$GW"
install -d -o "$OSUSER" -m 755 "$GW" "$GW/bin" "$SOCK" "$GW/logs" "$GW/run"
install -o root -m 755 "$DUALKEY_SRC" "$GW/bin/dualkey"
DK=("$GW/bin/dualkey")
PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '+/' 'xy')
# pgbench and psql read the password from a passfile, never from argv.
(umask 077 && echo "*:*:*:bench:$PASSWORD" >"$GW/pgpass" && echo "$PASSWORD" >"$GW/upstream.pw")
chown "$OSUSER" "$GW/pgpass" "$GW/upstream.pw"

DATA=$GW/data
free_port PGPORT
install -d -o "$OSUSER" -m 700 "$DATA"
as_pg "$PGBIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >/dev/null
cat >"$DATA/pg_hba.conf" <<-EOF
	local all postgres trust
	host all postgres 127.0.0.1/32 trust
	host all bench 127.0.0.1/32 scram-sha-256
EOF
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$GW/logs/postgres.log" -w -t 120 start \
	-o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $SOCK -c shared_buffers=256MB -c max_connections=100" >/dev/null
RUNNING_PG+=("$DATA")
psql_sock postgres "CREATE ROLE bench LOGIN PASSWORD '$PASSWORD'" >/dev/null
psql_sock postgres "CREATE DATABASE bench OWNER bench" >/dev/null
t0=$SECONDS
as_pg env PGPASSFILE="$GW/pgpass" "$PGBIN/pgbench" -h 127.0.0.1 -p "$PGPORT" -U bench -i -q -s "$SCALE" bench 2>&1 | tail -n 1 >&2
psql_sock bench "VACUUM ANALYZE" >/dev/null
psql_sock bench "CHECKPOINT" >/dev/null
say "server on 127.0.0.1:$PGPORT, pgbench scale $SCALE loaded in $((SECONDS - t0))s"
note "data" "pgbench -i -q -s $SCALE bench  (as role bench, SCRAM-SHA-256; server: shared_buffers=256MB)"

# PgBouncer: the client logs in with SCRAM against the role's own verifier.
VERIFIER=$(psql_sock postgres "SELECT rolpassword FROM pg_authid WHERE rolname = 'bench'")
[[ $VERIFIER == SCRAM-SHA-256* ]] || die "the role's password is not a SCRAM verifier"
free_port BOUNCER_PORT
(umask 077 && echo "\"bench\" \"$VERIFIER\"" >"$GW/userlist.txt")
(umask 077 && cat >"$GW/pgbouncer.ini" <<-EOF
	[databases]
	bench = host=127.0.0.1 port=$PGPORT dbname=bench user=bench password=$PASSWORD

	[pgbouncer]
	listen_addr = 127.0.0.1
	listen_port = $BOUNCER_PORT
	unix_socket_dir =
	auth_type = scram-sha-256
	auth_file = $GW/userlist.txt
	pool_mode = session
	default_pool_size = 20
	max_client_conn = 100
	logfile = $GW/logs/pgbouncer.log
	pidfile = $GW/run/pgbouncer.pid
	log_connections = 0
	log_disconnections = 0
EOF
)
chown "$OSUSER" "$GW/userlist.txt" "$GW/pgbouncer.ini"
${DAEMON[@]+"${DAEMON[@]}"} "${AS_PG[@]}" "$PGBOUNCER" -q "$GW/pgbouncer.ini" &
BOUNCER=$!
BG_PIDS+=("$BOUNCER")
wait_until "pgbouncer to listen" 30 "listening $BOUNCER_PORT"
own_session "$BOUNCER" pgbouncer
note "pgbouncer" "pgbouncer -q GW/pgbouncer.ini  (pool_mode=session, auth_type=scram-sha-256, default_pool_size=20; [databases] bench = host=127.0.0.1 port=PG dbname=bench user=bench password=...)"

# The gate: one person, bench, with a SCRAM verifier in the state store.
free_port GATE_PORT
STATE_DIR=$GW/state
[[ -z ${BENCH_GATE_STATE_DIR:-} ]] || STATE_DIR=$BENCH_GATE_STATE_DIR/dualkey-gate-bench-state # ours to remove
STATE=$STATE_DIR/state.db
rm -rf "$STATE_DIR"
install -d -o "$OSUSER" -m 700 "$STATE_DIR"
if [[ ${BENCH_GATE_STATE_PG:-0} != 0 ]]; then
	psql_sock postgres "CREATE DATABASE dualkey_state OWNER bench" >/dev/null
	STATE="postgres://bench@127.0.0.1:$PGPORT/dualkey_state?sslmode=disable"
	note "gate state" "PostgreSQL: $STATE (BENCH_GATE_STATE_PG; PGPASSFILE=GW/pgpass)"
fi
# The ledger's key in STATE_DIR (beside a SQLite state, where it would be anyway).
STATE_ENV=(PGPASSFILE="$GW/pgpass" DUALKEY_LEDGER_KEY="$STATE_DIR/ledger.key")
as_pg env "${STATE_ENV[@]}" "${DK[@]}" -q --state "$STATE" users add bench >/dev/null
as_pg env "${STATE_ENV[@]}" "${DK[@]}" -q --state "$STATE" users passwd bench --password-stdin <<<"$PASSWORD" >/dev/null
cat >"$GW/gate.yaml" <<-EOF
	listen: 127.0.0.1:$GATE_PORT
	tls:
	  require_tls: false          # TLS off for all three targets
	state: $STATE
	upstreams:
	  bench:
	    host: 127.0.0.1
	    port: $PGPORT
	    user: bench
	    password_file: upstream.pw
	    sslmode: disable
	rules:
	  - name: pgbench reads and writes
	    users: [bench]
	    databases: [bench]
	    classes: [read, write]
	    action: allow             # no max_rows: the guard stays out of TPC-B
EOF
[[ -z ${BENCH_GATE_LEDGER_SYNC:-} ]] || echo "ledger_sync: $BENCH_GATE_LEDGER_SYNC" >>"$GW/gate.yaml"
chown "$OSUSER" "$GW/gate.yaml"
[[ $STATE_DIR == "$GW/state" ]] || note "gate state" "$STATE_DIR (BENCH_GATE_STATE_DIR; $(df --output=fstype "$STATE_DIR" | tail -n 1))"
note "gate users" "dualkey --state GW/state/state.db users add bench; dualkey --state GW/state/state.db users passwd bench --password-stdin"
note "gate" "dualkey gate --config GW/gate.yaml  (gate.yaml in the results)"
note "sessions" "$SESSIONS (own: PgBouncer, the gate and the relays each started with setsid; shared: in the script's session, with pgbench)"

# gate_start [ENV=VALUE...]: start a gate; sets GATE
gate_start() {
	${DAEMON[@]+"${DAEMON[@]}"} "${AS_PG[@]}" env "${STATE_ENV[@]}" "$@" "${DK[@]}" gate --config "$GW/gate.yaml" >>"$GW/logs/gate.log" 2>&1 &
	GATE=$!
	BG_PIDS+=("$GATE")
	wait_until "the gate to listen" 30 "listening $GATE_PORT"
	kill -0 "$GATE" || die "gate exited: $(tail -n 5 "$GW/logs/gate.log")"
	own_session "$GATE" gate
}
gate_start

# --- runs ------------------------------------------------------------------------------------
TARGETS=(direct pgbouncer gate)
declare -A PORT_OF=([direct]=$PGPORT [pgbouncer]=$BOUNCER_PORT [gate]=$GATE_PORT)
declare -A PID_OF=([pgbouncer]=$BOUNCER [gate]=$GATE)

# The floor: bench/gatefloor, a Go relay that only copies bytes, in two
# designs (one thread on raw epoll, as PgBouncer works; the gate's own event
# loop, io_uring where the kernel has it), run with 8 clients beside the
# others.
FLOOR_TARGETS=()
if [[ $FLOOR != 0 ]]; then
	"$GO" build -o "$GW/bin/gatefloor" "$ROOT/bench/gatefloor" || die "go build bench/gatefloor failed"
	for mode in epoll evloop; do
		free_port port
		${DAEMON[@]+"${DAEMON[@]}"} "${AS_PG[@]}" "$GW/bin/gatefloor" -mode "$mode" -listen "127.0.0.1:$port" -upstream "127.0.0.1:$PGPORT" >>"$GW/logs/gatefloor.log" 2>&1 &
		BG_PIDS+=("$!")
		PID_OF[relay-$mode]=$!
		PORT_OF[relay-$mode]=$port
		FLOOR_TARGETS+=("relay-$mode")
		wait_until "gatefloor -mode $mode to listen" 30 "listening $port"
		own_session "${PID_OF[relay-$mode]}" "gatefloor -mode $mode"
	done
	note "floor" "gatefloor -mode epoll|evloop -listen 127.0.0.1:PORT -upstream 127.0.0.1:PG  (bench/gatefloor: a relay that copies bytes, nothing else)"
fi
CASES=("select simple 8" "select prepared 8" "tpcb simple 8" "tpcb prepared 8"
	"select simple 1" "select prepared 1" "tpcb simple 1" "tpcb prepared 1")
if [[ -n $ONLY ]]; then
	all=("${CASES[@]}")
	CASES=()
	for cs in "${all[@]}"; do
		[[ ,$ONLY, == *,${cs// /-},* ]] && CASES+=("$cs")
	done
	((${#CASES[@]})) || die "BENCH_GATE_CASES=$ONLY names no workload (e.g. tpcb-simple-1)"
fi
declare -A TPS LAT CPU # "case target" -> space-separated values, one per round

# pgbench_cmd WORKLOAD MODE CLIENTS PORT: sets CMD
pgbench_cmd() {
	local jobs=2
	(($3 == 1)) && jobs=1
	CMD=("$PGBIN/pgbench" -h 127.0.0.1 -p "$4" -U bench -n -M "$2" -c "$3" -j "$jobs" -T "$((WARM_SECONDS + RUN_SECONDS))" -P 1)
	[[ $1 == select ]] && CMD+=(-S)
	CMD+=(bench)
}

# run_one WORKLOAD MODE CLIENTS TARGET LOG: one timed pgbench; sets R_TPS,
# R_LAT (ms) and R_CPU (the proxy's CPU, % of one core), all over the seconds
# after the warm-up
run_one() {
	local w=$1 m=$2 c=$3 target=$4 log=$5 pid="" t0 t1 c0 c1 bench
	if [[ $w == tpcb ]]; then
		# psql -c runs a string as one transaction; VACUUM refuses that.
		psql_sock bench "TRUNCATE pgbench_history" >/dev/null
		psql_sock bench "VACUUM ANALYZE pgbench_branches, pgbench_tellers" >/dev/null
		psql_sock bench "CHECKPOINT" >/dev/null
	fi
	pgbench_cmd "$w" "$m" "$c" "${PORT_OF[$target]}"
	pid=${PID_OF[$target]:-}
	[[ $target != gate ]] || pid=$GATE # gate_start starts a new one for the profile runs
	as_pg env PGPASSFILE="$GW/pgpass" "${CMD[@]}" >"$log" 2>&1 &
	bench=$!
	sleep "$WARM_SECONDS"
	[[ -z $pid ]] || c0=$(cpu_ticks "$pid")
	t0=$(now)
	wait "$bench" || {
		tail -n 20 "$log" >&2
		die "pgbench failed: ${CMD[*]}"
	}
	t1=$(now)
	if grep -q "number of failed transactions: [1-9]" "$log"; then
		tail -n 20 "$log" >&2
		die "pgbench reported failed transactions: ${CMD[*]}"
	fi
	# progress: 9.0 s, 17006.8 tps, lat 0.454 ms stddev 0.275, 0 failed
	read -r R_TPS R_LAT < <(awk -v w="$WARM_SECONDS" '/^progress: / && $2 + 0 > w { n++; t += $4; l += $4 * $7 }
		END { if (n && t) printf "%.1f %.3f\n", t / n, l / t }' "$log")
	[[ -n ${R_TPS:-} && -n ${R_LAT:-} ]] || die "no progress after the warm-up in $log"
	R_CPU=-
	if [[ -n $pid ]]; then
		c1=$(cpu_ticks "$pid")
		R_CPU=$(awk -v a="$c0" -v b="$c1" -v t0="$t0" -v t1="$t1" -v hz="$(getconf CLK_TCK)" \
			'BEGIN { printf "%.0f", (b - a) / hz / (t1 - t0) * 100 }')
	fi
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
for ((r = 1; r <= ROUNDS; r++)); do
	# One locked window per round: 8 workloads x 3 targets x RUN_SECONDS.
	lock_on
	for ((k = 0; k < ${#CASES[@]}; k++)); do
		read -r w m c <<<"${CASES[$k]}"
		local_targets=("${TARGETS[@]}")
		((c == 8)) && local_targets+=("${FLOOR_TARGETS[@]}")
		nt=${#local_targets[@]}
		for ((i = 0; i < nt; i++)); do
			# Rotate the order per round and per workload so no target always
			# runs first (right after a CHECKPOINT) or last.
			target=${local_targets[$(((i + r + k) % nt))]}
			run_one "$w" "$m" "$c" "$target" "$GW/logs/r$r-$w-$m-c$c-$target.log"
			TPS["${CASES[$k]} $target"]+="$R_TPS "
			LAT["${CASES[$k]} $target"]+="$R_LAT "
			CPU["${CASES[$k]} $target"]+="$R_CPU "
			say "round $r: $w -M $m -c $c $target: $R_TPS tps, $R_LAT ms, proxy CPU $R_CPU%"
		done
	done
	lock_off
	if ((r == 1)); then
		for ((k = 0; k < ${#CASES[@]}; k++)); do
			read -r w m c <<<"${CASES[$k]}"
			pgbench_cmd "$w" "$m" "$c" PORT
			note "pgbench $w $m c$c" env PGPASSFILE=GW/pgpass "${CMD[@]}"
		done
	fi
	sleep 2
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
bg_stop "$GATE"

# --- profile: a gate of its own per workload, 8 clients --------------------------------------
PROFILES=("select simple" "select prepared" "tpcb simple" "tpcb prepared")
PROFILE_TOPS=()
if [[ $PROFILE != 0 ]]; then
	lock_on
	for p in "${PROFILES[@]}"; do
		read -r w m <<<"$p"
		prof=$GW/gate-$w-$m.pprof
		gate_start DUALKEY_CPUPROFILE="$prof"
		run_one "$w" "$m" 8 gate "$GW/logs/profile-$w-$m.log"
		say "profile run $w -M $m: $R_TPS tps, gate CPU $R_CPU%"
		PROFILE_TOPS+=("$R_TPS tps, gate CPU $R_CPU% of one core")
		bg_stop "$GATE" INT
		[[ -s $prof ]] || die "no profile in $prof"
		"$GO" tool pprof -top -nodecount=30 "$GW/bin/dualkey" "$prof" >"$GW/profile-$w-$m.top" 2>/dev/null
		"$GO" tool pprof -top -cum -nodecount=30 "$GW/bin/dualkey" "$prof" >"$GW/profile-$w-$m.cum" 2>/dev/null
	done
	lock_off
	note "profile" "DUALKEY_CPUPROFILE=GW/gate-WORKLOAD-MODE.pprof dualkey gate --config GW/gate.yaml; pgbench [-S] -c 8 -j 2 -M MODE; kill -INT; go tool pprof -top [-cum] -nodecount=30 dualkey GW/gate-WORKLOAD-MODE.pprof"
fi

# --- report ----------------------------------------------------------------------------------
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# median_ci: a 95% confidence interval of the median of the numbers read,
# free of any assumption about their distribution: the k-th smallest and
# the k-th largest, k the largest with P(Binomial(n, 1/2) < k) <= 2.5%
# (so at least 95% coverage). Prints "lo hi", or nothing under 6 numbers.
median_ci() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END {
	n = NR; p = 0.5 ^ n; cum = p; k = 0
	for (i = 1; cum <= 0.025; i++) { k = i; p = p * (n - i + 1) / i; cum += p }
	if (k >= 1) print a[k], a[n - k + 1] }'; }
ROWS=()
GOALS=()
FLOOR_ROWS=()
for cs in "${CASES[@]}"; do
	read -r w m c <<<"$cs"
	declare -A mt ml
	for t in "${TARGETS[@]}"; do
		mt[$t]=$(median <<<"${TPS["$cs $t"]}")
		ml[$t]=$(median <<<"${LAT["$cs $t"]}")
	done
	stmts=1
	[[ $w == tpcb ]] && stmts=7 # BEGIN, 3 UPDATE, SELECT, INSERT, END
	row=$(awk -v w="$w" -v m="$m" -v c="$c" -v n="$stmts" \
		-v dt="${mt[direct]}" -v bt="${mt[pgbouncer]}" -v gt="${mt[gate]}" \
		-v dl="${ml[direct]}" -v bl="${ml[pgbouncer]}" -v gl="${ml[gate]}" \
		-v bc="$(median <<<"${CPU["$cs pgbouncer"]}")" -v gc="$(median <<<"${CPU["$cs gate"]}")" 'BEGIN {
		printf "| %s | %s | %d | %.0f | %.0f (%.0f%%) | %.0f (%.0f%%) | %.3f | %+.3f / %+.3f | %+.3f / %+.3f | %s%% | %s%% |",
			(w == "select") ? "select-only" : "TPC-B", m, c, dt, bt, 100 * bt / dt, gt, 100 * gt / dt,
			dl, bl - dl, (bl - dl) / n, gl - dl, (gl - dl) / n, bc, gc }')
	ROWS+=("$row")
	# Rounds the gate won: the targets of a round ran back to back, so a
	# pair from one round shares its load; the medians alone hide how
	# often a row goes either way.
	pairs=$(paste -d' ' <(tr ' ' '\n' <<<"${TPS["$cs gate"]}" | grep -v '^$') <(tr ' ' '\n' <<<"${TPS["$cs pgbouncer"]}" | grep -v '^$') \
		<(tr ' ' '\n' <<<"${LAT["$cs gate"]}" | grep -v '^$') <(tr ' ' '\n' <<<"${LAT["$cs pgbouncer"]}" | grep -v '^$'))
	won=$(awk -v c="$c" '{ n++; if (c == 8 ? $1 >= $2 : $3 <= $4) w++ } END { printf "gate ahead in %d of %d rounds", w, n }' <<<"$pairs")
	# The same pairs as one figure per round, and its median: it moves
	# less from run to run than the medians' ratio to direct, which pairs
	# figures from different rounds.
	if ((c == 8)); then
		ratios=$(awk '{ printf "%.3f ", $1 / $2 }' <<<"$pairs")
		won+="; gate/PgBouncer tps per round: median $(printf '%.3f' "$(median <<<"$ratios")")"
		lo="" hi=""
		read -r lo hi < <(median_ci <<<"$ratios") || true
		[[ -z ${lo:-} ]] || won+=", 95% interval $lo-$hi"
	else
		diffs=$(awk -v n="$stmts" '{ printf "%+.1f ", ($3 - $4) / n * 1000 }' <<<"$pairs")
		won+="; gate minus PgBouncer per round: median $(printf '%+.1f' "$(median <<<"$diffs")") µs per statement"
		lo="" hi=""
		read -r lo hi < <(median_ci <<<"$diffs") || true
		[[ -z ${lo:-} ]] || won+=", 95% interval $lo to $hi"
	fi
	if ((c == 8)); then
		GOALS+=("$(awk -v l="$w -M $m, 8 clients" -v dt="${mt[direct]}" -v bt="${mt[pgbouncer]}" -v gt="${mt[gate]}" 'BEGIN {
			printf "%s: gate %.0f%% of direct, PgBouncer %.0f%%: %s", l, 100 * gt / dt, 100 * bt / dt, (gt >= bt) ? "met" : "NOT met" }') ($won)")
	else
		GOALS+=("$(awk -v l="$w -M $m, 1 client" -v n="$stmts" -v dl="${ml[direct]}" -v bl="${ml[pgbouncer]}" -v gl="${ml[gate]}" 'BEGIN {
			printf "%s: added latency per statement gate %.3f ms, PgBouncer %.3f ms: %s", l, (gl - dl) / n, (bl - dl) / n, (gl <= bl) ? "met" : "NOT met" }') ($won)")
	fi
	if ((c == 8 && ${#FLOOR_TARGETS[@]})); then
		cells=""
		for t in relay-epoll relay-evloop pgbouncer gate; do
			cells+=$(awk -v dt="${mt[direct]}" -v t="$(median <<<"${TPS["$cs $t"]}")" -v cpu="$(median <<<"${CPU["$cs $t"]}")" \
				'BEGIN { printf " %.0f (%.0f%%), %.0f |", t, 100 * t / dt, cpu / 100 / t * 1e6 }')
		done
		FLOOR_ROWS+=("| $([[ $w == select ]] && echo select-only || echo TPC-B) | $m | ${mt[direct]} |$cells")
	fi
	unset mt ml
done

report() {
	echo "## Gate benchmark: direct vs PgBouncer vs dualkey gate, $START (pgbench scale $SCALE)"
	echo
	echo "Machine: $(lscpu | awk -F': +' '/^Model name/ {print $2; exit}'), $(nproc) cores," \
		"$(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)."
	echo
	echo "Load average (1, 5, 15 min) at start: $LOAD_START; at end of the timed rounds: $LOAD_END."
	echo
	echo "The gate's event loop ran on $(grep -o 'event loop: .*' "$GW/logs/gate.log" | tail -n 1 | cut -d' ' -f3-) (kernel.io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo absent))."
	echo
	echo "Versions: $("${DK[@]}" version | head -n 1); $("$PGBOUNCER" --version | head -n 1);" \
		"$(psql_sock postgres 'SHOW server_version'); $("$PGBIN/pgbench" --version)."
	echo
	echo "Medians of $ROUNDS rounds; each run -T $((WARM_SECONDS + RUN_SECONDS)) -P 1, of which the first $WARM_SECONDS s are warm-up (new server backends) and not counted; the three targets interleaved per workload, order rotated per round.${ONLY:+ Workloads: $ONLY only (BENCH_GATE_CASES).}"
	echo "tps: the mean of pgbench's per-second tps after the warm-up. Latency: the mean of its per-second latency averages, weighted by tps; the added latency is the proxy's minus direct, per transaction / per statement (TPC-B: 7 statements)."
	echo "Proxy CPU: the proxy process's user+system time over the seconds after the warm-up, in % of one core."
	echo
	echo "| workload | protocol | clients | direct tps | PgBouncer tps (of direct) | gate tps (of direct) | direct latency ms | PgBouncer added ms (txn / stmt) | gate added ms (txn / stmt) | PgBouncer CPU | gate CPU |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|"
	printf '%s\n' "${ROWS[@]}"
	echo
	echo "Goals (issue 6): throughput with 8 clients at least PgBouncer's as a ratio to direct; added latency per statement with 1 client at most PgBouncer's."
	echo
	printf -- '- %s\n' "${GOALS[@]}"
	echo
	if ((${#FLOOR_TARGETS[@]})); then
		echo "The floor, 8 clients: bench/gatefloor copies bytes and does nothing else; relay-epoll uses one thread on raw epoll as PgBouncer does, relay-evloop the gate's event loop (internal/evloop; io_uring where the kernel has it) with nothing else. CPU per transaction = the proxy's CPU time over the run / transactions (medians):"
		echo
		echo "| workload | protocol | direct tps | relay-epoll tps (of direct), µs/txn | relay-evloop tps (of direct), µs/txn | PgBouncer tps (of direct), µs/txn | gate tps (of direct), µs/txn |"
		echo "|---|---|---|---|---|---|---|"
		printf '%s\n' "${FLOOR_ROWS[@]}"
		echo
	fi
	echo "Every run (tps / latency ms / proxy CPU %, rounds in order):"
	echo
	echo '```'
	for cs in "${CASES[@]}"; do
		for t in "${TARGETS[@]}" "${FLOOR_TARGETS[@]}"; do
			[[ -n ${TPS["$cs $t"]:-} ]] || continue # the floor runs with 8 clients only
			printf '%-20s %-9s tps %-26s lat %-22s cpu %s\n' "$cs" "$t" "${TPS["$cs $t"]}" "${LAT["$cs $t"]}" "${CPU["$cs $t"]}"
		done
	done
	echo '```'
	if ((${#PROFILE_TOPS[@]})); then
		echo
		echo "CPU profiles of the gate during pgbench -c 8 -j 2 -T $((WARM_SECONDS + RUN_SECONDS)) (each its own gate process, started with DUALKEY_CPUPROFILE, stopped with SIGINT):"
		local i=0 p w m
		for p in "${PROFILES[@]}"; do
			read -r w m <<<"$p"
			echo
			echo "$w -M $m, ${PROFILE_TOPS[$i]}; \`go tool pprof -top -nodecount=30\`:"
			echo
			echo '```'
			sed -n '1,40p' "$GW/profile-$w-$m.top"
			echo '```'
			echo
			echo "\`-top -cum -nodecount=30\`:"
			echo
			echo '```'
			sed -n '1,40p' "$GW/profile-$w-$m.cum"
			echo '```'
			i=$((i + 1))
		done
	fi
	echo
	echo "gate.yaml (ports and paths of this run):"
	echo
	echo '```yaml'
	sed "s|$GW|GW|g" "$GW/gate.yaml"
	echo '```'
	echo
	echo "Commands (GW = $GW; PG = the server's port, PORT = the target's):"
	echo
	echo '```'
	printf '%s\n' "${COMMANDS[@]}" | sed "s|$WORK|WORK|g"
	echo '```'
	echo
}
report | tee -a "$RESULTS"
say "appended to ${RESULTS#"$ROOT"/}"
