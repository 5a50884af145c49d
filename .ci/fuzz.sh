#!/usr/bin/env bash
# Fuzzes the wire decoders (schema/fuzz: `decode`, the frame codec, and `ws`, the WebSocket
# reader) for a bounded time, shared between them; any crash fails.
# libFuzzer needs a nightly toolchain: without one this says so and exits 0, since the decoder's
# property tests (`cargo test -p strait-schema`) still ran.
#
#   FUZZ_SECONDS   how long to fuzz in all (default 60)
#   FUZZ_TARGET    one target only (default: each in turn)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${FUZZ_SECONDS:-60}"
targets="${FUZZ_TARGET:-decode ws}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz: no nightly toolchain; skipping the fuzz run (the codec's property tests still ran)"
    exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$root/schema"
# New inputs go to fuzz/corpus (git-ignored, kept between runs on one machine); fuzz/seeds holds
# one committed valid message per frame kind (and two WebSocket frame runs for `ws`), so mutation
# starts from real pointers, texts and headers.
for target in $targets; do
    share=$(( seconds / $(wc -w <<<"$targets") ))
    mkdir -p fuzz/corpus/"$target"
    echo "fuzz: running $target for ${share}s"
    start=$(date +%s)
    # -rss_limit_mb bounds memory on the shared 2-core box; libFuzzer exits non-zero on any crash,
    # leak or timeout and leaves the input under fuzz/artifacts/$target/.
    cargo +nightly fuzz run "$target" fuzz/corpus/"$target" fuzz/seeds -- \
        -max_total_time="$share" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
    echo "fuzz: $target ran clean for $(( $(date +%s) - start ))s wall (including build)"
done
