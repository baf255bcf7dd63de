//! The official Wan repository's names for the transformer's parts, and the transformer's own (diffusers') names for
//! them: one table, read by [`super::single_file`] for whole checkpoints and by [`super::lora`] for adapters.
//!
//! Official names are those of Wan's `WanModel` (<https://github.com/Wan-Video/Wan2.1/blob/main/wan/modules/model.py>),
//! which its checkpoints, ComfyUI's (behind `model.diffusion_model.`) and original-format LoRA files (behind
//! `diffusion_model.`) use. Reference for the mapping: diffusers 0.42.1, `TRANSFORMER_KEYS_RENAME_DICT` of
//! `convert_wan_transformer_to_diffusers`
//! (<https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/loaders/single_file_utils.py>), which renames
//! by substring replacement; for the tensors of a Wan checkpoint it gives exactly this table, but for
//! `img_emb.emb_pos`, which it leaves unrenamed (diffusers' conversion script, `scripts/convert_wan_to_diffusers.py`,
//! maps it to `condition_embedder.image_embedder.pos_embed`, as here).
//!
//! | official | diffusers | kind |
//! | --- | --- | --- |
//! | `blocks.N.self_attn.{q,k,v,o}` | `blocks.N.attn1.{to_q,to_k,to_v,to_out.0}` | linear |
//! | `blocks.N.cross_attn.{q,k,v,o}` | `blocks.N.attn2.{to_q,to_k,to_v,to_out.0}` | linear |
//! | `blocks.N.cross_attn.{k_img,v_img}` | `blocks.N.attn2.{add_k_proj,add_v_proj}` | linear |
//! | `blocks.N.ffn.0`, `blocks.N.ffn.2` | `blocks.N.ffn.net.0.proj`, `blocks.N.ffn.net.2` | linear |
//! | `blocks.N.self_attn.{norm_q,norm_k}` | `blocks.N.attn1.{norm_q,norm_k}` | RMSNorm |
//! | `blocks.N.cross_attn.{norm_q,norm_k}` | `blocks.N.attn2.{norm_q,norm_k}` | RMSNorm |
//! | `blocks.N.cross_attn.norm_k_img` | `blocks.N.attn2.norm_added_k` | RMSNorm |
//! | `blocks.N.norm3` | `blocks.N.norm2` | LayerNorm (before cross-attention) |
//! | `blocks.N.modulation` | `blocks.N.scale_shift_table` | parameter `[1, 6, dim]` |
//! | `patch_embedding` | `patch_embedding` | Conv3d |
//! | `text_embedding.0`, `text_embedding.2` | `condition_embedder.text_embedder.linear_1`, `linear_2` | linear |
//! | `time_embedding.0`, `time_embedding.2` | `condition_embedder.time_embedder.linear_1`, `linear_2` | linear |
//! | `time_projection.1` | `condition_embedder.time_proj` | linear |
//! | `head.head` | `proj_out` | linear |
//! | `head.modulation` | `scale_shift_table` | parameter `[1, 2, dim]` |
//! | `img_emb.proj.0`, `img_emb.proj.4` | `condition_embedder.image_embedder.norm1`, `norm2` | LayerNorm |
//! | `img_emb.proj.1`, `img_emb.proj.3` | `condition_embedder.image_embedder.ff.net.0.proj`, `ff.net.2` | linear |
//! | `img_emb.emb_pos` | `condition_embedder.image_embedder.pos_embed` | parameter `[1, 2·257, 1280]` (FLF2V) |
//!
//! The official block has three norms: `norm1` (before self-attention) and `norm2` (before the feed-forward) without
//! parameters, and `norm3` (before cross-attention), affine; diffusers orders them by use, so its affine one is
//! `norm2`. The swap is diffusers' (`"norm2" → "norm__placeholder"`, `"norm3" → "norm2"`); no checkpoint has an
//! official `norm2` tensor.

/// What a part of the model is, which says how its tensors are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A linear layer: `{name}.weight` `[out, in]` and `{name}.bias`.
    Linear,
    /// Another layer (a norm, the patch embedding): `{name}.weight`, maybe `{name}.bias`.
    Layer,
    /// A parameter named by itself (`modulation`, `emb_pos`).
    Parameter,
}

/// One part of the transformer, by both names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub original: &'static str,
    pub diffusers: &'static str,
    pub kind: Kind,
}

const fn part(original: &'static str, diffusers: &'static str, kind: Kind) -> Part {
    Part { original, diffusers, kind }
}

/// The parts of block N, named relative to it (`blocks.N.`).
pub const BLOCK_PARTS: [Part; 19] = [
    part("self_attn.q", "attn1.to_q", Kind::Linear),
    part("self_attn.k", "attn1.to_k", Kind::Linear),
    part("self_attn.v", "attn1.to_v", Kind::Linear),
    part("self_attn.o", "attn1.to_out.0", Kind::Linear),
    part("cross_attn.q", "attn2.to_q", Kind::Linear),
    part("cross_attn.k", "attn2.to_k", Kind::Linear),
    part("cross_attn.v", "attn2.to_v", Kind::Linear),
    part("cross_attn.o", "attn2.to_out.0", Kind::Linear),
    part("cross_attn.k_img", "attn2.add_k_proj", Kind::Linear),
    part("cross_attn.v_img", "attn2.add_v_proj", Kind::Linear),
    part("ffn.0", "ffn.net.0.proj", Kind::Linear),
    part("ffn.2", "ffn.net.2", Kind::Linear),
    part("self_attn.norm_q", "attn1.norm_q", Kind::Layer),
    part("self_attn.norm_k", "attn1.norm_k", Kind::Layer),
    part("cross_attn.norm_q", "attn2.norm_q", Kind::Layer),
    part("cross_attn.norm_k", "attn2.norm_k", Kind::Layer),
    part("cross_attn.norm_k_img", "attn2.norm_added_k", Kind::Layer),
    part("norm3", "norm2", Kind::Layer),
    part("modulation", "scale_shift_table", Kind::Parameter),
];

/// The parts outside the blocks.
pub const TOP_PARTS: [Part; 13] = [
    part("text_embedding.0", "condition_embedder.text_embedder.linear_1", Kind::Linear),
    part("text_embedding.2", "condition_embedder.text_embedder.linear_2", Kind::Linear),
    part("time_embedding.0", "condition_embedder.time_embedder.linear_1", Kind::Linear),
    part("time_embedding.2", "condition_embedder.time_embedder.linear_2", Kind::Linear),
    part("time_projection.1", "condition_embedder.time_proj", Kind::Linear),
    part("head.head", "proj_out", Kind::Linear),
    part("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj", Kind::Linear),
    part("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2", Kind::Linear),
    part("patch_embedding", "patch_embedding", Kind::Layer),
    part("img_emb.proj.0", "condition_embedder.image_embedder.norm1", Kind::Layer),
    part("img_emb.proj.4", "condition_embedder.image_embedder.norm2", Kind::Layer),
    part("head.modulation", "scale_shift_table", Kind::Parameter),
    part("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed", Kind::Parameter),
];

/// A part of the model found by name: the part, and its block where it is in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub block: Option<usize>,
    pub part: &'static Part,
}

impl Located {
    /// The part's name in the transformer (`blocks.3.attn1.to_q`).
    pub fn diffusers(&self) -> String {
        self.name(self.part.diffusers)
    }

    /// The part's official name (`blocks.3.self_attn.q`).
    pub fn original(&self) -> String {
        self.name(self.part.original)
    }

    fn name(&self, relative: &str) -> String {
        match self.block {
            Some(i) => format!("blocks.{i}.{relative}"),
            None => relative.to_string(),
        }
    }
}

/// `blocks.N.rest` split into N (decimal digits only) and the rest.
fn split_block(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = name.strip_prefix("blocks.")?.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, rest))
}

/// The part named `name` (a module or parameter, not a tensor), by the names `name_of` picks.
fn locate(name: &str, name_of: fn(&Part) -> &'static str) -> Option<Located> {
    if let Some((index, rest)) = split_block(name) {
        let part = BLOCK_PARTS.iter().find(|p| name_of(p) == rest)?;
        return Some(Located { block: Some(index), part });
    }
    let part = TOP_PARTS.iter().find(|p| name_of(p) == name)?;
    Some(Located { block: None, part })
}

/// The part an official module or parameter name (`blocks.0.self_attn.q`, `head.modulation`) names.
pub fn original_part(name: &str) -> Option<Located> {
    locate(name, |p| p.original)
}

/// A tensor name split into its part and, for a layer, the tensor's tail (`weight`, `bias`).
fn tensor(name: &str, name_of: fn(&Part) -> &'static str) -> Option<(Located, Option<&str>)> {
    if let Some(located) = locate(name, name_of).filter(|l| l.part.kind == Kind::Parameter) {
        return Some((located, None));
    }
    let (module, tail) = name.rsplit_once('.')?;
    if !matches!(tail, "weight" | "bias") {
        return None;
    }
    let located = locate(module, name_of).filter(|l| l.part.kind != Kind::Parameter)?;
    Some((located, Some(tail)))
}

fn join(module: String, tail: Option<&str>) -> String {
    match tail {
        Some(tail) => format!("{module}.{tail}"),
        None => module,
    }
}

/// The transformer's name for a tensor of an official checkpoint (`blocks.0.self_attn.q.weight` →
/// `blocks.0.attn1.to_q.weight`, `head.modulation` → `scale_shift_table`); `None` for a name that is no tensor of
/// the table's parts.
pub fn tensor_to_diffusers(name: &str) -> Option<String> {
    let (located, tail) = tensor(name, |p| p.original)?;
    Some(join(located.diffusers(), tail))
}

/// The official name of a tensor of the transformer (the inverse of [`tensor_to_diffusers`]).
pub fn tensor_to_original(name: &str) -> Option<String> {
    let (located, tail) = tensor(name, |p| p.diffusers)?;
    Some(join(located.original(), tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_map_both_ways() {
        let cases = [
            ("blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"),
            ("blocks.12.self_attn.o.bias", "blocks.12.attn1.to_out.0.bias"),
            ("blocks.1.cross_attn.k.weight", "blocks.1.attn2.to_k.weight"),
            ("blocks.1.cross_attn.k_img.weight", "blocks.1.attn2.add_k_proj.weight"),
            ("blocks.1.cross_attn.v_img.bias", "blocks.1.attn2.add_v_proj.bias"),
            ("blocks.1.cross_attn.norm_k_img.weight", "blocks.1.attn2.norm_added_k.weight"),
            ("blocks.0.self_attn.norm_q.weight", "blocks.0.attn1.norm_q.weight"),
            ("blocks.0.cross_attn.norm_k.weight", "blocks.0.attn2.norm_k.weight"),
            ("blocks.39.norm3.bias", "blocks.39.norm2.bias"),
            ("blocks.2.modulation", "blocks.2.scale_shift_table"),
            ("blocks.2.ffn.0.weight", "blocks.2.ffn.net.0.proj.weight"),
            ("blocks.2.ffn.2.bias", "blocks.2.ffn.net.2.bias"),
            ("patch_embedding.weight", "patch_embedding.weight"),
            ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),
            ("text_embedding.2.bias", "condition_embedder.text_embedder.linear_2.bias"),
            ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight"),
            ("time_embedding.2.weight", "condition_embedder.time_embedder.linear_2.weight"),
            ("time_projection.1.weight", "condition_embedder.time_proj.weight"),
            ("head.head.weight", "proj_out.weight"),
            ("head.modulation", "scale_shift_table"),
            ("img_emb.proj.0.weight", "condition_embedder.image_embedder.norm1.weight"),
            ("img_emb.proj.1.bias", "condition_embedder.image_embedder.ff.net.0.proj.bias"),
            ("img_emb.proj.3.weight", "condition_embedder.image_embedder.ff.net.2.weight"),
            ("img_emb.proj.4.bias", "condition_embedder.image_embedder.norm2.bias"),
            ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(tensor_to_diffusers(original).as_deref(), Some(diffusers), "{original}");
            assert_eq!(tensor_to_original(diffusers).as_deref(), Some(original), "{diffusers}");
        }
    }

    #[test]
    fn other_names_are_no_tensor() {
        for name in [
            "blocks.0.self_attn.q",
            "blocks.0.self_attn.q.lora_down.weight",
            "blocks.0.modulation.weight",
            "head.modulation.bias",
            "blocks.x.self_attn.q.weight",
            "blocks.+1.self_attn.q.weight",
            "blocks..self_attn.q.weight",
            "blocks.0.norm2.weight",
            "blocks.0.attn1.to_q.weight",
            "vace_blocks.0.after_proj.weight",
            "model.diffusion_model.head.head.weight",
            "img_emb.proj.2.weight",
        ] {
            assert_eq!(tensor_to_diffusers(name), None, "{name}");
        }
        assert_eq!(tensor_to_original("blocks.0.norm3.weight"), None);
        assert_eq!(tensor_to_original("blocks.0.self_attn.q.weight"), None);
    }

    /// Each name appears once on each side, so the mapping is one to one.
    #[test]
    fn names_are_unique() {
        for parts in [&BLOCK_PARTS[..], &TOP_PARTS[..]] {
            for (i, a) in parts.iter().enumerate() {
                for b in &parts[i + 1..] {
                    assert!(a.original != b.original && a.diffusers != b.diffusers, "{a:?} / {b:?}");
                }
            }
        }
    }
}
