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

use std::ops::{ControlFlow, Range};

use candle_core::Tensor;
use serde::Serialize;

use crate::conditioning::{Conditioning, Hold};
use crate::error::{Error, Result, StageContext};
use crate::input_video::InputVideo;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, Progress, Timings, Video};

/// Which pixels of a clip to regenerate: one value per pixel of every frame, `[frames, height, width]`, 1 inside the
/// region and 0 outside.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionMask {
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    pub values: Vec<f32>,
}

/// What was done to a mask to fit the clip, for the sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MaskFit {
    /// It was another size than the clip and was center cropped and resized as the clip was.
    pub resized: bool,
    /// It held values other than black and white, thresholded at half.
    pub thresholded: bool,
    /// One mask image applies to every frame.
    pub single_image: bool,
}

impl RegionMask {
    /// A rectangle of `width × height` pixels at (`x`, `y`) on the frames `frames` (end excluded) of a clip of
    /// `num_frames` frames of `clip_height × clip_width`.
    pub fn rectangle(
        (num_frames, clip_height, clip_width): (usize, usize, usize),
        (x, y, width, height): (usize, usize, usize, usize),
        frames: Range<usize>,
    ) -> Result<Self> {
        let invalid = |reason: String| Err(Error::InvalidRequest { field: "region", reason });
        if width == 0 || height == 0 || x + width > clip_width || y + height > clip_height {
            return invalid(format!(
                "the region {x},{y},{width},{height} (x, y, width, height) is empty or not inside the \
                 {clip_width}x{clip_height} clip"
            ));
        }
        if frames.start >= frames.end || frames.end > num_frames {
            return invalid(format!(
                "the frames {}..{} (end excluded) are empty or outside the clip's 0..{num_frames}",
                frames.start, frames.end
            ));
        }
        let mut values = vec![0f32; num_frames * clip_height * clip_width];
        for f in frames {
            for row in y..y + height {
                let start = (f * clip_height + row) * clip_width + x;
                values[start..start + width].fill(1.0);
            }
        }
        Ok(Self { num_frames, height: clip_height, width: clip_width, values })
    }

    /// A mask from a picture of it, black outside and white inside (an image: one frame for every frame of the
    /// clip; a video: a frame each, at least as many as the clip's): each pixel's channels averaged and
    /// thresholded at half, center cropped and resized as the clip was fitted to `num_frames × height × width`.
    pub fn from_picture(mask: &InputVideo, num_frames: usize, height: usize, width: usize) -> Result<(Self, MaskFit)> {
        let single_image = mask.num_frames == 1;
        if !single_image && mask.num_frames < num_frames {
            return Err(Error::InvalidRequest {
                field: "mask",
                reason: format!(
                    "the mask video has {} frames and the clip {num_frames}: give a frame of the mask for every frame \
                     (or one image for all)",
                    mask.num_frames
                ),
            });
        }
        let resized = (mask.height, mask.width) != (height, width);
        let fitted = if resized { mask.fit(height, width) } else { mask.clone() };
        let plane = height * width;
        let mut thresholded = false;
        let mut values = Vec::with_capacity(num_frames * plane);
        for f in 0..num_frames {
            let frame = if single_image { 0 } else { f };
            for pixel in fitted.frames[frame * plane * 3..(frame + 1) * plane * 3].chunks_exact(3) {
                let mean = (pixel[0] + pixel[1] + pixel[2]) / 3.0;
                // 8-bit black and white, and what resizing left within a step of them, are not "thresholded".
                thresholded |= (0.01..=0.99).contains(&mean) && !resized;
                values.push(if mean >= 0.5 { 1.0 } else { 0.0 });
            }
        }
        Ok((Self { num_frames, height, width, values }, MaskFit { resized, thresholded, single_image }))
    }

    /// A picture of the rectangle `[x, y, width, height]`, white on black, at `height × width`: fitted as a mask file
    /// is ([`Self::for_clip`]), so that a rectangle in the source's own pixels lands where it shows.
    pub fn rectangle_picture(height: usize, width: usize, [x, y, w, h]: [usize; 4]) -> Result<InputVideo> {
        let mask = Self::rectangle((1, height, width), (x, y, w, h), 0..1)?;
        let frames = mask.values.iter().flat_map(|v| [*v; 3]).collect();
        Ok(InputVideo { frames, num_frames: 1, height, width })
    }

    /// `picture` fitted to `input` (a clip already fitted to the model: [`Self::from_picture`]) and limited to its
    /// frames `frames`; refused when it selects no pixel.
    pub fn for_clip(picture: &InputVideo, input: &InputVideo, frames: Range<usize>) -> Result<(Self, MaskFit)> {
        let (mut mask, fit) = Self::from_picture(picture, input.num_frames, input.height, input.width)?;
        let plane = input.height * input.width;
        for (f, frame) in mask.values.chunks_exact_mut(plane).enumerate() {
            if !frames.contains(&f) {
                frame.fill(0.0);
            }
        }
        if mask.area() == 0 {
            return Err(Error::InvalidRequest {
                field: "mask",
                reason: format!(
                    "the mask selects no pixel of the frames regenerated ({}..{} of the clip's {}): nothing to do",
                    frames.start,
                    frames.end.min(input.num_frames),
                    input.num_frames
                ),
            });
        }
        Ok((mask, fit))
    }

    fn at(&self, f: usize, y: usize, x: usize) -> f32 {
        self.values[(f * self.height + y) * self.width + x]
    }

    /// Pixels inside.
    pub fn area(&self) -> usize {
        self.values.iter().filter(|v| **v > 0.0).count()
    }

    /// The mask on the latent grid, `[T, h, w]` for `m` pixel frames per latent frame and `s × s` pixels per
    /// latent cell: 1 for a cell any of whose pixels is inside, ½ for a cell beside one (in time or space), else 0.
    pub fn latent(&self, m: usize, s: usize) -> (Vec<f32>, [usize; 3]) {
        let (t_len, h_len, w_len) = ((self.num_frames - 1) / m + 1, self.height / s, self.width / s);
        let frames = |t: usize| if t == 0 { 0..1 } else { (t - 1) * m + 1..t * m + 1 };
        let mut core = vec![false; t_len * h_len * w_len];
        for t in 0..t_len {
            for i in 0..h_len {
                for j in 0..w_len {
                    core[(t * h_len + i) * w_len + j] = frames(t)
                        .any(|f| (s * i..s * i + s).any(|y| (s * j..s * j + s).any(|x| self.at(f, y, x) > 0.0)));
                }
            }
        }
        let near = |t: usize, i: usize, j: usize| {
            let span = |c: usize, len: usize| c.saturating_sub(1)..(c + 2).min(len);
            span(t, t_len).any(|a| span(i, h_len).any(|b| span(j, w_len).any(|c| core[(a * h_len + b) * w_len + c])))
        };
        let mut latent = Vec::with_capacity(core.len());
        for t in 0..t_len {
            for i in 0..h_len {
                for j in 0..w_len {
                    latent.push(if core[(t * h_len + i) * w_len + j] {
                        1.0
                    } else if near(t, i, j) {
                        0.5
                    } else {
                        0.0
                    });
                }
            }
        }
        (latent, [t_len, h_len, w_len])
    }

    /// The blending weight of the generated pixels, `[frames, height, width]`: `min(mask, box blur of the mask)`
    /// with a window of `2r + 1` pixels, `r = max(1, min(height, width) / 64)` (the mean over the window's pixels
    /// inside the frame): 0 everywhere outside, rising to 1 within `r` pixels of the edge inside.
    pub fn alpha(&self) -> Vec<f32> {
        let (h, w) = (self.height, self.width);
        let r = (h.min(w) / 64).max(1);
        let mut alpha = Vec::with_capacity(self.values.len());
        // Per frame, the sum of the mask above and left of each corner (a summed-area table, in f64: exact for a
        // mask of 0 and 1): each window's sum in four lookups, whatever r (at 480p r is 7, a 15 × 15 window).
        let mut table = vec![0f64; (h + 1) * (w + 1)];
        for f in 0..self.num_frames {
            for y in 0..h {
                let mut row = 0.0;
                for x in 0..w {
                    row += f64::from(self.at(f, y, x));
                    table[(y + 1) * (w + 1) + x + 1] = table[y * (w + 1) + x + 1] + row;
                }
            }
            let at = |y: usize, x: usize| table[y * (w + 1) + x];
            for y in 0..h {
                for x in 0..w {
                    let m = self.at(f, y, x);
                    if m == 0.0 {
                        alpha.push(0.0);
                        continue;
                    }
                    let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
                    let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(w));
                    let sum = at(y1, x1) + at(y0, x0) - at(y0, x1) - at(y1, x0);
                    let count = (y1 - y0) * (x1 - x0);
                    alpha.push(m.min(sum as f32 / count as f32));
                }
            }
        }
        alpha
    }
}

/// Regenerate the pixels of `input` inside `mask` with `base`'s prompt and settings; every other pixel stays the
/// input's exactly. The mask is the input's size and length ([`RegionMask::from_picture`] fits one); size and frame
/// count as for [`crate::EditRequest`].
#[derive(Debug, Clone)]
pub struct RegionRequest<'a> {
    pub base: GenerateRequest,
    pub input: &'a InputVideo,
    pub mask: &'a RegionMask,
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
            let vace = crate::VaceRequest {
                base: request.base.clone(),
                video: Some(input),
                mask: Some(mask),
                reference_images: &[],
                conditioning_scale: 1.0,
            };
            let (latents, timings) = self.vace_latents(&vace, on_step)?;
            return Ok((latents, timings, latent_cells));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One latent frame per 4 pixel frames (after the first), 8 × 8 pixels per cell: the core where the rectangle is,
    /// halves around it, in time and space.
    #[test]
    fn the_latent_mask_covers_the_region_and_softens_its_edges() {
        let mask = RegionMask::rectangle((9, 32, 48), (16, 8, 16, 16), 2..7).unwrap();
        let (latent, dims) = mask.latent(4, 8);
        assert_eq!(dims, [3, 4, 6]);
        let at = |t: usize, i: usize, j: usize| latent[(t * 4 + i) * 6 + j];
        // Frames 2..7 are latent frames 1 (1..=4) and 2 (5..=8); rows 8..24 cells 1, 2; columns 16..32 cells 2, 3.
        for t in 1..3 {
            assert_eq!((at(t, 1, 2), at(t, 2, 3)), (1.0, 1.0));
            assert_eq!((at(t, 0, 1), at(t, 3, 4), at(t, 1, 5)), (0.5, 0.5, 0.0));
        }
        assert_eq!((at(0, 1, 2), at(0, 0, 0)), (0.5, 0.0), "frame 0 borders latent frame 1 in time");
    }

    /// Alpha is 0 outside, 1 deep inside, and in between within r pixels of the edge inside.
    #[test]
    fn alpha_is_zero_outside_and_soft_inside_the_edge() {
        let mask = RegionMask::rectangle((1, 32, 48), (16, 8, 16, 16), 0..1).unwrap();
        let alpha = mask.alpha();
        let at = |y: usize, x: usize| alpha[y * 48 + x];
        assert_eq!((at(0, 0), at(7, 20), at(8, 15)), (0.0, 0.0, 0.0));
        assert_eq!(at(16, 24), 1.0);
        assert!((at(8, 16) - 4.0 / 9.0).abs() < 1e-6, "a corner sees 4 of its 9 window pixels inside");
        assert!((at(12, 16) - 6.0 / 9.0).abs() < 1e-6);
    }

    #[test]
    fn pictures_are_thresholded_fitted_and_checked() {
        let grey = InputVideo { frames: vec![0.6; 16 * 16 * 3], num_frames: 1, height: 16, width: 16 };
        let (mask, fit) = RegionMask::from_picture(&grey, 5, 16, 16).unwrap();
        assert_eq!((mask.area(), fit), (5 * 256, MaskFit { resized: false, thresholded: true, single_image: true }));
        let (_, fit) = RegionMask::from_picture(&grey, 5, 8, 8).unwrap();
        assert!(fit.resized);
        let short = InputVideo { frames: vec![1.0; 2 * 16 * 16 * 3], num_frames: 2, height: 16, width: 16 };
        let err = RegionMask::from_picture(&short, 5, 16, 16).unwrap_err();
        assert!(err.to_string().contains("2 frames and the clip 5"), "{err}");
        let err = RegionMask::rectangle((5, 16, 16), (8, 8, 16, 4), 0..5).unwrap_err();
        assert!(err.to_string().contains("not inside"), "{err}");
    }
}
