#!/usr/bin/env bash
# Rewrites the generated seeds (fuzz/corpus/*/gen_*) with fuzz/seeds, and the OTLP/JSON form of
# the captured exporter requests (fuzz/corpus/otlp_json/captured_*). Built without fuzz flags in
# its own target directory; it does not build ingest (no librdkafka).
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir"
exec cargo run --release --locked -p agentmeter-fuzz-seeds --target-dir "$fuzz_dir/target/seeds"
