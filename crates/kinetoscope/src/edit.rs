//! Edits of a clip with the text-to-video model, both starting from the clip encoded with the VAE (the
//! posterior's mode) and noised to a step's level, `x = (1 − σ)·z + σ·noise`:
//!
//! - Video-to-video, as diffusers' `WanVideoToVideoPipeline`
//!   (<https://github.com/huggingface/diffusers/blob/v0.35.2/src/diffusers/pipelines/wan/pipeline_wan_video2video.py>):
//!   the loop runs from the step `strength` selects with the new prompt. Strength 1 starts from pure noise
//!   (the input is ignored but for its length); lower keeps more of the input.
//! - Regenerating a time range: the whole schedule runs, and after every step the latent frames outside the
//!   range are put back to the clip's, noised to that step's level, blended by a latent-time mask (the
//!   latent frames beside the range half and half, softening the seam). At the last step (σ = 0) the held
//!   frames are exactly the clip's latents.
//! - Extending a clip: a new clip is generated whose first latent frames are held, the same way, to the
//!   latents of the clip's last frames, and the two are joined (see [`ExtendLayout`]).

use std::ops::{ControlFlow, Range};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::conditioning::{noised, Conditioning, Hold};
use crate::error::{Error, Result, StageContext};
use crate::image_to_video::ImageRequest;
use crate::input_video::InputVideo;
use crate::pipeline::{ModelShape, Pipeline};
use crate::request::{GenerateRequest, Progress, Timings, Video};
use crate::scheduler::Renoise;
use crate::vace::VaceRequest;

/// Video-to-video: regenerate `input` with `base`'s prompt and settings, keeping as much of it as
/// `1 − strength` says. The output has the input's frame count and size, which must be ones the model takes
/// (`4k + 1` frames; [`InputVideo::fit`] and [`InputVideo::take_frames`] get them there); `base.num_frames`,
/// `height` and `width` are ignored. The noise comes from `base` (seed or latents file) as in text-to-video.
/// The input is borrowed: a clip is large, and several edits (seeds, strengths) may share it.
#[derive(Debug, Clone)]
pub struct EditRequest<'a> {
    pub base: GenerateRequest,
    pub input: &'a InputVideo,
    /// In (0, 1]: how far down the schedule to start, as a fraction of `base.steps` (diffusers' `strength`).
    pub strength: f64,
}

impl EditRequest<'_> {
    /// The generation request the edit runs: `base` at the input's frame count and size.
    pub fn generate_request(&self) -> GenerateRequest {
        input_request(&self.base, self.input)
    }
}

/// Regenerate a time range of `input`: the pixel frames `frames` (0-based, end excluded) are generated anew
/// with `base`'s prompt and settings over its whole schedule; the others stay the input's, up to the VAE's
/// round trip (and the seam). Size and frame count as for [`EditRequest`].
#[derive(Debug, Clone)]
pub struct RedoRequest<'a> {
    pub base: GenerateRequest,
    pub input: &'a InputVideo,
    pub frames: Range<usize>,
}

impl RedoRequest<'_> {
    /// The generation request the redo runs: `base` at the input's frame count and size.
    pub fn generate_request(&self) -> GenerateRequest {
        input_request(&self.base, self.input)
    }
}

/// Longest extension one request may add, in seconds: twice the 5 s clips Wan 2.1 was trained on. The new
/// part is one generation, whose attention cost grows with the square of its length and whose motion drifts
/// the further it goes past what the model saw in training; extend the result again for more.
pub const MAX_EXTEND_SECONDS: f64 = 10.0;

/// Latent frames of an extension held exactly to the clip's: the causal first one (one pixel frame) and the
/// next (`frame_multiple` pixel frames). One frame alone would carry the clip's last pose but not its motion;
/// five carry its direction and speed. More would spend the new clip's compute on frames the output drops.
/// After them comes the seam, one latent frame held half, as beside a redone range.
const EXTEND_HELD_LATENTS: usize = 2;

/// Extend `input`: generate `frames` more frames with `base`'s prompt and settings, conditioned on the
/// input's last frames, and join them to it (see [`ExtendLayout`]). The new part has the input's size, which
/// must be one the model takes ([`InputVideo::fit`] gets it there); `base.num_frames`, `height` and `width`
/// are ignored. The noise comes from `base` (seed or latents file, at the generated clip's shape).
#[derive(Debug, Clone)]
pub struct ExtendRequest<'a> {
    pub base: GenerateRequest,
    pub input: &'a InputVideo,
    /// Frames to add after the input's last: a positive multiple of [`Pipeline::frame_multiple`] (whole
    /// latent frames), at most [`MAX_EXTEND_SECONDS`] at `base.fps`; [`Pipeline::extension_frames`] gives it
    /// for a duration.
    pub frames: usize,
}

impl ExtendRequest<'_> {
    /// The generation request the new part runs: `base` at the input's size and the generated clip's length.
    pub fn generate_request(&self, layout: &ExtendLayout) -> GenerateRequest {
        GenerateRequest { num_frames: layout.generated, ..input_request(&self.base, self.input) }
    }
}

/// Where an extension's frames come from, with `m` pixel frames per latent frame (4 for Wan 2.1). The new part
/// is generated as a clip of `generated` frames whose first `context` (2m + 1, three latent frames) cover the
/// input's last `context` frames, encoded on their own: the first m + 1 (two latent frames) are held to them
/// exactly, the next m (the seam) half. The output is the input's frames `0..kept` (all but its last m),
/// copied, then the generated clip's frames from `generated_from` (m + 1) on: the m seam frames, which ease
/// from the input into the new content in place of the input's last m, then the new frames. Its length is
/// the input's plus the frames added, `kept + generated − generated_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendLayout {
    /// Frames at the input's end the new part is conditioned on.
    pub context: usize,
    /// Output frames `0..kept` are the input's.
    pub kept: usize,
    /// Frames of the generated clip.
    pub generated: usize,
    /// The first frame of the generated clip the output takes.
    pub generated_from: usize,
}

impl ExtendLayout {
    /// `input`'s frames `0..kept` followed by `generated`'s from `generated_from` on.
    fn join(&self, input: &InputVideo, generated: Video) -> Video {
        let frame_len = input.height * input.width * 3;
        let mut frames = Vec::with_capacity((self.kept + generated.num_frames - self.generated_from) * frame_len);
        frames.extend_from_slice(&input.frames[..self.kept * frame_len]);
        frames.extend_from_slice(&generated.frames[self.generated_from * frame_len..]);
        Video { num_frames: frames.len() / frame_len, frames, ..generated }
    }
}

/// Frames for `seconds` at `fps`, rounded up to whole latent frames of `frame_multiple`.
fn frames_for(seconds: f64, fps: u32, frame_multiple: usize) -> usize {
    // The margin keeps a product like 8.8 × 25 = 220.00000000000003 from rounding up a whole latent frame.
    let latent_frames = (seconds * f64::from(fps) / frame_multiple as f64 - 1e-9).ceil().max(0.0);
    latent_frames as usize * frame_multiple
}

/// The latent-time mask of an extension's generated clip of `latent_frames`: held, then the seam, then new.
fn extend_mask(latent_frames: usize) -> Vec<f32> {
    (0..latent_frames)
        .map(|k| match k.cmp(&EXTEND_HELD_LATENTS) {
            std::cmp::Ordering::Less => 0.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Greater => 1.0,
        })
        .collect()
}

fn input_request(base: &GenerateRequest, input: &InputVideo) -> GenerateRequest {
    GenerateRequest { num_frames: input.num_frames, height: input.height, width: input.width, ..base.clone() }
}

/// The latent-time mask of a redo of pixel frames `frames` in a clip of `num_frames` (`k·frame_multiple + 1`):
/// latent frame 0 holds pixel frame 0 and latent frame k ≥ 1 pixel frames `(k−1)·m + 1 ..= k·m`. A latent
/// frame any of whose pixel frames is in the range is generated anew (1); those right beside get ½.
fn redo_mask(frames: &Range<usize>, num_frames: usize, frame_multiple: usize) -> Result<Vec<f32>> {
    if frames.start >= frames.end || frames.end > num_frames {
        return Err(Error::InvalidRequest {
            field: "redo",
            reason: format!(
                "the range {}..{} (end excluded) is empty or outside the clip's frames 0..{num_frames}",
                frames.start, frames.end
            ),
        });
    }
    let latent_of = |frame: usize| frame.div_ceil(frame_multiple);
    let (first, last) = (latent_of(frames.start), latent_of(frames.end - 1));
    let latent_frames = latent_of(num_frames - 1) + 1;
    Ok((0..latent_frames)
        .map(|k| {
            if (first..=last).contains(&k) {
                1.0
            } else if k + 1 == first || k == last + 1 {
                0.5
            } else {
                0.0
            }
        })
        .collect())
}

/// A time range of a clip as a user writes it: seconds `START s-END s` (e.g. `2.0s-3.5s`, end excluded) or
/// frame indices `FIRST-LAST` (e.g. `32-55`, both included).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TimeRange {
    Seconds(f64, f64),
    Frames(usize, usize),
}

impl TimeRange {
    /// The pixel frames the range covers, end excluded, in a clip at `fps` (used only for seconds): frame `i`
    /// is shown from `i/fps`, so the range holds the frames whose time is in `[start, end)`.
    pub fn frames(&self, fps: f64) -> Range<usize> {
        match *self {
            TimeRange::Seconds(start, end) => {
                let frame_at = |t: f64| (t * fps - 1e-9).ceil().max(0.0) as usize;
                frame_at(start)..frame_at(end)
            }
            TimeRange::Frames(first, last) => first..last + 1,
        }
    }
}

impl std::str::FromStr for TimeRange {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("{s:?} is not a range: expected seconds as START s-END s (e.g. 2.0s-3.5s) or frames as FIRST-LAST (e.g. 32-55)")
        };
        let (start, end) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (start.trim(), end.trim());
        match (start.strip_suffix('s'), end.strip_suffix('s')) {
            (Some(start), Some(end)) => {
                let (start, end) = (start.parse::<f64>().map_err(|_| bad())?, end.parse::<f64>().map_err(|_| bad())?);
                if !(start.is_finite() && end.is_finite() && 0.0 <= start && start < end) {
                    return Err(format!("{s:?}: expected 0 ≤ START < END seconds"));
                }
                Ok(TimeRange::Seconds(start, end))
            }
            (None, None) => {
                let (first, last) =
                    (start.parse::<usize>().map_err(|_| bad())?, end.parse::<usize>().map_err(|_| bad())?);
                if first > last {
                    return Err(format!("{s:?}: the first frame comes after the last"));
                }
                Ok(TimeRange::Frames(first, last))
            }
            _ => Err(bad()),
        }
    }
}

/// What a generation does with a source: edit or extend a clip, or start from an image (a clip of one frame),
/// as a job queue or a sidecar records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EditKind {
    /// See [`EditRequest`].
    VideoToVideo { strength: f64 },
    /// Pixel frames `start..end` (end excluded) regenerated; see [`RedoRequest`].
    Redo { start: usize, end: usize },
    /// `frames` added after the clip; see [`ExtendRequest`].
    Extend { frames: usize },
    /// The pixels inside a mask regenerated, every other pixel kept; see [`crate::RegionRequest`], which runs it
    /// ([`Pipeline::redo_region`]: the mask is not part of this description). The mask is `rectangle` (x, y,
    /// width, height in the source's own pixels) or a picture of it kept with the job, limited to the source's frames
    /// `start..end`.
    Region {
        start: usize,
        end: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rectangle: Option<[usize; 4]>,
    },
    /// The source's first frame held as the video's first frame; see [`ImageRequest`]. With `last_image`,
    /// the source's second frame is the video's last (a model whose `ModelShape::takes_last_image`).
    ImageToVideo {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        last_image: bool,
    },
    /// A Wan VACE model's conditioning; see [`crate::VaceRequest`], which runs it ([`Pipeline::vace`]: the reference
    /// images are not part of this description). With `control`, the source is a control video to follow, fitted
    /// as a video-to-video source is; `references` images of a subject or style are kept with the job.
    Vace { control: bool, references: usize, conditioning_scale: f64 },
}

impl Pipeline {
    /// `input` cut and resized for `edit`. To regenerate (video-to-video, redo): at `request`'s size, center
    /// cropped ([`InputVideo::fit`]), and cut to the most frames of the form `k·m + 1` (m =
    /// [`Pipeline::frame_multiple`]) not above `request.num_frames` nor the clip's own. To extend: at the
    /// clip's own size rounded down to multiples of [`Pipeline::size_multiple`], every frame kept. To start from
    /// an image: its first frame, center cropped and resized to `request`'s size.
    pub fn fit_input(&self, input: InputVideo, edit: &EditKind, request: &GenerateRequest) -> Result<InputVideo> {
        if let EditKind::ImageToVideo { last_image } = *edit {
            return Ok(input.take_frames(1 + usize::from(last_image)).fit(request.height, request.width));
        }
        if let EditKind::Extend { .. } = edit {
            let multiple = self.size_multiple();
            let (height, width) = (input.height / multiple * multiple, input.width / multiple * multiple);
            if height == 0 || width == 0 {
                return Err(Error::InvalidRequest {
                    field: "input",
                    reason: format!(
                        "the input video is {}x{}; extending needs at least {multiple}x{multiple}",
                        input.width, input.height
                    ),
                });
            }
            return Ok(input.fit(height, width));
        }
        let m = self.frame_multiple();
        let limit = input.num_frames.min(request.num_frames.max(1));
        Ok(input.take_frames((limit - 1) / m * m + 1).fit(request.height, request.width))
    }

    /// Runs `edit` of `input` (fitted by [`Pipeline::fit_input`]) with `base`'s prompt and settings.
    pub fn run_edit(
        &self,
        edit: &EditKind,
        base: &GenerateRequest,
        input: &InputVideo,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let base = base.clone();
        match *edit {
            EditKind::VideoToVideo { strength } => {
                self.edit_with_progress(&EditRequest { base, input, strength }, on_step)
            }
            EditKind::Redo { start, end } => {
                self.redo_with_progress(&RedoRequest { base, input, frames: start..end }, on_step)
            }
            EditKind::Extend { frames } => self.extend_with_progress(&ExtendRequest { base, input, frames }, on_step),
            EditKind::Region { .. } => Err(Error::InvalidRequest {
                field: "mask",
                reason: "a region edit needs its mask: run it with Pipeline::redo_region".into(),
            }),
            EditKind::ImageToVideo { last_image: false } => {
                self.image_to_video_with_progress(&ImageRequest { base, image: input, last_image: None }, on_step)
            }
            EditKind::Vace { references: 1.., .. } => Err(Error::InvalidRequest {
                field: "reference_images",
                reason: "a VACE generation with reference images needs them: run it with Pipeline::vace".into(),
            }),
            EditKind::Vace { control, references: 0, conditioning_scale } => {
                let request = VaceRequest {
                    base,
                    video: control.then_some(input),
                    mask: None,
                    reference_images: &[],
                    conditioning_scale,
                };
                self.vace_with_progress(&request, on_step)
            }
            EditKind::ImageToVideo { last_image: true } => {
                if input.num_frames < 2 {
                    return Err(Error::InvalidRequest {
                        field: "last_image",
                        reason: "a first-and-last-frame edit's source holds the two images as its two frames".into(),
                    });
                }
                let (image, last) = (input.take_frame(0), input.take_frame(1));
                self.image_to_video_with_progress(
                    &ImageRequest { base, image: &image, last_image: Some(&last) },
                    on_step,
                )
            }
        }
    }
}

/// Denoising steps `edit` runs of `steps`: video-to-video starts part-way down the schedule.
pub fn edit_steps(edit: &EditKind, steps: usize) -> Result<usize> {
    match *edit {
        EditKind::VideoToVideo { strength } => Ok(steps - first_step(steps, strength)?),
        EditKind::Redo { .. }
        | EditKind::Extend { .. }
        | EditKind::ImageToVideo { .. }
        | EditKind::Region { .. }
        | EditKind::Vace { .. } => Ok(steps),
    }
}

/// The step the loop starts from for `strength` over `steps` steps, as diffusers' `get_timesteps`:
/// `steps − min(⌊steps·strength⌋, steps)`. Errors when the strength is outside (0, 1] or so low that no step runs.
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    let invalid = |reason: String| Err(Error::InvalidRequest { field: "strength", reason });
    if !(strength > 0.0 && strength <= 1.0) {
        return invalid(format!("{strength} is outside (0, 1]"));
    }
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    if run == 0 {
        return invalid(format!(
            "{strength} of {steps} steps runs no step (⌊steps·strength⌋ = 0): raise the strength to at least {} or the steps",
            1.0 / steps as f64
        ));
    }
    Ok(steps - run)
}

impl Pipeline {
    pub fn edit(&self, request: &EditRequest) -> Result<Video> {
        self.edit_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    /// Video-to-video with a progress callback; progress counts the steps that run, not `base.steps`.
    pub fn edit_with_progress(
        &self,
        request: &EditRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let (latents, first_step) = self.edit_start(request)?;
        self.generate_from(latents, first_step, &request.generate_request(), Conditioning::Text, on_step)
    }

    /// Checks the request and gives what the loop starts from: the input encoded and noised to the level of
    /// the step `strength` selects, and that step (0-based in `base.steps`).
    pub fn edit_start(&self, request: &EditRequest) -> Result<(Tensor, usize)> {
        let generate = request.generate_request();
        self.validate_input(&generate)?;
        let first_step = first_step(generate.steps, request.strength)?;
        let (clean, noise) = self.encode_input(request.input, &generate)?;
        let latents = noised(&clean, &noise, self.sigma(&generate, first_step)).stage("video-to-video noising")?;
        Ok((latents, first_step))
    }

    pub fn redo(&self, request: &RedoRequest) -> Result<Video> {
        self.redo_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    /// Regenerates a time range of a clip (see [`RedoRequest`]), with a progress callback.
    pub fn redo_with_progress(
        &self,
        request: &RedoRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        const STAGE: &str = "time-range redo";
        let generate = request.generate_request();
        self.validate_input(&generate)?;
        let mask = redo_mask(&request.frames, generate.num_frames, self.frame_multiple())?;
        let (clean, noise) = self.encode_input(request.input, &generate)?;
        let frames = mask.len();
        let hold = Hold::new(clean, noise, mask, [frames, 1, 1]).stage(STAGE)?;
        let latents = hold.apply(&hold.noise, self.sigma(&generate, 0)).stage(STAGE)?;
        self.generate_from(latents, 0, &generate, Conditioning::Hold(&hold), on_step)
    }

    pub fn extend(&self, request: &ExtendRequest) -> Result<Video> {
        self.extend_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    /// Extends a clip (see [`ExtendRequest`]), with a progress callback: the input's frames joined to the new
    /// ones as [`ModelShape::extend_layout`] says.
    pub fn extend_with_progress(
        &self,
        request: &ExtendRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let layout = self.shape().extend_layout(request)?;
        let (latents, timings) = self.extend_latents(request, on_step)?;
        let generated = self.decode_video(&latents, timings, request.base.fps)?;
        Ok(layout.join(request.input, generated))
    }

    /// The generated clip of an extension, denoised and not yet decoded: its first latent frames are the
    /// latents of the input's last [`ExtendLayout::context`] frames.
    pub fn extend_latents(
        &self,
        request: &ExtendRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Tensor, Timings)> {
        const STAGE: &str = "extension";
        let layout = self.shape().extend_layout(request)?;
        let generate = request.generate_request(&layout);
        self.validate_input(&generate)?;
        let (context, noise) = self.encode_input(&request.input.last_frames(layout.context), &generate)?;
        let latent_frames = self.latent_shape(&generate)[2];
        let context_frames = context.dim(2).stage(STAGE)?;
        let clean = context.pad_with_zeros(2, 0, latent_frames - context_frames).stage(STAGE)?;
        let hold = Hold::new(clean, noise, extend_mask(latent_frames), [latent_frames, 1, 1]).stage(STAGE)?;
        let latents = hold.apply(&hold.noise, self.sigma(&generate, 0)).stage(STAGE)?;
        self.denoise_request(latents, 0, &generate, Conditioning::Hold(&hold), on_step)
    }

    /// Validates the request an edit runs, naming the input video for a size or frame count the model can't take.
    pub(crate) fn validate_input(&self, generate: &GenerateRequest) -> Result<()> {
        self.validate(generate).map_err(|e| match e {
            Error::InvalidRequest { field: field @ ("num_frames" | "height" | "width"), reason } => {
                Error::InvalidRequest { field: "input", reason: format!("the input video's {field}: {reason}") }
            }
            other => other,
        })
    }

    /// The input's normalized latents, and the request's noise of the same shape.
    pub(crate) fn encode_input(&self, input: &InputVideo, generate: &GenerateRequest) -> Result<(Tensor, Tensor)> {
        let frames = Tensor::from_slice(&input.frames, (input.num_frames, input.height, input.width, 3), self.device())
            .stage("VAE encoding")?;
        Ok((self.encode(&frames)?, self.initial_latents(generate)?))
    }

    /// Noise level σ of step `step` of the request's schedule.
    pub(crate) fn sigma(&self, generate: &GenerateRequest, step: usize) -> f32 {
        let schedule = generate.schedule.as_ref();
        let renoise = Renoise::Seeded(generate.seed);
        self.scheduler_config().build(generate.scheduler, generate.steps, generate.shift, schedule, renoise).sigmas()
            [step]
    }
}

/// What an extension takes: the model's frame rule alone, so that an API node checks a request before (or without)
/// loading the weights.
impl ModelShape {
    /// Checks an extension's length and input and says where its frames come from.
    pub fn extend_layout(&self, request: &ExtendRequest) -> Result<ExtendLayout> {
        let m = self.frame_multiple;
        let most = frames_for(MAX_EXTEND_SECONDS, request.base.fps, m);
        if request.frames == 0 || !request.frames.is_multiple_of(m) || request.frames > most {
            return Err(Error::InvalidRequest {
                field: "frames",
                reason: format!(
                    "{} frames to add: expected a positive multiple of {m} (whole latent frames), at most {most} \
                     ({MAX_EXTEND_SECONDS} s at {} fps)",
                    request.frames, request.base.fps
                ),
            });
        }
        let context = EXTEND_HELD_LATENTS * m + 1;
        let available = request.input.num_frames;
        if available < context {
            return Err(Error::InvalidRequest {
                field: "input",
                reason: format!(
                    "the input video has {available} frames; an extension is conditioned on its last {context}, \
                     so it needs at least {context}"
                ),
            });
        }
        let generated_from = (EXTEND_HELD_LATENTS - 1) * m + 1;
        Ok(ExtendLayout {
            context,
            kept: available - (context - generated_from),
            generated: context + request.frames,
            generated_from,
        })
    }

    /// Frames to add for an extension of `seconds` at `fps`: rounded up to whole latent frames, so never
    /// shorter than asked. Errors when `seconds` is outside (0, [`MAX_EXTEND_SECONDS`]].
    pub fn extension_frames(&self, seconds: f64, fps: u32) -> Result<usize> {
        if !(seconds > 0.0 && seconds <= MAX_EXTEND_SECONDS) {
            return Err(Error::InvalidRequest {
                field: "seconds",
                reason: format!("{seconds} is outside (0, {MAX_EXTEND_SECONDS}]: extend again for a longer clip"),
            });
        }
        Ok(frames_for(seconds, fps, self.frame_multiple))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_seconds_or_frames() {
        assert_eq!("2.0s-3.5s".parse(), Ok(TimeRange::Seconds(2.0, 3.5)));
        assert_eq!("0s-1s".parse(), Ok(TimeRange::Seconds(0.0, 1.0)));
        assert_eq!("32-55".parse(), Ok(TimeRange::Frames(32, 55)));
        assert_eq!("7-7".parse(), Ok(TimeRange::Frames(7, 7)));
        for bad in ["2.0s-3", "abc", "5", "-1-3", "1.5-2.5", "3s-2s", "9-4"] {
            let err = bad.parse::<TimeRange>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert_eq!(TimeRange::Seconds(2.0, 3.5).frames(16.0), 32..56);
        assert_eq!(TimeRange::Frames(32, 55).frames(16.0), 32..56);
    }

    #[test]
    fn first_step_follows_diffusers() {
        assert_eq!(first_step(4, 0.75).unwrap(), 1);
        assert_eq!(first_step(3, 0.75).unwrap(), 1);
        assert_eq!(first_step(50, 0.6).unwrap(), 20);
        assert_eq!(first_step(10, 1.0).unwrap(), 0);
        for bad in [0.0, -0.5, 1.01, f64::NAN] {
            let err = first_step(10, bad).unwrap_err().to_string();
            assert!(err.contains("strength") && err.contains("(0, 1]"), "{err}");
        }
        let err = first_step(4, 0.2).unwrap_err().to_string();
        assert!(err.contains("runs no step"), "{err}");
    }

    #[test]
    fn redo_mask_covers_the_range_and_softens_its_edges() {
        // 17 frames, 5 latent frames: 0 | 1-4 | 5-8 | 9-12 | 13-16.
        assert_eq!(redo_mask(&(9..13), 17, 4).unwrap(), [0.0, 0.0, 0.5, 1.0, 0.5]);
        assert_eq!(redo_mask(&(4..6), 17, 4).unwrap(), [0.5, 1.0, 1.0, 0.5, 0.0]);
        assert_eq!(redo_mask(&(0..1), 17, 4).unwrap(), [1.0, 0.5, 0.0, 0.0, 0.0]);
        assert_eq!(redo_mask(&(13..17), 17, 4).unwrap(), [0.0, 0.0, 0.0, 0.5, 1.0]);
        for bad in [5..5, 9..18] {
            let err = redo_mask(&bad, 17, 4).unwrap_err().to_string();
            assert!(err.contains("outside the clip's frames 0..17"), "{err}");
        }
    }

    #[test]
    fn an_extension_holds_two_latent_frames_then_the_seam() {
        assert_eq!(extend_mask(5), [0.0, 0.0, 0.5, 1.0, 1.0]);
        assert_eq!(extend_mask(3), [0.0, 0.0, 0.5]);
    }

    #[test]
    fn seconds_round_up_to_whole_latent_frames() {
        assert_eq!(frames_for(2.0, 16, 4), 32);
        assert_eq!(frames_for(1.1, 16, 4), 20);
        assert_eq!(frames_for(0.3, 10, 4), 4);
        assert_eq!(frames_for(0.01, 16, 4), 4);
        assert_eq!(frames_for(10.0, 24, 4), 240);
        assert_eq!(frames_for(8.8, 25, 4), 220);
    }
}
