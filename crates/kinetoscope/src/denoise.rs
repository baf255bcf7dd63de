//! The flow-matching loop, written once for every recipe: the network's prediction at each of the
//! scheduler's steps, classifier-free guidance, the step cache, and the conditioning applied at fixed points of
//! each step. A recipe (text-to-video, an edit, image-to-video) chooses the starting latents, the first step and
//! the [`Conditioning`]; it never writes a loop of its own.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use kinetoscope_models::lora::ScaledAdapter;
use kinetoscope_models::wan::transformer::{self, Context, WanTransformer3DModel};

use crate::conditioning::{with_first_frame, Conditioning};
use crate::error::{Error, Result, StageContext};
use crate::request::{GenerateRequest, Progress};
use crate::scheduler::Scheduler;

/// Builds an expert's network on the device from its memory-mapped weights.
pub(crate) type LoadNetwork = Box<dyn Fn() -> Result<WanTransformer3DModel> + Send + Sync>;

/// One network that predicts the flow velocity: the only one, or one of a two-expert model's.
pub(crate) struct Expert {
    /// Its folder in the model: `transformer`, or `transformer_2` (a two-expert model's low-noise network).
    name: &'static str,
    config: transformer::Config,
    weights: Weights,
}

enum Weights {
    /// On the device for the pipeline's life.
    Resident(Arc<WanTransformer3DModel>),
    /// On the device only while its steps run: `load` builds it again from the memory-mapped `files`.
    Swapped { load: LoadNetwork, files: Vec<PathBuf>, loaded: Mutex<Option<Arc<WanTransformer3DModel>>> },
}

impl Expert {
    pub(crate) fn resident(name: &'static str, config: transformer::Config, network: WanTransformer3DModel) -> Self {
        Expert { name, config, weights: Weights::Resident(Arc::new(network)) }
    }

    /// An expert loaded (from its weight `files`) when its first step comes and released when another expert's
    /// does; `loaded` is the network if it is on the device already.
    pub(crate) fn swapped(
        name: &'static str,
        config: transformer::Config,
        load: LoadNetwork,
        files: Vec<PathBuf>,
        loaded: Option<WanTransformer3DModel>,
    ) -> Self {
        let loaded = Mutex::new(loaded.map(Arc::new));
        Expert { name, config, weights: Weights::Swapped { load, files, loaded } }
    }

    /// Reads a swapped-out expert's weight files into the operating system's page cache on another thread,
    /// while the other expert's last steps run, so that loading it at the boundary reads memory, not the disk.
    /// The pages stay the kernel's to reclaim: nothing is held on the device or in the process.
    fn prefetch(&self) {
        let Weights::Swapped { files, loaded, .. } = &self.weights else { return };
        if loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_some() {
            return;
        }
        let (files, name) = (files.clone(), self.name);
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 8 << 20];
            for path in files {
                let Ok(mut file) = std::fs::File::open(&path) else { continue };
                while matches!(std::io::Read::read(&mut file, &mut buffer), Ok(n) if n > 0) {}
            }
            tracing::debug!(expert = name, "expert's weights prefetched into the page cache");
        });
    }

    pub(crate) fn is_swapped(&self) -> bool {
        matches!(self.weights, Weights::Swapped { .. })
    }

    /// The network on the device, loading it if it is swapped out; whether it had to be loaded.
    fn acquire(&self) -> Result<(Arc<WanTransformer3DModel>, bool)> {
        match &self.weights {
            Weights::Resident(network) => Ok((network.clone(), false)),
            Weights::Swapped { load, loaded, .. } => {
                let mut loaded = loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some(network) = loaded.as_ref() {
                    return Ok((network.clone(), false));
                }
                let network = Arc::new(load()?);
                *loaded = Some(network.clone());
                Ok((network, true))
            }
        }
    }

    /// Lets a swapped expert's device memory go once no running step holds it.
    fn release(&self) {
        if let Weights::Swapped { loaded, .. } = &self.weights {
            *loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        }
    }
}

/// The network that predicts the flow velocity, in the precision it runs in: one transformer, or Wan 2.2
/// A14B's two experts, the first for the high-noise steps and the second for the rest.
pub(crate) struct Denoiser {
    experts: Vec<Expert>,
    /// Two experts: the timestep from which down the second one runs, `boundary_ratio × num_train_timesteps`.
    boundary: Option<f64>,
    dtype: DType,
    device: Device,
}

impl Denoiser {
    /// `experts` holds one network, or two with `boundary` set.
    pub(crate) fn new(experts: Vec<Expert>, boundary: Option<f64>, dtype: DType, device: Device) -> Self {
        debug_assert_eq!(experts.len(), if boundary.is_some() { 2 } else { 1 });
        Denoiser { experts, boundary, dtype, device }
    }

    pub(crate) fn experts(&self) -> &[Expert] {
        &self.experts
    }

    /// The expert of timestep `t`, as diffusers chooses it: the first while `t ≥ boundary`.
    fn expert_at(&self, t: f32) -> usize {
        match self.boundary {
            Some(boundary) if f64::from(t) < boundary => 1,
            _ => 0,
        }
    }

    /// Runs `scheduler`'s steps from `first_step` (0-based) on `latents`, already at that step's noise level,
    /// with no history: `text` holds the prompt's states, and below them the negative prompt's when guidance is
    /// on, both branches run as one batch of two, and the step cache (when `request` asks for it) decides for
    /// the batch as a whole. `condition` is applied at fixed points of every step: held frames are put back
    /// after it at the noise level it reached; an image's first latent frame before every prediction, at
    /// timestep 0; channel-concatenated latents to every prediction's input; a VACE model's control latents to its
    /// context. Each step runs the expert of its timestep, with that expert's guidance scale; a swapped expert is
    /// loaded when its first step comes, after the other is released. Progress counts the steps run and names their expert.
    /// `adapters` are the request's run-time LoRA adapters, each for the expert it names.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        mut latents: Tensor,
        text: &Tensor,
        scheduler: &mut dyn Scheduler,
        first_step: usize,
        request: &GenerateRequest,
        condition: Conditioning,
        adapters: &[(&'static str, ScaledAdapter)],
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        const STAGE: &str = "denoising";
        scheduler.set_begin_index(first_step);
        let batch = text.dim(0).stage(STAGE)?;
        let guidance = batch == 2;
        let timesteps = scheduler.timesteps()[first_step.min(request.steps)..].to_vec();
        let sigmas = scheduler.sigmas()[first_step.min(request.steps)..].to_vec();
        let image_states = match condition {
            Conditioning::Channels(channels) => channels.image_states.as_ref(),
            _ => None,
        };
        // The expert on the device, its embedded prompt (each expert has its own text projection) and its
        // step cache (residuals of one network say nothing about another's).
        let mut current: Option<(usize, Arc<WanTransformer3DModel>, Context)> = None;
        let mut cache = None;
        let mut prefetched = false;
        for (i, &t) in timesteps.iter().enumerate() {
            let index = self.expert_at(t);
            // The step before the boundary: the next expert's files start coming into memory while it runs.
            if let Some(&next) = timesteps.get(i + 1).filter(|_| !prefetched) {
                if self.expert_at(next) != index {
                    self.experts[self.expert_at(next)].prefetch();
                    prefetched = true;
                }
            }
            let expert = &self.experts[index];
            if current.as_ref().is_none_or(|(running, ..)| *running != index) {
                if let Some((previous, ..)) = current.take() {
                    self.experts[previous].release();
                }
                let start = Instant::now();
                let (network, loaded) = expert.acquire()?;
                if loaded {
                    tracing::info!(expert = expert.name, seconds = start.elapsed().as_secs_f64(), "expert loaded");
                }
                let own: Vec<ScaledAdapter> = adapters
                    .iter()
                    .filter(|(component, _)| *component == expert.name)
                    .map(|(_, a)| a.clone())
                    .collect();
                let prepared = network.prepare_adapters(&own).stage(STAGE)?;
                let context = network.embed_context_with_adapters(text, image_states, &prepared).stage(STAGE)?;
                let context = match condition {
                    Conditioning::Control(control) => {
                        let scales = vec![control.scale; network.vace_blocks()];
                        network.with_control(context, &control.latents, &scales).stage(STAGE)?
                    }
                    _ => context,
                };
                current = Some((index, network, context));
                cache = request.step_cache.map(StepCache::new);
            }
            let Some((_, network, context)) = &current else { unreachable!("an expert was chosen above") };
            if let Conditioning::FirstFrame(image) = condition {
                latents = with_first_frame(&latents, image).stage(STAGE)?;
            }
            let input = match condition {
                Conditioning::Channels(channels) => Tensor::cat(&[&latents, &channels.latents], 1).stage(STAGE)?,
                _ => latents.clone(),
            };
            let input = input.to_dtype(self.dtype).stage(STAGE)?;
            let input = if guidance { Tensor::cat(&[&input, &input], 0).stage(STAGE)? } else { input };
            let timestep = match condition {
                Conditioning::FirstFrame(_) => {
                    self.first_frame_timesteps(&latents, t, batch, expert.config.patch_size).stage(STAGE)?
                }
                _ => Tensor::full(t, batch, &self.device).stage(STAGE)?,
            };
            let (velocity, cached) = match &mut cache {
                Some(cache) => cache.forward(network, &input, &timestep, context, i, timesteps.len()),
                None => network.forward_embedded(&input, &timestep, context).map(|v| (v, false)),
            }
            .stage(STAGE)?;
            let velocity = velocity.to_dtype(DType::F32).stage(STAGE)?;
            let velocity = if guidance {
                let scale = match index {
                    0 => request.guidance_scale,
                    _ => request.guidance_scale_2.unwrap_or(request.guidance_scale),
                };
                let (cond, uncond) = (velocity.i(0..1).stage(STAGE)?, velocity.i(1..2).stage(STAGE)?);
                (&uncond + ((cond - &uncond).stage(STAGE)? * scale).stage(STAGE)?).stage(STAGE)?
            } else {
                velocity
            };
            latents = scheduler.step(&velocity, &latents).stage(STAGE)?;
            if let Conditioning::Hold(hold) = condition {
                latents = hold.apply(&latents, sigmas[i + 1]).stage(STAGE)?;
            }
            let progress = Progress { step: i + 1, steps: timesteps.len(), cached, expert: expert.name };
            if on_step(progress).is_break() {
                return Err(Error::Cancelled { step: i + 1, steps: timesteps.len() });
            }
        }
        match condition {
            Conditioning::FirstFrame(image) => with_first_frame(&latents, image).stage(STAGE),
            _ => Ok(latents),
        }
    }

    /// Wan 2.2 TI2V's per-token timesteps `[batch, L]` for `latents` `[1, C, T, h, w]`: 0 for the tokens of the
    /// first latent frame (the image, already clean), `t` for the others.
    fn first_frame_timesteps(
        &self,
        latents: &Tensor,
        t: f32,
        batch: usize,
        patch_size: [usize; 3],
    ) -> candle_core::Result<Tensor> {
        let (_, _, frames, h, w) = latents.dims5()?;
        let [_, ph, pw] = patch_size;
        let per_frame = (h / ph) * (w / pw);
        let image = Tensor::zeros(per_frame, DType::F32, &self.device)?;
        let rest = Tensor::full(t, (frames - 1) * per_frame, &self.device)?;
        Tensor::cat(&[image, rest], 0)?.unsqueeze(0)?.repeat((batch, 1))
    }
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
        context: &Context,
        step: usize,
        steps: usize,
    ) -> candle_core::Result<(Tensor, bool)> {
        let embedded = transformer.embed(input, timestep, context)?;
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
