//! The few-step recipe of distilled models against the default on the small test model on CPU, the same size
//! and seed: 50 UniPC steps with classifier-free guidance (two network passes a step) against 4 flow-match Euler
//! steps over lightx2v's sigmas (1, 0.75, 0.5, 0.25 at shift 5) at guidance 1 (one pass a step). Prints a Markdown
//! row per recipe: denoising and end-to-end seconds (the fastest of several runs, the two interleaved) and the
//! speedup. The tiny model's random weights are not distilled, so only the time is meaningful, not the video.
//!
//! ```sh
//! cargo bench -p kinetoscope --bench few_step
//! ```

use std::time::Instant;

use kinetoscope::scheduler::Schedule;
use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline};

const RUNS: usize = 3;

fn main() {
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/wan21-tiny-a");
    let pipeline = Pipeline::load(&ModelDir::open(tiny).unwrap(), &LoadOptions::default()).unwrap();
    let base = GenerateRequest {
        prompt: "a red fox runs through fresh snow at dawn".into(),
        negative_prompt: "blurred, static".into(),
        height: 256,
        width: 256,
        num_frames: 17,
        seed: 1,
        ..GenerateRequest::default()
    };
    let guided = GenerateRequest { steps: 50, guidance_scale: 5.0, ..base.clone() };
    let few = GenerateRequest {
        steps: 4,
        guidance_scale: 1.0,
        shift: Some(5.0),
        schedule: Some(Schedule::Sigmas(vec![1.0, 0.75, 0.5, 0.25])),
        ..base
    };
    let mut best = [(f64::INFINITY, f64::INFINITY); 2];
    for _ in 0..RUNS {
        for (i, request) in [&guided, &few].into_iter().enumerate() {
            let start = Instant::now();
            let video = pipeline.generate(request).unwrap();
            let total = start.elapsed().as_secs_f64();
            best[i] = (best[i].0.min(video.timings.denoising_s), best[i].1.min(total));
        }
    }
    println!("| recipe (256×256×17) | network passes | denoising s | end to end s |");
    println!("| --- | --- | --- | --- |");
    println!("| 50 UniPC steps, guidance 5 | 100 | {:.2} | {:.2} |", best[0].0, best[0].1);
    println!("| 4 Euler steps (lightx2v sigmas, shift 5), guidance 1 | 4 | {:.2} | {:.2} |", best[1].0, best[1].1);
    println!();
    println!("speedup: denoising {:.1}×, end to end {:.1}×", best[0].0 / best[1].0, best[0].1 / best[1].1);
}
