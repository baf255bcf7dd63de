//! A model folder in diffusers' layout, given by path or found in the Hugging Face cache:
//!
//! ```text
//! model_index.json
//! scheduler/scheduler_config.json
//! text_encoder/config.json + model.safetensors        (or sharded, with model.safetensors.index.json)
//! tokenizer/tokenizer.json
//! transformer/config.json + diffusion_pytorch_model.safetensors   (or sharded, with its .index.json)
//! vae/config.json + diffusion_pytorch_model.safetensors
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Weight file stems, in the order they are looked for: diffusers' models, then transformers' models.
const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

#[derive(Debug, Clone)]
pub struct ModelDir {
    root: PathBuf,
    /// `org/name` when the folder was found in the Hugging Face cache.
    repo_id: Option<String>,
    /// The snapshot's commit hash, for a folder from the Hugging Face cache.
    revision: Option<String>,
}

/// Where a model came from and what it is, recorded beside every output so a run can be traced.
#[derive(Debug, Clone, Serialize)]
pub struct ModelIdentity {
    pub path: PathBuf,
    pub repo_id: Option<String>,
    pub revision: Option<String>,
    pub pipeline_class: String,
    pub diffusers_version: Option<String>,
    /// sha256 of each component's config file, keyed by component.
    pub config_sha256: BTreeMap<String, String>,
}

/// `model_index.json`: the pipeline's class and its own settings.
#[derive(Debug, Deserialize)]
pub(crate) struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub(crate) class_name: String,
    #[serde(rename = "_diffusers_version")]
    diffusers_version: Option<String>,
    /// Wan 2.2 TI2V: one timestep per latent token, so that an image's first frame can sit at timestep 0.
    #[serde(default)]
    pub(crate) expand_timesteps: bool,
    /// Wan 2.2 A14B: the fraction of the training timesteps below which the second transformer
    /// (`transformer_2`, the low-noise expert) takes over.
    #[serde(default)]
    pub(crate) boundary_ratio: Option<f64>,
    /// Everything else: component folders as `[library, class]` (`[null, null]` for an empty slot), and
    /// settings this code doesn't read.
    #[serde(flatten)]
    entries: BTreeMap<String, serde_json::Value>,
}

impl ModelIndex {
    /// Whether the pipeline has a component in folder `name` (`transformer_2`, `image_encoder`): an entry
    /// naming a library and a class.
    pub(crate) fn has_component(&self, name: &str) -> bool {
        matches!(self.entries.get(name), Some(serde_json::Value::Array(pair))
            if pair.len() == 2 && pair.iter().all(serde_json::Value::is_string))
    }
}

#[derive(Debug, Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl ModelDir {
    /// Opens `spec` as a folder if one exists there, else as a Hugging Face repository id
    /// (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers`) in the local cache. Nothing is downloaded.
    pub fn open(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            return Self::from_path(path);
        }
        let looks_like_repo_id = spec.split('/').count() == 2 && !spec.starts_with(['.', '/', '~']);
        if looks_like_repo_id {
            return Self::from_hf_cache(spec, &hf_hub_cache());
        }
        Err(Error::ModelNotFound { model: spec.to_string(), searched: vec![path.to_path_buf()] })
    }

    pub fn from_path(root: &Path) -> Result<Self> {
        let dir = ModelDir { root: root.to_path_buf(), repo_id: None, revision: None };
        dir.require_file("model_index.json", "the pipeline's model_index.json (a diffusers model folder)")?;
        Ok(dir)
    }

    /// Finds `repo_id` in a Hugging Face hub cache (`models--org--name/snapshots/<revision>`), taking
    /// the revision `refs/main` points at, or else the only (or newest) complete snapshot.
    pub fn from_hf_cache(repo_id: &str, cache: &Path) -> Result<Self> {
        let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
        let not_found = || Error::ModelNotFound { model: repo_id.to_string(), searched: vec![repo.clone()] };
        let snapshots = repo.join("snapshots");
        let revision = match std::fs::read_to_string(repo.join("refs").join("main")) {
            Ok(rev) if snapshots.join(rev.trim()).join("model_index.json").is_file() => rev.trim().to_string(),
            _ => newest_snapshot(&snapshots).ok_or_else(not_found)?,
        };
        let root = snapshots.join(&revision);
        Ok(ModelDir { root, repo_id: Some(repo_id.to_string()), revision: Some(revision) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `org/name`, for a folder found in the Hugging Face cache.
    pub fn repo_id(&self) -> Option<&str> {
        self.repo_id.as_deref()
    }

    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn require_file(&self, rel: &str, what: &str) -> Result<PathBuf> {
        let path = self.root.join(rel);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MissingFile { path, what: what.to_string() })
        }
    }

    /// Reads and deserializes `component/file` (a `config.json`, `scheduler_config.json`, ...).
    /// `component/file`, parsed as `T`. A whole number above [`MAX_CONFIG_INTEGER`] anywhere in it is refused,
    /// naming its key: no network is that large, and sizes multiplied together must not overflow.
    pub fn config<T: DeserializeOwned>(&self, component: &str, file: &str) -> Result<T> {
        let path = self.require_file(&format!("{component}/{file}"), &format!("the {component} config"))?;
        let value: serde_json::Value = read_json(&path)?;
        if let Some((key, number)) = oversized_integer(&value, "") {
            return Err(Error::Config {
                path,
                reason: format!(
                    "{key} is {number}, larger than any model's sizes (at most {MAX_CONFIG_INTEGER} is taken)"
                ),
            });
        }
        serde_json::from_value(value).map_err(|e| Error::Config { path, reason: e.to_string() })
    }

    /// The safetensors files holding `component`'s weights: the shards an index lists, or the single file.
    pub fn weight_files(&self, component: &str) -> Result<Vec<PathBuf>> {
        let dir = self.component(component);
        for stem in WEIGHT_STEMS {
            let index_path = dir.join(format!("{stem}.safetensors.index.json"));
            if index_path.is_file() {
                let index: ShardIndex = read_json(&index_path)?;
                let mut shards: Vec<&String> = index.weight_map.values().collect();
                shards.sort();
                shards.dedup();
                return shards
                    .into_iter()
                    .map(|shard| {
                        let path = dir.join(shard);
                        if path.is_file() {
                            Ok(path)
                        } else {
                            let what = format!("a shard listed in {}", index_path.display());
                            Err(Error::MissingFile { path, what })
                        }
                    })
                    .collect();
            }
            let single = dir.join(format!("{stem}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
        }
        let pickled = WEIGHT_STEMS.iter().flat_map(|s| [format!("{s}.bin"), format!("{s}.pth")]);
        let what = if pickled.into_iter().any(|f| dir.join(f).is_file()) {
            "safetensors weights: only pickle (.bin/.pth) files are here, and pickle is never loaded (it can run code); convert them to safetensors".to_string()
        } else {
            format!("{component} weights (diffusion_pytorch_model.safetensors, model.safetensors, or a sharded *.safetensors.index.json)")
        };
        Err(Error::MissingFile { path: dir, what })
    }

    /// A `VarBuilder` over `component`'s weights, converting them from their stored dtype (f32, f16, bf16)
    /// to `dtype` as they are read.
    pub fn var_builder(&self, component: &'static str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let files = self.weight_files(component)?;
        // SAFETY: the files are memory-mapped read-only; as with every mmap, a file truncated by another
        // process while mapped is undefined behaviour, which model folders (written once) don't see.
        unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| Error::Weights {
            component,
            path: self.component(component),
            reason: format!("unreadable safetensors: {e}"),
        })
    }

    /// `model_index.json`, refused when it configures a pipeline this code doesn't run.
    pub(crate) fn model_index(&self) -> Result<ModelIndex> {
        let path = self.require_file("model_index.json", "model_index.json")?;
        let index: ModelIndex = read_json(&path)?;
        let invalid = |reason: String| Err(Error::Config { path: path.clone(), reason });
        match (index.boundary_ratio, index.has_component("transformer_2")) {
            (Some(ratio), true) if !(ratio > 0.0 && ratio < 1.0) => {
                invalid(format!("boundary_ratio {ratio} must lie strictly between 0 and 1"))
            }
            (Some(ratio), false) => invalid(format!(
                "boundary_ratio {ratio} hands the low-noise steps to a second transformer, but transformer_2 is \
                 not one of the components"
            )),
            (None, true) => invalid(
                "transformer_2 (a low-noise expert) is a component but boundary_ratio, the timestep where it takes \
                 over, is not set"
                    .into(),
            ),
            _ => Ok(index),
        }
    }

    pub fn identity(&self) -> Result<ModelIdentity> {
        let index = self.model_index()?;
        let mut config_sha256 = BTreeMap::new();
        for (component, file) in [
            ("scheduler", "scheduler_config.json"),
            ("text_encoder", "config.json"),
            ("transformer", "config.json"),
            ("transformer_2", "config.json"),
            ("image_encoder", "config.json"),
            ("image_processor", "preprocessor_config.json"),
            ("vae", "config.json"),
        ] {
            let path = self.component(component).join(file);
            if let Ok(bytes) = std::fs::read(&path) {
                config_sha256.insert(component.to_string(), hex(&Sha256::digest(&bytes)));
            }
        }
        Ok(ModelIdentity {
            path: self.root.clone(),
            repo_id: self.repo_id.clone(),
            revision: self.revision.clone(),
            pipeline_class: index.class_name,
            diffusers_version: index.diffusers_version,
            config_sha256,
        })
    }
}

/// The largest whole number a component's config may hold (2²⁴; umT5's vocabulary, 256,384, is the largest in
/// real checkpoints).
pub const MAX_CONFIG_INTEGER: u64 = 1 << 24;

/// The first whole number in `value` whose magnitude is above [`MAX_CONFIG_INTEGER`], with its key path.
fn oversized_integer(value: &serde_json::Value, key: &str) -> Option<(String, serde_json::Number)> {
    match value {
        serde_json::Value::Number(n) => {
            let magnitude = n.as_u64().or_else(|| n.as_i64().map(i64::unsigned_abs));
            magnitude.filter(|m| *m > MAX_CONFIG_INTEGER).map(|_| (key.to_string(), n.clone()))
        }
        serde_json::Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, item)| oversized_integer(item, &format!("{key}[{i}]")))
        }
        serde_json::Value::Object(fields) => fields.iter().find_map(|(name, field)| {
            oversized_integer(field, &if key.is_empty() { name.clone() } else { format!("{key}.{name}") })
        }),
        _ => None,
    }
}

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hub cache as huggingface_hub resolves it: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(cache) = var("HF_HUB_CACHE") {
        return cache;
    }
    let home = var("HF_HOME").unwrap_or_else(|| {
        let cache =
            var("XDG_CACHE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_else(|| PathBuf::from("/")).join(".cache"));
        cache.join("huggingface")
    });
    home.join("hub")
}

fn newest_snapshot(snapshots: &Path) -> Option<String> {
    std::fs::read_dir(snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("model_index.json").is_file())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// `path`'s sha256, hex.
pub(crate) fn sha256_of(path: &Path) -> Result<String> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    use std::io::Read;
    let (mut hasher, mut buffer) = (Sha256::new(), vec![0u8; 1 << 20]);
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn finds_the_snapshot_refs_main_points_at() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers");
        touch(&repo.join("snapshots/aaa/model_index.json"), "{}");
        touch(&repo.join("snapshots/bbb/model_index.json"), "{}");
        touch(&repo.join("refs/main"), "aaa\n");
        let dir = ModelDir::from_hf_cache("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", cache.path()).unwrap();
        assert_eq!(dir.root(), repo.join("snapshots/aaa"));
        assert_eq!(dir.revision.as_deref(), Some("aaa"));
    }

    #[test]
    fn without_refs_takes_a_complete_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--name");
        touch(&repo.join("snapshots/partial/transformer/config.json"), "{}");
        touch(&repo.join("snapshots/full/model_index.json"), "{}");
        let dir = ModelDir::from_hf_cache("org/name", cache.path()).unwrap();
        assert_eq!(dir.root(), repo.join("snapshots/full"));
    }

    #[test]
    fn a_missing_model_names_where_it_looked() {
        let cache = tempfile::tempdir().unwrap();
        let err = ModelDir::from_hf_cache("org/absent", cache.path()).unwrap_err().to_string();
        assert!(err.contains("org/absent") && err.contains("models--org--absent"), "{err}");
        let err = ModelDir::open("./no/such/folder").unwrap_err().to_string();
        assert!(err.contains("no/such/folder"), "{err}");
        assert!(err.contains("see SECURITY.md, \"Air-gapped deployment\""), "{err}");
    }

    #[test]
    fn a_missing_shard_is_named() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("model_index.json"), "{}");
        let index = r#"{"metadata": {}, "weight_map": {"a": "s-00001.safetensors", "b": "s-00002.safetensors"}}"#;
        touch(&root.path().join("transformer/diffusion_pytorch_model.safetensors.index.json"), index);
        touch(&root.path().join("transformer/s-00001.safetensors"), "");
        let dir = ModelDir::from_path(root.path()).unwrap();
        let err = dir.weight_files("transformer").unwrap_err().to_string();
        assert!(err.contains("s-00002.safetensors"), "{err}");
    }

    #[test]
    fn pickle_weights_are_refused_by_name() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("model_index.json"), "{}");
        touch(&root.path().join("vae/diffusion_pytorch_model.bin"), "");
        let dir = ModelDir::from_path(root.path()).unwrap();
        let err = dir.weight_files("vae").unwrap_err().to_string();
        assert!(err.contains("pickle"), "{err}");
    }
}
