#!/usr/bin/env bash
# Long fuzzing runs (issue 14): each target in turn, one process (-jobs=1 -workers=1), for
# FUZZ_SECONDS each (default 3600), starting from the committed seeds. Expects the targets
# built (smoke.sh builds them). The growing corpus goes to FUZZ_CORPUS_DIR (default
# target/fuzz-corpus), never into the committed seeds; crashes to tests/fuzz/artifacts/.
# Prints libFuzzer's final stats per target for the table in tests/fuzz/README.md.
set -uo pipefail
cd "$(dirname "$0")/../.."

repo="$PWD"
seconds="${FUZZ_SECONDS:-3600}"
target_dir="${AMPORA_FUZZ_TARGET_DIR:-$PWD/target/fuzz}"
bins="${FUZZ_BIN_DIR:-$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release}"
corpus="${FUZZ_CORPUS_DIR:-$PWD/target/fuzz-corpus}"
targets=("$@")
((${#targets[@]})) || targets=(ws_frame http_body bootstrap_token config_loader client_cert_header)

status=0
for t in "${targets[@]}"; do
  mkdir -p "$corpus/$t" "tests/fuzz/artifacts/$t"
  echo "==> $t for ${seconds}s ($(date -u +%FT%TZ))"
  # In -jobs mode libFuzzer writes the job's own log to fuzz-0.log in the working directory.
  (cd "$corpus" && "$bins/$t" "$corpus/$t" "$repo/tests/fuzz/corpus/$t" -jobs=1 -workers=1 \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$repo/tests/fuzz/artifacts/$t/" 2>"$corpus/$t.log") || status=1
  mv -f "$corpus/fuzz-0.log" "$corpus/$t.job.log" 2>/dev/null
  grep -A1 -E "panicked|SUMMARY|Test unit written" "$corpus/$t.log" "$corpus/$t.job.log"
  grep -E "stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|Done [0-9]+ runs" "$corpus/$t.log"
done
exit $status
