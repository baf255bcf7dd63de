#!/usr/bin/env bash
# Installs what building and testing Kinetoscope needs beyond a Rust toolchain: FFmpeg's libraries and
# headers (MP4 through ffmpeg-next, with libx264), libclang for bindgen, pkg-config, and ffprobe for the
# tests, and PostgreSQL's server for the job store's tests (scripts/postgres.sh starts a throwaway one).
# Debian/Ubuntu; idempotent and quiet when everything is already there.
set -euo pipefail

packages=(libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev
          libclang-dev pkg-config ffmpeg postgresql)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
