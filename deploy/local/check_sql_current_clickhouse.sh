#!/usr/bin/env bash
# Check that the migrations (aggregator/migrations/*.sql) and every view run, with exact expected
# values, on current ClickHouse: chdb (PyPI) embeds ClickHouse 26.x in-process, in a throw-away dir.
#
#   deploy/local/check_sql_current_clickhouse.sh                 chdb only
#   deploy/local/check_sql_current_clickhouse.sh --http URL      also the server at URL (e.g. the
#       ClickHouse 18.16 of 'services.sh up', http://127.0.0.1:8123), in a fresh database
#       agentmeter_sqlcheck_<pid> dropped at the end; both must give byte-identical results.
#
# chdb runs twice: once with the process time zone UTC and once far from UTC (Pacific/Kiritimati,
# UTC+14): days and months of DateTime('UTC') columns must not depend on the server's zone.
# docs/sql.md's example queries run too. The venv ($AGENTMETER_CACHE/venv-chdb, about 0.9 GB) is
# created once and reused; a run after that takes a few seconds.
#
# Environment (defaults in brackets):
#   AGENTMETER_CACHE   [$HOME/.cache/agentmeter]   holds venv-chdb
#   PYTHON             [python3]                   interpreter the venv is made from
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
AGENTMETER_CACHE="${AGENTMETER_CACHE:-$HOME/.cache/agentmeter}"
VENV="$AGENTMETER_CACHE/venv-chdb"
PYTHON="${PYTHON:-python3}"
# chdb 4.4.0 is the Python API; chdb-core 26.9.0 is the ClickHouse engine it loads (26.9.2.1).
CHDB_VERSION="4.4.0"
CHDB_CORE_VERSION="26.9.0"
CHECK="$SCRIPT_DIR/check_sql_current_clickhouse.py"
MIGRATIONS="$REPO_ROOT/aggregator/migrations"
DOCS="$REPO_ROOT/docs/sql.md"

say() { printf '[sqlcheck.sh] %s\n' "$*"; }
die() { printf '[sqlcheck.sh] ERROR: %s\n' "$*" >&2; exit 1; }

HTTP_URL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --http) [ $# -ge 2 ] || die "--http needs a URL"; HTTP_URL="$2"; shift 2 ;;
        --http=*) HTTP_URL="${1#--http=}"; shift ;;
        -h | --help) sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

venv_ready() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$CHDB_VERSION" "$CHDB_CORE_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(0 if (version("chdb"), version("chdb-core")) == (sys.argv[1], sys.argv[2]) else 1)
EOF
}

ensure_venv() {
    mkdir -p "$AGENTMETER_CACHE"
    exec 8>"$AGENTMETER_CACHE/venv-chdb.lock"
    if ! flock -n 8; then
        say "another run is preparing $VENV; waiting for it"
        flock 8
    fi
    if venv_ready; then
        say "reusing $VENV (chdb $CHDB_VERSION, chdb-core $CHDB_CORE_VERSION)"
        return
    fi
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "python venv support missing: apt-get install -y python3-venv"
            DEBIAN_FRONTEND=noninteractive apt-get update -q
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        else
            die "$PYTHON cannot create venvs: install python3-venv (or run deploy/local/services.sh install)"
        fi
    fi
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "removing broken venv $VENV"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating venv $VENV with $("$PYTHON" --version 2>&1)"
        "$PYTHON" -m venv "$VENV"
    fi
    say "installing chdb==$CHDB_VERSION chdb-core==$CHDB_CORE_VERSION into $VENV (wheel of about 180 MB, first time only)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        "chdb==$CHDB_VERSION" "chdb-core==$CHDB_CORE_VERSION"
    venv_ready || die "chdb $CHDB_VERSION / chdb-core $CHDB_CORE_VERSION still not importable from $VENV"
    say "venv ready"
}

ensure_venv

# Kept on failure, for the diff; removed when everything passed.
DUMPS="$(mktemp -d "${TMPDIR:-/tmp}/agentmeter-sqlcheck.XXXXXX")"
DOCS_ARGS=()
if [ -f "$DOCS" ]; then DOCS_ARGS=(--docs "$DOCS"); else say "note: $DOCS missing, its examples are not run"; fi

say "chdb, process time zone UTC"
TZ=UTC "$VENV/bin/python" "$CHECK" --migrations "$MIGRATIONS" "${DOCS_ARGS[@]}" --dump "$DUMPS/chdb-utc.json"
say "chdb, process time zone Pacific/Kiritimati (UTC+14)"
TZ=Pacific/Kiritimati "$VENV/bin/python" "$CHECK" --migrations "$MIGRATIONS" "${DOCS_ARGS[@]}" --dump "$DUMPS/chdb-kiritimati.json"
cmp -s "$DUMPS/chdb-utc.json" "$DUMPS/chdb-kiritimati.json" \
    || die "chdb results depend on the process time zone: diff $DUMPS/chdb-utc.json $DUMPS/chdb-kiritimati.json"

if [ -n "$HTTP_URL" ]; then
    say "ClickHouse server at $HTTP_URL"
    "$VENV/bin/python" "$CHECK" --migrations "$MIGRATIONS" "${DOCS_ARGS[@]}" --http "$HTTP_URL" --dump "$DUMPS/http.json"
    if ! cmp -s "$DUMPS/chdb-utc.json" "$DUMPS/http.json"; then
        diff -u "$DUMPS/chdb-utc.json" "$DUMPS/http.json" | head -n 60 >&2 || true
        die "chdb and $HTTP_URL give different view results (above)"
    fi
    say "chdb and $HTTP_URL give identical results"
fi
rm -rf "$DUMPS"
say "all checks passed"
