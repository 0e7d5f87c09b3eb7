#!/usr/bin/env bash
# Builds fuzz targets (all, or those named) as libFuzzer binaries with the STABLE toolchain:
#   fuzz/build.sh [TARGET...]
# Binaries: fuzz/target/<host triple>/release/<TARGET>.
#
# These are the flags `cargo fuzz build --sanitizer none` passes (cargo-fuzz 0.13.2,
# src/project.rs), minus nothing: SanitizerCoverage through LLVM's sancov pass, enabled with the
# stable `-C passes` / `-C llvm-args` options, and libFuzzer linked by libfuzzer-sys. No `-Z`
# flag is needed; only AddressSanitizer would need one (nightly), and safe Rust has little use
# for it. `--target` keeps the flags off build scripts and proc macros (cargo applies RUSTFLAGS
# to host artifacts otherwise, and they would fail to link without libFuzzer).
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
host="$(rustc -vV | sed -n 's/^host: //p')"
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Cllvm-args=-sanitizer-coverage-stack-depth
  --cfg fuzzing
)
export RUSTFLAGS="${flags[*]} ${RUSTFLAGS:-}"
bins=()
for target in "$@"; do bins+=(--bin "$target"); done
[ ${#bins[@]} -gt 0 ] || bins=(--bins)
cd "$fuzz_dir"
exec cargo build --release --locked --target "$host" --target-dir "$fuzz_dir/target" \
  -p agentmeter-fuzz "${bins[@]}"
