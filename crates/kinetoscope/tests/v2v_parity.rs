//! Video-to-video against diffusers' `WanVideoToVideoPipeline` on the text-to-video reference's own frames,
//! with a new prompt and the same noise: the start latents (encoded and noised) and the denoised latents
//! within 1e-4 relative error, the frames within 2e-3 absolute.

mod common;

use std::ops::ControlFlow;

use candle_core::Tensor;
use common::{assert_frames, assert_relative, model_dir, reference, relative_error, tiny, MODELS};
use kinetoscope::{EditRequest, GenerateRequest, InputVideo, LoadOptions, Pipeline};

/// The reference edit's settings and input, its noise written to a latents file in `dir`.
fn reference_edit(model: &str, dir: &std::path::Path) -> (GenerateRequest, InputVideo, f64) {
    let path = tiny().join("reference").join(model).join("video_to_video.json");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let int = |k: &str| s[k].as_u64().unwrap() as usize;
    let mut r = reference(model, "video_to_video.safetensors");
    let noise = dir.join("noise.safetensors");
    let latents = r.remove("noise").unwrap();
    candle_core::safetensors::save(&[("latents", latents)].into_iter().collect(), &noise).unwrap();
    let input = r.remove("input_frames").unwrap();
    let (num_frames, height, width, _) = input.dims4().unwrap();
    let frames = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (
        GenerateRequest {
            prompt: s["prompt"].as_str().unwrap().into(),
            negative_prompt: s["negative_prompt"].as_str().unwrap().into(),
            steps: int("num_inference_steps"),
            guidance_scale: s["guidance_scale"].as_f64().unwrap(),
            max_sequence_length: int("max_sequence_length"),
            latents: Some(noise),
            ..Default::default()
        },
        InputVideo { frames, num_frames, height, width },
        s["strength"].as_f64().unwrap(),
    )
}

#[test]
fn video_to_video_matches_diffusers() {
    for model in MODELS {
        let pipeline = Pipeline::load(&model_dir(model), &LoadOptions::default()).unwrap();
        let r = reference(model, "video_to_video.safetensors");
        let dir = tempfile::tempdir().unwrap();
        let (base, input, strength) = reference_edit(model, dir.path());
        let edit = EditRequest { base, input: &input, strength };

        let (start, first_step) = pipeline.edit_start(&edit).unwrap();
        let err = relative_error(&start, &r["start_latents"]);
        println!("{model}: start latents relative error {err:.2e} (first step {first_step})");
        assert!(err < 1e-4, "{model}: start latents relative error {err}");

        // The loop alone, from diffusers' own start latents.
        let request = edit.generate_request();
        let text = Tensor::cat(
            &[
                pipeline.encode_prompt(&request.prompt, request.max_sequence_length).unwrap(),
                pipeline.encode_prompt(&request.negative_prompt, request.max_sequence_length).unwrap(),
            ],
            0,
        )
        .unwrap();
        let mut steps_run = 0;
        let latents = pipeline
            .denoise_from(r["start_latents"].clone(), &text, &request, first_step, &mut |p| {
                steps_run = p.steps;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(steps_run, request.steps - first_step);
        assert_relative(model, "final latents", &latents, &r["final_latents"]);

        // End to end.
        assert_frames(model, "video-to-video", pipeline.edit(&edit).unwrap().frames, &r["frames"]);
    }
}

#[test]
fn bad_edits_are_named() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (base, input, _) = reference_edit("wan21-tiny-a", dir.path());
    let edit = EditRequest { base, input: &input, strength: 1.5 };

    let err = pipeline.edit(&edit).unwrap_err();
    assert!(err.to_string().contains("strength") && err.to_string().contains("(0, 1]"), "{err}");

    let short = input.clone().take_frames(8);
    let err = pipeline.edit(&EditRequest { input: &short, strength: 0.5, ..edit.clone() }).unwrap_err().to_string();
    assert!(err.contains("input") && err.contains("4k+1"), "{err}");

    let odd = input.fit(20, 48);
    let err = pipeline.edit(&EditRequest { input: &odd, strength: 0.5, ..edit }).unwrap_err().to_string();
    assert!(err.contains("input") && err.contains("height"), "{err}");
}
