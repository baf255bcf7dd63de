//! The two-expert and image-to-video models against diffusers 0.42.1 on the tiny fixtures of
//! `models/tiny/make_image_fixtures.py` (models/tiny/FIXTURES.md), from the same initial noise: Wan 2.2 T2V-A14B and
//! I2V-A14B (a high-noise and a low-noise expert, each with its guidance), Wan 2.1 I2V (CLIP image tokens) and
//! FLF2V (a first and a last image). Which expert ran each step equals diffusers'; the condition (mask and image
//! latents), the image encoder's states and the denoised latents are within 1e-4 relative error, the frames within
//! 2e-3 absolute.

mod common;

use std::ops::ControlFlow;

use common::{
    assert_frames, assert_relative, denoised, model_dir, noise_file, reference, reference_request, settings, tiny,
};
use kinetoscope::{
    ExpertPlacement, GenerateRequest, ImageRequest, InputVideo, LoadOptions, ModelShape, Pipeline, Progress,
};

const T2V_A14B: &str = "wan22-t2v-a14b-tiny";
const I2V_A14B: &str = "wan22-i2v-a14b-tiny";
const I2V: &str = "wan21-i2v-tiny";
const FLF2V: &str = "wan21-flf2v-tiny";

fn load(model: &str, experts: ExpertPlacement) -> Pipeline {
    Pipeline::load(&model_dir(model), &LoadOptions { experts, ..LoadOptions::default() }).unwrap()
}

/// The experts diffusers ran, one a step.
fn reference_experts(model: &str) -> Vec<String> {
    settings(model)["experts"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect()
}

/// An 8-bit PNG of the reference run as the frames it was fed.
fn reference_image(model: &str, name: &str) -> InputVideo {
    let image = image::open(tiny().join("reference").join(model).join(name)).unwrap().to_rgb8();
    let (width, height) = image.dimensions();
    InputVideo::from_rgb8(image.as_raw(), 1, height as usize, width as usize).unwrap()
}

/// Runs `run` while recording the expert of each step.
fn with_experts<T>(run: impl FnOnce(&mut dyn FnMut(Progress) -> ControlFlow<()>) -> T) -> (T, Vec<String>) {
    let mut experts = Vec::new();
    let out = run(&mut |progress| {
        experts.push(progress.expert.to_string());
        ControlFlow::Continue(())
    });
    (out, experts)
}

#[test]
fn two_experts_generate_as_diffusers_does() {
    let model = T2V_A14B;
    let pipeline = load(model, ExpertPlacement::Auto);
    assert!(pipeline.shape().two_experts && !pipeline.shape().takes_image);
    let r = reference(model, "pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let request = GenerateRequest { latents: Some(noise_file(&r["noise"], dir.path())), ..reference_request(model) };
    assert_eq!(request.guidance_scale_2, Some(3.0), "the reference's low-noise guidance differs from the high's");

    let video = pipeline.generate(&request).unwrap();
    assert_eq!(video.timings.experts, reference_experts(model));
    assert_frames(model, "two-expert text-to-video", video.frames, &r["frames"]);

    let mut experts = Vec::new();
    let latents = denoised(&pipeline, &request, &mut |progress| experts.push(progress.expert.to_string()));
    assert_eq!(experts, reference_experts(model));
    assert_relative(model, "final latents", &latents, &r["final_latents"]);
}

/// Swapping the experts at the boundary (one on the device at a time) gives the same video as keeping both.
#[test]
fn swapped_experts_give_the_resident_video() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference(I2V_A14B, "pipeline.safetensors");
    let base = GenerateRequest { latents: Some(noise_file(&r["noise"], dir.path())), ..reference_request(I2V_A14B) };
    let image = reference_image(I2V_A14B, "image.png");
    let request = ImageRequest { base, image: &image, last_image: None };
    let latents = |experts| {
        let pipeline = load(I2V_A14B, experts);
        let run = |request: &ImageRequest| pipeline.image_to_video_latents(request, &mut |_| ControlFlow::Continue(()));
        // Twice: the second request starts with the low-noise expert on the device.
        let first = run(&request).unwrap();
        let second = run(&request).unwrap();
        assert_eq!(common::max_abs_error(&first, &second), 0.0);
        first
    };
    let (swapped, resident) = (latents(ExpertPlacement::Swap), latents(ExpertPlacement::Resident));
    assert_eq!(common::max_abs_error(&swapped, &resident), 0.0);
}

#[test]
fn image_to_video_models_generate_as_diffusers_does() {
    for (model, runs) in [(I2V_A14B, &["", "last_"][..]), (I2V, &[""]), (FLF2V, &["last_"])] {
        let pipeline = load(model, ExpertPlacement::Auto);
        let shape = pipeline.shape();
        assert!(shape.takes_image && shape.needs_image, "{model}");
        let r = reference(model, "pipeline.safetensors");
        let image = reference_image(model, "image.png");
        for &run in runs {
            let last_image = (run == "last_").then(|| reference_image(model, "last_image.png"));
            let dir = tempfile::tempdir().unwrap();
            let noise = noise_file(&r[&format!("{run}noise")], dir.path());
            let base = GenerateRequest { latents: Some(noise), ..reference_request(model) };
            let request = ImageRequest { base, image: &image, last_image: last_image.as_ref() };
            let what = |stage: &str| format!("{run}{stage}");

            let (condition, image_states) = pipeline.image_condition(&request).unwrap();
            assert_relative(model, &what("condition"), &condition, &r[&format!("{run}condition")]);
            match r.get(&format!("{run}image_embeds")) {
                Some(want) => assert_relative(model, &what("image states"), &image_states.unwrap(), want),
                None => assert!(image_states.is_none(), "{model}: no image encoder, no image states"),
            }

            let (latents, experts) =
                with_experts(|on_step| pipeline.image_to_video_latents(&request, on_step).unwrap());
            assert_eq!(experts, reference_experts(model), "{model} {run}");
            assert_relative(model, &what("final latents"), &latents, &r[&format!("{run}final_latents")]);
            let frames = pipeline.image_to_video(&request).unwrap().frames;
            assert_frames(model, &what("image-to-video"), frames, &r[&format!("{run}frames")]);
        }
    }
}

/// What each model can be asked, from its configs alone, and requests it can't take refused by field.
#[test]
fn models_say_what_they_take_and_refuse_the_rest() {
    let shape = |model| ModelShape::read(&model_dir(model)).unwrap();
    let takes = |s: ModelShape| (s.takes_image, s.needs_image, s.takes_last_image, s.two_experts);
    assert_eq!(takes(shape(T2V_A14B)), (false, false, false, true));
    assert_eq!(takes(shape(I2V_A14B)), (true, true, true, true));
    assert_eq!(takes(shape(I2V)), (true, true, false, false));
    assert_eq!(takes(shape(FLF2V)), (true, true, true, false));
    assert_eq!(takes(shape("wan21-tiny-a")), (false, false, false, false));

    let field = |e: kinetoscope::Error| match e {
        kinetoscope::Error::InvalidRequest { field, .. } => field,
        other => panic!("expected an invalid request, got {other}"),
    };
    let i2v = load(I2V, ExpertPlacement::Auto);
    assert_eq!(field(i2v.generate(&reference_request(I2V)).unwrap_err()), "image");
    let image = reference_image(I2V, "image.png");
    let request = ImageRequest { base: reference_request(I2V), image: &image, last_image: Some(&image) };
    assert_eq!(field(i2v.image_to_video(&request).unwrap_err()), "last_image");
    let base = GenerateRequest { guidance_scale_2: Some(2.0), ..reference_request(I2V) };
    let request = ImageRequest { base, image: &image, last_image: None };
    assert_eq!(field(i2v.image_to_video(&request).unwrap_err()), "guidance_scale_2");
    let small = InputVideo { frames: vec![0.5; 16 * 16 * 3], num_frames: 1, height: 16, width: 16 };
    let request = ImageRequest { base: reference_request(I2V), image: &small, last_image: None };
    assert_eq!(field(i2v.image_to_video(&request).unwrap_err()), "image");
}
