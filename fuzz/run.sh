#!/usr/bin/env bash
# Runs one fuzz target against its corpus and prints what it did:
#   fuzz/run.sh TARGET [--runs N | --seconds S] [--keep-going] [-- LIBFUZZER_ARGS...]
#
#   --runs N      stop after N executions (libFuzzer -runs=N)
#   --seconds S   stop after S seconds (default 60; libFuzzer -max_total_time=S)
#   --keep-going  libFuzzer's fork mode with -ignore_crashes: record every crash under
#                 fuzz/artifacts/TARGET/ and go on (for campaigns; the default stops at the first)
#
# Builds the target first if needed (fuzz/build.sh). New inputs go to fuzz/work/corpus/TARGET
# (not checked in); the checked-in seeds in fuzz/corpus/TARGET are read, never written (fold
# new coverage into them with fuzz/minimize.sh). Crashes: fuzz/artifacts/TARGET/crash-<sha1>.
# Exit status: 0 without a crash, 1 with one. Runs at nice 10 (FUZZ_NICE to change).
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
target="$1"; shift
limit=(-max_total_time=60)
keep_going=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) limit=(-runs="$2"); shift 2 ;;
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --keep-going) keep_going=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1); shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[ -f "$fuzz_dir/fuzz_targets/$target.rs" ] || { echo "no target $target (fuzz/fuzz_targets/)" >&2; exit 2; }

"$fuzz_dir/build.sh" "$target" >&2
host="$(rustc -vV | sed -n 's/^host: //p')"
binary="$fuzz_dir/target/$host/release/$target"
work="$fuzz_dir/work/corpus/$target"
seeds="$fuzz_dir/corpus/$target"
artifacts="$fuzz_dir/artifacts/$target"
mkdir -p "$work" "$seeds" "$artifacts"
dictionary=()
[ -f "$fuzz_dir/dict/$target.dict" ] && dictionary=(-dict="$fuzz_dir/dict/$target.dict")
log="$fuzz_dir/work/$target.log"

# -timeout: any single input slower than 10 s is a hang worth a report (the default is 20 min).
# -rss_limit_mb: the machine has 24 GiB, shared; 2 GiB per input is plenty for these decoders.
# -max_len: 64 KiB lets OTLP/JSON and config inputs grow realistic; libFuzzer's own default
#  (4 KiB, or the largest seed) would cap the structured targets' action sequences too early.
set +e
nice -n "${FUZZ_NICE:-10}" "$binary" "$work" "$seeds" \
  -artifact_prefix="$artifacts/" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
  -print_final_stats=1 "${dictionary[@]}" "${limit[@]}" "${keep_going[@]}" "$@" 2>&1 | tee "$log" >&2
status=${PIPESTATUS[0]}
set -e

echo "== $target"
# The last progress line holds coverage (cov: edges, ft: features) and the corpus size.
grep -E '^#[0-9]+' "$log" | tail -n 1 || true
grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' "$log" || true
crashes=$(grep -cE '^(Test unit written to|artifact_prefix=).*crash-|CRASH\[' "$log" || true)
grep -E 'Test unit written to .*(crash|timeout|oom)-' "$log" | sed 's/.*Test unit written to /artifact: /' || true
grep -E "panicked at" -A 1 "$log" | grep -vE '^--$' | sort | uniq -c | sort -rn | head -n 20 || true
if [ "$status" -ne 0 ] || [ "$crashes" -gt 0 ]; then
  echo "RESULT $target: CRASH (exit $status); reproduce: $binary fuzz/artifacts/$target/<file>"
  exit 1
fi
echo "RESULT $target: no crash"
