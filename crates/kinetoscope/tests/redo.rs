//! Regenerating a time range on the small test model: the frames whose latents are held stay the input's VAE
//! round trip, the redone range changes, and a range outside the clip is refused.

mod common;

use candle_core::{Device, Tensor};
use common::{max_abs_error, model_dir};
use kinetoscope::{GenerateRequest, InputVideo, LoadOptions, Pipeline, RedoRequest};

/// Mean |a − b| over pixel frames `frames` of two clips shaped `[F, H, W, 3]`.
fn mean_abs_error(a: &Tensor, b: &Tensor, frames: std::ops::Range<usize>) -> f32 {
    let n = frames.len();
    let (a, b) = (a.narrow(0, frames.start, n).unwrap(), b.narrow(0, frames.start, n).unwrap());
    (a - b).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn a_redo_keeps_the_frames_outside_the_range() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let base = GenerateRequest {
        prompt: "a red fox in the snow".into(),
        height: 32,
        width: 48,
        num_frames: 17,
        steps: 4,
        seed: 1,
        ..Default::default()
    };
    let source = pipeline.generate(&base).unwrap();
    let shape = (source.num_frames, source.height, source.width, 3);
    let input = InputVideo {
        frames: source.frames.clone(),
        num_frames: source.num_frames,
        height: source.height,
        width: source.width,
    };
    let source = Tensor::from_vec(source.frames, shape, &Device::Cpu).unwrap();
    let round_trip = pipeline.decode(&pipeline.encode(&source).unwrap()).unwrap().squeeze(0).unwrap();

    // 17 frames are 5 latent frames: 0 | 1-4 | 5-8 | 9-12 | 13-16. Redoing 9..13 redoes latent frame 3, blends
    // 2 and 4 (the seam) and holds 0 and 1, so pixel frames 0..5 come from held latents only.
    let redo = RedoRequest {
        base: GenerateRequest { prompt: "an owl on a branch".into(), seed: 2, ..base },
        input: &input,
        frames: 9..13,
    };
    let video = pipeline.redo(&redo).unwrap();
    assert_eq!((video.num_frames, video.height, video.width), (17, 32, 48));
    let out = Tensor::from_vec(video.frames, shape, &Device::Cpu).unwrap();

    let held = max_abs_error(&out.narrow(0, 0, 5).unwrap(), &round_trip.narrow(0, 0, 5).unwrap());
    let changed = mean_abs_error(&out, &round_trip, 9..13);
    let input_change = mean_abs_error(&out, &source, 0..5);
    println!("held frames vs round trip: max abs {held:.2e}; held vs input: mean abs {input_change:.2e}; redone range vs round trip: mean abs {changed:.2e}");
    assert!(held < 1e-4, "held frames moved from the round trip by {held}");
    assert!(changed > 10.0 * held.max(1e-3), "the redone range barely changed: {changed}");

    let outside = RedoRequest { frames: 12..18, ..redo };
    let err = pipeline.redo(&outside).unwrap_err().to_string();
    assert!(err.contains("redo") && err.contains("0..17"), "{err}");
}
