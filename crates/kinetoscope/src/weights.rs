//! Where a transformer's weights come from: its folder in the model (diffusers layout, single or sharded
//! safetensors), or a single-file checkpoint in the official Wan or ComfyUI layout that stands in for it
//! (`LoadOptions::transformer` and `transformer_2`, the CLI's `--transformer`), read through `kinetoscope_models::wan::single_file`
//! under the folder's names. Either way the network is built by the same code.

use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use kinetoscope_models::lora::Targets;
use kinetoscope_models::wan::single_file::{sibling_config, SingleFile};
use kinetoscope_models::wan::transformer;

use crate::error::{Error, Result};
use crate::model_dir::ModelDir;

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

    /// A `VarBuilder` over its weights under the diffusers names the network reads.
    pub(crate) fn var_builder(&self, dir: &ModelDir, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.file {
            None => dir.var_builder(self.component, dtype, device),
            Some(path) => Ok(self.open(path)?.into_var_builder(dtype, device)),
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

    /// Its parameters, from the files' headers.
    pub(crate) fn parameters(&self, dir: &ModelDir, config: &transformer::Config) -> Result<u64> {
        match &self.file {
            None => Ok(crate::registry::check_transformer_weights(dir, self.component, config)?.parameters),
            Some(path) => {
                Ok(self.open(path)?.shapes().values().map(|shape| shape.iter().product::<usize>() as u64).sum())
            }
        }
    }

    fn open(&self, path: &std::path::Path) -> Result<SingleFile> {
        SingleFile::open(path).map_err(|e| self.invalid(path, e))
    }

    fn invalid(&self, path: &std::path::Path, e: candle_core::Error) -> Error {
        Error::Weights { component: self.component, path: path.to_path_buf(), reason: e.to_string() }
    }
}
