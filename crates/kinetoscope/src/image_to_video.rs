//! Image-to-video with Wan 2.2 TI2V: the same network that generates from text alone generates from text and
//! a first frame. As diffusers' `WanImageToVideoPipeline` with `expand_timesteps`
//! (<https://github.com/huggingface/diffusers/blob/v0.35.2/src/diffusers/pipelines/wan/pipeline_wan_i2v.py>):
//! the image is encoded alone (one frame) to the VAE posterior's mode, normalized, and held as the first latent
//! frame through the whole loop, its tokens at timestep 0 while the others follow the schedule.

use std::ops::ControlFlow;

use candle_core::Tensor;

use crate::conditioning::Conditioning;
use crate::error::{Error, Result, StageContext};
use crate::input_video::InputVideo;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, Progress, Timings, Video};

/// Generate `base` (prompt, size, frames, seed, ...) starting from `image`: the first frame of a clip in
/// [`InputVideo`]'s layout (an image is a clip of one frame; later frames are ignored). The image must already
/// be at `base`'s size: [`InputVideo::fit`] gets it there (center crop to the aspect ratio, then a bilinear
/// resize that averages when shrinking). The output's first frame is the image, up to the VAE's round trip.
#[derive(Debug, Clone)]
pub struct ImageRequest<'a> {
    pub base: GenerateRequest,
    pub image: &'a InputVideo,
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
        let image = self.image_latents(request.image, base)?;
        let latents = self.initial_latents(base)?;
        self.denoise_request(latents, 0, base, Conditioning::FirstFrame(&image), on_step)
    }

    /// The first latent frame an image-to-video generation holds: `image`'s first frame encoded alone, the
    /// posterior's mode, normalized, `[1, z_dim, 1, height/s, width/s]`. Checks that the model takes an image
    /// and that the image is at `request`'s size.
    pub fn image_latents(&self, image: &InputVideo, request: &GenerateRequest) -> Result<Tensor> {
        if !self.takes_image() {
            return Err(Error::InvalidRequest {
                field: "image",
                reason: format!(
                    "the model {} generates from text only; image-to-video needs a model that holds an image as its \
                     first frame (Wan 2.2 TI2V-5B, whose model_index.json sets expand_timesteps)",
                    self.identity().path.display()
                ),
            });
        }
        if (image.height, image.width) != (request.height, request.width) || image.num_frames == 0 {
            return Err(Error::InvalidRequest {
                field: "image",
                reason: format!(
                    "the image is {}x{}, the video {}x{}: fit it first (InputVideo::fit)",
                    image.width, image.height, request.width, request.height
                ),
            });
        }
        let pixels = image.height * image.width * 3;
        let frame = Tensor::from_slice(&image.frames[..pixels], (1, image.height, image.width, 3), self.device())
            .stage("VAE encoding")?;
        self.encode(&frame)
    }
}
