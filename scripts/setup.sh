#!/usr/bin/env bash
# setup.sh installs what Dualkey needs, and only what is missing.
#
#   scripts/setup.sh          what `make run` and `make test` need
#   scripts/setup.sh bench    that, plus the peers `make bench` compares against
#
# Run as root on Debian 12 (or with sudo available). Idempotent: a second run
# checks a few files and exits in well under a second. It prints one line per
# thing it installs and one summary line.
set -euo pipefail

STATICCHECK_VERSION=v0.8.2 # staticcheck 2026.2.2; builds and runs with Go 1.26
RESTIC_VERSION=v0.18.1     # the bar named in issue 3; Debian's 0.14 is too old
VERSITYGW_VERSION=v1.8.0   # the S3 server internal/s3test starts: versioning and COMPLIANCE Object Lock

mode=${1:-base}
case $mode in
base | bench) ;;
-h | --help)
	sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*)
	echo "usage: $0 [bench]" >&2
	exit 2
	;;
esac

cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
installed=0

# quiet CMD... runs CMD with its chatter sent to a log, shown only on failure.
log=$(mktemp -t dualkey-setup.XXXXXX)
trap 'rm -f "$log"' EXIT
quiet() {
	if ! "$@" >"$log" 2>&1; then
		cat "$log" >&2
		say "error: failed: $*" >&2
		exit 1
	fi
}

# --- Go -----------------------------------------------------------------------
if ! command -v go >/dev/null 2>&1; then
	export PATH=/usr/local/go/bin:$PATH
fi
if ! command -v go >/dev/null 2>&1; then
	say "error: go not found; install Go 1.26 into /usr/local/go first" >&2
	exit 1
fi
GOBIN=$(go env GOPATH)/bin
export PATH=$GOBIN:$PATH

# --- Debian packages ------------------------------------------------------------
# Contrib modules and pgbench ship inside postgresql-15 in bookworm;
# postgresql-contrib is the metapackage (there is no postgresql-contrib-15).
base_pkgs=(
	postgresql-15 postgresql-client-15 postgresql-contrib # internal/pgtest starts real servers
	gcc libc6-dev                                         # cgo: go test -race, pg_query later
	git make ca-certificates diffutils util-linux procps  # make, demo (diff -r), runuser
	python3-psycopg2 libpostgresql-jdbc-java              # internal/gate: real clients through the gate
	default-jdk-headless nodejs npm                       # javac for the JDBC client; npm ci of node-postgres
)
bench_pkgs=(borgbackup pgbackrest pgbouncer time rsync) # peers; time -v and rsync for bench/

want_pkgs=("${base_pkgs[@]}")
if [[ $mode == bench ]]; then
	want_pkgs+=("${bench_pkgs[@]}")
fi

# PostgreSQL counts as present when its binaries are, whoever put them there;
# that keeps the check to a stat() on machines that built it themselves.
pg_present() {
	[[ -x /usr/lib/postgresql/15/bin/initdb && -x /usr/lib/postgresql/15/bin/postgres &&
		-x /usr/lib/postgresql/15/bin/pgbench ]]
}

missing=()
# One dpkg-query for all packages: "name status" per known package.
declare -A status=()
while read -r name st; do
	status[$name]=$st
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${want_pkgs[@]}" 2>/dev/null || true)
for p in "${want_pkgs[@]}"; do
	case $p in
	postgresql-15 | postgresql-contrib)
		if pg_present; then continue; fi
		;;
	postgresql-client-15)
		if pg_present && [[ -x /usr/lib/postgresql/15/bin/psql ]]; then continue; fi
		;;
	# Any JDK, and Node.js from elsewhere (NodeSource's nodejs bundles npm and
	# conflicts with Debian's npm), count as present when their commands are.
	default-jdk-headless)
		if command -v javac >/dev/null && command -v java >/dev/null; then continue; fi
		;;
	nodejs | npm)
		if command -v "${p/nodejs/node}" >/dev/null; then continue; fi
		;;
	esac
	if [[ ${status[$p]:-} != installed ]]; then
		missing+=("$p")
	fi
done

if ((${#missing[@]})); then
	sudo=()
	if ((EUID != 0)); then
		if command -v sudo >/dev/null 2>&1; then
			sudo=(sudo)
		else
			say "error: need root to install: ${missing[*]}" >&2
			exit 1
		fi
	fi
	# Unrelated third-party sources may be unreachable; that must not stop us.
	"${sudo[@]}" apt-get update -qq >/dev/null 2>&1 || say "warning: apt-get update reported errors; trying the install anyway"
	quiet "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
	for p in "${missing[@]}"; do
		say "installed Debian package $p ($(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '?'))"
		installed=$((installed + 1))
	done
fi

# --- Go tools ----------------------------------------------------------------------
# go_tool NAME PACKAGE VERSION VERSION_ARGS MATCH
go_tool() {
	local name=$1 pkg=$2 version=$3 match=$5
	local args
	read -r -a args <<<"$4"
	if [[ -x $GOBIN/$name ]] && "$GOBIN/$name" "${args[@]}" 2>/dev/null | grep -qF -- "$match"; then
		return
	fi
	quiet go install "$pkg@$version"
	say "installed $name $version into $GOBIN"
	installed=$((installed + 1))
}

go_tool staticcheck honnef.co/go/tools/cmd/staticcheck "$STATICCHECK_VERSION" "-version" "(${STATICCHECK_VERSION#v})"
# versitygw prints no version of its own when built by go install; the
# module version recorded in the binary says which it is.
if ! { [[ -x $GOBIN/versitygw ]] &&
	go version -m "$GOBIN/versitygw" 2>/dev/null | grep -q "^[[:space:]]*mod[[:space:]]*github.com/versity/versitygw[[:space:]]*$VERSITYGW_VERSION[[:space:]]"; }; then
	quiet go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
	say "installed versitygw $VERSITYGW_VERSION into $GOBIN"
	installed=$((installed + 1))
fi
if [[ $mode == bench ]]; then
	go_tool restic github.com/restic/restic/cmd/restic "$RESTIC_VERSION" "version" "restic ${RESTIC_VERSION#v}"
fi

# --- Go modules ----------------------------------------------------------------------
# Offline check first: it costs milliseconds when the module cache is complete.
if [[ -f go.mod ]] && ! GOFLAGS=-mod=mod GOPROXY=off go mod download >/dev/null 2>&1; then
	quiet go mod download
	say "downloaded Go modules for $(go list -m 2>/dev/null || echo this module)"
	installed=$((installed + 1))
fi

if ((installed == 0)); then
	say "ok: everything for '$mode' already present"
else
	say "ok: installed $installed item(s) for '$mode'"
fi
