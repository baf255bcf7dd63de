//! Few-step, CFG-free generation against diffusers 0.42.1 (`models/tiny/make_lora_fixtures.py`, FIXTURES.md):
//! wan21-tiny-a for 4 steps at guidance 1 (no unconditional pass) with flow-match Euler at shift 5 over an
//! explicit schedule, as `set_timesteps(timesteps=[1000, 750, 500, 250])` gives it (the network sees the
//! timesteps as given, the sigmas shifted) and as `sigmas=[1, 0.75, 0.5, 0.25]` gives it (the network sees the
//! shifted sigmas: lightx2v's recipe), from the same noise; the denoised latents within 1e-4 relative error,
//! the frames within 2e-3.

mod common;

use common::{assert_frames, assert_relative, denoised, model_dir, noise_file, reference, reference_request};
use kinetoscope::scheduler::Schedule;
use kinetoscope::{GenerateRequest, LoadOptions, Pipeline};

#[test]
fn explicit_schedules_without_guidance_match_diffusers() {
    let model = "wan21-tiny-a";
    let pipeline = Pipeline::load(&model_dir(model), &LoadOptions::default()).unwrap();
    let r = reference("lora", "few_step.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let base = GenerateRequest {
        latents: Some(noise_file(&r["latents"], dir.path())),
        steps: 4,
        guidance_scale: 1.0,
        shift: Some(5.0),
        ..reference_request(model)
    };
    for (variant, schedule) in [
        ("", Schedule::Timesteps(vec![1000.0, 750.0, 500.0, 250.0])),
        ("warped_", Schedule::Sigmas(vec![1.0, 0.75, 0.5, 0.25])),
    ] {
        let request = GenerateRequest { schedule: Some(schedule), ..base.clone() };
        let latents = denoised(&pipeline, &request, &mut |_| {});
        assert_relative(
            model,
            &format!("{variant}few-step final latents"),
            &latents,
            &r[&format!("{variant}final_latents")],
        );
        if variant.is_empty() {
            assert_frames(model, "few-step", pipeline.generate(&request).unwrap().frames, &r["frames"]);
        }
    }
}
