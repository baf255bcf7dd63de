//! The text-to-video pipeline: prompt → text states → flow-matching loop over the transformer with
//! classifier-free guidance → VAE decode → frames. The only place that knows the order of the stages.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};
use kinetoscope_models::wan::vae::{self, AutoencoderKLWan};
use serde::Serialize;

use crate::error::{Error, Result, StageContext};
use crate::model_dir::{ModelDir, ModelIdentity};
use crate::noise;
use crate::scheduler::{SchedulerConfig, SchedulerKind};
use crate::text::TextEncoder;

/// Where and in what precision the networks run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, dtype: DType::F32 }
    }
}

/// What to generate. `Default` gives Wan 2.1's pipeline defaults (832×480, 81 frames, 50 steps,
/// guidance 5, 16 fps, 512 text tokens).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance runs (and the negative prompt is used) when above 1.
    pub guidance_scale: f64,
    /// Shift of the flow sigmas; `None` keeps the scheduler config's.
    pub shift: Option<f64>,
    /// Sampler; `None` keeps the model folder's.
    pub scheduler: Option<SchedulerKind>,
    /// Seed of the initial noise, when `latents` doesn't supply it.
    pub seed: u64,
    /// Initial noise from a safetensors file (tensor `latents`), instead of the seed's.
    pub latents: Option<PathBuf>,
    pub max_sequence_length: usize,
    pub fps: u32,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            height: 480,
            width: 832,
            num_frames: 81,
            steps: 50,
            guidance_scale: 5.0,
            shift: None,
            scheduler: None,
            seed: 0,
            latents: None,
            max_sequence_length: 512,
            fps: 16,
        }
    }
}

/// Seconds spent in each stage of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub text_encoding_s: f64,
    pub denoising_s: f64,
    /// Mean seconds per denoising step (guidance's two passes included).
    pub step_s: f64,
    pub vae_decode_s: f64,
}

/// Reported after every denoising step; returning `ControlFlow::Break` cancels the generation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
}

/// A generated clip: RGB frames in [0, 1], `[num_frames, height, width, 3]` row-major.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Vec<f32>,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    pub fps: u32,
    pub timings: Timings,
}

pub struct Pipeline {
    identity: ModelIdentity,
    device: Device,
    dtype: DType,
    text_encoder: TextEncoder,
    transformer: WanTransformer3DModel,
    transformer_config: transformer::Config,
    vae: AutoencoderKLWan,
    vae_config: vae::Config,
    scheduler_config: SchedulerConfig,
}

impl Pipeline {
    /// Loads every component of a diffusers-layout Wan folder, checking configs and weights against each
    /// other before any work starts.
    pub fn load(dir: &ModelDir, options: &LoadOptions) -> Result<Self> {
        let (device, dtype) = (options.device.clone(), options.dtype);
        crate::device::check_dtype(dtype)?;
        let identity = dir.identity()?;
        let scheduler_config: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
        scheduler_config.validate(&dir.component("scheduler").join("scheduler_config.json"))?;

        let text_encoder = TextEncoder::load(dir, dtype, &device)?;

        let transformer_config: transformer::Config = dir.config("transformer", "config.json")?;
        let weights_error = |component: &'static str| {
            let path = dir.component(component);
            move |e: candle_core::Error| Error::Weights { component, path, reason: e.to_string() }
        };
        let transformer =
            WanTransformer3DModel::new(&transformer_config, dir.var_builder("transformer", dtype, &device)?)
                .map_err(weights_error("transformer"))?;

        // The VAE runs in f32 whatever `dtype` is: its output is the video itself (half-precision decodes
        // are where black and NaN frames come from), and it runs once per video, not once per step.
        let vae_config: vae::Config = dir.config("vae", "config.json")?;
        let vae = AutoencoderKLWan::new(&vae_config, dir.var_builder("vae", DType::F32, &device)?)
            .map_err(weights_error("vae"))?;

        let config_path = |c: &str| dir.component(c).join("config.json");
        if transformer_config.text_dim != text_encoder.dim() {
            return Err(Error::Config {
                path: config_path("transformer"),
                reason: format!(
                    "text_dim {} doesn't match the text encoder's d_model {}",
                    transformer_config.text_dim,
                    text_encoder.dim()
                ),
            });
        }
        if transformer_config.in_channels != vae_config.z_dim {
            return Err(Error::Config {
                path: config_path("transformer"),
                reason: format!(
                    "in_channels {} doesn't match the VAE's z_dim {}",
                    transformer_config.in_channels, vae_config.z_dim
                ),
            });
        }
        Ok(Pipeline {
            identity,
            device,
            dtype,
            text_encoder,
            transformer,
            transformer_config,
            vae,
            vae_config,
            scheduler_config,
        })
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Pixels per latent cell in height/width times the transformer's spatial patch: sizes must be
    /// multiples of this (16 for Wan 2.1).
    pub fn size_multiple(&self) -> usize {
        vae_spatial_scale(&self.vae_config)
            * self.transformer_config.patch_size[1].max(self.transformer_config.patch_size[2])
    }

    /// Frames per latent frame after the first (4 for Wan 2.1): frame counts must be `k·this + 1`.
    pub fn frame_multiple(&self) -> usize {
        1 << self.vae_config.temperal_downsample.iter().filter(|d| **d).count()
    }

    /// Shape of the initial noise for a request: `[1, z_dim, latent frames, height/8, width/8]`.
    pub fn latent_shape(&self, request: &GenerateRequest) -> [usize; 5] {
        let scale = vae_spatial_scale(&self.vae_config);
        let frames = (request.num_frames - 1) / self.frame_multiple() + 1;
        [1, self.vae_config.z_dim, frames, request.height / scale, request.width / scale]
    }

    /// Checks a request against the model's constraints, naming the first field that is off.
    pub fn validate(&self, request: &GenerateRequest) -> Result<()> {
        let invalid = |field, reason: String| Err(Error::InvalidRequest { field, reason });
        let multiple = self.size_multiple();
        for (field, value) in [("height", request.height), ("width", request.width)] {
            if value == 0 || !value.is_multiple_of(multiple) {
                return invalid(field, format!("{value} is not a positive multiple of {multiple}"));
            }
        }
        let fm = self.frame_multiple();
        if request.num_frames == 0 || !(request.num_frames - 1).is_multiple_of(fm) {
            let n = request.num_frames;
            let (lower, upper) = (n.saturating_sub(1) / fm * fm + 1, n.saturating_sub(1).div_ceil(fm) * fm + 1);
            return invalid("num_frames", format!("{n} is not of the form {fm}k+1 (nearest: {lower} or {upper})"));
        }
        let max_steps = self.scheduler_config.num_train_timesteps;
        if request.steps == 0 || request.steps > max_steps {
            return invalid("steps", format!("{} is outside 1..={max_steps}", request.steps));
        }
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return invalid("guidance_scale", format!("{} must be a finite number ≥ 0", request.guidance_scale));
        }
        if let Some(shift) = request.shift.filter(|s| !s.is_finite() || *s <= 0.0) {
            return invalid("shift", format!("{shift} must be a finite number > 0"));
        }
        if request.max_sequence_length == 0 {
            return invalid("max_sequence_length", "must be at least 1".into());
        }
        Ok(())
    }

    /// Text states for a prompt: `[1, max_sequence_length, text_dim]`.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: usize) -> Result<Tensor> {
        self.text_encoder.encode(prompt, max_sequence_length)?.to_dtype(self.dtype).stage("text encoding")
    }

    /// The initial noise a request asks for: from its latents file, else from its seed.
    pub fn initial_latents(&self, request: &GenerateRequest) -> Result<Tensor> {
        let shape = self.latent_shape(request);
        match &request.latents {
            Some(path) => noise::read_latents(path, &shape, &self.device),
            None => noise::seeded_noise(request.seed, &shape, &self.device),
        }
    }

    pub fn generate(&self, request: &GenerateRequest) -> Result<Video> {
        self.generate_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    pub fn generate_with_progress(
        &self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        self.validate(request)?;
        let latents = self.initial_latents(request)?;
        let mut timings = Timings::default();

        let start = Instant::now();
        let guidance = request.guidance_scale > 1.0;
        let prompt = self.encode_prompt(&request.prompt, request.max_sequence_length)?;
        let text = if guidance {
            let negative = self.encode_prompt(&request.negative_prompt, request.max_sequence_length)?;
            Tensor::cat(&[&prompt, &negative], 0).stage("text encoding")?
        } else {
            prompt
        };
        timings.text_encoding_s = start.elapsed().as_secs_f64();
        tracing::debug!(seconds = timings.text_encoding_s, "text encoded");

        let start = Instant::now();
        let latents = self.denoise(latents, &text, request, on_step)?;
        timings.denoising_s = start.elapsed().as_secs_f64();
        timings.step_s = timings.denoising_s / request.steps as f64;
        tracing::debug!(seconds = timings.denoising_s, steps = request.steps, "denoised");
        ensure_finite(&latents, "denoising")?;

        let start = Instant::now();
        let frames = self.decode(&latents)?;
        timings.vae_decode_s = start.elapsed().as_secs_f64();
        tracing::debug!(seconds = timings.vae_decode_s, "decoded");
        ensure_finite(&frames, "VAE decoding")?;

        let (_, num_frames, height, width, _) = frames.dims5().stage("VAE decoding")?;
        let frames = frames.flatten_all().and_then(|f| f.to_vec1::<f32>()).stage("VAE decoding")?;
        Ok(Video { frames, num_frames, height, width, fps: request.fps, timings })
    }

    /// The flow-matching loop. `text` holds the prompt's states, and below them the negative prompt's
    /// when guidance is on: both branches run as one batch of two.
    pub fn denoise(
        &self,
        mut latents: Tensor,
        text: &Tensor,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        const STAGE: &str = "denoising";
        let mut scheduler = self.scheduler_config.build(request.scheduler, request.steps, request.shift);
        let text = self.transformer.embed_text(text).stage(STAGE)?;
        let batch = text.dim(0).stage(STAGE)?;
        let guidance = batch == 2;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = latents.to_dtype(self.dtype).stage(STAGE)?;
            let input = if guidance { Tensor::cat(&[&input, &input], 0).stage(STAGE)? } else { input };
            let timestep = Tensor::full(t, batch, &self.device).stage(STAGE)?;
            let velocity = self.transformer.forward_embedded(&input, &timestep, &text).stage(STAGE)?;
            let velocity = velocity.to_dtype(DType::F32).stage(STAGE)?;
            let velocity = if guidance {
                let (cond, uncond) = (velocity.i(0..1).stage(STAGE)?, velocity.i(1..2).stage(STAGE)?);
                (&uncond + ((cond - &uncond).stage(STAGE)? * request.guidance_scale).stage(STAGE)?).stage(STAGE)?
            } else {
                velocity
            };
            latents = scheduler.step(&velocity, &latents).stage(STAGE)?;
            if on_step(Progress { step: i + 1, steps: timesteps.len() }).is_break() {
                return Err(Error::Cancelled { step: i + 1, steps: timesteps.len() });
            }
        }
        Ok(latents)
    }

    /// Latents → RGB frames in [0, 1], `[1, frames, height, width, 3]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        const STAGE: &str = "VAE decoding";
        let z_dim = self.vae_config.z_dim;
        let column = |values: &[f64]| {
            let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            Tensor::from_vec(values, (1, z_dim, 1, 1, 1), &self.device)
        };
        let mean = column(&self.vae_config.latents_mean).stage(STAGE)?;
        // As diffusers: divide by the reciprocal of the std (the same rounding), then add the mean.
        let inv_std = column(&self.vae_config.latents_std).and_then(|s| s.recip()).stage(STAGE)?;
        let z =
            latents.to_dtype(DType::F32).and_then(|z| z.broadcast_div(&inv_std)?.broadcast_add(&mean)).stage(STAGE)?;
        let video = self.vae.decode(&z).stage(STAGE)?;
        // [-1, 1] → [0, 1], channels last.
        let video = ((video * 0.5).and_then(|v| v + 0.5)).and_then(|v| v.clamp(0f32, 1f32));
        video.and_then(|v| v.permute((0, 2, 3, 4, 1))).and_then(|v| v.contiguous()).stage(STAGE)
    }
}

fn vae_spatial_scale(cfg: &vae::Config) -> usize {
    1 << (cfg.dim_mult.len() - 1)
}

fn ensure_finite(t: &Tensor, stage: &'static str) -> Result<()> {
    let sum = t.to_dtype(DType::F32).and_then(|t| t.sum_all()).and_then(|s| s.to_scalar::<f32>()).stage(stage)?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite { stage })
    }
}
