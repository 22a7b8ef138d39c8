#!/usr/bin/env bash
# vault.sh measures backup tools on the data sets that data.sh prepared.
#
# For each tool (dualkey, restic, borg) and each set (pgbench, random, source):
#   1. copy base/<set> to live/<set> (the path every tool backs up)   untimed
#   2. first backup of live/<set>                                      timed
#   3. rsync changed/<set> over live/<set> (only changed files are
#      rewritten, in place, so unchanged files keep inode and ctime)   untimed
#   4. second backup, the incremental                                  timed
#   5. third backup with nothing changed                               timed
#   6. restore the latest snapshot into an empty directory             timed
#      and compare it with live/<set> (diff -r)                        untimed
# Page cache is dropped before every timed step when the kernel lets us
# (root and a writable /proc/sys/vm/drop_caches); the result says which.
# Each timed step runs under /usr/bin/time -v: wall time, CPU%, max RSS.
#
# S3: the tools dualkey-s3 and restic-s3 do the same against one S3 server
# this script starts on loopback (versitygw, installed by scripts/setup.sh,
# with its POSIX backend in WORKDIR/s3; as the postgres OS user when run as
# root), each in a bucket of its own created with versioning and Object Lock.
# dualkey locks every object in COMPLIANCE mode (min retention 30 days, its
# default) and extends the packs' locks at commit; restic writes plain
# objects. The server shares the machine's cores with the tool: the numbers
# compare the two clients on one server, not S3 services. "repo MiB" is what
# the server stores on disk for the bucket (objects, versions, metadata).
#
# Usage: bench/vault.sh [WORKDIR]      (default $BENCH_WORK or /tmp/dualkey-bench)
# Environment: BENCH_TOOLS="dualkey restic borg dualkey-s3 restic-s3" (the last two:
# the S3 section), BENCH_SETS="pgbench random source",
# BENCH_RESULTS=file (markdown appended; default bench/results/<date>.md),
# DUALKEY_BIN (default bin/dualkey), BENCH_KEEP_REPOS=1 keeps repositories,
# BENCH_NO_DROP=1 leaves the page cache alone (a smoke run on a shared machine).
#
# Settings, chosen to be each tool's recommended defaults on comparable terms:
#   restic  0.18.1, default compression (auto = zstd "default" level), password file
#   borg    Debian's 1.2, --encryption=repokey-blake2, --compression zstd,3
#           (borg's default is lz4; zstd,3 is closer to what restic and dualkey do)
#   dualkey defaults
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-${BENCH_WORK:-/tmp/dualkey-bench}}
TOOLS=${BENCH_TOOLS:-dualkey restic borg dualkey-s3 restic-s3}
SETS=${BENCH_SETS:-pgbench random source}
DUALKEY=${DUALKEY_BIN:-$ROOT/bin/dualkey}
GOBIN=$(go env GOPATH 2>/dev/null || echo /root/go)/bin
RESTIC=${RESTIC_BIN:-$GOBIN/restic}
BORG=${BORG_BIN:-$(command -v borg || echo /usr/bin/borg)}
RESULTS=${BENCH_RESULTS:-$ROOT/bench/results/$(date +%Y-%m-%d).md}
VERSITYGW=${VERSITYGW_BIN:-$GOBIN/versitygw}
TIME=/usr/bin/time

say() { echo "vault-bench: $*" >&2; }
die() {
	echo "vault-bench: error: $*" >&2
	exit 1
}

[[ -x $TIME ]] || die "/usr/bin/time missing; run scripts/setup.sh bench"
command -v rsync >/dev/null || die "rsync missing; run scripts/setup.sh bench"
for s in $SETS; do
	[[ -f $WORK/base/$s.done && -f $WORK/changed/$s.done ]] || die "data set $s not prepared in $WORK; run bench/data.sh $WORK"
done

# --- run bookkeeping ------------------------------------------------------------------
RUN=$WORK/run
mkdir -p "$RUN" "$WORK/repos" "$WORK/live" "$WORK/restore" "$(dirname "$RESULTS")"
tmpfiles=()
cleanup() {
	local rc=$?
	rm -rf "${tmpfiles[@]}" "$WORK/restore" 2>/dev/null || true
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the S3 server (only when an *-s3 tool is asked for) ---------------------------------
S3_PID=
S3_DIR=$WORK/s3
S3_REGION=us-east-1
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
s3_wanted() { [[ " $TOOLS " == *"-s3 "* ]]; }
s3_curl() { # METHOD PATH [curl args...]: a request signed with the server's root keys
	local method=$1 path=$2
	shift 2
	# S3 wants the payload's hash signed; these requests have no body.
	curl -sS -o /dev/null -w '%{http_code}' -X "$method" --aws-sigv4 "aws:amz:$S3_REGION:s3" \
		--user "$S3_KEY:$S3_SECRET" -H "x-amz-content-sha256: $EMPTY_SHA256" "$@" "http://$S3_ADDR$path"
}
start_s3() {
	[[ -x $VERSITYGW ]] || die "versitygw missing; run scripts/setup.sh"
	command -v curl >/dev/null || die "curl missing"
	rm -rf "$S3_DIR"
	mkdir -p "$S3_DIR/data" "$S3_DIR/versions" "$S3_DIR/meta"
	cp "$VERSITYGW" "$S3_DIR/versitygw" # runnable by the server's user
	S3_KEY=benchroot
	S3_SECRET=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
	S3_ADDR=127.0.0.1:$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	local runas=()
	if ((EUID == 0)) && id postgres >/dev/null 2>&1; then
		chmod 755 "$S3_DIR"
		chown -R postgres: "$S3_DIR"
		runas=(runuser -u postgres --)
	fi
	"${runas[@]}" env ROOT_ACCESS_KEY_ID="$S3_KEY" ROOT_SECRET_ACCESS_KEY="$S3_SECRET" \
		"$S3_DIR/versitygw" --region "$S3_REGION" --port "$S3_ADDR" posix \
		--versioning-dir "$S3_DIR/versions" --sidecar "$S3_DIR/meta" "$S3_DIR/data" >"$RUN/versitygw.log" 2>&1 &
	S3_PID=$!
	local i
	for i in $(seq 300); do
		[[ $(s3_curl GET / 2>/dev/null) == 200 ]] && return
		kill -0 "$S3_PID" 2>/dev/null || break
		sleep 0.1
	done
	tail -n 20 "$RUN/versitygw.log" >&2
	die "versitygw did not start on $S3_ADDR"
}
stop_s3() {
	if [[ -n $S3_PID ]]; then
		kill "$S3_PID" 2>/dev/null || true
		wait "$S3_PID" 2>/dev/null || true
		S3_PID=
	fi
	# Objects under COMPLIANCE retention cannot be deleted through S3, by
	# design; the bench owns the server's folder and removes it from disk.
	[[ ${BENCH_KEEP_REPOS:-} == 1 ]] || rm -rf "$S3_DIR"
}
make_bucket() { # NAME: versioning and Object Lock, as docs/object-lock.md asks
	local code
	code=$(s3_curl PUT "/$1" -H "x-amz-bucket-object-lock-enabled: true")
	[[ $code == 200 ]] || die "create bucket $1: HTTP $code"
}
if s3_wanted; then
	trap 'rc=$?; stop_s3; (exit $rc); cleanup' EXIT
	start_s3
fi

# A throwaway password shared by all tools.
PASSFILE=$RUN/password
[[ -s $PASSFILE ]] || (umask 077 && head -c 24 /dev/urandom | base64 >"$PASSFILE")

# Drop the page cache so each step reads from disk; record whether we could.
if [[ ${BENCH_NO_DROP:-} != 1 ]] && ((EUID == 0)) && sync && echo 3 2>/dev/null >/proc/sys/vm/drop_caches; then
	CACHE_NOTE="page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed step"
	drop_caches() { sync && echo 3 >/proc/sys/vm/drop_caches; }
else
	CACHE_NOTE="page cache NOT dropped (not root or /proc/sys/vm/drop_caches read-only): steps read warm data"
	drop_caches() { sync; }
fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# --- tools: init / backup / restore, one function each ----------------------------------------
# Every *_cmd function prints nothing; it sets the array CMD to the exact command.
restic_env() {
	export RESTIC_PASSWORD_FILE=$PASSFILE RESTIC_CACHE_DIR=$RUN/cache-restic-$1 RESTIC_PROGRESS_FPS=0.1
}
borg_env() {
	export BORG_PASSCOMMAND="cat $PASSFILE" BORG_BASE_DIR=$RUN/borg-home-$1 BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
}
dualkey_env() { export DUALKEY_PASSWORD_FILE=$PASSFILE; }
s3_env() { export AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_DEFAULT_REGION=$S3_REGION; }
dualkey-s3_env() {
	dualkey_env
	s3_env
}
restic-s3_env() {
	restic_env "$1"
	s3_env
}

init_cmd() { # TOOL REPO
	case $1 in
	dualkey | dualkey-s3) CMD=("$DUALKEY" vault init --repo "$2") ;;
	restic | restic-s3) CMD=("$RESTIC" -r "$2" init) ;;
	borg) CMD=("$BORG" init --encryption=repokey-blake2 "$2") ;;
	esac
}
backup_cmd() { # TOOL REPO PATH N
	case $1 in
	dualkey | dualkey-s3) CMD=("$DUALKEY" backup --repo "$2" "$3") ;;
	restic | restic-s3) CMD=("$RESTIC" -r "$2" backup --host bench "$3") ;;
	borg) CMD=("$BORG" create --compression "zstd,3" "$2::b$4" "$3") ;;
	esac
}
restore_cmd() { # TOOL REPO TARGET
	RUN_IN=
	case $1 in
	dualkey | dualkey-s3) CMD=("$DUALKEY" restore --repo "$2" latest --target "$3") ;;
	restic | restic-s3) CMD=("$RESTIC" -r "$2" restore latest --target "$3") ;;
	# borg extracts into the current directory: the timed step runs in TARGET.
	borg) CMD=("$BORG" extract "$2::b3") RUN_IN=$3 ;;
	esac
}
tool_version() {
	case $1 in
	dualkey | dualkey-s3) "$DUALKEY" version 2>/dev/null | head -n 1 || "$DUALKEY" --version 2>/dev/null | head -n 1 || echo "dualkey (no version command)" ;;
	restic | restic-s3) "$RESTIC" version ;;
	borg) "$BORG" --version ;;
	esac
}
tool_present() {
	case $1 in
	dualkey | dualkey-s3) [[ -x $DUALKEY ]] ;;
	restic | restic-s3) [[ -x $RESTIC ]] ;;
	borg) [[ -x $BORG ]] ;;
	*) die "unknown tool $1 (dualkey, restic, borg, dualkey-s3, restic-s3)" ;;
	esac
}

# timed NAME CMD... runs CMD under time -v after dropping caches, logs its
# output to $RUN/NAME.log and sets WALL (s), CPU (%), RSS (MiB).
timed() {
	local name=$1
	shift
	drop_caches
	if ! (cd "${RUN_IN:-.}" && exec "$TIME" -v -o "$RUN/$name.time" "$@" >"$RUN/$name.log" 2>&1); then
		tail -n 20 "$RUN/$name.log" >&2
		die "$name failed: $*"
	fi
	WALL=$(awk -F': ' '/Elapsed \(wall clock\)/ {
		n = split($2, p, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$RUN/$name.time")
	CPU=$(awk -F': ' '/Percent of CPU/ { sub("%", "", $2); print $2 }' "$RUN/$name.time")
	RSS=$(awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$RUN/$name.time")
}

# Sum of file sizes (apparent), so directory entries and block rounding do not count.
bytes() { { find "$@" -type f -printf '%s\n' 2>/dev/null || true; } | awk '{ s += $1 } END { printf "%d\n", s }'; }
# repo_bytes: the repository's size; for a bucket, what the server keeps for
# it (objects, old versions, metadata).
repo_bytes() {
	if [[ -n ${bucket:-} ]]; then
		bytes "$S3_DIR/data/$bucket" "$S3_DIR/versions/$bucket" "$S3_DIR/meta/$bucket"
	else
		bytes "$repo"
	fi
}
# note_cmd LABEL records CMD with this run's paths replaced by placeholders.
note_cmd() {
	local line="${CMD[*]}"
	line=${line//$repo/REPO}
	line=${line//$live/DATA}
	line=${line//$target/TARGET}
	[[ -z ${RUN_IN:-} ]] || line="cd TARGET && $line"
	COMMANDS+=("$1: $line")
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", b / 1048576 / s; else print "-" }'; }

# Restic keeps the absolute path under the target, borg the path without its
# leading slash; accept either, or a bare basename.
find_restored() { # TARGET LIVE
	local t=$1 live=$2
	for c in "$t$live" "$t/${live#/}" "$t/$(basename "$live")"; do
		if [[ -d $c ]]; then
			echo "$c"
			return
		fi
	done
	return 1
}

# --- the measurements -----------------------------------------------------------------------------
ROWS=()
COMMANDS=()
for tool in $TOOLS; do
	if ! tool_present "$tool"; then
		say "skipping $tool: not installed (dualkey: make build; restic/borg: scripts/setup.sh bench)"
		ROWS+=("| $tool | (all) | not installed | | | | | | | | |")
		continue
	fi
	"${tool}_env" "$tool"
	for set in $SETS; do
		repo=$WORK/repos/$tool-$set
		bucket=
		live=$WORK/live/$set
		target=$WORK/restore/$tool-$set
		say "$tool / $set"
		rm -rf "$repo" "$live" "$target" "$RUN/cache-restic-$tool" "$RUN/borg-home-$tool"
		if [[ $tool == *-s3 ]]; then
			bucket=$tool-$set-$(date +%s)
			make_bucket "$bucket"
			case $tool in
			dualkey-s3) repo=s3:http://$S3_ADDR/$bucket/vault ;;
			restic-s3) repo=s3:http://$S3_ADDR/$bucket/restic ;;
			esac
		fi
		cp -a "$WORK/base/$set" "$live"
		src_bytes=$(bytes "$live")

		init_cmd "$tool" "$repo"
		"${CMD[@]}" >"$RUN/$tool-$set-init.log" 2>&1 || {
			cat "$RUN/$tool-$set-init.log" >&2
			die "$tool init failed"
		}
		note_cmd "$tool init"
		r0=$(repo_bytes)

		RUN_IN=
		backup_cmd "$tool" "$repo" "$live" 1
		note_cmd "$tool backup"
		timed "$tool-$set-backup1" "${CMD[@]}"
		b1=("$WALL" "$CPU" "$RSS")
		r1=$(repo_bytes)

		rsync -a --inplace --delete --checksum "$WORK/changed/$set/" "$live/"
		src2_bytes=$(bytes "$live")
		backup_cmd "$tool" "$repo" "$live" 2
		timed "$tool-$set-backup2" "${CMD[@]}"
		b2=("$WALL" "$CPU" "$RSS")
		r2=$(repo_bytes)

		backup_cmd "$tool" "$repo" "$live" 3
		timed "$tool-$set-backup3" "${CMD[@]}"
		b3=("$WALL" "$CPU" "$RSS")
		r3=$(repo_bytes)

		mkdir -p "$target"
		restore_cmd "$tool" "$repo" "$target"
		note_cmd "$tool restore"
		timed "$tool-$set-restore" "${CMD[@]}"
		rs=("$WALL" "$CPU" "$RSS")
		check="ok"
		if ! restored=$(find_restored "$target" "$live"); then
			check="NOT FOUND"
		elif ! diff -r --no-dereference -q "$live" "$restored" >"$RUN/$tool-$set-diff.log" 2>&1; then
			check="DIFFERS ($(wc -l <"$RUN/$tool-$set-diff.log") entries)"
		fi
		rm -rf "$target" "$live"
		RUN_IN=
		[[ ${BENCH_KEEP_REPOS:-} == 1 || -n $bucket ]] || rm -rf "$repo"

		ROWS+=("$(printf '| %s | %s | %s | %s s (%s%%, %s MiB/s, %s MiB) | %s s (%s%%) | %s | %s s | %s | %s s (%s%%, %s MiB/s, %s MiB) | %s | %s |' \
			"$tool" "$set" "$(mib "$src_bytes")" \
			"${b1[0]}" "${b1[1]}" "$(rate "$src_bytes" "${b1[0]}")" "${b1[2]}" \
			"${b2[0]}" "${b2[1]}" "$(mib $((r2 - r1)))" \
			"${b3[0]}" "$(mib $((r3 - r2)))" \
			"${rs[0]}" "${rs[1]}" "$(rate "$src2_bytes" "${rs[0]}")" "${rs[2]}" \
			"$(mib "$r3")" "$check")")
		say "$tool / $set: first ${b1[0]}s, second ${b2[0]}s (+$(mib $((r2 - r1))) MiB), unchanged ${b3[0]}s, restore ${rs[0]}s, repo $(mib "$r3") MiB (init $r0 B), restore $check"
	done
done

# --- report ---------------------------------------------------------------------------------------
report() {
	echo "## Vault benchmark, $(date -u '+%Y-%m-%d %H:%M UTC') (scale: $(cat "$WORK/scale" 2>/dev/null || echo '?'))"
	echo
	echo "Machine: $(lscpu | awk -F': +' '/^Model name/ {print $2; exit}'), $(nproc) cores," \
		"$(free -g | awk '/^Mem:/ {print $2}') GiB RAM, kernel $(uname -r)," \
		"work dir $WORK on $(findmnt -no FSTYPE -T "$WORK" 2>/dev/null || echo '?'). $CACHE_NOTE."
	echo
	echo "Load average (1, 5, 15 min) at start: $LOAD_START; at end: $(cut -d' ' -f1-3 /proc/loadavg). Anything above ~0.2 means other work shared the cores."
	echo
	echo "Versions:"
	for tool in $TOOLS; do tool_present "$tool" && echo "- $(tool_version "$tool")"; done
	echo "- data (MiB): $(for s in $SETS; do printf '%s %s, ' "$s" "$(mib "$(bytes "$WORK/base/$s")")"; done | sed 's/, $//')"
	echo
	echo "| tool | data | size MiB | 1st backup (CPU, rate, max RSS) | 2nd backup, ~5% changed (CPU) | 2nd adds MiB | 3rd, unchanged | 3rd adds MiB | restore (CPU, rate, max RSS) | repo MiB | restore check |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|"
	printf '%s\n' "${ROWS[@]}"
	echo
	if s3_wanted; then
		echo "S3: versitygw $(go version -m "$VERSITYGW" 2>/dev/null | awk '$1 == "mod" {print $3; exit}') (POSIX backend, versioning, Object Lock) on $S3_ADDR," \
			"same machine; one bucket per tool and data set; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
		echo
	fi
	echo "Commands (paths as run; passwords from a file via RESTIC_PASSWORD_FILE, BORG_PASSCOMMAND, DUALKEY_PASSWORD_FILE):"
	echo
	echo '```'
	printf '%s\n' "${COMMANDS[@]}" | awk '!seen[$0]++'
	echo '```'
	echo
}
report | tee -a "$RESULTS"
say "appended to ${RESULTS#"$ROOT"/}"
