//! Text-to-video, the plain recipe: the request's noise denoised from the first step with nothing held, on any model
//! that generates from a prompt alone (a Wan VACE model through its control branch, with nothing to follow).

use std::ops::ControlFlow;

use crate::conditioning::Conditioning;
use crate::error::Result;
use crate::pipeline::Pipeline;
use crate::request::{GenerateRequest, Progress, Video};
use crate::vace::VaceRequest;

impl Pipeline {
    pub fn generate(&self, request: &GenerateRequest) -> Result<Video> {
        self.generate_with_progress(request, &mut |_| ControlFlow::Continue(()))
    }

    pub fn generate_with_progress(
        &self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> Result<Video> {
        if self.shape().vace {
            // VACE generates from the prompt alone with a grey video to follow and every pixel to generate.
            let vace = VaceRequest {
                base: request.clone(),
                video: None,
                mask: None,
                reference_images: &[],
                conditioning_scale: 1.0,
            };
            return self.vace_with_progress(&vace, on_step);
        }
        self.validate(request)?;
        let latents = self.initial_latents(request)?;
        self.generate_from(latents, 0, request, Conditioning::Text, on_step)
    }
}
