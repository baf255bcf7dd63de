//! The text-to-video pipeline: prompt → text states → flow-matching loop over the transformer with
//! classifier-free guidance → VAE decode → frames. The only place that knows the order of the stages.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use candle_core::{DType, Device, Tensor};
use kinetoscope_models::lora::{Adapter, ScaledAdapter};
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};
use kinetoscope_models::wan::vae::{self, AutoencoderKLWan};

use crate::adapters::AppliedLora;
use crate::conditioning::Conditioning;
use crate::denoise::{Denoiser, Expert, LoadNetwork};
use crate::error::{Error, Result, StageContext};
use crate::image_encoder::ImageEncoder;
use crate::memory::{MemoryBudget, WorkingMemory};
use crate::model_dir::{ModelDir, ModelIdentity, ModelIndex};
use crate::noise;
use crate::request::{ExpertPlacement, GenerateRequest, LoadOptions, Progress, Timings, VaeTiling, Video};
use crate::scheduler::{Renoise, SchedulerConfig, SchedulerKind};
use crate::text::{TextEncoder, TextEncoderPlacement};
use crate::weights::{ComponentWeights, TransformerSource};

pub struct Pipeline {
    identity: ModelIdentity,
    device: Device,
    dtype: DType,
    text_encoder: TextEncoder,
    denoiser: Denoiser,
    /// Wan 2.1 I2V/FLF2V's CLIP image encoder.
    image_encoder: Option<ImageEncoder>,
    vae: AutoencoderKLWan,
    pub(crate) vae_config: vae::Config,
    scheduler_config: SchedulerConfig,
    memory: MemoryBudget,
    shape: ModelShape,
    loras: Vec<AppliedLora>,
    /// Each transformer's weights as loaded, for the sidecar.
    /// Their single files are hashed the first time [`Self::weights`] is asked for: a server, which writes no
    /// sidecar, never reads a 15 GB file through just to hash it.
    weights: Mutex<Vec<ComponentWeights>>,
    /// The folder, and where each transformer's weights come from: what run-time adapters are read against.
    dir: ModelDir,
    sources: Vec<TransformerSource>,
    lora_allow_unmatched: bool,
    /// Run-time adapters read so far, by file (path, size, modification time) and transformer.
    request_loras: Mutex<ReadAdapters>,
}

type AdapterKey = (PathBuf, &'static str, (u64, SystemTime));

/// How many run-time adapters stay read (and prepared on the device) between requests: a server switching among
/// more reads the least recently used again when it comes back.
const MAX_READ_ADAPTERS: usize = 16;

/// Run-time adapters read so far, each with when it was last used.
#[derive(Default)]
struct ReadAdapters {
    entries: HashMap<AdapterKey, (Arc<Adapter>, u64)>,
    clock: u64,
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
    /// Whether the model can start from an image: Wan 2.2 TI2V (one timestep per token, `expand_timesteps`,
    /// holds it as the first frame), and the image-to-video models (Wan 2.1 I2V/FLF2V, Wan 2.2 I2V-A14B).
    pub takes_image: bool,
    /// Whether the model generates only from an image (its transformer reads the image's latents as input
    /// channels): text-to-video is refused.
    pub needs_image: bool,
    /// Whether the model can end on a given last frame too (diffusers' `last_image`): an image-to-video model
    /// without an image encoder (Wan 2.2 I2V-A14B), or one whose image embedder has the two images' position
    /// embedding (Wan 2.1 FLF2V).
    pub takes_last_image: bool,
    /// Wan 2.2 A14B: a high-noise and a low-noise expert, each with its guidance scale.
    pub two_experts: bool,
    /// Wan VACE: the transformer has a control branch, which every generation feeds (with a video, a mask,
    /// reference images, or none of them).
    pub vace: bool,
}

impl ModelShape {
    /// Reads the configs of `dir` (no weights).
    pub fn read(dir: &ModelDir) -> Result<Self> {
        let transformer_config: transformer::Config = dir.config("transformer", "config.json")?;
        let vae_config: vae::Config = dir.config("vae", "config.json")?;
        let scheduler_config: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
        Ok(Self::of(&transformer_config, &vae_config, &scheduler_config, &dir.model_index()?))
    }

    fn of(
        transformer_config: &transformer::Config,
        vae_config: &vae::Config,
        scheduler_config: &SchedulerConfig,
        index: &ModelIndex,
    ) -> Self {
        let channels = transformer_config.in_channels != transformer_config.out_channels();
        let image_embedder = transformer_config.image_dim.is_some();
        ModelShape {
            size_multiple: vae_config.spatial_compression()
                * transformer_config.patch_size[1].max(transformer_config.patch_size[2]),
            frame_multiple: 1 << vae_config.temperal_downsample.iter().filter(|d| **d).count(),
            max_steps: scheduler_config.num_train_timesteps,
            takes_image: index.expand_timesteps || channels,
            needs_image: channels,
            takes_last_image: channels && (!image_embedder || transformer_config.pos_embed_seq_len.is_some()),
            two_experts: index.has_component("transformer_2"),
            vace: transformer_config.vace_layers.is_some(),
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
        if let Some(scale) = request.guidance_scale_2 {
            if !self.two_experts {
                return invalid(
                    "guidance_scale_2",
                    "the model has one transformer; a second guidance scale is for the low-noise expert of a \
                     two-expert model (Wan 2.2 A14B)"
                        .into(),
                );
            }
            if !scale.is_finite() || scale < 0.0 {
                return invalid("guidance_scale_2", format!("{scale} must be a finite number ≥ 0"));
            }
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

        let text_file = options.text_encoder_weights.as_deref();
        let text_encoder = TextEncoder::load_from(dir, text_file, dtype, &device, options.text_encoder)?;

        // The VAE runs in f32 whatever `dtype` is: its output is the video itself (half-precision decodes
        // are where black and NaN frames come from), and it runs once per video, not once per step. With
        // half-precision networks on a GPU its products use TF32, as diffusers' do under PyTorch (`with_tf32`).
        let vae_config: vae::Config = dir.config("vae", "config.json")?;
        let vae = match &options.vae {
            None => AutoencoderKLWan::new(&vae_config, dir.var_builder("vae", DType::F32, &device)?)
                .map_err(|e| Error::Weights { component: "vae", path: dir.component("vae"), reason: e.to_string() })?,
            Some(file) => vae::single_file::load_vae(file, &vae_config, DType::F32, &device)
                .map_err(|e| Error::Weights { component: "vae", path: file.clone(), reason: e.to_string() })?,
        };

        let names: &[&'static str] =
            if index.has_component("transformer_2") { &["transformer", "transformer_2"] } else { &["transformer"] };
        if options.transformer_2.is_some() && names.len() == 1 {
            return Err(Error::InvalidRequest {
                field: "transformer_2",
                reason: "the model has one transformer; a low-noise expert's file needs a two-expert model".into(),
            });
        }
        let sources: Vec<TransformerSource> = names
            .iter()
            .zip([&options.transformer, &options.transformer_2])
            .map(|(&component, file)| TransformerSource { component, file: file.clone() })
            .collect();
        let configs = sources
            .iter()
            .map(|source| {
                let config = source.config(dir)?;
                crate::registry::check_configs_agree(dir, source.component, &config, text_encoder.dim(), &vae_config)?;
                Ok(config)
            })
            .collect::<Result<Vec<_>>>()?;
        let image_encoder = match index.has_component("image_encoder") {
            true => Some(ImageEncoder::load(dir, dtype, &device)?),
            false => None,
        };
        crate::registry::check_image_conditioning(dir, &configs[0], image_encoder.as_ref().map(ImageEncoder::width))?;
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
            &configs.iter().collect::<Vec<_>>(),
            &vae_config,
            options.vae_tiling,
            text_weight_bytes,
        );
        let shape = ModelShape::of(&configs[0], &vae_config, &scheduler_config, &index);
        let boundary = index.boundary_ratio.map(|ratio| ratio * scheduler_config.num_train_timesteps as f64);
        let mut weights =
            sources.iter().map(|source| ComponentWeights::of(source, options.quantize)).collect::<Result<Vec<_>>>()?;
        if let Some(file) = text_file {
            weights.push(ComponentWeights::file("text_encoder", file)?);
        }
        if let Some(file) = &options.vae {
            weights.push(ComponentWeights::file("vae", file)?);
        }
        let (experts, loras) = load_experts(dir, &sources, configs, options)?;
        let denoiser = Denoiser::new(experts, boundary, dtype, device.clone());
        Ok(Pipeline {
            identity,
            device,
            dtype,
            text_encoder,
            denoiser,
            image_encoder,
            vae,
            vae_config,
            scheduler_config,
            memory,
            shape,
            loras,
            weights: Mutex::new(weights),
            dir: dir.clone(),
            sources,
            lora_allow_unmatched: options.lora_allow_unmatched,
            request_loras: Mutex::new(ReadAdapters::default()),
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

    /// Where a two-expert model's experts live (`Resident` or `Swap`, as `ExpertPlacement::Auto` resolved);
    /// `None` for a model with one network.
    pub fn expert_placement(&self) -> Option<ExpertPlacement> {
        match self.denoiser.experts() {
            [_, second] if second.is_swapped() => Some(ExpertPlacement::Swap),
            [_, _] => Some(ExpertPlacement::Resident),
            _ => None,
        }
    }

    /// Where each transformer's weights (and a text encoder or VAE file's) came from and how they are held
    /// ([`LoadOptions::transformer`], [`LoadOptions::quantize`]), each file with its sha256 (read through once, the
    /// first time this is asked for).
    pub fn weights(&self) -> Result<Vec<ComponentWeights>> {
        let mut weights = self.weights.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for record in weights.iter_mut().filter(|w| w.sha256.is_none()) {
            if let Some(file) = &record.file {
                record.sha256 = Some(crate::model_dir::sha256_of(file)?);
            }
        }
        Ok(weights.clone())
    }

    /// The distill recipe `request` runs under, if the model is a distilled one (by its repository id) or carries a
    /// distill LoRA, merged at load or given with the request (by the file's name; `models/distilled.json`).
    pub fn distillation(&self, request: &GenerateRequest) -> Option<&'static crate::registry::DistillRecipe> {
        let repo_id = self.identity.repo_id.as_deref();
        let loras: Vec<&Path> =
            self.loras.iter().map(|l| l.path.as_path()).chain(request.loras.iter().map(|l| l.path.as_path())).collect();
        crate::registry::distill_recipes().iter().find(|recipe| {
            repo_id.is_some_and(|id| recipe.repo_ids.iter().any(|r| r == id))
                || loras.iter().any(|path| recipe.matches_lora(path))
        })
    }

    /// `request` as it runs: a turbo request (`distilled`) still on the preset's default schedule takes the recipe of
    /// the distilled weights it runs with where that differs (FastWan's DMD steps); anything else as it is.
    pub fn distilled_request(&self, request: &GenerateRequest) -> GenerateRequest {
        let default = &crate::registry::distill_recipes()[0];
        let mut resolved = request.clone();
        if let Some(recipe) = self.distillation(request) {
            if request.distilled && request.schedule.as_ref() == Some(&default.schedule) {
                recipe.apply(&mut resolved);
            }
        }
        resolved
    }

    /// The LoRA adapters merged into the transformers' weights ([`LoadOptions::loras`]).
    pub fn loras(&self) -> &[AppliedLora] {
        &self.loras
    }

    /// `request`'s run-time adapters ([`GenerateRequest::loras`]), each read once per file and component and then
    /// kept (keyed by path, size and modification time, so a replaced file is read again), with their scales.
    /// How many run-time adapters are kept read between requests (at most 16, the most recently used).
    pub fn read_adapters(&self) -> usize {
        self.request_loras.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).entries.len()
    }

    fn request_adapters(&self, request: &GenerateRequest) -> Result<Vec<(&'static str, ScaledAdapter)>> {
        let mut read = self.request_loras.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut adapters = Vec::with_capacity(request.loras.len());
        for spec in &request.loras {
            let Some(source) = self.sources.iter().find(|source| source.component == spec.component) else {
                return Err(Error::InvalidRequest {
                    field: "loras",
                    reason: format!(
                        "{} is for {}, which the model doesn't have (a low-noise adapter needs a two-expert model)",
                        spec.path.display(),
                        spec.component
                    ),
                });
            };
            let stamp = std::fs::metadata(&spec.path).and_then(|m| Ok((m.len(), m.modified()?)));
            let stamp = stamp.map_err(|source| Error::Io { path: spec.path.clone(), source })?;
            let key = (spec.path.clone(), spec.component, stamp);
            read.clock += 1;
            let now = read.clock;
            let adapter = match read.entries.get_mut(&key) {
                Some((adapter, used)) => {
                    *used = now;
                    adapter.clone()
                }
                None => {
                    let targets = source.targets(&self.dir)?;
                    let adapter = Arc::new(crate::adapters::read_one(&spec.path, &targets, self.lora_allow_unmatched)?);
                    // A file replaced since it was read is never asked for under its old stamp again.
                    read.entries.retain(|(path, component, _), _| (path, *component) != (&spec.path, spec.component));
                    read.entries.insert(key, (adapter.clone(), now));
                    if read.entries.len() > MAX_READ_ADAPTERS {
                        let oldest = read.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
                        read.entries.remove(&oldest.expect("more than the bound"));
                    }
                    adapter
                }
            };
            adapters.push((spec.component, ScaledAdapter { adapter, scale: spec.scale }));
        }
        Ok(adapters)
    }

    pub(crate) fn image_encoder(&self) -> Option<&ImageEncoder> {
        self.image_encoder.as_ref()
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
        if request.distilled && self.distillation(request).is_none() {
            return invalid(
                "preset",
                "turbo needs step-distilled weights: a distilled model or a distill LoRA (lightx2v's \
                 StepDistill-CfgDistill, Wan 2.2 Lightning; see models/distilled.json), and this model has neither \
                 (with other weights, give the schedule itself: --sigmas 1,0.75,0.5,0.25 --shift 5 --guidance 1)"
                    .into(),
            );
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
        if let Some(schedule) = &request.schedule {
            schedule.validate(self.scheduler_config.num_train_timesteps)?;
            if schedule.len() != request.steps {
                return invalid(
                    "steps",
                    format!("{} differs from the explicit schedule's {} values", request.steps, schedule.len()),
                );
            }
            if request.scheduler == Some(SchedulerKind::Unipc) {
                return invalid("scheduler", "an explicit schedule runs with flow-match Euler, not unipc".into());
            }
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

    /// Runs the request's schedule from step `first_step` (0-based) on `latents`, already at that step's noise
    /// level, and decodes the result: text-to-video from 0, video-to-video from later; `condition` says what
    /// else holds latents fixed (a clip's frames, an image).
    pub(crate) fn generate_from(
        &self,
        latents: Tensor,
        first_step: usize,
        request: &GenerateRequest,
        condition: Conditioning,
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
        condition: Conditioning,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Tensor, Timings)> {
        if self.shape.needs_image && !matches!(condition, Conditioning::Channels(_)) {
            return Err(Error::InvalidRequest {
                field: "image",
                reason: format!(
                    "the model {} generates from an image (image-to-video): give one (Pipeline::image_to_video, \
                     --image)",
                    self.identity.path.display()
                ),
            });
        }
        if self.shape.vace && !matches!(condition, Conditioning::Control(_)) {
            return Err(Error::InvalidRequest {
                field: "model",
                reason: format!(
                    "{} is a Wan VACE model: it edits a masked region (--mask, --region), follows a control video \
                     (--control-video) or reference images (--reference-image), or generates from the prompt; \
                     other edits need a Wan text-to-video model",
                    self.identity.path.display()
                ),
            });
        }
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
        let two_experts = self.shape.two_experts;
        let latents = self.denoise_held(latents, &text, request, first_step, condition, &mut |progress| {
            timings.cached_steps += usize::from(progress.cached);
            if two_experts {
                timings.experts.push(progress.expert);
            }
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
        self.denoise_held(latents, text, request, first_step, Conditioning::Text, on_step)
    }

    /// [`Pipeline::denoise_from`] under `condition`, on the request's schedule.
    fn denoise_held(
        &self,
        latents: Tensor,
        text: &Tensor,
        request: &GenerateRequest,
        first_step: usize,
        condition: Conditioning,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let request = &self.distilled_request(request);
        // A DMD schedule's noise between steps: a reference run's, given beside the latents, else from the seed.
        let renoise = match request.latents.as_deref().map(noise::read_renoise).transpose()?.flatten() {
            Some(noise) => Renoise::Given(noise),
            None => Renoise::Seeded(request.seed),
        };
        let schedule = request.schedule.as_ref();
        let mut scheduler =
            self.scheduler_config.build(request.scheduler, request.steps, request.shift, schedule, renoise);
        let adapters = self.request_adapters(request)?;
        self.denoiser.run(latents, text, scheduler.as_mut(), first_step, request, condition, &adapters, on_step)
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

/// The model's networks on the device, with their LoRA adapters merged in: one, or a two-expert model's two, both
/// resident or swapped as [`ExpertPlacement`] says. The first is loaded now either way, so that bad weights fail
/// the load; a swapped second expert has its tensors checked against its files' headers without reading them.
/// Adapters are read (and checked against the tensors) once, here.
fn load_experts(
    dir: &ModelDir,
    sources: &[TransformerSource],
    configs: Vec<transformer::Config>,
    options: &LoadOptions,
) -> Result<(Vec<Expert>, Vec<AppliedLora>)> {
    if let Some(spec) = options.loras.iter().find(|spec| sources.iter().all(|s| s.component != spec.component)) {
        return Err(Error::Adapter {
            path: spec.path.clone(),
            reason: format!(
                "meant for {}, which the model doesn't have (a low-noise adapter needs a two-expert model, Wan 2.2 \
                 A14B)",
                spec.component
            ),
        });
    }
    let mut applied = Vec::new();
    let mut loader = |source: &TransformerSource, config: &transformer::Config| -> Result<LoadNetwork> {
        let (adapters, read) = crate::adapters::read(dir, source, &options.loras, options.lora_allow_unmatched)?;
        applied.extend(read);
        let (dir, source, config) = (dir.clone(), source.clone(), config.clone());
        let (dtype, device, quantize) = (options.dtype, options.device.clone(), options.quantize);
        Ok(Box::new(move || {
            let (vb, compact) = crate::adapters::weights(&dir, &source, dtype, &device, &adapters, quantize)?;
            WanTransformer3DModel::with_compact(&config, vb, &compact).map_err(|e| Error::Weights {
                component: source.component,
                path: source.file.clone().unwrap_or_else(|| dir.component(source.component)),
                reason: e.to_string(),
            })
        }))
    };
    let mut configs = configs.into_iter();
    let first_config = configs.next().expect("a model has a transformer");
    let load_first = loader(&sources[0], &first_config)?;
    let first = load_first()?;
    let name = sources[0].component;
    let Some(second_config) = configs.next() else {
        return Ok((vec![Expert::resident(name, first_config, first)], applied));
    };
    let second = &sources[1];
    let load_second = loader(second, &second_config)?;
    // Resident, the second expert is loaded now (and so checked); otherwise its tensors are checked against the
    // files' headers, which also gives its size.
    let swap = match options.experts {
        ExpertPlacement::Resident => false,
        placement => {
            // A single file's tensors were checked against its config when the config was read.
            if second.file.is_none() {
                crate::registry::check_transformer_weights(dir, second.component, &second_config)?;
            }
            let weight_bytes = second.weight_bytes(dir, options.dtype, options.quantize)?;
            placement == ExpertPlacement::Swap
                || !crate::memory::second_expert_fits(weight_bytes, options.memory_limit, &options.device)
        }
    };
    let experts = if swap {
        vec![
            Expert::swapped(name, first_config, load_first, sources[0].files(dir)?, Some(first)),
            Expert::swapped(second.component, second_config, load_second, second.files(dir)?, None),
        ]
    } else {
        let network = load_second()?;
        vec![Expert::resident(name, first_config, first), Expert::resident(second.component, second_config, network)]
    };
    Ok((experts, applied))
}

fn ensure_finite(t: &Tensor, stage: &'static str) -> Result<()> {
    let sum = t.to_dtype(DType::F32).and_then(|t| t.sum_all()).and_then(|s| s.to_scalar::<f32>()).stage(stage)?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite { stage })
    }
}
