//! The whole pipeline against `WanPipeline` from the same initial noise: the denoised latents within 1e-4
//! relative error, the frames within 2e-3 absolute.

mod common;

use std::ops::ControlFlow;

use candle_core::Tensor;
use common::{max_abs_error, model_dir, reference, reference_request, relative_error, MODELS};
use kinetoscope::{LoadOptions, Pipeline};

#[test]
fn pipeline_matches_diffusers() {
    for model in MODELS {
        let pipeline = Pipeline::load(&model_dir(model), &LoadOptions::default()).unwrap();
        let r = reference(model, "pipeline.safetensors");
        let dir = tempfile::tempdir().unwrap();
        let noise = dir.path().join("noise.safetensors");
        candle_core::safetensors::save(&[("latents", r["latents"].clone())].into_iter().collect(), &noise).unwrap();
        let request = kinetoscope::GenerateRequest { latents: Some(noise), ..reference_request(model) };

        // Stage by stage: the denoised latents.
        let text = Tensor::cat(
            &[
                pipeline.encode_prompt(&request.prompt, request.max_sequence_length).unwrap(),
                pipeline.encode_prompt(&request.negative_prompt, request.max_sequence_length).unwrap(),
            ],
            0,
        )
        .unwrap();
        let latents = pipeline.initial_latents(&request).unwrap();
        let latents = pipeline.denoise(latents, &text, &request, &mut |_| ControlFlow::Continue(())).unwrap();
        let err = relative_error(&latents, &r["final_latents"]);
        println!("{model}: final latents relative error {err:.2e}");
        assert!(err < 1e-4, "{model}: final latents relative error {err}");

        // End to end: the frames.
        let video = pipeline.generate(&request).unwrap();
        let want = &r["frames"];
        let got = Tensor::from_vec(video.frames, want.shape(), &candle_core::Device::Cpu).unwrap();
        let err = max_abs_error(&got, want);
        println!("{model}: frames max abs error {err:.2e}");
        assert!(err < 2e-3, "{model}: frames max abs error {err}");
    }
}

#[test]
fn a_seed_repeats_and_cancel_stops() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let request = kinetoscope::GenerateRequest { steps: 2, seed: 11, ..reference_request("wan21-tiny-a") };
    let a = pipeline.generate(&request).unwrap();
    let b = pipeline.generate(&request).unwrap();
    assert_eq!(a.frames, b.frames);
    let c = pipeline.generate(&kinetoscope::GenerateRequest { seed: 12, ..request.clone() }).unwrap();
    assert_ne!(a.frames, c.frames);

    let err = pipeline.generate_with_progress(&request, &mut |p| {
        if p.step == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(matches!(err, Err(kinetoscope::Error::Cancelled { step: 1, steps: 2 })), "{err:?}");
}
