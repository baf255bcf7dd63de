//! Regenerating a region of a clip: inside a mask (a shape over some frames) the model generates anew with the new
//! prompt; outside it every pixel stays the clip's.
//!
//! The recipe, on any Wan model (`models/tiny/make_region_fixtures.py` runs the same with diffusers' components):
//! 1. The mask is taken down to the latent grid: a latent cell (one latent frame, `s × s` pixels) is regenerated
//!    when any pixel of its frames and square is in the mask, and blended half and half when it only touches such a
//!    cell (in time or space), which softens the seam as the time-range redo's half frames do.
//! 2. The whole schedule runs, and after every step the cells outside are put back to the clip's latents noised to
//!    that step's level (the time-range redo's hold, with a mask over space too). At the last step they are exactly
//!    the clip's latents.
//! 3. After decoding, the clip's pixels are composited back outside the mask at full resolution, with a soft edge
//!    inside it: `alpha = min(mask, box blur of the mask)`, so every pixel outside the mask is the clip's exactly and
//!    the generated region fades in over a few pixels.
//!
//! On a Wan VACE model, steps 1 and 2 are VACE's own recipe instead (`vace.rs`): the model was trained to regenerate
//! a masked region of a clip it is given, and nothing is held. Step 3 is the same.

use std::ops::ControlFlow;

use candle_core::Tensor;
use serde::Serialize;

use crate::conditioning::{Conditioning, Hold};
use crate::error::{Error, Result, StageContext};
use crate::input_video::InputVideo;
use crate::mask::RegionMask;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, Progress, Timings, Video};

/// Regenerate the pixels of `input` inside `mask` with `base`'s prompt and settings; every other pixel stays the
/// input's exactly. The mask is the input's size and length ([`RegionMask::from_picture`] fits one); size and frame
/// count as for [`crate::EditRequest`].
#[derive(Debug, Clone)]
pub struct RegionRequest<'a> {
    pub base: GenerateRequest,
    pub input: &'a InputVideo,
    pub mask: &'a RegionMask,
    /// On a Wan VACE model, images of a subject or a style for the region to show (see [`crate::VaceRequest`]);
    /// refused on other models.
    pub reference_images: &'a [InputVideo],
    /// On a Wan VACE model, how strongly the clip and the references steer (1 by default); refused otherwise.
    pub conditioning_scale: f64,
}

/// How a region edit went, for the sidecar and the API: what a client checks without looking at the video.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RegionReport {
    /// Pixels inside the mask.
    pub masked_pixels: usize,
    /// Latent cells regenerated, and blended half and half around them.
    pub latent_cells: [usize; 2],
    /// The most any pixel outside the mask moved from the input (0 after compositing).
    pub unmasked_max_abs: f32,
    /// The mean absolute difference between neighbouring pixels across the mask's edge (one inside, one outside),
    /// over every frame: a seam shows as a higher value than the clip's own texture.
    pub seam_gradient: f32,
}

impl Pipeline {
    /// Regenerates a region of a clip (see [`RegionRequest`]).
    pub fn redo_region(&self, request: &RegionRequest) -> Result<(Video, RegionReport)> {
        self.redo_region_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    /// [`Self::redo_region`] with a progress callback.
    pub fn redo_region_with_progress(
        &self,
        request: &RegionRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Video, RegionReport)> {
        let (latents, timings, latent_cells) = self.region_latents(request, on_step)?;
        let (input, mask) = (request.input, request.mask);
        let mut video = self.decode_video(&latents, timings, request.base.fps)?;
        let alpha = mask.alpha();
        for ((out, source), a) in video.frames.chunks_exact_mut(3).zip(input.frames.chunks_exact(3)).zip(&alpha) {
            for (o, s) in out.iter_mut().zip(source) {
                *o = s + a * (*o - s);
            }
        }
        let report = RegionReport {
            masked_pixels: mask.area(),
            latent_cells,
            unmasked_max_abs: unmasked_max_abs(&video, input, mask),
            seam_gradient: seam_gradient(&video, mask),
        };
        Ok((video, report))
    }

    /// The first half of [`Self::redo_region`]: the denoised latents, not yet decoded nor composited; and the latent
    /// cells regenerated and blended.
    pub fn region_latents(
        &self,
        request: &RegionRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Tensor, Timings, [usize; 2])> {
        const STAGE: &str = "region redo";
        let (input, mask) = (request.input, request.mask);
        if (mask.num_frames, mask.height, mask.width) != (input.num_frames, input.height, input.width) {
            return Err(Error::InvalidRequest {
                field: "mask",
                reason: format!(
                    "the mask is {} frames of {}x{} and the clip {} of {}x{}: fit it first (RegionMask::from_picture)",
                    mask.num_frames, mask.width, mask.height, input.num_frames, input.width, input.height
                ),
            });
        }
        let generate = GenerateRequest {
            num_frames: input.num_frames,
            height: input.height,
            width: input.width,
            ..request.base.clone()
        };
        self.validate_input(&generate)?;
        let scale = self.vae_config.spatial_compression();
        let (latent_mask, dims) = mask.latent(self.frame_multiple(), scale);
        let latent_cells =
            [latent_mask.iter().filter(|v| **v == 1.0).count(), latent_mask.iter().filter(|v| **v == 0.5).count()];
        if self.shape().vace {
            // A VACE model was trained for this: the clip outside the mask is its control, nothing is held.
            let vace = crate::vace::VaceRequest {
                base: request.base.clone(),
                video: Some(input),
                mask: Some(mask),
                reference_images: request.reference_images,
                conditioning_scale: request.conditioning_scale,
            };
            let (latents, timings) = self.vace_latents(&vace, on_step)?;
            return Ok((latents, timings, latent_cells));
        }
        if !request.reference_images.is_empty() || request.conditioning_scale != 1.0 {
            let field = if request.reference_images.is_empty() { "conditioning_scale" } else { "reference_images" };
            let reason = "reference images and a conditioning scale need a Wan VACE model; this model holds the clip \
                          outside the mask instead"
                .to_string();
            return Err(Error::InvalidRequest { field, reason });
        }
        let (clean, noise) = self.encode_input(input, &generate)?;
        let hold = Hold::new(clean, noise, latent_mask, dims).stage(STAGE)?;
        let latents = hold.apply(&hold.noise, self.sigma(&generate, 0)).stage(STAGE)?;
        let (latents, timings) = self.denoise_request(latents, 0, &generate, Conditioning::Hold(&hold), on_step)?;
        Ok((latents, timings, latent_cells))
    }
}

fn unmasked_max_abs(video: &Video, input: &InputVideo, mask: &RegionMask) -> f32 {
    let pixels = video.frames.chunks_exact(3).zip(input.frames.chunks_exact(3)).zip(&mask.values);
    pixels
        .filter(|(_, m)| **m == 0.0)
        .flat_map(|((o, s), _)| o.iter().zip(s).map(|(o, s)| (o - s).abs()))
        .fold(0.0, f32::max)
}

/// Per frame, the mean absolute difference (over the channels) of the neighbouring pixel pairs, side by side or one
/// above the other, of which one is inside the mask and one outside; averaged over the frames that have such pairs.
fn seam_gradient(video: &Video, mask: &RegionMask) -> f32 {
    let (h, w) = (mask.height, mask.width);
    let pixel = |f: usize, y: usize, x: usize| &video.frames[((f * h + y) * w + x) * 3..][..3];
    let mut frames = Vec::new();
    for f in 0..mask.num_frames {
        let (mut sum, mut pairs) = (0f64, 0usize);
        for y in 0..h {
            for x in 0..w {
                for (yy, xx) in [(y, x + 1), (y + 1, x)] {
                    if yy < h && xx < w && mask.at(f, y, x) != mask.at(f, yy, xx) {
                        let d = pixel(f, y, x).iter().zip(pixel(f, yy, xx)).map(|(a, b)| f64::from((a - b).abs()));
                        sum += d.sum::<f64>();
                        pairs += 3;
                    }
                }
            }
        }
        if pairs > 0 {
            frames.push(sum / pairs as f64);
        }
    }
    if frames.is_empty() {
        0.0
    } else {
        (frames.iter().sum::<f64>() / frames.len() as f64) as f32
    }
}
