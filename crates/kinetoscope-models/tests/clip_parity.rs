//! Parity of the CLIP vision encoder with transformers' `CLIPVisionModel` on the tiny image-to-video fixtures
//! (`models/tiny/reference/<model>/image_encoder.safetensors`, see `models/tiny/FIXTURES.md`): the penultimate
//! hidden states diffusers' `WanImageToVideoPipeline` hands the transformer.

mod common;

use anyhow::{ensure, Result};
use common::{load, max_relative_error, reference, tiny};
use kinetoscope_models::clip::{ClipVisionModel, Config, CropSize, ProcessorConfig, Resize};

fn check(model: &str, images: usize) -> Result<()> {
    let (cfg, vb): (Config, _) = load(model, "image_encoder")?;
    let encoder = ClipVisionModel::new(&cfg, vb)?;
    let r = reference(model, "image_encoder.safetensors")?;
    let got = encoder.penultimate_hidden_states(&r["pixel_values"])?;
    let want = &r["penultimate"];
    ensure!(got.dims() == [images, cfg.num_positions(), cfg.hidden_size], "shape {:?}", got.dims());
    assert_eq!(got.dims(), want.dims());
    let err = max_relative_error(&got, want)?;
    println!("{model}: max relative error {err:e}");
    ensure!(err < 1e-4, "{model}: max relative error {err}");
    Ok(())
}

#[test]
fn i2v_image_matches_transformers() -> Result<()> {
    check("wan21-i2v-tiny", 1)
}

/// FLF2V: the first and last frames as a batch of two.
#[test]
fn flf2v_images_match_transformers() -> Result<()> {
    check("wan21-flf2v-tiny", 2)
}

#[test]
fn processor_config_of_the_fixture() -> Result<()> {
    let path = tiny().join("wan21-i2v-tiny/image_processor/preprocessor_config.json");
    let cfg: ProcessorConfig = serde_json::from_slice(&std::fs::read(path)?)?;
    assert_eq!(cfg.size, Resize::ShortestEdge(32));
    assert_eq!(cfg.crop_size, CropSize { height: 32, width: 32 });
    assert_eq!(cfg.resample, 3);
    assert!(cfg.do_resize && cfg.do_center_crop && cfg.do_rescale && cfg.do_normalize && cfg.do_convert_rgb);
    assert_eq!(cfg.rescale_factor, 1.0 / 255.0);
    assert_eq!(cfg.image_mean, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!(cfg.image_std, [0.26862954, 0.26130258, 0.27577711]);
    Ok(())
}
