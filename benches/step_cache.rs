//! Step caching on the small test model on CPU: at each preset's step count, the uncached run against the
//! preset's cache threshold, then higher thresholds at `balanced`'s 30 steps. Prints Markdown rows:
//!
//! - the steps that reused the cache, and the share of transformer blocks that ran: the work saved, exactly;
//! - the cost of one full step and of one reused step, each the fastest of its kind over all runs (load
//!   from other processes only ever adds time, and there are many steps to take the fastest of), and the
//!   speedup of the denoising they imply: the figure to trust on a busy machine;
//! - the denoising time of the whole loop, uncached and cached (the fastest of several runs, the two
//!   interleaved and taking turns to go first), and its ratio;
//! - how far the frames moved from the uncached run's.
//!
//! The size is fixed (256×256, 17 frames) so that only the cache changes between a row's two runs.
//!
//! ```sh
//! cargo bench -p kinetoscope --bench step_cache
//! ```

use std::ops::ControlFlow;
use std::time::Instant;

use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline, Preset, Video};
use kinetoscope_models::wan::transformer;

const RUNS: usize = 5;
/// Beyond the presets' thresholds: where the small model's random weights start to reuse steps.
const SWEEP: [f64; 3] = [0.5, 0.7, 1.0];

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One request's runs: the fastest denoising, the fastest full and reused step, and the last run's video.
struct Measured {
    denoising_s: f64,
    full_step_s: f64,
    reused_step_s: f64,
    video: Video,
}

impl Measured {
    fn new(video: Video) -> Self {
        Measured { denoising_s: f64::INFINITY, full_step_s: f64::INFINITY, reused_step_s: f64::INFINITY, video }
    }

    /// Runs `request` once more. A step's time is from the previous step's report to its own, so the first
    /// step (which follows the text encoding) is not timed.
    fn add_run(&mut self, pipeline: &Pipeline, request: &GenerateRequest) -> Result<()> {
        let mut last: Option<Instant> = None;
        let (mut full, mut reused) = (f64::INFINITY, f64::INFINITY);
        let video = pipeline.generate_with_progress(request, &mut |p| {
            let now = Instant::now();
            if let Some(last) = last {
                let kind = if p.cached { &mut reused } else { &mut full };
                *kind = kind.min((now - last).as_secs_f64());
            }
            last = Some(now);
            ControlFlow::Continue(())
        })?;
        self.denoising_s = self.denoising_s.min(video.timings.denoising_s);
        self.full_step_s = self.full_step_s.min(full);
        self.reused_step_s = self.reused_step_s.min(reused);
        self.video = video;
        Ok(())
    }
}

/// The uncached and the cached request, run alternately `RUNS` times each (uncached first in even rounds,
/// cached first in odd ones).
fn pair(pipeline: &Pipeline, cached: &GenerateRequest) -> Result<[Measured; 2]> {
    let requests = [GenerateRequest { step_cache: None, ..cached.clone() }, cached.clone()];
    let mut measured = [pipeline.generate(&requests[0])?, pipeline.generate(&requests[1])?].map(Measured::new);
    for round in 0..RUNS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            measured[i].add_run(pipeline, &requests[i])?;
        }
    }
    Ok(measured)
}

/// ‖a − b‖₂ / ‖b‖₂ and max |a − b| over the frames.
fn difference(a: &Video, b: &Video) -> (f64, f64) {
    let (mut diff, mut norm, mut max) = (0.0, 0.0, 0.0f64);
    for (&x, &y) in a.frames.iter().zip(&b.frames) {
        let d = f64::from(x - y);
        diff += d * d;
        norm += f64::from(y) * f64::from(y);
        max = max.max(d.abs());
    }
    ((diff / norm).sqrt(), max)
}

fn main() -> Result<()> {
    let dir = ModelDir::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/wan21-tiny-a"))?;
    let pipeline = Pipeline::load(&dir, &LoadOptions::default())?;
    let blocks = dir.config::<transformer::Config>("transformer", "config.json")?.num_layers;
    let base = GenerateRequest {
        prompt: "A red fox and a small owl dance in the snow under the moon.".into(),
        num_frames: 17,
        seed: 7,
        ..Default::default()
    };
    let sized = |preset: Preset| {
        let mut request = base.clone();
        preset.apply(&mut request);
        (request.height, request.width) = (256, 256);
        request
    };

    println!(
        "model: models/tiny/wan21-tiny-a ({blocks} blocks), 256x256, 17 frames, guidance 5 (batch of two), f32, CPU"
    );
    println!("{RUNS} runs of each, after one warm-up; frames in [0, 1]\n");
    println!("| case | steps | step cache | reused steps | blocks run | full step | reused step | speedup (step costs) | denoising uncached → cached | speedup (wall) | frames rel. L2 diff | frames max abs diff |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let cases = Preset::ALL.into_iter().map(|preset| (preset.to_string(), sized(preset))).chain(
        SWEEP.map(|t| ("sweep".to_string(), GenerateRequest { step_cache: Some(t), ..sized(Preset::Balanced) })),
    );
    for (case, request) in cases {
        let (steps, Some(threshold)) = (request.steps, request.step_cache) else {
            println!(
                "| {case} | {} | off | 0 | 100% | | | 1.00× | (the uncached run) | 1.00× | 0 | 0 |",
                request.steps
            );
            continue;
        };
        let [uncached, cached] = pair(&pipeline, &request)?;
        let (rel, max) = difference(&cached.video, &uncached.video);
        let reused = cached.video.timings.cached_steps;
        // A reused step runs only the first block.
        let blocks_run = ((steps - reused) * blocks + reused) as f64 / (steps * blocks) as f64;
        let full_s = uncached.full_step_s.min(cached.full_step_s);
        let (reused_step, by_step_costs) = if reused == 0 {
            (String::new(), 1.0)
        } else {
            let s = cached.reused_step_s;
            (
                format!("{:.0} ms", s * 1e3),
                steps as f64 * full_s / ((steps - reused) as f64 * full_s + reused as f64 * s),
            )
        };
        println!(
            "| {case} | {steps} | {threshold} | {reused} | {:.0}% | {:.0} ms | {reused_step} | {by_step_costs:.2}× | {:.2} s → {:.2} s | {:.2}× | {rel:.2e} | {max:.2e} |",
            100.0 * blocks_run,
            full_s * 1e3,
            uncached.denoising_s,
            cached.denoising_s,
            uncached.denoising_s / cached.denoising_s,
        );
    }
    Ok(())
}
