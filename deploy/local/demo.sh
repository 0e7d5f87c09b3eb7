#!/usr/bin/env bash
# The main job: the whole agentmeter pipeline on this machine with a demo workload.
#
#   deploy/local/demo.sh [--sessions N] [--keep-running]
#
# 1. installs and starts the real services (deploy/local/services.sh: ClickHouse, tansu broker),
# 2. builds `agentmeter` (release), applies the ClickHouse migrations, creates the topics and
#    applies deploy/local/metering.example.toml to the config topic,
# 3. starts the three stages, the outcomes stage (composite outcomes, ADR 0005) and the console
#    (control-plane API and web console, docs/console.md) as separate processes (logs in
#    .local/logs/), and prints the console's address and an admin key to log in with,
# 4. sends the guide's research-agent workload for two accounts through ingest's REST API and
#    prints usage and cost per account read back from ClickHouse, each account's draft invoice
#    with cost and margin, and what an outcome-priced plan would have earned from them,
# 5. stops the stages (unless --keep-running); the services stay up (`services.sh down` stops them).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
cd "$REPO_ROOT"

SESSIONS=200
KEEP_RUNNING=0
while [ $# -gt 0 ]; do
    case "$1" in
        --sessions) SESSIONS="$2"; shift 2 ;;
        --keep-running) KEEP_RUNNING=1; shift ;;
        *) echo "usage: $0 [--sessions N] [--keep-running]" >&2; exit 2 ;;
    esac
done

STATE="${AGENTMETER_STATE:-$REPO_ROOT/.local}"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/logs"
SETTINGS="$REPO_ROOT/deploy/local/agentmeter.toml"
BIN="$REPO_ROOT/target/release/agentmeter"
mkdir -p "$RUN_DIR" "$LOG_DIR"
say() { printf '[demo] %s\n' "$*"; }
started_at=$(date +%s)

bash deploy/local/services.sh install
bash deploy/local/services.sh up

say "building agentmeter (release; the first build takes a few minutes)"
cargo build --release --locked --bin agentmeter

agentmeter() { RUST_BACKTRACE=0 "$BIN" --config "$SETTINGS" "$@"; }

stop_stages() {
    for stage in ingest enrich aggregate outcomes console; do
        pid_file="$RUN_DIR/$stage.pid"
        [ -f "$pid_file" ] || continue
        pid=$(cat "$pid_file")
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pid_file"
    done
}

# Stages of an earlier run would hold the ports: stop them first.
stop_stages
agentmeter migrate
agentmeter topics
agentmeter config apply deploy/local/metering.example.toml

for stage in ingest enrich aggregate outcomes console; do
    nohup "$BIN" --config "$SETTINGS" "$stage" >>"$LOG_DIR/$stage.log" 2>&1 &
    echo $! >"$RUN_DIR/$stage.pid"
    say "started $stage (pid $!, log $LOG_DIR/$stage.log)"
done
if [ "$KEEP_RUNNING" -eq 0 ]; then
    trap stop_stages EXIT
fi

wait_ready() {
    local url="$1" name="$2"
    for _ in $(seq 1 600); do
        if curl -sf "$url" >/dev/null 2>&1; then say "$name ready"; return 0; fi
        sleep 0.1
    done
    echo "[demo] ERROR: $name not ready at $url; last log lines:" >&2
    tail -20 "$LOG_DIR/$name.log" >&2
    exit 1
}
wait_ready http://127.0.0.1:8080/readyz ingest
wait_ready http://127.0.0.1:9101/readyz enrich
wait_ready http://127.0.0.1:9102/readyz aggregate
wait_ready http://127.0.0.1:9104/readyz outcomes
wait_ready http://127.0.0.1:9105/readyz console

# An admin key of the demo workspace for the console: the one of an earlier run while it still
# works, else a new one (only its hash is on the config topic; the key itself is kept here).
KEY_FILE="$RUN_DIR/console-admin-key"
if ! { [ -s "$KEY_FILE" ] && curl -sf -H "Authorization: Bearer $(cat "$KEY_FILE")" \
        http://127.0.0.1:9105/api/v1/workspace >/dev/null 2>&1; }; then
    agentmeter admin-key new --workspace ws_demo --name demo | grep '^amk_' >"$KEY_FILE"
    chmod 600 "$KEY_FILE"
fi

# shellcheck disable=SC1091
set -a; . deploy/local/demo-secrets.env; set +a
agentmeter demo --sessions "$SESSIONS"

# The draft invoices of this month from the exact usage (docs/billing.md; the plans are in
# deploy/local/metering.example.toml).
for account in acc_acme acc_globex; do
    say "draft invoice of $account"
    agentmeter invoices preview --workspace ws_demo --account "$account"
done

# What the outcome-priced plan would have earned from both accounts this month, before anyone
# is subscribed to it (docs/billing.md, "Simulating a plan").
this_month="$(date -u +%Y-%m)"
next_month="$(date -u -d "${this_month}-01 +1 month" +%Y-%m)"
say "support/outcomes simulated against this month's usage"
agentmeter plans simulate support/outcomes --workspace ws_demo --from "$this_month" --to "$next_month"

say "done in $(( $(date +%s) - started_at ))s"
if [ "$KEEP_RUNNING" -eq 1 ]; then
    say "stages keep running (PIDs in $RUN_DIR); ingest on http://127.0.0.1:8080"
    say "console: http://127.0.0.1:9105/ — log in with the admin key $(cat "$KEY_FILE") (also in $KEY_FILE)"
else
    say "the console ran on http://127.0.0.1:9105/ (demo.sh --keep-running keeps it up; admin key in $KEY_FILE)"
fi
