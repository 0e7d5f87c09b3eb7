#!/usr/bin/env bash
# Folds what runs found into the checked-in seed corpus and keeps it small:
#   fuzz/minimize.sh TARGET
# Rebuilds fuzz/corpus/TARGET as: the named seeds (gen_*, captured_*), plus the smallest set of
# other inputs — from the current corpus and from fuzz/work/corpus/TARGET — that reaches every
# coverage edge they reach (libFuzzer -set_cover_merge=1 with -use_counters=0: edges, not hit
# counts, which keeps about a third of the files for over 99 % of the edges). Prints edges and
# size before and after; keep all of fuzz/corpus under 2 MB.
# Reads fuzz/work/corpus/TARGET and the current corpus: run it after fuzz/run.sh, not instead.
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="${1:?usage: fuzz/minimize.sh TARGET}"
"$fuzz_dir/build.sh" "$target" >&2
host="$(rustc -vV | sed -n 's/^host: //p')"
binary="$fuzz_dir/target/$host/release/$target"
corpus="$fuzz_dir/corpus/$target"
work="$fuzz_dir/work/corpus/$target"
mkdir -p "$corpus" "$work"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/new" "$scratch/found"
find "$corpus" -maxdepth 1 -type f \( -name 'gen_*' -o -name 'captured_*' \) -exec cp {} "$scratch/new/" \;
# Found inputs above FUZZ_CORPUS_MAX_BYTES (default 2048) are left out: they rarely reach an
# edge a smaller one does not, and the text targets (config, OTLP/JSON) would pass 2 MB with them.
max_bytes="${FUZZ_CORPUS_MAX_BYTES:-2048}"
find "$corpus" -maxdepth 1 -type f ! -name 'gen_*' ! -name 'captured_*' ! -size +"${max_bytes}"c \
  -exec cp {} "$scratch/found/" \;
find "$work" -maxdepth 1 -type f ! -size +"${max_bytes}"c -exec cp {} "$scratch/found/" \;
edges() { "$binary" -runs=0 -max_len=65536 "$1" 2>&1 | grep -m1 INITED | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true; }
size() { echo "$(find "$1" -type f | wc -l) files, $(du -s --apparent-size --block-size=1K "$1" | cut -f1) KiB"; }
echo "before: $(size "$corpus") + $(find "$work" -type f | wc -l) new; $(edges "$corpus")"
nice -n "${FUZZ_NICE:-10}" "$binary" -set_cover_merge=1 -use_counters=0 -max_len=65536 -timeout=10 \
  -rss_limit_mb=2048 "$scratch/new" "$scratch/found" 2>&1 | grep -E 'MERGE-OUTER: [0-9]+ new|ERROR' >&2 || true
find "$corpus" -maxdepth 1 -type f -delete
cp "$scratch/new/"* "$corpus/"
echo "after:  $(size "$corpus"); $(edges "$corpus")"
echo "all of fuzz/corpus: $(du -s --apparent-size --block-size=1K "$fuzz_dir/corpus" | cut -f1) KiB"
