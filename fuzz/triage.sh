#!/usr/bin/env bash
# Groups the crash inputs of a target by where and why they panicked:
#   fuzz/triage.sh TARGET [DIR]        # DIR defaults to fuzz/artifacts/TARGET
# Replays every crash-* file with the target's binary (RUST_BACKTRACE=1) and prints, per
# distinct panic, how many inputs hit it, the smallest of them, the panic message and the first
# frame in the project's code. Minimize an input with:
#   fuzz/target/<host>/release/TARGET -minimize_crash=1 -runs=20000 -exact_artifact_path=OUT FILE
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(cd "$fuzz_dir/.." && pwd)"
target="${1:?usage: fuzz/triage.sh TARGET [DIR]}"
dir="${2:-$fuzz_dir/artifacts/$target}"
host="$(rustc -vV | sed -n 's/^host: //p')"
binary="$fuzz_dir/target/$host/release/$target"
declare -A count smallest size message frame
shopt -s nullglob
for input in "$dir"/crash-* "$dir"/timeout-* "$dir"/oom-*; do
  # -handle_abrt=0: the panic's abort ends the process at once (libFuzzer's crash report is
  # slow and says nothing the panic message does not).
  output="$(timeout 20 "$binary" -handle_abrt=0 "$input" 2>&1 || true)"
  location="$(grep -m1 -oE 'panicked at [^ ]+' <<<"$output" | sed 's/panicked at //; s/:$//' || true)"
  text="$(grep -m1 -A1 'panicked at' <<<"$output" | tail -n 1 | cut -c1-200 || true)"
  first=""
  case "$location" in
    "$repo_dir"/*|fuzz_targets/*|src/*) ;;
    *)
      # A panic inside std or a dependency (an overflowing abs(), rust_decimal's own overflow
      # panics): the first backtrace frame in the project's crates says where it came from.
      output="$(RUST_BACKTRACE=1 timeout 20 "$binary" -handle_abrt=0 "$input" 2>&1 || true)"
      first="$(grep -oE "at $repo_dir/(schemas|ingest|enricher|aggregator|runtime)/[^ ]+" <<<"$output" | head -n 1 | sed "s|at $repo_dir/||" || true)"
      ;;
  esac
  if [ -z "$location" ]; then
    location="$(grep -m1 -oE 'ERROR: libFuzzer: [a-z -]+' <<<"$output" || echo unknown)"
  fi
  # Numbers in messages differ per input ("negative quantity -144"); the kind of panic does not.
  key="$location | $(sed -E 's/-?[0-9][0-9.]*/N/g' <<<"$text") | $first"
  bytes=$(stat -c %s "$input")
  count[$key]=$(( ${count[$key]:-0} + 1 ))
  if [ -z "${size[$key]:-}" ] || [ "$bytes" -lt "${size[$key]}" ]; then
    size[$key]=$bytes; smallest[$key]="$input"; message[$key]="$text"; frame[$key]="$first"
  fi
done
for key in "${!count[@]}"; do
  echo "${count[$key]} input(s): panicked at ${key%% | *}"
  echo "    message:  ${message[$key]}"
  [ -n "${frame[$key]}" ] && echo "    from:     ${frame[$key]}"
  echo "    smallest: ${smallest[$key]} (${size[$key]} bytes)"
done
