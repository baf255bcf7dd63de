//! The pipeline's VAE tiling: off, on, and automatic when the whole decode would not fit the memory limit.
//! The tiled decode itself is checked against diffusers' in the models crate (`vae_parity`).

mod common;

use common::{max_abs_error, model_dir, reference_request};
use kinetoscope::{Error, GenerateRequest, LoadOptions, Pipeline, Tiling, VaeTiling};

fn pipeline(vae_tiling: VaeTiling, memory_limit: Option<u64>) -> Pipeline {
    let options = LoadOptions { vae_tiling, memory_limit, ..Default::default() };
    Pipeline::load(&model_dir("wan21-tiny-a"), &options).unwrap()
}

fn frames(video: &kinetoscope::Video) -> candle_core::Tensor {
    candle_core::Tensor::new(video.frames.as_slice(), &candle_core::Device::Cpu).unwrap()
}

/// 320×320 is two tiles each way with diffusers' default tiles (256 pixels every 192).
fn request() -> GenerateRequest {
    GenerateRequest { height: 320, width: 320, num_frames: 5, steps: 1, ..reference_request("wan21-tiny-a") }
}

#[test]
fn large_frames_decode_in_tiles_when_asked_or_when_whole_would_not_fit() {
    let request = request();
    let whole = pipeline(VaeTiling::Off, None);
    let whole_video = whole.generate(&request).unwrap();
    assert_eq!(whole_video.timings.vae_tiling, None);
    let tiled = pipeline(VaeTiling::On(Tiling::default()), None);
    let tiled_video = tiled.generate(&request).unwrap();
    assert_eq!(tiled_video.timings.vae_tiling, Some(Tiling::default()));
    // The seams are blended: close to the whole decode, yet not it.
    let seams = max_abs_error(&frames(&tiled_video), &frames(&whole_video));
    println!("tiled against whole: max abs {seams:.2e}");
    assert!(seams > 0.0 && seams < 0.25, "{seams}");

    // A limit the whole decode exceeds and the tiled one fits: Auto tiles, and gives the tiled video.
    let (need_whole, need_tiled) =
        (whole.working_memory(&request).vae_decoding, tiled.working_memory(&request).vae_decoding);
    println!("VAE decoding estimates: whole {need_whole} bytes, tiled {need_tiled}");
    let others = whole.working_memory(&request);
    println!("text encoding {}, denoising step {}", others.text_encoding, others.denoising_step);
    assert!(need_tiled < need_whole && others.text_encoding.max(others.denoising_step) < need_tiled);
    let auto = pipeline(VaeTiling::Auto, Some((need_tiled + need_whole) / 2)).generate(&request).unwrap();
    assert_eq!(auto.timings.vae_tiling, Some(Tiling::default()));
    assert_eq!(auto.frames, tiled_video.frames);
    // With no limit on the CPU, Auto decodes whole.
    assert_eq!(pipeline(VaeTiling::Auto, None).generate(&request).unwrap().frames, whole_video.frames);

    // Below even the tiled decode's need: refused before any work, naming the stage.
    let err = pipeline(VaeTiling::Auto, Some(need_tiled - 1)).generate(&request).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { stage: "VAE decoding", .. }), "{err}");
}

#[test]
fn tiles_that_are_not_whole_latent_cells_are_refused_at_load() {
    let tiling = Tiling { tile_height: 100, ..Default::default() };
    let options = LoadOptions { vae_tiling: VaeTiling::On(tiling), ..Default::default() };
    let err = Pipeline::load(&model_dir("wan21-tiny-a"), &options).err().unwrap().to_string();
    assert!(err.contains("vae_tiling") && err.contains("tile_height 100"), "{err}");
}
