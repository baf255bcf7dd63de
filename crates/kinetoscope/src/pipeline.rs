//! The text-to-video pipeline: prompt → text states → flow-matching loop over the transformer with
//! classifier-free guidance → VAE decode → frames. The only place that knows the order of the stages.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};
use kinetoscope_models::wan::vae::{self, AutoencoderKLWan};
use serde::Serialize;

use crate::edit::Hold;
use crate::error::{Error, Result, StageContext};
use crate::memory::{MemoryBudget, WorkingMemory};
use crate::model_dir::{ModelDir, ModelIdentity};
use crate::noise;
use crate::scheduler::{SchedulerConfig, SchedulerKind};
use crate::text::{TextEncoder, TextEncoderPlacement};

/// Where and in what precision the networks run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Bytes of working memory (beyond the weights) a request's stage may need; a request whose stage
    /// would need more fails with `Error::OutOfMemory` before the stage starts. `None`: no limit. An offloaded
    /// text encoder's weights are loaded for each request and count in text encoding's need.
    pub memory_limit: Option<u64>,
    /// Where the text encoder lives between requests (default: offloaded from the GPU between them).
    pub text_encoder: TextEncoderPlacement,
    /// When the VAE decodes in spatial tiles (default: when decoding whole would not fit).
    pub vae_tiling: VaeTiling,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            memory_limit: None,
            text_encoder: TextEncoderPlacement::default(),
            vae_tiling: VaeTiling::default(),
        }
    }
}

/// When the VAE decodes tile by tile ([`vae::Tiling`]: less memory, and a video that differs from the whole
/// decode by the blending at the tiles' overlaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// Tiles of diffusers' default size when decoding whole would need more working memory than there is:
    /// the memory limit if one is set, and on a GPU what is free when decoding starts. The sidecar records
    /// whether it tiled.
    #[default]
    Auto,
    /// Always whole (diffusers' default).
    Off,
    /// Always these tiles (where the frame is larger than one).
    On(vae::Tiling),
}

impl std::str::FromStr for VaeTiling {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "auto" => Ok(VaeTiling::Auto),
            "off" => Ok(VaeTiling::Off),
            "on" => Ok(VaeTiling::On(vae::Tiling::default())),
            _ => Err(format!("{text:?}: expected auto, off or on")),
        }
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
    /// Step caching: the largest relative L1 change of the first transformer block's residual, since the
    /// last step computed in full, at which a step reuses what the other blocks added at that step instead
    /// of running them (see `StepCache`). `None` computes every step; 0 too, while paying for the check.
    /// Diffusers' first-block cache defaults to 0.05; larger is faster and less faithful.
    pub step_cache: Option<f64>,
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
            step_cache: None,
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
    /// Denoising steps that reused the step cache instead of running every transformer block.
    pub cached_steps: usize,
    /// The tiles the VAE decoded in, `None` if it decoded whole.
    pub vae_tiling: Option<vae::Tiling>,
    /// The most GPU memory the pipeline's tensors held at once during the generation, weights included
    /// (`None` on the CPU, or where the driver can't say).
    pub peak_gpu_memory_bytes: Option<u64>,
}

/// Reported after every denoising step; returning `ControlFlow::Break` cancels the generation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    /// Whether this step reused the step cache instead of running every transformer block.
    pub cached: bool,
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
    memory: MemoryBudget,
    shape: ModelShape,
}

/// What a model's configs say about the requests it can take, known before any weight is read, so that a
/// server can check requests while the model is still loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Pixels per latent cell in height/width times the transformer's spatial patch: sizes must be
    /// multiples of this (16 for Wan 2.1, 32 for Wan 2.2 TI2V).
    pub size_multiple: usize,
    /// Frames per latent frame after the first (4 for Wan 2.1): frame counts must be `k·this + 1`.
    pub frame_multiple: usize,
    /// The scheduler's training timesteps: the most steps a request may take.
    pub max_steps: usize,
    /// Whether the model takes one timestep per token (`expand_timesteps`) and so can hold an image as its
    /// first frame.
    pub takes_image: bool,
}

impl ModelShape {
    /// Reads the configs of `dir` (no weights).
    pub fn read(dir: &ModelDir) -> Result<Self> {
        let transformer_config: transformer::Config = dir.config("transformer", "config.json")?;
        let vae_config: vae::Config = dir.config("vae", "config.json")?;
        let scheduler_config: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
        Ok(Self::of(&transformer_config, &vae_config, &scheduler_config, dir.model_index()?.expand_timesteps))
    }

    fn of(
        transformer_config: &transformer::Config,
        vae_config: &vae::Config,
        scheduler_config: &SchedulerConfig,
        expand_timesteps: bool,
    ) -> Self {
        ModelShape {
            size_multiple: vae_config.spatial_compression()
                * transformer_config.patch_size[1].max(transformer_config.patch_size[2]),
            frame_multiple: 1 << vae_config.temperal_downsample.iter().filter(|d| **d).count(),
            max_steps: scheduler_config.num_train_timesteps,
            takes_image: expand_timesteps,
        }
    }

    /// Checks a request's size, frame count and steps, naming the first field that is off.
    pub fn validate(&self, request: &GenerateRequest) -> Result<()> {
        let invalid = |field, reason: String| Err(Error::InvalidRequest { field, reason });
        let multiple = self.size_multiple;
        for (field, value) in [("height", request.height), ("width", request.width)] {
            if value == 0 || !value.is_multiple_of(multiple) {
                return invalid(field, format!("{value} is not a positive multiple of {multiple}"));
            }
        }
        let fm = self.frame_multiple;
        if request.num_frames == 0 || !(request.num_frames - 1).is_multiple_of(fm) {
            let n = request.num_frames;
            let (lower, upper) = (n.saturating_sub(1) / fm * fm + 1, n.saturating_sub(1).div_ceil(fm) * fm + 1);
            return invalid("num_frames", format!("{n} is not of the form {fm}k+1 (nearest: {lower} or {upper})"));
        }
        if request.steps == 0 || request.steps > self.max_steps {
            return invalid("steps", format!("{} is outside 1..={}", request.steps, self.max_steps));
        }
        Ok(())
    }
}

impl Pipeline {
    /// Loads every component of a diffusers-layout Wan folder, checking configs and weights against each
    /// other before any work starts.
    pub fn load(dir: &ModelDir, options: &LoadOptions) -> Result<Self> {
        let (device, dtype) = (options.device.clone(), options.dtype);
        crate::device::check_dtype(dtype)?;
        let identity = dir.identity()?;
        let index = dir.model_index()?;
        let scheduler_config: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
        scheduler_config.validate(&dir.component("scheduler").join("scheduler_config.json"))?;

        let text_encoder = TextEncoder::load(dir, dtype, &device, options.text_encoder)?;

        let transformer_config: transformer::Config = dir.config("transformer", "config.json")?;
        let weights_error = |component: &'static str| {
            let path = dir.component(component);
            move |e: candle_core::Error| Error::Weights { component, path, reason: e.to_string() }
        };
        let transformer =
            WanTransformer3DModel::new(&transformer_config, dir.var_builder("transformer", dtype, &device)?)
                .map_err(weights_error("transformer"))?;

        // The VAE runs in f32 whatever `dtype` is: its output is the video itself (half-precision decodes
        // are where black and NaN frames come from), and it runs once per video, not once per step. With
        // half-precision networks on a GPU its products use TF32, as diffusers' do under PyTorch (`with_tf32`).
        let vae_config: vae::Config = dir.config("vae", "config.json")?;
        let vae = AutoencoderKLWan::new(&vae_config, dir.var_builder("vae", DType::F32, &device)?)
            .map_err(weights_error("vae"))?;

        crate::registry::check_configs_agree(dir, &transformer_config, text_encoder.dim(), &vae_config)?;
        if let VaeTiling::On(tiling) = options.vae_tiling {
            let reason = |e: candle_core::Error| Error::InvalidRequest { field: "vae_tiling", reason: e.to_string() };
            tiling.check(vae_config.spatial_compression()).map_err(reason)?;
        }
        let text_weight_bytes = match options.text_encoder {
            TextEncoderPlacement::Offload => {
                crate::memory::text_encoder_weight_bytes(text_encoder.config(), dtype.size_in_bytes())
            }
            TextEncoderPlacement::Resident | TextEncoderPlacement::Cpu => 0,
        };
        let memory = MemoryBudget::new(
            options.memory_limit,
            text_encoder.config(),
            &transformer_config,
            &vae_config,
            options.vae_tiling,
            text_weight_bytes,
        );
        let shape = ModelShape::of(&transformer_config, &vae_config, &scheduler_config, index.expand_timesteps);
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
            memory,
            shape,
        })
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Where the text encoder lives between requests.
    pub fn text_encoder_placement(&self) -> TextEncoderPlacement {
        self.text_encoder.placement()
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// What the model's configs allow a request (see [`ModelShape`]).
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// Whether the model generates from an image as well as from text (Wan 2.2 TI2V): see
    /// [`Pipeline::image_to_video`].
    pub fn takes_image(&self) -> bool {
        self.shape.takes_image
    }

    /// See [`ModelShape::size_multiple`].
    pub fn size_multiple(&self) -> usize {
        self.shape.size_multiple
    }

    /// See [`ModelShape::frame_multiple`].
    pub fn frame_multiple(&self) -> usize {
        self.shape.frame_multiple
    }

    /// What `request`'s stages would need beyond the weights, as [`LoadOptions::memory_limit`] checks it.
    pub fn working_memory(&self, request: &GenerateRequest) -> WorkingMemory {
        self.memory.estimate(self.latent_shape(request), request.max_sequence_length, request.guidance_scale > 1.0)
    }

    /// Shape of the initial noise for a request: `[1, z_dim, latent frames, height/s, width/s]` (s = 8 for Wan
    /// 2.1, 16 for Wan 2.2 TI2V).
    pub fn latent_shape(&self, request: &GenerateRequest) -> [usize; 5] {
        let scale = self.vae_config.spatial_compression();
        let frames = (request.num_frames - 1) / self.frame_multiple() + 1;
        [1, self.vae_config.z_dim, frames, request.height / scale, request.width / scale]
    }

    /// Checks a request against the model's constraints, naming the first field that is off.
    pub fn validate(&self, request: &GenerateRequest) -> Result<()> {
        let invalid = |field, reason: String| Err(Error::InvalidRequest { field, reason });
        self.shape.validate(request)?;
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return invalid("guidance_scale", format!("{} must be a finite number ≥ 0", request.guidance_scale));
        }
        if let Some(shift) = request.shift.filter(|s| !s.is_finite() || *s <= 0.0) {
            return invalid("shift", format!("{shift} must be a finite number > 0"));
        }
        if request.max_sequence_length == 0 {
            return invalid("max_sequence_length", "must be at least 1".into());
        }
        if let Some(threshold) = request.step_cache.filter(|t| !t.is_finite() || *t < 0.0) {
            return invalid("step_cache", format!("{threshold} must be a finite number ≥ 0 (0.05 is a mild cache)"));
        }
        Ok(())
    }

    /// Text states for a prompt: `[1, max_sequence_length, text_dim]`.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: usize) -> Result<Tensor> {
        let states = self.text_encoder.encode(&[prompt], max_sequence_length)?.remove(0);
        states.to_dtype(self.dtype).stage("text encoding")
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
        self.generate_from(latents, 0, request, Condition::Text, on_step)
    }

    /// Runs the request's schedule from step `first_step` (0-based) on `latents`, already at that step's noise
    /// level, and decodes the result: text-to-video from 0, video-to-video from later; `condition` says what
    /// else holds latents fixed (a clip's frames, an image).
    pub(crate) fn generate_from(
        &self,
        latents: Tensor,
        first_step: usize,
        request: &GenerateRequest,
        condition: Condition,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let (latents, timings) = self.denoise_request(latents, first_step, request, condition, on_step)?;
        self.decode_video(&latents, timings, request.fps)
    }

    /// The first half of [`Pipeline::generate_from`]: encodes the prompts and runs the loop; returns the
    /// denoised latents and the timings so far.
    pub(crate) fn denoise_request(
        &self,
        latents: Tensor,
        first_step: usize,
        request: &GenerateRequest,
        condition: Condition,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Tensor, Timings)> {
        let mut timings = Timings::default();
        crate::device::reset_peak_gpu_memory(&self.device);

        let start = Instant::now();
        let guidance = request.guidance_scale > 1.0;
        self.memory.check_request(&latents, request.max_sequence_length, guidance)?;
        // Both prompts at once: an offloaded encoder is loaded once per request.
        let mut prompts = vec![request.prompt.as_str()];
        if guidance {
            prompts.push(&request.negative_prompt);
        }
        let states = self.text_encoder.encode(&prompts, request.max_sequence_length)?;
        let text = Tensor::cat(&states, 0).and_then(|t| t.to_dtype(self.dtype)).stage("text encoding")?;
        timings.text_encoding_s = start.elapsed().as_secs_f64();
        tracing::debug!(seconds = timings.text_encoding_s, "text encoded");

        let start = Instant::now();
        let latents = self.denoise_held(latents, &text, request, first_step, condition, &mut |progress| {
            timings.cached_steps += usize::from(progress.cached);
            on_step(progress)
        })?;
        timings.denoising_s = start.elapsed().as_secs_f64();
        let steps = request.steps - first_step;
        timings.step_s = timings.denoising_s / steps as f64;
        tracing::debug!(seconds = timings.denoising_s, steps, "denoised");
        ensure_finite(&latents, "denoising")?;
        Ok((latents, timings))
    }

    /// The second half of [`Pipeline::generate_from`]: decodes the denoised latents into the video.
    pub(crate) fn decode_video(&self, latents: &Tensor, mut timings: Timings, fps: u32) -> Result<Video> {
        let start = Instant::now();
        let (frames, tiling) = self.decode_with_tiling(latents)?;
        timings.vae_decode_s = start.elapsed().as_secs_f64();
        timings.vae_tiling = tiling;
        timings.peak_gpu_memory_bytes = crate::device::peak_gpu_memory(&self.device);
        tracing::debug!(seconds = timings.vae_decode_s, "decoded");
        ensure_finite(&frames, "VAE decoding")?;

        let (_, num_frames, height, width, _) = frames.dims5().stage("VAE decoding")?;
        let frames = frames.flatten_all().and_then(|f| f.to_vec1::<f32>()).stage("VAE decoding")?;
        Ok(Video { frames, num_frames, height, width, fps, timings })
    }

    /// The flow-matching loop. `text` holds the prompt's states, and below them the negative prompt's
    /// when guidance is on: both branches run as one batch of two, and the step cache (when the request
    /// asks for it) decides for the batch as a whole.
    pub fn denoise(
        &self,
        latents: Tensor,
        text: &Tensor,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        self.denoise_from(latents, text, request, 0, on_step)
    }

    /// The flow-matching loop over the steps of the request's schedule from `first_step` (0-based) on, as
    /// diffusers' image- and video-to-video pipelines run it: `latents` are at that step's noise level, and
    /// the scheduler starts there with no history. Progress counts the steps run.
    pub fn denoise_from(
        &self,
        latents: Tensor,
        text: &Tensor,
        request: &GenerateRequest,
        first_step: usize,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        self.denoise_held(latents, text, request, first_step, Condition::Text, on_step)
    }

    /// [`Pipeline::denoise_from`] under `condition`: held frames are put back after every step at the noise
    /// level the step reached; an image's first latent frame before every prediction, at timestep 0.
    fn denoise_held(
        &self,
        mut latents: Tensor,
        text: &Tensor,
        request: &GenerateRequest,
        first_step: usize,
        condition: Condition,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        const STAGE: &str = "denoising";
        let mut scheduler = self.scheduler_config.build(request.scheduler, request.steps, request.shift);
        scheduler.set_begin_index(first_step);
        let text = self.transformer.embed_text(text).stage(STAGE)?;
        let batch = text.dim(0).stage(STAGE)?;
        let guidance = batch == 2;
        let timesteps = scheduler.timesteps()[first_step.min(request.steps)..].to_vec();
        let sigmas = scheduler.sigmas()[first_step.min(request.steps)..].to_vec();
        let mut cache = request.step_cache.map(StepCache::new);
        for (i, &t) in timesteps.iter().enumerate() {
            if let Condition::FirstFrame(image) = condition {
                latents = with_first_frame(&latents, image).stage(STAGE)?;
            }
            let input = latents.to_dtype(self.dtype).stage(STAGE)?;
            let input = if guidance { Tensor::cat(&[&input, &input], 0).stage(STAGE)? } else { input };
            let timestep = match condition {
                Condition::FirstFrame(_) => self.first_frame_timesteps(&latents, t, batch).stage(STAGE)?,
                _ => Tensor::full(t, batch, &self.device).stage(STAGE)?,
            };
            let (velocity, cached) = match &mut cache {
                Some(cache) => cache.forward(&self.transformer, &input, &timestep, &text, i, timesteps.len()),
                None => self.transformer.forward_embedded(&input, &timestep, &text).map(|v| (v, false)),
            }
            .stage(STAGE)?;
            let velocity = velocity.to_dtype(DType::F32).stage(STAGE)?;
            let velocity = if guidance {
                let (cond, uncond) = (velocity.i(0..1).stage(STAGE)?, velocity.i(1..2).stage(STAGE)?);
                (&uncond + ((cond - &uncond).stage(STAGE)? * request.guidance_scale).stage(STAGE)?).stage(STAGE)?
            } else {
                velocity
            };
            latents = scheduler.step(&velocity, &latents).stage(STAGE)?;
            if let Condition::Hold(hold) = condition {
                latents = hold.apply(&latents, sigmas[i + 1]).stage(STAGE)?;
            }
            if on_step(Progress { step: i + 1, steps: timesteps.len(), cached }).is_break() {
                return Err(Error::Cancelled { step: i + 1, steps: timesteps.len() });
            }
        }
        match condition {
            Condition::FirstFrame(image) => with_first_frame(&latents, image).stage(STAGE),
            _ => Ok(latents),
        }
    }

    /// Wan 2.2 TI2V's per-token timesteps `[batch, L]` for `latents` `[1, C, T, h, w]`: 0 for the tokens of the
    /// first latent frame (the image, already clean), `t` for the others.
    fn first_frame_timesteps(&self, latents: &Tensor, t: f32, batch: usize) -> candle_core::Result<Tensor> {
        let (_, _, frames, h, w) = latents.dims5()?;
        let [_, ph, pw] = self.transformer_config.patch_size;
        let per_frame = (h / ph) * (w / pw);
        let image = Tensor::zeros(per_frame, DType::F32, &self.device)?;
        let rest = Tensor::full(t, (frames - 1) * per_frame, &self.device)?;
        Tensor::cat(&[image, rest], 0)?.unsqueeze(0)?.repeat((batch, 1))
    }

    /// The VAE's per-channel latent mean and the reciprocal of its std, `[1, z_dim, 1, 1, 1]` each: diffusers
    /// normalizes by multiplying with the reciprocal and de-normalizes by dividing by it (the same rounding).
    fn latent_statistics(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let z_dim = self.vae_config.z_dim;
        let column = |values: &[f64]| {
            let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            Tensor::from_vec(values, (1, z_dim, 1, 1, 1), &self.device)
        };
        Ok((column(&self.vae_config.latents_mean)?, column(&self.vae_config.latents_std)?.recip()?))
    }

    /// RGB frames in [0, 1], `[frames, height, width, 3]` (frames `4k + 1`, sizes multiples of 8), → the
    /// normalized latents the transformer works in, `[1, z_dim, k + 1, height/8, width/8]`: the mode (mean)
    /// of the VAE's posterior, as diffusers' video-to-video pipeline takes it (`sample_mode="argmax"`).
    pub fn encode(&self, frames: &Tensor) -> Result<Tensor> {
        const STAGE: &str = "VAE encoding";
        self.memory.check_encoding(frames)?;
        let (mean, inv_std) = self.latent_statistics().stage(STAGE)?;
        // [0, 1] channels last → [-1, 1] as [1, 3, F, H, W].
        let video = frames.to_dtype(DType::F32).and_then(|f| (f * 2.0)? - 1.0);
        let video = video.and_then(|v| v.permute((3, 0, 1, 2))?.unsqueeze(0)?.contiguous()).stage(STAGE)?;
        let (z, _logvar) =
            crate::device::with_tf32(&self.device, self.vae_in_tf32(), || self.vae.encode(&video)).stage(STAGE)?;
        z.broadcast_sub(&mean).and_then(|z| z.broadcast_mul(&inv_std)).stage(STAGE)
    }

    /// Latents → RGB frames in [0, 1], `[1, frames, height, width, 3]`, tiled as [`LoadOptions::vae_tiling`]
    /// says.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decode_with_tiling(latents)?.0)
    }

    /// Whether the VAE's f32 products may use TF32 on a GPU: in a half-precision pipeline, as diffusers'
    /// convolutions do under PyTorch; an f32 pipeline keeps full f32, for parity.
    fn vae_in_tf32(&self) -> bool {
        self.dtype != DType::F32
    }

    /// [`Pipeline::decode`], and the tiles it decoded in (`None`: whole).
    fn decode_with_tiling(&self, latents: &Tensor) -> Result<(Tensor, Option<vae::Tiling>)> {
        const STAGE: &str = "VAE decoding";
        let latent = latents.dims5().stage(STAGE)?.into();
        let free = crate::device::gpu_memory_free(&self.device);
        let tiling = self.memory.decode_tiling(latent, free);
        self.memory.check_decoding(latent, tiling)?;
        let (mean, inv_std) = self.latent_statistics().stage(STAGE)?;
        let z =
            latents.to_dtype(DType::F32).and_then(|z| z.broadcast_div(&inv_std)?.broadcast_add(&mean)).stage(STAGE)?;
        let video = crate::device::with_tf32(&self.device, self.vae_in_tf32(), || match tiling {
            Some(tiling) => self.vae.decode_tiled(&z, tiling),
            None => self.vae.decode(&z),
        })
        .stage(STAGE)?;
        // [-1, 1] → [0, 1], channels last.
        let video = ((video * 0.5).and_then(|v| v + 0.5)).and_then(|v| v.clamp(0f32, 1f32));
        let frames = video.and_then(|v| v.permute((0, 2, 3, 4, 1))).and_then(|v| v.contiguous()).stage(STAGE)?;
        Ok((frames, tiling))
    }
}

/// What holds latents fixed during the loop, besides the prompt.
#[derive(Clone, Copy)]
pub(crate) enum Condition<'a> {
    /// Nothing: text-to-video, video-to-video.
    Text,
    /// Latent frames held to a clip's after every step (a time-range redo, an extension).
    Hold(&'a Hold),
    /// Wan 2.2 TI2V: the first latent frame is an image's normalized encoding `[1, C, 1, h, w]`, put back before
    /// every prediction and at the end, with its tokens at timestep 0. diffusers mixes it into the model's input
    /// only and lets the scheduler carry its own first frame, which no other element depends on (every
    /// scheduler update is elementwise): putting it into the latents gives the same video.
    FirstFrame(&'a Tensor),
}

/// `latents` `[B, C, T, h, w]` with latent frame 0 replaced by `first` `[B, C, 1, h, w]`.
fn with_first_frame(latents: &Tensor, first: &Tensor) -> candle_core::Result<Tensor> {
    let frames = latents.dim(2)?;
    Tensor::cat(&[first, &latents.narrow(2, 1, frames - 1)?], 2)
}

/// First-block cache, of the TeaCache family (as ParaAttention's and diffusers' `FirstBlockCache`): each step
/// runs the transformer's first block; when what that block added to the tokens (its residual) changed by
/// less than `threshold` in relative L1, `Σ|r − r_last| / Σ|r_last|`, from the last step computed in full,
/// the remaining blocks don't run and what they added at that step is added again. The first block's
/// residual stands in for how much the whole network's input has moved: it sees the new latents and the new
/// timestep. Comparing with the last full step, not the previous step, keeps slow drift from going unnoticed
/// across a run of reused steps.
///
/// Which steps may reuse: never the first two nor the last. The first has nothing to compare with; the
/// second compares with the noisiest prediction, where the trajectory turns fastest and an error would
/// carry through every later step; the last sets the fine detail the video shows, and nothing after it
/// could correct a stale residual.
struct StepCache {
    threshold: f64,
    last_full: Option<FullStep>,
}

/// What the last step computed in full leaves for the steps after it, in the transformer's dtype.
struct FullStep {
    /// What the first block added to the tokens.
    first_residual: Tensor,
    /// What the remaining blocks added.
    rest_residual: Tensor,
}

impl StepCache {
    fn new(threshold: f64) -> Self {
        StepCache { threshold, last_full: None }
    }

    /// Whether step `step` (0-based) of `steps` may reuse the cache.
    fn may_reuse(step: usize, steps: usize) -> bool {
        step >= 2 && step + 1 < steps
    }

    /// The transformer's prediction for step `step` of `steps`, and whether it reused the cache. A step
    /// computed in full runs exactly the operations of `forward_embedded`, so a cache that never hits
    /// changes nothing.
    fn forward(
        &mut self,
        transformer: &WanTransformer3DModel,
        input: &Tensor,
        timestep: &Tensor,
        text: &Tensor,
        step: usize,
        steps: usize,
    ) -> candle_core::Result<(Tensor, bool)> {
        let embedded = transformer.embed(input, timestep, text)?;
        let first = transformer.run_blocks(embedded.tokens(), 0..1, &embedded)?;
        let first_residual = (&first - embedded.tokens())?;
        let change = match &self.last_full {
            Some(last) if Self::may_reuse(step, steps) => Some(relative_l1(&first_residual, &last.first_residual)?),
            _ => None,
        };
        let reusable = change.is_some_and(|change| change < self.threshold);
        tracing::debug!(step, ?change, reusable, "step cache");
        let tokens = match &self.last_full {
            Some(last) if reusable => (&first + &last.rest_residual)?,
            _ => {
                let tokens = transformer.run_blocks(&first, 1..transformer.num_blocks(), &embedded)?;
                self.last_full = Some(FullStep { rest_residual: (&tokens - &first)?, first_residual });
                tokens
            }
        };
        Ok((transformer.project_out(&tokens, &embedded)?, reusable))
    }
}

/// `Σ|a − b| / Σ|b|`, summed in f32; NaN or infinite when `b` is all zeros, which no threshold passes.
fn relative_l1(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let sum_abs = |t: &Tensor| t.abs()?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>();
    Ok(f64::from(sum_abs(&(a - b)?)?) / f64::from(sum_abs(b)?))
}

fn ensure_finite(t: &Tensor, stage: &'static str) -> Result<()> {
    let sum = t.to_dtype(DType::F32).and_then(|t| t.sum_all()).and_then(|s| s.to_scalar::<f32>()).stage(stage)?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite { stage })
    }
}
