//! `kinetoscope generate`: one prompt → one MP4 (+ sidecar JSON, + optional PNG frames).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kinetoscope::scheduler::SchedulerKind;
use kinetoscope::{
    DType, Device, GenerateRequest, LoadOptions, ModelDir, Pipeline, Preset, TextEncoderPlacement, VaeTiling,
};

use crate::edit::EditArgs;
use crate::output::{self, Candidates};

#[derive(clap::Args)]
pub struct Args {
    /// What the video shows.
    #[arg(long)]
    prompt: String,
    /// Where the MP4 goes; the sidecar is written beside it with the extension `.json`.
    #[arg(long, short, default_value = "out.mp4")]
    output: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Steps, size and step cache in one choice: draft (20 steps, 416x240, cache 0.10), balanced (30 steps,
    /// 832x480, cache 0.05) or quality (50 steps, 832x480, no cache). Flags given explicitly override it.
    #[arg(long)]
    preset: Option<Preset>,
    /// What the video should not show (used when guidance > 1).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// [default: 480, or the preset's]
    #[arg(long)]
    height: Option<usize>,
    /// [default: 832, or the preset's]
    #[arg(long)]
    width: Option<usize>,
    /// Number of frames, 4k+1.
    #[arg(long, default_value_t = 81)]
    frames: usize,
    /// Denoising steps [default: 50, or the preset's].
    #[arg(long)]
    steps: Option<usize>,
    /// Step caching: a step whose first transformer block's residual changed by less than THRESHOLD
    /// (relative L1) since the last full step reuses the other blocks' residual instead of running them;
    /// 0.05 is mild, 0.1 strong [default: off, or the preset's].
    #[arg(long, value_name = "THRESHOLD")]
    step_cache: Option<f64>,
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
    /// Also write every frame as PNG into this folder (frame_00000.png, ...); of the kept candidate.
    #[arg(long)]
    save_frames: Option<PathBuf>,
    #[command(flatten)]
    candidates: Candidates,
    #[command(flatten)]
    edit: EditArgs,
}

/// Which model, where and in what precision: the flags every subcommand that renders shares.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A diffusers-layout model folder, or a Hugging Face repository id found in the local cache.
    #[arg(long, default_value = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")]
    model: String,
    /// Where to run: cpu, cuda (the first GPU) or cuda:N [default: cuda in a CUDA build, else cpu].
    #[arg(long, default_value = if cfg!(feature = "cuda") { "cuda" } else { "cpu" })]
    device: String,
    /// Precision of the text encoder and the transformer: f32, bf16 or f16 (the VAE always runs in f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// How the pipeline uses memory: the flags `generate`, `batch` and `serve` share.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct MemoryArgs {
    /// Working memory (beyond the weights) a stage may need, e.g. 8GiB or 512MiB; a request that would need
    /// more fails with out_of_memory before the stage starts; an offloaded text encoder's weights count in
    /// text encoding's need [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_limit)]
    pub memory_limit: Option<u64>,
    /// Where the text encoder lives: resident (on the device for good), offload (loaded onto the GPU for
    /// each request's prompts and freed before denoising) or cpu (runs on the CPU in f32).
    #[arg(long, value_name = "WHERE", default_value = "offload")]
    pub text_encoder: TextEncoderPlacement,
    /// VAE decoding in spatial tiles: auto (only when decoding whole would not fit in the memory limit or
    /// the GPU's free memory), on (256-pixel tiles every 192 pixels, as diffusers' enable_tiling) or off.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub vae_tiling: VaeTiling,
}

impl MemoryArgs {
    pub fn load_options(&self, device: Device, dtype: DType) -> LoadOptions {
        LoadOptions {
            device,
            dtype,
            memory_limit: self.memory_limit,
            text_encoder: self.text_encoder,
            vae_tiling: self.vae_tiling,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    // Fail on an unwritable destination now, not after minutes of denoising.
    output::check_writable(&args.output)?;
    if let Some(dir) = &args.save_frames {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the frames folder {}", dir.display()))?;
        output::check_writable(&dir.join("frame_00000.png"))?;
    }

    let mut request = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        num_frames: args.frames,
        guidance_scale: args.guidance,
        shift: args.shift,
        scheduler: args.scheduler,
        // Seeds stay below 2^53 so that JSON readers in every language keep them exact.
        seed: args.seed.unwrap_or_else(|| rand::random::<u64>() >> 11),
        latents: args.latents,
        max_sequence_length: args.max_sequence_length,
        fps: args.fps,
        ..GenerateRequest::default()
    };
    if let Some(preset) = args.preset {
        preset.apply(&mut request);
    }
    request.height = args.height.unwrap_or(request.height);
    request.width = args.width.unwrap_or(request.width);
    request.steps = args.steps.unwrap_or(request.steps);
    request.step_cache = args.step_cache.or(request.step_cache);
    args.candidates.seeds(request.seed)?;
    let edit = args.edit.read()?;

    let (pipeline, load_s) = args.model.load()?;
    let edit = edit.map(|edit| edit.fit(&request, &pipeline)).transpose()?;
    if let Some(edit) = &edit {
        edit.shape(&mut request);
    }
    pipeline.validate(&request)?;
    let steps = match &edit {
        Some(edit) => edit.steps(request.steps)?,
        None => request.steps,
    };

    let count = args.candidates.count;
    let template = if count > 1 {
        "{spinner} {msg:20} {bar:40} {pos}/{len} steps [{elapsed} < {eta}]"
    } else {
        "{spinner} {msg:9} {bar:40} {pos}/{len} steps [{elapsed} < {eta}]"
    };
    let bar = ProgressBar::new((count * steps) as u64)
        .with_style(ProgressStyle::with_template(template).expect("static template"));
    // The VAE decode after each candidate's last step has no steps of its own; the steady tick keeps the
    // spinner turning through it.
    bar.enable_steady_tick(Duration::from_millis(120));
    let label =
        |k: usize, stage: &str| if count > 1 { format!("candidate {}/{count} {stage}", k + 1) } else { stage.into() };
    bar.set_message(label(0, "denoising"));
    let setup = args.model.setup(&pipeline, load_s);
    let job = output::Job {
        request: &request,
        preset: args.preset,
        output: &args.output,
        save_frames: args.save_frames.as_deref(),
        started,
        edit: edit.as_ref(),
    };
    output::render(&setup, &job, args.candidates, &mut |k, p| {
        bar.set_position((k * p.steps + p.step) as u64);
        bar.set_message(label(k, if p.step == p.steps { "decoding" } else { "denoising" }));
    })?;
    bar.finish_and_clear();
    eprintln!("wrote {} and {}", args.output.display(), output::sidecar_path(&args.output).display());
    Ok(())
}

impl ModelArgs {
    /// Opens the model folder and loads the pipeline on the device asked for; returns it with the
    /// seconds loading took.
    pub fn load(&self) -> Result<(Pipeline, f64)> {
        let start = Instant::now();
        let model = ModelDir::open(&self.model)?;
        let options = self.memory.load_options(kinetoscope::open_device(&self.device)?, self.dtype);
        let pipeline = Pipeline::load(&model, &options)?;
        Ok((pipeline, start.elapsed().as_secs_f64()))
    }

    pub fn setup<'a>(&'a self, pipeline: &'a Pipeline, load_s: f64) -> output::Setup<'a> {
        output::Setup { pipeline, device: &self.device, dtype: self.dtype, load_s }
    }
}

pub(crate) fn parse_dtype(s: &str) -> Result<DType, String> {
    kinetoscope::parse_dtype(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_memory_limit(s: &str) -> Result<u64, String> {
    s.parse::<kinetoscope::MemoryLimit>().map(kinetoscope::MemoryLimit::bytes)
}
