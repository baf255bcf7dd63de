#!/usr/bin/env bash
# A throwaway S3-compatible server on loopback (s3s-fs: the S3 API over a local folder), for the object-storage
# tests and for trying `--bucket` on one machine.
#
#   eval "$(bash scripts/s3.sh start /tmp/kt-s3)"   # exports KINETOSCOPE_TEST_BUCKET and the AWS_* variables
#   bash scripts/s3.sh stop /tmp/kt-s3              # stops it and removes the folder
#
# The server is installed on first use, pinned, under target/tools (a cargo install from crates.io).
set -euo pipefail

action=${1:?usage: s3.sh start|stop DIR}
dir=${2:?usage: s3.sh start|stop DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
tools=$root/target/tools
server=$tools/bin/s3s-fs

case "$action" in
start)
    if [ ! -x "$server" ]; then
        echo "installing s3s-fs 0.14.1 under $tools" >&2
        cargo install --quiet --locked --version 0.14.1 --features binary s3s-fs --root "$tools" >&2
    fi
    # The bucket is a folder under the server's root.
    mkdir -p "$dir/data/kinetoscope"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    key=kinetoscope-test
    secret=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    "$server" --host 127.0.0.1 --port "$port" --access-key "$key" --secret-key "$secret" "$dir/data" \
        >"$dir/server.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true AWS_REGION=us-east-1"
            echo "export AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret"
            echo "export KINETOSCOPE_TEST_BUCKET=s3://kinetoscope"
            exit 0
        fi
        kill -0 "$(cat "$dir/pid")" 2>/dev/null || break
        sleep 0.1
    done
    echo "s3s-fs did not start on 127.0.0.1:$port:" >&2
    cat "$dir/server.log" >&2
    exit 1
    ;;
stop)
    [ ! -f "$dir/pid" ] || kill "$(cat "$dir/pid")" 2>/dev/null || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: s3.sh start|stop DIR" >&2
    exit 2
    ;;
esac
