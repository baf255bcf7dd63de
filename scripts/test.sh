#!/usr/bin/env bash
# The project's tests: formatting, lints, and every unit, parity and end-to-end test (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets (their own workspace, run by scripts/fuzz.sh) compile parts of the crates by path: keep them
# compiling.
cargo check --manifest-path fuzz/Cargo.toml --bins --locked
# The job store's suite and the deployment tests run on PostgreSQL too: throwaway servers on loopback (one plain,
# one that takes TLS only), required; and the object storage tests on a throwaway S3-compatible server, required.
pg=$(mktemp -d)
pg_tls=$(mktemp -d)
s3=$(mktemp -d)
log=$(mktemp)
trap 'bash scripts/postgres.sh stop "$pg"; bash scripts/postgres.sh stop "$pg_tls"; bash scripts/s3.sh stop "$s3"; rm -f "$log"' EXIT
eval "$(bash scripts/postgres.sh start "$pg")"
eval "$(POSTGRES_TLS=on bash scripts/postgres.sh start "$pg_tls")"
eval "$(bash scripts/s3.sh start "$s3")"
export KINETOSCOPE_REQUIRE_POSTGRES=1 KINETOSCOPE_REQUIRE_S3=1
# Unit, parity, end-to-end and doc tests; examples are built, benchmarks only linted above.
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole workspace (cargo prints one per test binary, the last often a doc-test
# binary with nothing in it).
summary=$(awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed", p, f }' "$log")
# The server as the official openai SDK sees it (a pinned virtual environment, made on first use).
sdk=$(bash scripts/test-server-sdk.sh | tail -n 1)
# The GPU build must keep compiling even where no GPU is (CI has none): type-check it with the CUDA toolchain.
bash scripts/build-cuda.sh check
echo "$summary; $sdk"
