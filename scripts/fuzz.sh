#!/usr/bin/env bash
# Fuzzes Kinetoscope's parsers of untrusted input (the cargo-fuzz crate in fuzz/; fuzz/README.md says what
# each target covers):
#   bash scripts/fuzz.sh          # every target for 60 seconds
#   bash scripts/fuzz.sh 300      # every target for 300 seconds
# Each target starts from its hand-made seeds (fuzz/seeds/<target>/) plus what earlier runs found
# (fuzz/corpus/<target>/, ignored by git). A crashing input is saved under fuzz/artifacts/<target>/ and
# makes the script exit non-zero after the other targets have run.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 allows them on stable Rust, for its commands only.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
cargo_fuzz_version=0.13.2

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz_version" ]; then
    cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi

targets=(safetensors_header safetensors_file shard_index model_configs batch_manifest request_fields media_sniff)
RUSTC_BOOTSTRAP=1 cargo fuzz build
failed=()
for target in "${targets[@]}"; do
    seeds=("seeds/$target")
    # The tiny model's real text encoder weights: a valid file for the fuzzer to truncate and corrupt.
    [ "$target" = safetensors_file ] && seeds+=(../models/tiny/wan21-tiny-a/text_encoder)
    mkdir -p "corpus/$target" target/tmp
    # The targets' scratch model folders outlive the process (libFuzzer exits without destructors).
    scratch=$(mktemp -d target/tmp/run.XXXXXX)
    echo "== $target: ${seconds}s" >&2
    # -timeout: an input that takes over 10 s is a hang. -rss_limit_mb also caps any one allocation.
    if ! TMPDIR="$PWD/$scratch" RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$target")
    fi
    rm -rf "$scratch"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashes found by: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crashes in ${#targets[@]} targets, ${seconds}s each" >&2
