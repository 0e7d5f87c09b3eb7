#!/usr/bin/env bash
# Folds what a run found into the checked-in seed corpus, keeping it small:
#   fuzz/minimize.sh TARGET
# libFuzzer's -merge=1 adds to fuzz/corpus/TARGET only those inputs of fuzz/work/corpus/TARGET
# that reach coverage the corpus does not have yet (it never deletes the named seeds), smallest
# inputs first. Prints the corpus size afterwards; keep fuzz/corpus under 2 MB in all.
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="${1:?usage: fuzz/minimize.sh TARGET}"
"$fuzz_dir/build.sh" "$target" >&2
host="$(rustc -vV | sed -n 's/^host: //p')"
mkdir -p "$fuzz_dir/work/corpus/$target" "$fuzz_dir/corpus/$target"
nice -n "${FUZZ_NICE:-10}" "$fuzz_dir/target/$host/release/$target" -merge=1 -max_len=65536 \
  -timeout=10 -rss_limit_mb=2048 "$fuzz_dir/corpus/$target" "$fuzz_dir/work/corpus/$target" 2>&1 |
  grep -E 'MERGE-OUTER|ERROR' >&2 || true
echo "corpus/$target: $(ls "$fuzz_dir/corpus/$target" | wc -l) files, $(du -sh "$fuzz_dir/corpus/$target" | cut -f1)"
echo "corpus total: $(du -sh "$fuzz_dir/corpus" | cut -f1)"
