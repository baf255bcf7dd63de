//! What a generation is conditioned on besides its prompt, as data the loop reads: latent frames held to a
//! clip's (with a mask over latent time), an image's latents held as the first frame, or latents and a mask
//! concatenated to the model's input channels with an image encoder's tokens, or a VACE model's control latents. The loop (in
//! `denoise.rs`) applies them at fixed points of every step; the recipes (text-to-video, edits, image-to-video)
//! only build them.

use candle_core::Tensor;

/// What holds latents fixed during the loop, besides the prompt.
#[derive(Clone, Copy)]
pub(crate) enum Conditioning<'a> {
    /// Nothing: text-to-video, video-to-video.
    Text,
    /// Latent frames held to a clip's after every step (a time-range redo, an extension).
    Hold(&'a Hold),
    /// Wan 2.2 TI2V: the first latent frame is an image's normalized encoding `[1, C, 1, h, w]`, put back before
    /// every prediction and at the end, with its tokens at timestep 0. diffusers mixes it into the model's input
    /// only and lets the scheduler carry its own first frame, which no other element depends on (every
    /// scheduler update is elementwise): putting it into the latents gives the same video.
    FirstFrame(&'a Tensor),
    /// Wan 2.1 I2V/FLF2V and Wan 2.2 I2V-A14B: latents concatenated to the noise's channels before every
    /// prediction, and (Wan 2.1) an image encoder's tokens beside the prompt's in cross-attention.
    Channels(&'a Channels),
    /// Wan VACE: control latents every step's transformer reads beside the noise, through its VACE blocks.
    Control(&'a Control),
}

/// What a VACE model (diffusers' `WanVACEPipeline`) reads besides the noise: see `vace.rs`.
pub(crate) struct Control {
    /// `[1, 96, R + T, h, w]`: per latent frame (the reference images' first, then the video's), the normalized
    /// latents of what is kept and of what is regenerated or followed (16 + 16), and the mask as 8 × 8 sub-pixel
    /// channels (64).
    pub(crate) latents: Tensor,
    /// Every VACE block's conditioning scale.
    pub(crate) scale: f64,
}

/// What an image-conditioned model of diffusers' `WanImageToVideoPipeline` (without `expand_timesteps`) reads
/// besides the noise.
pub(crate) struct Channels {
    /// `[1, 4 + z_dim, T, h, w]`: which pixel frames are given (the mask, four frames per latent frame), then
    /// the normalized latents of the given frames with gray between them.
    pub(crate) latents: Tensor,
    /// The image encoder's penultimate hidden states `[images, tokens, width]` (CLIP), for a transformer with an
    /// image embedder; `None` for one without (Wan 2.2 I2V-A14B).
    pub(crate) image_states: Option<Tensor>,
}

/// `latents` `[B, C, T, h, w]` with latent frame 0 replaced by `first` `[B, C, 1, h, w]`.
pub(crate) fn with_first_frame(latents: &Tensor, first: &Tensor) -> candle_core::Result<Tensor> {
    let frames = latents.dim(2)?;
    Tensor::cat(&[first, &latents.narrow(2, 1, frames - 1)?], 2)
}

/// Latent frames held to a clip's after every step.
pub(crate) struct Hold {
    /// The clip's normalized latents.
    clean: Tensor,
    pub(crate) noise: Tensor,
    /// Per latent frame, `[1, 1, T, 1, 1]`, or per latent cell, `[1, 1, T, h, w]`: 1 generated anew, 0 held,
    /// between them blended.
    mask: Tensor,
}

impl Hold {
    /// Held by `mask` over the latent grid, `[T, h, w]` (`[T, 1, 1]` holds whole latent frames).
    pub(crate) fn new(
        clean: Tensor,
        noise: Tensor,
        mask: Vec<f32>,
        [t, h, w]: [usize; 3],
    ) -> candle_core::Result<Self> {
        let mask = Tensor::from_vec(mask, (1, 1, t, h, w), clean.device())?;
        Ok(Hold { clean, noise, mask })
    }

    /// `latents` at noise level `sigma` with the held frames put back: `m·x + (1 − m)·held`.
    pub(crate) fn apply(&self, latents: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let held = noised(&self.clean, &self.noise, sigma)?;
        held.broadcast_add(&(latents - &held)?.broadcast_mul(&self.mask)?)
    }
}

/// `(1 − σ)·clean + σ·noise`, with 1 − σ in f32 as diffusers computes it, for the same rounding.
pub(crate) fn noised(clean: &Tensor, noise: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    (clean * f64::from(1.0 - sigma))? + (noise * f64::from(sigma))?
}
