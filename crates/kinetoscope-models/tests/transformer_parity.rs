//! Parity of `WanTransformer3DModel` with diffusers: one forward on the tiny fixtures' reference inputs
//! (`models/tiny/reference/<model>/transformer.safetensors`, see `models/tiny/FIXTURES.md`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny")
}

/// The transformer's safetensors files: the single file, or the shards its index lists.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("diffusion_pytorch_model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index).with_context(|| format!("reading {}", index.display()))?)?;
    let shards: BTreeSet<&str> = index["weight_map"]
        .as_object()
        .context("index without weight_map")?
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let diff = (got - want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(diff / norm)
}

fn check(model_dir: &Path, reference: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let cfg: Config = serde_json::from_slice(&std::fs::read(model_dir.join("config.json"))?)?;
    let files = weight_files(model_dir)?;
    // SAFETY: the fixture files are not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev)? };
    let model = WanTransformer3DModel::new(&cfg, vb)?;

    let r = candle_core::safetensors::load(reference, &dev)?;
    let out = model.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"])?;
    let want = &r["output"];
    assert_eq!(out.dims(), want.dims());
    let err = relative_error(&out, want)?;
    println!("{}: relative error {err:e}", model_dir.display());
    assert!(err < 1e-4, "{}: relative error {err}", model_dir.display());
    Ok(())
}

fn check_tiny(model: &str) -> Result<()> {
    let tiny = tiny();
    check(&tiny.join(model).join("transformer"), &tiny.join("reference").join(model).join("transformer.safetensors"))
}

#[test]
fn tiny_a_matches_diffusers() -> Result<()> {
    check_tiny("wan21-tiny-a")
}

#[test]
fn tiny_b_sharded_bf16_matches_diffusers() -> Result<()> {
    check_tiny("wan21-tiny-b")
}
