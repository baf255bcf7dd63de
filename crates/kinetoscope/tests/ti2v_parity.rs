//! Wan 2.2 TI2V against diffusers on the tiny TI2V fixtures (models/tiny/FIXTURES.md): text-to-video against
//! `WanPipeline` with `expand_timesteps`, image-to-video against `WanImageToVideoPipeline` with
//! `expand_timesteps`, from the same initial noise. Per stage (the image's latent, the denoised latents) within
//! 1e-4 relative error, the frames within 2e-3 absolute.

mod common;

use std::ops::ControlFlow;

use common::{
    assert_frames, assert_relative, assert_text_to_video_matches, model_dir, noise_file, reference, reference_request,
    TI2V_MODELS,
};
use kinetoscope::{GenerateRequest, ImageRequest, InputVideo, LoadOptions, Pipeline};

#[test]
fn text_to_video_matches_diffusers() {
    for model in TI2V_MODELS {
        let pipeline = Pipeline::load(&model_dir(model), &LoadOptions::default()).unwrap();
        assert!(pipeline.takes_image());
        assert_text_to_video_matches(&pipeline, model);
    }
}

#[test]
fn image_to_video_matches_diffusers() {
    for model in TI2V_MODELS {
        let pipeline = Pipeline::load(&model_dir(model), &LoadOptions::default()).unwrap();
        let r = reference(model, "image_to_video.safetensors");
        let dir = tempfile::tempdir().unwrap();
        let base = GenerateRequest { latents: Some(noise_file(&r["noise"], dir.path())), ..reference_request(model) };
        let image = r["image"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let image = InputVideo { frames: image, num_frames: 1, height: base.height, width: base.width };
        let request = ImageRequest { base: base.clone(), image: &image, last_image: None };

        let condition = pipeline.image_latents(&image, &base).unwrap();
        assert_relative(model, "image latents", &condition, &r["condition"]);
        let latents = pipeline.image_to_video_latents(&request, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_relative(model, "image-to-video final latents", &latents, &r["final_latents"]);
        assert_frames(model, "image-to-video", pipeline.image_to_video(&request).unwrap().frames, &r["frames"]);
    }
}

/// A Wan 2.1 model has no per-token timesteps to hold an image with: the request is refused by field, and an
/// image at another size than the video's is refused before any work.
#[test]
fn images_are_refused_where_they_cannot_apply() {
    let wan21 = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    assert!(!wan21.takes_image());
    let base = reference_request("wan21-tiny-a");
    let image = InputVideo {
        frames: vec![0.5; base.height * base.width * 3],
        num_frames: 1,
        height: base.height,
        width: base.width,
    };
    let err = wan21.image_to_video(&ImageRequest { base, image: &image, last_image: None }).unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert!(err.to_string().contains("image") && err.to_string().contains("text only"), "{err}");

    let ti2v = Pipeline::load(&model_dir("wan22-ti2v-tiny-a"), &LoadOptions::default()).unwrap();
    let base = reference_request("wan22-ti2v-tiny-a");
    let err = ti2v.image_to_video(&ImageRequest { base, image: &image, last_image: None }).unwrap_err();
    assert!(err.to_string().contains("fit it first"), "{err}");
}
