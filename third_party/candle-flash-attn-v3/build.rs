// build.rs

// SPDX-License-Identifier: Apache-2.0 OR MIT
// Copyright (c) 2024 Michael Feil
// adapted from https://github.com/huggingface/candle-flash-attn-v1 , Oliver Dehaene
// adapted further in 2025 by Eric Buehler for candle repo.
//
// Licensed under the Apache License, Version 2.0 <LICENSE-APACHE or
// http://www.apache.org/licenses/LICENSE-2.0> or the MIT license
// <LICENSE-MIT or http://opensource.org/licenses/MIT>, at your
// option. This file may not be copied, modified, or distributed
// except according to those terms.
use anyhow::anyhow;
use cudaforge::KernelBuilder;
use std::path::PathBuf;

const CUDA_NVCC_FLAGS: Option<&'static str> = option_env!("CUDA_NVCC_FLAGS");

// Kinetoscope: the forward kernels of the head dims and types Wan's attention uses (bf16, f16; 64, 128), not
// the whole upstream list (1.5-3 h of nvcc on two cores).
const KERNEL_FILES: &[&str] = &[
    "flash_api.cu",
    "flash_fwd_hdim64_fp16_sm90.cu",
    "flash_fwd_hdim64_bf16_sm90.cu",
    "flash_fwd_hdim128_fp16_sm90.cu",
    "flash_fwd_hdim128_bf16_sm90.cu",
];

fn main() -> anyhow::Result<()> {
    // Telling Cargo that if any of these files changes, rebuild.
    println!("cargo:rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    let is_target_msvc = target.contains("msvc");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CANDLE_NVCC_CCBIN");

    for file in KERNEL_FILES {
        println!("cargo:rerun-if-changed=hkernel/{file}");
    }
    println!("cargo:rerun-if-changed=hkernel");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR not set"));
    // You can optionally allow an environment variable to cache the compiled artifacts.
    // If not found, we compile into the standard OUT_DIR.
    let build_dir = match std::env::var("CANDLE_FLASH_ATTN_BUILD_DIR") {
        Err(_) => out_dir.clone(),
        Ok(build_dir) => {
            let path = PathBuf::from(build_dir);
            path.canonicalize()
                .map_err(|_| {
                    anyhow!(
                        "Directory doesn't exist: {} (the current directory is {})",
                        path.display(),
                        std::env::current_dir().unwrap().display()
                    )
                })
                .expect("Unable to obtain build dir!")
        }
    };

    // Kinetoscope: CUTLASS 3.6's headers from the pinned `nvidia-cutlass` wheel (scripts/build-cuda.sh unpacks it
    // and sets the variable) instead of a git clone at build time: builds run without network.
    println!("cargo:rerun-if-env-changed=KINETOSCOPE_CUTLASS_DIR");
    let cutlass = PathBuf::from(std::env::var("KINETOSCOPE_CUTLASS_DIR").map_err(|_| {
        anyhow!("KINETOSCOPE_CUTLASS_DIR must name CUTLASS 3.6's source folder (with include/): run scripts/build-cuda.sh")
    })?);
    if !cutlass.join("include/cutlass/version.h").is_file() {
        return Err(anyhow!("{}: no include/cutlass/version.h (expected CUTLASS 3.6's source folder)", cutlass.display()));
    }

    let kernels: Vec<PathBuf> = KERNEL_FILES
        .iter()
        .map(|f| PathBuf::from("hkernel").join(f))
        .collect();

    let mut builder = KernelBuilder::new()
        .source_files(kernels)
        .out_dir(&build_dir)
        .include_path(cutlass.join("include"))
        .include_path(cutlass.join("tools/util/include"))
        .arg("-std=c++17")
        .arg("-O3")
        .arg("-U__CUDA_NO_HALF_OPERATORS__")
        .arg("-U__CUDA_NO_HALF_CONVERSIONS__")
        .arg("-U__CUDA_NO_BFLOAT16_OPERATORS__")
        .arg("-U__CUDA_NO_BFLOAT16_CONVERSIONS__")
        .arg("-U__CUDA_NO_BFLOAT162_OPERATORS__")
        .arg("-U__CUDA_NO_BFLOAT162_CONVERSIONS__")
        .arg("-D_USE_MATH_DEFINES")
        .args(["--default-stream", "per-thread"])
        .arg("--expt-relaxed-constexpr")
        .arg("--expt-extended-lambda")
        .arg("--use_fast_math")
        .arg("--ptxas-options=-v")
        .arg("--ptxas-options=--verbose,--register-usage-level=10,--warn-on-local-memory-usage")
        // Kinetoscope: every core (about 5 GB of memory per nvcc).
        .thread_percentage(1.0);

    if !is_target_msvc {
        builder = builder.arg("-Xcompiler").arg("-fPIC");
    }

    let compute_cap = builder.get_compute_cap().unwrap_or(80);
    assert!(compute_cap >= 90, "Compute capability must be >=90 (90a)");

    if let Some(cuda_nvcc_flags_env) = CUDA_NVCC_FLAGS {
        builder = builder.arg("--compiler-options");
        builder = builder.arg(cuda_nvcc_flags_env);
    }
    // Our final library name
    let out_file = build_dir.join("libflashattentionv3.a");
    builder.build_lib(out_file)?;

    // Finally, instruct cargo to link your library
    println!("cargo:rustc-link-search={}", build_dir.display());
    println!("cargo:rustc-link-lib=static=flashattentionv3");

    // Link required system libs
    println!("cargo:rustc-link-lib=dylib=cudart");
    if !is_target_msvc {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }

    Ok(())
}
