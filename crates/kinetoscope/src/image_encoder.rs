//! Wan 2.1 I2V/FLF2V's image encoder: CLIP's preprocessing (`image_processor/preprocessor_config.json`) and
//! vision transformer (`image_encoder/`), whose penultimate hidden states the transformer's image embedder turns
//! into cross-attention tokens, as diffusers' `WanImageToVideoPipeline.encode_image` does.

use candle_core::{DType, Device, Tensor};
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Rgb};
use kinetoscope_models::clip::{self, ClipVisionModel, ProcessorConfig, Resize};

use crate::error::{Error, Result, StageContext};
use crate::input_video::InputVideo;
use crate::model_dir::ModelDir;

const STAGE: &str = "image encoding";

pub(crate) struct ImageEncoder {
    model: ClipVisionModel,
    processor: ProcessorConfig,
    /// The vision transformer's `hidden_size`: the width of the states it gives.
    width: usize,
    image_size: usize,
    dtype: DType,
    device: Device,
}

impl ImageEncoder {
    pub(crate) fn load(dir: &ModelDir, dtype: DType, device: &Device) -> Result<Self> {
        let config: clip::Config = dir.config("image_encoder", "config.json")?;
        let processor: ProcessorConfig = dir.config("image_processor", "preprocessor_config.json")?;
        let crop = processor.crop_size;
        let processor_path = dir.component("image_processor").join("preprocessor_config.json");
        if !processor.do_center_crop || (crop.height, crop.width) != (config.image_size, config.image_size) {
            return Err(Error::Config {
                path: processor_path,
                reason: format!(
                    "the image processor must center-crop to the encoder's {0}×{0} (do_center_crop true, crop_size \
                     {0}); it crops to {1}×{2} with do_center_crop {3}",
                    config.image_size, crop.width, crop.height, processor.do_center_crop
                ),
            });
        }
        if processor.image_mean.len() != 3 || processor.image_std.len() != 3 || processor.image_std.contains(&0.0) {
            return Err(Error::Config {
                path: processor_path,
                reason: "image_mean and image_std must have one value per RGB channel, and no std may be 0".into(),
            });
        }
        let model = ClipVisionModel::new(&config, dir.var_builder("image_encoder", dtype, device)?).map_err(|e| {
            Error::Weights { component: "image_encoder", path: dir.component("image_encoder"), reason: e.to_string() }
        })?;
        Ok(ImageEncoder {
            model,
            processor,
            width: config.hidden_size,
            image_size: config.image_size,
            dtype,
            device: device.clone(),
        })
    }

    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// The penultimate hidden states of each image's first frame, `[images, tokens, width]`.
    pub(crate) fn encode(&self, images: &[&InputVideo]) -> Result<Tensor> {
        let mut pixels = Vec::with_capacity(images.len() * 3 * self.image_size * self.image_size);
        for image in images {
            pixels.extend(self.pixel_values(image));
        }
        let size = self.image_size;
        let pixels = Tensor::from_vec(pixels, (images.len(), 3, size, size), &self.device)
            .and_then(|p| p.to_dtype(self.dtype))
            .stage(STAGE)?;
        self.model.penultimate_hidden_states(&pixels).stage(STAGE)
    }

    /// CLIPImageProcessor on `image`'s first frame, channels first: the shorter side resized (bicubic, in f32
    /// where transformers resizes 8-bit pixels with PIL, so values differ by rounding, under 1/255), the center
    /// cropped to the encoder's size, then scaled and normalized per channel.
    fn pixel_values(&self, image: &InputVideo) -> Vec<f32> {
        let p = &self.processor;
        let (height, width) = (image.height, image.width);
        let frame = &image.frames[..height * width * 3];
        let mut buffer: ImageBuffer<Rgb<f32>, Vec<f32>> =
            ImageBuffer::from_raw(width as u32, height as u32, frame.to_vec()).expect("an InputVideo frame is H·W·3");
        if p.do_resize {
            let (new_h, new_w) = match p.size {
                // transformers' get_resize_output_image_size: the long side scaled and rounded down.
                Resize::ShortestEdge(n) if height <= width => (n, n * width / height),
                Resize::ShortestEdge(n) => (n * height / width, n),
                Resize::Exact { height, width } => (height, width),
            };
            if (new_h, new_w) != (height, width) {
                buffer = imageops::resize(&buffer, new_w as u32, new_h as u32, FilterType::CatmullRom);
            }
        }
        let (h, w) = (buffer.height() as usize, buffer.width() as usize);
        let size = self.image_size;
        // The crop's offset, as transformers' center_crop rounds it; a side shorter than the crop is padded
        // with zeros, as it pads.
        let top = (h as isize - size as isize).div_euclid(2);
        let left = (w as isize - size as isize).div_euclid(2);
        let scale = if p.do_rescale { 255.0 * p.rescale_factor } else { 255.0 };
        let mut out = vec![0f32; 3 * size * size];
        for c in 0..3 {
            let (mean, std) = if p.do_normalize { (p.image_mean[c], p.image_std[c]) } else { (0.0, 1.0) };
            for y in 0..size {
                for x in 0..size {
                    let (sy, sx) = (y as isize + top, x as isize + left);
                    let value = match (usize::try_from(sy), usize::try_from(sx)) {
                        (Ok(sy), Ok(sx)) if sy < h && sx < w => f64::from(buffer.get_pixel(sx as u32, sy as u32)[c]),
                        _ => 0.0,
                    };
                    out[(c * size + y) * size + x] = ((value * scale - mean) / std) as f32;
                }
            }
        }
        out
    }
}
