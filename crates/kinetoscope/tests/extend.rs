//! Extending a clip on the small test model: the output starts with the input's frames, copied exactly, and
//! is as long as the input plus the frames added; the held latent frames of the generated clip are exactly
//! the latents of the input's last frames after the loop; too short an input and bad lengths are refused.

mod common;

use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use common::{max_abs_error, model_dir};
use kinetoscope::{ExtendLayout, ExtendRequest, GenerateRequest, InputVideo, LoadOptions, Pipeline};

/// Mean |a − b| of two tensors of one shape.
fn mean_abs_error(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn an_extension_keeps_the_input_and_holds_its_last_latents() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let base = GenerateRequest {
        prompt: "a red fox in the snow".into(),
        height: 32,
        width: 48,
        num_frames: 13,
        steps: 4,
        seed: 1,
        ..Default::default()
    };
    let source = pipeline.generate(&base).unwrap();
    let input =
        InputVideo { frames: source.frames, num_frames: source.num_frames, height: source.height, width: source.width };

    let extend = ExtendRequest {
        base: GenerateRequest { prompt: "the fox runs away".into(), seed: 2, ..base },
        input: &input,
        frames: 8,
    };
    // 13 input frames, 4 per latent frame: conditioned on its last 9 (frames 4..13), of which 4..9 are held and
    // 9..13 are the seam; the generated clip is 9 + 8 frames; the output keeps frames 0..9 of the input.
    let layout = pipeline.shape().extend_layout(&extend).unwrap();
    assert_eq!(layout, ExtendLayout { context: 9, kept: 9, generated: 17, generated_from: 5 });

    let video = pipeline.extend(&extend).unwrap();
    assert_eq!((video.num_frames, video.height, video.width), (13 + 8, 32, 48));
    let frame_len = 32 * 48 * 3;
    assert_eq!(video.frames.len(), 21 * frame_len);
    assert!(video.frames[..layout.kept * frame_len] == input.frames[..layout.kept * frame_len]);

    // The latents after the loop: the two held latent frames are the context's latents, bit for bit (σ = 0 at
    // the last step); the seam is half of them.
    let (latents, _) = pipeline.extend_latents(&extend, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(latents.dims(), [1, 16, 5, 4, 6]);
    let context = input.last_frames(9);
    let context =
        Tensor::from_vec(context.frames, (9, 32, 48, 3), &Device::Cpu).map(|t| pipeline.encode(&t).unwrap()).unwrap();
    assert_eq!(context.dims(), [1, 16, 3, 4, 6]);
    let held = max_abs_error(&latents.narrow(2, 0, 2).unwrap(), &context.narrow(2, 0, 2).unwrap());
    let seam = max_abs_error(&latents.narrow(2, 2, 1).unwrap(), &context.narrow(2, 2, 1).unwrap());
    println!("held latents vs the context's: max abs {held:e}; seam: max abs {seam:.3}");
    assert_eq!(held, 0.0);
    assert!(seam > 1e-3, "the seam latent frame didn't move from the context's: {seam}");

    // The same generated clip decoded: the frames the output takes from it are what follows the input.
    let generated = pipeline.decode(&latents).unwrap().squeeze(0).unwrap();
    let output = Tensor::from_vec(video.frames, (21, 32, 48, 3), &Device::Cpu).unwrap();
    let tail = max_abs_error(&output.narrow(0, 9, 12).unwrap(), &generated.narrow(0, 5, 12).unwrap());
    assert!(tail < 1e-6, "the output's new frames aren't the generated clip's from frame 5: {tail}");

    // How far the output moves where it passes from the copied frames to the generated ones, beside how far
    // the input moves from frame to frame (printed only: the tiny model's random weights make no real motion).
    let step =
        |t: &Tensor, from: usize| mean_abs_error(&t.narrow(0, from, 1).unwrap(), &t.narrow(0, from + 1, 1).unwrap());
    let source = Tensor::from_vec(input.frames.clone(), (13, 32, 48, 3), &Device::Cpu).unwrap();
    let motion = (0..12).map(|i| step(&source, i)).sum::<f32>() / 12.0;
    println!(
        "at the cut (frame 8 → 9): mean abs {:.4}; the input frame to frame: mean abs {motion:.4}",
        step(&output, 8)
    );
}

#[test]
fn bad_extensions_are_named() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let short = InputVideo::from_rgb8(&vec![128; 5 * 32 * 48 * 3], 5, 32, 48).unwrap();
    let base = GenerateRequest { prompt: "x".into(), steps: 2, ..Default::default() };
    let request = ExtendRequest { base, input: &short, frames: 8 };
    let err = pipeline.extend(&request).unwrap_err().to_string();
    assert!(err.contains("input") && err.contains("has 5 frames") && err.contains("at least 9"), "{err}");

    let long = InputVideo::from_rgb8(&vec![128; 9 * 32 * 48 * 3], 9, 32, 48).unwrap();
    for frames in [0, 6, 164] {
        let err = pipeline.extend(&ExtendRequest { input: &long, frames, ..request.clone() }).unwrap_err().to_string();
        assert!(err.contains("multiple of 4") && err.contains("at most 160 (10 s at 16 fps)"), "{frames}: {err}");
    }

    assert_eq!(pipeline.shape().extension_frames(2.0, 16).unwrap(), 32);
    for seconds in [0.0, -1.0, 10.5, f64::NAN] {
        let err = pipeline.shape().extension_frames(seconds, 16).unwrap_err().to_string();
        assert!(err.contains("seconds") && err.contains("(0, 10]"), "{seconds}: {err}");
    }

    let odd = InputVideo::from_rgb8(&vec![128; 9 * 20 * 48 * 3], 9, 20, 48).unwrap();
    let err = pipeline.extend(&ExtendRequest { input: &odd, ..request }).unwrap_err().to_string();
    assert!(err.contains("input video's height") && err.contains("20"), "{err}");
}
