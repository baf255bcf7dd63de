//! One error type for the library: each variant is something a user can act on, and its message names
//! what was wrong (a file, a tensor, a request field) and what was expected.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No model folder at the path, and no snapshot of that repository id in the Hugging Face cache. Nothing is
    /// ever downloaded, so the message says where the steps to copy a model in are.
    #[error(
        "model not found: {model} (looked in {}); to bring a model onto a machine without network, see \
         SECURITY.md, \"Air-gapped deployment\"",
        list_paths(searched)
    )]
    ModelNotFound { model: String, searched: Vec<PathBuf> },

    /// A file the diffusers layout requires is absent.
    #[error("missing file {path}: {what}")]
    MissingFile { path: PathBuf, what: String },

    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A `config.json` (or `model_index.json`, `scheduler_config.json`) that does not parse or asks for
    /// something this build does not implement.
    #[error("invalid config {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// Weights that don't match the config: a tensor missing, of the wrong shape, or an unreadable file.
    #[error("weights of {component} in {path} don't match its config: {reason}")]
    Weights { component: &'static str, path: PathBuf, reason: String },

    /// A LoRA adapter that can't be applied to the model: unreadable, too large, a key that matches no tensor,
    /// a shape that doesn't fit.
    #[error("LoRA adapter {path}: {reason}")]
    Adapter { path: PathBuf, reason: String },

    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    /// A request field out of range or inconsistent with the model.
    #[error("invalid {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },

    /// Latents supplied by the caller (`--latents`) that cannot be used.
    #[error("latents {path}: {reason}")]
    Latents { path: PathBuf, reason: String },

    /// The device asked for can't be used.
    #[error("device {spec}: {reason}")]
    Device { spec: String, reason: String },

    /// NaN or infinity appeared; a video made from them would be black or garbage, so none is delivered.
    #[error("non-finite values (NaN/Inf) after {stage}; try dtype f32")]
    NonFinite { stage: &'static str },

    /// The caller's progress callback asked to stop.
    #[error("cancelled at step {step} of {steps}")]
    Cancelled { step: usize, steps: usize },

    /// The GPU ran out of memory in `stage`.
    #[error("out of GPU memory during {stage}: {source}; {}", gpu_memory_hint(stage))]
    GpuOutOfMemory { stage: &'static str, source: candle_core::Error },

    /// `stage` would need more working memory than the configured limit (`LoadOptions::memory_limit`);
    /// refused before the stage starts.
    #[error(
        "out of memory for {stage}: it needs about {} of working memory, over the limit of {}; try a smaller size \
         or fewer frames, or raise the memory limit",
        show_bytes(*needed_bytes),
        show_bytes(*limit_bytes)
    )]
    OutOfMemory { stage: &'static str, needed_bytes: u64, limit_bytes: u64 },

    /// A computation failed inside candle while running `stage`.
    #[error("{stage} failed: {source}")]
    Compute { stage: &'static str, source: candle_core::Error },
}

impl Error {
    /// A stable snake_case code per kind of failure, for API errors, results files and counts by kind.
    /// No wildcard: a new variant must be given its code here.
    pub fn code(&self) -> &'static str {
        match self {
            Error::ModelNotFound { .. } => "model_not_found",
            Error::MissingFile { .. } => "missing_file",
            Error::Io { .. } => "io_error",
            Error::Config { .. } => "config_invalid",
            Error::Weights { .. } => "weights_invalid",
            Error::Adapter { .. } => "lora_invalid",
            Error::Tokenizer { .. } => "tokenizer_invalid",
            Error::InvalidRequest { .. } => "invalid_request",
            Error::Latents { .. } => "latents_invalid",
            Error::Device { .. } => "device_unavailable",
            Error::NonFinite { .. } => "non_finite_output",
            Error::Cancelled { .. } => "cancelled",
            Error::GpuOutOfMemory { .. } => "gpu_out_of_memory",
            Error::OutOfMemory { .. } => "out_of_memory",
            Error::Compute { .. } => "compute_failed",
        }
    }
}

/// The setting that gives `stage` more room on the GPU.
fn gpu_memory_hint(stage: &str) -> &'static str {
    match stage {
        "text encoding" => "try --text-encoder cpu (umT5 on the CPU), or a shorter max_sequence_length",
        "VAE decoding" => "try --vae-tiling on (the decoder in 256-pixel tiles), or a smaller size",
        _ => "try a smaller size or fewer frames, dtype bf16, --text-encoder offload, or a GPU with more memory",
    }
}

/// A number of bytes in binary units, as messages show sizes (`1.5 GiB`, `512 B`).
pub(crate) fn show_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1 << 10 {
        return format!("{bytes} B");
    }
    let power = ((63 - bytes.leading_zeros()) / 10).min(UNITS.len() as u32);
    format!("{:.1} {}", bytes as f64 / (1u64 << (10 * power)) as f64, UNITS[power as usize - 1])
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Attaches the pipeline stage to a candle error, so a failure says where it happened.
pub(crate) trait StageContext<T> {
    fn stage(self, stage: &'static str) -> Result<T>;
}

impl<T> StageContext<T> for candle_core::Result<T> {
    fn stage(self, stage: &'static str) -> Result<T> {
        self.map_err(|source| {
            // candle reports the driver's status by name (CUDA_ERROR_OUT_OF_MEMORY) or cuBLAS's
            // allocation failure; either way the request, not the code, has to change.
            let text = source.to_string();
            if text.contains("OUT_OF_MEMORY") || text.contains("ALLOC_FAILED") || text.contains("out of memory") {
                Error::GpuOutOfMemory { stage, source }
            } else {
                Error::Compute { stage, source }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How candle reports the driver's failure, and what the user is told to change for each stage.
    #[test]
    fn gpu_out_of_memory_names_the_stage_and_the_setting_that_helps() {
        let failed = |stage| -> Error {
            let driver = candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into());
            Err::<(), _>(driver).stage(stage).unwrap_err()
        };
        for (stage, hint) in [
            ("VAE decoding", "--vae-tiling on"),
            ("text encoding", "--text-encoder cpu"),
            ("denoising", "smaller size"),
        ] {
            let err = failed(stage);
            assert_eq!(err.code(), "gpu_out_of_memory");
            let text = err.to_string();
            assert!(text.contains(stage) && text.contains(hint), "{text}");
        }
        let other = Err::<(), _>(candle_core::Error::Msg("shape mismatch".into())).stage("denoising").unwrap_err();
        assert_eq!(other.code(), "compute_failed");
    }
}
