//! FastVideo's DMD sampling (FastWan's 3 steps at 1000, 757, 522, no guidance) on the tiny model against the same
//! sampler run with diffusers' components (`models/tiny/make_dmd_fixtures.py`, `models/tiny/DMD.md`), replaying the
//! reference's noise between steps: the denoised latents within 1e-4 relative error, the frames within 2e-3.

mod common;

use common::{assert_frames, assert_relative, denoised, model_dir, reference, tiny};
use kinetoscope::scheduler::Schedule;
use kinetoscope::{GenerateRequest, LoadOptions, Pipeline};

#[test]
fn dmd_sampling_matches_fastvideos_recipe() {
    let r = reference("dmd", "dmd.safetensors");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("reference/dmd/dmd.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.safetensors");
    let tensors = [("latents", r["latents"].clone()), ("renoise", r["renoise"].clone())].into_iter().collect();
    candle_core::safetensors::save(&tensors, &noise).unwrap();
    let request = GenerateRequest {
        prompt: settings["prompt"].as_str().unwrap().into(),
        height: 32,
        width: 48,
        num_frames: 9,
        steps: 3,
        guidance_scale: 1.0,
        schedule: Some(Schedule::Dmd(vec![1000.0, 757.0, 522.0])),
        latents: Some(noise),
        ..Default::default()
    };
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    assert_relative("dmd", "final latents", &denoised(&pipeline, &request, &mut |_| {}), &r["final_latents"]);
    assert_frames("dmd", "frames", pipeline.generate(&request).unwrap().frames, &r["frames"]);

    // Without given noise, the steps between are seeded: the same seed, the same video.
    let seeded = GenerateRequest { latents: None, seed: 5, ..request };
    let a = denoised(&pipeline, &seeded, &mut |_| {});
    assert_eq!(common::max_abs_error(&a, &denoised(&pipeline, &seeded, &mut |_| {})), 0.0);
}
