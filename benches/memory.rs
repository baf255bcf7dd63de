//! The memory limit's working-memory estimates ([`kinetoscope::Pipeline::working_memory`]) against what each
//! stage really takes on the CPU: the peak resident-set growth while it runs (the peak is reset before each
//! stage through `/proc/self/clear_refs`), f32, on the tiny models at sizes where the working memory is tens
//! to hundreds of MiB. An estimate under its measurement would let a request past the limit that then
//! takes more; the bench says so and exits non-zero.
//!
//! ```sh
//! cargo bench -p kinetoscope --bench memory
//! ```
//!
//! Linux only. glibc's malloc keeps freed blocks below its mmap threshold resident; the bench runs itself
//! again with the threshold fixed low, so that what one stage frees leaves the resident set before the next.

use std::ops::ControlFlow;
use std::process::Command;

use candle_core::Tensor;
use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline, Tiling, VaeTiling};

/// Model, height, width, frames, VAE tiling.
const CASES: [(&str, usize, usize, usize, VaeTiling); 7] = [
    ("wan21-tiny-a", 256, 256, 17, VaeTiling::Off),
    ("wan21-tiny-a", 480, 832, 17, VaeTiling::Off),
    ("wan21-tiny-a", 480, 832, 17, VaeTiling::On(DEFAULT_TILES)),
    ("wan21-tiny-b", 256, 256, 17, VaeTiling::Off),
    ("wan22-ti2v-tiny-a", 256, 256, 17, VaeTiling::Off),
    ("wan22-ti2v-tiny-b", 704, 1280, 9, VaeTiling::Off),
    ("wan22-ti2v-tiny-b", 704, 1280, 9, VaeTiling::On(DEFAULT_TILES)),
];
const DEFAULT_TILES: Tiling = Tiling { tile_height: 256, tile_width: 256, stride_height: 192, stride_width: 192 };
const MIB: f64 = (1 << 20) as f64;

/// Kilobytes on the line of `/proc/self/status` that starts with `field`.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB")
}

/// Peak resident-set growth in bytes while `stage` runs (what it returns is dropped after the peak is read).
fn peak_growth<T>(stage: impl FnOnce() -> T) -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident set (Linux ≥ 4.0)");
    let before = status_kib("VmRSS:");
    let out = stage();
    let peak = status_kib("VmHWM:");
    drop(out);
    peak.saturating_sub(before) * 1024
}

fn main() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        let status = Command::new(std::env::current_exe().expect("this bench's path"))
            .args(std::env::args_os().skip(1))
            .env("MALLOC_MMAP_THRESHOLD_", "65536")
            .status()
            .expect("the bench runs itself again");
        std::process::exit(status.code().unwrap_or(1));
    }
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/");
    println!("| model | size | stage | estimate MiB | measured MiB | estimate / measured |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut under = Vec::new();
    for (model, height, width, num_frames, vae_tiling) in CASES {
        let options = LoadOptions { vae_tiling, ..LoadOptions::default() };
        let pipeline = Pipeline::load(&ModelDir::open(&format!("{tiny}{model}")).unwrap(), &options)
            .expect("the tiny model loads");
        let size = match vae_tiling {
            VaeTiling::On(_) => format!("{width}x{height}x{num_frames} tiled"),
            _ => format!("{width}x{height}x{num_frames}"),
        };
        let request = GenerateRequest {
            prompt: "a red fox runs through fresh snow at dawn".into(),
            negative_prompt: "blurred, static".into(),
            height,
            width,
            num_frames,
            steps: 2,
            ..GenerateRequest::default()
        };
        let estimate = pipeline.working_memory(&request);
        let seq = request.max_sequence_length;

        let text_growth = peak_growth(|| pipeline.encode_prompt(&request.prompt, seq).unwrap());
        let text = Tensor::cat(
            &[
                pipeline.encode_prompt(&request.prompt, seq).unwrap(),
                pipeline.encode_prompt(&request.negative_prompt, seq).unwrap(),
            ],
            0,
        )
        .unwrap();
        let noise = pipeline.initial_latents(&request).unwrap();
        let denoise_growth = peak_growth(|| {
            pipeline.denoise(noise.clone(), &text, &request, &mut |_| ControlFlow::Continue(())).unwrap()
        });
        let decode_growth = peak_growth(|| pipeline.decode(&noise).unwrap());

        for (stage, estimated, measured) in [
            ("text encoding", estimate.text_encoding, text_growth),
            ("denoising", estimate.denoising_step, denoise_growth),
            ("VAE decoding", estimate.vae_decoding, decode_growth),
        ] {
            // Under 1 MiB the measurement is noise (text encoding runs on the prompt's real tokens, the estimate
            // counts max_sequence_length of them).
            let ratio = if measured as f64 >= MIB {
                format!("{:.2}", estimated as f64 / measured as f64)
            } else {
                "—".to_string()
            };
            println!(
                "| {model} | {size} | {stage} | {:.1} | {:.1} | {ratio} |",
                estimated as f64 / MIB,
                measured as f64 / MIB
            );
            if estimated < measured {
                under.push(format!("{model} {size} {stage}"));
            }
        }
    }
    if !under.is_empty() {
        eprintln!("estimates under the measurement: {}", under.join(", "));
        std::process::exit(1);
    }
}
