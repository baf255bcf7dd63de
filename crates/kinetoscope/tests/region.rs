//! Regenerating a masked region of a clip (`Pipeline::redo_region`) on the tiny model, from the video-to-video
//! reference's frames and noise: every pixel outside the mask is the input's exactly, the region changes; an empty
//! mask gives the input back and a full one the text-to-video run from the same noise.

mod common;

use common::{model_dir, noise_file, reference, tiny};
use kinetoscope::{GenerateRequest, InputVideo, LoadOptions, Pipeline, RegionMask, RegionRequest};

fn setup(dir: &std::path::Path) -> (Pipeline, GenerateRequest, InputVideo) {
    let path = tiny().join("reference/wan21-tiny-a/video_to_video.json");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let r = reference("wan21-tiny-a", "video_to_video.safetensors");
    let (num_frames, height, width, _) = r["input_frames"].dims4().unwrap();
    let frames = r["input_frames"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let request = GenerateRequest {
        prompt: s["prompt"].as_str().unwrap().into(),
        negative_prompt: s["negative_prompt"].as_str().unwrap().into(),
        steps: 4,
        guidance_scale: 5.0,
        latents: Some(noise_file(&r["noise"], dir)),
        ..Default::default()
    };
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    (pipeline, request, InputVideo { frames, num_frames, height, width })
}

#[test]
fn outside_the_mask_every_pixel_is_the_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let (pipeline, base, input) = setup(dir.path());
    let shape = (input.num_frames, input.height, input.width);
    let mask = RegionMask::rectangle(shape, (16, 8, 16, 16), 2..7).unwrap();
    let (video, report) = pipeline
        .redo_region(&RegionRequest {
            base: base.clone(),
            input: &input,
            mask: &mask,
            reference_images: &[],
            conditioning_scale: 1.0,
        })
        .unwrap();
    assert_eq!(report.unmasked_max_abs, 0.0);
    assert_eq!((report.masked_pixels, report.latent_cells[0]), (5 * 16 * 16, 2 * 2 * 2));
    let mut changed = 0.0f32;
    for ((out, source), m) in video.frames.chunks_exact(3).zip(input.frames.chunks_exact(3)).zip(&mask.values) {
        for (o, s) in out.iter().zip(source) {
            if *m == 0.0 {
                assert_eq!(o, s);
            } else {
                changed = changed.max((o - s).abs());
            }
        }
    }
    assert!(changed > 0.05, "the region changes: {changed}");
    assert!(report.seam_gradient.is_finite() && report.seam_gradient > 0.0, "{report:?}");

    // Nothing masked: the input back, exactly.
    let empty = RegionMask { values: vec![0.0; mask.values.len()], ..mask.clone() };
    let (video, _) = pipeline
        .redo_region(&RegionRequest {
            base: base.clone(),
            input: &input,
            mask: &empty,
            reference_images: &[],
            conditioning_scale: 1.0,
        })
        .unwrap();
    assert_eq!(video.frames, input.frames);

    // Everything masked: text-to-video from the same noise.
    let full = RegionMask { values: vec![1.0; mask.values.len()], ..mask };
    let (video, _) = pipeline
        .redo_region(&RegionRequest {
            base: base.clone(),
            input: &input,
            mask: &full,
            reference_images: &[],
            conditioning_scale: 1.0,
        })
        .unwrap();
    let plain = pipeline
        .generate(&GenerateRequest { num_frames: input.num_frames, height: input.height, width: input.width, ..base })
        .unwrap();
    let err = video.frames.iter().zip(&plain.frames).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(err < 1e-4, "a full mask is text-to-video: max abs {err}");
}

#[test]
fn a_mask_of_another_size_or_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (pipeline, base, input) = setup(dir.path());
    let small = RegionMask::rectangle((input.num_frames, 16, 16), (0, 0, 8, 8), 0..1).unwrap();
    let err = pipeline
        .redo_region(&RegionRequest {
            base: base.clone(),
            input: &input,
            mask: &small,
            reference_images: &[],
            conditioning_scale: 1.0,
        })
        .unwrap_err();
    assert!(err.to_string().contains("mask"), "{err}");

    // Reference images and a scale are a VACE model's.
    let mask = RegionMask::rectangle((input.num_frames, input.height, input.width), (16, 8, 16, 16), 2..7).unwrap();
    let request = RegionRequest { base, input: &input, mask: &mask, reference_images: &[], conditioning_scale: 0.5 };
    let err = pipeline.redo_region(&request).unwrap_err().to_string();
    assert!(err.contains("conditioning_scale") && err.contains("need a Wan VACE model"), "{err}");
}

/// Against the same recipe run with diffusers' components (`models/tiny/make_region_fixtures.py`): the latent mask
/// and the blending weights exactly, the denoised latents within 1e-4 relative error, the frames within 2e-3, and
/// the seam's gradient.
#[test]
fn a_region_edit_matches_the_diffusers_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (pipeline, base, input) = setup(dir.path());
    let r = reference("region", "region.safetensors");
    let values = r["mask"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mask = RegionMask { num_frames: input.num_frames, height: input.height, width: input.width, values };
    let to_vec = |key: &str| r[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(mask.latent(4, 8).0, to_vec("latent_mask"));
    assert_eq!(mask.alpha(), to_vec("alpha"));

    let request = RegionRequest { base, input: &input, mask: &mask, reference_images: &[], conditioning_scale: 1.0 };
    let (latents, _, cells) = pipeline.region_latents(&request, &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
    assert_eq!(cells, [8, 40]);
    common::assert_relative("region", "final latents", &latents, &r["final_latents"]);
    let (video, report) = pipeline.redo_region(&request).unwrap();
    common::assert_frames("region", "frames", video.frames, &r["frames"]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny().join("reference/region/region.json")).unwrap()).unwrap();
    let seam = json["checks"]["seam_mean_gradient"].as_f64().unwrap();
    assert!((f64::from(report.seam_gradient) - seam).abs() < 2e-3, "seam {} against {seam}", report.seam_gradient);
}
