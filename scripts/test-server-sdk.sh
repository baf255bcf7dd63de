#!/usr/bin/env bash
# `kinetoscope serve` driven by the official openai Python SDK (pinned in
# crates/kinetoscope-server/tests/sdk/requirements.txt), in a virtual environment this script makes; with
# KINETOSCOPE_TEST_POSTGRES set (scripts/postgres.sh), again against API nodes and workers sharing PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KINETOSCOPE_SDK_VENV:-$HOME/.cache/kinetoscope/sdk-venv}"
requirements=crates/kinetoscope-server/tests/sdk/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
cargo build --locked -p kinetoscope-cli
binary="${CARGO_TARGET_DIR:-target}/debug/kinetoscope"
sdk() {
    "$venv/bin/python" crates/kinetoscope-server/tests/sdk/test_openai_sdk.py --binary "$binary" \
        --model models/tiny/wan21-tiny-a --ti2v-model models/tiny/wan22-ti2v-tiny-a \
        --i2v-model models/tiny/wan22-i2v-a14b-tiny "$@"
}
single=$(sdk | tail -n 1)
if [ -n "${KINETOSCOPE_TEST_POSTGRES:-}" ]; then
    echo "$single; $(sdk --postgres "$KINETOSCOPE_TEST_POSTGRES" | tail -n 1)"
else
    echo "$single"
fi
