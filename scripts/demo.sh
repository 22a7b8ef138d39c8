#!/usr/bin/env bash
# demo.sh is what `make run` does until `dualkey run` is the whole system:
# a vault round trip under ./dualkey-data, printed step by step.
#
#   1. create ./dualkey-data/password (once) and a sample tree (once)
#   2. initialise the vault ./dualkey-data/vault (once)
#   3. back up the sample, list snapshots, change a file, back up again
#   4. restore the latest snapshot into ./dualkey-data/restore-<time>
#   5. compare it with the sample (content with diff -r; type, mode, owner,
#      size, mtime, symlink targets and hard links with find), then run
#      dualkey verify --read-data
#
# Safe to run again: it reuses the password, sample and vault, and each run
# adds two snapshots and one restore directory. `make clean` removes it all.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${DUALKEY_BIN:-$ROOT/bin/dualkey}
DATA=${DUALKEY_DEMO_DIR:-$ROOT/dualkey-data}
REPO=$DATA/vault
SAMPLE=$DATA/sample

say() { echo "demo: $*"; }
run() {
	echo "demo: \$ ${*/#$ROOT\//}"
	"$@"
}
die() {
	echo "demo: FAILED: $*" >&2
	exit 1
}
bytes() { du -sb "$1" | cut -f1; }

[[ -x $BIN ]] || die "$BIN not found; run 'make build' first"
mkdir -p "$DATA"

# --- password --------------------------------------------------------------------
if [[ ! -s $DATA/password ]]; then
	(
		umask 077
		head -c 24 /dev/urandom | base64 >"$DATA/password"
	)
	say "generated a password in ${DATA#"$ROOT"/}/password (mode 0600)"
fi
export DUALKEY_PASSWORD_FILE=$DATA/password
unset DUALKEY_PASSWORD DUALKEY_REPO

# --- sample tree ---------------------------------------------------------------------
if [[ ! -d $SAMPLE ]]; then
	tmp=$SAMPLE.tmp
	rm -rf "$tmp"
	mkdir -p "$tmp/docs/nested/deeper" "$tmp/empty-dir" "$tmp/bin"
	printf 'Dualkey demo sample.\n' >"$tmp/README.txt"
	printf 'notes, changed by every demo run:\n' >"$tmp/notes.txt"
	for i in 1 2 3 4 5; do
		seq "$i" 1000 | sed "s/^/line /" >"$tmp/docs/file-$i.txt"
	done
	printf 'deep\n' >"$tmp/docs/nested/deeper/leaf.txt"
	printf '#!/bin/sh\necho hello\n' >"$tmp/bin/hello.sh"
	chmod 0755 "$tmp/bin/hello.sh"
	chmod 0600 "$tmp/docs/file-5.txt"
	: >"$tmp/empty-file"
	ln -s docs/file-1.txt "$tmp/link-to-file-1"
	ln -s does/not/exist "$tmp/dangling-link"
	ln "$tmp/docs/file-2.txt" "$tmp/hardlink-to-file-2"
	head -c $((24 << 20)) /dev/urandom >"$tmp/large-random.bin"
	# Half data, half hole: restores must keep the bytes, ideally the hole too.
	head -c $((4 << 20)) /dev/urandom >"$tmp/sparse.bin"
	truncate -s $((12 << 20)) "$tmp/sparse.bin"
	touch -d '2001-02-03 04:05:06' "$tmp/docs/file-3.txt"
	mv "$tmp" "$SAMPLE"
	say "created sample tree ${SAMPLE#"$ROOT"/}: $(find "$SAMPLE" | wc -l) entries, $(bytes "$SAMPLE") bytes on disk" \
		"(files, an executable, a 0600 file, an empty file, an empty dir, a symlink, a dangling symlink, a hard link, 24 MiB random, a sparse file)"
fi

# --- vault -------------------------------------------------------------------------------
if [[ -d $REPO && -n $(ls -A "$REPO" 2>/dev/null) ]]; then
	say "vault ${REPO#"$ROOT"/} already initialised; reusing it"
else
	run "$BIN" vault init --repo "$REPO"
	say "initialised vault ${REPO#"$ROOT"/}"
fi

# --- backups ---------------------------------------------------------------------------------
before=$(bytes "$REPO")
start=$(date +%s.%N)
run "$BIN" backup --repo "$REPO" --tag demo "$SAMPLE"
after1=$(bytes "$REPO")
say "backup 1 took $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.2f", e-s}')s; vault grew by $((after1 - before)) bytes to $after1"

run "$BIN" snapshots --repo "$REPO"

stamp=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
printf 'changed at %s\n' "$stamp" >>"$SAMPLE/notes.txt"
say "changed ${SAMPLE#"$ROOT"/}/notes.txt (appended one line)"

start=$(date +%s.%N)
run "$BIN" backup --repo "$REPO" --tag demo "$SAMPLE"
after2=$(bytes "$REPO")
say "backup 2 took $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.2f", e-s}')s; vault grew by $((after2 - after1)) bytes" \
	"($(awk -v a="$after1" -v b="$after2" 'BEGIN{printf "%.3f", (b-a)*100/a}')% of the vault)"

run "$BIN" snapshots --repo "$REPO"
# Read all of ls before cutting it short: a closed pipe is not the CLI's fault.
echo "demo: \$ ${BIN#"$ROOT"/} ls --repo ${REPO#"$ROOT"/} latest"
listing=$("$BIN" ls --repo "$REPO" latest)
head -n 12 <<<"$listing"
say "(ls printed $(wc -l <<<"$listing") lines; first 12 shown)"

# --- restore ------------------------------------------------------------------------------------
target=$DATA/restore-$(date +%Y%m%d-%H%M%S)
while [[ -e $target ]]; do target=$target-x; done
start=$(date +%s.%N)
run "$BIN" restore --repo "$REPO" latest --target "$target"
say "restore took $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.2f", e-s}')s"

# Restic keeps the absolute path under the target; accept that or a bare basename.
if [[ -d $target$SAMPLE ]]; then
	restored=$target$SAMPLE
elif [[ -d $target/$(basename "$SAMPLE") ]]; then
	restored=$target/$(basename "$SAMPLE")
else
	die "cannot find the restored sample under ${target#"$ROOT"/}"
fi
say "restored tree is ${restored#"$ROOT"/}"

# --- compare ------------------------------------------------------------------------------------
run diff -r --no-dereference "$SAMPLE" "$restored" || die "restored content differs"
say "content identical (diff -r)"

# type, mode, owner, size, mtime (s), symlink target, and hard-link group
# (the first path sharing an inode) for every entry, directories included.
meta() {
	(
		cd "$1"
		# A directory's size is the file system's business, not the backup's.
		find . -mindepth 1 -printf '%i\t%P\t%y\t%m %u:%g\t%s\t%Ts\t%l\n' | sort -t$'\t' -k2,2 |
			awk -F'\t' '{
				if (!($1 in first)) first[$1] = $2
				size = ($3 == "d") ? "-" : $5
				printf "%s\ttype=%s mode,owner=%s size=%s mtime=%s target=%s linkgroup=%s\n", $2, $3, $4, size, $6, $7, first[$1]
			}'
	)
}
if ! diff <(meta "$SAMPLE") <(meta "$restored") >"$DATA/meta.diff"; then
	sed 's/^/demo:   /' "$DATA/meta.diff" >&2
	die "restored metadata differs (lines above: < sample, > restore)"
fi
rm -f "$DATA/meta.diff"
say "metadata identical: $(meta "$SAMPLE" | wc -l) entries (type, mode, owner, size, mtime, symlink targets, hard links)"

run "$BIN" verify --repo "$REPO" --read-data
say "all good: vault ${REPO#"$ROOT"/} ($(bytes "$REPO") bytes), latest restore in ${target#"$ROOT"/}"
