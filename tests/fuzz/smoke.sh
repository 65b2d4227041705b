#!/usr/bin/env bash
# Fuzz smoke test (issue 14): builds every cargo-fuzz target of tests/fuzz without a sanitizer
# and runs each over its committed seed corpus for a bounded time. A crash, panic, failed
# assertion, timeout or out-of-memory in any target makes the script exit non-zero; the
# offending input is left under tests/fuzz/artifacts/<target>/.
#
# cargo-fuzz needs nightly flags (-Z); RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
# Knobs: FUZZ_SECONDS (per target, default 20), FUZZ_SANITIZER (default none; `address` for
# ASan), AMPORA_FUZZ_TARGET_DIR (build directory, default target/fuzz at the repository root).
set -euo pipefail
cd "$(dirname "$0")/../.."

export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-$(nproc)}"
seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"
target_dir="${AMPORA_FUZZ_TARGET_DIR:-$PWD/target/fuzz}"
fuzz=(--fuzz-dir tests/fuzz --sanitizer "$sanitizer" --target-dir "$target_dir")
triple="$(rustc -vV | sed -n 's/^host: //p')"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "==> cargo fuzz build (sanitizer: $sanitizer)"
cargo fuzz build "${fuzz[@]}"

# New inputs go to a scratch directory (libFuzzer writes to the first corpus directory it is
# given), so the committed seeds stay as they are.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in $(cargo fuzz list --fuzz-dir tests/fuzz); do
  echo "==> fuzz $t for ${seconds}s"
  mkdir -p "$scratch/$t" "tests/fuzz/artifacts/$t"
  # The binary itself, not `cargo fuzz run`: that re-runs cargo for every target, and in a git
  # worktree coordinator/build.rs (which watches .git/HEAD, a file there) rebuilds each time.
  if ! "$target_dir/$triple/release/$t" "$scratch/$t" "tests/fuzz/corpus/$t" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="tests/fuzz/artifacts/$t/" 2>"$scratch/$t.log"; then
    failed+=("$t")
    # The report: libFuzzer's crash summary, the panic message, the input it saved.
    grep -A1 -E "panicked|ERROR|SUMMARY|Test unit written" "$scratch/$t.log" >&2 || tail -40 "$scratch/$t.log" >&2
  fi
  grep -E "stat::number_of_executed_units|stat::average_exec_per_sec" "$scratch/$t.log" || true
done

if ((${#failed[@]})); then
  echo "!! fuzz smoke failed: ${failed[*]}" >&2
  exit 1
fi
echo "==> fuzz smoke passed"
