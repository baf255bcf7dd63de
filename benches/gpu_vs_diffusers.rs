//! Kinetoscope's half of `benches/gpu/run.sh`: the checkpoint, prompt embeddings and noise that
//! `benches/gpu/bench.py diffusers` used, through the same stages (bf16 denoising with guidance, f32 VAE
//! decoding), timed the same way: a two-step warm-up, then every step ended by a device synchronization, the
//! median step after the first. Writes `WORK/kinetoscope.json` (times, peak GPU memory, the attention and
//! convolution kernels) and `WORK/kinetoscope.safetensors` (final latents, frames) for `bench.py report` to
//! compare.
//!
//! `--only decode` decodes those final latents again and writes `WORK/kinetoscope-decode-CONV.json` (the time,
//! the peak memory, and the frames' relative difference from the first run's): run under
//! `KINETOSCOPE_CONV=im2col`, it times the VAE's other convolution path on the same latents.
//!
//! ```sh
//! cargo bench -p kinetoscope --bench gpu_vs_diffusers -- --model CHECKPOINT --work WORK [--steps 10] \
//!     [--height 480 --width 832 --frames 81] [--device cuda] [--dtype bf16] [--only decode]
//! ```
//!
//! It runs on the CPU too (`--device cpu`), which is how the script is tried without a GPU.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline};
use kinetoscope_models::wan::vae::convolution_kernel;

struct Args {
    model: PathBuf,
    work: PathBuf,
    device: String,
    dtype: DType,
    steps: usize,
    height: usize,
    width: usize,
    frames: usize,
    /// Only the decode of the latents a full run saved.
    decode_only: bool,
}

impl Args {
    fn parse() -> Result<Self> {
        let mut flags: HashMap<String, String> = HashMap::new();
        let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
        while let Some(flag) = args.next() {
            let Some(name) = flag.strip_prefix("--") else { bail!("unexpected argument {flag:?}") };
            let value = args.next().with_context(|| format!("--{name} needs a value"))?;
            flags.insert(name.to_string(), value);
        }
        let mut take = |name: &str, default: Option<&str>| -> Result<String> {
            flags.remove(name).or(default.map(String::from)).with_context(|| format!("--{name} is required"))
        };
        let number = |text: String, name: &str| text.parse::<usize>().with_context(|| format!("--{name} {text:?}"));
        let args = Args {
            model: take("model", None)?.into(),
            work: take("work", None)?.into(),
            device: take("device", Some("cuda"))?,
            dtype: kinetoscope::parse_dtype(&take("dtype", Some("bf16"))?)?,
            steps: number(take("steps", Some("10"))?, "steps")?,
            height: number(take("height", Some("480"))?, "height")?,
            width: number(take("width", Some("832"))?, "width")?,
            frames: number(take("frames", Some("81"))?, "frames")?,
            decode_only: match take("only", Some("all"))?.as_str() {
                "all" => false,
                "decode" => true,
                other => bail!("--only {other:?}: expected decode"),
            },
        };
        if let Some(unknown) = flags.keys().next() {
            bail!("unknown flag --{unknown}")
        }
        Ok(args)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    let device = kinetoscope::open_device(&args.device)?;
    let start = Instant::now();
    let options = LoadOptions { device: device.clone(), dtype: args.dtype, ..Default::default() };
    let pipeline = Pipeline::load(&ModelDir::open(args.model.to_str().context("a UTF-8 path")?)?, &options)?;
    let load_s = start.elapsed().as_secs_f64();
    if args.decode_only {
        return decode_again(&args, &pipeline, &device);
    }

    let inputs_path = args.work.join("inputs.safetensors");
    let inputs = candle_core::safetensors::load(&inputs_path, &device)
        .with_context(|| format!("{} (written by bench.py diffusers)", inputs_path.display()))?;
    let input = |name: &str| inputs.get(name).with_context(|| format!("{name} in {}", inputs_path.display()));
    let text = Tensor::cat(&[input("prompt_embeds")?, input("negative_embeds")?], 0)?.to_dtype(args.dtype)?;
    let noise = input("latents")?.clone();
    let request = GenerateRequest {
        height: args.height,
        width: args.width,
        num_frames: args.frames,
        steps: args.steps,
        guidance_scale: 5.0,
        ..Default::default()
    };
    pipeline.validate(&request)?;

    let warm_up = GenerateRequest { steps: 2, ..request.clone() };
    pipeline.denoise(noise.clone(), &text, &warm_up, &mut |_| ControlFlow::Continue(()))?;
    device.synchronize()?;
    kinetoscope::reset_peak_gpu_memory(&device);

    let mut ends = vec![Instant::now()];
    let latents = pipeline.denoise(noise, &text, &request, &mut |_| {
        // A failed synchronization shows up again at the next one, outside the loop.
        let _ = device.synchronize();
        ends.push(Instant::now());
        ControlFlow::Continue(())
    })?;
    device.synchronize()?;
    let start = Instant::now();
    let frames = pipeline.decode(&latents)?;
    device.synchronize()?;
    let decode_s = start.elapsed().as_secs_f64();
    let peak_bytes = kinetoscope::peak_gpu_memory(&device);

    let step_times: Vec<f64> = ends.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    let steady = if step_times.len() > 2 { step_times[1..].to_vec() } else { step_times.clone() };
    let step_s = median(steady);
    let outputs: HashMap<String, Tensor> = [
        ("final_latents".to_string(), latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?),
        ("frames".to_string(), frames.squeeze(0)?.to_device(&Device::Cpu)?),
    ]
    .into();
    candle_core::safetensors::save(&outputs, args.work.join("kinetoscope.safetensors"))?;
    // Which attention kernel the transformer's bf16 attention ran (the plain path elsewhere).
    #[cfg(feature = "cuda")]
    let attention = match kinetoscope_kernels::kernels_enabled() && device.is_cuda() {
        true => kinetoscope_kernels::attention_kernel(&device).name(),
        false => "plain",
    };
    #[cfg(not(feature = "cuda"))]
    let attention = "plain";
    let record = serde_json::json!({
        "model_dir": args.model,
        "attention": attention,
        "conv": convolution_kernel(&device),
        "commit": std::env::var("KINETOSCOPE_COMMIT").ok(),
        "kernels": std::env::var("KINETOSCOPE_KERNELS").unwrap_or_else(|_| "own".into()),
        "dtype": args.dtype.as_str(),
        "run": { "steps": args.steps, "height": args.height, "width": args.width, "frames": args.frames },
        "load_s": load_s,
        "step_times_s": step_times,
        "step_s": step_s,
        "decode_s": decode_s,
        "peak_bytes": peak_bytes,
    });
    std::fs::write(args.work.join("kinetoscope.json"), serde_json::to_string_pretty(&record)? + "\n")?;
    println!("kinetoscope: {step_s:.3} s/step, decode {decode_s:.2} s");
    Ok(())
}

/// The final latents of the full run decoded again, timed the same way, compared with its frames.
fn decode_again(args: &Args, pipeline: &Pipeline, device: &Device) -> Result<()> {
    let saved_path = args.work.join("kinetoscope.safetensors");
    let saved = candle_core::safetensors::load(&saved_path, device)
        .with_context(|| format!("{} (written by a full run first)", saved_path.display()))?;
    let tensor = |name: &str| saved.get(name).with_context(|| format!("{name} in {}", saved_path.display()));
    let latents = tensor("final_latents")?.to_dtype(args.dtype)?;
    device.synchronize()?;
    kinetoscope::reset_peak_gpu_memory(device);
    let start = Instant::now();
    let frames = pipeline.decode(&latents)?;
    device.synchronize()?;
    let decode_s = start.elapsed().as_secs_f64();
    let peak_bytes = kinetoscope::peak_gpu_memory(device);
    let (frames, first) = (frames.squeeze(0)?.to_dtype(DType::F32)?, tensor("frames")?.to_dtype(DType::F32)?);
    let norm = |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()) };
    let frames_rel_diff = norm(&(&frames - &first)?)? / norm(&first)?;
    let conv = convolution_kernel(device);
    let record = serde_json::json!({
        "conv": conv,
        "commit": std::env::var("KINETOSCOPE_COMMIT").ok(),
        "decode_s": decode_s,
        "peak_bytes": peak_bytes,
        "frames_rel_diff": frames_rel_diff,
    });
    let path = args.work.join(format!("kinetoscope-decode-{conv}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&record)? + "\n")?;
    println!(
        "kinetoscope ({conv} convolutions): decode {decode_s:.2} s, frames {frames_rel_diff:.2e} from the first run's"
    );
    Ok(())
}
