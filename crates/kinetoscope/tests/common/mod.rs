//! Shared by the parity tests: where the fixtures are and how outputs are compared.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub const MODELS: [&str; 2] = ["wan21-tiny-a", "wan21-tiny-b"];

pub fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny")
}

/// Copies the folder `from` (a model) to `to`, for tests that damage the copy.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn model_dir(model: &str) -> kinetoscope::ModelDir {
    kinetoscope::ModelDir::open(tiny().join(model).to_str().unwrap()).unwrap()
}

pub fn reference(model: &str, file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(tiny().join("reference").join(model).join(file), &Device::Cpu).unwrap()
}

pub fn settings(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(tiny().join("reference").join(model).join("ref.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The request the reference pipeline ran with.
pub fn reference_request(model: &str) -> kinetoscope::GenerateRequest {
    let s = settings(model);
    let int = |k: &str| s[k].as_u64().unwrap() as usize;
    kinetoscope::GenerateRequest {
        prompt: s["prompt"].as_str().unwrap().into(),
        negative_prompt: s["negative_prompt"].as_str().unwrap().into(),
        height: int("height"),
        width: int("width"),
        num_frames: int("num_frames"),
        steps: int("num_inference_steps"),
        guidance_scale: s["guidance_scale"].as_f64().unwrap(),
        max_sequence_length: int("max_sequence_length"),
        ..Default::default()
    }
}

/// ‖got − want‖ / ‖want‖, in f32.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
    let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    let (got, want) = (f32(got), f32(want));
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    norm(&(&got - &want).unwrap()) / norm(&want)
}

pub fn max_abs_error(got: &Tensor, want: &Tensor) -> f32 {
    (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}
