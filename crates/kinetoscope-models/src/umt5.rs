//! The umT5 text encoder that turns Wan's prompt into the transformer's cross-attention context.
//!
//! umT5 ("UniMax", <https://arxiv.org/abs/2304.09151>) is T5 v1.1
//! (<https://arxiv.org/abs/1910.10683>) with one change that matters here: every layer owns its
//! relative position bias instead of reusing the first layer's. Reference: transformers'
//! `UMT5EncoderModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/umt5/modeling_umt5.py>),
//! which diffusers' `WanPipeline` loads from the checkpoint's `text_encoder/` folder.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::layers::attention;

/// The text encoder's `config.json`, with transformers' `UMT5Config` defaults for absent fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    pub feed_forward_proj: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vocab_size: 250112,
            d_model: 512,
            d_kv: 64,
            d_ff: 1024,
            num_layers: 8,
            num_heads: 6,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".to_string(),
        }
    }
}

/// T5's layer norm: a scale by the root mean square, with neither mean subtraction nor bias.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The statistics are taken in f32 so that half-precision activations do not overflow.
        let x32 = x.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
    }
}

/// Self-attention with a learned bias per (head, relative position bucket) and no 1/√d scaling: T5
/// folds the scale into the initialization of `q`.
#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    relative_attention_bias: Embedding,
    num_heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            relative_attention_bias: embedding(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                vb.pp("relative_attention_bias"),
            )?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `buckets` is the `[len, len]` table of relative position buckets (key minus query).
    fn forward(&self, x: &Tensor, buckets: &Tensor) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let heads = |t: Tensor| t.reshape((batch, len, self.num_heads, self.d_kv))?.transpose(1, 2);
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        // [len, len, heads] -> [1, heads, len, len]
        let bias = self.relative_attention_bias.forward(buckets)?.permute((2, 0, 1))?.unsqueeze(0)?;
        let out = attention(&q, &k, &v, Some(&bias), 1.0)?;
        let out = out.transpose(1, 2)?.reshape((batch, len, self.num_heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

/// The gated GELU feed-forward of T5 v1.1: `wo(gelu_tanh(wi_0·x) ⊙ wi_1·x)`.
#[derive(Debug, Clone)]
struct GatedGeluFeedForward {
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl GatedGeluFeedForward {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            wi_0: linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_0"))?,
            wi_1: linear_no_bias(cfg.d_model, cfg.d_ff, vb.pp("wi_1"))?,
            wo: linear_no_bias(cfg.d_ff, cfg.d_model, vb.pp("wo"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, transformers' "gelu_new".
        let gate = self.wi_0.forward(x)?.gelu()?;
        self.wo.forward(&(gate * self.wi_1.forward(x)?)?)
    }
}

/// One encoder block: pre-norm self-attention, then pre-norm feed-forward, each added to the
/// residual stream.
#[derive(Debug, Clone)]
struct Block {
    attn_norm: LayerNorm,
    attn: SelfAttention,
    ff_norm: LayerNorm,
    ff: GatedGeluFeedForward,
}

impl Block {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (attn, ff) = (vb.pp("layer").pp(0), vb.pp("layer").pp(1));
        Ok(Self {
            attn_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, attn.pp("layer_norm"))?,
            attn: SelfAttention::new(cfg, attn.pp("SelfAttention"))?,
            ff_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, ff.pp("layer_norm"))?,
            ff: GatedGeluFeedForward::new(cfg, ff.pp("DenseReluDense"))?,
        })
    }

    fn forward(&self, x: &Tensor, buckets: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?, buckets)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }
}

/// The umT5 encoder stack: token embedding, `num_layers` blocks, final layer norm.
#[derive(Debug, Clone)]
pub struct UMT5Encoder {
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    final_layer_norm: LayerNorm,
    num_buckets: usize,
    max_distance: usize,
}

impl UMT5Encoder {
    /// `vb` is rooted at the checkpoint's top level (`shared.weight`, `encoder.block.N...`).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if cfg.feed_forward_proj != "gated-gelu" {
            candle_core::bail!(
                "umT5 config: feed_forward_proj {:?} is not supported (only \"gated-gelu\")",
                cfg.feed_forward_proj
            );
        }
        // The embedding is one tensor tied between `shared` and `encoder.embed_tokens`;
        // transformers' own checkpoints (and Wan's diffusers ones) save it once as `shared.weight`,
        // other exporters under the encoder's name.
        let embed_vb =
            if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { vb.pp("encoder").pp("embed_tokens") };
        let encoder = vb.pp("encoder");
        let blocks =
            (0..cfg.num_layers).map(|i| Block::new(cfg, encoder.pp("block").pp(i))).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: embedding(cfg.vocab_size, cfg.d_model, embed_vb)?,
            blocks,
            final_layer_norm: LayerNorm::new(cfg.d_model, cfg.layer_norm_epsilon, encoder.pp("final_layer_norm"))?,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// `[batch, len]` u32 token ids → `[batch, len, d_model]` last hidden state.
    ///
    /// The ids are the prompt's true tokens, unpadded, and no attention mask is taken. The Wan
    /// pipeline pads to `max_sequence_length`, masks the padded keys and then keeps only the first
    /// `n` rows; since the mask removes every padded key from the softmax and everything else is
    /// per token or depends only on relative position, encoding the `n` true tokens alone gives
    /// those same rows (the parity test checks it). Batch entries must therefore share one length.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        let buckets = relative_position_buckets(len, self.num_buckets, self.max_distance, input_ids.device())?;
        let mut x = self.embed_tokens.forward(input_ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &buckets)?;
        }
        self.final_layer_norm.forward(&x)
    }
}

/// The `[len, len]` table of buckets for key position minus query position.
fn relative_position_buckets(len: usize, num_buckets: usize, max_distance: usize, device: &Device) -> Result<Tensor> {
    let buckets: Vec<u32> = (0..len as i64)
        .flat_map(|query| {
            (0..len as i64).map(move |key| relative_position_bucket(key - query, num_buckets, max_distance))
        })
        .collect();
    Tensor::from_vec(buckets, (len, len), device)
}

/// T5's bidirectional bucketing of a relative position (key minus query): half the buckets for keys
/// after the query, half for keys before; within each half, exact distances below a quarter of
/// `num_buckets`, then logarithmically wider bins up to `max_distance`, beyond which all distances
/// share the last bucket.
fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = num_buckets / 2;
    let side = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    let offset = if distance < max_exact {
        distance
    } else {
        // Computed in f32 with the log of the range in f64, as transformers does, so that distances
        // on a bin boundary truncate to the same bucket.
        let range_log = (max_distance as f64 / max_exact as f64).ln() as f32;
        let log_ratio = (distance as f32 / max_exact as f32).ln() / range_log;
        let large = max_exact + (log_ratio * (half - max_exact) as f32) as usize;
        large.min(half - 1)
    };
    (side + offset) as u32
}

/// The encoder's weights from one file instead of a `text_encoder/` folder (`--text-encoder-weights`): safetensors
/// under transformers' names (`encoder.block.0.layer.0.SelfAttention.q.weight`, `shared.weight`) in f32, f16, bf16
/// or FP8, plain or scaled (ComfyUI's `umt5_xxl_*.safetensors`), or GGUF under llama.cpp's T5 names
/// (`enc.blk.0.attn_q.weight`, `token_embd.weight`: city96's `umt5-xxl-encoder-*.gguf`), any type
/// [`crate::checkpoint`] reads. Served dense in `dtype`: the encoder runs once per prompt. A decoder's tensors are
/// left out; any other key that names no tensor of the encoder is refused.
pub fn file_weights(path: &std::path::Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let (checkpoint, keys) = file_tensors(path)?;
    let label = format!("umT5 text encoder file {}", path.display());
    Ok(crate::checkpoint::renamed_weights(checkpoint, keys, label, |_| String::new(), dtype, device).0)
}

/// The file [`file_weights`] reads, its header checked, and its keys by the encoder's names.
pub fn file_tensors(
    path: &std::path::Path,
) -> Result<(std::sync::Arc<crate::checkpoint::Checkpoint>, std::collections::HashMap<String, String>)> {
    use crate::checkpoint::{Checkpoint, Limits};
    let label = format!("umT5 text encoder file {}", path.display());
    let context = |e: candle_core::Error| candle_core::Error::Msg(format!("{label}: {e}"));
    let checkpoint = Checkpoint::open(path, &Limits::default()).map_err(context)?;
    if let Some(architecture) = checkpoint.architecture().filter(|a| !a.starts_with("t5")) {
        return Err(context(candle_core::Error::Msg(format!(
            "its GGUF architecture is {architecture:?}, not a T5 encoder (\"t5encoder\")"
        ))));
    }
    let mut keys = std::collections::HashMap::new();
    let mut unknown = Vec::new();
    for key in checkpoint.tensors().keys() {
        match transformers_name(key) {
            Some(name) => {
                keys.insert(name, key.clone());
            }
            None if key.starts_with("decoder.") || key == "lm_head.weight" => {}
            None => unknown.push(key.as_str()),
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(8).copied().collect();
        return Err(context(candle_core::Error::Msg(format!(
            "{} key(s) name no tensor of the umT5 encoder: {}",
            unknown.len(),
            shown.join(", ")
        ))));
    }
    Ok((checkpoint, keys))
}

/// `key`'s name in transformers' `UMT5EncoderModel`: itself for those names, or the name of a llama.cpp T5 tensor.
fn transformers_name(key: &str) -> Option<String> {
    if key == "shared.weight" || key.starts_with("encoder.") {
        return Some(key.to_string());
    }
    match key {
        "token_embd.weight" => return Some("shared.weight".into()),
        "enc.output_norm.weight" => return Some("encoder.final_layer_norm.weight".into()),
        _ => {}
    }
    let (block, part) = key.strip_prefix("enc.blk.")?.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let ours = match part {
        "attn_norm.weight" => "layer.0.layer_norm.weight",
        "attn_q.weight" => "layer.0.SelfAttention.q.weight",
        "attn_k.weight" => "layer.0.SelfAttention.k.weight",
        "attn_v.weight" => "layer.0.SelfAttention.v.weight",
        "attn_o.weight" => "layer.0.SelfAttention.o.weight",
        "attn_rel_b.weight" => "layer.0.SelfAttention.relative_attention_bias.weight",
        "ffn_norm.weight" => "layer.1.layer_norm.weight",
        "ffn_gate.weight" => "layer.1.DenseReluDense.wi_0.weight",
        "ffn_up.weight" => "layer.1.DenseReluDense.wi_1.weight",
        "ffn_down.weight" => "layer.1.DenseReluDense.wo.weight",
        _ => return None,
    };
    Some(format!("encoder.block.{block}.{ours}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_buckets(num_buckets: usize, max_distance: usize, positions: &[i64], buckets: &[u32]) {
        let got: Vec<u32> = positions.iter().map(|&p| relative_position_bucket(p, num_buckets, max_distance)).collect();
        assert_eq!(got, buckets, "{num_buckets} buckets, max distance {max_distance}");
    }

    /// Expected buckets printed by transformers 4.57.1:
    /// `UMT5Attention(UMT5Config(relative_attention_num_buckets=nb,
    /// relative_attention_max_distance=md, is_decoder=False),
    /// has_relative_attention_bias=True)._relative_position_bucket(torch.tensor(positions))`.
    #[test]
    fn buckets_match_transformers() {
        assert_buckets(
            32,
            128,
            &[0, 1, -1, 7, -7, 8, -8, 11, 12, 15, 16, -16, 23, 31, 32, -32, 63, 64, 100, 127, 128, -128, 511, -511],
            &[0, 17, 1, 23, 7, 24, 8, 24, 25, 25, 26, 10, 27, 27, 28, 12, 29, 30, 31, 31, 31, 15, 31, 15],
        );
        assert_buckets(
            16,
            20,
            &[0, 1, -1, 3, 4, -4, 5, 6, 8, 9, 12, 19, 20, -20, 39],
            &[0, 9, 1, 11, 12, 4, 12, 13, 13, 14, 14, 15, 15, 7, 15],
        );
    }

    #[test]
    fn config_defaults_and_unsupported_feed_forward() {
        let cfg: Config = serde_json::from_str(r#"{"d_model": 8, "feed_forward_proj": "relu"}"#).unwrap();
        assert_eq!(cfg.d_model, 8);
        assert_eq!(cfg.relative_attention_max_distance, 128);
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let err = UMT5Encoder::new(&cfg, vb).unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj") && err.contains("relu"), "{err}");
    }
}
