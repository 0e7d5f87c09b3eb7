#!/usr/bin/env bash
# Local services for agentmeter without Docker: ClickHouse (Debian's clickhouse-server 18.16)
# and a Kafka-compatible broker (tansu 0.6.0, built from crates.io and cached outside the repo).
#
#   deploy/local/services.sh install   install missing apt packages (promtool among them), the Python venvs of the
#                                      deployment checks (kubernetes-validate, docker-compose 1.x) and build tansu (idempotent)
#   deploy/local/services.sh up        start ClickHouse and tansu unless already answering
#   deploy/local/services.sh down      stop both (TERM, then KILL), by PID file
#   deploy/local/services.sh status    print whether each answers (exit 0 only if both answer)
#   deploy/local/services.sh reset     down, then delete the data of both
#
# Environment (defaults in brackets):
#   AGENTMETER_CACHE                 [$HOME/.cache/agentmeter]  tansu binary, build log, install lock
#   AGENTMETER_STATE                 [<repo>/.local]            data, logs, configs, PID files
#   AGENTMETER_KAFKA_PORT            [9092]   tansu listener on 127.0.0.1
#   AGENTMETER_CLICKHOUSE_HTTP_PORT  [8123]   ClickHouse HTTP on 127.0.0.1
#   AGENTMETER_CLICKHOUSE_TCP_PORT   [9000]   ClickHouse native protocol on 127.0.0.1
#   AGENTMETER_BROKER_STORAGE        [sqlite] sqlite (durable, $AGENTMETER_STATE/tansu/tansu.db) or memory
#   AGENTMETER_UP_TIMEOUT            [60]     seconds to wait for each service to answer
#   PYTHON                           [python3] interpreter the check venvs are made from
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

AGENTMETER_CACHE="${AGENTMETER_CACHE:-$HOME/.cache/agentmeter}"
AGENTMETER_STATE="${AGENTMETER_STATE:-$REPO_ROOT/.local}"
KAFKA_PORT="${AGENTMETER_KAFKA_PORT:-9092}"
CH_HTTP_PORT="${AGENTMETER_CLICKHOUSE_HTTP_PORT:-8123}"
CH_TCP_PORT="${AGENTMETER_CLICKHOUSE_TCP_PORT:-9000}"
BROKER_STORAGE="${AGENTMETER_BROKER_STORAGE:-sqlite}"
UP_TIMEOUT="${AGENTMETER_UP_TIMEOUT:-60}"

APT_PACKAGES=(clickhouse-server clickhouse-client cmake libcurl4-openssl-dev protobuf-compiler python3-venv)
# Installed without their recommends: prometheus's would bring and start a node exporter on
# :9100 (only its promtool is used, deploy/prometheus/check.sh); zookeeper serves the local
# ClickHouse cluster of deploy/local/cluster.sh (cluster mode, ADR 0006); chromium and
# chromium-driver run the console's browser tests (tests/console_browser.rs).
APT_PACKAGES_NO_RECOMMENDS=(prometheus zookeeper chromium chromium-driver)
TANSU_VERSION="0.6.0"
TANSU_CRATE_SHA256="4fdd85473ec265140488cf8d55e82b844f5c051c8916fabdd4a71156ac053f6d"
TANSU_STORAGE_CRATE_SHA256="720d2ed8e6010c70f7f06e5af5a7274ebbf6e42fdcd9e46de542b10dc4d2f35d"
# What our build changes in the crates.io sources (see install_tansu), one name per fix; written
# to $TANSU_ROOT/FIXES. TANSU_BUILD names the set and is part of the cache path, so a binary
# built without a fix is never reused.
TANSU_FIXES=(topic-delete-by-id query-one-no-row-is-an-error unknown-topic-fetch-without-leader idempotent-epoch-bump)
TANSU_BUILD="fixed-4"
TANSU_ROOT="$AGENTMETER_CACHE/tansu-$TANSU_VERSION-$TANSU_BUILD"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
TANSU_LOG="$AGENTMETER_CACHE/logs/tansu.log"
PYTHON="${PYTHON:-python3}"
CLICKHOUSE_SERVER="$(command -v clickhouse-server || echo /usr/sbin/clickhouse-server)"
CLICKHOUSE_USER="clickhouse"

CH_DIR="$AGENTMETER_STATE/clickhouse"
CH_CONFIG="$CH_DIR/config.xml"
CH_PID="$CH_DIR/clickhouse.pid"
CH_LOG="$CH_DIR/log/clickhouse-server.log"
CH_ERRLOG="$CH_DIR/log/clickhouse-server.err.log"
CH_STDERR="$CH_DIR/log/stderr.log"      # written by clickhouse-server --daemon itself
CH_LAUNCH="$CH_DIR/log/launch.log"      # output of the launching command
TS_DIR="$AGENTMETER_STATE/tansu"
TS_PID="$TS_DIR/tansu.pid"
TS_LOG="$TS_DIR/tansu.log"
TS_ENGINE_FILE="$TS_DIR/engine"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
say() { printf '[services] %s\n' "$*"; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) for: $*"; fi
}

# ---------------------------------------------------------------- probes

clickhouse_answers() {
    [ "$(curl -sf --max-time 2 "http://127.0.0.1:$CH_HTTP_PORT/ping" 2>/dev/null)" = "Ok." ]
}

clickhouse_version() {
    curl -sf --max-time 5 "http://127.0.0.1:$CH_HTTP_PORT/" --data-binary 'SELECT version()' 2>/dev/null
}

tcp_answers() { # port
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

tansu_answers() { tcp_answers "$KAFKA_PORT"; }

# tansu 0.6.0 keeps its TCP listener open after its storage task panicked (e.g. "more or less than
# one row" on an idempotent produce it cannot match), but then fails every request. Detect that
# from its log since the last start by this script.
tansu_storage_panicked() {
    [ -s "$TS_LOG" ] || return 1
    awk '/^--- .* services.sh up:/ { panicked = 0 } /panicked at .*tansu-storage/ { panicked = 1 }
         END { exit !panicked }' "$TS_LOG"
}

# pid from a PID file if that process is alive and its command line contains $2
live_pid() { # pidfile pattern
    local pid
    [ -s "$1" ] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$2" || return 1
    echo "$pid"
}

tail_log() { # file...
    local f
    for f in "$@"; do
        if [ -s "$f" ]; then
            printf '[services] --- last lines of %s ---\n' "$f" >&2
            tail -n 30 "$f" >&2
        fi
    done
}

# ---------------------------------------------------------------- install

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}" "${APT_PACKAGES_NO_RECOMMENDS[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        say "apt packages already installed: ${APT_PACKAGES[*]} ${APT_PACKAGES_NO_RECOMMENDS[*]}"
        return
    fi
    say "apt packages missing: ${missing[*]}; running apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    say "apt-get install -y ${APT_PACKAGES[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT_PACKAGES[@]}"
    say "apt-get install -y --no-install-recommends ${APT_PACKAGES_NO_RECOMMENDS[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${APT_PACKAGES_NO_RECOMMENDS[@]}"
}

# The Python venvs of the deployment checks, each made from its pinned requirements file in the
# repository (and, for packages without a wheel for this Python, a file of build requirements
# installed first and used without build isolation). A venv holds copies of the files it was
# made from; it is reused while they are unchanged and remade otherwise, so this is cached and
# idempotent. The check scripts refuse a venv whose copies differ from the repository's files.
#   venv-kubernetes-validate  deploy/kubernetes/requirements.txt               deploy/kubernetes/check.sh
#   venv-docker-compose       deploy/docker/requirements{-build,}.txt          deploy/docker/check.sh
ensure_check_venv() { # name requirements [build-requirements]
    local name="$1" requirements="$2" build="${3:-}" venv
    venv="$AGENTMETER_CACHE/$1"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys' >/dev/null 2>&1 \
        && cmp -s "$requirements" "$venv/.agentmeter-requirements" \
        && { [ -z "$build" ] || cmp -s "$build" "$venv/.agentmeter-requirements-build"; }; then
        say "venv $name up to date: $venv"
        return
    fi
    "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 \
        || die "$PYTHON cannot create venvs (Debian: python3-venv, installed above for the system python3)"
    say "creating venv $name with $("$PYTHON" --version 2>&1) from ${requirements#"$REPO_ROOT"/}"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv" || die "$PYTHON -m venv $venv failed"
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
    if [ -n "$build" ]; then
        "${pip[@]}" -r "$build" || die "pip install -r $build into $venv failed"
        "${pip[@]}" --no-build-isolation -r "$requirements" || die "pip install -r $requirements into $venv failed"
        cp "$build" "$venv/.agentmeter-requirements-build"
    else
        "${pip[@]}" -r "$requirements" || die "pip install -r $requirements into $venv failed"
    fi
    # Written last: a venv interrupted before this point is remade on the next install.
    cp "$requirements" "$venv/.agentmeter-requirements"
    say "venv $name ready: $venv"
}

install_check_venvs() {
    ensure_check_venv venv-kubernetes-validate "$REPO_ROOT/deploy/kubernetes/requirements.txt"
    ensure_check_venv venv-docker-compose "$REPO_ROOT/deploy/docker/requirements.txt" \
        "$REPO_ROOT/deploy/docker/requirements-build.txt"
}

# Print a heartbeat every 60 s while process $1 lives; last "Compiling" line of log $2.
heartbeat_until_done() { # pid log what
    local pid="$1" log="$2" what="$3" start now last
    start="$(date +%s)"
    last="$start"
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        now="$(date +%s)"
        if [ $((now - last)) -ge 60 ]; then
            last="$now"
            say "$what: still building after $(((now - start) / 60)) min; last: $(grep -E '^\s*(Compiling|Finished|Installing|Downloaded)' "$log" 2>/dev/null | tail -n 1 | sed 's/^ *//')"
        fi
    done
}

# tansu 0.6.0 (the newest on crates.io) has defects that our own tools run into, and we build
# the broker from the crates.io sources with each fixed by one line (nothing of the broker's
# source lives in this repository): the two .crate files are downloaded and checked against
# pinned SHA-256 sums, the lines are rewritten with sed (each checked before and after), the
# tansu binary crate's lock file points tansu-storage at the fixed copy, and everything else
# builds from its locked versions. The fixes are listed in $TANSU_ROOT/FIXES, which tests and
# tools read before they delete a topic.
#  * topic-delete-by-id: deleting ONE topic deleted EVERY topic of the cluster:
#    src/sql/topic_delete_by.sql selected `topic.cluster IN (the cluster of the named topic)`
#    instead of the topic's own id.
#  * query-one-no-row-is-an-error: src/lite.rs `query_one` panics ("more or less than one row")
#    when a statement finds no row, e.g. a fetch of a partition whose topic was just deleted;
#    the panic kills the storage task and the broker then fails every request while its port
#    stays open. The fix returns libsql's QueryReturnedNoRows error for that request instead.
#  * unknown-topic-fetch-without-leader: src/service/fetch.rs answers a fetch of an unknown
#    (e.g. just deleted) topic with an all-zero topic id *and* a CurrentLeader tag; librdkafka
#    2.12 turns that tag into a leader-discovery metadata update for a topic with neither id nor
#    name and crashes (SIGSEGV in rd_kafka_metadata_cache_find, strcmp of NULL): every consumer
#    of a deleted topic died. The fix sends no CurrentLeader for an unknown topic (none is
#    known), as Kafka does.
#  * idempotent-epoch-bump: when an idempotent producer's messages time out (the broker was down
#    longer than message.timeout.ms), librdkafka bumps the producer epoch on its own, without
#    InitProducerId, and starts every partition again at sequence 0 (KIP-360; Kafka accepts a
#    higher epoch at sequence 0). tansu's src/lite.rs only accepts epochs it handed out, so every
#    produce then failed forever ("QueryReturnedNoRows" at lite.rs:584): ingest answered 503 until
#    restarted. The fix registers the higher epoch (producer_epoch_insert.sql, max + 1, until it
#    is reached) when a batch at sequence 0 carries it.
tansu_crate_url() { echo "https://static.crates.io/crates/$1/$1-$2.crate"; }

fetch_crate() { # name version sha256 destdir
    local name="$1" version="$2" sum="$3" dest="$4" file
    file="$dest/$name-$version.crate"
    if [ ! -s "$file" ] || ! echo "$sum  $file" | sha256sum -c --status; then
        curl -sSfL --retry 3 -o "$file.part" "$(tansu_crate_url "$name" "$version")" \
            || die "could not download $name $version from crates.io"
        mv "$file.part" "$file"
    fi
    echo "$sum  $file" | sha256sum -c --status || die "$file: SHA-256 is not the pinned $sum"
    rm -rf "${dest:?}/$name-$version"
    tar -xzf "$file" -C "$dest"
}

prepare_fixed_tansu_sources() { # srcdir
    local src="$1" sql lock
    mkdir -p "$src"
    fetch_crate tansu "$TANSU_VERSION" "$TANSU_CRATE_SHA256" "$src"
    fetch_crate tansu-storage "$TANSU_VERSION" "$TANSU_STORAGE_CRATE_SHA256" "$src"
    # The storage crate must be the one tansu's own lock file names.
    grep -A3 '^name = "tansu-storage"$' "$src/tansu-$TANSU_VERSION/Cargo.lock" \
        | grep -q "^checksum = \"$TANSU_STORAGE_CRATE_SHA256\"$" \
        || die "tansu $TANSU_VERSION's Cargo.lock does not pin tansu-storage $TANSU_STORAGE_CRATE_SHA256"

    sql="$src/tansu-storage-$TANSU_VERSION/src/sql/topic_delete_by.sql"
    [ "$(grep -c '^where topic.cluster in ($' "$sql")" = 1 ] && [ "$(grep -c '^    select c.id$' "$sql")" = 1 ] \
        || die "$sql is not the statement this fix expects"
    sed -i -e 's/^where topic.cluster in ($/where topic.id in (/' -e 's/^    select c.id$/    select t.id/' "$sql"
    grep -q '^where topic.id in ($' "$sql" && grep -q '^    select t.id$' "$sql" || die "fixing $sql failed"

    local lite="$src/tansu-storage-$TANSU_VERSION/src/lite.rs"
    [ "$(grep -c '^            panic!("more or less than one row");$' "$lite")" = 1 ] \
        || die "$lite is not the code this fix expects"
    sed -i 's/^            panic!("more or less than one row");$/            return Err(libsql::Error::QueryReturnedNoRows);/' "$lite"
    grep -q '^            return Err(libsql::Error::QueryReturnedNoRows);$' "$lite" || die "fixing $lite failed"

    local fetch="$src/tansu-storage-$TANSU_VERSION/src/service/fetch.rs"
    [ "$(grep -c '^                                LeaderIdAndEpoch::default().leader_id(0).leader_epoch(0),$' "$fetch")" = 1 ] \
        || die "$fetch is not the code this fix expects"
    # The three lines `.current_leader(Some(` / `LeaderIdAndEpoch…(0),` / `))` become `.current_leader(None)`.
    sed -i -e '/^                            \.current_leader(Some($/{N;N;s/^\( *\)\.current_leader(Some(\n *LeaderIdAndEpoch::default().leader_id(0).leader_epoch(0),\n *))$/\1.current_leader(None)/}' "$fetch"
    ! grep -q 'leader_id(0).leader_epoch(0)' "$fetch" || die "fixing $fetch failed"

    # idempotent-epoch-bump: `let current_epoch = row … as i16;` becomes `let mut`, followed by one
    # line that registers the producer's higher epochs before the sequence check.
    [ "$(grep -c '^            let current_epoch = row$' "$lite")" = 1 ] \
        && [ "$(grep -c 'idempotent_sequence_check(&current_epoch, &sequence, deflated)' "$lite")" = 1 ] \
        || die "$lite is not the code the epoch fix expects"
    sed -i -e '/^            let current_epoch = row$/,/^                as i16;$/{' \
        -e 's/^            let current_epoch = row$/            let mut current_epoch = row/' \
        -e '/^                as i16;$/a\            while current_epoch < deflated.producer_epoch && deflated.base_sequence == 0 { current_epoch = connection.query_one("producer_epoch_insert.sql", (self.cluster.as_str(), deflated.producer_id)).await?.get::<i32>(0)? as i16; }' \
        -e '}' "$lite"
    grep -q '^            let mut current_epoch = row$' "$lite" \
        && grep -q '^            while current_epoch < deflated.producer_epoch && deflated.base_sequence == 0 {' "$lite" \
        || die "fixing $lite (epoch bump) failed"

    lock="$src/tansu-$TANSU_VERSION/Cargo.lock"
    # A path dependency has no source or checksum in a lock file; with them gone, --locked holds.
    sed -i '/^name = "tansu-storage"$/,/^$/{/^source = /d;/^checksum = /d}' "$lock"
    printf '\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' "$TANSU_VERSION" \
        >>"$src/tansu-$TANSU_VERSION/Cargo.toml"
}

install_tansu() {
    if [ -x "$TANSU_BIN" ] && [ "$(cat "$TANSU_ROOT/FIXES" 2>/dev/null)" = "$(printf '%s\n' "${TANSU_FIXES[@]}")" ]; then
        say "tansu $TANSU_VERSION (fixes: ${TANSU_FIXES[*]}) already built: $TANSU_BIN"
        return
    fi
    # A build started outside this script (same --root) is still running: wait for it.
    local other
    other="$(pgrep -f "cargo install .*--root $TANSU_ROOT" | head -n 1 || true)"
    if [ -n "$other" ]; then
        say "a cargo build of tansu into $TANSU_ROOT is already running (pid $other); waiting for it (log $TANSU_LOG)"
        heartbeat_until_done "$other" "$TANSU_LOG" "tansu $TANSU_VERSION (pid $other)"
        [ -x "$TANSU_BIN" ] && { say "tansu $TANSU_VERSION built by the other build: $TANSU_BIN"; return; }
        say "the other build ended without $TANSU_BIN; building here"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (rustup) first"
    mkdir -p "$(dirname "$TANSU_LOG")"
    local src="$AGENTMETER_CACHE/tansu-$TANSU_VERSION-src"
    say "fetching tansu $TANSU_VERSION and tansu-storage $TANSU_VERSION from crates.io; applying fixes: ${TANSU_FIXES[*]}"
    prepare_fixed_tansu_sources "$src"
    say "building tansu $TANSU_VERSION (fixes: ${TANSU_FIXES[*]}), about 12 minutes on 2 cores the first time (log $TANSU_LOG)"
    # A target dir in the cache lets a failed or interrupted build resume; removed on success.
    local target="$AGENTMETER_CACHE/tansu-$TANSU_VERSION-target" rc=0 pid
    cargo install --path "$src/tansu-$TANSU_VERSION" --locked --features dynostore,libsql \
        --root "$TANSU_ROOT" --target-dir "$target" >"$TANSU_LOG" 2>&1 &
    pid=$!
    heartbeat_until_done "$pid" "$TANSU_LOG" "tansu $TANSU_VERSION"
    wait "$pid" || rc=$?
    if [ "$rc" -ne 0 ] || [ ! -x "$TANSU_BIN" ]; then
        tail_log "$TANSU_LOG"
        die "cargo install tansu failed (exit $rc); full log: $TANSU_LOG"
    fi
    printf '%s\n' "${TANSU_FIXES[@]}" >"$TANSU_ROOT/FIXES"
    rm -rf "$target" "$src"
    say "tansu $TANSU_VERSION installed: $TANSU_BIN (fixes: ${TANSU_FIXES[*]})"
}

cmd_install() {
    mkdir -p "$AGENTMETER_CACHE"
    exec 9>"$AGENTMETER_CACHE/install.lock"
    if ! flock -n 9; then
        say "another install holds $AGENTMETER_CACHE/install.lock; waiting for it"
        flock 9
    fi
    install_packages
    install_check_venvs
    install_tansu
    say "install done"
}

# ---------------------------------------------------------------- ClickHouse

write_clickhouse_config() {
    mkdir -p "$CH_DIR/data/tmp" "$CH_DIR/data/user_files" "$CH_DIR/data/format_schemas" "$CH_DIR/log"
    cat >"$CH_CONFIG" <<EOF
<?xml version="1.0"?>
<!-- Generated by deploy/local/services.sh; rewritten on every 'up'. ClickHouse 18.16 layout. -->
<yandex>
    <logger>
        <level>information</level>
        <log>$CH_LOG</log>
        <errorlog>$CH_ERRLOG</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CH_HTTP_PORT</http_port>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <!-- no interserver_http_port: no replication, nothing listens on 9009 -->
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>536870912</mark_cache_size>
    <path>$CH_DIR/data/</path>
    <tmp_path>$CH_DIR/data/tmp/</tmp_path>
    <user_files_path>$CH_DIR/data/user_files/</user_files_path>
    <format_schema_path>$CH_DIR/data/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
    <!-- tests drop tables of any size -->
    <max_table_size_to_drop>0</max_table_size_to_drop>
    <max_partition_size_to_drop>0</max_partition_size_to_drop>
    <query_log>
        <database>system</database>
        <table>query_log</table>
        <partition_by>toYYYYMM(event_date)</partition_by>
        <flush_interval_milliseconds>7500</flush_interval_milliseconds>
    </query_log>
</yandex>
EOF
    cat >"$CH_DIR/users.xml" <<'EOF'
<?xml version="1.0"?>
<!-- Generated by deploy/local/services.sh: user 'default', no password, localhost only. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>10000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>::1</ip>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
}

# Run a command as the clickhouse user when we are root (clickhouse-server should not run as root).
as_clickhouse() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$CLICKHOUSE_USER" -- "$@"
    else
        "$@"
    fi
}

start_clickhouse() {
    if clickhouse_answers; then
        say "clickhouse already answering on 127.0.0.1:$CH_HTTP_PORT ($(clickhouse_version || echo '?'))"
        return
    fi
    [ -x "$CLICKHOUSE_SERVER" ] || die "clickhouse-server not installed: run '$0 install'"
    local pid
    if pid="$(live_pid "$CH_PID" clickhouse)"; then
        say "clickhouse (pid $pid) is running but not answering yet; waiting"
    else
        say "writing ClickHouse config $CH_CONFIG (http $CH_HTTP_PORT, tcp $CH_TCP_PORT, data $CH_DIR/data)"
        write_clickhouse_config
        rm -f "$CH_PID"
        : >>"$CH_LAUNCH"
        if [ "$(id -u)" -eq 0 ]; then
            id "$CLICKHOUSE_USER" >/dev/null 2>&1 || die "user '$CLICKHOUSE_USER' missing (the clickhouse-server package creates it): run '$0 install'"
            chown -R "$CLICKHOUSE_USER:$CLICKHOUSE_USER" "$CH_DIR"
            runuser -u "$CLICKHOUSE_USER" -- test -w "$CH_DIR/data" \
                || die "user '$CLICKHOUSE_USER' cannot write $CH_DIR/data (a parent directory is not traversable?): set AGENTMETER_STATE elsewhere"
        fi
        local runas
        if [ "$(id -u)" -eq 0 ]; then runas="$CLICKHOUSE_USER"; else runas="$(id -un)"; fi
        say "starting clickhouse-server as '$runas' (log $CH_LOG)"
        (cd "$CH_DIR" && as_clickhouse "$CLICKHOUSE_SERVER" --config-file="$CH_CONFIG" \
            --pid-file="$CH_PID" --daemon) >>"$CH_LAUNCH" 2>&1 \
            || { tail_log "$CH_LAUNCH" "$CH_STDERR" "$CH_ERRLOG"; die "clickhouse-server failed to start"; }
    fi
    local start now
    start="$(now_ms)"
    # 18.16 opens HTTP before the native port and exits if the latter fails: wait for both.
    until clickhouse_answers && tcp_answers "$CH_TCP_PORT"; do
        now="$(now_ms)"
        if [ $((now - start)) -ge $((UP_TIMEOUT * 1000)) ]; then
            tail_log "$CH_LAUNCH" "$CH_STDERR" "$CH_ERRLOG" "$CH_LOG"
            die "clickhouse did not answer http://127.0.0.1:$CH_HTTP_PORT/ping and tcp $CH_TCP_PORT within ${UP_TIMEOUT}s"
        fi
        if ! live_pid "$CH_PID" clickhouse >/dev/null && [ $((now - start)) -ge 5000 ]; then
            tail_log "$CH_LAUNCH" "$CH_STDERR" "$CH_ERRLOG" "$CH_LOG"
            die "clickhouse-server exited during startup"
        fi
        sleep 0.2
    done
    local version
    version="$(clickhouse_version)" || { tail_log "$CH_ERRLOG"; die "clickhouse answers /ping but not 'SELECT version()'"; }
    say "clickhouse $version answering on 127.0.0.1:$CH_HTTP_PORT (tcp $CH_TCP_PORT) after $(($(now_ms) - start)) ms, pid $(cat "$CH_PID" 2>/dev/null || echo '?')"
}

# ---------------------------------------------------------------- tansu

tansu_engine_url() {
    case "$BROKER_STORAGE" in
        # tansu 0.6.0 resolves the sqlite path relative to its working directory (an absolute
        # path gets the cwd prepended), so it is started from $TS_DIR with a relative file name.
        sqlite) echo "sqlite://tansu.db" ;;
        memory) echo "memory://tansu/" ;;
        *) die "AGENTMETER_BROKER_STORAGE must be 'sqlite' or 'memory', not '$BROKER_STORAGE'" ;;
    esac
}

start_tansu() {
    local engine
    engine="$(tansu_engine_url)"
    if tansu_answers && tansu_storage_panicked && live_pid "$TS_PID" tansu >/dev/null; then
        say "tansu answers on 127.0.0.1:$KAFKA_PORT but its storage task panicked (see $TS_LOG): restarting it"
        stop_pid tansu "$TS_PID" tansu tansu_answers
    fi
    if tansu_answers; then
        local running
        running="$(cat "$TS_ENGINE_FILE" 2>/dev/null || echo unknown)"
        say "tansu already answering on 127.0.0.1:$KAFKA_PORT (storage: $running)"
        if [ "$running" != "$BROKER_STORAGE" ]; then
            say "note: AGENTMETER_BROKER_STORAGE=$BROKER_STORAGE but the running broker uses '$running'; run '$0 down' first to switch"
        fi
        return
    fi
    [ -x "$TANSU_BIN" ] || die "tansu not built ($TANSU_BIN missing): run '$0 install'"
    local pid
    if pid="$(live_pid "$TS_PID" tansu)"; then
        say "tansu (pid $pid) is running but not answering yet; waiting"
    else
        mkdir -p "$TS_DIR"
        rm -f "$TS_PID"
        say "starting tansu $TANSU_VERSION on 127.0.0.1:$KAFKA_PORT, storage $BROKER_STORAGE ($( [ "$BROKER_STORAGE" = sqlite ] && echo "$TS_DIR/tansu.db" || echo "$engine")), log $TS_LOG"
        printf '%s\n' "--- $(date -u +%FT%TZ) services.sh up: storage $BROKER_STORAGE" >>"$TS_LOG"
        # tansu also reads CLUSTER_ID, LISTENER_URL, STORAGE_ENGINE, SCHEMA_REGISTRY, ... from the
        # environment: drop those so a stray variable cannot change the broker.
        # setsid -f detaches it from our session; the inner sh writes its own PID, then execs
        # (same PID) env and tansu.
        # shellcheck disable=SC2016 # $$ and $@ belong to the inner sh
        (cd "$TS_DIR" && setsid -f nohup sh -c 'echo $$ >"$0"; exec "$@"' "$TS_PID" \
            env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL \
            -u STORAGE_ENGINE -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
            "$TANSU_BIN" broker \
            --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
            --storage-engine "$engine" \
            >>"$TS_LOG" 2>&1 </dev/null)
        echo "$BROKER_STORAGE" >"$TS_ENGINE_FILE"
        for _ in $(seq 1 50); do [ -s "$TS_PID" ] && break; sleep 0.1; done
    fi
    local start now
    start="$(now_ms)"
    until tansu_answers; do
        now="$(now_ms)"
        # Only liveness here: while sh execs env and env execs tansu, /proc/PID/cmdline can read
        # empty for an instant, so the name check of live_pid would report a running broker dead.
        if ! kill -0 "$(tr -dc '0-9' <"$TS_PID")" 2>/dev/null; then
            tail_log "$TS_LOG"
            die "tansu exited during startup"
        fi
        if [ $((now - start)) -ge $((UP_TIMEOUT * 1000)) ]; then
            tail_log "$TS_LOG"
            die "tansu did not accept a TCP connection on 127.0.0.1:$KAFKA_PORT within ${UP_TIMEOUT}s"
        fi
        sleep 0.2
    done
    say "tansu answering on 127.0.0.1:$KAFKA_PORT after $(($(now_ms) - start)) ms, pid $(cat "$TS_PID")"
}

# ---------------------------------------------------------------- stop

stop_pid() { # name pidfile pattern port-probe
    local name="$1" pidfile="$2" pattern="$3" probe="$4" pid
    if ! pid="$(live_pid "$pidfile" "$pattern")"; then
        rm -f "$pidfile"
        if "$probe"; then
            say "$name: not started by this script (no live PID in $pidfile) but something answers on its port; leaving it"
        else
            say "$name: not running"
        fi
        return
    fi
    say "$name: stopping pid $pid (TERM)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name: still alive after 30s; KILL"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pidfile"
    say "$name: stopped"
}

cmd_down() {
    stop_pid tansu "$TS_PID" tansu tansu_answers
    stop_pid clickhouse "$CH_PID" clickhouse clickhouse_answers
    # The local cluster of cluster mode (deploy/local/cluster.sh), if this state dir started one.
    if [ -d "$AGENTMETER_STATE/cluster" ]; then
        AGENTMETER_STATE="$AGENTMETER_STATE" bash "$SCRIPT_DIR/cluster.sh" down
    fi
}

cmd_up() {
    tansu_engine_url >/dev/null   # validates AGENTMETER_BROKER_STORAGE before starting anything
    mkdir -p "$AGENTMETER_STATE"
    say "state dir $AGENTMETER_STATE"
    start_clickhouse
    start_tansu
}

cmd_status() {
    local rc=0 pid
    if clickhouse_answers; then
        pid="$(live_pid "$CH_PID" clickhouse || echo 'not ours')"
        say "clickhouse: up, http 127.0.0.1:$CH_HTTP_PORT tcp $CH_TCP_PORT, version $(clickhouse_version || echo '?'), pid $pid"
    else
        say "clickhouse: down (no answer on http://127.0.0.1:$CH_HTTP_PORT/ping)"
        rc=1
    fi
    if tansu_answers && tansu_storage_panicked && live_pid "$TS_PID" tansu >/dev/null; then
        say "tansu: BROKEN, 127.0.0.1:$KAFKA_PORT accepts connections but its storage task panicked (see $TS_LOG); '$0 up' restarts it"
        rc=1
    elif tansu_answers; then
        pid="$(live_pid "$TS_PID" tansu || echo 'not ours')"
        say "tansu: up, 127.0.0.1:$KAFKA_PORT, storage $(cat "$TS_ENGINE_FILE" 2>/dev/null || echo unknown), pid $pid"
    else
        say "tansu: down (no TCP connection on 127.0.0.1:$KAFKA_PORT)"
        rc=1
    fi
    return "$rc"
}

cmd_reset() {
    cmd_down
    case "$AGENTMETER_STATE" in
        "" | "/" | "$HOME" | "$REPO_ROOT") die "refusing to delete data under AGENTMETER_STATE='$AGENTMETER_STATE'" ;;
    esac
    say "deleting $CH_DIR and $TS_DIR"
    rm -rf "$CH_DIR" "$TS_DIR"
}

usage() {
    sed -n '2,/^[^#]/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    reset) cmd_reset ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
