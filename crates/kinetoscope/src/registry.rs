//! The supported models (one JSON manifest each, in `models/registry/`, embedded at build time) and a
//! pre-flight check of a model folder against what the code needs, before a long job starts.
//!
//! [`verify`] reads configs and safetensors headers only, never tensor data: it builds the real networks over a
//! `VarBuilder` whose backend checks each requested tensor's name, shape and dtype against the headers and
//! hands back a broadcast zero, so the list of needed tensors is the model code's own.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use kinetoscope_models::checkpoint::{Checkpoint, Limits};
use kinetoscope_models::clip::{self, ClipVisionModel};
use kinetoscope_models::compact::Quantization;
use kinetoscope_models::umt5::{self, UMT5Encoder};
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};
use kinetoscope_models::wan::vae::{self, AutoencoderKLWan};
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model_dir::{read_json, ModelDir};
use crate::request::{GenerateRequest, LoadOptions};
use crate::scheduler::{Schedule, SchedulerConfig};
use crate::weights::TransformerSource;

/// In the order a folder is matched against them: within a family, an entry whose configs are a superset of
/// another's comes first (FLF2V's position embedding before I2V), and where configs can't tell entries apart
/// (Wan 2.1 I2V 480P and 720P) a folder from the Hugging Face cache is the entry of its repository.
const MANIFESTS: [&str; 10] = [
    include_str!("../../../models/registry/wan2.1-t2v-1.3b.json"),
    include_str!("../../../models/registry/wan2.1-t2v-14b.json"),
    include_str!("../../../models/registry/wan2.2-ti2v-5b.json"),
    include_str!("../../../models/registry/wan2.2-t2v-a14b.json"),
    include_str!("../../../models/registry/wan2.2-i2v-a14b.json"),
    include_str!("../../../models/registry/wan2.1-flf2v-14b-720p.json"),
    include_str!("../../../models/registry/wan2.1-i2v-14b-480p.json"),
    include_str!("../../../models/registry/wan2.1-i2v-14b-720p.json"),
    include_str!("../../../models/registry/wan2.1-vace-1.3b.json"),
    include_str!("../../../models/registry/wan2.1-vace-14b.json"),
];

/// Step- and guidance-distilled weights and the recipe they run with (`models/distilled.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct DistillRecipe {
    pub name: String,
    /// The steps: explicit sigmas shifted by `shift` (flow-match Euler), or DMD timesteps.
    pub schedule: Schedule,
    pub shift: f64,
    pub guidance_scale: f64,
    /// A LoRA is a distill LoRA of this recipe when its file name contains one of these (case-insensitive).
    pub lora_name_contains: Vec<String>,
    /// Distilled models, by Hugging Face repository id.
    pub repo_ids: Vec<String>,
}

impl DistillRecipe {
    /// Sets `request`'s steps, schedule, shift and guidance to this recipe's.
    pub fn apply(&self, request: &mut GenerateRequest) {
        request.steps = self.schedule.len();
        request.schedule = Some(self.schedule.clone());
        request.shift = Some(self.shift);
        request.guidance_scale = self.guidance_scale;
    }

    /// Whether the LoRA file at `path` is one of this recipe's, by its name.
    pub fn matches_lora(&self, path: &Path) -> bool {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        self.lora_name_contains.iter().any(|part| name.contains(part.as_str()))
    }
}

/// The distill recipes (`models/distilled.json`).
pub fn distill_recipes() -> &'static [DistillRecipe] {
    #[derive(Deserialize)]
    struct File {
        recipes: Vec<DistillRecipe>,
    }
    static RECIPES: OnceLock<Vec<DistillRecipe>> = OnceLock::new();
    RECIPES.get_or_init(|| {
        let file: File = serde_json::from_str(include_str!("../../../models/distilled.json"))
            .expect("the embedded distill recipes are checked by a unit test");
        file.recipes
    })
}

/// The precision the networks are built in while verifying. A few constructors re-lay-out their weights (the
/// VAE's causal convolutions, the patch embedding), which copies the placeholder zeros; half precision halves
/// that transient memory (about 250 MB for Wan 2.1's VAE). Stored dtypes are checked separately.
const VERIFY_DTYPE: DType = DType::BF16;

/// Safetensors headers above this size are refused rather than read (real ones are a few MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One supported model: where it comes from, how its folder is laid out, the config values that identify it,
/// and the generation defaults its authors recommend.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelManifest {
    pub id: String,
    pub name: String,
    /// Models of one family share a pipeline and a folder layout, and differ only in config values.
    pub family: String,
    pub repo_id: String,
    pub pipeline_class: String,
    /// `model_index.json`'s `expand_timesteps`: one timestep per token, which lets Wan 2.2 TI2V hold an image
    /// as the first frame. Tells the families that share a pipeline class apart.
    #[serde(default)]
    pub expand_timesteps: bool,
    /// By component folder: its class in `model_index.json` and the files it must hold besides weights.
    pub components: BTreeMap<String, ComponentManifest>,
    /// By component: config keys and the values this model has; all must match for a folder to be this model.
    pub configs: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    pub defaults: Defaults,
    /// Single-file transformers people download for this model (ComfyUI's repackaged FP8 and half-precision files,
    /// city96's GGUFs), for `--transformer`; a two-expert model's come in pairs (high-noise, low-noise).
    #[serde(default)]
    pub downloads: Vec<Download>,
}

/// A single-file transformer on the Hugging Face Hub.
#[derive(Debug, Clone, Deserialize)]
pub struct Download {
    pub repo_id: String,
    /// Its path in the repository.
    pub file: String,
    /// `bf16`, `f16`, `fp8`, or a GGUF type as its name gives it (`Q4_K_M`).
    pub format: String,
}

impl Download {
    /// Bits a linear weight takes in this format (a GGUF mix by its main type); `None` for a format not known.
    pub fn bits_per_weight(&self) -> Option<f64> {
        Some(match self.format.as_str() {
            "bf16" | "f16" => 16.0,
            "fp8" => 8.0,
            "Q8_0" => 8.5,
            "Q6_K" => 6.5625,
            "Q5_K_M" | "Q5_K_S" => 5.5,
            "Q4_K_M" | "Q4_K_S" => 4.5,
            "Q3_K_M" | "Q3_K_S" => 3.4375,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ComponentManifest {
    pub library: String,
    pub class: String,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Defaults {
    pub width: usize,
    pub height: usize,
    pub num_frames: usize,
    pub fps: u32,
    pub steps: usize,
    pub guidance_scale: f64,
    /// A two-expert model's guidance for its low-noise expert.
    #[serde(default)]
    pub guidance_scale_2: Option<f64>,
    pub shift: f64,
}

impl Defaults {
    /// Sets the fields of `request` that these defaults cover: size, frames, frame rate, steps, guidance(s) and
    /// shift.
    pub fn apply(&self, request: &mut GenerateRequest) {
        (request.width, request.height, request.num_frames, request.fps) =
            (self.width, self.height, self.num_frames, self.fps);
        (request.steps, request.guidance_scale, request.shift) = (self.steps, self.guidance_scale, Some(self.shift));
        request.guidance_scale_2 = self.guidance_scale_2;
    }
}

/// The registry, parsed once.
pub fn models() -> &'static [ModelManifest] {
    static MODELS: OnceLock<Vec<ModelManifest>> = OnceLock::new();
    MODELS.get_or_init(|| {
        MANIFESTS
            .iter()
            .map(|text| serde_json::from_str(text).expect("the embedded manifests are checked by a unit test"))
            .collect()
    })
}

/// What a model's transformer takes held one way, and what the whole model then needs on the GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// `bf16` (the released weights), or the compact format: `fp8`, `q8_0`, `q4_k` (what `--quantize` makes; FP8 and
    /// GGUF downloads of the same names are within a few percent, their small tensors being stored wider).
    pub format: &'static str,
    /// One transformer's weights (one expert's for a two-expert model, which swaps them).
    pub transformer_bytes: u64,
    /// The most the GPU holds at once generating at the model's defaults with the text encoder on the CPU
    /// (`--text-encoder cpu`): the transformer's weights, the VAE's, and the largest stage's working memory as
    /// `--memory-limit` estimates it (activations counted in f32, an upper bound for bf16 runs).
    pub gpu_bytes: u64,
}

impl ModelManifest {
    /// One transformer's bytes with its linear weights at `bits` a weight and everything else in bf16, from the
    /// configs: what a file of that format takes, near enough (GGUF files keep a few small tensors wider).
    pub fn transformer_bytes_at(&self, bits: f64) -> Result<u64> {
        let invalid = |e: String| Error::InvalidRequest { field: "model", reason: format!("{}: {e}", self.id) };
        let values = self.configs.get("transformer").cloned().unwrap_or_default();
        let transformer: transformer::Config =
            serde_json::from_value(serde_json::Value::Object(values)).map_err(|e| invalid(e.to_string()))?;
        let shapes =
            kinetoscope_models::wan::single_file::model_shapes(&transformer).map_err(|e| invalid(e.to_string()))?;
        Ok(shapes
            .iter()
            .map(|(name, dims)| {
                let elements = dims.iter().product::<usize>() as f64;
                let linear = dims.len() == 2 && name.ends_with(".weight");
                (elements * if linear { bits / 8.0 } else { 2.0 }).ceil() as u64
            })
            .sum())
    }

    /// The model's [`Footprint`] for its released weights and each compact format, from its configs.
    pub fn footprints(&self) -> Result<Vec<Footprint>> {
        let config = |component: &str| {
            let values = self.configs.get(component).cloned().unwrap_or_default();
            serde_json::Value::Object(values)
        };
        let invalid = |e: String| Error::InvalidRequest { field: "model", reason: format!("{}: {e}", self.id) };
        let transformer: transformer::Config =
            serde_json::from_value(config("transformer")).map_err(|e| invalid(e.to_string()))?;
        let text: umt5::Config = serde_json::from_value(config("text_encoder")).map_err(|e| invalid(e.to_string()))?;
        let vae: vae::Config = serde_json::from_value(config("vae")).map_err(|e| invalid(e.to_string()))?;
        let shapes =
            kinetoscope_models::wan::single_file::model_shapes(&transformer).map_err(|e| invalid(e.to_string()))?;
        // The VAE runs in f32.
        let (vae_parameters, _) =
            over_shapes(None, |vb| AutoencoderKLWan::new(&vae, vb).map(drop)).map_err(|e| invalid(e.to_string()))?;
        let vae_bytes = 4 * vae_parameters;
        let budget = crate::memory::MemoryBudget::new(None, &text, &[&transformer], &vae, Default::default(), 0);
        let d = &self.defaults;
        let scale = vae.spatial_compression();
        let frame_multiple = 1 << vae.temperal_downsample.iter().filter(|d| **d).count();
        let latent = [1, vae.z_dim, (d.num_frames - 1) / frame_multiple + 1, d.height / scale, d.width / scale];
        let working = budget.estimate(latent, 512, d.guidance_scale > 1.0);
        let working = working.denoising_step.max(working.vae_decoding);
        let formats = [("bf16", None)].into_iter().chain(Quantization::ALL.into_iter().map(|q| (q.name(), Some(q))));
        Ok(formats
            .map(|(format, quantization)| {
                let transformer_bytes = shapes
                    .iter()
                    .map(|(name, dims)| match (quantization, dims.as_slice()) {
                        (Some(q), &[out_dim, in_dim]) if name.ends_with(".weight") => {
                            q.bytes(out_dim, in_dim).unwrap_or(2 * (out_dim * in_dim) as u64)
                        }
                        _ => 2 * dims.iter().product::<usize>() as u64,
                    })
                    .sum::<u64>();
                Footprint { format, transformer_bytes, gpu_bytes: transformer_bytes + vae_bytes + working }
            })
            .collect())
    }
}

/// What [`verify`] found in a folder that passed.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub root: PathBuf,
    /// The family whose layout the folder follows.
    pub family: String,
    /// The registry entry every identifying config value matches; `None` for a model of a known family with
    /// other sizes (the tiny test models, a fine-tune with another depth).
    pub model: Option<&'static ModelManifest>,
    /// The networks' weights, in the order checked.
    pub weights: Vec<WeightsReport>,
}

#[derive(Debug, Clone)]
pub struct WeightsReport {
    pub component: &'static str,
    pub files: usize,
    /// Tensors the code needs, all present with the right shape.
    pub tensors: usize,
    pub parameters: u64,
    /// Stored dtypes of the needed tensors, e.g. `["bf16"]` (a single file's formats: `["F32", "Q4_K"]`).
    pub dtypes: Vec<String>,
    /// The single file that stands in for the component's folder, if one does.
    pub file: Option<PathBuf>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.model {
            Some(m) => writeln!(f, "{}: {} ({}), OK", self.root.display(), m.name, m.id)?,
            None => writeln!(
                f,
                "{}: unknown model of the {} family, configs are self-consistent, OK",
                self.root.display(),
                self.family
            )?,
        }
        for w in &self.weights {
            write!(
                f,
                "  {:<13} {} tensors, {} parameters, {} in {} file(s)",
                w.component,
                w.tensors,
                w.parameters,
                w.dtypes.join("+"),
                w.files
            )?;
            match &w.file {
                Some(file) => writeln!(f, ": {}", file.display())?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// Checks that `dir` holds everything the code needs to run it, reading configs and safetensors headers only:
/// `model_index.json` and its pipeline class, each component's class and files, the configs, the shards an
/// index lists, and every tensor the networks load (present, right shape, stored as f32, f16 or bf16).
pub fn verify(dir: &ModelDir) -> Result<VerifyReport> {
    verify_with(dir, &LoadOptions::default())
}

/// [`verify`] for the set a pipeline would load with `options`: its single files (`transformer`, `transformer_2`,
/// `text_encoder_weights`) checked in place of the folders they stand in for, by their headers (the configs they
/// get, every tensor the networks read present with its shape, their formats), the folders' own weights of those
/// components not read.
pub fn verify_with(dir: &ModelDir, options: &LoadOptions) -> Result<VerifyReport> {
    let index_path = dir.root().join("model_index.json");
    let family = family_of(dir)?;
    // Component folder → `[library, class]` (`[null, null]` for an unused slot), beside the pipeline's own keys.
    let index: BTreeMap<String, serde_json::Value> = read_json(&index_path)?;
    for (name, component) in &family.components {
        let expected = serde_json::json!([component.library, component.class]);
        if index.get(name) != Some(&expected) {
            return Err(Error::Config {
                path: index_path.clone(),
                reason: format!("component {name} should be {expected}, found {}", show(index.get(name))),
            });
        }
        for file in &component.files {
            let path = dir.component(name).join(file);
            if !path.is_file() {
                return Err(Error::MissingFile { path, what: format!("the {name}'s {file}") });
            }
        }
    }

    let scheduler: SchedulerConfig = dir.config("scheduler", "scheduler_config.json")?;
    scheduler.validate(&dir.component("scheduler").join("scheduler_config.json"))?;
    let text_cfg: umt5::Config = dir.config("text_encoder", "config.json")?;
    let vae_cfg: vae::Config = dir.config("vae", "config.json")?;
    let mut weights = vec![match &options.text_encoder_weights {
        None => check_weights(dir, "text_encoder", |vb| UMT5Encoder::new(&text_cfg, vb).map(drop))?,
        Some(file) => check_text_encoder_file(file, &text_cfg)?,
    }];
    let model_index = dir.model_index()?;
    let image_encoder = match model_index.has_component("image_encoder") {
        true => Some(dir.config::<clip::Config>("image_encoder", "config.json")?),
        false => None,
    };
    for (component, file) in [("transformer", &options.transformer), ("transformer_2", &options.transformer_2)] {
        if component == "transformer" || model_index.has_component(component) {
            let source = TransformerSource { component, file: file.clone() };
            let cfg = source.config(dir)?;
            check_configs_agree(dir, component, &cfg, text_cfg.d_model, &vae_cfg)?;
            check_image_conditioning(dir, &cfg, image_encoder.as_ref().map(|c| c.hidden_size))?;
            weights.push(match file {
                None => check_transformer_weights(dir, component, &cfg)?,
                Some(file) => transformer_file_report(&source, file, &cfg)?,
            });
        } else if file.is_some() {
            return Err(Error::InvalidRequest {
                field: "transformer_2",
                reason: "the model has one transformer; a low-noise expert's file needs a two-expert model".into(),
            });
        }
    }
    if let Some(cfg) = &image_encoder {
        weights.push(check_weights(dir, "image_encoder", |vb| ClipVisionModel::new(cfg, vb).map(drop))?);
    }
    weights.push(match &options.vae {
        None => check_weights(dir, "vae", |vb| AutoencoderKLWan::new(&vae_cfg, vb).map(drop))?,
        Some(file) => check_vae_file(file, &vae_cfg)?,
    });
    let model = entry_in(dir, family)?;
    Ok(VerifyReport { root: dir.root().to_path_buf(), family: family.family.clone(), model, weights })
}

/// The transformer in folder `component` must be as wide as what feeds it: the text encoder's states and the
/// VAE's latents (with an image-to-video model's mask and image latents concatenated to them).
pub(crate) fn check_configs_agree(
    dir: &ModelDir,
    component: &str,
    transformer: &transformer::Config,
    text_dim: usize,
    vae: &vae::Config,
) -> Result<()> {
    let mismatch = |reason: String| Err(Error::Config { path: dir.component(component).join("config.json"), reason });
    if transformer.text_dim != text_dim {
        return mismatch(format!(
            "text_dim {} doesn't match the text encoder's d_model {text_dim}",
            transformer.text_dim
        ));
    }
    let z = vae.z_dim;
    if transformer.out_channels() != z {
        return mismatch(format!("out_channels {} doesn't match the VAE's z_dim {z}", transformer.out_channels()));
    }
    // Image-to-video: the noise, then a mask of one channel per frame of a latent frame's time, then the image
    // latents.
    let mask_channels = 1 << vae.temperal_downsample.iter().filter(|d| **d).count();
    let (in_channels, image_to_video) = (transformer.in_channels, 2 * z + mask_channels);
    if in_channels != z && in_channels != image_to_video {
        return mismatch(format!(
            "in_channels {in_channels} is neither the VAE's z_dim {z} (text-to-video) nor {image_to_video} (image-to-video: \
             noise, a {mask_channels}-channel mask and the image's latents)"
        ));
    }
    Ok(())
}

/// An image encoder and the transformer's image embedder come together, as wide as each other.
pub(crate) fn check_image_conditioning(
    dir: &ModelDir,
    transformer: &transformer::Config,
    image_encoder_width: Option<usize>,
) -> Result<()> {
    let reason = match (transformer.image_dim, image_encoder_width) {
        (Some(dim), Some(width)) if dim != width => {
            format!("image_dim {dim} doesn't match the image encoder's hidden_size {width}")
        }
        (Some(dim), None) => format!(
            "image_dim {dim}: the transformer embeds image-encoder tokens, but model_index.json lists no image_encoder"
        ),
        (None, Some(_)) => "model_index.json lists an image_encoder, but the transformer has no image_dim to embed \
                            its tokens with"
            .to_string(),
        _ => return Ok(()),
    };
    Err(Error::Config { path: dir.component("transformer").join("config.json"), reason })
}

fn show(value: Option<&serde_json::Value>) -> String {
    value.map_or_else(|| "nothing".to_string(), |v| v.to_string())
}

/// The registry entry `dir` is, from its `model_index.json` and configs alone (no weights are read); `None`
/// for a model of a supported family that is no entry (a fine-tune with another depth, the tiny test models).
/// An unsupported pipeline is an error.
pub fn identify(dir: &ModelDir) -> Result<Option<&'static ModelManifest>> {
    entry_in(dir, family_of(dir)?)
}

/// The first registry entry of the family whose pipeline `dir`'s `model_index.json` configures: its class,
/// `expand_timesteps`, and which optional networks it has (a low-noise expert, an image encoder).
fn family_of(dir: &ModelDir) -> Result<&'static ModelManifest> {
    let index = dir.model_index()?;
    let layout = Layout::of(|name| index.has_component(name), index.class_name.clone(), index.expand_timesteps);
    models().iter().find(|m| m.layout() == layout).ok_or_else(|| Error::Config {
        path: dir.root().join("model_index.json"),
        reason: format!(
            "{layout} is not supported (supported: {})",
            models().iter().map(|m| m.layout().to_string()).collect::<Vec<_>>().join("; ")
        ),
    })
}

/// What tells the families apart: the pipeline class, `expand_timesteps`, and the optional networks.
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    pipeline_class: String,
    expand_timesteps: bool,
    two_experts: bool,
    image_encoder: bool,
}

impl Layout {
    fn of(has: impl Fn(&str) -> bool, pipeline_class: String, expand_timesteps: bool) -> Self {
        Layout {
            pipeline_class,
            expand_timesteps,
            two_experts: has("transformer_2"),
            image_encoder: has("image_encoder"),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pipeline class {}", self.pipeline_class)?;
        if self.expand_timesteps {
            f.write_str(" with expand_timesteps")?;
        }
        if self.two_experts {
            f.write_str(" with transformer_2")?;
        }
        if self.image_encoder {
            f.write_str(" with an image_encoder")?;
        }
        Ok(())
    }
}

impl ModelManifest {
    fn layout(&self) -> Layout {
        let has = |name: &str| self.components.contains_key(name);
        Layout::of(has, self.pipeline_class.clone(), self.expand_timesteps)
    }
}

/// The registry entry of `family`'s pipeline whose every identifying config value the folder's configs have;
/// of several, the one of the folder's Hugging Face repository, else the first.
fn entry_in(dir: &ModelDir, family: &ModelManifest) -> Result<Option<&'static ModelManifest>> {
    let mut configs: HashMap<&str, serde_json::Value> = HashMap::new();
    let mut matching = Vec::new();
    for model in models().iter().filter(|m| m.layout() == family.layout()) {
        let mut matches = true;
        for (component, expected) in &model.configs {
            if !configs.contains_key(component.as_str()) {
                let file = &model.components[component].files[0];
                configs.insert(component.as_str(), read_json(&dir.component(component).join(file))?);
            }
            let config = &configs[component.as_str()];
            matches &= expected.iter().all(|(key, value)| config.get(key) == Some(value));
        }
        if matches {
            matching.push(model);
        }
    }
    let of_repo = matching.iter().find(|m| dir.repo_id() == Some(m.repo_id.as_str()));
    Ok(of_repo.or(matching.first()).copied())
}

/// Checks the tensors a transformer in folder `component` needs against its files' headers (no data read).
pub(crate) fn check_transformer_weights(
    dir: &ModelDir,
    component: &'static str,
    config: &transformer::Config,
) -> Result<WeightsReport> {
    check_weights(dir, component, |vb| WanTransformer3DModel::new(config, vb).map(drop))
}

/// Builds a network over `component`'s safetensors headers, so that every tensor it asks for is checked.
fn check_weights(
    dir: &ModelDir,
    component: &'static str,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> Result<WeightsReport> {
    let files = dir.weight_files(component)?;
    let mut tensors = HashMap::new();
    for file in &files {
        for (name, info) in read_header(component, file)?.tensors() {
            tensors.insert(name, StoredTensor { file: file.clone(), dtype: info.dtype, shape: info.shape.clone() });
        }
    }
    let backend = HeaderBackend { tensors, used: Default::default() };
    let used = backend.used.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), VERIFY_DTYPE, Device::Cpu);
    build(vb).map_err(|e| Error::Weights { component, path: dir.component(component), reason: e.to_string() })?;
    let used = used.lock().expect("no panic while holding the lock");
    let mut dtypes: Vec<String> = used.values().map(|t| dtype_name(t.dtype).to_string()).collect();
    dtypes.sort();
    dtypes.dedup();
    Ok(WeightsReport {
        component,
        files: files.len(),
        tensors: used.len(),
        parameters: used.values().map(|t| t.shape.iter().product::<usize>() as u64).sum(),
        dtypes,
        file: None,
    })
}

/// What `models verify` says of the single file `path` standing in for `source`'s folder, checked against `config`
/// (every tensor the network reads present with its shape, and nothing else).
fn transformer_file_report(
    source: &TransformerSource,
    path: &Path,
    config: &transformer::Config,
) -> Result<WeightsReport> {
    let file = source.open(path)?;
    file.config(Some(config)).map_err(|e| source.invalid(path, e))?;
    let mut dtypes: Vec<String> = file.stored().map(|(_, stored)| stored.format.name()).collect();
    dtypes.sort();
    dtypes.dedup();
    Ok(WeightsReport {
        component: source.component,
        files: 1,
        tensors: file.shapes().len(),
        parameters: file.shapes().values().map(|dims| dims.iter().product::<usize>() as u64).sum(),
        dtypes,
        file: Some(path.to_path_buf()),
    })
}

/// Builds the VAE over `file`'s headers (a single file in the official Wan layout), so that every tensor it reads
/// is checked, and every tensor of the file read.
fn check_vae_file(file: &Path, cfg: &vae::Config) -> Result<WeightsReport> {
    let invalid =
        |e: candle_core::Error| Error::Weights { component: "vae", path: file.to_path_buf(), reason: e.to_string() };
    let vae_file = vae::single_file::VaeFile::open(file).map_err(invalid)?;
    let shapes: HashMap<String, Vec<usize>> = vae_file.shapes().into_iter().collect();
    let stored = shapes.len();
    let (parameters, tensors) =
        over_shapes(Some(shapes), |vb| AutoencoderKLWan::new(cfg, vb).map(drop)).map_err(invalid)?;
    if tensors != stored {
        return Err(invalid(candle_core::Error::Msg(format!(
            "the VAE reads {tensors} of its {stored} tensors: the file is another VAE than the folder's config says"
        ))));
    }
    let checkpoint = Checkpoint::open(file, &Limits::default()).map_err(invalid)?;
    let mut dtypes: Vec<String> = checkpoint.tensors().values().map(|stored| stored.format.name()).collect();
    dtypes.sort();
    dtypes.dedup();
    Ok(WeightsReport { component: "vae", files: 1, tensors, parameters, dtypes, file: Some(file.to_path_buf()) })
}

/// Builds the text encoder over `file`'s headers (see `umt5::file_weights`), so that every tensor it reads is
/// checked.
fn check_text_encoder_file(file: &Path, cfg: &umt5::Config) -> Result<WeightsReport> {
    let invalid = |e: candle_core::Error| Error::Weights {
        component: "text_encoder",
        path: file.to_path_buf(),
        reason: e.to_string(),
    };
    let (checkpoint, keys) = umt5::file_tensors(file).map_err(invalid)?;
    let shapes: HashMap<String, Vec<usize>> =
        keys.iter().map(|(name, key)| (name.clone(), checkpoint.tensors()[key].dims.clone())).collect();
    let (parameters, tensors) = over_shapes(Some(shapes), |vb| UMT5Encoder::new(cfg, vb).map(drop)).map_err(invalid)?;
    let mut dtypes: Vec<String> = keys.values().map(|key| checkpoint.tensors()[key].format.name()).collect();
    dtypes.sort();
    dtypes.dedup();
    Ok(WeightsReport {
        component: "text_encoder",
        files: 1,
        tensors,
        parameters,
        dtypes,
        file: Some(file.to_path_buf()),
    })
}

/// Parses a safetensors file's header (8-byte length, then JSON) and checks that the file is as long as the
/// header says, without reading past the header.
fn read_header(component: &'static str, path: &Path) -> Result<Metadata> {
    let bad = |reason: String| Error::Weights { component, path: path.to_path_buf(), reason };
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| bad(format!("{file_len} bytes: too short for a safetensors file")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(bad(format!(
            "the header claims {header_len} bytes but the file has {file_len}: truncated or not safetensors"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let metadata: Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
    let expected_len = 8 + header_len + metadata.data_len() as u64;
    if file_len != expected_len {
        return Err(bad(format!("the header describes {expected_len} bytes but the file has {file_len}: truncated?")));
    }
    Ok(metadata)
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::BF16 => "bf16",
        _ => "unsupported",
    }
}

#[derive(Debug, Clone)]
struct StoredTensor {
    file: PathBuf,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// Answers the networks' requests for weights from the headers: a broadcast zero of the requested shape, which
/// allocates one element, after checking that the tensor is stored with that shape in a supported dtype.
struct HeaderBackend {
    tensors: HashMap<String, StoredTensor>,
    /// The tensors the networks asked for, for the report.
    used: Arc<Mutex<HashMap<String, StoredTensor>>>,
}

impl HeaderBackend {
    fn lookup(&self, name: &str, expected: Option<&Shape>) -> candle_core::Result<&StoredTensor> {
        let Some(stored) = self.tensors.get(name) else {
            let shape = expected.map_or_else(String::new, |s| format!(" of shape {:?}", s.dims()));
            candle_core::bail!("tensor {name}{shape} is missing")
        };
        if let Some(expected) = expected {
            if stored.shape != expected.dims() {
                candle_core::bail!(
                    "tensor {name} in {} has shape {:?}, expected {:?}",
                    stored.file.display(),
                    stored.shape,
                    expected.dims()
                )
            }
        }
        if !matches!(stored.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            candle_core::bail!(
                "tensor {name} in {} is stored as {:?}; expected f32, f16 or bf16",
                stored.file.display(),
                stored.dtype
            )
        }
        self.used.lock().expect("no panic while holding the lock").insert(name.to_string(), stored.clone());
        Ok(stored)
    }
}

/// The parameters and tensors the network `build` makes reads, over placeholders (nothing is allocated for them):
/// any tensor it asks for, or with `shapes` only those, each with its shape there.
fn over_shapes(
    shapes: Option<HashMap<String, Vec<usize>>>,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> candle_core::Result<(u64, usize)> {
    struct Shapes {
        shapes: Option<HashMap<String, Vec<usize>>>,
        read: Arc<Mutex<(u64, usize)>>,
    }
    impl SimpleBackend for Shapes {
        fn get(
            &self,
            s: Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            if let Some(shapes) = &self.shapes {
                match shapes.get(name) {
                    None => candle_core::bail!("no tensor `{name}`"),
                    Some(dims) if dims.as_slice() != s.dims() => {
                        candle_core::bail!("`{name}` has shape {dims:?}, where the network's is {:?}", s.dims())
                    }
                    Some(_) => {}
                }
            }
            let mut read = self.read.lock().unwrap_or_else(|p| p.into_inner());
            *read = (read.0 + s.elem_count() as u64, read.1 + 1);
            placeholder(s.dims(), dtype, dev)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("`{name}` read without a shape")
        }

        fn contains_tensor(&self, name: &str) -> bool {
            self.shapes.as_ref().is_none_or(|shapes| shapes.contains_key(name))
        }
    }
    let read = Arc::new(Mutex::new((0, 0)));
    build(VarBuilder::from_backend(Box::new(Shapes { shapes, read: read.clone() }), VERIFY_DTYPE, Device::Cpu))?;
    let read = *read.lock().unwrap_or_else(|p| p.into_inner());
    Ok(read)
}

fn placeholder(shape: &[usize], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
}

impl SimpleBackend for HeaderBackend {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.lookup(name, Some(&s))?;
        placeholder(s.dims(), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self.lookup(name, None)?.shape.clone();
        placeholder(&shape, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distill_recipes_parse_and_match_lora_names() {
        let [recipe, fastwan] = distill_recipes() else { panic!("two recipes") };
        assert_eq!((recipe.schedule.len(), recipe.shift, recipe.guidance_scale), (4, 5.0, 1.0));
        assert_eq!(fastwan.schedule, Schedule::Dmd(vec![1000.0, 757.0, 522.0]));
        for name in [
            "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
            "Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors",
        ] {
            assert!(recipe.matches_lora(Path::new(name)), "{name}");
        }
        assert!(
            !recipe.matches_lora(Path::new("/loras/lightx2v/style.safetensors")),
            "the file's name, not its folder"
        );
    }

    #[test]
    fn every_manifest_parses_and_names_its_configs_components() {
        assert_eq!(models().len(), MANIFESTS.len());
        for m in models() {
            for component in m.configs.keys() {
                let files = &m.components.get(component).expect("configs name a component").files;
                assert!(
                    files.first().is_some_and(|f| f.ends_with(".json")),
                    "{}: {component} lists its config first",
                    m.id
                );
            }
            assert_eq!(m.defaults.num_frames % 4, 1, "{}", m.id);
        }
    }

    #[test]
    fn defaults_set_what_the_registry_recommends() {
        let ti2v = models().iter().find(|m| m.id == "wan2.2-ti2v-5b").unwrap();
        let mut request = GenerateRequest { prompt: "fox".into(), seed: 9, ..Default::default() };
        ti2v.defaults.apply(&mut request);
        let set = |r: &GenerateRequest| (r.width, r.height, r.num_frames, r.fps, r.steps, r.guidance_scale, r.shift);
        assert_eq!(set(&request), (1280, 704, 121, 24, 50, 5.0, Some(5.0)));
        assert_eq!((request.prompt.as_str(), request.seed, request.max_sequence_length), ("fox", 9, 512));

        // The request's own defaults, taken for a folder that is no entry, are Wan 2.1's but for the shift,
        // which they leave to the scheduler config.
        let mut wan21 = GenerateRequest::default();
        models()[0].defaults.apply(&mut wan21);
        assert_eq!(set(&wan21), set(&GenerateRequest { shift: Some(3.0), ..Default::default() }));
    }

    /// A folder holding only the configs of `model`, with `transformer.num_layers` set to `layers`.
    fn configs_of(model: &ModelManifest, layers: usize) -> (tempfile::TempDir, ModelDir) {
        let tmp = tempfile::tempdir().unwrap();
        write_configs(model, layers, tmp.path());
        let dir = ModelDir::from_path(tmp.path()).unwrap();
        (tmp, dir)
    }

    fn write_configs(model: &ModelManifest, layers: usize, root: &Path) {
        std::fs::create_dir_all(root).unwrap();
        std::fs::write(root.join("model_index.json"), "{}").unwrap();
        for (component, values) in &model.configs {
            let mut values = values.clone();
            if component == "transformer" {
                values.insert("num_layers".into(), layers.into());
            }
            let dir = root.join(component);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(&model.components[component].files[0]), serde_json::to_string(&values).unwrap())
                .unwrap();
        }
    }

    /// Each entry is identified by its configs, or, where an earlier entry has the very same configs (Wan 2.1
    /// I2V 480P and 720P), as that one; one more layer is no entry.
    #[test]
    fn a_model_is_identified_by_all_its_config_values() {
        for m in models() {
            let layers = m.configs["transformer"]["num_layers"].as_u64().unwrap() as usize;
            let (_tmp, dir) = configs_of(m, layers);
            let found = entry_in(&dir, m).unwrap().expect("an entry");
            assert!(found.id == m.id || found.configs == m.configs, "{} identified as {}", m.id, found.id);
            let (_tmp, dir) = configs_of(m, layers + 1);
            assert!(entry_in(&dir, m).unwrap().is_none(), "{}", m.id);
        }
    }

    /// Entries with the same configs are told apart by the Hugging Face repository a cached folder is from.
    #[test]
    fn a_cached_folder_is_the_entry_of_its_repository() {
        let cache = tempfile::tempdir().unwrap();
        for id in ["wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"] {
            let m = models().iter().find(|m| m.id == id).unwrap();
            let repo = cache.path().join(format!("models--{}", m.repo_id.replace('/', "--")));
            write_configs(m, 40, &repo.join("snapshots").join("0123abc"));
            let dir = ModelDir::from_hf_cache(&m.repo_id, cache.path()).unwrap();
            assert_eq!(entry_in(&dir, m).unwrap().map(|found| found.id.as_str()), Some(id));
        }
    }
}
