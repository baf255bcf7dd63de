//! With the `cuda` feature: every kernel in `kernels/` compiled to PTX in `OUT_DIR` by nvcc (on `PATH`, or
//! `$NVCC`), for the virtual architecture `compute_$CUDA_COMPUTE_CAP` (default 80: Ampere, and Hopper through
//! the driver's JIT). Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["activations", "flash_attention", "norms"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    let cap: u32 = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| panic!("CUDA_COMPUTE_CAP={text:?}: expected e.g. 80 or 90")),
        Err(_) => 80,
    };
    // The kernels use mma.sync on bf16, which needs sm_80.
    assert!(cap >= 80, "CUDA_COMPUTE_CAP={cap}: Kinetoscope's kernels need compute capability 8.0 or newer");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for kernel in KERNELS {
        let source = root.join(format!("{kernel}.cu"));
        println!("cargo::rerun-if-changed={}", source.display());
        let ptx = out.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {nvcc} (the CUDA compiler; scripts/build-cuda.sh installs it): {e}")
            });
        assert!(status.success(), "{nvcc} failed on {}", source.display());
    }
}
