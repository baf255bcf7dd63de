//! Shared by the parity tests: where the fixtures are and how outputs are compared.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use kinetoscope::{GenerateRequest, Pipeline};

pub const MODELS: [&str; 2] = ["wan21-tiny-a", "wan21-tiny-b"];

/// Wan 2.2 TI2V: text- and image-to-video in one network.
pub const TI2V_MODELS: [&str; 2] = ["wan22-ti2v-tiny-a", "wan22-ti2v-tiny-b"];

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
        guidance_scale_2: s["guidance_scale_2"].as_f64(),
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

/// `tensor` written as the latents file `noise.safetensors` in `dir`, for a request to start from.
pub fn noise_file(tensor: &Tensor, dir: &Path) -> PathBuf {
    let path = dir.join("noise.safetensors");
    candle_core::safetensors::save(&[("latents", tensor.clone())].into_iter().collect(), &path).unwrap();
    path
}

/// The reference run's request, its initial noise written to a latents file in `dir`.
pub fn request_with_reference_noise(model: &str, dir: &Path) -> GenerateRequest {
    let noise = noise_file(&reference(model, "pipeline.safetensors")["latents"], dir);
    GenerateRequest { latents: Some(noise), ..reference_request(model) }
}

/// The denoised latents of `request` (text-to-video) through the stages' own entry points: the prompts encoded
/// (the negative one below when guidance is on), the initial noise, the loop; `on_step` sees each step.
pub fn denoised(
    pipeline: &Pipeline,
    request: &GenerateRequest,
    on_step: &mut dyn FnMut(kinetoscope::Progress),
) -> Tensor {
    let mut prompts = vec![pipeline.encode_prompt(&request.prompt, request.max_sequence_length).unwrap()];
    if request.guidance_scale > 1.0 {
        prompts.push(pipeline.encode_prompt(&request.negative_prompt, request.max_sequence_length).unwrap());
    }
    let text = Tensor::cat(&prompts, 0).unwrap();
    let latents = pipeline.initial_latents(request).unwrap();
    let mut on_step = |progress| {
        on_step(progress);
        ControlFlow::Continue(())
    };
    pipeline.denoise(latents, &text, request, &mut on_step).unwrap()
}

/// Text-to-video on `pipeline` (loaded from `model`) against the reference pipeline's run from the same noise:
/// the denoised latents within 1e-4 relative error, the frames within 2e-3 absolute.
pub fn assert_text_to_video_matches(pipeline: &Pipeline, model: &str) {
    let r = reference(model, "pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let request = request_with_reference_noise(model, dir.path());

    // Stage by stage: the denoised latents.
    assert_relative(model, "final latents", &denoised(pipeline, &request, &mut |_| {}), &r["final_latents"]);

    // End to end: the frames.
    assert_frames(model, "text-to-video", pipeline.generate(&request).unwrap().frames, &r["frames"]);
}

/// A stage's output against the reference's: the same shape, within 1e-4 relative error.
pub fn assert_relative(model: &str, what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{model} {what}");
    let err = relative_error(got, want);
    println!("{model} {what}: relative error {err:.2e}");
    assert!(err < 1e-4, "{model} {what}: relative error {err}");
}

/// A video's frames (`[F, H, W, 3]` in [0, 1], flat) against the reference's, within 2e-3 absolute.
pub fn assert_frames(model: &str, what: &str, frames: Vec<f32>, want: &Tensor) {
    let got = Tensor::from_vec(frames, want.shape(), &Device::Cpu).unwrap();
    let err = max_abs_error(&got, want);
    println!("{model} {what}: frames max abs error {err:.2e}");
    assert!(err < 2e-3, "{model} {what}: frames max abs error {err}");
}
