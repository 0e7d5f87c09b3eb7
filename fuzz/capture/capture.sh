#!/usr/bin/env bash
# Captures real exporter requests into the seed corpus: value-python 0.1.6 running the guide's
# research agent (OTLP/gRPC) and OpenTelemetry's Python SDK sending GenAI spans (OTLP/HTTP,
# gzip), the same scripts tests/ingest_otlp.rs runs, against fuzz/capture/capture_server.py.
#
# Writes fuzz/corpus/otlp_protobuf/captured_*.pb; then run fuzz/seeds.sh, which also writes
# each capture as OTLP/JSON into fuzz/corpus/otlp_json/. The spans carry the capture's own
# clock, so the corpus must be captured within 35 days before the targets' FIXED_NOW_MICROS
# (fuzz/src/lib.rs); move FIXED_NOW_MICROS (and seeds/src/main.rs) when re-capturing later.
#
# Needs python3 and PyPI (the packages of tests/python/requirements-otlp.txt, in a venv under
# ~/.cache/agentmeter). Loopback only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${HOME}/.cache/agentmeter/venv-fuzz-capture"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$repo/tests/python/requirements-otlp.txt"
fi
out="$here/../corpus/otlp_protobuf"
mkdir -p "$out"
rm -f "$out"/captured_*.pb
grpc_port=47317
http_port=47318
OUT_DIR="$out" GRPC_PORT=$grpc_port HTTP_PORT=$http_port "$venv/bin/python" "$here/capture_server.py" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 2
secret=am_demo_acme_research_secret
env -i PATH="$PATH" HOME="$HOME" \
  VALUE_AGENT_SECRET=$secret VALUE_BACKEND_URL=http://127.0.0.1:$http_port \
  VALUE_OTEL_ENDPOINT=http://127.0.0.1:$grpc_port OTEL_EXPORTER_OTLP_HEADERS=x-agent-secret=$secret \
  "$venv/bin/python" "$repo/tests/python/research_agent.py"
env -i PATH="$PATH" HOME="$HOME" \
  OTLP_HTTP_TRACES_URL=http://127.0.0.1:$http_port/v1/traces AGENT_SECRET=$secret \
  "$venv/bin/python" "$repo/tests/python/genai_spans.py"
# One export each (both SDKs flush everything at once); name them by what sent them.
mv "$out"/captured_otlp_grpc_*.pb "$out/captured_value_python_research_agent_grpc.pb"
mv "$out"/captured_otlp_http_*.pb "$out/captured_opentelemetry_python_genai_http.pb"
ls -l "$out"/captured_*.pb
