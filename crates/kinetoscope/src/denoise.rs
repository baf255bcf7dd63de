//! The flow-matching loop, written once for every recipe: the network's prediction at each of the
//! scheduler's steps, classifier-free guidance, the step cache, and the conditioning applied at fixed points of
//! each step. A recipe (text-to-video, an edit, image-to-video) chooses the starting latents, the first step and
//! the [`Conditioning`]; it never writes a loop of its own.

use std::ops::ControlFlow;

use candle_core::{DType, Device, IndexOp, Tensor};
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};

use crate::conditioning::{with_first_frame, Conditioning};
use crate::error::{Error, Result, StageContext};
use crate::request::{GenerateRequest, Progress};
use crate::scheduler::Scheduler;

/// The network that predicts the flow velocity, in the precision it runs in.
pub(crate) struct Denoiser {
    transformer: WanTransformer3DModel,
    /// The transformer's patch `[t, h, w]`: per-token timesteps are laid out on its grid.
    patch_size: [usize; 3],
    dtype: DType,
    device: Device,
}

impl Denoiser {
    pub(crate) fn new(
        transformer: WanTransformer3DModel,
        config: &transformer::Config,
        dtype: DType,
        device: Device,
    ) -> Self {
        Denoiser { transformer, patch_size: config.patch_size, dtype, device }
    }

    /// Runs `scheduler`'s steps from `first_step` (0-based) on `latents`, already at that step's noise level,
    /// with no history: `text` holds the prompt's states, and below them the negative prompt's when guidance is
    /// on, both branches run as one batch of two, and the step cache (when `request` asks for it) decides for
    /// the batch as a whole. `condition` is applied at fixed points of every step: held frames are put back
    /// after it at the noise level it reached; an image's first latent frame before every prediction, at
    /// timestep 0. Progress counts the steps run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        mut latents: Tensor,
        text: &Tensor,
        scheduler: &mut dyn Scheduler,
        first_step: usize,
        request: &GenerateRequest,
        condition: Conditioning,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        const STAGE: &str = "denoising";
        scheduler.set_begin_index(first_step);
        let text = self.transformer.embed_text(text).stage(STAGE)?;
        let batch = text.dim(0).stage(STAGE)?;
        let guidance = batch == 2;
        let timesteps = scheduler.timesteps()[first_step.min(request.steps)..].to_vec();
        let sigmas = scheduler.sigmas()[first_step.min(request.steps)..].to_vec();
        let mut cache = request.step_cache.map(StepCache::new);
        for (i, &t) in timesteps.iter().enumerate() {
            if let Conditioning::FirstFrame(image) = condition {
                latents = with_first_frame(&latents, image).stage(STAGE)?;
            }
            let input = latents.to_dtype(self.dtype).stage(STAGE)?;
            let input = if guidance { Tensor::cat(&[&input, &input], 0).stage(STAGE)? } else { input };
            let timestep = match condition {
                Conditioning::FirstFrame(_) => self.first_frame_timesteps(&latents, t, batch).stage(STAGE)?,
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
            if let Conditioning::Hold(hold) = condition {
                latents = hold.apply(&latents, sigmas[i + 1]).stage(STAGE)?;
            }
            if on_step(Progress { step: i + 1, steps: timesteps.len(), cached }).is_break() {
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
    fn first_frame_timesteps(&self, latents: &Tensor, t: f32, batch: usize) -> candle_core::Result<Tensor> {
        let (_, _, frames, h, w) = latents.dims5()?;
        let [_, ph, pw] = self.patch_size;
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
