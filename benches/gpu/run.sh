#!/usr/bin/env bash
# On a GPU machine with PyTorch (CUDA 13) and no cargo or network, from the repo root, with
# target/gpu-bundle.tar.xz built beforehand by `bash scripts/build-cuda.sh bundle` and carried along:
#   bash benches/gpu/run.sh [kernels] [parity] [bench] [bench14]     (default: kernels parity bench)
# kernels: the CUDA kernels' tests against the plain path (and cuDNN's 3D convolution against a CPU reference) and
# their bench; parity: the tiny fixtures on the GPU in f32 and bf16 against diffusers' references, with the VAE's
# convolutions by cuDNN and again by im2col; bench: Kinetoscope against diffusers' WanPipeline at 832×480×81 on a
# random-weight Wan 2.1 1.3B (benches/gpu/bench.py), and Kinetoscope's decode again by im2col; bench14: the same on
# 14B's configuration.
# Logs and results go to $OUT (default /tmp/kinetoscope-gpu); copy results.json to
# benches/results/gpu-vs-diffusers.json and the figures to benches/RESULTS.md.
# kernels also runs compute-sanitizer's memcheck and racecheck on the small kernel tests where the image has it
# (COMPUTE_SANITIZER=path to name it; SANITIZER=0 to skip; SANITIZER_TIMEOUT=seconds a run, default 60).
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=${BUNDLE:-target/gpu-bundle}
out=${OUT:-/tmp/kinetoscope-gpu}
work=${WORK:-/tmp/kinetoscope-bench}
steps=${STEPS:-10}
mkdir -p "$out" "$work"
if [ ! -x "$bundle/gpu_parity" ] && [ -f "$bundle.tar.xz" ]; then
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
        "$bundle.tar.xz" "$(dirname "$bundle")"
fi
[ -x "$bundle/gpu_parity" ] || { echo "no $bundle: build it with bash scripts/build-cuda.sh bundle" >&2; exit 2; }
export KINETOSCOPE_COMMIT=$(cat "$bundle/COMMIT")
# The CUDA 13 libraries the binaries link against (cudart, cuBLAS, cuBLASLt, cuRAND, NVRTC, cuDNN 9) come with
# PyTorch's wheels: every nvidia/*/lib folder, wherever the wheels put them.
cuda_libs=$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)})))')
export LD_LIBRARY_PATH="$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if missing=$(ldd "$bundle/gpu_parity" | grep "not found"); then
    echo "libraries the binaries need and this machine lacks (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
    echo "$missing" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1 KINETOSCOPE_FIXTURES="$PWD/models/tiny"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
echo "commit $KINETOSCOPE_COMMIT" | tee -a "$out/device.txt"

status=0
run() { # name, command...: logged to $OUT/name.log; a failure is reported and the next part still runs
    local name=$1
    shift
    echo "== $name" >&2
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        echo "== $name FAILED" >&2
        status=1
    fi
}

find_sanitizer() { # compute-sanitizer's path, or nothing: a CUDA toolkit's, or the nvidia-cuda-sanitizer-api wheel's
    command -v compute-sanitizer && return
    local candidate
    for candidate in ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda*/bin/compute-sanitizer \
        /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
        [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
    python3 -c 'import glob, os, nvidia
found = [p for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "compute-sanitizer"), recursive=True)
         if os.path.isfile(p) and os.access(p, os.X_OK)]
print(found[0] if found else "")' 2>/dev/null || true
}

sanitize() { # sanitizer tool binary test-filter...: one compute-sanitizer run of a test binary, capped in time
    local sanitizer=$1 tool=$2 binary=$3 limit=${SANITIZER_TIMEOUT:-60} rc=0
    shift 3
    timeout "$limit" "$sanitizer" --tool "$tool" --error-exitcode 1 "$binary" --test-threads=1 "$@" || rc=$?
    [ "$rc" -ne 124 ] || echo "compute-sanitizer --tool $tool stopped after $limit s (SANITIZER_TIMEOUT)" >&2
    return "$rc"
}

bench() { # model label
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$bundle"/wheels/*.whl
    export PYTHONPATH=/tmp/site
    run "checkpoint-$1" python3 benches/gpu/bench.py checkpoint "$work/ckpt-$1" --model "$1"
    run "diffusers-$1" python3 benches/gpu/bench.py diffusers "$work/ckpt-$1" "$work/run-$1" --steps "$steps"
    run "kinetoscope-$1" "$bundle/gpu_vs_diffusers" --model "$work/ckpt-$1" --work "$work/run-$1" --steps "$steps"
    run "kinetoscope-decode-im2col-$1" env KINETOSCOPE_CONV=im2col \
        "$bundle/gpu_vs_diffusers" --model "$work/ckpt-$1" --work "$work/run-$1" --only decode
    run "report-$1" python3 benches/gpu/bench.py report "$work/run-$1" "$out/results-$1.json"
    rm -rf "$work/ckpt-$1"
}

parts=${*:-kernels parity bench}
for part in $parts; do
    case "$part" in
        kernels)
            run kernel-tests-flash "$bundle/flash_attention" --nocapture
            run kernel-tests-norms "$bundle/norms" --nocapture
            run kernel-tests-activations "$bundle/activations" --nocapture
            run kernel-tests-conv3d "$bundle/conv3d" --nocapture
            # Out-of-bounds accesses and shared-memory races, where the image has compute-sanitizer: only the small
            # cases (it is 10-100× slower; the 32,760-token one is left out), each run capped at $SANITIZER_TIMEOUT s
            # so that the four stay within ~4 minutes at worst. SANITIZER=0 skips them.
            sanitizer=${COMPUTE_SANITIZER:-$(find_sanitizer)}
            if [ "${SANITIZER:-1}" = 0 ]; then
                echo "== SANITIZER=0: memcheck and racecheck not run" | tee "$out/sanitizer.log" >&2
            elif [ -n "$sanitizer" ]; then
                echo "== compute-sanitizer: $sanitizer" | tee "$out/sanitizer.log" >&2
                for tool in memcheck racecheck; do
                    run "sanitizer-$tool-flash" sanitize "$sanitizer" "$tool" "$bundle/flash_attention" \
                        strided_misaligned_and_peaked_inputs broadcast_keys_and_values empty_queries_or_keys_are_refused
                    run "sanitizer-$tool-activations" sanitize "$sanitizer" "$tool" "$bundle/activations" \
                        bias_gelu_is_accurate_in_the_negative_tail bias_gelu_saturates_without_nan
                done
                # Out-of-bounds accesses around cuDNN's convolution (the output and workspace sizes are ours).
                run sanitizer-memcheck-conv3d sanitize "$sanitizer" memcheck "$bundle/conv3d" strided_input_is_taken
            else
                echo "== compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin, Python's nvidia" \
                    "packages; or set COMPUTE_SANITIZER): memcheck and racecheck not run" | tee "$out/sanitizer.log" >&2
            fi
            run kernel-bench "$bundle/kernels" --bench
            ;;
        parity)
            run parity env GPU_PARITY_JSON="$out/parity.json" "$bundle/gpu_parity"
            run parity-im2col env KINETOSCOPE_CONV=im2col GPU_PARITY_JSON="$out/parity-im2col.json" "$bundle/gpu_parity"
            ;;
        bench) bench 1.3b ;;
        bench14) bench 14b ;;
        *) echo "unknown part $part: expected kernels, parity, bench or bench14" >&2; exit 2 ;;
    esac
done
exit $status
