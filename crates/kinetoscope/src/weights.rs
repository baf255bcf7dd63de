//! Where a transformer's weights come from: its folder in the model (diffusers layout, single or sharded
//! safetensors), or a single-file checkpoint in the official Wan or ComfyUI layout that stands in for it
//! (`LoadOptions::transformer` and `transformer_2`, the CLI's `--transformer`): safetensors in f32/f16/bf16 or FP8,
//! or GGUF, read through `kinetoscope_models::wan::single_file` under the folder's names. FP8 and quantized linear
//! weights stay compact (`kinetoscope_models::compact`), as do dense ones quantized on load
//! (`LoadOptions::quantize`). Either way the network is built by the same code.

use std::path::{Path, PathBuf};

use serde::Serialize;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kinetoscope_models::checkpoint::{Checkpoint, Limits};
use kinetoscope_models::compact::{Compact, Quantization};
use kinetoscope_models::lora::Targets;
use kinetoscope_models::wan::single_file::{sibling_config, SingleFile};
use kinetoscope_models::wan::transformer;

use crate::error::{Error, Result};
use crate::model_dir::ModelDir;

/// A network's weights as the pipeline loaded them, for the sidecar.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentWeights {
    /// `transformer`, a two-expert model's `transformer_2`, `text_encoder` or `vae`.
    pub component: &'static str,
    /// The single file that stood in for the folder's network; `None`: the folder's own.
    pub file: Option<PathBuf>,
    /// The file's sha256 (hex); `None` for the folder (its configs' hashes are the model identity's), and until
    /// [`crate::Pipeline::weights`] hashes the file.
    pub sha256: Option<String>,
    /// What it stores: `diffusers folder`, or the file's tensor formats and counts (`Q4_K ×400, F32 ×615`).
    pub format: String,
    /// The format dense linear weights were quantized to as they loaded (`--quantize`).
    pub quantized_on_load: Option<String>,
}

impl ComponentWeights {
    pub(crate) fn of(source: &TransformerSource, quantize: Option<Quantization>) -> Result<Self> {
        Ok(Self {
            component: source.component,
            file: source.file.clone(),
            sha256: None,
            format: source.format()?,
            quantized_on_load: quantize.map(|q| q.name().to_string()),
        })
    }

    /// `component`'s weights from `file` (`LoadOptions::text_encoder_weights`, `LoadOptions::vae`).
    pub(crate) fn file(component: &'static str, file: &Path) -> Result<Self> {
        let checkpoint = Checkpoint::open(file, &Limits::default()).map_err(|e| Error::Weights {
            component,
            path: file.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            component,
            file: Some(file.to_path_buf()),
            sha256: None,
            format: checkpoint.format_summary(),
            quantized_on_load: None,
        })
    }
}

/// A transformer of the model (`transformer`, or a two-expert model's `transformer_2`) and the file that
/// replaces its folder, if any.
#[derive(Debug, Clone)]
pub(crate) struct TransformerSource {
    pub(crate) component: &'static str,
    pub(crate) file: Option<PathBuf>,
}

impl TransformerSource {
    /// Its config: the folder's `config.json`; for a single file, a `config.json` beside it, else the released
    /// variant its tensors' shapes are, else the folder's (the file stands in for that folder's network), each
    /// checked against the file's tensors.
    pub(crate) fn config(&self, dir: &ModelDir) -> Result<transformer::Config> {
        let Some(path) = &self.file else { return dir.config(self.component, "config.json") };
        let file = self.open(path)?;
        let invalid = |e: candle_core::Error| self.invalid(path, e);
        if let Some(config) = sibling_config(path).map_err(invalid)? {
            return file.config(Some(&config)).map_err(invalid);
        }
        file.config(None).or_else(|inferred| {
            let folder: transformer::Config =
                dir.config(self.component, "config.json").map_err(|_| invalid(inferred))?;
            file.config(Some(&folder)).map_err(invalid)
        })
    }

    /// A `VarBuilder` over its weights under the diffusers names the network reads, and, for a file that stores
    /// linear weights FP8 or quantized (GGUF), those weights kept compact.
    pub(crate) fn weights(
        &self,
        dir: &ModelDir,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, Option<Compact>)> {
        match &self.file {
            None => Ok((dir.var_builder(self.component, dtype, device)?, None)),
            Some(path) => {
                let file = self.open(path)?;
                let compact = file.is_compact();
                let (vb, weights) = file.into_weights(dtype, device);
                Ok((vb, compact.then_some(weights)))
            }
        }
    }

    /// What it stores: `diffusers folder`, or the file's tensor formats (`Q4_K ×400, F32 ×615`).
    pub(crate) fn format(&self) -> Result<String> {
        match &self.file {
            None => Ok("diffusers folder".into()),
            Some(path) => Ok(self.open(path)?.format_summary()),
        }
    }

    /// Its tensors' names and shapes, which LoRA keys are matched against.
    pub(crate) fn targets(&self, dir: &ModelDir) -> Result<Targets> {
        match &self.file {
            None => Targets::from_safetensors(&dir.weight_files(self.component)?).map_err(|e| Error::Weights {
                component: self.component,
                path: dir.component(self.component),
                reason: e.to_string(),
            }),
            Some(path) => Ok(self.open(path)?.targets()),
        }
    }

    /// The files it reads, for prefetching a swapped expert.
    pub(crate) fn files(&self, dir: &ModelDir) -> Result<Vec<PathBuf>> {
        match &self.file {
            None => dir.weight_files(self.component),
            Some(path) => Ok(vec![path.clone()]),
        }
    }

    /// The bytes its weights take on the device computing in `dtype`, from the files' headers: FP8 and quantized
    /// linear weights at their stored size, or at the size `quantize` gives them, everything else in `dtype`.
    pub(crate) fn weight_bytes(&self, dir: &ModelDir, dtype: DType, quantize: Option<Quantization>) -> Result<u64> {
        let dense = |dims: &[usize]| (dims.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        let sized = |name: &str, dims: &[usize]| match (quantize, dims) {
            (Some(quantize), &[out_dim, in_dim]) if name.ends_with(".weight") => {
                quantize.bytes(out_dim, in_dim).unwrap_or_else(|| dense(dims))
            }
            _ => dense(dims),
        };
        match &self.file {
            None => {
                let targets = self.targets(dir)?;
                Ok(targets.iter().map(|(name, dims)| sized(name, dims)).sum())
            }
            Some(path) => {
                let file = self.open(path)?;
                Ok(file
                    .stored()
                    .map(
                        |(name, stored)| {
                            if stored.format.is_compact() {
                                stored.bytes
                            } else {
                                sized(name, &stored.dims)
                            }
                        },
                    )
                    .sum())
            }
        }
    }

    pub(crate) fn open(&self, path: &std::path::Path) -> Result<SingleFile> {
        SingleFile::open(path).map_err(|e| self.invalid(path, e))
    }

    pub(crate) fn invalid(&self, path: &std::path::Path, e: candle_core::Error) -> Error {
        Error::Weights { component: self.component, path: path.to_path_buf(), reason: e.to_string() }
    }
}
