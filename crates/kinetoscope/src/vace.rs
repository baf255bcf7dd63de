//! Wan VACE (diffusers' `WanVACEPipeline`): one model for masked video edits, reference-image-to-video and
//! control-video conditioning. Its transformer reads, beside the noise, control latents made from a video, a mask
//! over it (1 where to generate) and reference images (`models/tiny/FIXTURES.md`, "VACE", states the recipe and
//! `make_vace_fixtures.py` checks it against diffusers):
//! 1. The video's pixels outside the mask ("inactive") and inside it ("reactive"), each with the other part grey,
//!    are encoded by the VAE and normalized: 16 + 16 channels per latent frame. No video is a grey one, no mask
//!    all ones: a control video (depth, pose) is followed everywhere.
//! 2. The mask, one value per pixel, is cut into its 8 × 8 sub-pixel positions (64 channels on the latent grid) and
//!    taken to the latent frame rate by nearest-exact resampling.
//! 3. Each reference image, letterboxed on white to the video's size, is encoded alone and put before the video's
//!    latent frames with a zero reactive half and a zero mask; the noise has those frames too, and they are dropped
//!    before decoding.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use crate::conditioning::{Conditioning, Control};
use crate::error::{Error, Result, StageContext};
use crate::input_video::InputVideo;
use crate::mask::RegionMask;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, Progress, Timings, Video};

const STAGE: &str = "VACE conditioning";

/// A generation on a VACE model, conditioned on any of a video, a mask over it and reference images.
#[derive(Debug, Clone)]
pub struct VaceRequest<'a> {
    /// Prompt and settings; with a video, its size and frame count are the video's.
    pub base: GenerateRequest,
    /// The clip to keep outside `mask` (a masked edit), or to follow everywhere (a control video: depth, pose,
    /// edges), fitted to the model's sizes; `None` generates from the prompt and references alone.
    pub video: Option<&'a InputVideo>,
    /// Which of the video's pixels to generate (1) and which to keep (0); `None` is every pixel.
    pub mask: Option<&'a RegionMask>,
    /// Images of a subject or a style, one frame each, of any size (letterboxed on white to the video's).
    pub reference_images: &'a [InputVideo],
    /// How strongly the control branch steers (diffusers' `conditioning_scale`, 1 by default).
    pub conditioning_scale: f64,
}

impl Pipeline {
    /// Generates with a VACE model's control branch (see [`VaceRequest`]): the decoded video, of the request's
    /// (or the video's) frames, without the reference images' frames.
    pub fn vace(&self, request: &VaceRequest) -> Result<Video> {
        self.vace_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    /// [`Self::vace`] with a progress callback.
    pub fn vace_with_progress(
        &self,
        request: &VaceRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let (latents, timings) = self.vace_latents(request, on_step)?;
        self.decode_video(&latents, timings, request.base.fps)
    }

    /// The first half of [`Self::vace`]: the denoised latents of the video's frames (the references' dropped).
    pub fn vace_latents(
        &self,
        request: &VaceRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Tensor, Timings)> {
        if !self.shape().vace {
            return Err(Error::InvalidRequest {
                field: "model",
                reason: format!(
                    "{} has no VACE blocks: control videos and reference images need a Wan VACE model \
                     (Wan-AI/Wan2.1-VACE-1.3B-diffusers or -14B-diffusers)",
                    self.identity().path.display()
                ),
            });
        }
        let (generate, control) = self.vace_control(request)?;
        let references = request.reference_images.len();
        // The noise covers the references' latent frames too: 4 pixel frames each, as diffusers asks for them.
        let noise_request = GenerateRequest {
            num_frames: generate.num_frames + references * self.frame_multiple(),
            ..generate.clone()
        };
        let noise = self.initial_latents(&noise_request)?;
        let condition = Conditioning::Control(&control);
        let (latents, timings) = self.denoise_request(noise, 0, &generate, condition, on_step)?;
        let frames = latents.dim(2).stage(STAGE)?;
        Ok((latents.narrow(2, references, frames - references).stage(STAGE)?, timings))
    }

    /// The control latents `request` makes, `[1, 96, R + T, h, w]` f32: what every step's VACE blocks read.
    pub fn vace_control_latents(&self, request: &VaceRequest) -> Result<Tensor> {
        Ok(self.vace_control(request)?.1.latents)
    }

    /// The request the loop runs (the video's size and frames) and the control latents.
    fn vace_control(&self, request: &VaceRequest) -> Result<(GenerateRequest, Control)> {
        let invalid = |field, reason: String| Err(Error::InvalidRequest { field, reason });
        let generate = match request.video {
            Some(video) => {
                let generate = GenerateRequest {
                    num_frames: video.num_frames,
                    height: video.height,
                    width: video.width,
                    ..request.base.clone()
                };
                self.validate_input(&generate)?;
                generate
            }
            None => {
                self.validate(&request.base)?;
                request.base.clone()
            }
        };
        if !request.conditioning_scale.is_finite() {
            return invalid("conditioning_scale", format!("{} must be a finite number", request.conditioning_scale));
        }
        if request.mask.is_some() && request.video.is_none() {
            return invalid("mask", "a mask needs the video it applies to".into());
        }
        let (frames, height, width) = (generate.num_frames, generate.height, generate.width);
        let plane = height * width;
        let mask = match request.mask {
            Some(mask) if (mask.num_frames, mask.height, mask.width) != (frames, height, width) => {
                return invalid(
                    "mask",
                    format!(
                        "the mask is {} frames of {}x{} and the video {frames} of {width}x{height}: fit it first \
                         (RegionMask::from_picture)",
                        mask.num_frames, mask.width, mask.height
                    ),
                )
            }
            Some(mask) => mask.values.clone(),
            None => vec![1.0; frames * plane],
        };
        for (i, image) in request.reference_images.iter().enumerate() {
            if image.num_frames != 1 || image.height == 0 || image.width == 0 {
                return invalid(
                    "reference_images",
                    format!(
                        "reference image {i} is {} frames of {}x{}: give one image",
                        image.num_frames, image.width, image.height
                    ),
                );
            }
        }

        // Inactive: the video where the mask is 0, grey (0 in [-1, 1]) where it is 1; reactive: the other way.
        // diffusers thresholds the mask at ½ for these, and not for the mask channels.
        let grey = vec![0.5f32; frames * plane * 3];
        let video = request.video.map_or(&grey, |v| &v.frames);
        let mut inactive = Vec::with_capacity(video.len());
        let mut reactive = Vec::with_capacity(video.len());
        for (pixel, m) in video.chunks_exact(3).zip(&mask) {
            let generate = *m > 0.5;
            for &v in pixel {
                inactive.push(if generate { 0.5 } else { v });
                reactive.push(if generate { v } else { 0.5 });
            }
        }
        let encode = |frames_values: Vec<f32>, n: usize| -> Result<Tensor> {
            let frames = Tensor::from_vec(frames_values, (n, height, width, 3), self.device()).stage(STAGE)?;
            self.encode(&frames)
        };
        let mut video_latents = Tensor::cat(&[encode(inactive, frames)?, encode(reactive, frames)?], 1).stage(STAGE)?;
        // Each reference goes before what is there already, as diffusers prepends them one by one: the last
        // reference image ends up first.
        for image in request.reference_images {
            let canvas = letterbox(image, height, width);
            let latents = encode(canvas.frames, 1)?;
            let reference = Tensor::cat(&[&latents, &latents.zeros_like().stage(STAGE)?], 1).stage(STAGE)?;
            video_latents = Tensor::cat(&[&reference, &video_latents], 2).stage(STAGE)?;
        }
        let scale = self.vae_config.spatial_compression();
        let latent_frames = video_latents.dim(2).stage(STAGE)? - request.reference_images.len();
        let mask_channels = mask_channels(&mask, [frames, height, width], scale, latent_frames);
        let (h, w) = (height / scale, width / scale);
        let mask =
            Tensor::from_vec(mask_channels, (1, scale * scale, latent_frames, h, w), self.device()).stage(STAGE)?;
        let mask = match request.reference_images.len() {
            0 => mask,
            n => {
                let zeros = Tensor::zeros((1, scale * scale, n, h, w), DType::F32, self.device()).stage(STAGE)?;
                Tensor::cat(&[&zeros, &mask], 2).stage(STAGE)?
            }
        };
        let latents = Tensor::cat(&[&video_latents.to_dtype(DType::F32).stage(STAGE)?, &mask], 1).stage(STAGE)?;
        Ok((generate, Control { latents, scale: request.conditioning_scale }))
    }
}

/// The pixel mask `[F, H, W]` as `s × s` sub-pixel channels on the latent grid, `[s², T, H/s, W/s]` flattened:
/// channel `s·dy + dx` holds the mask's pixel `(s·i + dy, s·j + dx)` of cell `(i, j)`, and latent frame `t` takes
/// pixel frame `⌊(t + ½)·F/T⌋` (PyTorch's `nearest-exact`, its scale `F/T` in f32).
fn mask_channels(mask: &[f32], [frames, height, width]: [usize; 3], s: usize, latent_frames: usize) -> Vec<f32> {
    let (h, w) = (height / s, width / s);
    let ratio = frames as f32 / latent_frames as f32;
    let source = |t: usize| (((t as f32 + 0.5) * ratio).floor() as usize).min(frames - 1);
    let mut out = Vec::with_capacity(s * s * latent_frames * h * w);
    for dy in 0..s {
        for dx in 0..s {
            for t in 0..latent_frames {
                let f = source(t);
                for i in 0..h {
                    for j in 0..w {
                        out.push(mask[(f * height + s * i + dy) * width + s * j + dx]);
                    }
                }
            }
        }
    }
    out
}

/// `image` scaled to fit `height × width` (aspect kept, sizes rounded down) with PyTorch's bilinear resampling
/// (`align_corners=False`, no antialiasing), centred on a white canvas, as diffusers prepares reference images.
/// diffusers first rounds an image's sides down to multiples of 8 with PIL's Lanczos; this skips that step, which
/// changes nothing for sides that are multiples of 8.
fn letterbox(image: &InputVideo, height: usize, width: usize) -> InputVideo {
    if (image.height, image.width) == (height, width) {
        return image.clone();
    }
    let scale = (height as f64 / image.height as f64).min(width as f64 / image.width as f64);
    let (new_h, new_w) = ((image.height as f64 * scale) as usize, (image.width as f64 * scale) as usize);
    let (top, left) = ((height - new_h) / 2, (width - new_w) / 2);
    let mut frames = vec![1.0f32; height * width * 3];
    // Source coordinate of an output pixel's centre, clamped at 0 as PyTorch does, and its two neighbours.
    let taps = |out: usize, len_in: usize, len_out: usize| {
        let ratio = len_in as f32 / len_out as f32;
        let x = ((out as f32 + 0.5) * ratio - 0.5).max(0.0);
        let x0 = (x.floor() as usize).min(len_in - 1);
        let x1 = (x0 + 1).min(len_in - 1);
        (x0, x1, x - x0 as f32)
    };
    for y in 0..new_h {
        let (y0, y1, fy) = taps(y, image.height, new_h);
        for x in 0..new_w {
            let (x0, x1, fx) = taps(x, image.width, new_w);
            for c in 0..3 {
                let at = |yy: usize, xx: usize| image.frames[(yy * image.width + xx) * 3 + c];
                let top_row = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom_row = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                frames[((top + y) * width + left + x) * 3 + c] = top_row * (1.0 - fy) + bottom_row * fy;
            }
        }
    }
    InputVideo { frames, num_frames: 1, height, width }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Channel `8·dy + dx` of cell (i, j) is pixel (8i + dy, 8j + dx); 9 frames to 3 latent frames take pixel frames
    /// 1, 4 and 7.
    #[test]
    fn the_mask_is_cut_into_sub_pixel_channels_and_resampled_in_time() {
        let (frames, height, width) = (9, 16, 8);
        let mask: Vec<f32> = (0..frames * height * width).map(|i| i as f32).collect();
        let out = mask_channels(&mask, [frames, height, width], 8, 3);
        let (h, w) = (2, 1);
        let at = |channel: usize, t: usize, i: usize, j: usize| out[((channel * 3 + t) * h + i) * w + j];
        let pixel = |f: usize, y: usize, x: usize| mask[(f * height + y) * width + x];
        assert_eq!(at(0, 0, 0, 0), pixel(1, 0, 0));
        assert_eq!(at(8 * 3 + 5, 1, 1, 0), pixel(4, 8 + 3, 5));
        assert_eq!(at(63, 2, 1, 0), pixel(7, 15, 7));
        assert_eq!(out.len(), 64 * 3 * 2);
    }

    /// A square image on a wide canvas: scaled to the canvas's height, centred, white on both sides; an image of the
    /// canvas's size is itself.
    #[test]
    fn reference_images_are_letterboxed_on_white() {
        let image = InputVideo { frames: vec![0.25; 4 * 4 * 3], num_frames: 1, height: 4, width: 4 };
        let out = letterbox(&image, 8, 16);
        let at = |y: usize, x: usize| out.frames[(y * 16 + x) * 3];
        assert_eq!((at(0, 0), at(7, 3), at(0, 12), at(7, 15)), (1.0, 1.0, 1.0, 1.0));
        assert_eq!((at(0, 4), at(7, 11), at(3, 8)), (0.25, 0.25, 0.25));
        assert_eq!(letterbox(&image, 4, 4).frames, image.frames);
    }
}
