//! Wan transformers from one checkpoint file (safetensors in f32/f16/bf16 or FP8, or GGUF: see [`crate::checkpoint`])
//! in the official Wan layout (the Wan repository's names,
//! `blocks.0.self_attn.q.weight`, `head.modulation`, …, maybe behind ComfyUI's `model.diffusion_model.`), read as
//! diffusers' `WanTransformer3DModel.from_single_file` reads them, and served under the transformer's own names so
//! that [`WanTransformer3DModel::new`] loads them unchanged.
//!
//! Reference: diffusers 0.42.1, `convert_wan_transformer_to_diffusers` and `infer_diffusers_model_type`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/single_file_utils.py>) and
//! `FromOriginalModelMixin.from_single_file`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/single_file_model.py>).
//!
//! **Names.** The file's keys are renamed by [`super::original_names`]' table (diffusers' converter, but that
//! `img_emb.emb_pos`, the FLF2V position embedding, becomes `condition_embedder.image_embedder.pos_embed` as in
//! diffusers' conversion script: diffusers 0.42.1's single-file converter leaves it unrenamed, drops it as unexpected
//! and fails on the meta tensor it leaves behind). Where some key starts with `model.diffusion_model.` (diffusers'
//! test: `model.diffusion_model.patch_embedding.weight`) the transformer's keys are the ones behind that prefix and
//! the others, another component's (a ComfyUI checkpoint may carry the VAE and the text encoder), are left out and
//! listed by [`SingleFile::ignored`], as diffusers leaves them out. Unlike diffusers, which warns of keys it does not
//! know and goes on, a transformer key outside the table is refused: it is a part this model would silently lack
//! (VACE's `vace_blocks`, Animate's `motion_encoder`).
//!
//! **Config.** The head count is in no tensor (the RMSNorms and projections are all `[width]` or `[width, width]`), so
//! diffusers takes a released model's config: its `infer_diffusers_model_type` looks at `patch_embedding.weight`
//! alone (width 1536 → Wan 2.1 T2V 1.3B; width 5120 with 16 input channels → T2V 14B; anything else → I2V 14B
//! 480P), which hands Wan 2.2 TI2V 5B, Wan 2.2 I2V A14B and Wan 2.1 FLF2V the I2V 14B config, none of which then
//! loads. Here every shape the file fixes (width, layers, input and output channels, patch, feed-forward, text and
//! time widths, the cross-attention norm, the image embedder and its position embedding) must be those of one of
//! [`VARIANTS`], the released transformers (head dim 128), whose config is then taken whole; any other file needs its
//! config given ([`SingleFile::config`], [`load`]), and the error says what the tensors show. A config, given or
//! chosen, must account for every tensor of the file with its shape, and the file for every tensor the config's
//! model reads ([`check_config`]).
//!
//! **Compact weights.** Linear weights stored FP8 or quantized are served compact ([`SingleFile::into_weights`]'s
//! [`Compact`]) and dequantized by their layers as they run; every other tensor is read dense.
//!
//! **Untrusted files.** The header is bounded ([`Limits`]) before it is parsed, tensors must be floating point, FP8
//! or a ggml type, and every error names the file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::original_names::{tensor_to_diffusers, tensor_to_original};
use super::transformer::{Config, WanTransformer3DModel};
use crate::checkpoint::{listed, renamed_weights, Checkpoint, Stored};
use crate::compact::Compact;
use crate::lora::Targets;

/// The prefix ComfyUI saves a checkpoint's diffusion model under.
pub const COMFYUI_PREFIX: &str = "model.diffusion_model.";

pub use crate::checkpoint::Limits;

/// A released Wan transformer: its name and the registry manifest (`models/registry/`) whose
/// `configs.transformer` is its config (diffusers' `config.json`).
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    /// Fields the manifest leaves out take [`Config`]'s defaults (diffusers'), which are the released configs'
    /// values: `eps` 1e-6, `rope_max_seq_len` 1024, `qk_norm` "rms_norm_across_heads", `cross_attn_norm` true.
    manifest: &'static str,
}

impl Variant {
    pub fn config(&self) -> Config {
        let manifest: serde_json::Value = serde_json::from_str(self.manifest).expect("the registry's manifests parse");
        serde_json::from_value(manifest["configs"]["transformer"].clone()).expect("the registry's configs parse")
    }
}

macro_rules! registry {
    ($file:literal) => {
        include_str!(concat!("../../../../models/registry/", $file))
    };
}

/// The released Wan transformers (the two experts of Wan 2.2 T2V A14B have Wan 2.1 T2V 14B's config, and Wan 2.1
/// I2V 480P and 720P the same).
pub const VARIANTS: [Variant; 6] = [
    Variant { name: "Wan 2.1 T2V 1.3B", manifest: registry!("wan2.1-t2v-1.3b.json") },
    Variant { name: "Wan 2.1 T2V 14B (or a Wan 2.2 T2V A14B expert)", manifest: registry!("wan2.1-t2v-14b.json") },
    Variant { name: "Wan 2.1 I2V 14B (480P or 720P)", manifest: registry!("wan2.1-i2v-14b-480p.json") },
    Variant { name: "Wan 2.1 FLF2V 14B 720P", manifest: registry!("wan2.1-flf2v-14b-720p.json") },
    Variant { name: "Wan 2.2 TI2V 5B", manifest: registry!("wan2.2-ti2v-5b.json") },
    Variant { name: "Wan 2.2 I2V A14B expert", manifest: registry!("wan2.2-i2v-a14b.json") },
];

/// What a transformer's tensors fix of its config (all but the head count, `eps` and the rotary tables' length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub width: usize,
    pub num_layers: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: [usize; 3],
    pub ffn_dim: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub cross_attn_norm: bool,
    /// The image embedder's input width (`image_dim`), where there is one.
    pub image_dim: Option<usize>,
    /// The image key/value projections' input width (`added_kv_proj_dim`), where there are some.
    pub added_kv_proj_dim: Option<usize>,
    /// The image embedder's position embedding's length (`pos_embed_seq_len`, FLF2V).
    pub pos_embed_seq_len: Option<usize>,
}

/// `name`'s shape, of `rank` dimensions.
fn dims<'a>(shapes: &'a HashMap<String, Vec<usize>>, name: &str, rank: usize) -> Result<&'a [usize]> {
    match shapes.get(name) {
        None => bail!("no `{name}`{}", official(name)),
        Some(dims) if dims.len() != rank => {
            bail!("`{name}`{} has shape {dims:?}, not of {rank} dimensions", official(name))
        }
        Some(dims) => Ok(dims),
    }
}

/// ` (official \`…\`)` after a transformer's tensor name, where the official name differs.
fn official(name: &str) -> String {
    match tensor_to_original(name) {
        Some(original) if original != name => format!(" (official `{original}`)"),
        _ => String::new(),
    }
}

impl Found {
    /// From the transformer's tensors, by its own (diffusers') names.
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let patch = dims(shapes, "patch_embedding.weight", 5)?;
        let (width, in_channels, patch_size) = (patch[0], patch[1], [patch[2], patch[3], patch[4]]);
        let volume: usize = patch_size.iter().product();
        let proj_out = dims(shapes, "proj_out.weight", 2)?;
        if volume == 0 || proj_out[0] % volume != 0 {
            bail!(
                "`proj_out.weight` (official `head.head.weight`) has shape {proj_out:?}, its rows not a multiple of \
                 the patch volume {volume}"
            )
        }
        let num_layers = shapes
            .keys()
            .filter_map(|name| name.strip_prefix("blocks.")?.split_once('.')?.0.parse::<usize>().ok())
            .max()
            .map_or(0, |last| last + 1);
        if num_layers == 0 {
            bail!("no blocks (`blocks.0.…`)")
        }
        let optional = |name: &str, rank: usize, axis: usize| -> Result<Option<usize>> {
            Ok(if shapes.contains_key(name) { Some(dims(shapes, name, rank)?[axis]) } else { None })
        };
        Ok(Self {
            width,
            num_layers,
            in_channels,
            out_channels: proj_out[0] / volume,
            patch_size,
            ffn_dim: dims(shapes, "blocks.0.ffn.net.0.proj.weight", 2)?[0],
            text_dim: dims(shapes, "condition_embedder.text_embedder.linear_1.weight", 2)?[1],
            freq_dim: dims(shapes, "condition_embedder.time_embedder.linear_1.weight", 2)?[1],
            cross_attn_norm: shapes.contains_key("blocks.0.norm2.weight"),
            image_dim: optional("condition_embedder.image_embedder.norm1.weight", 1, 0)?,
            added_kv_proj_dim: optional("blocks.0.attn2.add_k_proj.weight", 2, 1)?,
            pos_embed_seq_len: optional("condition_embedder.image_embedder.pos_embed", 3, 1)?,
        })
    }

    /// What `cfg`'s model would show.
    pub fn of_config(cfg: &Config) -> Result<Self> {
        Self::from_shapes(&model_shapes(cfg)?.into_iter().collect())
    }
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "width {}, {} layers, in_channels {}, out_channels {}, patch {:?}, ffn_dim {}, text_dim {}, freq_dim {}, \
             {}",
            self.width,
            self.num_layers,
            self.in_channels,
            self.out_channels,
            self.patch_size,
            self.ffn_dim,
            self.text_dim,
            self.freq_dim,
            if self.cross_attn_norm { "cross-attention norm" } else { "no cross-attention norm" },
        )?;
        let or_none = |x: Option<usize>| x.map_or_else(|| "none".to_string(), |x| x.to_string());
        match (self.image_dim, self.added_kv_proj_dim) {
            (None, None) => write!(f, ", no image embedder")?,
            (image_dim, kv) => {
                write!(f, ", image embedder (image_dim {}, added_kv_proj_dim {})", or_none(image_dim), or_none(kv))?
            }
        }
        if let Some(len) = self.pos_embed_seq_len {
            write!(f, ", pos_embed of {len} positions")?;
        }
        Ok(())
    }
}

/// Every tensor `WanTransformer3DModel::new(cfg, …)` reads, by name, with its shape; nothing is allocated for them.
pub fn model_shapes(cfg: &Config) -> Result<BTreeMap<String, Vec<usize>>> {
    let recorder = Recorder::default();
    let seen = recorder.seen.clone();
    WanTransformer3DModel::new(cfg, VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu))?;
    let seen = seen.lock().map_err(|_| Error::Msg("the shape recorder's lock is poisoned".into()))?;
    Ok(seen.clone())
}

/// A backend that notes each tensor asked for and hands back zeros broadcast to its shape (one element).
#[derive(Default)]
struct Recorder {
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.seen
            .lock()
            .map_err(|_| Error::Msg("the shape recorder's lock is poisoned".into()))?
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        bail!("the Wan transformer asked for `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Checks that `cfg`'s model reads exactly the tensors of `shapes` (the transformer's names), each with its shape.
pub fn check_config(cfg: &Config, shapes: &HashMap<String, Vec<usize>>) -> Result<()> {
    let want = model_shapes(cfg)?;
    let missing: Vec<&str> = want.keys().filter(|n| !shapes.contains_key(*n)).map(String::as_str).collect();
    let mut extra: Vec<&str> = shapes.keys().filter(|n| !want.contains_key(*n)).map(String::as_str).collect();
    extra.sort_unstable();
    let misfits: Vec<String> = want
        .iter()
        .filter_map(|(name, dims)| {
            let got = shapes.get(name)?;
            (got != dims).then(|| format!("`{name}`{} is {got:?}, not {dims:?}", official(name)))
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && misfits.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    if !misfits.is_empty() {
        let more = if misfits.len() > 4 { format!(" and {} more", misfits.len() - 4) } else { String::new() };
        problems.push(format!("shapes differ: {}{more}", misfits[..misfits.len().min(4)].join(", ")));
    }
    if !missing.is_empty() {
        problems.push(format!("{} tensor(s) it reads are missing: {}", missing.len(), listed(missing, 6)));
    }
    if !extra.is_empty() {
        problems.push(format!("{} tensor(s) it does not read: {}", extra.len(), listed(extra, 6)));
    }
    let found = Found::from_shapes(shapes).map_or_else(|e| format!("unreadable: {e}"), |f| f.to_string());
    let theirs = Found::of_config(cfg).map_or_else(|e| format!("unreadable: {e}"), |f| f.to_string());
    bail!(
        "the config ({} heads × {}; {theirs}) does not fit the tensors ({found}): {}",
        cfg.num_attention_heads,
        cfg.attention_head_dim,
        problems.join("; ")
    )
}

/// The released variant whose tensors `shapes` (the transformer's names) show, if any: the one whose every shape the
/// tensors fix is the same.
pub fn released_variant(shapes: &HashMap<String, Vec<usize>>) -> Result<Option<&'static Variant>> {
    let found = Found::from_shapes(shapes)?;
    for variant in &VARIANTS {
        if Found::of_config(&variant.config())? == found {
            return Ok(Some(variant));
        }
    }
    Ok(None)
}

/// The config of the released transformer whose tensors `shapes` (the transformer's names) are, checked tensor by
/// tensor; fails, saying what the tensors show, when they are no released transformer's.
pub fn config_from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Config> {
    let Some(variant) = released_variant(shapes)? else {
        bail!(
            "its tensors ({}) are those of no released Wan transformer ({}), and the head count is in no tensor: \
             give the transformer's config (diffusers' `config.json`, beside the file or passed explicitly)",
            Found::from_shapes(shapes)?,
            VARIANTS.map(|v| v.name).join(", ")
        )
    };
    let cfg = variant.config();
    check_config(&cfg, shapes).map_err(|e| Error::Msg(format!("its shapes are {}'s, but {e}", variant.name)))?;
    Ok(cfg)
}

/// One checkpoint file in the official layout (safetensors, FP8 or GGUF; see [`crate::checkpoint`]), its header
/// read and its names mapped; the data is read as [`Self::into_weights`]' tensors are asked for.
pub struct SingleFile {
    path: PathBuf,
    checkpoint: Arc<Checkpoint>,
    /// The transformer's name → the file's key.
    keys: HashMap<String, String>,
    /// The transformer's name → shape.
    shapes: HashMap<String, Vec<usize>>,
    prefixed: bool,
    ignored: Vec<String>,
}

impl fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("tensors", &self.keys.len())
            .field("prefixed", &self.prefixed)
            .field("ignored", &self.ignored.len())
            .finish()
    }
}

/// What a file whose keys are not the official transformer's might be instead.
fn hint(unknown: &[&str]) -> &'static str {
    if unknown.iter().any(|k| k.starts_with("vace_")) {
        " (a VACE transformer, which is not supported)"
    } else if unknown.iter().any(|k| k.starts_with("motion_encoder.") || k.starts_with("face_adapter.")) {
        " (a Wan Animate transformer, which is not supported)"
    } else if unknown.iter().all(|k| tensor_to_original(k).is_some()) {
        " (diffusers' names: load the diffusers folder instead)"
    } else {
        ""
    }
}

impl SingleFile {
    /// Opens `path` within the default [`Limits`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_limits(path, &Limits::default())
    }

    /// Opens `path` (untrusted): bounds the header, maps the names, refuses keys that are no tensor of the Wan
    /// transformer and tensors that are not floating point; every error names the file.
    pub fn open_with_limits(path: &Path, limits: &Limits) -> Result<Self> {
        Self::open_inner(path, limits)
            .map_err(|e| Error::Msg(format!("Wan transformer single file {}: {e}", path.display())))
    }

    fn open_inner(path: &Path, limits: &Limits) -> Result<Self> {
        let checkpoint = Checkpoint::open(path, limits)?;
        if let Some(architecture) = checkpoint.architecture().filter(|a| *a != "wan") {
            bail!("its GGUF architecture is {architecture:?}, not \"wan\": not a Wan transformer")
        }
        let tensors = checkpoint.tensors();
        let prefixed = tensors.keys().any(|key| key.starts_with(COMFYUI_PREFIX));
        let (mut keys, mut shapes) = (HashMap::new(), HashMap::new());
        let (mut ignored, mut unknown) = (checkpoint.ignored().to_vec(), Vec::new());
        for (key, stored) in tensors {
            let name = if prefixed {
                match key.strip_prefix(COMFYUI_PREFIX) {
                    Some(name) => name,
                    None => {
                        ignored.push(key.clone());
                        continue;
                    }
                }
            } else {
                key.as_str()
            };
            let Some(ours) = tensor_to_diffusers(name) else {
                unknown.push(name);
                continue;
            };
            shapes.insert(ours.clone(), stored.dims.clone());
            keys.insert(ours, key.clone());
        }
        if !unknown.is_empty() {
            unknown.sort_unstable();
            bail!(
                "{} key(s) name no tensor of the Wan transformer in the official layout{}: {}",
                unknown.len(),
                hint(&unknown),
                listed(unknown.iter().copied(), 8)
            )
        }
        ignored.sort_unstable();
        Ok(Self { path: path.to_path_buf(), checkpoint, keys, shapes, prefixed, ignored })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the transformer's keys are behind [`COMFYUI_PREFIX`].
    pub fn is_prefixed(&self) -> bool {
        self.prefixed
    }

    /// The keys left out: another component's (those outside [`COMFYUI_PREFIX`] in a file that uses it), and
    /// scaled FP8's marker and input scales.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The transformer's tensors by its own names, with their shapes.
    pub fn shapes(&self) -> &HashMap<String, Vec<usize>> {
        &self.shapes
    }

    /// The transformer's tensors, for reading LoRA adapters against ([`crate::wan::lora::read_adapter`]).
    pub fn targets(&self) -> Targets {
        Targets::new(self.shapes.iter().map(|(name, dims)| (name.clone(), dims.clone())))
    }

    /// The released variant the tensors are, if any.
    pub fn variant(&self) -> Result<Option<&'static Variant>> {
        released_variant(&self.shapes).map_err(|e| self.context(e))
    }

    /// The transformer's config: `explicit`, checked against the tensors, or, without one, the released variant's
    /// the tensors show ([`config_from_shapes`]).
    pub fn config(&self, explicit: Option<&Config>) -> Result<Config> {
        match explicit {
            Some(cfg) => check_config(cfg, &self.shapes).map(|()| cfg.clone()),
            None => config_from_shapes(&self.shapes),
        }
        .map_err(|e| self.context(e))
    }

    /// The transformer's tensors by its own names, as the file stores them.
    pub fn stored(&self) -> impl Iterator<Item = (&str, &Stored)> {
        self.keys.iter().map(|(name, key)| (name.as_str(), &self.checkpoint.tensors()[key]))
    }

    /// Its tensors' formats: `Q4_K ×400, F32 ×615`.
    pub fn format_summary(&self) -> String {
        self.checkpoint.format_summary()
    }

    /// Whether some linear weights are stored compact (FP8 or quantized), kept so by [`Self::into_weights`].
    pub fn is_compact(&self) -> bool {
        self.checkpoint.tensors().values().any(|stored| stored.format.is_compact())
    }

    /// A `VarBuilder` serving the file's tensors under the transformer's names, dense, converted to `dtype` (or to
    /// the dtype the model asks for) on `device` as they are read; and the linear weights stored FP8 or quantized,
    /// kept compact. For [`WanTransformer3DModel::with_compact`], alone or under
    /// [`crate::lora::merged_var_builder`].
    pub fn into_weights(self, dtype: DType, device: &Device) -> (VarBuilder<'static>, Compact) {
        let label = format!("Wan transformer single file {}", self.path.display());
        renamed_weights(self.checkpoint, self.keys, label, official, dtype, device)
    }

    fn context(&self, e: Error) -> Error {
        Error::Msg(format!("Wan transformer single file {}: {e}", self.path.display()))
    }
}

/// The config a single file comes with: a `config.json` in its folder (diffusers' `WanTransformer3DModel` config),
/// if there is one.
pub fn sibling_config(path: &Path) -> Result<Option<Config>> {
    let Some(config) = path.parent().map(|dir| dir.join("config.json")).filter(|c| c.is_file()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&config)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Msg(format!("{}: not a Wan transformer config: {e}", config.display())))
}

/// Opens a single-file checkpoint and its config: `config` if given, else the `config.json` beside the file
/// ([`sibling_config`]), else the released variant its tensors show; every config is checked against the tensors.
pub fn load(
    path: &Path,
    config: Option<&Config>,
    dtype: DType,
    device: &Device,
) -> Result<(Config, VarBuilder<'static>, Compact)> {
    let file = SingleFile::open(path)?;
    let sibling = match config {
        Some(_) => None,
        None => sibling_config(path)?,
    };
    let config = file.config(config.or(sibling.as_ref()))?;
    let (vb, compact) = file.into_weights(dtype, device);
    Ok((config, vb, compact))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The tiny Wan 2.1 I2V transformer's config (the shapes of `models/tiny/wan21-i2v-tiny`).
    fn tiny_i2v() -> Config {
        serde_json::from_str(
            r#"{"num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 36, "out_channels": 16,
                "text_dim": 32, "freq_dim": 16, "ffn_dim": 64, "num_layers": 2, "image_dim": 24,
                "added_kv_proj_dim": 64}"#,
        )
        .unwrap()
    }

    fn as_hash(shapes: BTreeMap<String, Vec<usize>>) -> HashMap<String, Vec<usize>> {
        shapes.into_iter().collect()
    }

    /// The registry's transformer configs, by registry id and component (`transformer`, `transformer_2`), but the
    /// VACE models': a single VACE file is refused by name (`unknown_keys_are_refused_by_name`), not inferred.
    fn registry() -> Vec<(String, Config)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/registry");
        let mut out = Vec::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files {
            let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
            let id = json["id"].as_str().unwrap();
            for component in ["transformer", "transformer_2"] {
                if let Some(cfg) = json["configs"].get(component).filter(|cfg| cfg.get("vace_layers").is_none()) {
                    out.push((format!("{id} {component}"), serde_json::from_value(cfg.clone()).unwrap()));
                }
            }
        }
        out
    }

    /// The variant each registry entry must be recognized as.
    fn expected_variant(id: &str) -> &'static str {
        match id.split(' ').next().unwrap() {
            "wan2.1-t2v-1.3b" => "Wan 2.1 T2V 1.3B",
            "wan2.1-t2v-14b" | "wan2.2-t2v-a14b" => "Wan 2.1 T2V 14B (or a Wan 2.2 T2V A14B expert)",
            "wan2.1-i2v-14b-480p" | "wan2.1-i2v-14b-720p" => "Wan 2.1 I2V 14B (480P or 720P)",
            "wan2.1-flf2v-14b-720p" => "Wan 2.1 FLF2V 14B 720P",
            "wan2.2-ti2v-5b" => "Wan 2.2 TI2V 5B",
            "wan2.2-i2v-a14b" => "Wan 2.2 I2V A14B expert",
            other => panic!("a registry entry this test does not know: {other}"),
        }
    }

    /// A released transformer's tensors, renamed to the official layout and back (as [`SingleFile::open`] does),
    /// give that transformer's config: every registry config, from the shapes alone.
    #[test]
    fn released_configs_are_inferred_from_shapes() -> Result<()> {
        let registry = registry();
        assert_eq!(registry.len(), 10);
        for (id, cfg) in registry {
            let official: Vec<(String, Vec<usize>)> = model_shapes(&cfg)?
                .into_iter()
                .map(|(name, dims)| (tensor_to_original(&name).unwrap(), dims))
                .collect();
            let shapes: HashMap<String, Vec<usize>> =
                official.into_iter().map(|(name, dims)| (tensor_to_diffusers(&name).unwrap(), dims)).collect();
            assert_eq!(released_variant(&shapes)?.map(|v| v.name), Some(expected_variant(&id)), "{id}");
            assert_eq!(config_from_shapes(&shapes)?, cfg, "{id}");
        }
        Ok(())
    }

    #[test]
    fn the_variants_are_told_apart() -> Result<()> {
        let found: Vec<Found> = VARIANTS.iter().map(|v| Found::of_config(&v.config())).collect::<Result<_>>()?;
        for (i, a) in found.iter().enumerate() {
            for b in &found[i + 1..] {
                assert_ne!(a, b);
            }
        }
        Ok(())
    }

    /// diffusers' names for the official layout's tensors of a released 14B I2V model: a few by hand.
    #[test]
    fn released_i2v_tensors_have_their_official_names() -> Result<()> {
        let shapes = model_shapes(&VARIANTS[2].config())?;
        assert_eq!(shapes.len(), 1303);
        for (name, dims) in [
            ("patch_embedding.weight", vec![5120, 36, 1, 2, 2]),
            ("blocks.39.scale_shift_table", vec![1, 6, 5120]),
            ("blocks.0.attn2.add_k_proj.weight", vec![5120, 5120]),
            ("blocks.0.norm2.weight", vec![5120]),
            ("scale_shift_table", vec![1, 2, 5120]),
            ("condition_embedder.image_embedder.norm1.weight", vec![1280]),
            ("condition_embedder.time_proj.weight", vec![30720, 5120]),
            ("proj_out.weight", vec![64, 5120]),
        ] {
            assert_eq!(shapes[name], dims, "{name}");
        }
        Ok(())
    }

    #[test]
    fn shapes_of_no_release_name_what_they_show() -> Result<()> {
        let shapes = as_hash(model_shapes(&tiny_i2v())?);
        let msg = config_from_shapes(&shapes).unwrap_err().to_string();
        for part in [
            "width 64",
            "2 layers",
            "in_channels 36",
            "out_channels 16",
            "image embedder (image_dim 24, added_kv_proj_dim 64)",
            "head count",
            "Wan 2.1 T2V 1.3B",
        ] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
        assert!(!msg.contains("pos_embed"), "{msg}");
        // Given, the config is checked and taken.
        check_config(&tiny_i2v(), &shapes)?;
        Ok(())
    }

    /// A released model's shapes with a tensor missing: the variant is named, and the tensor.
    #[test]
    fn a_released_model_with_a_tensor_missing_names_it() -> Result<()> {
        let mut shapes = as_hash(model_shapes(&VARIANTS[0].config())?);
        shapes.remove("blocks.7.attn1.to_q.weight");
        let msg = config_from_shapes(&shapes).unwrap_err().to_string();
        assert!(msg.contains("Wan 2.1 T2V 1.3B"), "{msg}");
        assert!(msg.contains("`blocks.7.attn1.to_q.weight`"), "{msg}");
        Ok(())
    }

    #[test]
    fn a_config_that_does_not_fit_is_refused_by_tensor() -> Result<()> {
        let shapes = as_hash(model_shapes(&tiny_i2v())?);
        // Another head split of the same width fits: the heads are in no tensor.
        let mut cfg = tiny_i2v();
        (cfg.num_attention_heads, cfg.attention_head_dim) = (4, 16);
        check_config(&cfg, &shapes)?;
        // Another feed-forward width does not.
        let mut cfg = tiny_i2v();
        cfg.ffn_dim = 48;
        let msg = check_config(&cfg, &shapes).unwrap_err().to_string();
        assert!(
            msg.contains(
                "`blocks.0.ffn.net.0.proj.weight` (official `blocks.0.ffn.0.weight`) is [64, 64], not [48, 64]"
            ),
            "{msg}"
        );
        // Without the image embedder, its tensors are read by nothing.
        let mut cfg = tiny_i2v();
        (cfg.image_dim, cfg.added_kv_proj_dim) = (None, None);
        let msg = check_config(&cfg, &shapes).unwrap_err().to_string();
        assert!(msg.contains("does not read") && msg.contains("`blocks.0.attn2.add_k_proj.bias`"), "{msg}");
        // With a position embedding the file lacks.
        let mut cfg = tiny_i2v();
        cfg.pos_embed_seq_len = Some(34);
        let msg = check_config(&cfg, &shapes).unwrap_err().to_string();
        assert!(msg.contains("missing: `condition_embedder.image_embedder.pos_embed`"), "{msg}");
        Ok(())
    }

    fn write(dir: &Path, name: &str, tensors: &[(String, Tensor)]) -> PathBuf {
        let path = dir.join(name);
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// The tiny I2V model's tensors (random), by official names behind `prefix`.
    fn official_tensors(prefix: &str) -> Result<Vec<(String, Tensor)>> {
        model_shapes(&tiny_i2v())?
            .into_iter()
            .map(|(name, dims)| {
                let t = Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?;
                Ok((format!("{prefix}{}", tensor_to_original(&name).unwrap()), t))
            })
            .collect()
    }

    #[test]
    fn a_comfyui_file_leaves_the_other_components_out() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = official_tensors(COMFYUI_PREFIX)?;
        let vae = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        tensors.push(("first_stage_model.decoder.conv_in.weight".to_string(), vae.clone()));
        tensors.push(("cond_stage_model.transformer.shared.weight".to_string(), vae));
        let path = write(dir.path(), "comfy.safetensors", &tensors);
        let file = SingleFile::open(&path)?;
        assert!(file.is_prefixed());
        assert_eq!(
            file.ignored(),
            ["cond_stage_model.transformer.shared.weight", "first_stage_model.decoder.conv_in.weight"]
        );
        let cfg = file.config(Some(&tiny_i2v()))?;
        let want = tensors.iter().find(|(k, _)| k.ends_with("blocks.1.norm3.weight")).unwrap().1.clone();
        let vb = file.into_weights(DType::F32, &Device::Cpu).0;
        let got = vb.get(64, "blocks.1.norm2.weight")?;
        assert_eq!(got.to_vec1::<f32>()?, want.to_vec1::<f32>()?);
        WanTransformer3DModel::new(&cfg, vb)?;
        Ok(())
    }

    #[test]
    fn unknown_keys_are_refused_by_name() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = official_tensors("")?;
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        tensors.push(("vace_blocks.0.after_proj.weight".to_string(), t.clone()));
        let path = write(dir.path(), "vace.safetensors", &tensors);
        let msg = SingleFile::open(&path).unwrap_err().to_string();
        assert!(msg.contains("vace.safetensors") && msg.contains("`vace_blocks.0.after_proj.weight`"), "{msg}");
        assert!(msg.contains("VACE"), "{msg}");

        let diffusers = [("blocks.0.attn1.to_q.weight".to_string(), t.clone()), ("proj_out.weight".to_string(), t)];
        let path = write(dir.path(), "diffusers.safetensors", &diffusers);
        let msg = SingleFile::open(&path).unwrap_err().to_string();
        assert!(msg.contains("diffusers folder"), "{msg}");
        Ok(())
    }

    #[test]
    fn non_float_tensors_are_refused_by_name() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = official_tensors("")?;
        tensors.push(("head.modulation".to_string(), Tensor::zeros((1, 2, 64), DType::I64, &Device::Cpu)?));
        tensors.retain(|(k, t)| k != "head.modulation" || t.dtype() == DType::I64);
        let path = write(dir.path(), "ints.safetensors", &tensors);
        let msg = SingleFile::open(&path).unwrap_err().to_string();
        assert!(msg.contains("`head.modulation` is I64"), "{msg}");
        Ok(())
    }

    #[test]
    fn limits_are_checked_before_parsing() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "ok.safetensors", &official_tensors("")?);
        let open = |limits| SingleFile::open_with_limits(&path, &limits).unwrap_err().to_string();
        let msg = open(Limits { max_header_bytes: 100, ..Default::default() });
        assert!(msg.contains("ok.safetensors") && msg.contains("over the limit of 100"), "{msg}");
        let msg = open(Limits { max_tensors: 10, ..Default::default() });
        assert!(msg.contains("tensors, over the limit of 10"), "{msg}");

        // A header length past the end of the file, and a file too short to have one.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let lying = dir.path().join("lying.safetensors");
        std::fs::write(&lying, &bytes).unwrap();
        let msg = SingleFile::open(&lying).unwrap_err().to_string();
        assert!(msg.contains("lying.safetensors") && msg.contains("not a safetensors or GGUF file"), "{msg}");
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, [1, 2, 3]).unwrap();
        let msg = SingleFile::open(&short).unwrap_err().to_string();
        assert!(msg.contains("not a safetensors or GGUF file: 3 bytes"), "{msg}");
        Ok(())
    }

    /// A shape the config does not expect is named with the file's key when the model reads it.
    #[test]
    fn a_misshapen_tensor_is_named_when_read() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "tiny.safetensors", &official_tensors(COMFYUI_PREFIX)?);
        let vb = SingleFile::open(&path)?.into_weights(DType::F32, &Device::Cpu).0;
        let msg = vb.get((1, 2, 32), "scale_shift_table").unwrap_err().to_string();
        let want = "`model.diffusion_model.head.modulation` has shape [1, 2, 64], where the network's \
                    `scale_shift_table` is [1, 2, 32]";
        assert!(msg.contains(want), "{msg}");
        let msg = vb.get(3, "blocks.9.norm2.weight").unwrap_err().to_string();
        assert!(msg.contains("no tensor for `blocks.9.norm2.weight` (official `blocks.9.norm3.weight`)"), "{msg}");
        Ok(())
    }

    /// A `config.json` beside the file is the config when none is given.
    #[test]
    fn a_config_beside_the_file_is_used() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "tiny.safetensors", &official_tensors("")?);
        let msg = load(&path, None, DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(msg.contains("no released Wan transformer"), "{msg}");
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"_class_name": "WanTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 32,
                "in_channels": 36, "out_channels": 16, "text_dim": 32, "freq_dim": 16, "ffn_dim": 64,
                "num_layers": 2, "image_dim": 24, "added_kv_proj_dim": 64}"#,
        )
        .unwrap();
        let (cfg, _, _) = load(&path, None, DType::F32, &Device::Cpu)?;
        assert_eq!(cfg, tiny_i2v());
        Ok(())
    }
}
