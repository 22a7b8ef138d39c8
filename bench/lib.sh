# bench/lib.sh: the bookkeeping bench/pg.sh and bench/gate.sh share. Source it
# after setting NAME (the log prefix) and OSUSER (who runs the servers), and
# optionally AS_PG_ENV (extra `env` arguments for as_pg, e.g. -u VAR) and
# CLEANUP_HOOK (a function run first on exit).

say() { echo "$NAME: $*" >&2; }
die() {
	echo "$NAME: error: $*" >&2
	exit 1
}

id "$OSUSER" >/dev/null 2>&1 || die "no OS user $OSUSER"
PGHOME=$(getent passwd "$OSUSER" | cut -d: -f6)

# as_pg CMD... runs CMD as $OSUSER; exec all the way, so $! of a background
# as_pg is the command's own pid.
AS_PG=(env ${AS_PG_ENV[@]+"${AS_PG_ENV[@]}"} HOME="$PGHOME" USER=$OSUSER LOGNAME=$OSUSER
	setpriv --reuid="$OSUSER" --regid="$OSUSER" --init-groups --)
as_pg() { "${AS_PG[@]}" "$@"; }

# --- everything started is stopped on exit --------------------------------------------
RUNNING_PG=() # data dirs of servers this script started
BG_PIDS=()    # started as "${AS_PG[@]}" CMD &, so $! is CMD's own pid
# A background job of a non-interactive shell ignores SIGINT: psql and
# pg_receivewal get SIGTERM; Go programs (agent, gate) take SIGINT as Ctrl-C.
cleanup() {
	local rc=$? p d
	[[ $(type -t "${CLEANUP_HOOK:-}") != function ]] || "$CLEANUP_HOOK"
	for p in "${BG_PIDS[@]}"; do
		kill -INT "$p" 2>/dev/null || true
		kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${BG_PIDS[@]}"; do
		for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.3; done
		kill -KILL "$p" 2>/dev/null || true
	done
	for d in "${RUNNING_PG[@]}"; do
		if [[ -f $d/postmaster.pid ]]; then
			as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
			say "stopped server for $d"
		fi
	done
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bg_forget() { # PID: drop from BG_PIDS
	local p keep=()
	for p in "${BG_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
	BG_PIDS=("${keep[@]}")
}
bg_stop() { # PID [SIGNAL]: stop one background process and wait for it
	kill -"${2:-INT}" "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	bg_forget "$1"
}

# free_port VAR sets VAR to a free loopback port in 20000-29999: below the
# kernel's ephemeral range (32768-60999), where a client socket of this very
# run could take the port between the check and the bind. It sets a variable
# rather than printing, so USED_PORTS survives (a $(...) is a subshell).
USED_PORTS=""
free_port() {
	local p
	for p in $(shuf -i 20000-29999 -n 200); do
		[[ " $USED_PORTS " == *" $p "* ]] && continue
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			USED_PORTS+=" $p"
			printf -v "$1" '%s' "$p"
			return
		fi
	done
	die "no free port in 20000-29999"
}

now() { date +%s.%N; }
# wait_until DESCRIPTION TIMEOUT_S SHELL-CONDITION: evaluate it every 0.1 s
wait_until() {
	local what=$1 limit=$2 cond=$3 t0
	t0=$(now)
	until eval "$cond" 2>/dev/null; do
		if awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
			die "timed out after ${limit}s waiting for $what"
		fi
		sleep 0.1
	done
}
