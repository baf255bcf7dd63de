//! Wan VACE (`Pipeline::vace`) on the tiny VACE model against diffusers' `WanVACEPipeline`
//! (`models/tiny/make_vace_fixtures.py`): a masked edit, a reference image and a control video, each through the
//! control latents, the denoised latents and the frames; the mask's sub-pixel channels on a soft mask; and the same
//! model behind `redo_region` (masked edits) and `generate` (the prompt alone).

mod common;

use std::ops::ControlFlow;

use candle_core::Tensor;
use common::{model_dir, noise_file, reference, tiny};
use kinetoscope::{GenerateRequest, InputVideo, LoadOptions, Pipeline, RegionMask, RegionRequest, VaceRequest};

struct Fixture {
    pipeline: Pipeline,
    r: std::collections::HashMap<String, Tensor>,
    base: GenerateRequest,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let path = tiny().join("reference/vace/vace.json");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let base = GenerateRequest {
        prompt: s["prompt"].as_str().unwrap().into(),
        negative_prompt: s["negative_prompt"].as_str().unwrap().into(),
        steps: 4,
        guidance_scale: 5.0,
        num_frames: 9,
        height: 32,
        width: 48,
        ..Default::default()
    };
    let pipeline = Pipeline::load(&model_dir("wan21-vace-tiny"), &LoadOptions::default()).unwrap();
    Fixture { pipeline, r: reference("vace", "vace.safetensors"), base, _dir: tempfile::tempdir().unwrap() }
}

impl Fixture {
    fn video(&self, key: &str) -> InputVideo {
        let t = &self.r[key];
        let (num_frames, height, width) = match t.dims() {
            [f, h, w, 3] => (*f, *h, *w),
            [h, w, 3] => (1, *h, *w),
            dims => panic!("{key}: {dims:?}"),
        };
        InputVideo { frames: t.flatten_all().unwrap().to_vec1().unwrap(), num_frames, height, width }
    }

    fn mask(&self, key: &str) -> RegionMask {
        let (num_frames, height, width) = self.r[key].dims3().unwrap();
        RegionMask { num_frames, height, width, values: self.r[key].flatten_all().unwrap().to_vec1().unwrap() }
    }

    fn base(&self, run: &str) -> GenerateRequest {
        GenerateRequest {
            latents: Some(noise_file(&self.r[&format!("{run}.noise")], self._dir.path())),
            ..self.base.clone()
        }
    }

    /// The control latents, the denoised latents (the reference frames dropped) and the frames against the run's.
    fn check(&self, run: &str, request: &VaceRequest) {
        let r = &self.r;
        let control = self.pipeline.vace_control_latents(request).unwrap();
        common::assert_relative(run, "conditioning latents", &control, &r[&format!("{run}.conditioning_latents")]);
        let (latents, _) = self.pipeline.vace_latents(request, &mut |_| ControlFlow::Continue(())).unwrap();
        let want = &r[&format!("{run}.final_latents")];
        let references = want.dim(2).unwrap() - latents.dim(2).unwrap();
        assert_eq!(references, request.reference_images.len());
        let want = want.narrow(2, references, latents.dim(2).unwrap()).unwrap();
        common::assert_relative(run, "final latents", &latents, &want);
        let video = self.pipeline.vace(request).unwrap();
        common::assert_frames(run, "frames", video.frames, &r[&format!("{run}.frames")]);
    }
}

#[test]
fn a_masked_edit_matches_diffusers() {
    let f = fixture();
    let (video, mask) = (f.video("masked.video"), f.mask("masked.mask"));
    let request = VaceRequest {
        base: f.base("masked"),
        video: Some(&video),
        mask: Some(&mask),
        reference_images: &[],
        conditioning_scale: 1.0,
    };
    f.check("masked", &request);

    // As a region edit: the same generation, then every pixel outside the mask is the source's.
    let region = RegionRequest {
        base: f.base("masked"),
        input: &video,
        mask: &mask,
        reference_images: &[],
        conditioning_scale: 1.0,
    };
    let (latents, _, _) = f.pipeline.region_latents(&region, &mut |_| ControlFlow::Continue(())).unwrap();
    common::assert_relative("masked", "region latents", &latents, &f.r["masked.final_latents"]);
    let (out, report) = f.pipeline.redo_region(&region).unwrap();
    assert_eq!(report.unmasked_max_abs, 0.0);
    // With a reference image and a scale: the VACE generation with the same inputs, then the composite.
    let image = f.video("reference.image");
    let references = std::slice::from_ref(&image);
    // Seeded noise: the reference's latent frame makes it longer than the fixture's.
    let base = GenerateRequest { latents: None, seed: 7, ..f.base.clone() };
    let with_reference =
        RegionRequest { base: base.clone(), reference_images: references, conditioning_scale: 0.9, ..region.clone() };
    let (latents, _, _) = f.pipeline.region_latents(&with_reference, &mut |_| ControlFlow::Continue(())).unwrap();
    let vace = VaceRequest { base, reference_images: references, conditioning_scale: 0.9, ..request.clone() };
    let (want, _) = f.pipeline.vace_latents(&vace, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(
        latents.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    for ((o, s), m) in out.frames.chunks_exact(3).zip(video.frames.chunks_exact(3)).zip(&mask.values) {
        if *m == 0.0 {
            assert_eq!(o, s);
        }
    }
}

#[test]
fn a_reference_image_matches_diffusers() {
    let f = fixture();
    let image = f.video("reference.image");
    let request = VaceRequest {
        base: f.base("reference"),
        video: None,
        mask: None,
        reference_images: std::slice::from_ref(&image),
        conditioning_scale: 1.0,
    };
    f.check("reference", &request);
}

#[test]
fn a_control_video_matches_diffusers() {
    let f = fixture();
    let video = f.video("control.video");
    let request = VaceRequest {
        base: f.base("control"),
        video: Some(&video),
        mask: None,
        reference_images: &[],
        conditioning_scale: 0.8,
    };
    f.check("control", &request);
}

/// A soft (8-bit) mask over the clip with a reference image before it: the threshold at ½ for the kept and
/// regenerated halves, the raw values in the 64 sub-pixel channels, in their order.
#[test]
fn soft_mask_channels_match_diffusers() {
    let f = fixture();
    let (video, mask, image) = (f.video("masked.video"), f.mask("soft.mask"), f.video("reference.image"));
    let request = VaceRequest {
        base: f.base("masked"),
        video: Some(&video),
        mask: Some(&mask),
        reference_images: std::slice::from_ref(&image),
        conditioning_scale: 1.0,
    };
    let control = f.pipeline.vace_control_latents(&request).unwrap();
    common::assert_relative("soft", "conditioning latents", &control, &f.r["soft.conditioning_latents"]);
}

/// The prompt alone on a VACE model is diffusers' call without video, mask or references; other edits are
/// refused with what the model can do, and control inputs on a plain model are refused.
#[test]
fn vace_routes_and_refusals() {
    let f = fixture();
    let plain = f.pipeline.generate(&f.base("masked")).unwrap();
    let request =
        VaceRequest { base: f.base("masked"), video: None, mask: None, reference_images: &[], conditioning_scale: 1.0 };
    assert_eq!(plain.frames, f.pipeline.vace(&request).unwrap().frames);

    let video = f.video("masked.video");
    let edit = kinetoscope::EditRequest { base: f.base("masked"), input: &video, strength: 0.5 };
    let err = f.pipeline.edit(&edit).unwrap_err().to_string();
    assert!(err.contains("VACE model") && err.contains("--mask"), "{err}");

    let mask = f.mask("masked.mask");
    let err = f.pipeline.vace(&VaceRequest { mask: Some(&mask), ..request.clone() }).unwrap_err().to_string();
    assert!(err.contains("a mask needs the video"), "{err}");
    let two = InputVideo {
        num_frames: 2,
        frames: [video.frames.clone(), video.frames.clone()].concat(),
        ..f.video("reference.image")
    };
    let err = f
        .pipeline
        .vace(&VaceRequest { reference_images: std::slice::from_ref(&two), ..request })
        .unwrap_err()
        .to_string();
    assert!(err.contains("reference image 0"), "{err}");

    let t2v = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let request = VaceRequest {
        base: f.base("masked"),
        video: Some(&video),
        mask: None,
        reference_images: &[],
        conditioning_scale: 1.0,
    };
    let err = t2v.vace(&request).unwrap_err().to_string();
    assert!(err.contains("no VACE blocks"), "{err}");
}
