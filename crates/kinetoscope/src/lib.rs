//! Kinetoscope: text- and image-to-video with open-weight spacetime latent diffusion models (Wan 2.1 T2V, I2V and
//! FLF2V, Wan 2.2 TI2V and the two-expert A14B models), offline.
//!
//! ```no_run
//! use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline};
//! # fn main() -> kinetoscope::Result<()> {
//! let pipeline = Pipeline::load(&ModelDir::open("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")?, &LoadOptions::default())?;
//! let video = pipeline.generate(&GenerateRequest { prompt: "a red fox in the snow".into(), ..Default::default() })?;
//! # Ok(()) }
//! ```

mod adapters;
mod conditioning;
mod denoise;
mod device;
mod edit;
mod error;
mod image_encoder;
mod image_to_video;
mod input_video;
mod mask;
mod memory;
mod model_dir;
mod noise;
mod pipeline;
mod preset;
mod region;
pub mod registry;
mod request;
pub mod scheduler;
mod text;
mod text_to_video;
mod vace;
mod weights;

pub use adapters::AppliedLora;
pub use candle_core::{DType, Device};
pub use device::{gpu_memory_used, open_device, parse_dtype, peak_gpu_memory, reset_peak_gpu_memory};
pub use edit::{
    edit_steps, first_step, EditKind, EditRequest, ExtendLayout, ExtendRequest, RedoRequest, TimeRange,
    MAX_EXTEND_SECONDS,
};
pub use error::{Error, Result};
pub use image_to_video::ImageRequest;
pub use input_video::InputVideo;
pub use kinetoscope_models::compact::Quantization;
pub use kinetoscope_models::wan::vae::Tiling;
pub use mask::{MaskFit, RegionMask};
pub use memory::WorkingMemory;
pub use model_dir::{hf_hub_cache, ModelDir, ModelIdentity};
pub use noise::{read_latents, seeded_noise};
pub use pipeline::{ModelShape, Pipeline};
pub use preset::Preset;
pub use region::{RegionReport, RegionRequest};
pub use registry::{
    distill_recipes, models, verify, verify_with, DistillRecipe, Footprint, ModelManifest, VerifyReport,
};
pub use request::{
    ExpertPlacement, GenerateRequest, LoadOptions, LoraSpec, MemoryLimit, Progress, Timings, VaeTiling, Video,
};
pub use text::{clean_prompt, TextEncoder, TextEncoderPlacement};
pub use vace::VaceRequest;
pub use weights::ComponentWeights;
