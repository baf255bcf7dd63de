#!/usr/bin/env bash
# Installs what building and testing Kinetoscope needs beyond a Rust toolchain: FFmpeg's libraries and
# headers (MP4 through ffmpeg-next, with libx264), libclang for bindgen, pkg-config, and ffprobe for the
# tests, and PostgreSQL's server for the job store's tests (scripts/postgres.sh starts a throwaway one; openssl
# makes its TLS certificates).
# Debian/Ubuntu; idempotent and quiet when everything is already there.
set -euo pipefail

packages=(libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev
          libclang-dev pkg-config ffmpeg postgresql openssl)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # The server package would start a system-wide PostgreSQL; the tests start their own (scripts/postgres.sh).
    # A policy that refuses service starts, for the install only (where none is there already), keeps it
    # stopped, and keeps the install from failing where no init system runs (containers).
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        trap '$sudo rm -f "$policy"' EXIT
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (https://rustup.rs) first" >&2
    exit 1
fi
