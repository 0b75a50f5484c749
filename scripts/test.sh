#!/usr/bin/env bash
# The test command: formatting, lints, then every test in release mode (unit, property,
# GRE vectors, and the end-to-end lab tests, which need root and the tools .ci/run installs),
# with the `store` feature (protoc to build, etcd to test: .ci/run installs them).
#
# An end-to-end test that cannot run here (not root, a tool missing) skips, and records
# `test: reason` in $CARGO_TARGET_DIR/tmp/vpcd-skips.txt (emptied first); the last line
# counts what passed, failed and was ignored, and what skipped and why. With
# VPCD_REQUIRE_E2E=1 (as .ci/run sets it) a test that cannot run fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target/tmp"
skips="$target/tmp/vpcd-skips.txt"
output="$target/tmp/vpcd-test-output.txt"
: >"$skips"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
# The store feature (vpcd apply/get, run --store) builds only with protoc: .ci/run installs it.
cargo clippy --workspace --all-targets --release --features vpcd/store -- -D warnings
echo "== cargo test --release"
set +e
cargo test --workspace --release --no-fail-fast --features vpcd/store -- --test-threads="${VPCD_TEST_THREADS:-2}" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
set -e
# One line: cargo's "test result:" lines summed, and the skips by reason.
counts=$(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i + 1) ~ /^passed;?$/) p += $i
      if ($(i + 1) ~ /^failed;?$/) f += $i
      if ($(i + 1) ~ /^ignored;?$/) g += $i
    }
    n++
  } END { printf "%d %d %d %d", p, f, g, n }' "$output")
read -r passed failed ignored binaries <<<"$counts"
skipped=$(wc -l <"$skips")
why=$(sed 's/^[^:]*: //' "$skips" | sort | uniq -c | sed 's/^ *\([0-9]*\) /\1 × /' | paste -sd ';' - | sed 's/;/; /g')
line="== tests: $passed passed, $failed failed, $ignored ignored ($binaries test binaries)"
if [ "$skipped" -gt 0 ]; then
  line+="; $skipped of the passed skipped (listed in $skips): $why"
else
  line+="; none skipped"
fi
[ "$status" -eq 0 ] || line+="; cargo test exited $status"
echo "$line"
exit "$status"
