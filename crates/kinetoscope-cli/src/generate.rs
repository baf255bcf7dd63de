//! `kinetoscope generate`: one prompt → one MP4 (+ sidecar JSON, + optional PNG frames).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kinetoscope::scheduler::SchedulerKind;
use kinetoscope::{DType, GenerateRequest, LoadOptions, ModelDir, Pipeline};

use crate::output;

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
    /// Also write every frame as PNG into this folder (frame_00000.png, ...).
    #[arg(long)]
    save_frames: Option<PathBuf>,
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
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    // Fail on an unwritable destination now, not after minutes of denoising.
    output::check_writable(&args.output)?;
    if let Some(dir) = &args.save_frames {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the frames folder {}", dir.display()))?;
        output::check_writable(&dir.join("frame_00000.png"))?;
    }

    let (pipeline, load_s) = args.model.load()?;

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

    let setup = args.model.setup(&pipeline, load_s);
    output::write_video(&setup, &request, &video, &args.output, args.save_frames.as_deref(), started)?;
    eprintln!("wrote {} and {}", args.output.display(), output::sidecar_path(&args.output).display());
    Ok(())
}

impl ModelArgs {
    /// Opens the model folder and loads the pipeline on the device asked for; returns it with the
    /// seconds loading took.
    pub fn load(&self) -> Result<(Pipeline, f64)> {
        let start = Instant::now();
        let model = ModelDir::open(&self.model)?;
        let options = LoadOptions { device: kinetoscope::open_device(&self.device)?, dtype: self.dtype };
        let pipeline = Pipeline::load(&model, &options)?;
        Ok((pipeline, start.elapsed().as_secs_f64()))
    }

    pub fn setup<'a>(&'a self, pipeline: &'a Pipeline, load_s: f64) -> output::Setup<'a> {
        output::Setup { pipeline, device: &self.device, dtype: self.dtype, load_s }
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    kinetoscope::parse_dtype(s).map_err(|e| e.to_string())
}
