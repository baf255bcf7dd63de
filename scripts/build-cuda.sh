#!/usr/bin/env bash
# Builds the GPU binary (`--features cuda,cudnn`, and FlashAttention-3 for Hopper: `flash-attn-v3`) on any Linux
# x86-64 machine, with or without a GPU:
#   bash scripts/build-cuda.sh            # release build: target/release/kinetoscope
#   bash scripts/build-cuda.sh check      # type-check only (what CI runs)
#   bash scripts/build-cuda.sh bundle     # target/gpu-bundle.tar.xz: what benches/gpu/run.sh runs on a GPU machine
# The CUDA 13.0 toolchain and cuDNN 9 come from pinned PyPI wheels into $KINETOSCOPE_CUDA_HOME
# (default ~/.cache/kinetoscope/cuda-13.0). No driver is needed to build: the binary links against a stub
# libcuda.so generated from cuda.h, and uses the real driver's library at run time.
# CUDA_COMPUTE_CAP picks the GPU generation: 90 (H100/H200, the default) or 80 (A100).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-build}
home=${KINETOSCOPE_CUDA_HOME:-$HOME/.cache/kinetoscope/cuda-13.0}
requirements=scripts/cuda-requirements.txt

bash scripts/install-deps.sh
if ! cmp -s "$requirements" "$home/installed.txt"; then
    echo "installing the CUDA 13.0 toolchain into $home" >&2
    rm -rf "$home/venv" "$home/link"
    python3 -m venv "$home/venv"
    "$home/venv/bin/pip" install -q --no-deps --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$home/installed.txt"
fi
site=$(echo "$home"/venv/lib/python3*/site-packages)
cu=$site/nvidia/cu13
cudnn=$site/nvidia/cudnn/lib

# The linker wants unversioned names; the wheels ship only versioned ones.
link="$home/link"
mkdir -p "$link"
for lib in cudart cublas cublasLt nvrtc; do ln -sf "$cu/lib/lib$lib.so.13" "$link/lib$lib.so"; done
ln -sf "$cu/lib/libcurand.so.10" "$link/libcurand.so"
ln -sf "$cudnn/libcudnn.so.9" "$link/libcudnn.so"

# A stub libcuda.so.1 exporting every driver API function cuda.h declares (and the versioned names its
# macros map them to), so that linking succeeds without a driver installed.
if [ ! -f "$link/libcuda.so" ] || [ "$cu/include/cuda.h" -nt "$link/libcuda.so" ]; then
    {
        grep -oE '^\s*(CUresult|CUDAAPI)?\s*CUresult\s+CUDAAPI\s+cu[A-Za-z0-9_]+' "$cu/include/cuda.h" | grep -oE 'cu[A-Za-z0-9_]+$'
        grep -oE '^#define\s+cu[A-Za-z0-9_]+\s+cu[A-Za-z0-9_]+' "$cu/include/cuda.h" | awk '{print $3}'
    } | sort -u | awk '{printf "int %s(void) { return 999; }\n", $1}' > "$link/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda_stub.c"
fi

export PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_HOME="$cu"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# Every crate names the same GPU features: cuDNN for the VAE's convolutions everywhere, and on Hopper (sm_90a)
# attention by FlashAttention-3's kernels, built against CUTLASS 3.6 from its wheel. The compiled kernels are kept
# between builds (they take minutes of nvcc) in a folder named after the compiler and CUTLASS pins that made them.
gpu="cuda cudnn"
if [ "$CUDA_COMPUTE_CAP" -ge 90 ]; then
    gpu="cudnn flash-attn-v3"
    export KINETOSCOPE_CUTLASS_DIR="$site/cutlass_library/source"
    pins=$(grep -E '^(nvidia-cuda-nvcc|nvidia-nvvm|nvidia-cuda-crt|nvidia-cutlass)==' "$requirements" | sha256sum | cut -c1-12)
    export CANDLE_FLASH_ATTN_BUILD_DIR="$home/flash-attn-v3-sm$CUDA_COMPUTE_CAP-$pins"
    mkdir -p "$CANDLE_FLASH_ATTN_BUILD_DIR"
fi
export LIBRARY_PATH="$link:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CPATH="$cu/include${CPATH:+:$CPATH}"

case "$mode" in
    check) cargo check --locked --workspace --all-targets --features "$(printf 'kinetoscope-cli/%s ' $gpu)" ;;
    build)
        cargo build --locked --release -p kinetoscope-cli --features "$gpu"
        echo "built target/release/kinetoscope (CUDA, sm_$CUDA_COMPUTE_CAP); at run time put the CUDA 13 libraries and cuDNN 9 on LD_LIBRARY_PATH (here: $cu/lib:$cudnn)" >&2
        ;;
    bundle)
        # The device machines have no cargo: the kernel tests and bench, the GPU parity check and Kinetoscope's
        # half of the diffusers comparison, built here and stripped, with the diffusers wheel and the commit.
        bundle=target/gpu-bundle
        rm -rf "$bundle"
        mkdir -p "$bundle/wheels"
        executables() {
            cargo "$@" --locked --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])'
        }
        {
            executables test --release --no-run -p kinetoscope-kernels --features "$gpu"
            executables bench --no-run -p kinetoscope-kernels --features "$gpu" --bench kernels
            executables bench --no-run -p kinetoscope --features "$gpu" --bench gpu_parity --bench gpu_vs_diffusers
        } | while read -r name path; do
            cp "$path" "$bundle/$name"
            strip "$bundle/$name"
        done
        commit=$(git rev-parse HEAD)
        if [ -n "$(git status --porcelain --untracked-files=no)" ]; then commit="$commit-dirty"; fi
        echo "$commit" > "$bundle/COMMIT"
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 -d "$bundle/wheels" diffusers==0.42.1
        # Every binary embeds candle's PTX (40-55 MB each, stripped); compressed as one stream the copies go
        # (461 MB → 30 MB with FlashAttention-3 and cuDNN linked in), within the 64 MiB a device machine is sent.
        tar -C target -cf - gpu-bundle | xz -9e -T1 > "$bundle.tar.xz"
        du -sh "$bundle" "$bundle.tar.xz" >&2
        ;;
    *) echo "usage: $0 [build|check|bundle]" >&2; exit 2 ;;
esac
