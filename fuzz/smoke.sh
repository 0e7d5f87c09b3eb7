#!/usr/bin/env bash
# CI's short fuzz run: builds every target, replays its checked-in corpus, then fuzzes it for a
# bounded time; exits non-zero if any target crashed (or failed to build).
#   fuzz/smoke.sh                       # FUZZ_SMOKE_SECONDS per target, default 20
#   FUZZ_SMOKE_SECONDS=5 fuzz/smoke.sh
# Eight targets × 20 s ≈ 3 minutes after the build on 2 cores. New inputs go to a scratch
# directory (the checked-in corpus is never modified); crashes to fuzz/artifacts/<target>/.
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${FUZZ_SMOKE_SECONDS:-20}"
targets=(otlp_protobuf otlp_json rest_json avro_raw avro_enriched config pricing aggregation)

started=$(date +%s)
echo "fuzz smoke: building ${#targets[@]} targets (the first build compiles librdkafka; minutes)"
"$fuzz_dir/build.sh"
echo "fuzz smoke: built in $(( $(date +%s) - started )) s"

host="$(rustc -vV | sed -n 's/^host: //p')"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for target in "${targets[@]}"; do
  binary="$fuzz_dir/target/$host/release/$target"
  mkdir -p "$scratch/$target" "$fuzz_dir/artifacts/$target"
  dictionary=()
  [ -f "$fuzz_dir/dict/$target.dict" ] && dictionary=(-dict="$fuzz_dir/dict/$target.dict")
  log="$scratch/$target.log"
  set +e
  "$binary" "$scratch/$target" "$fuzz_dir/corpus/$target" \
    -artifact_prefix="$fuzz_dir/artifacts/$target/" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -max_total_time="$seconds" -print_final_stats=1 "${dictionary[@]}" >"$log" 2>&1
  status=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  coverage=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
  line="$target: ${runs:-?} runs, ${speed:-?} exec/s, ${coverage:-no coverage line}"
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    line="$line, CRASH (exit $status)"
    # The panic, the first frames in the project's crates, and the saved input.
    grep -E -A1 'panicked at' "$log" | head -n 2 || true
    grep -E "at $(cd "$fuzz_dir/.." && pwd)/(schemas|ingest|enricher|aggregator|runtime)/" "$log" | head -n 3 || true
    grep -E 'Test unit written to|ERROR: libFuzzer' "$log" | head -n 2 || true
  fi
  summary+=("$line")
  echo "fuzz smoke: $line"
done
echo "fuzz smoke: done in $(( $(date +%s) - started )) s"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz smoke: FAILED: ${failed[*]} (inputs in fuzz/artifacts/; reproduce with fuzz/target/$host/release/<target> <file>)"
  exit 1
fi
echo "fuzz smoke: ${#targets[@]} targets, no crash"
