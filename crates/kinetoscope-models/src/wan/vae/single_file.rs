//! The Wan 2.1 VAE from one file in the official Wan layout: the names of the Wan repository's `WanVAE_`
//! (`Wan2.1_VAE.pth`; ComfyUI's `wan_2.1_vae.safetensors` has the same keys), read as diffusers'
//! `AutoencoderKLWan.from_single_file` reads them and served under diffusers' names, so that
//! [`AutoencoderKLWan::new`] loads them unchanged. The same VAE serves every Wan 2.1 model and Wan 2.2's A14B ones.
//!
//! Reference: diffusers 0.42.1, `convert_wan_vae_to_diffusers`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/single_file_utils.py>), which
//! `FromOriginalModelMixin.from_single_file`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/single_file_model.py>) runs for
//! `AutoencoderKLWan`; `models/tiny/FIXTURES.md` ("Single-file VAEs") has the table and what diffusers does.
//!
//! **Names.** `conv1` / `conv2` are `quant_conv` / `post_quant_conv`; in the encoder and the decoder, `conv1` is
//! `conv_in`, `head.0` / `head.2` are `norm_out` / `conv_out`, `middle.0` / `middle.1` / `middle.2` are
//! `mid_block.resnets.0` / `mid_block.attentions.0` / `mid_block.resnets.1`, and a residual block's `residual.0`,
//! `residual.2`, `residual.3`, `residual.6`, `shortcut` are `norm1`, `conv1`, `norm2`, `conv2`, `conv_shortcut`.
//! The encoder's `downsamples.N` is `down_blocks.N` (both flat). The decoder's `upsamples.N` is flat where diffusers
//! nests it: each stage's residual blocks, then its upsampler (the block with `resample.1` / `time_conv`), so block N
//! is `up_blocks.S.resnets.R` or `up_blocks.S.upsamplers.0`, S counting the upsamplers before N. diffusers' converter
//! hard-codes those indices for 2 residual blocks per stage (3 in the decoder), the released VAEs' value; here they
//! are read off the file, so a VAE of any depth maps. No tensor is reshaped: every shape is diffusers' (the norms'
//! `gamma` included, `[dim, 1, 1, 1]`, or `[dim, 1, 1]` in the attention).
//!
//! **Prefixes.** Where some key starts with `vae.` (ComfyUI's Wan checkpoints that bundle the VAE with the
//! transformer and the text encoder) or `first_stage_model.` ([`PREFIXES`]), the VAE's keys are the ones behind it
//! and the others are left out, listed by [`VaeFile::ignored`]. diffusers 0.42.1 takes neither prefix: it leaves such
//! keys unconverted and fails.
//!
//! **Not read.** Wan 2.2's VAE (TI2V 5B's `Wan2.2_VAE.pth`, `wan2.2_vae.safetensors`: residual down/up blocks nested
//! as `downsamples.S.downsamples.R`) is refused with that said; diffusers 0.42.1's single-file converter maps it wrong
//! too. A diffusers-named file (a `vae/` folder's weights) is refused with a hint to load the folder. PyTorch pickles
//! (`.pth`) are not read: the file must be safetensors (or GGUF).
//!
//! **Untrusted files.** The header is bounded ([`Limits`]) before it is parsed, tensors must be floating point, FP8
//! or a ggml type ([`crate::checkpoint`]), every key must name a tensor of the VAE (unlike diffusers, which drops
//! what it does not know), no two keys may name the same tensor, and every error names the file and the key.
//! [`VaeFile::into_vae`] also refuses a file with tensors its config's model does not read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::{AutoencoderKLWan, Config};
use crate::checkpoint::{listed, renamed_weights, Checkpoint};
use crate::wan::original_names::{tensor_to_diffusers, tensor_to_original};

pub use crate::checkpoint::Limits;

/// The prefixes a checkpoint that bundles several components may keep the VAE behind: `vae.`, ComfyUI's for Wan
/// (beside `model.diffusion_model.` and `text_encoders.`), and `first_stage_model.`, Stable Diffusion's (ComfyUI's
/// default).
pub const PREFIXES: [&str; 2] = ["vae.", "first_stage_model."];

/// A residual block's parts: the official module, diffusers', and whether it is a norm (`gamma`) or a
/// convolution (`weight`, `bias`).
const RESIDUAL: [(&str, &str, bool); 5] = [
    ("residual.0", "norm1", true),
    ("residual.2", "conv1", false),
    ("residual.3", "norm2", true),
    ("residual.6", "conv2", false),
    ("shortcut", "conv_shortcut", false),
];

/// diffusers' name for a residual block's tensor (`residual.2.weight` → `conv1.weight`).
fn residual_part(part: &str) -> Option<String> {
    let (module, leaf) = part.rsplit_once('.')?;
    let (_, ours, norm) = RESIDUAL.iter().find(|(official, _, _)| *official == module)?;
    let fits = if *norm { leaf == "gamma" } else { is_conv_leaf(leaf) };
    fits.then(|| format!("{ours}.{leaf}"))
}

/// A resampler's tensor: the same name in both layouts.
fn is_resample_part(part: &str) -> bool {
    matches!(part, "resample.1.weight" | "resample.1.bias" | "time_conv.weight" | "time_conv.bias")
}

fn is_conv_leaf(leaf: &str) -> bool {
    matches!(leaf, "weight" | "bias")
}

/// `N.rest` → (N, rest), N written as a plain decimal (no sign, no leading zero), so that one block has one key.
fn index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    let parsed: usize = n.parse().ok()?;
    (parsed.to_string() == n).then_some((parsed, rest))
}

/// The decoder's upsamplers: the indices N of the file's `decoder.upsamples.N` blocks that resample.
fn upsamplers<'a>(keys: impl IntoIterator<Item = &'a str>) -> BTreeSet<usize> {
    keys.into_iter()
        .filter_map(|key| index(key.strip_prefix("decoder.upsamples.")?))
        .filter(|(_, part)| is_resample_part(part))
        .map(|(n, _)| n)
        .collect()
}

/// diffusers' name for the tensor `key` of a Wan 2.1 VAE in the official layout (no prefix), the decoder's
/// upsamplers being at `upsamplers`; `None` if it names no such tensor.
pub fn diffusers_name(key: &str, upsamplers: &BTreeSet<usize>) -> Option<String> {
    for (official, ours) in [("conv1.", "quant_conv"), ("conv2.", "post_quant_conv")] {
        if let Some(leaf) = key.strip_prefix(official) {
            return is_conv_leaf(leaf).then(|| format!("{ours}.{leaf}"));
        }
    }
    let (side, rest) = key.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return None;
    }
    let ours = |name: String| Some(format!("{side}.{name}"));
    if let Some(leaf) = rest.strip_prefix("conv1.") {
        return if is_conv_leaf(leaf) { ours(format!("conv_in.{leaf}")) } else { None };
    }
    if rest == "head.0.gamma" {
        return ours("norm_out.gamma".into());
    }
    if let Some(leaf) = rest.strip_prefix("head.2.") {
        return if is_conv_leaf(leaf) { ours(format!("conv_out.{leaf}")) } else { None };
    }
    if let Some(middle) = rest.strip_prefix("middle.") {
        let (n, part) = index(middle)?;
        return match n {
            0 | 2 => ours(format!("mid_block.resnets.{}.{}", n / 2, residual_part(part)?)),
            1 if matches!(part, "norm.gamma" | "to_qkv.weight" | "to_qkv.bias" | "proj.weight" | "proj.bias") => {
                ours(format!("mid_block.attentions.0.{part}"))
            }
            _ => None,
        };
    }
    if side == "encoder" {
        let (n, part) = index(rest.strip_prefix("downsamples.")?)?;
        let part = if is_resample_part(part) { part.to_string() } else { residual_part(part)? };
        return ours(format!("down_blocks.{n}.{part}"));
    }
    let (n, part) = index(rest.strip_prefix("upsamples.")?)?;
    let stage = upsamplers.range(..n).count();
    if upsamplers.contains(&n) {
        return if is_resample_part(part) { ours(format!("up_blocks.{stage}.upsamplers.0.{part}")) } else { None };
    }
    let first = upsamplers.range(..n).next_back().map_or(0, |u| u + 1);
    ours(format!("up_blocks.{stage}.resnets.{}.{}", n - first, residual_part(part)?))
}

/// What keys that name no Wan 2.1 VAE tensor show instead, as a sentence to append; empty if nothing.
fn hint(unknown: &[&str]) -> &'static str {
    let nested = |k: &&str| {
        ["encoder.downsamples.", "decoder.upsamples."].iter().any(|p| {
            k.strip_prefix(p)
                .and_then(index)
                .is_some_and(|(_, part)| part.starts_with("downsamples.") || part.starts_with("upsamples."))
        })
    };
    let diffusers = |k: &&str| {
        k.starts_with("quant_conv.")
            || k.starts_with("post_quant_conv.")
            || ["conv_in.", "conv_out.", "norm_out.", "mid_block.", "down_blocks.", "up_blocks."].iter().any(|p| {
                k.strip_prefix("encoder.").or_else(|| k.strip_prefix("decoder.")).is_some_and(|r| r.starts_with(p))
            })
    };
    let transformer = |k: &&str| {
        k.starts_with("model.diffusion_model.") || tensor_to_diffusers(k).is_some() || tensor_to_original(k).is_some()
    };
    let text_encoder = |k: &&str| {
        *k == "shared.weight"
            || k.starts_with("encoder.block.")
            || k.starts_with("enc.blk.")
            || *k == "token_embd.weight"
    };
    if unknown.iter().any(nested) {
        ". These are Wan 2.2's VAE (TI2V 5B: residual down and up blocks, `downsamples.S.downsamples.R`), which is \
         not read from a single file (diffusers 0.42.1's single-file converter does not map it either): use the \
         diffusers folder's `vae/`"
    } else if unknown.iter().any(diffusers) {
        ". These are diffusers' names: the file is a diffusers `vae/` folder's weights; load that folder (with its \
         `config.json`) instead"
    } else if unknown.iter().any(transformer) {
        ". These are a Wan transformer's tensors, not the VAE's"
    } else if unknown.iter().any(text_encoder) {
        ". These are the umT5 text encoder's tensors, not the VAE's"
    } else {
        ""
    }
}

/// One VAE file in the official layout, its header read and its names mapped; the data is read as the
/// [`VarBuilder`]'s tensors are asked for.
pub struct VaeFile {
    path: PathBuf,
    label: String,
    checkpoint: Arc<Checkpoint>,
    /// diffusers' name → the file's key.
    keys: HashMap<String, String>,
    prefix: Option<&'static str>,
    ignored: Vec<String>,
}

impl fmt::Debug for VaeFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaeFile")
            .field("path", &self.path)
            .field("tensors", &self.keys.len())
            .field("prefix", &self.prefix)
            .field("ignored", &self.ignored.len())
            .finish()
    }
}

impl VaeFile {
    /// Opens `path` within the default [`Limits`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_limits(path, &Limits::default())
    }

    /// Opens `path` (untrusted): bounds the header, maps every key to diffusers' name, refuses keys that name no
    /// tensor of the Wan 2.1 VAE; every error names the file.
    pub fn open_with_limits(path: &Path, limits: &Limits) -> Result<Self> {
        let label = format!("Wan VAE file {}", path.display());
        Self::open_inner(path, limits, label.clone()).map_err(|e| Error::Msg(format!("{label}: {e}")))
    }

    fn open_inner(path: &Path, limits: &Limits, label: String) -> Result<Self> {
        let checkpoint = Checkpoint::open(path, limits).map_err(|e| {
            let pickle = path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "pth" | "pt" | "ckpt"));
            if !pickle {
                return e;
            }
            Error::Msg(format!(
                "not read as safetensors or GGUF (PyTorch pickles are not read: convert the file to safetensors): {e}"
            ))
        })?;
        let tensors = checkpoint.tensors();
        let present: Vec<&str> = PREFIXES.into_iter().filter(|p| tensors.keys().any(|k| k.starts_with(p))).collect();
        let prefix = match present[..] {
            [] => None,
            [prefix] => Some(prefix),
            _ => bail!("its keys start with both {}: which is the VAE?", listed(present, 2)),
        };
        let mut ignored = checkpoint.ignored().to_vec();
        let mut vae = Vec::new();
        for key in tensors.keys() {
            match prefix {
                None => vae.push((key.as_str(), key)),
                Some(prefix) => match key.strip_prefix(prefix) {
                    Some(name) => vae.push((name, key)),
                    None => ignored.push(key.clone()),
                },
            }
        }
        if vae.is_empty() {
            bail!("it has no tensors")
        }
        let upsamplers = upsamplers(vae.iter().map(|(name, _)| *name));
        let (mut keys, mut unknown) = (HashMap::new(), Vec::new());
        for (name, key) in vae {
            let Some(ours) = diffusers_name(name, &upsamplers) else {
                unknown.push(name);
                continue;
            };
            if let Some(other) = keys.insert(ours.clone(), key.clone()) {
                bail!("`{other}` and `{key}` both name the VAE's `{ours}`")
            }
        }
        if !unknown.is_empty() {
            unknown.sort_unstable();
            bail!(
                "{} key(s) name no tensor of the Wan 2.1 VAE in the official layout: {}{}",
                unknown.len(),
                listed(unknown.iter().copied(), 8),
                hint(&unknown)
            )
        }
        ignored.sort_unstable();
        Ok(Self { path: path.to_path_buf(), label, checkpoint, keys, prefix, ignored })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The prefix the VAE's keys are behind ([`PREFIXES`]), if any.
    pub fn prefix(&self) -> Option<&'static str> {
        self.prefix
    }

    /// The keys left out: other components' (those outside [`Self::prefix`] in a file that uses one), and scaled
    /// FP8's marker and input scales.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The file's key for diffusers' name `name`.
    pub fn file_key(&self, name: &str) -> Option<&str> {
        self.keys.get(name).map(String::as_str)
    }

    /// The VAE's tensors by diffusers' names, with their shapes.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let tensors = self.checkpoint.tensors();
        self.keys.iter().map(|(name, key)| (name.clone(), tensors[key].dims.clone())).collect()
    }

    /// The tensors under diffusers' names, read as they are asked for, converted to `dtype` on `device`; a name
    /// the file lacks or a shape that differs is an error naming the file (and the key).
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let hint: fn(&str) -> String = |_| {
            " (no key of the file maps to it: the file is a VAE of another structure than the config's)".to_string()
        };
        renamed_weights(self.checkpoint, self.keys, self.label, hint, dtype, device).0
    }

    /// The VAE of config `cfg` over the file's tensors, checked both ways: every tensor the model reads is in the
    /// file with its shape, and every tensor of the file is read.
    pub fn into_vae(self, cfg: &Config, dtype: DType, device: &Device) -> Result<AutoencoderKLWan> {
        let (label, keys) = (self.label.clone(), self.keys.clone());
        let read = Arc::new(Mutex::new(BTreeSet::new()));
        let backend = Reading { inner: self.into_var_builder(dtype, device), read: read.clone() };
        let vae = AutoencoderKLWan::new(cfg, VarBuilder::from_backend(Box::new(backend), dtype, device.clone()))?;
        let read = read.lock().map_err(|_| Error::Msg("the read-tensor record's lock is poisoned".into()))?;
        let mut unread: Vec<&str> =
            keys.iter().filter(|(name, _)| !read.contains(*name)).map(|(_, key)| key.as_str()).collect();
        if !unread.is_empty() {
            unread.sort_unstable();
            bail!(
                "{label}: {} tensor(s) that the config's VAE does not read (a VAE of another structure than the \
                 config's?): {}",
                unread.len(),
                listed(unread, 6)
            )
        }
        Ok(vae)
    }
}

/// A backend that notes the name of each tensor read through it.
struct Reading {
    inner: VarBuilder<'static>,
    read: Arc<Mutex<BTreeSet<String>>>,
}

impl Reading {
    fn note(&self, name: &str) {
        if let Ok(mut read) = self.read.lock() {
            read.insert(name.to_string());
        }
    }
}

impl SimpleBackend for Reading {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, _: &Device) -> Result<Tensor> {
        self.note(name);
        self.inner.get_with_hints_dtype(s, name, init, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> Result<Tensor> {
        self.note(name);
        self.inner.get_unchecked_dtype(name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The tensors of the Wan 2.1 VAE file `path` (official layout; see the module's notes) under diffusers' names,
/// converted to `dtype` on `device` as they are read: what [`AutoencoderKLWan::new`] takes.
pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(VaeFile::open(path)?.into_var_builder(dtype, device))
}

/// The Wan 2.1 VAE of config `cfg` from the file `path` (official layout), checked both ways
/// ([`VaeFile::into_vae`]).
pub fn load_vae(path: &Path, cfg: &Config, dtype: DType, device: &Device) -> Result<AutoencoderKLWan> {
    VaeFile::open(path)?.into_vae(cfg, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(keys: &[&str]) -> Vec<Option<String>> {
        let ups = upsamplers(keys.iter().copied());
        keys.iter().map(|k| diffusers_name(k, &ups)).collect()
    }

    #[test]
    fn released_names_map_as_diffusers_maps_them() {
        // The released decoder: 3 residual blocks then an upsampler per stage, as diffusers hard-codes.
        let keys = [
            "conv1.weight",
            "conv2.bias",
            "encoder.conv1.weight",
            "decoder.head.0.gamma",
            "decoder.head.2.bias",
            "encoder.middle.2.residual.6.weight",
            "decoder.middle.1.to_qkv.bias",
            "encoder.downsamples.2.shortcut.weight",
            "encoder.downsamples.5.time_conv.bias",
            "decoder.upsamples.2.residual.3.gamma",
            "decoder.upsamples.3.resample.1.weight",
            "decoder.upsamples.4.shortcut.bias",
            "decoder.upsamples.7.time_conv.weight",
            "decoder.upsamples.11.resample.1.bias",
            "decoder.upsamples.14.residual.0.gamma",
        ];
        let want = [
            "quant_conv.weight",
            "post_quant_conv.bias",
            "encoder.conv_in.weight",
            "decoder.norm_out.gamma",
            "decoder.conv_out.bias",
            "encoder.mid_block.resnets.1.conv2.weight",
            "decoder.mid_block.attentions.0.to_qkv.bias",
            "encoder.down_blocks.2.conv_shortcut.weight",
            "encoder.down_blocks.5.time_conv.bias",
            "decoder.up_blocks.0.resnets.2.norm2.gamma",
            "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
            "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
            "decoder.up_blocks.1.upsamplers.0.time_conv.weight",
            "decoder.up_blocks.2.upsamplers.0.resample.1.bias",
            "decoder.up_blocks.3.resnets.2.norm1.gamma",
        ];
        let got = names(&keys);
        for ((key, got), want) in keys.iter().zip(got).zip(want) {
            assert_eq!(got.as_deref(), Some(want), "{key}");
        }
    }

    #[test]
    fn the_decoder_depth_is_read_off_the_file() {
        // 2 residual blocks per stage: upsamplers at 2, 5, 8.
        let keys = [
            "decoder.upsamples.2.resample.1.weight",
            "decoder.upsamples.4.residual.0.gamma",
            "decoder.upsamples.5.time_conv.bias",
            "decoder.upsamples.8.resample.1.bias",
            "decoder.upsamples.9.residual.2.bias",
        ];
        let got = names(&keys);
        assert_eq!(got[1].as_deref(), Some("decoder.up_blocks.1.resnets.1.norm1.gamma"));
        assert_eq!(got[4].as_deref(), Some("decoder.up_blocks.3.resnets.0.conv1.bias"));
    }

    #[test]
    fn malformed_keys_name_nothing() {
        let keys = [
            "decoder.upsamples.2.resample.1.weight",
            "decoder.upsamples.2.residual.0.gamma",
            "decoder.upsamples.02.residual.0.gamma",
            "decoder.upsamples.+1.residual.0.gamma",
            "encoder.downsamples.0.residual.0.weight",
            "encoder.downsamples.0.residual.1.weight",
            "encoder.middle.3.residual.0.gamma",
            "encoder.middle.1.norm.weight",
            "conv1.gamma",
            "encoder.head.1.weight",
            "decoder.conv_in.weight",
            "vae.encoder.conv1.weight",
        ];
        let got = names(&keys);
        assert!(got[0].is_some());
        for (key, got) in keys.iter().zip(got).skip(1) {
            assert_eq!(got, None, "{key}");
        }
    }

    #[test]
    fn hints_tell_what_the_file_is() {
        assert!(hint(&["encoder.downsamples.0.downsamples.1.residual.0.gamma"]).contains("Wan 2.2"));
        assert!(hint(&["decoder.up_blocks.0.resnets.0.conv1.weight"]).contains("diffusers"));
        assert!(hint(&["blocks.0.self_attn.q.weight"]).contains("transformer"));
        assert!(hint(&["encoder.block.0.layer.0.SelfAttention.q.weight"]).contains("umT5"));
        assert_eq!(hint(&["something.else"]), "");
    }
}
