//! Shared by the parity tests: where the fixtures are, how a component's weights are opened, and how
//! outputs are compared (see `models/tiny/FIXTURES.md`).

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny")
}

/// `component`'s config and a `VarBuilder` over its weights (f32, on the CPU): the single safetensors
/// file, or the shards its index lists.
pub fn load<C: DeserializeOwned>(model: &str, component: &str) -> Result<(C, VarBuilder<'static>)> {
    let dir = tiny().join(model).join(component);
    let config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let mut files = Vec::new();
    for stem in ["diffusion_pytorch_model", "model"] {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if single.is_file() {
            files.push(single);
        } else if index.is_file() {
            let index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)?;
            let shards: BTreeSet<&str> = index["weight_map"]
                .as_object()
                .context("index without weight_map")?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            files.extend(shards.into_iter().map(|s| dir.join(s)));
        }
    }
    // SAFETY: the fixture files are not modified while the tests run.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu)? };
    Ok((config, vb))
}

/// diffusers' outputs for `model`, from `models/tiny/reference/<model>/<file>`.
pub fn reference(model: &str, file: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(tiny().join("reference").join(model).join(file), &Device::Cpu)?)
}

/// ‖got − want‖ / ‖want‖.
pub fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let diff = (got - want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let norm = want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(diff / norm)
}

/// max |got − want| / max |want|: the worst element's error against the reference's scale.
pub fn max_relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale)
}
