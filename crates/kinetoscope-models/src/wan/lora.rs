//! The Wan transformer's LoRA key names: every format diffusers reads for Wan, mapped to the transformer's own
//! (diffusers) names for [`crate::lora`] to merge.
//!
//! Reference: diffusers 0.42.1, `WanLoraLoaderMixin.lora_state_dict`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/lora_pipeline.py>) and its
//! converters `_convert_non_diffusers_wan_lora_to_diffusers` and `_convert_musubi_wan_lora_to_diffusers`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/lora_conversion_utils.py>).
//!
//! The format is the whole file's, recognized as diffusers does:
//! - **original Wan** (the official repository, lightx2v, ComfyUI): some key starts with `diffusion_model.`; layers
//!   by the original model's names (`blocks.0.self_attn.q`), pairs as `lora_down`/`lora_up` or `lora_A`/`lora_B`
//!   `.weight`, `.alpha`, and full deltas `.diff` (weight) and `.diff_b` (bias);
//! - **kohya / musubi-tuner**: some key starts with `lora_unet_`; the original names with `_` for `.`
//!   (`lora_unet_blocks_0_self_attn_q.lora_down.weight`), `.alpha`;
//! - otherwise **diffusers (PEFT)**: `transformer.{layer}.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`, layers by
//!   the transformer's own names (also `.lora.down`/`.lora.up.weight`, diffusers' older names, and keys without the
//!   `transformer.` prefix, which diffusers skips).
//!
//! Layers are named by [`super::original_names`]' table, the one the single-file loader reads checkpoints by
//! (`blocks.N.self_attn.q` → `blocks.N.attn1.to_q`, `head.head` → `proj_out`, …): its linear layers take low-rank
//! pairs; its other parts (norms, modulation tables, the patch embedding, the image embedder's norms and position
//! embedding) only full deltas, which are sorted out below.
//!
//! Full deltas are applied exactly where diffusers' converter applies them, and the rest reported by
//! [`crate::lora::Adapter::ignored`]:
//! - `diff_b` of each layer of the table (as PEFT's `lora_B.bias` at α = r: added times the adapter's scale), but
//!   `time_projection.1`'s only when the file has `time_projection` weights (AccVideo's has biases alone) and
//!   `img_emb.proj.{1,3}`'s only with that layer's up projection;
//! - `diff` of `head.head` only (a full weight delta, as diffusers' identity up projection makes it); diffusers
//!   leaves every other `diff` out ("not handled yet"): those of the other layers, `patch_embedding`, the
//!   `modulation` tables, `img_emb.proj.{0,4}` and `img_emb.emb_pos`;
//! - no delta of a norm (`self_attn.norm_q`/`norm_k`, `cross_attn.norm_q`/`norm_k`/`norm_k_img` →
//!   `attn2.norm_added_k`, `norm3` → `norm2`): diffusers drops them ("just zeroed values").
//!
//! An `alpha` scales its pair by α / r in every format, folded into the factors in their dtype as diffusers' converters
//! fold it for the original and kohya formats (diffusers accepts no `alpha` key in its own format, nor one on the
//! layers outside the blocks; this reads those the same way). Without one the scale is 1. DoRA magnitudes
//! (`dora_scale`) are dropped, as diffusers drops them.

use std::collections::HashSet;
use std::path::Path;

use candle_core::Result;

use super::original_names::{self, Kind, BLOCK_PARTS, TOP_PARTS};
use crate::lora::{Adapter, AdapterNaming, KeyTarget, Part, ReadOptions, Resolved, Targets};

const ORIGINAL: &str = "original Wan (diffusion_model.)";
const KOHYA: &str = "kohya / musubi-tuner (lora_unet_)";
const DIFFUSERS: &str = "diffusers (PEFT)";

const NORM_DELTA: &str = "a norm's delta, which diffusers drops (zeros in the released files)";
const UNAPPLIED_DELTA: &str = "a full delta diffusers does not apply";
const TIME_PROJECTION_ALONE: &str =
    "a time_projection delta in a file without time_projection weights, which diffusers drops";
const IMAGE_BIAS_ALONE: &str = "an img_emb bias delta without that layer's up projection, which diffusers drops";
const DORA: &str = "a DoRA magnitude (dora_scale), which diffusers drops";

/// Reads the Wan transformer's adapter files in every format diffusers reads (see the module's documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct WanNaming;

/// What a key's ending says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suffix {
    Part(Part),
    /// A delta of another kind (`diff_m`, …), which diffusers leaves out with the unhandled `diff`s.
    OtherDelta,
    Dora,
}

const SUFFIXES: [(&str, Suffix); 11] = [
    (".lora_A.weight", Suffix::Part(Part::Down)),
    (".lora_down.weight", Suffix::Part(Part::Down)),
    (".lora.down.weight", Suffix::Part(Part::Down)),
    (".lora_B.weight", Suffix::Part(Part::Up)),
    (".lora_up.weight", Suffix::Part(Part::Up)),
    (".lora.up.weight", Suffix::Part(Part::Up)),
    (".lora_B.bias", Suffix::Part(Part::UpBias)),
    (".alpha", Suffix::Part(Part::Alpha)),
    (".diff", Suffix::Part(Part::WeightDelta)),
    (".diff_b", Suffix::Part(Part::BiasDelta)),
    (".dora_scale", Suffix::Dora),
];

/// `key` split into its layer and what it is to the layer.
fn split_suffix(key: &str) -> Option<(&str, Suffix)> {
    SUFFIXES
        .iter()
        .find_map(|&(suffix, kind)| Some((key.strip_suffix(suffix)?, kind)))
        .or_else(|| {
            let (module, last) = key.rsplit_once('.')?;
            last.starts_with("diff").then_some((module, Suffix::OtherDelta))
        })
        .filter(|(module, _)| !module.is_empty())
}

/// A layer of the original model, by its original name.
enum OriginalLayer {
    /// A linear layer, and the transformer's name for it.
    Linear(String),
    /// Another part (a norm, a modulation table, the patch embedding): full deltas only.
    Other,
}

fn original_layer(name: &str) -> Option<OriginalLayer> {
    let located = original_names::original_part(name)?;
    Some(match located.part.kind {
        Kind::Linear => OriginalLayer::Linear(located.diffusers()),
        Kind::Layer | Kind::Parameter => OriginalLayer::Other,
    })
}

/// The original name of a kohya name (`blocks_0_self_attn_q` → `blocks.0.self_attn.q`).
fn kohya_to_original(name: &str) -> Option<String> {
    let underscored = |original: &str| original.replace('.', "_");
    if let Some(rest) = name.strip_prefix("blocks_") {
        let (index, layer) = rest.split_once('_')?;
        let part = BLOCK_PARTS.iter().find(|part| underscored(part.original) == layer)?;
        return Some(format!("blocks.{index}.{}", part.original));
    }
    TOP_PARTS.iter().find(|part| underscored(part.original) == name).map(|part| part.original.to_string())
}

/// What diffusers' converter decides from the whole file.
struct OriginalFile {
    /// Some `time_projection…weight` key (without one, diffusers drops every time_projection key).
    has_time_projection_weight: bool,
    /// The original layers with an up projection.
    with_up: HashSet<String>,
}

/// Where a key of the original (or kohya) format goes: `module` by its original name.
fn resolve_original(module: &str, suffix: Suffix, file: &OriginalFile) -> KeyTarget {
    let is_delta = matches!(suffix, Suffix::Part(Part::WeightDelta | Part::BiasDelta) | Suffix::OtherDelta);
    if suffix == Suffix::Dora {
        return KeyTarget::Ignored(DORA);
    }
    if is_delta && module.contains("norm") {
        return KeyTarget::Ignored(NORM_DELTA);
    }
    if module.starts_with("time_projection") && !file.has_time_projection_weight {
        return KeyTarget::Ignored(TIME_PROJECTION_ALONE);
    }
    let layer = |module: String, part| KeyTarget::Layer { module, part };
    match (original_layer(module), suffix) {
        (None, _) => KeyTarget::Unmatched,
        (Some(OriginalLayer::Other), _) if is_delta => KeyTarget::Ignored(UNAPPLIED_DELTA),
        (Some(OriginalLayer::Other), _) => KeyTarget::Unmatched,
        (Some(OriginalLayer::Linear(ours)), Suffix::Part(part @ (Part::Down | Part::Up | Part::Alpha))) => {
            layer(ours, part)
        }
        (Some(OriginalLayer::Linear(ours)), Suffix::Part(Part::BiasDelta)) => {
            if module.starts_with("img_emb.") && !file.with_up.contains(module) {
                KeyTarget::Ignored(IMAGE_BIAS_ALONE)
            } else {
                layer(ours, Part::BiasDelta)
            }
        }
        (Some(OriginalLayer::Linear(ours)), Suffix::Part(Part::WeightDelta)) if module == "head.head" => {
            layer(ours, Part::WeightDelta)
        }
        (Some(OriginalLayer::Linear(_)), Suffix::Part(Part::WeightDelta) | Suffix::OtherDelta) => {
            KeyTarget::Ignored(UNAPPLIED_DELTA)
        }
        (Some(OriginalLayer::Linear(_)), Suffix::Part(Part::UpBias) | Suffix::Dora) => KeyTarget::Unmatched,
    }
}

/// Where a key of diffusers' own format goes: its layer by the transformer's name.
fn resolve_diffusers(key: &str) -> KeyTarget {
    let key = key.strip_prefix("transformer.").unwrap_or(key);
    match split_suffix(key) {
        Some((_, Suffix::Dora)) => KeyTarget::Ignored(DORA),
        Some((module, Suffix::Part(part @ (Part::Down | Part::Up | Part::UpBias | Part::Alpha)))) => {
            KeyTarget::Layer { module: module.to_string(), part }
        }
        _ => KeyTarget::Unmatched,
    }
}

impl AdapterNaming for WanNaming {
    fn resolve(&self, keys: &[&str]) -> Resolved {
        let (format, prefix, kohya) = if keys.iter().any(|k| k.starts_with("diffusion_model.")) {
            (ORIGINAL, "diffusion_model.", false)
        } else if keys.iter().any(|k| k.starts_with("lora_unet_")) {
            (KOHYA, "lora_unet_", true)
        } else {
            return Resolved { format: DIFFUSERS, targets: keys.iter().map(|k| resolve_diffusers(k)).collect() };
        };
        // Each key as (original layer name, suffix), where it has one.
        let parsed: Vec<Option<(String, Suffix)>> = keys
            .iter()
            .map(|key| {
                let rest = key.strip_prefix(prefix)?;
                if kohya {
                    let (name, suffix) = rest.split_once('.')?;
                    let (_, suffix) = split_suffix(&format!("x.{suffix}"))?;
                    Some((kohya_to_original(name)?, suffix))
                } else {
                    let (module, suffix) = split_suffix(rest)?;
                    Some((module.to_string(), suffix))
                }
            })
            .collect();
        let file = OriginalFile {
            has_time_projection_weight: parsed.iter().flatten().any(|(module, suffix)| {
                module.starts_with("time_projection") && matches!(suffix, Suffix::Part(Part::Down | Part::Up))
            }),
            with_up: parsed
                .iter()
                .flatten()
                .filter(|(_, suffix)| *suffix == Suffix::Part(Part::Up))
                .map(|(module, _)| module.clone())
                .collect(),
        };
        let targets = parsed
            .iter()
            .map(|parsed| match parsed {
                Some((module, suffix)) => resolve_original(module, *suffix, &file),
                None => KeyTarget::Unmatched,
            })
            .collect();
        Resolved { format, targets }
    }

    fn component(&self) -> &str {
        "transformer"
    }
}

/// Reads a Wan transformer adapter file for the transformer whose tensors are `targets` (see
/// [`Adapter::read`]); for Wan 2.2 A14B, once per expert with that expert's file and tensors.
pub fn read_adapter(path: &Path, targets: &Targets, options: &ReadOptions) -> Result<Adapter> {
    Adapter::read(path, &WanNaming, targets, options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use crate::lora::IgnoredKey;
    use crate::wan::transformer::{Config, WanTransformer3DModel};

    fn layer(module: &str, part: Part) -> KeyTarget {
        KeyTarget::Layer { module: module.to_string(), part }
    }

    /// Resolves `keys` as one file and checks each against its expected target.
    fn check(format: &str, cases: &[(&str, KeyTarget)]) {
        let keys: Vec<&str> = cases.iter().map(|(key, _)| *key).collect();
        let resolved = WanNaming.resolve(&keys);
        assert_eq!(resolved.format, format);
        for ((key, want), got) in cases.iter().zip(&resolved.targets) {
            assert_eq!(got, want, "{key}");
        }
    }

    #[test]
    fn original_names_map_to_diffusers() {
        use Part::*;
        check(
            ORIGINAL,
            &[
                ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", layer("blocks.0.attn1.to_q", Down)),
                ("diffusion_model.blocks.0.self_attn.q.lora_up.weight", layer("blocks.0.attn1.to_q", Up)),
                ("diffusion_model.blocks.0.self_attn.q.alpha", layer("blocks.0.attn1.to_q", Alpha)),
                ("diffusion_model.blocks.0.self_attn.q.diff_b", layer("blocks.0.attn1.to_q", BiasDelta)),
                ("diffusion_model.blocks.3.self_attn.k.lora_A.weight", layer("blocks.3.attn1.to_k", Down)),
                ("diffusion_model.blocks.3.self_attn.v.lora_B.weight", layer("blocks.3.attn1.to_v", Up)),
                ("diffusion_model.blocks.12.self_attn.o.lora_down.weight", layer("blocks.12.attn1.to_out.0", Down)),
                ("diffusion_model.blocks.1.cross_attn.q.lora_down.weight", layer("blocks.1.attn2.to_q", Down)),
                ("diffusion_model.blocks.1.cross_attn.k.lora_up.weight", layer("blocks.1.attn2.to_k", Up)),
                ("diffusion_model.blocks.1.cross_attn.v.alpha", layer("blocks.1.attn2.to_v", Alpha)),
                ("diffusion_model.blocks.1.cross_attn.o.diff_b", layer("blocks.1.attn2.to_out.0", BiasDelta)),
                (
                    "diffusion_model.blocks.1.cross_attn.k_img.lora_down.weight",
                    layer("blocks.1.attn2.add_k_proj", Down),
                ),
                ("diffusion_model.blocks.1.cross_attn.v_img.lora_up.weight", layer("blocks.1.attn2.add_v_proj", Up)),
                ("diffusion_model.blocks.1.cross_attn.v_img.diff_b", layer("blocks.1.attn2.add_v_proj", BiasDelta)),
                ("diffusion_model.blocks.2.ffn.0.lora_down.weight", layer("blocks.2.ffn.net.0.proj", Down)),
                ("diffusion_model.blocks.2.ffn.2.lora_up.weight", layer("blocks.2.ffn.net.2", Up)),
                ("diffusion_model.blocks.2.ffn.2.diff_b", layer("blocks.2.ffn.net.2", BiasDelta)),
                (
                    "diffusion_model.text_embedding.0.lora_down.weight",
                    layer("condition_embedder.text_embedder.linear_1", Down),
                ),
                (
                    "diffusion_model.text_embedding.2.diff_b",
                    layer("condition_embedder.text_embedder.linear_2", BiasDelta),
                ),
                (
                    "diffusion_model.time_embedding.0.lora_up.weight",
                    layer("condition_embedder.time_embedder.linear_1", Up),
                ),
                (
                    "diffusion_model.time_embedding.2.lora_down.weight",
                    layer("condition_embedder.time_embedder.linear_2", Down),
                ),
                ("diffusion_model.time_projection.1.lora_down.weight", layer("condition_embedder.time_proj", Down)),
                ("diffusion_model.time_projection.1.diff_b", layer("condition_embedder.time_proj", BiasDelta)),
                ("diffusion_model.head.head.lora_up.weight", layer("proj_out", Up)),
                ("diffusion_model.head.head.diff", layer("proj_out", WeightDelta)),
                ("diffusion_model.head.head.diff_b", layer("proj_out", BiasDelta)),
                (
                    "diffusion_model.img_emb.proj.1.lora_up.weight",
                    layer("condition_embedder.image_embedder.ff.net.0.proj", Up),
                ),
                (
                    "diffusion_model.img_emb.proj.1.diff_b",
                    layer("condition_embedder.image_embedder.ff.net.0.proj", BiasDelta),
                ),
                (
                    "diffusion_model.img_emb.proj.3.lora_down.weight",
                    layer("condition_embedder.image_embedder.ff.net.2", Down),
                ),
                // What diffusers drops.
                ("diffusion_model.blocks.0.self_attn.q.diff", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.blocks.0.self_attn.norm_q.diff", KeyTarget::Ignored(NORM_DELTA)),
                ("diffusion_model.blocks.0.cross_attn.norm_k_img.diff", KeyTarget::Ignored(NORM_DELTA)),
                ("diffusion_model.blocks.0.norm3.diff_b", KeyTarget::Ignored(NORM_DELTA)),
                ("diffusion_model.blocks.0.modulation.diff", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.head.modulation.diff", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.patch_embedding.diff", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.patch_embedding.diff_b", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.img_emb.proj.0.diff", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.img_emb.proj.3.diff_b", KeyTarget::Ignored(IMAGE_BIAS_ALONE)),
                ("diffusion_model.blocks.0.modulation.diff_m", KeyTarget::Ignored(UNAPPLIED_DELTA)),
                ("diffusion_model.blocks.0.self_attn.q.dora_scale", KeyTarget::Ignored(DORA)),
                // Nothing of the model.
                ("diffusion_model.blocks.0.self_attn.x.lora_down.weight", KeyTarget::Unmatched),
                ("diffusion_model.blocks.0.self_attn.norm_q.lora_down.weight", KeyTarget::Unmatched),
                ("diffusion_model.blocks.x.self_attn.q.lora_down.weight", KeyTarget::Unmatched),
                ("diffusion_model.blocks.0.self_attn.q.lora_B.bias", KeyTarget::Unmatched),
                ("diffusion_model.blocks.0.self_attn.q.weight", KeyTarget::Unmatched),
                ("blocks.0.self_attn.q.lora_down.weight", KeyTarget::Unmatched),
                ("diffusion_model.foo.diff", KeyTarget::Unmatched),
            ],
        );
    }

    /// AccVideo's file: time_projection biases without its weights, which diffusers drops.
    #[test]
    fn time_projection_deltas_need_its_weights() {
        check(
            ORIGINAL,
            &[
                ("diffusion_model.time_projection.1.diff_b", KeyTarget::Ignored(TIME_PROJECTION_ALONE)),
                ("diffusion_model.blocks.0.ffn.0.diff_b", layer("blocks.0.ffn.net.0.proj", Part::BiasDelta)),
            ],
        );
    }

    #[test]
    fn kohya_names_map_to_diffusers() {
        use Part::*;
        check(
            KOHYA,
            &[
                ("lora_unet_blocks_0_self_attn_q.lora_down.weight", layer("blocks.0.attn1.to_q", Down)),
                ("lora_unet_blocks_0_self_attn_q.lora_up.weight", layer("blocks.0.attn1.to_q", Up)),
                ("lora_unet_blocks_0_self_attn_q.alpha", layer("blocks.0.attn1.to_q", Alpha)),
                ("lora_unet_blocks_10_self_attn_o.lora_down.weight", layer("blocks.10.attn1.to_out.0", Down)),
                ("lora_unet_blocks_1_cross_attn_k.lora_up.weight", layer("blocks.1.attn2.to_k", Up)),
                ("lora_unet_blocks_1_cross_attn_k_img.lora_down.weight", layer("blocks.1.attn2.add_k_proj", Down)),
                ("lora_unet_blocks_1_cross_attn_v_img.alpha", layer("blocks.1.attn2.add_v_proj", Alpha)),
                ("lora_unet_blocks_2_ffn_0.lora_down.weight", layer("blocks.2.ffn.net.0.proj", Down)),
                ("lora_unet_blocks_2_ffn_2.lora_up.weight", layer("blocks.2.ffn.net.2", Up)),
                (
                    "lora_unet_text_embedding_2.lora_down.weight",
                    layer("condition_embedder.text_embedder.linear_2", Down),
                ),
                ("lora_unet_head_head.lora_up.weight", layer("proj_out", Up)),
                ("lora_unet_img_emb_proj_3.lora_up.weight", layer("condition_embedder.image_embedder.ff.net.2", Up)),
                ("lora_unet_blocks_0_norm3.diff", KeyTarget::Ignored(NORM_DELTA)),
                ("lora_unet_blocks_0_self_attn_x.lora_down.weight", KeyTarget::Unmatched),
                ("lora_unet_blocks_0_attn1_to_q.lora_down.weight", KeyTarget::Unmatched),
                ("lora_te_text_model_encoder.lora_down.weight", KeyTarget::Unmatched),
            ],
        );
    }

    #[test]
    fn diffusers_names_are_the_models_own() {
        use Part::*;
        check(
            DIFFUSERS,
            &[
                ("transformer.blocks.0.attn1.to_q.lora_A.weight", layer("blocks.0.attn1.to_q", Down)),
                ("transformer.blocks.0.attn1.to_q.lora_B.weight", layer("blocks.0.attn1.to_q", Up)),
                ("transformer.blocks.0.attn1.to_q.lora_B.bias", layer("blocks.0.attn1.to_q", UpBias)),
                ("transformer.blocks.0.attn1.to_q.alpha", layer("blocks.0.attn1.to_q", Alpha)),
                ("transformer.blocks.0.attn1.to_out.0.lora_A.weight", layer("blocks.0.attn1.to_out.0", Down)),
                ("transformer.blocks.1.ffn.net.0.proj.lora.up.weight", layer("blocks.1.ffn.net.0.proj", Up)),
                ("transformer.condition_embedder.time_proj.lora_A.weight", layer("condition_embedder.time_proj", Down)),
                ("transformer.proj_out.lora_B.weight", layer("proj_out", Up)),
                ("blocks.0.attn2.add_k_proj.lora_A.weight", layer("blocks.0.attn2.add_k_proj", Down)),
                ("transformer.blocks.0.attn1.to_q.dora_scale", KeyTarget::Ignored(DORA)),
                ("transformer.blocks.0.attn1.to_q.diff", KeyTarget::Unmatched),
                ("transformer.blocks.0.attn1.to_q.lora_magnitude_vector", KeyTarget::Unmatched),
                ("transformer.blocks.0.attn1.to_q.weight", KeyTarget::Unmatched),
            ],
        );
    }

    /// The tiny Wan 2.1 I2V transformer's tensors (2 layers, width 24), and its variables.
    fn tiny_i2v() -> (Targets, VarMap) {
        let cfg: Config = serde_json::from_str(
            r#"{"num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
                "text_dim": 8, "freq_dim": 8, "ffn_dim": 16, "num_layers": 2, "image_dim": 10, "added_kv_proj_dim": 24}"#,
        )
        .unwrap();
        let varmap = VarMap::new();
        WanTransformer3DModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let targets = Targets::new(varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.dims().to_vec())));
        (targets, varmap)
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn read(tensors: &[(String, Tensor)], targets: &Targets, allow_unmatched: bool) -> Result<Adapter> {
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None).unwrap();
        Adapter::from_bytes(&bytes, &WanNaming, targets, &ReadOptions { allow_unmatched, ..Default::default() })
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// The same adapter in the three formats (alpha 8 on rank 4 in the original and kohya files, folded into the
    /// factors of the diffusers file, as diffusers' converters fold it) gives the same deltas.
    #[test]
    fn three_formats_one_adapter() -> Result<()> {
        let (targets, _) = tiny_i2v();
        let layers = [
            ("blocks.1.self_attn.o", "blocks_1_self_attn_o", "blocks.1.attn1.to_out.0", 24, 24),
            ("blocks.0.cross_attn.k_img", "blocks_0_cross_attn_k_img", "blocks.0.attn2.add_k_proj", 24, 24),
            ("blocks.0.ffn.0", "blocks_0_ffn_0", "blocks.0.ffn.net.0.proj", 16, 24),
            ("time_projection.1", "time_projection_1", "condition_embedder.time_proj", 144, 24),
        ];
        let alpha = Tensor::new(8f32, &Device::Cpu)?;
        let (mut original, mut kohya, mut diffusers) = (Vec::new(), Vec::new(), Vec::new());
        for (theirs, underscored, ours, out, inp) in layers {
            let (down, up) = (randn(&[4, inp]), randn(&[out, 4]));
            original.push((format!("diffusion_model.{theirs}.lora_down.weight"), down.clone()));
            original.push((format!("diffusion_model.{theirs}.lora_up.weight"), up.clone()));
            original.push((format!("diffusion_model.{theirs}.alpha"), alpha.clone()));
            kohya.push((format!("lora_unet_{underscored}.lora_down.weight"), down.clone()));
            kohya.push((format!("lora_unet_{underscored}.lora_up.weight"), up.clone()));
            kohya.push((format!("lora_unet_{underscored}.alpha"), alpha.clone()));
            diffusers.push((format!("transformer.{ours}.lora_A.weight"), (down * 2.0)?));
            diffusers.push((format!("transformer.{ours}.lora_B.weight"), up));
        }
        let original = read(&original, &targets, false)?;
        let kohya = read(&kohya, &targets, false)?;
        let diffusers = read(&diffusers, &targets, false)?;
        let names: Vec<&str> = diffusers.tensor_names().collect();
        assert_eq!(names.len(), 4);
        for adapter in [&original, &kohya] {
            assert_eq!(adapter.tensor_names().collect::<Vec<_>>(), names);
            for name in &names {
                let (got, want) =
                    (adapter.delta(name, &Device::Cpu)?.unwrap(), diffusers.delta(name, &Device::Cpu)?.unwrap());
                assert!(max_diff(&got, &want) < 1e-5, "{name}");
            }
        }
        Ok(())
    }

    /// `diff` of `head.head` and `diff_b`s are added as they are; the ignored keys are listed with their reasons.
    #[test]
    fn full_deltas_as_diffusers_applies_them() -> Result<()> {
        let (targets, _) = tiny_i2v();
        let (head_diff, head_diff_b, q_diff_b) = (randn(&[16, 24]), randn(&[16]), randn(&[24]));
        let adapter = read(
            &[
                ("diffusion_model.head.head.diff".to_string(), head_diff.clone()),
                ("diffusion_model.head.head.diff_b".to_string(), head_diff_b.clone()),
                ("diffusion_model.blocks.1.self_attn.q.diff_b".to_string(), q_diff_b.clone()),
                ("diffusion_model.blocks.1.self_attn.q.diff".to_string(), randn(&[24, 24])),
                ("diffusion_model.blocks.1.cross_attn.norm_k_img.diff".to_string(), randn(&[24])),
            ],
            &targets,
            false,
        )?;
        for (name, want) in
            [("proj_out.weight", &head_diff), ("proj_out.bias", &head_diff_b), ("blocks.1.attn1.to_q.bias", &q_diff_b)]
        {
            assert_eq!(max_diff(&adapter.delta(name, &Device::Cpu)?.unwrap(), want), 0.0, "{name}");
        }
        assert_eq!(adapter.tensor_names().count(), 3);
        assert_eq!(
            adapter.ignored(),
            [
                IgnoredKey {
                    key: "diffusion_model.blocks.1.cross_attn.norm_k_img.diff".to_string(),
                    reason: NORM_DELTA
                },
                IgnoredKey { key: "diffusion_model.blocks.1.self_attn.q.diff".to_string(), reason: UNAPPLIED_DELTA },
            ]
        );
        Ok(())
    }

    /// A block the model doesn't have is unmatched; shapes are checked against the model's.
    #[test]
    fn keys_are_checked_against_the_model() -> Result<()> {
        let (targets, _) = tiny_i2v();
        let block_2 = [
            ("diffusion_model.blocks.2.self_attn.q.lora_down.weight".to_string(), randn(&[4, 24])),
            ("diffusion_model.blocks.2.self_attn.q.lora_up.weight".to_string(), randn(&[24, 4])),
            ("diffusion_model.blocks.0.self_attn.q.lora_down.weight".to_string(), randn(&[4, 24])),
            ("diffusion_model.blocks.0.self_attn.q.lora_up.weight".to_string(), randn(&[24, 4])),
        ];
        let msg = read(&block_2, &targets, false).unwrap_err().to_string();
        assert!(msg.contains("`diffusion_model.blocks.2.self_attn.q.lora_down.weight`"), "{msg}");
        let adapter = read(&block_2, &targets, true)?;
        assert_eq!(adapter.unmatched().len(), 2);
        assert_eq!(adapter.tensor_names().collect::<Vec<_>>(), ["blocks.0.attn1.to_q.weight"]);

        let wrong = [
            ("lora_unet_blocks_0_ffn_2.lora_down.weight".to_string(), randn(&[4, 24])),
            ("lora_unet_blocks_0_ffn_2.lora_up.weight".to_string(), randn(&[24, 4])),
        ];
        let msg = read(&wrong, &targets, false).unwrap_err().to_string();
        assert!(msg.contains("`lora_unet_blocks_0_ffn_2.lora_down.weight`") && msg.contains("[4, 24]"), "{msg}");
        assert!(msg.contains("blocks.0.ffn.net.2.weight") && msg.contains("[r, 16]"), "{msg}");
        Ok(())
    }
}
