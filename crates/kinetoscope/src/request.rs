//! What a caller asks of a pipeline and what it gets back: the request, the load options, progress, the
//! video and its timings. Plain data, so every entry point (library, CLI, batch, server) builds the same
//! values and every stage reads them without knowing who asked.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{DType, Device};
use kinetoscope_models::compact::Quantization;
use kinetoscope_models::wan::vae;
use serde::Serialize;

use crate::scheduler::{Schedule, SchedulerKind};
use crate::text::TextEncoderPlacement;

/// Where and in what precision the networks run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Bytes of working memory (beyond the weights) a request's stage may need; a request whose stage
    /// would need more fails with `Error::OutOfMemory` before the stage starts. `None`: no limit. An offloaded
    /// text encoder's weights are loaded for each request and count in text encoding's need.
    pub memory_limit: Option<u64>,
    /// Where the text encoder lives between requests (default: offloaded from the GPU between them).
    pub text_encoder: TextEncoderPlacement,
    /// When the VAE decodes in spatial tiles (default: when decoding whole would not fit).
    pub vae_tiling: VaeTiling,
    /// Whether a two-expert model (Wan 2.2 A14B) keeps both experts on the device (default: only where both
    /// fit).
    pub experts: ExpertPlacement,
    /// LoRA adapters merged into the transformer's weights as they load (no per-step cost), in every format
    /// diffusers reads for Wan.
    pub loras: Vec<LoraSpec>,
    /// Whether an adapter key that matches no tensor of the model is a warning (listed) instead of an error.
    pub lora_allow_unmatched: bool,
    /// A single-file checkpoint (official Wan or ComfyUI layout) to use for the transformer instead of the
    /// folder's `transformer/`; its config is a `config.json` beside it, else the released variant its shapes
    /// are, else the folder's.
    pub transformer: Option<PathBuf>,
    /// The same for a two-expert model's low-noise expert (`transformer_2/`).
    pub transformer_2: Option<PathBuf>,
    /// Quantize the transformers' dense linear weights as they load (Q8_0, Q4_K or FP8), keeping only the compact
    /// form in memory; each layer is dequantized to `dtype` as it runs. Files that are already FP8 or GGUF are
    /// kept as they are stored, without this.
    pub quantize: Option<Quantization>,
    /// A single file holding the text encoder's weights instead of the folder's `text_encoder/` (safetensors under
    /// transformers' names in any precision or FP8, or a umT5 GGUF under llama.cpp's names); the tokenizer and
    /// the config stay the folder's.
    pub text_encoder_weights: Option<PathBuf>,
    /// A single-file Wan 2.1 VAE in the official layout (ComfyUI's `wan_2.1_vae.safetensors`) instead of the
    /// folder's `vae/`; the config stays the folder's.
    pub vae: Option<PathBuf>,
}

/// A LoRA adapter file and its scale, for one of the model's transformers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
    /// `transformer`, or a two-expert model's low-noise `transformer_2` (Wan 2.2's high/low-noise LoRA pairs,
    /// as diffusers' `load_into_transformer_2`).
    pub component: &'static str,
}

impl LoraSpec {
    /// `FILE` or `FILE:SCALE` (scale 1 when absent; a path may itself hold colons: only a suffix that reads as a
    /// number is a scale), for `component`.
    pub fn parse(text: &str, component: &'static str) -> std::result::Result<Self, String> {
        let (path, scale) = match text.rsplit_once(':').map(|(path, scale)| (path, scale.trim().parse::<f64>())) {
            Some((path, Ok(scale))) => (path, scale),
            _ => (text, 1.0),
        };
        if path.is_empty() {
            return Err(format!("{text:?}: expected FILE or FILE:SCALE"));
        }
        if !scale.is_finite() {
            return Err(format!("{text:?}: the scale must be a finite number"));
        }
        Ok(LoraSpec { path: PathBuf::from(path), scale, component })
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            memory_limit: None,
            text_encoder: TextEncoderPlacement::default(),
            vae_tiling: VaeTiling::default(),
            experts: ExpertPlacement::default(),
            loras: Vec::new(),
            lora_allow_unmatched: false,
            transformer: None,
            transformer_2: None,
            quantize: None,
            text_encoder_weights: None,
            vae: None,
        }
    }
}

/// When the VAE decodes tile by tile ([`vae::Tiling`]: less memory, and a video that differs from the whole
/// decode by the blending at the tiles' overlaps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// Tiles of diffusers' default size when decoding whole would need more working memory than there is:
    /// the memory limit if one is set, and on a GPU what is free when decoding starts. The sidecar records
    /// whether it tiled.
    #[default]
    Auto,
    /// Always whole (diffusers' default).
    Off,
    /// Always these tiles (where the frame is larger than one).
    On(vae::Tiling),
}

impl std::str::FromStr for VaeTiling {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "auto" => Ok(VaeTiling::Auto),
            "off" => Ok(VaeTiling::Off),
            "on" => Ok(VaeTiling::On(vae::Tiling::default())),
            _ => Err(format!("{text:?}: expected auto, off or on")),
        }
    }
}

/// Where the two experts of a Wan 2.2 A14B model live between the steps that use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertPlacement {
    /// Both on the device when their weights and the largest stage's working memory fit in the memory limit
    /// (or, on a GPU without one, in the memory free at load); else swapped. The CPU keeps both.
    #[default]
    Auto,
    /// Both on the device: no load at the boundary, twice the weights' memory.
    Resident,
    /// One on the device at a time: the other stays memory-mapped on the host and is loaded at the boundary
    /// step, so a two-expert model runs where one expert fits.
    Swap,
}

impl std::str::FromStr for ExpertPlacement {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "auto" => Ok(ExpertPlacement::Auto),
            "resident" => Ok(ExpertPlacement::Resident),
            "swap" => Ok(ExpertPlacement::Swap),
            _ => Err(format!("{text:?}: expected auto, resident or swap")),
        }
    }
}

/// What to generate. `Default` gives Wan 2.1's pipeline defaults (832×480, 81 frames, 50 steps,
/// guidance 5, 16 fps, 512 text tokens).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub height: usize,
    pub width: usize,
    pub num_frames: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance runs (and the negative prompt is used) when above 1.
    pub guidance_scale: f64,
    /// A two-expert model's guidance scale for the low-noise expert's steps (diffusers' `guidance_scale_2`);
    /// `None` keeps `guidance_scale`. Whether guidance runs at all is `guidance_scale`'s to say, as in
    /// diffusers. Refused on a model with one network.
    pub guidance_scale_2: Option<f64>,
    /// Shift of the flow sigmas; `None` keeps the scheduler config's.
    pub shift: Option<f64>,
    /// Sampler; `None` keeps the model folder's.
    pub scheduler: Option<SchedulerKind>,
    /// An explicit schedule (few-step distilled models), run with flow-match Euler; `steps` must be its
    /// length. `None`: the sampler's own schedule of `steps`.
    pub schedule: Option<Schedule>,
    /// Seed of the initial noise, when `latents` doesn't supply it.
    pub seed: u64,
    /// Initial noise from a safetensors file (tensor `latents`), instead of the seed's.
    pub latents: Option<PathBuf>,
    pub max_sequence_length: usize,
    pub fps: u32,
    /// Step caching: the largest relative L1 change of the first transformer block's residual, since the
    /// last step computed in full, at which a step reuses what the other blocks added at that step instead
    /// of running them (see `StepCache`). `None` computes every step; 0 too, while paying for the check.
    /// Diffusers' first-block cache defaults to 0.05; larger is faster and less faithful.
    pub step_cache: Option<f64>,
    /// LoRA adapters for this request only, applied at run time on top of the weights (and of any adapters merged
    /// at load): a server switches them between jobs without reloading the model. Each file is read once and kept
    /// while the pipeline lives.
    pub loras: Vec<LoraSpec>,
    /// The settings rely on step distillation (the `turbo` preset sets this): a model that is neither distilled
    /// nor carrying a distill LoRA, merged or with the request, is refused instead of making a blurred video.
    pub distilled: bool,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: String::new(),
            height: 480,
            width: 832,
            num_frames: 81,
            steps: 50,
            guidance_scale: 5.0,
            guidance_scale_2: None,
            shift: None,
            scheduler: None,
            schedule: None,
            seed: 0,
            latents: None,
            max_sequence_length: 512,
            fps: 16,
            step_cache: None,
            loras: Vec::new(),
            distilled: false,
        }
    }
}

/// Seconds spent in each stage of one generation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub text_encoding_s: f64,
    pub denoising_s: f64,
    /// Mean seconds per denoising step (guidance's two passes included).
    pub step_s: f64,
    pub vae_decode_s: f64,
    /// Denoising steps that reused the step cache instead of running every transformer block.
    pub cached_steps: usize,
    /// The tiles the VAE decoded in, `None` if it decoded whole.
    pub vae_tiling: Option<vae::Tiling>,
    /// The most GPU memory the pipeline's tensors held at once during the generation, weights included
    /// (`None` on the CPU, or where the driver can't say).
    pub peak_gpu_memory_bytes: Option<u64>,
    /// A two-expert model's network at each step run, by its folder (`transformer`: high noise,
    /// `transformer_2`: low noise); empty for a model with one network.
    pub experts: Vec<&'static str>,
}

/// Reported after every denoising step; returning `ControlFlow::Break` cancels the generation.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    /// Whether this step reused the step cache instead of running every transformer block.
    pub cached: bool,
    /// The network that ran the step: `transformer`, or a two-expert model's `transformer_2`.
    pub expert: &'static str,
}

/// A generated clip: RGB frames in [0, 1], `[num_frames, height, width, 3]` row-major.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Vec<f32>,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    pub fps: u32,
    pub timings: Timings,
}

/// A number of bytes, parsed from `8GiB`, `512MiB`, `1.5GB`, `2000000` (binary units by 1024, decimal
/// ones by 1000, case-insensitive, a space allowed before the unit) and shown in binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimit(u64);

impl MemoryLimit {
    pub fn new(bytes: u64) -> Self {
        MemoryLimit(bytes)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for MemoryLimit {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let expected = "expected a size such as 8GiB, 512MiB, 1.5GB or a number of bytes";
        let trimmed = text.trim();
        let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        let number: f64 = number.parse().map_err(|_| format!("{text:?}: {expected}"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => return Err(format!("{text:?}: unknown unit {:?}; {expected}", unit.trim())),
        };
        let bytes = (number * scale as f64).round();
        if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(format!("{text:?}: must be at least one byte; {expected}"));
        }
        Ok(MemoryLimit(bytes as u64))
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::error::show_bytes(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<u64, String> {
        text.parse::<MemoryLimit>().map(MemoryLimit::bytes)
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!(parse("8GiB"), Ok(8 << 30));
        assert_eq!(parse("512 MiB"), Ok(512 << 20));
        assert_eq!(parse("1.5gb"), Ok(1_500_000_000));
        assert_eq!(parse("2000000"), Ok(2_000_000));
        assert_eq!(parse("64k"), Ok(64_000));
        for bad in ["", "GiB", "8 gigs", "0", "-1GiB", "1..5G"] {
            let err = parse(bad).expect_err(bad);
            assert!(err.contains("8GiB"), "{bad}: {err}");
        }
    }

    #[test]
    fn lora_specs_take_an_optional_scale_after_the_last_colon() {
        let spec = |text| LoraSpec::parse(text, "transformer").map(|s| (s.path.display().to_string(), s.scale));
        assert_eq!(spec("style.safetensors"), Ok(("style.safetensors".into(), 1.0)));
        assert_eq!(spec("style.safetensors:0.7"), Ok(("style.safetensors".into(), 0.7)));
        assert_eq!(spec("C:/loras/a:b.safetensors"), Ok(("C:/loras/a:b.safetensors".into(), 1.0)));
        assert_eq!(spec("a:b.safetensors:-0.5"), Ok(("a:b.safetensors".into(), -0.5)));
        assert!(spec(":0.5").is_err() && spec("").is_err() && spec("x:inf").is_err());
    }

    #[test]
    fn sizes_display_in_binary_units() {
        assert_eq!(MemoryLimit::new(512).to_string(), "512 B");
        assert_eq!(MemoryLimit::new(1536 << 20).to_string(), "1.5 GiB");
        assert_eq!(MemoryLimit::new(300 << 20).to_string(), "300.0 MiB");
    }
}
