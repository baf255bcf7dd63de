//! `kinetoscope generate`: one prompt → one MP4 (+ sidecar JSON, + optional PNG frames).

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kinetoscope::scheduler::SchedulerKind;
use kinetoscope::{DType, GenerateRequest, LoadOptions, ModelDir, Pipeline};
use kinetoscope_video::Frames;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// What the video shows.
    #[arg(long)]
    prompt: String,
    /// Where the MP4 goes; the sidecar is written beside it with the extension `.json`.
    #[arg(long, short, default_value = "out.mp4")]
    output: PathBuf,
    /// A diffusers-layout model folder, or a Hugging Face repository id found in the local cache.
    #[arg(long, default_value = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")]
    model: String,
    /// What the video should not show (used when guidance > 1).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 480)]
    height: usize,
    #[arg(long, default_value_t = 832)]
    width: usize,
    /// Number of frames, 4k+1.
    #[arg(long, default_value_t = 81)]
    frames: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 5.0)]
    guidance: f64,
    /// Shift of the flow sigmas [default: the model's scheduler config].
    #[arg(long)]
    shift: Option<f64>,
    /// Sampler: unipc or euler [default: the model's scheduler config].
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// Seed of the initial noise [default: random, recorded in the sidecar].
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 16)]
    fps: u32,
    /// Text tokens the prompt is cut or padded to.
    #[arg(long, default_value_t = 512)]
    max_sequence_length: usize,
    /// Initial noise: a safetensors file with a tensor `latents` of shape [1, z_dim, (frames-1)/4+1, height/8, width/8].
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Where to run: cpu, cuda (the first GPU) or cuda:N [default: cuda in a CUDA build, else cpu].
    #[arg(long, default_value = if cfg!(feature = "cuda") { "cuda" } else { "cpu" })]
    device: String,
    /// Precision of the text encoder and the transformer: f32, bf16 or f16 (the VAE always runs in f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// Also write every frame as PNG into this folder (frame_00000.png, ...).
    #[arg(long)]
    save_frames: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let sidecar = args.output.with_extension("json");
    // Fail on an unwritable destination now, not after minutes of denoising.
    check_writable(&args.output)?;
    if let Some(dir) = &args.save_frames {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the frames folder {}", dir.display()))?;
        check_writable(&dir.join("frame_00000.png"))?;
    }

    let load_start = Instant::now();
    let model = ModelDir::open(&args.model)?;
    let options = LoadOptions { device: kinetoscope::open_device(&args.device)?, dtype: args.dtype };
    let pipeline = Pipeline::load(&model, &options)?;
    let load_s = load_start.elapsed().as_secs_f64();

    let request = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        height: args.height,
        width: args.width,
        num_frames: args.frames,
        steps: args.steps,
        guidance_scale: args.guidance,
        shift: args.shift,
        scheduler: args.scheduler,
        // Seeds stay below 2^53 so that JSON readers in every language keep them exact.
        seed: args.seed.unwrap_or_else(|| rand::random::<u64>() >> 11),
        latents: args.latents,
        max_sequence_length: args.max_sequence_length,
        fps: args.fps,
    };
    pipeline.validate(&request)?;

    let bar = ProgressBar::new(request.steps as u64).with_style(
        ProgressStyle::with_template("{spinner} {msg:9} {bar:40} {pos}/{len} steps [{elapsed} < {eta}]")
            .expect("static template"),
    );
    bar.set_message("denoising");
    let video = pipeline.generate_with_progress(&request, &mut |p| {
        bar.set_position(p.step as u64);
        if p.step == p.steps {
            // The VAE decode that follows has no steps of its own; keep the spinner turning through it.
            bar.set_message("decoding");
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();

    let encode_start = Instant::now();
    let frames = Frames::from_unit_f32(&video.frames, video.num_frames, video.height, video.width)?;
    let info = kinetoscope_video::write_mp4(&args.output, &frames, video.fps)?;
    if let Some(dir) = &args.save_frames {
        kinetoscope_video::write_png_frames(dir, &frames)?;
    }
    let encode_s = encode_start.elapsed().as_secs_f64();

    let scheduler_config = pipeline.scheduler_config();
    let record = json!({
        "kinetoscope_version": env!("CARGO_PKG_VERSION"),
        "created_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "output": args.output,
        "request": request,
        "resolved": {
            "scheduler": request.scheduler.or(scheduler_config.kind()),
            "shift": request.shift.unwrap_or_else(|| scheduler_config.configured_shift()),
            "guidance": request.guidance_scale > 1.0,
            "device": args.device,
            "dtype": options.dtype.as_str(),
        },
        "model": pipeline.identity(),
        "video": {
            "codec": info.codec,
            "pixel_format": info.pixel_format,
            "width": info.width,
            "height": info.height,
            "frames": info.frames,
            "fps": info.fps,
            "duration_s": info.duration.map(|d| d.as_secs_f64()),
        },
        "timings": {
            "load_s": load_s,
            "text_encoding_s": video.timings.text_encoding_s,
            "denoising_s": video.timings.denoising_s,
            "step_s": video.timings.step_s,
            "vae_decode_s": video.timings.vae_decode_s,
            "encode_s": encode_s,
            "total_s": started.elapsed().as_secs_f64(),
        },
    });
    write_atomically(&sidecar, serde_json::to_string_pretty(&record)?.as_bytes())?;
    eprintln!("wrote {} and {}", args.output.display(), sidecar.display());
    Ok(())
}

/// Checks that a file can be created where `path` points, without touching `path` itself.
fn check_writable(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!("cannot write {}: the folder {} does not exist", path.display(), dir.display());
    }
    tempfile::Builder::new()
        .prefix(".kinetoscope-probe")
        .tempfile_in(dir)
        .map(drop)
        .with_context(|| format!("cannot write {}: the folder {} is not writable", path.display(), dir.display()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes through a temporary file in the same folder, renamed into place once complete, so a reader
/// never sees half a file and an interrupted run leaves the old one intact.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = parent_dir(path).join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("unknown dtype {other:?}: expected f32, bf16 or f16")),
    }
}
