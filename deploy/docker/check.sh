#!/usr/bin/env bash
# Checks docker-compose.yml and deploy/docker/Dockerfile without a Docker engine (there is none on
# the machines this project is developed and tested on); part of deploy/local/test.sh. A second.
#
#   deploy/docker/check.sh [COMPOSE_FILE]      (default: docker-compose.yml of the repository)
#
#   1. docker-compose 1.29.2 (pinned, deploy/docker/requirements.txt) `config -q`: parses the file,
#      resolves anchors, merge keys and interpolation, and validates it against the compose
#      specification schema docker-compose ships (unknown keys, wrong types, a depends_on naming
#      no service, an undefined volume are errors)
#   2. on its resolved output (`config`): every bind-mounted file or directory and every build
#      context and Dockerfile exists; every agentmeter service's AGENTMETER__<SECTION>__<KEY>
#      names a settings section; the stages' Kafka address is a listener the kafka service
#      advertises (the agentmeter services are those of image agentmeter:…, the image name
#      deploy/kubernetes uses too)
#   3. deploy/docker/Dockerfile copies every workspace member of Cargo.toml (cargo reads every
#      member's manifest: a missing one fails the image build)
#
# What it cannot check: that the images build and the containers start (no engine). The stages'
# settings from the compose file are exercised by tests/compose_env.rs against the local services.
#
# Environment (defaults in brackets):
#   AGENTMETER_CACHE   [$HOME/.cache/agentmeter]   holds venv-docker-compose
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
AGENTMETER_CACHE="${AGENTMETER_CACHE:-$HOME/.cache/agentmeter}"
VENV="$AGENTMETER_CACHE/venv-docker-compose"
COMPOSE_FILE="${1:-$REPO_ROOT/docker-compose.yml}"

say() { printf '[compose] %s\n' "$*"; }
die() { printf '[compose] FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/docker-compose" ] \
    && cmp -s "$SCRIPT_DIR/requirements.txt" "$VENV/.agentmeter-requirements" \
    && cmp -s "$SCRIPT_DIR/requirements-build.txt" "$VENV/.agentmeter-requirements-build" \
    || die "$VENV is missing or not made from deploy/docker/requirements*.txt: run 'deploy/local/services.sh install'"
say "$("$VENV/bin/docker-compose" version --short 2>/dev/null || echo docker-compose) (no Docker engine needed for config)"

# No engine, no registry: DOCKER_HOST points nowhere so that nothing could reach one by accident.
export DOCKER_HOST=unix:///nonexistent/docker.sock

say "1/3 docker-compose -f ${COMPOSE_FILE#"$REPO_ROOT"/} config -q"
"$VENV/bin/docker-compose" -f "$COMPOSE_FILE" config -q || die "docker-compose refuses ${COMPOSE_FILE#"$REPO_ROOT"/}"

say "2/3 mounts, build contexts, AGENTMETER__ variables and the Kafka listener of the resolved file"
RESOLVED="$(mktemp "${TMPDIR:-/tmp}/agentmeter-compose-resolved.XXXXXX")"
trap 'rm -f "$RESOLVED"' EXIT
"$VENV/bin/docker-compose" -f "$COMPOSE_FILE" config >"$RESOLVED" || die "docker-compose config"
"$VENV/bin/python" - "$RESOLVED" <<'PY' || die "the resolved compose file"
import os, re, sys
import yaml
resolved = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
sections = {"kafka", "clickhouse", "ingest", "enricher", "aggregator", "billing", "outcomes"}
services = resolved["services"]
problems = []
kafka_env = services.get("kafka", {}).get("environment", {})
advertised = {re.sub(r"^[A-Z_]+://", "", listener) for listener in kafka_env.get("KAFKA_ADVERTISED_LISTENERS", "").split(",")}
agentmeter = []
for name, service in services.items():
    build = service.get("build")
    if build:
        context = build["context"] if isinstance(build, dict) else build
        dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile")) if isinstance(build, dict) else os.path.join(context, "Dockerfile")
        for path in (context, dockerfile):
            if not os.path.exists(path):
                problems.append(f"{name}: build path {path} does not exist")
    for volume in service.get("volumes") or []:
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith("/") and not os.path.exists(source):
            problems.append(f"{name}: bind mount source {source} does not exist")
    if str(service.get("image", "")).split(":")[0] == "agentmeter":
        agentmeter.append(name)
        env = service.get("environment") or {}
        for key, value in env.items():
            parts = key.split("__")
            if key.startswith("AGENTMETER") and (not key.startswith("AGENTMETER__") or len(parts) < 3 or parts[1].lower() not in sections):
                problems.append(f"{name}: {key} is not AGENTMETER__<SECTION>__<KEY> of a known section")
        brokers = env.get("AGENTMETER__KAFKA__BROKERS")
        if brokers is None:
            problems.append(f"{name}: no AGENTMETER__KAFKA__BROKERS (the settings file's 127.0.0.1:9092 is the container itself)")
        elif any(b not in advertised for b in brokers.split(",")):
            problems.append(f"{name}: AGENTMETER__KAFKA__BROKERS={brokers}, but the kafka service advertises {sorted(advertised)}")
if not agentmeter:
    problems.append("no service runs the agentmeter image")
if problems:
    sys.exit("\n".join(f"  {p}" for p in problems))
print(f"  {len(services)} services, {len(agentmeter)} of them agentmeter ({', '.join(agentmeter)}): mounts, builds, variables and brokers fine")
PY

say "3/3 deploy/docker/Dockerfile copies every workspace member of Cargo.toml"
"$VENV/bin/python" - "$REPO_ROOT/Cargo.toml" "$SCRIPT_DIR/Dockerfile" <<'PY' || die "deploy/docker/Dockerfile"
import re, sys, tomllib
members = [m for m in tomllib.load(open(sys.argv[1], "rb"))["workspace"]["members"] if m != "."]
dockerfile = open(sys.argv[2], encoding="utf-8").read()
copied = set(re.findall(r"^COPY\s+(\S+)\s+\./\1/?\s*$", dockerfile, re.M))
missing = [m for m in members if m not in copied]
if missing:
    sys.exit(f"  workspace members not copied into the build stage: {missing} (add `COPY <member> ./<member>`)")
print(f"  {len(members)} workspace members copied: {', '.join(members)}")
PY

say "docker-compose.yml and the Dockerfile passed"
