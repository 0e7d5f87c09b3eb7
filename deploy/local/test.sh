#!/usr/bin/env bash
# The test command: installs and starts the real services, then runs every test of the workspace
# (unit tests, and integration tests that start `agentmeter` stages as processes against the real
# broker and ClickHouse), the SQL checks, the Prometheus rules and dashboard checks, the Kubernetes
# manifests and the compose file, and a short run of every fuzz target.
#
#   deploy/local/test.sh [extra cargo test arguments]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
cd "$REPO_ROOT"
say() { printf '[test] %s\n' "$*"; }
started_at=$(date +%s)

bash deploy/local/services.sh install
bash deploy/local/services.sh up
# Cluster mode's test (tests/cluster_mode.rs): ZooKeeper and two ClickHouse replicas (ADR 0006).
bash deploy/local/cluster.sh up

say "cargo test --workspace (first build takes a few minutes)"
cargo test --workspace --locked --features agentmeter/integration "$@"

say "SQL: migrations and views on current ClickHouse (chdb) and on the local ClickHouse"
bash deploy/local/check_sql_current_clickhouse.sh --http "http://127.0.0.1:${AGENTMETER_CLICKHOUSE_HTTP_PORT:-8123}"

say "Prometheus rules, their unit tests, the scrape config and the Grafana dashboard (promtool, deploy/prometheus/check.sh)"
bash deploy/prometheus/check.sh

say "Kubernetes manifests: kustomize render, kubernetes-validate (strict, Kubernetes 1.30) and the project's rules (deploy/kubernetes/check.sh)"
bash deploy/kubernetes/check.sh

say "docker-compose.yml: docker-compose 1.29.2 config (parse and validate, no engine) and the Dockerfile (deploy/docker/check.sh)"
bash deploy/docker/check.sh

# 10 s per target keeps CI's run short; longer campaigns are fuzz/run.sh's (fuzz/README.md).
export FUZZ_SMOKE_SECONDS="${FUZZ_SMOKE_SECONDS:-10}"
say "fuzz smoke: every fuzz target built, its corpus replayed, then fuzzed $FUZZ_SMOKE_SECONDS s (fuzz/README.md)"
bash fuzz/smoke.sh

say "all tests passed in $(( $(date +%s) - started_at ))s"
