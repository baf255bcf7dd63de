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
//! A second table loads a two-expert model (Wan 2.2 A14B's layout: tiny-a's text encoder and VAE, two
//! transformers of ~130 MiB each written by the bench) with the experts resident and swapped, and measures the
//! peak resident-set growth of loading it and denoising across the boundary: swapped, one expert is in memory at
//! a time, so the peak must stay below the resident one by most of an expert's weights.
//!
//! Linux only. glibc's malloc keeps freed blocks below its mmap threshold resident; the bench runs itself
//! again with the threshold fixed low, so that what one stage frees leaves the resident set before the next.

use std::ops::ControlFlow;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use kinetoscope::{ExpertPlacement, GenerateRequest, LoadOptions, ModelDir, Pipeline, Tiling, VaeTiling};
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};

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
    if !two_experts_swap_one_at_a_time(tiny) {
        std::process::exit(1);
    }
}

/// The second table (see the module doc); whether swapping kept the peak below resident by 3/4 of an expert.
fn two_experts_swap_one_at_a_time(tiny: &str) -> bool {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let expert_bytes = write_two_expert_model(&format!("{tiny}wan21-tiny-a"), dir.path());
    let request = GenerateRequest {
        prompt: "a red fox runs through fresh snow at dawn".into(),
        height: 64,
        width: 64,
        num_frames: 5,
        // Timesteps 999, 937, 856, 749 at shift 3: two steps an expert across the boundary at 875.
        steps: 4,
        guidance_scale: 1.0,
        ..GenerateRequest::default()
    };
    println!();
    println!("| two experts ({:.1} MiB each) | load and 4 steps, peak growth MiB |", expert_bytes as f64 / MIB);
    println!("| --- | --- |");
    let mut peaks = Vec::new();
    for experts in [ExpertPlacement::Resident, ExpertPlacement::Swap] {
        let options = LoadOptions { experts, ..LoadOptions::default() };
        let peak = peak_growth(|| {
            let pipeline = Pipeline::load(&ModelDir::open(dir.path().to_str().unwrap()).unwrap(), &options).unwrap();
            let latents = pipeline.initial_latents(&request).unwrap();
            let text = pipeline.encode_prompt(&request.prompt, request.max_sequence_length).unwrap();
            pipeline.denoise(latents, &text, &request, &mut |_| ControlFlow::Continue(())).unwrap()
        });
        println!("| {experts:?} | {:.1} |", peak as f64 / MIB);
        peaks.push(peak);
    }
    let saved = peaks[0].saturating_sub(peaks[1]);
    if saved < expert_bytes * 3 / 4 {
        eprintln!("swapping saved {:.1} MiB, less than 3/4 of an expert", saved as f64 / MIB);
        return false;
    }
    true
}

/// `base` (a one-transformer model) copied to `out` with two experts of 8 blocks of width 512 in place of its
/// transformer (zero weights: their values don't change what is allocated); the bytes of one expert.
fn write_two_expert_model(base: &str, out: &std::path::Path) -> u64 {
    let copy = Command::new("cp").args(["-r", &format!("{base}/."), out.to_str().unwrap()]).status();
    assert!(copy.expect("cp").success(), "copying {base}");
    let index_path = out.join("model_index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["transformer_2"] = serde_json::json!(["diffusers", "WanTransformer3DModel"]);
    index["boundary_ratio"] = serde_json::json!(0.875);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let config = serde_json::json!({
        "num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048, "num_layers": 8,
        "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 64, "patch_size": [1, 2, 2],
    });
    let mut bytes = 0;
    for name in ["transformer", "transformer_2"] {
        let folder = out.join(name);
        std::fs::remove_dir_all(&folder).ok();
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
        let weights = VarMap::new();
        let cfg: Config = serde_json::from_value(config.clone()).unwrap();
        WanTransformer3DModel::new(&cfg, VarBuilder::from_varmap(&weights, DType::F32, &Device::Cpu)).unwrap();
        weights.save(folder.join("diffusion_pytorch_model.safetensors")).unwrap();
        bytes = std::fs::metadata(folder.join("diffusion_pytorch_model.safetensors")).unwrap().len();
    }
    bytes
}
