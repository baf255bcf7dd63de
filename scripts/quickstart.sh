#!/usr/bin/env bash
# Sets up this machine and generates a video with the small test model that ships in the repo:
# out/quickstart.mp4 (+ out/quickstart.json). With a real model folder, pass --model DIR and a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release -p kinetoscope-cli
mkdir -p out
./target/release/kinetoscope generate \
    --model models/tiny/wan21-tiny-a \
    --prompt "a red fox running through fresh snow" \
    --height 128 --width 192 --frames 17 --steps 10 --seed 42 \
    --output out/quickstart.mp4 "$@"
