//! LoRA adapters merged into a transformer's weights as it loads: read once per file against the component's
//! tensors (every format diffusers reads for Wan, see `kinetoscope_models::wan::lora`), then summed into each
//! weight they change as the network is built, so a step costs what it costs without them. A swapped expert is
//! rebuilt from the same adapters, never re-read. A linear weight kept compact (FP8, GGUF, quantized on load) takes
//! them too: quantized on load, after they are merged; stored compact, merged as it is dequantized each step.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kinetoscope_models::compact::{Compact, Quantization, QuantizeOnLoad};
use kinetoscope_models::lora::{merged_compact, merged_var_builder, Adapter, ReadOptions, ScaledAdapter, Targets};
use kinetoscope_models::wan::lora::read_adapter;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model_dir::ModelDir;
use crate::request::LoraSpec;
use crate::weights::TransformerSource;

/// An adapter as it was applied, for the sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedLora {
    pub path: PathBuf,
    pub sha256: String,
    pub scale: f64,
    /// The transformer it was merged into: `transformer`, or a two-expert model's `transformer_2`.
    pub component: &'static str,
    /// The key layout it was read in: diffusers/PEFT, official Wan (ComfyUI, lightx2v) or kohya/musubi.
    pub format: &'static str,
    /// Weights and biases it changes.
    pub tensors: usize,
    /// Keys that match no tensor of the model, when those are allowed (`--lora-allow-unmatched`).
    pub unmatched: Vec<String>,
    /// Keys left out as diffusers leaves them out (norm deltas, ...).
    pub ignored: usize,
}

/// The adapters of `specs` meant for `source`'s transformer, read against its tensors.
pub(crate) fn read(
    dir: &ModelDir,
    source: &TransformerSource,
    specs: &[LoraSpec],
    allow_unmatched: bool,
) -> Result<(Vec<ScaledAdapter>, Vec<AppliedLora>)> {
    let component = source.component;
    let specs: Vec<&LoraSpec> = specs.iter().filter(|spec| spec.component == component).collect();
    if specs.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let targets = source.targets(dir)?;
    let (mut adapters, mut applied) = (Vec::new(), Vec::new());
    for spec in specs {
        let adapter = read_one(&spec.path, &targets, allow_unmatched)?;
        applied.push(AppliedLora {
            path: spec.path.clone(),
            sha256: crate::model_dir::sha256_of(&spec.path)?,
            scale: spec.scale,
            component,
            format: adapter.format(),
            tensors: adapter.tensor_names().count(),
            unmatched: adapter.unmatched().to_vec(),
            ignored: adapter.ignored().len(),
        });
        adapters.push(ScaledAdapter { adapter: Arc::new(adapter), scale: spec.scale });
    }
    Ok((adapters, applied))
}

/// The adapter file at `path`, read against a transformer's `targets`; unmatched keys (when allowed) are logged.
pub(crate) fn read_one(path: &Path, targets: &Targets, allow_unmatched: bool) -> Result<Adapter> {
    let options = ReadOptions { allow_unmatched, ..ReadOptions::default() };
    let adapter = read_adapter(path, targets, &options)
        .map_err(|e| Error::Adapter { path: path.to_path_buf(), reason: e.to_string() })?;
    for key in adapter.unmatched() {
        tracing::warn!(lora = %path.display(), key, "LoRA key matches no tensor of the model; left out");
    }
    Ok(adapter)
}

/// `source`'s weights with `adapters` merged in (the weights alone without any): a `VarBuilder` over the dense
/// tensors, and the linear weights kept compact, the file's FP8 or GGUF ones or every one quantized as it loads
/// (`quantize`), with the adapters merged into them as they are dequantized.
pub(crate) fn weights(
    dir: &ModelDir,
    source: &TransformerSource,
    dtype: DType,
    device: &Device,
    adapters: &[ScaledAdapter],
    quantize: Option<Quantization>,
) -> Result<(VarBuilder<'static>, Compact)> {
    let (base, stored_compact) = source.weights(dir, dtype, device)?;
    let vb = if adapters.is_empty() { base } else { merged_var_builder(base, adapters.to_vec()) };
    let compact = match (stored_compact, quantize) {
        (None, None) => Compact::none(),
        // Quantized from the merged weights: adapters cost nothing per step.
        (None, Some(quantize)) => Compact::new(QuantizeOnLoad::new(vb.clone(), quantize)),
        (Some(compact), None) => merged_compact(compact, adapters.to_vec()),
        (Some(_), Some(quantize)) => {
            return Err(Error::InvalidRequest {
                field: "quantize",
                reason: format!(
                    "{} is already stored compact ({}); --quantize {quantize} is for dense (f32/f16/bf16) weights",
                    source.file.as_deref().unwrap_or(&dir.component(source.component)).display(),
                    source.format()?
                ),
            })
        }
    };
    Ok((vb, compact))
}
