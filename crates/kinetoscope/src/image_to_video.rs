//! Image-to-video, as diffusers' `WanImageToVideoPipeline`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/wan/pipeline_wan_i2v.py>),
//! in its two forms:
//!
//! - Wan 2.2 TI2V (`expand_timesteps`): the same network that generates from text alone generates from text and
//!   a first frame. The image is encoded alone (one frame) to the VAE posterior's mode, normalized, and held as
//!   the first latent frame through the whole loop, its tokens at timestep 0 while the others follow the
//!   schedule.
//! - Wan 2.1 I2V/FLF2V and Wan 2.2 I2V-A14B: the transformer reads, beside the noise, a video of the image
//!   followed by gray frames (and ending on the last image, when one is given) encoded to latents, and a mask of
//!   which pixel frames were given; Wan 2.1's also reads the CLIP image encoder's tokens of the image(s) in
//!   cross-attention.

use std::ops::ControlFlow;

use candle_core::Tensor;

use crate::conditioning::{Channels, Conditioning};
use crate::error::{Error, Result, StageContext};
use crate::input_video::InputVideo;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, Progress, Timings, Video};

/// Generate `base` (prompt, size, frames, seed, ...) starting from `image`: the first frame of a clip in
/// [`InputVideo`]'s layout (an image is a clip of one frame; later frames are ignored). The image must already
/// be at `base`'s size: [`InputVideo::fit`] gets it there (center crop to the aspect ratio, then a bilinear
/// resize that averages when shrinking). The output's first frame is the image, up to the VAE's round trip;
/// with `last_image` (a model whose [`crate::ModelShape::takes_last_image`]), its last frame is that image.
#[derive(Debug, Clone)]
pub struct ImageRequest<'a> {
    pub base: GenerateRequest,
    pub image: &'a InputVideo,
    pub last_image: Option<&'a InputVideo>,
}

impl Pipeline {
    pub fn image_to_video(&self, request: &ImageRequest) -> Result<Video> {
        self.image_to_video_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    pub fn image_to_video_with_progress(
        &self,
        request: &ImageRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        let (latents, timings) = self.image_denoised(request, on_step)?;
        self.decode_video(&latents, timings, request.base.fps)
    }

    /// The denoised latents of an image-to-video generation, before decoding (diffusers'
    /// `output_type="latent"`): the first latent frame is the image's.
    pub fn image_to_video_latents(
        &self,
        request: &ImageRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        Ok(self.image_denoised(request, on_step)?.0)
    }

    fn image_denoised(
        &self,
        request: &ImageRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<(Tensor, Timings)> {
        let base = &request.base;
        self.validate(base)?;
        if !self.shape().needs_image {
            if request.last_image.is_some() {
                return Err(self.no_last_image());
            }
            let image = self.image_latents(request.image, base)?;
            let latents = self.initial_latents(base)?;
            return self.denoise_request(latents, 0, base, Conditioning::FirstFrame(&image), on_step);
        }
        let channels = self.image_channels(request)?;
        let latents = self.initial_latents(base)?;
        self.denoise_request(latents, 0, base, Conditioning::Channels(&channels), on_step)
    }

    fn no_last_image(&self) -> Error {
        Error::InvalidRequest {
            field: "last_image",
            reason: format!(
                "the model {} can't end on a given frame; first-and-last-frame generation needs Wan 2.1 FLF2V or \
                 Wan 2.2 I2V-A14B",
                self.identity().path.display()
            ),
        }
    }

    /// What an image-to-video model reads besides the noise (diffusers' `prepare_latents` and `encode_image`):
    /// the mask of given pixel frames and the latents of the image followed by gray frames (ending on the last
    /// image, when given), `[1, 4 + z_dim, T, h, w]`, and the image encoder's states of the image(s).
    pub fn image_condition(&self, request: &ImageRequest) -> Result<(Tensor, Option<Tensor>)> {
        let channels = self.image_channels(request)?;
        Ok((channels.latents, channels.image_states))
    }

    fn image_channels(&self, request: &ImageRequest) -> Result<Channels> {
        const STAGE: &str = "VAE encoding";
        let base = &request.base;
        let last = match request.last_image {
            Some(_) if !self.shape().takes_last_image => return Err(self.no_last_image()),
            Some(_) if base.num_frames < 2 => {
                return Err(Error::InvalidRequest {
                    field: "num_frames",
                    reason: "a first and a last image need at least two frames".into(),
                })
            }
            last => last,
        };
        self.check_image("image", request.image, base)?;
        if let Some(last) = last {
            self.check_image("last_image", last, base)?;
        }
        // The video diffusers encodes: the image, gray (0 in [-1, 1]) frames, and the last image.
        let (frames, pixels) = (base.num_frames, base.height * base.width * 3);
        let mut video = vec![0.5f32; frames * pixels];
        video[..pixels].copy_from_slice(&request.image.frames[..pixels]);
        if let Some(last) = last {
            video[(frames - 1) * pixels..].copy_from_slice(&last.frames[..pixels]);
        }
        let video = Tensor::from_vec(video, (frames, base.height, base.width, 3), self.device()).stage(STAGE)?;
        let latents = self.encode(&video)?;
        let (_, _, latent_frames, h, w) = latents.dims5().stage(STAGE)?;
        let mask = given_frames_mask(frames, last.is_some(), self.frame_multiple(), latent_frames);
        let mask = Tensor::from_vec(mask, (1, self.frame_multiple(), latent_frames, 1, 1), self.device())
            .and_then(|m| m.broadcast_as((1, self.frame_multiple(), latent_frames, h, w))?.contiguous())
            .stage(STAGE)?;
        let latents = Tensor::cat(&[&mask, &latents], 1).stage(STAGE)?;
        let image_states = match self.image_encoder() {
            Some(encoder) => {
                Some(encoder.encode(&[Some(request.image), last].into_iter().flatten().collect::<Vec<_>>())?)
            }
            None => None,
        };
        Ok(Channels { latents, image_states })
    }

    /// Refuses an image at another size than the video's, or without a frame.
    fn check_image(&self, field: &'static str, image: &InputVideo, request: &GenerateRequest) -> Result<()> {
        if (image.height, image.width) != (request.height, request.width) || image.num_frames == 0 {
            return Err(Error::InvalidRequest {
                field,
                reason: format!(
                    "the image is {}x{}, the video {}x{}: fit it first (InputVideo::fit)",
                    image.width, image.height, request.width, request.height
                ),
            });
        }
        Ok(())
    }

    /// The first latent frame an image-to-video generation holds: `image`'s first frame encoded alone, the
    /// posterior's mode, normalized, `[1, z_dim, 1, height/s, width/s]`. Checks that the model takes an image
    /// and that the image is at `request`'s size.
    pub fn image_latents(&self, image: &InputVideo, request: &GenerateRequest) -> Result<Tensor> {
        if !self.takes_image() {
            return Err(Error::InvalidRequest {
                field: "image",
                reason: format!(
                    "the model {} generates from text only; image-to-video needs a model that takes an image: Wan \
                     2.2 TI2V-5B, Wan 2.1 I2V/FLF2V-14B or Wan 2.2 I2V-A14B",
                    self.identity().path.display()
                ),
            });
        }
        self.check_image("image", image, request)?;
        let pixels = image.height * image.width * 3;
        let frame = Tensor::from_slice(&image.frames[..pixels], (1, image.height, image.width, 3), self.device())
            .stage("VAE encoding")?;
        self.encode(&frame)
    }
}

/// Which pixel frames of `frames` are given (the first; the last too with `last`), laid out as diffusers' mask
/// `[per_latent, latent_frames]` flattened: the first frame stands for the whole first latent frame (repeated
/// `per_latent` times), and each later latent frame has one channel per pixel frame it covers.
fn given_frames_mask(frames: usize, last: bool, per_latent: usize, latent_frames: usize) -> Vec<f32> {
    let given = |frame: usize| frame == 0 || (last && frame == frames - 1);
    let mut mask = vec![0f32; per_latent * latent_frames];
    for channel in 0..per_latent {
        for t in 0..latent_frames {
            // Pixel frames prefixed with `per_latent - 1` more copies of the first, then cut `per_latent` a
            // latent frame.
            let frame = (t * per_latent + channel).saturating_sub(per_latent - 1);
            mask[channel * latent_frames + t] = f32::from(u8::from(given(frame)));
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::given_frames_mask;

    /// 9 frames, 4 a latent frame: latent frame 0 is the image; frames 1–4 and 5–8 the others.
    #[test]
    fn the_mask_marks_the_given_frames_per_latent_channel() {
        let first = given_frames_mask(9, false, 4, 3);
        assert_eq!(first, [1., 0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 0.]);
        let both = given_frames_mask(9, true, 4, 3);
        // Channel 3 of latent frame 2 is pixel frame 8, the last.
        assert_eq!(both, [1., 0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 1.]);
    }
}
