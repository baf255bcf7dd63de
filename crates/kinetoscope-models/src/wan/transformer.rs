//! The Wan spacetime transformer (the DiT of Wan 2.1 text-to-video, image-to-video and first-last-frame-to-video,
//! and of Wan 2.2 TI2V), in diffusers' layout.
//!
//! Paper: "Wan: Open and Advanced Large-Scale Video Generative Models", <https://arxiv.org/abs/2503.20314>.
//! Reference: diffusers' `WanTransformer3DModel`,
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/transformers/transformer_wan.py>.
//!
//! Latents `[B, C, T, H, W]` are cut into `patch_size` patches, one token each. Every block applies
//! self-attention with a 3D rotary embedding (time, height, width), cross-attention to the embedded prompt, and a
//! GELU feed-forward; the timestep modulates (shift, scale, gate) the self-attention and the feed-forward.
//! The timestep is one per batch item (Wan 2.1), or one per token (Wan 2.2 TI2V, whose image-conditioned
//! first frame is at timestep 0 while the rest is noisy): the modulation is then per token too.
//!
//! Wan 2.1 I2V and FLF2V (`image_dim` set) also condition on a CLIP image encoder's penultimate states
//! ([`crate::clip`]): an image embedder turns them into image tokens of the model's width, and each block's
//! cross-attention attends to them with its own key/value projections, adding the result to what it read from the
//! prompt. Their latents carry the conditioning frames in extra input channels (36 = noise 16 + mask 4 + image
//! latents 16), which the patch embedding takes like any others.
//!
//! LoRA adapters come in two ways: merged into the weights as they load ([`crate::lora::merged_var_builder`]), or
//! per generation at run time, the weights left alone: [`WanTransformer3DModel::prepare_adapters`], then
//! [`WanTransformer3DModel::embed_context_with_adapters`], whose [`Context`] carries them to every step (see
//! [`crate::layers`]).
//!
//! Precision follows diffusers: the time embedder, the modulation tables and the layer norms stay in f32 whatever
//! the weights' dtype (diffusers' `_keep_in_fp32_modules`), and normalization and modulation are computed in f32.

use std::ops::Range;

use candle_core::{bail, DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::compact::Compact;
use crate::layers::{attention, AdapterCache, Adapters, Linear};
use crate::lora::ScaledAdapter;

/// `transformer/config.json`, with diffusers' defaults for absent fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// (time, height, width) extent of one patch; a Conv3d with kernel = stride = this embeds each patch.
    #[serde(default = "default_patch_size")]
    pub patch_size: [usize; 3],
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// `null` means `in_channels`.
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "default_text_dim")]
    pub text_dim: usize,
    /// Width of the sinusoidal timestep embedding.
    #[serde(default = "default_freq_dim")]
    pub freq_dim: usize,
    #[serde(default = "default_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Whether `norm2` (before cross-attention) is an affine LayerNorm; otherwise the identity.
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    /// diffusers builds `norm_q`/`norm_k` (RMSNorm across all heads) whatever this says, and so does this model.
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Width of the image encoder's states (Wan 2.1 I2V / FLF2V: 1280); set, the model has an image embedder
    /// and needs image states. Set together with `added_kv_proj_dim`.
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// Input width of each cross-attention's key/value projections for the image tokens (`add_k_proj`,
    /// `add_v_proj`); the image tokens are embedded to the model's width, so it must equal `inner_dim()`.
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    /// Number of positions the rotary tables cover along each axis.
    #[serde(default = "default_rope_max_seq_len")]
    pub rope_max_seq_len: usize,
    /// Length of the image embedder's position embedding (FLF2V only: the first and the last frame's states
    /// joined into one sequence, 2 × 257). Ignored without `image_dim`.
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
    /// Wan VACE (`WanVACETransformer3DModel`): the main blocks after which the VACE blocks' hints are added, in
    /// the order of the VACE blocks; set, the model has the control branch (`vace_patch_embedding`,
    /// `vace_blocks`) and needs control latents ([`WanTransformer3DModel::with_control`]).
    #[serde(default)]
    pub vace_layers: Option<Vec<usize>>,
    /// Channels of the control latents (96 for Wan 2.1 VACE: the video's inactive and reactive latents, 16 + 16,
    /// and the mask cut into 8 × 8 sub-pixel channels, 64).
    #[serde(default = "default_vace_in_channels")]
    pub vace_in_channels: usize,
}

fn default_patch_size() -> [usize; 3] {
    [1, 2, 2]
}
fn default_num_attention_heads() -> usize {
    40
}
fn default_attention_head_dim() -> usize {
    128
}
fn default_channels() -> usize {
    16
}
fn default_out_channels() -> Option<usize> {
    Some(16)
}
fn default_text_dim() -> usize {
    4096
}
fn default_freq_dim() -> usize {
    256
}
fn default_ffn_dim() -> usize {
    13824
}
fn default_num_layers() -> usize {
    40
}
fn default_true() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".to_string())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_max_seq_len() -> usize {
    1024
}
fn default_vace_in_channels() -> usize {
    96
}

impl Config {
    /// Width of the token stream: heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Whether the model conditions on image states (Wan 2.1 I2V and FLF2V): `image_dim` is set.
    pub fn has_image_embedder(&self) -> bool {
        self.image_dim.is_some()
    }

    /// How many images' states [`WanTransformer3DModel::embed_context`] takes per sequence: 0 without an image
    /// embedder, 2 when its position embedding joins two (FLF2V: the first and the last frame), 1 otherwise (I2V).
    pub fn image_count(&self) -> usize {
        match (self.image_dim, self.pos_embed_seq_len) {
            (None, _) => 0,
            (Some(_), Some(_)) => 2,
            (Some(_), None) => 1,
        }
    }

    fn patch_volume(&self) -> usize {
        self.patch_size.iter().product()
    }
}

/// LayerNorm over the last axis, in f32 whatever the input dtype, without affine parameters (diffusers'
/// `FP32LayerNorm(elementwise_affine=False)`). Two passes (mean, then variance of the centred values) so that
/// a large mean does not eat the variance's precision.
fn layer_norm_f32(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let x = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `norm · (1 + scale) + shift`, the adaLN modulation, with `[B, 1, dim]` (one timestep per batch item) or
/// `[B, L, dim]` (one per token) shift and scale.
fn modulate(norm: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    norm.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// `x` through [`layer_norm_f32`] and [`modulate`], in `x`'s dtype: one fused kernel on the GPU in bf16.
fn modulated_layer_norm(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kinetoscope_kernels::kernels_enabled() && kinetoscope_kernels::fused_norms_support(x) {
        return kinetoscope_kernels::ada_layer_norm(x, shift, scale, eps as f32);
    }
    modulate(&layer_norm_f32(x, eps)?, shift, scale)?.to_dtype(x.dtype())
}

/// The residual stream `x` plus a block's output `y` times its gate (`[B, 1 or L, dim]` f32), summed in f32 as
/// diffusers does, in `x`'s dtype: one fused kernel on the GPU in bf16.
fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if kinetoscope_kernels::kernels_enabled() && kinetoscope_kernels::fused_norms_support(x) {
        return kinetoscope_kernels::gated_residual(x, y, gate);
    }
    (x.to_dtype(DType::F32)? + y.to_dtype(DType::F32)?.broadcast_mul(gate)?)?.to_dtype(x.dtype())
}

/// Sinusoidal timestep embedding `[cos(t·f), sin(t·f)]` with `f_i = 10000^(-i/half)`, `[N]` → `[N, dim]`, in f32.
///
/// diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`; the frequencies are rounded exactly as
/// its f32 arithmetic does (`-ln(10000)·i`, then `/ half`), because `t·f` with `t` near 1000 amplifies any
/// difference.
fn timestep_embedding(timesteps: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| (log_period * i as f32 / half as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.cos()?, args.sin()?], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// The 3D rotary position embedding: each head's channels are shared among the time, height and width axes,
/// each rotating interleaved pairs `(x[2i], x[2i+1])` at its own frequencies, by the token's integer patch index.
struct RotaryEmbedding {
    /// Per channel (both channels of a pair), the rotation frequency.
    freqs: Vec<f64>,
    /// Per channel, which axis (0 time, 1 height, 2 width) gives the position.
    axes: Vec<usize>,
    max_seq_len: usize,
}

impl RotaryEmbedding {
    const THETA: f64 = 10000.0;

    /// Channels per axis (`WanRotaryPosEmbed`): `2·(d/6)` for height and width, the rest for time; each axis's
    /// frequencies use that axis's own width. diffusers up to 0.35 indexed the tables by position with a split of
    /// `d/3` for height and width, which differs when `d ≡ 4 (mod 6)`; 0.42 uses these widths for both, and so
    /// does this model (every released Wan has d = 128, where the two agree).
    fn table_dims(head_dim: usize) -> [usize; 3] {
        let hw = 2 * (head_dim / 6);
        [head_dim - 2 * hw, hw, hw]
    }

    fn new(head_dim: usize, max_seq_len: usize) -> Result<Self> {
        if head_dim % 2 == 1 {
            bail!("Wan transformer: `attention_head_dim` {head_dim} must be even for the rotary embedding")
        }
        let mut freqs = Vec::with_capacity(head_dim);
        for dim in Self::table_dims(head_dim) {
            for k in (0..dim).step_by(2) {
                let f = 1.0 / Self::THETA.powf(k as f64 / dim as f64);
                freqs.extend([f, f]);
            }
        }
        let axes = Self::table_dims(head_dim)
            .into_iter()
            .enumerate()
            .flat_map(|(axis, n)| std::iter::repeat_n(axis, n))
            .collect();
        Ok(Self { freqs, axes, max_seq_len })
    }

    /// `(cos, sin)`, each `[T·H·W, head_dim/2]` f32, for a grid of `[T, H, W]` patches in row-major token order.
    ///
    /// Angles are computed in f64 and rounded to f32 as diffusers' tables are. Pair `i` takes its cosine from
    /// channel `2i` and its sine from channel `2i+1` (diffusers' `apply_rotary_emb`); both hold the same angle.
    fn tables(&self, grid: [usize; 3], device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some(n) = grid.iter().find(|&&n| n > self.max_seq_len) {
            bail!(
                "Wan transformer: a patch grid of {grid:?} exceeds `rope_max_seq_len` {} ({n} positions)",
                self.max_seq_len
            )
        }
        let half = self.freqs.len() / 2;
        let per_axis = |channel: usize, f: fn(f64) -> f64| -> Vec<f32> {
            let freq = self.freqs[channel];
            (0..grid[self.axes[channel]]).map(|p| f(p as f64 * freq) as f32).collect()
        };
        let cos_by_pos: Vec<Vec<f32>> = (0..half).map(|i| per_axis(2 * i, f64::cos)).collect();
        let sin_by_pos: Vec<Vec<f32>> = (0..half).map(|i| per_axis(2 * i + 1, f64::sin)).collect();
        let len = grid.iter().product::<usize>();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for t in 0..grid[0] {
            for h in 0..grid[1] {
                for w in 0..grid[2] {
                    let pos = [t, h, w];
                    for i in 0..half {
                        cos.push(cos_by_pos[i][pos[self.axes[2 * i]]]);
                        sin.push(sin_by_pos[i][pos[self.axes[2 * i + 1]]]);
                    }
                }
            }
        }
        Ok((Tensor::from_vec(cos, (len, half), device)?, Tensor::from_vec(sin, (len, half), device)?))
    }
}

/// Rotary tables for one forward pass: `[L, head_dim/2]` f32 each.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// `[L, head_dim]`, each row its cosines then its sines: the table the fused norm-and-rotate kernel reads,
    /// made once per forward pass where that kernel runs.
    #[cfg(feature = "cuda")]
    cos_sin: Option<Tensor>,
}

impl Rope {
    fn new(cos: Tensor, sin: Tensor, dtype: DType) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let fused = kinetoscope_kernels::kernels_enabled() && cos.device().is_cuda() && dtype == DType::BF16;
            let cos_sin = if fused { Some(Tensor::cat(&[&cos, &sin], 1)?) } else { None };
            Ok(Rope { cos, sin, cos_sin })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = dtype;
            Ok(Rope { cos, sin })
        }
    }

    /// Rotates `[B, H, L, D]`; in f32, as diffusers multiplies by its f32 tables before casting back.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let rotated = candle_nn::rotary_emb::rope_i(&x.to_dtype(DType::F32)?.contiguous()?, &self.cos, &self.sin)?;
        rotated.to_dtype(x.dtype())
    }
}

/// Multi-head attention with RMSNorm over the full width of q and k (`rms_norm_across_heads`).
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    /// The image tokens' keys and values (the cross-attention of an image-conditioned model).
    image: Option<ImageKeyValues>,
    heads: usize,
    eps: f32,
}

/// `add_k_proj`, `add_v_proj` and `norm_added_k` (RMSNorm across heads, like `norm_k`).
struct ImageKeyValues {
    add_k_proj: Linear,
    add_v_proj: Linear,
    norm_added_k: Tensor,
}

impl Attention {
    /// With `image_kv`, also the image tokens' key/value projections (`added_kv_proj_dim` wide).
    fn new(cfg: &Config, image_kv: bool, vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let dim = cfg.inner_dim();
        let image = match cfg.added_kv_proj_dim {
            Some(kv_dim) if image_kv => Some(ImageKeyValues {
                add_k_proj: Linear::load(kv_dim, dim, vb.pp("add_k_proj"), compact)?,
                add_v_proj: Linear::load(kv_dim, dim, vb.pp("add_v_proj"), compact)?,
                norm_added_k: vb.pp("norm_added_k").get(dim, "weight")?,
            }),
            _ => None,
        };
        Ok(Self {
            to_q: Linear::load(dim, dim, vb.pp("to_q"), compact)?,
            to_k: Linear::load(dim, dim, vb.pp("to_k"), compact)?,
            to_v: Linear::load(dim, dim, vb.pp("to_v"), compact)?,
            to_out: Linear::load(dim, dim, vb.pp("to_out").pp(0), compact)?,
            norm_q: vb.pp("norm_q").get(dim, "weight")?,
            norm_k: vb.pp("norm_k").get(dim, "weight")?,
            image,
            heads: cfg.num_attention_heads,
            eps: cfg.eps as f32,
        })
    }

    /// `x` `[B, L, dim]` RMS-normalized across heads with `weight`, as `[B, heads, L, head_dim]`, rotated when
    /// `rope` is given: one fused kernel on the GPU in bf16.
    fn normed_heads(&self, x: &Tensor, weight: &Tensor, rope: Option<&Rope>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(cos_sin) = rope.and_then(|rope| rope.cos_sin.as_ref()) {
            if kinetoscope_kernels::fused_norms_support(x) {
                let head_dim = x.dim(D::Minus1)? / self.heads;
                return self.split_heads(&kinetoscope_kernels::rms_norm_rope(x, weight, cos_sin, head_dim, self.eps)?);
            }
        }
        let x = self.split_heads(&candle_nn::ops::rms_norm(x, weight, self.eps)?)?;
        match rope {
            Some(rope) => rope.apply(&x),
            None => Ok(x),
        }
    }

    /// `[B, L, dim]` → `[B, heads, L, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, ()))?.transpose(1, 2)
    }

    /// Queries from `x`, keys and values from `context`; the rotary embedding, when given, turns q and k. With
    /// `image` tokens (and the projections for them), the same queries also attend to the image's keys and values
    /// on their own, and the two results are summed before the output projection.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        image: Option<&Tensor>,
        rope: Option<&Rope>,
        adapters: &Adapters,
    ) -> Result<Tensor> {
        let q = self.normed_heads(&self.to_q.forward(x, adapters)?, &self.norm_q, rope)?;
        let k = self.normed_heads(&self.to_k.forward(context, adapters)?, &self.norm_k, rope)?;
        let v = self.split_heads(&self.to_v.forward(context, adapters)?)?;
        let mut out = Self::attend(&q, &k, &v)?;
        if let (Some(kv), Some(image)) = (&self.image, image) {
            let k = self.normed_heads(&kv.add_k_proj.forward(image, adapters)?, &kv.norm_added_k, None)?;
            let v = self.split_heads(&kv.add_v_proj.forward(image, adapters)?)?;
            out = (out + Self::attend(&q, &k, &v)?)?;
        }
        self.to_out.forward(&out, adapters)
    }

    /// Its linear layers, for adapters.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        let image = self.image.iter().flat_map(|kv| [&kv.add_k_proj, &kv.add_v_proj]);
        [&self.to_q, &self.to_k, &self.to_v, &self.to_out].into_iter().chain(image)
    }

    /// Attention over `[B, heads, L, head_dim]`, with the heads merged back: `[B, L_q, dim]`.
    fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let out = attention(q, k, v, None, scale)?;
        let (b, _, l, _) = out.dims4()?;
        out.transpose(1, 2)?.reshape((b, l, ()))
    }
}

/// Linear → GELU (tanh approximation) → Linear.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(cfg: &Config, vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            proj: Linear::load(dim, cfg.ffn_dim, vb.pp("net").pp(0).pp("proj"), compact)?,
            out: Linear::load(cfg.ffn_dim, dim, vb.pp("net").pp(2), compact)?,
        })
    }

    fn forward(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        // On the GPU in bf16: the product without its bias, then the bias add and GELU in one kernel.
        #[cfg(feature = "cuda")]
        if kinetoscope_kernels::kernels_enabled() && kinetoscope_kernels::bias_gelu_support(x) {
            let h = match self.proj.forward_unbiased(x, adapters)? {
                (product, Some(bias)) => kinetoscope_kernels::bias_gelu(&product, bias)?,
                (product, None) => product.gelu()?,
            };
            return self.out.forward(&h, adapters);
        }
        self.out.forward(&self.proj.forward(x, adapters)?.gelu()?, adapters)
    }
}

/// diffusers' affine `FP32LayerNorm` (`norm2`): weight and bias kept in f32, output in f32.
struct AffineLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl AffineLayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let vb = vb.to_dtype(DType::F32);
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }
}

impl Module for AffineLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_f32(x, self.eps)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

struct TransformerBlock {
    attn1: Attention,
    attn2: Attention,
    /// `None` when `cross_attn_norm` is false (diffusers' `nn.Identity`).
    norm2: Option<AffineLayerNorm>,
    ffn: FeedForward,
    /// `[1, 1, 6, dim]` f32: learned offsets of (shift, scale, gate) for attention, then for the feed-forward.
    scale_shift_table: Tensor,
    eps: f64,
}

impl TransformerBlock {
    fn new(cfg: &Config, vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let dim = cfg.inner_dim();
        let norm2 = if cfg.cross_attn_norm { Some(AffineLayerNorm::new(dim, cfg.eps, vb.pp("norm2"))?) } else { None };
        Ok(Self {
            attn1: Attention::new(cfg, false, vb.pp("attn1"), compact)?,
            attn2: Attention::new(cfg, true, vb.pp("attn2"), compact)?,
            norm2,
            ffn: FeedForward::new(cfg, vb.pp("ffn"), compact)?,
            scale_shift_table: vb.to_dtype(DType::F32).get((1, 6, dim), "scale_shift_table")?.unsqueeze(0)?,
            eps: cfg.eps,
        })
    }

    /// `x` `[B, L, dim]`, `context` `[B, L_text (+ L_image), dim]`, `timestep_proj` `[B, 1 or L, 6, dim]`.
    fn forward(&self, x: &Tensor, context: &Context, timestep_proj: &Tensor, rope: &Rope) -> Result<Tensor> {
        let dtype = x.dtype();
        let [shift, scale, gate, ff_shift, ff_scale, ff_gate] = modulation(&self.scale_shift_table, timestep_proj)?;

        let h = modulated_layer_norm(x, &shift, &scale, self.eps)?;
        let adapters = &context.adapters;
        let attn = self.attn1.forward(&h, &h, None, Some(rope), adapters)?;
        let x = gated_residual(x, &attn, &gate)?;

        let h = match &self.norm2 {
            Some(norm) => norm.forward(&x)?.to_dtype(dtype)?,
            None => x.clone(),
        };
        let x = (&x + self.attn2.forward(&h, &context.text, context.image.as_ref(), None, adapters)?)?;

        let h = modulated_layer_norm(&x, &ff_shift, &ff_scale, self.eps)?;
        let ff = self.ffn.forward(&h, adapters)?;
        gated_residual(&x, &ff, &ff_gate)
    }

    /// Its linear layers, for adapters.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.attn1.linears().chain(self.attn2.linears()).chain([&self.ffn.proj, &self.ffn.out])
    }
}

/// diffusers' `WanVACETransformerBlock`: a transformer block over the control tokens (the same layers and keys as
/// a main block), which the first VACE block starts from its input projection of the control tokens plus the patch
/// tokens, and whose output each VACE block projects into a hint for the main stream.
struct VaceBlock {
    /// Only the first VACE block's.
    proj_in: Option<Linear>,
    block: TransformerBlock,
    proj_out: Linear,
}

/// VACE's control branch: control latents (the video to keep or follow, its mask, reference images) embedded as
/// tokens and run through blocks of their own beside the main stream, each adding a hint, times its conditioning
/// scale, to the main stream after one main block.
struct Vace {
    patch_embedding: PatchEmbedding,
    blocks: Vec<VaceBlock>,
    /// Per VACE block, the main block after which its hint is added: `vace_layers` in ascending order, because
    /// diffusers hands the hints out in the order of the main blocks, whatever order the config lists.
    layers: Vec<usize>,
}

impl Vace {
    fn new(cfg: &Config, layers: &[usize], vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let mut sorted = layers.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != layers.len() || sorted.first() != Some(&0) || sorted.last() >= Some(&cfg.num_layers) {
            bail!(
                "Wan VACE transformer config: `vace_layers` {layers:?} must name distinct main blocks of 0..{}, \
                 block 0 among them",
                cfg.num_layers
            )
        }
        let dim = cfg.inner_dim();
        let blocks = (0..layers.len())
            .map(|i| {
                let vb = vb.pp("vace_blocks").pp(i);
                let proj_in = match i {
                    0 => Some(Linear::load(dim, dim, vb.pp("proj_in"), compact)?),
                    _ => None,
                };
                Ok(VaceBlock {
                    proj_in,
                    block: TransformerBlock::new(cfg, vb.clone(), compact)?,
                    proj_out: Linear::load(dim, dim, vb.pp("proj_out"), compact)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let patch_embedding =
            PatchEmbedding::new(cfg.vace_in_channels, dim, cfg.patch_size, vb.pp("vace_patch_embedding"))?;
        Ok(Self { patch_embedding, blocks, layers: sorted })
    }

    /// Each VACE block's hint times its scale, with the main block it goes after. `tokens` are the main stream's
    /// patch tokens `[B, L, dim]`; the control tokens `[B, L_c ≤ L, dim]` are padded with zeros to `L` (diffusers
    /// lets the control latents cover fewer frames than the latents).
    fn hints(
        &self,
        tokens: &Tensor,
        control: &Control,
        context: &Context,
        timestep_proj: &Tensor,
        rope: &Rope,
    ) -> Result<Vec<(usize, Tensor)>> {
        let (b, l, dim) = tokens.dims3()?;
        let (cb, cl, _) = control.tokens.dims3()?;
        if cb != b || cl > l {
            bail!(
                "Wan VACE transformer: control tokens of shape {:?} do not fit the latents' {:?} (the same batch and at \
                 most as many tokens)",
                control.tokens.dims(),
                tokens.dims()
            )
        }
        let mut x = match cl < l {
            true => {
                Tensor::cat(&[&control.tokens, &Tensor::zeros((b, l - cl, dim), tokens.dtype(), tokens.device())?], 1)?
            }
            false => control.tokens.clone(),
        };
        let mut hints = Vec::with_capacity(self.blocks.len());
        for ((vace, &layer), &scale) in self.blocks.iter().zip(&self.layers).zip(&control.scales) {
            if let Some(proj_in) = &vace.proj_in {
                x = (proj_in.forward(&x, &context.adapters)? + tokens)?;
            }
            x = vace.block.forward(&x, context, timestep_proj, rope)?;
            hints.push((layer, (vace.proj_out.forward(&x, &context.adapters)? * scale)?));
        }
        Ok(hints)
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().flat_map(|vace| vace.proj_in.iter().chain(vace.block.linears()).chain([&vace.proj_out]))
    }
}

/// A Conv3d whose kernel is its stride (`patch_embedding`, `vace_patch_embedding`), as a matmul over each patch's
/// values: the patches do not overlap.
struct PatchEmbedding {
    linear: candle_nn::Linear,
    in_channels: usize,
    patch_size: [usize; 3],
}

impl PatchEmbedding {
    fn new(in_channels: usize, dim: usize, patch_size: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let [pt, ph, pw] = patch_size;
        let weight = vb.get((dim, in_channels, pt, ph, pw), "weight")?;
        let linear = candle_nn::Linear::new(weight.reshape((dim, ()))?, Some(vb.get(dim, "bias")?));
        Ok(Self { linear, in_channels, patch_size })
    }

    /// `[B, C, T, H, W]` (`what` names it in errors) → tokens `[B, L, dim]` in (T', H', W') order, in `dtype`, and
    /// the patch grid.
    fn forward(&self, x: &Tensor, dtype: DType, what: &str) -> Result<(Tensor, [usize; 3])> {
        let (b, c, t, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.patch_size;
        if c != self.in_channels || t % pt != 0 || h % ph != 0 || w % pw != 0 {
            bail!(
                "Wan transformer: {what} of shape {:?} do not fit {} channels cut into {:?} patches",
                x.dims(),
                self.in_channels,
                self.patch_size
            )
        }
        let grid = [t / pt, h / ph, w / pw];
        // [B, C, T', pt, H', ph, W', pw] → each (C, pt, ph, pw) flattened as the Conv3d kernel is.
        let x = x
            .to_dtype(dtype)?
            .reshape(vec![b, c, grid[0], pt, grid[1], ph, grid[2], pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, grid.iter().product::<usize>(), ()))?;
        Ok((self.linear.forward(&x)?, grid))
    }
}

/// The table plus the timestep's projection, `[1, 1, N, dim]` + `[B, 1 or L, N, dim]`, cut into its N
/// `[B, 1 or L, dim]` parts, in f32.
fn modulation<const N: usize>(table: &Tensor, projection: &Tensor) -> Result<[Tensor; N]> {
    let sum = table.broadcast_add(&projection.to_dtype(DType::F32)?)?;
    let parts = sum.chunk(N, 2)?.into_iter().map(|part| part.squeeze(2)).collect::<Result<Vec<_>>>()?;
    Ok(parts.try_into().expect("N chunks of a dimension of size N"))
}

/// diffusers' `WanTimeTextImageEmbedding`.
struct ConditionEmbedder {
    freq_dim: usize,
    /// `time_embedder.linear_1` / `linear_2`, kept in f32.
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_proj: Linear,
    text_linear_1: Linear,
    text_linear_2: Linear,
    /// Present when `image_dim` is set.
    image_embedder: Option<ImageEmbedder>,
}

impl ConditionEmbedder {
    fn new(cfg: &Config, vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let dim = cfg.inner_dim();
        let time = vb.pp("time_embedder").to_dtype(DType::F32);
        let text = vb.pp("text_embedder");
        let image_embedder = match cfg.image_dim {
            Some(image_dim) => {
                Some(ImageEmbedder::new(image_dim, dim, cfg.pos_embed_seq_len, vb.pp("image_embedder"), compact)?)
            }
            None => None,
        };
        Ok(Self {
            freq_dim: cfg.freq_dim,
            time_linear_1: Linear::load(cfg.freq_dim, dim, time.pp("linear_1"), compact)?,
            time_linear_2: Linear::load(dim, dim, time.pp("linear_2"), compact)?,
            time_proj: Linear::load(dim, 6 * dim, vb.pp("time_proj"), compact)?,
            text_linear_1: Linear::load(cfg.text_dim, dim, text.pp("linear_1"), compact)?,
            text_linear_2: Linear::load(dim, dim, text.pp("linear_2"), compact)?,
            image_embedder,
        })
    }

    /// Timesteps `[B, N]` (N = 1, or one per token) → (`temb` `[B, N, dim]`, `timestep_proj` `[B, N, 6, dim]`),
    /// both in `dtype`.
    fn time(&self, timestep: &Tensor, dtype: DType, adapters: &Adapters) -> Result<(Tensor, Tensor)> {
        let (b, n) = timestep.dims2()?;
        let t = timestep_embedding(&timestep.flatten_all()?, self.freq_dim)?;
        let temb = self.time_linear_1.forward(&t, adapters)?.silu()?;
        let temb = self.time_linear_2.forward(&temb, adapters)?.to_dtype(dtype)?;
        let proj = self.time_proj.forward(&temb.silu()?, adapters)?;
        let dim = temb.dim(1)?;
        Ok((temb.reshape((b, n, dim))?, proj.reshape((b, n, 6, dim))?))
    }

    fn text(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        self.text_linear_2.forward(&self.text_linear_1.forward(x, adapters)?.gelu()?, adapters)
    }

    /// Its linear layers, for adapters.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        let image = self.image_embedder.iter().flat_map(|embedder| [&embedder.ff_proj, &embedder.ff_out]);
        [&self.time_linear_1, &self.time_linear_2, &self.time_proj, &self.text_linear_1, &self.text_linear_2]
            .into_iter()
            .chain(image)
    }
}

/// diffusers' `WanImageEmbedding`: image-encoder states `[N, L, image_dim]` → image tokens of the model's width,
/// through an affine LayerNorm, a GELU (erf) feed-forward as wide as its input, and another affine LayerNorm (both
/// norms diffusers' `FP32LayerNorm` with PyTorch's default eps 1e-5).
struct ImageEmbedder {
    norm1: AffineLayerNorm,
    /// `ff.net.0.proj`: `image_dim` → `image_dim`.
    ff_proj: Linear,
    /// `ff.net.2`: `image_dim` → `dim`.
    ff_out: Linear,
    norm2: AffineLayerNorm,
    /// `[1, pos_embed_seq_len, image_dim]` (FLF2V), added to two images' states joined into one sequence.
    pos_embed: Option<Tensor>,
    image_dim: usize,
}

impl ImageEmbedder {
    const EPS: f64 = 1e-5;

    fn new(
        image_dim: usize,
        dim: usize,
        pos_embed_seq_len: Option<usize>,
        vb: VarBuilder,
        compact: &Compact,
    ) -> Result<Self> {
        let pos_embed = match pos_embed_seq_len {
            Some(len) => Some(vb.get((1, len, image_dim), "pos_embed")?),
            None => None,
        };
        Ok(Self {
            norm1: AffineLayerNorm::new(image_dim, Self::EPS, vb.pp("norm1"))?,
            ff_proj: Linear::load(image_dim, image_dim, vb.pp("ff").pp("net").pp(0).pp("proj"), compact)?,
            ff_out: Linear::load(image_dim, dim, vb.pp("ff").pp("net").pp(2), compact)?,
            norm2: AffineLayerNorm::new(dim, Self::EPS, vb.pp("norm2"))?,
            pos_embed,
            image_dim,
        })
    }

    /// `[N, L, image_dim]` in the weights' dtype → `[N, L, dim]`; with a position embedding, each two consecutive
    /// images' states are one sequence: `[N/2, 2·L, dim]`.
    fn forward(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        let dtype = x.dtype();
        let (n, l, d) = x.dims3()?;
        if d != self.image_dim {
            bail!("Wan transformer: image states of shape {:?} are not `image_dim` = {} wide", x.dims(), self.image_dim)
        }
        let x = match &self.pos_embed {
            Some(pos_embed) => {
                let len = pos_embed.dim(1)?;
                if n % 2 == 1 || 2 * l != len {
                    bail!(
                        "Wan transformer: the image embedder joins the first and last images' states into one \
                         sequence of `pos_embed_seq_len` = {len} tokens; got states of shape {:?} (expected [2, {}, {d}])",
                        x.dims(),
                        len / 2
                    )
                }
                x.reshape((n / 2, len, d))?.broadcast_add(pos_embed)?
            }
            None => x.clone(),
        };
        let h = self.norm1.forward(&x)?.to_dtype(dtype)?;
        let h = self.ff_out.forward(&self.ff_proj.forward(&h, adapters)?.gelu_erf()?, adapters)?;
        self.norm2.forward(&h)?.to_dtype(dtype)
    }
}

/// What a generation conditions every step on, made once per generation by
/// [`WanTransformer3DModel::embed_context`]: the prompt's tokens and, for an image-conditioned model, the image's,
/// which every block's cross-attention reads; and the adapters every step runs with
/// ([`WanTransformer3DModel::embed_context_with_adapters`]), which embedded them.
#[derive(Debug, Clone)]
pub struct Context {
    text: Tensor,
    image: Option<Tensor>,
    adapters: Adapters,
    /// A VACE model's control tokens and scales ([`WanTransformer3DModel::with_control`]).
    control: Option<Control>,
}

/// A VACE model's control latents as tokens `[B, L_c, dim]`, and the conditioning scale of each VACE block.
#[derive(Debug, Clone)]
struct Control {
    tokens: Tensor,
    scales: Vec<f64>,
}

impl Context {
    /// `[B, L_text, dim]`, in the weights' dtype.
    pub fn text(&self) -> &Tensor {
        &self.text
    }

    /// `[B, L_image, dim]` (the same batch as the text), in the weights' dtype; `None` for a model without an image
    /// embedder.
    pub fn image(&self) -> Option<&Tensor> {
        self.image.as_ref()
    }

    /// The adapters the steps run with (none unless given to
    /// [`WanTransformer3DModel::embed_context_with_adapters`]).
    pub fn adapters(&self) -> &Adapters {
        &self.adapters
    }
}

/// One forward pass between its stages (made by [`WanTransformer3DModel::embed`]): the patch tokens, and the
/// context, timestep and rotary tables every block and the output projection use.
pub struct Embedded {
    tokens: Tensor,
    context: Context,
    temb: Tensor,
    timestep_proj: Tensor,
    rope: Rope,
    /// Patches along (time, height, width).
    grid: [usize; 3],
    /// The latents' (T, H, W), which the output is put back into.
    latent_size: [usize; 3],
    /// A VACE model's hints, each with the main block after which it is added, already times its scale.
    hints: Vec<(usize, Tensor)>,
}

impl Embedded {
    /// `[B, L, dim]` tokens after the patch embedding, in the weights' dtype: the input of the first block.
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }
}

/// The Wan transformer: text-to-video, or (with an image embedder) Wan 2.1 image-to-video and
/// first-last-frame-to-video.
pub struct WanTransformer3DModel {
    /// Adapters leave it alone (diffusers drops their `patch_embedding` deltas).
    patch_embedding: PatchEmbedding,
    condition_embedder: ConditionEmbedder,
    rope: RotaryEmbedding,
    blocks: Vec<TransformerBlock>,
    /// Wan VACE's control branch.
    vace: Option<Vace>,
    proj_out: Linear,
    /// `[1, 1, 2, dim]` f32: offsets of (shift, scale) for the output norm.
    scale_shift_table: Tensor,
    patch_size: [usize; 3],
    out_channels: usize,
    eps: f64,
    dtype: DType,
    /// The adapters prepared for this model's device and dtypes ([`Self::prepare_adapters`]).
    adapter_cache: AdapterCache,
}

impl WanTransformer3DModel {
    /// Loads the weights under `vb` (keys as in diffusers' checkpoint); they compute in `vb`'s dtype, except the
    /// parts diffusers keeps in f32.
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_compact(cfg, vb, &Compact::none())
    }

    /// [`Self::new`] with the linear layers' weights taken from `compact` where it holds them (GGUF, FP8, quantized
    /// on load), kept compact and dequantized as each layer runs.
    pub fn with_compact(cfg: &Config, vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let dim = cfg.inner_dim();
        match (cfg.image_dim, cfg.added_kv_proj_dim) {
            (Some(_), Some(kv)) if kv != dim => bail!(
                "Wan transformer config: `added_kv_proj_dim` = {kv} must equal the model's width (heads × head dim = \
                 {dim}), which the image tokens are embedded to"
            ),
            (Some(_), Some(_)) | (None, None) => {}
            (image_dim, added_kv_proj_dim) => bail!(
                "Wan transformer config: `image_dim` ({image_dim:?}) and `added_kv_proj_dim` ({added_kv_proj_dim:?}) \
                 must be set together (image conditioning) or both be null"
            ),
        }
        let patch_embedding = PatchEmbedding::new(cfg.in_channels, dim, cfg.patch_size, vb.pp("patch_embedding"))?;
        let vace = match &cfg.vace_layers {
            Some(layers) => Some(Vace::new(cfg, layers, vb.clone(), compact)?),
            None => None,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| TransformerBlock::new(cfg, vb.pp("blocks").pp(i), compact))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            condition_embedder: ConditionEmbedder::new(cfg, vb.pp("condition_embedder"), compact)?,
            rope: RotaryEmbedding::new(cfg.attention_head_dim, cfg.rope_max_seq_len)?,
            blocks,
            vace,
            proj_out: Linear::load(dim, cfg.out_channels() * cfg.patch_volume(), vb.pp("proj_out"), compact)?,
            scale_shift_table: vb.to_dtype(DType::F32).get((1, 2, dim), "scale_shift_table")?.unsqueeze(0)?,
            patch_size: cfg.patch_size,
            out_channels: cfg.out_channels(),
            eps: cfg.eps,
            dtype: vb.dtype(),
            adapter_cache: AdapterCache::new(),
        })
    }

    /// `adapters` at their scales, ready for [`Self::embed_context_with_adapters`]: the run-time path, which
    /// leaves the weights as they were loaded, so that one loaded model serves generations with different adapters
    /// (or none). Each adapter's factors are moved to the model's device and dtype the first time it is given and
    /// kept while its `Arc` lives elsewhere; after that this costs one concatenation of small tensors per layer the
    /// adapters change.
    ///
    /// Fails, naming the tensor, on an adapter that changes a tensor other than the weight or bias of a layer
    /// adapters apply to (see [`crate::wan::lora`]) or that does not fit it (one read against another model).
    pub fn prepare_adapters(&self, adapters: &[ScaledAdapter]) -> Result<Adapters> {
        self.adapter_cache
            .activate(adapters, self.linears())
            .map_err(|e| candle_core::Error::Msg(format!("Wan transformer: LoRA adapters at run time: {e}")))
    }

    /// The formats of the linear weights kept compact (`Q4_K`, `F8_E4M3`, ...), each once, sorted; empty for a
    /// dense model.
    pub fn compact_formats(&self) -> Vec<String> {
        let mut formats: Vec<String> = self.linears().filter_map(|l| l.compact().map(|w| w.format())).collect();
        formats.sort_unstable();
        formats.dedup();
        formats
    }

    /// Every layer adapters apply to at run time.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.condition_embedder
            .linears()
            .chain(self.blocks.iter().flat_map(TransformerBlock::linears))
            .chain(self.vace.iter().flat_map(Vace::linears))
            .chain([&self.proj_out])
    }

    /// Whether the model conditions on image states (an image embedder, and image key/value projections in every
    /// cross-attention): [`Self::embed_context`] then requires them.
    pub fn has_image_embedder(&self) -> bool {
        self.condition_embedder.image_embedder.is_some()
    }

    /// Embeds what cross-attention reads: text-encoder states `[B, L, text_dim]` to `[B, L, dim]`, and, for a
    /// model with an image embedder (and only then), the image encoder's penultimate states `image`
    /// `[N, L_clip, image_dim]` to image tokens. The same at every denoising step, so a pipeline computes it once
    /// and calls [`Self::forward_embedded`].
    ///
    /// `image` holds N = 1 image (I2V), or N = 2 (FLF2V: the first and the last frame, which the embedder's
    /// position embedding joins into one sequence of 2·L_clip tokens), shared by every row of the batch (as
    /// classifier-free guidance's conditional and unconditional rows share them): the image tokens are repeated
    /// to the text's batch B. Image states for each row (B images, or 2·B for FLF2V) are taken as they are.
    pub fn embed_context(&self, encoder_hidden_states: &Tensor, image: Option<&Tensor>) -> Result<Context> {
        self.embed_context_with_adapters(encoder_hidden_states, image, &Adapters::none())
    }

    /// [`Self::embed_context`] with `adapters` (from this model's [`Self::prepare_adapters`]), which the context
    /// carries: every step run with it ([`Self::forward_embedded`], or [`Self::embed`], [`Self::run_blocks`] and
    /// [`Self::project_out`]) runs with them, and a context made with other adapters (or none) runs without
    /// them, on the same model at the same time.
    ///
    /// Adapters add to what the weights hold: on a model whose weights have adapters merged in
    /// ([`crate::lora::merged_var_builder`]), these come on top.
    pub fn embed_context_with_adapters(
        &self,
        encoder_hidden_states: &Tensor,
        image: Option<&Tensor>,
        adapters: &Adapters,
    ) -> Result<Context> {
        self.adapter_cache.check(adapters).map_err(|e| candle_core::Error::Msg(format!("Wan transformer: {e}")))?;
        let text = self.condition_embedder.text(&encoder_hidden_states.to_dtype(self.dtype)?, adapters)?;
        let image = match (&self.condition_embedder.image_embedder, image) {
            (Some(embedder), Some(image)) => {
                let tokens = embedder.forward(&image.to_dtype(self.dtype)?, adapters)?;
                let (b, m) = (text.dim(0)?, tokens.dim(0)?);
                if m == b {
                    Some(tokens)
                } else if m == 1 {
                    Some(tokens.repeat((b, 1, 1))?)
                } else {
                    bail!(
                        "Wan transformer: image states of shape {:?} make {m} image sequences, which fit neither one \
                         shared by the batch nor one per row of the text's batch of {b}",
                        image.dims()
                    )
                }
            }
            (None, None) => None,
            (None, Some(_)) => bail!(
                "Wan transformer: image states were given to a model without an image embedder (its config has no \
                 `image_dim`)"
            ),
            (Some(embedder), None) => bail!(
                "Wan transformer: this model conditions on an image (`image_dim` = {}) and needs the image encoder's \
                 states",
                embedder.image_dim
            ),
        };
        Ok(Context { text, image, adapters: adapters.clone(), control: None })
    }

    /// How many VACE blocks the model has (each with its conditioning scale): 0 for a model without VACE's
    /// control branch.
    pub fn vace_blocks(&self) -> usize {
        self.vace.as_ref().map_or(0, |vace| vace.blocks.len())
    }

    /// `context` with a VACE model's control latents `[1 or B, vace_in_channels, T_c, H, W]` (B the text's batch;
    /// one is shared by every row, as classifier-free guidance's branches share it), embedded once for every step,
    /// and the conditioning scale of each VACE block ([`Self::vace_blocks`] of them). The control latents may
    /// cover fewer latent frames than the latents the steps run on, never more.
    pub fn with_control(&self, context: Context, latents: &Tensor, scales: &[f64]) -> Result<Context> {
        let Some(vace) = &self.vace else {
            bail!("Wan transformer: control latents were given to a model without VACE blocks (no `vace_layers`)")
        };
        if scales.len() != vace.blocks.len() {
            bail!(
                "Wan VACE transformer: {} conditioning scales for {} VACE blocks (one each, or one for all)",
                scales.len(),
                vace.blocks.len()
            )
        }
        let (tokens, _) = vace.patch_embedding.forward(latents, self.dtype, "control latents")?;
        let (b, n) = (context.text.dim(0)?, tokens.dim(0)?);
        let tokens = match n {
            _ if n == b => tokens,
            1 => tokens.repeat((b, 1, 1))?,
            _ => bail!("Wan VACE transformer: control latents for {n} rows do not fit the text's batch of {b}"),
        };
        Ok(Context { control: Some(Control { tokens, scales: scales.to_vec() }), ..context })
    }

    /// Predicts from latents `[B, C, T, H, W]`, timesteps (`[B]`, or `[B, L]` with one per token in token order:
    /// time, then height, then width of the patch grid) and the context embedded by [`Self::embed_context`];
    /// returns `[B, C_out, T, H, W]` in the weights' dtype.
    pub fn forward_embedded(&self, hidden_states: &Tensor, timestep: &Tensor, context: &Context) -> Result<Tensor> {
        let embedded = self.embed(hidden_states, timestep, context)?;
        let x = self.run_blocks(embedded.tokens(), 0..self.num_blocks(), &embedded)?;
        self.project_out(&x, &embedded)
    }

    /// Number of transformer blocks (`num_layers`).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The first stage of [`Self::forward_embedded`]: latents cut into patch tokens, the timestep and rotary
    /// tables that every block uses. Callers that run the blocks in parts (step caching) go on with
    /// [`Self::run_blocks`] and [`Self::project_out`].
    pub fn embed(&self, hidden_states: &Tensor, timestep: &Tensor, context: &Context) -> Result<Embedded> {
        if context.image.is_some() != self.has_image_embedder() {
            bail!("Wan transformer: the context was embedded by a model with a different image conditioning")
        }
        self.adapter_cache
            .check(&context.adapters)
            .map_err(|e| candle_core::Error::Msg(format!("Wan transformer: {e}")))?;
        let (b, _, t, h, w) = hidden_states.dims5()?;
        let (x, grid) = self.patch_embedding.forward(hidden_states, self.dtype, "latents")?;
        let tokens = x.dim(1)?;
        let timestep = match timestep.dims() {
            [n] if *n == b => timestep.unsqueeze(1)?,
            [n, l] if *n == b && *l == tokens => timestep.clone(),
            dims => bail!(
                "Wan transformer: expected timesteps of shape [{b}] (one per batch item) or [{b}, {tokens}] (one per \
                 token), got {dims:?}"
            ),
        };
        let (cos, sin) = self.rope.tables(grid, hidden_states.device())?;
        let rope = Rope::new(cos, sin, self.dtype)?;
        let (temb, timestep_proj) = self.condition_embedder.time(&timestep, self.dtype, &context.adapters)?;
        let hints = match (&self.vace, &context.control) {
            (Some(vace), Some(control)) => vace.hints(&x, control, context, &timestep_proj, &rope)?,
            (None, None) => Vec::new(),
            (Some(_), None) => bail!(
                "Wan transformer: this is a VACE model, which needs control latents (WanTransformer3DModel::with_control)"
            ),
            (None, Some(_)) => bail!("Wan transformer: control latents were given to a model without VACE blocks"),
        };
        Ok(Embedded {
            tokens: x,
            context: context.clone(),
            temb,
            timestep_proj,
            rope,
            grid,
            latent_size: [t, h, w],
            hints,
        })
    }

    /// Runs `x` (tokens `[B, L, dim]`, as from [`Embedded::tokens`] or an earlier `run_blocks`) through the
    /// blocks in `blocks`; the whole model is every block in order, in one call or several.
    pub fn run_blocks(&self, x: &Tensor, blocks: Range<usize>, embedded: &Embedded) -> Result<Tensor> {
        let Some(selected) = self.blocks.get(blocks.clone()) else {
            bail!("Wan transformer: blocks {blocks:?} are outside the model's 0..{}", self.blocks.len())
        };
        let mut x = x.clone();
        for (index, block) in blocks.zip(selected) {
            x = block.forward(&x, &embedded.context, &embedded.timestep_proj, &embedded.rope)?;
            for (_, hint) in embedded.hints.iter().filter(|(after, _)| *after == index) {
                x = (x + hint)?;
            }
        }
        Ok(x)
    }

    /// The last stage of [`Self::forward_embedded`]: tokens after the last block → the output norm, the
    /// projection and the patches put back, `[B, C_out, T, H, W]` in the weights' dtype.
    pub fn project_out(&self, x: &Tensor, embedded: &Embedded) -> Result<Tensor> {
        let [shift, scale] = modulation(&self.scale_shift_table, &embedded.temb.unsqueeze(2)?)?;
        let x = modulate(&layer_norm_f32(x, self.eps)?, &shift, &scale)?.to_dtype(self.dtype)?;
        let x = self.proj_out.forward(&x, &embedded.context.adapters)?;

        // Each token's (pt, ph, pw, C_out) values back to [B, C_out, T, H, W].
        let b = x.dim(0)?;
        let ([pt, ph, pw], grid, [t, h, w]) = (self.patch_size, embedded.grid, embedded.latent_size);
        x.reshape(vec![b, grid[0], grid[1], grid[2], pt, ph, pw, self.out_channels])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, self.out_channels, t, h, w))
    }

    /// [`Self::forward_embedded`] with the context embedded on the way (see [`Self::embed_context`]).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_embedded(hidden_states, timestep, &self.embed_context(encoder_hidden_states, image)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_split_for_head_dim_128() {
        assert_eq!(RotaryEmbedding::table_dims(128), [44, 42, 42]);
    }

    /// Where diffusers 0.35's position split (d/3 = 5 for height and width) differed from its tables; the
    /// fixture `wan22-t2v-a14b-tiny`'s low-noise expert (d = 16, diffusers 0.42) checks these widths.
    #[test]
    fn rope_split_for_head_dim_16() {
        assert_eq!(RotaryEmbedding::table_dims(16), [8, 4, 4]);
    }

    /// The first token sits at position 0 on every axis: no rotation.
    #[test]
    fn rope_tables_start_unrotated() -> Result<()> {
        let rope = RotaryEmbedding::new(16, 8)?;
        let (cos, sin) = rope.tables([2, 3, 4], &Device::Cpu)?;
        assert_eq!(cos.dims(), [24, 8]);
        assert!(cos.get(0)?.to_vec1::<f32>()?.iter().all(|&c| c == 1.0));
        assert!(sin.get(0)?.to_vec1::<f32>()?.iter().all(|&s| s == 0.0));
        assert!(rope.tables([9, 1, 1], &Device::Cpu).is_err());
        Ok(())
    }

    fn tiny_config(extra: &str) -> Config {
        let json = format!(
            r#"{{"num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
                "text_dim": 8, "freq_dim": 8, "ffn_dim": 16, "num_layers": 1{extra}}}"#
        );
        serde_json::from_str(&json).unwrap()
    }

    /// The tiny model with an image branch: CLIP states 10 wide, image tokens embedded to the model's 24.
    fn tiny_image_config(extra: &str) -> Config {
        tiny_config(&format!(r#", "image_dim": 10, "added_kv_proj_dim": 24{extra}"#))
    }

    /// A model from `cfg` with random weights, and the variables they live in.
    fn random_model(cfg: &Config) -> Result<(WanTransformer3DModel, candle_nn::VarMap)> {
        let varmap = candle_nn::VarMap::new();
        let model = WanTransformer3DModel::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        for var in varmap.all_vars() {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &Device::Cpu)?)?;
        }
        Ok((model, varmap))
    }

    #[test]
    fn image_conditioning_configs_are_checked() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        for (extra, needle) in [
            (r#", "image_dim": 16"#, "set together"),
            (r#", "added_kv_proj_dim": 24"#, "set together"),
            (r#", "image_dim": 16, "added_kv_proj_dim": 16"#, "must equal the model's width"),
        ] {
            let err = WanTransformer3DModel::new(&tiny_config(extra), vb.clone()).err().unwrap();
            assert!(err.to_string().contains(needle), "{extra}: {err}");
        }
        let t2v = tiny_config("");
        let i2v = tiny_image_config("");
        let flf2v = tiny_image_config(r#", "pos_embed_seq_len": 10"#);
        assert_eq!([t2v.image_count(), i2v.image_count(), flf2v.image_count()], [0, 1, 2]);
        assert!(!t2v.has_image_embedder() && i2v.has_image_embedder());
    }

    /// The image branch's weights, by diffusers' names, and the self-attention without them.
    #[test]
    fn image_branch_loads_diffusers_keys() -> Result<()> {
        let (model, varmap) = random_model(&tiny_image_config(r#", "pos_embed_seq_len": 10"#))?;
        assert!(model.has_image_embedder());
        let names: std::collections::BTreeSet<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for name in [
            "condition_embedder.image_embedder.norm1.weight",
            "condition_embedder.image_embedder.norm1.bias",
            "condition_embedder.image_embedder.ff.net.0.proj.weight",
            "condition_embedder.image_embedder.ff.net.2.bias",
            "condition_embedder.image_embedder.norm2.weight",
            "condition_embedder.image_embedder.pos_embed",
            "blocks.0.attn2.add_k_proj.weight",
            "blocks.0.attn2.add_v_proj.bias",
            "blocks.0.attn2.norm_added_k.weight",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n.starts_with("blocks.0.attn1.add")), "{names:?}");
        Ok(())
    }

    /// I2V's 36 input channels (noise, mask, image latents) in, 16 out; one image's tokens repeated to the batch.
    #[test]
    fn i2v_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = Config { in_channels: 36, out_channels: Some(16), ..tiny_image_config("") };
        let (model, _) = random_model(&cfg)?;
        let text = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let image = Tensor::randn(0f32, 1.0, (1, 5, 10), &dev)?;
        let context = model.embed_context(&text, Some(&image))?;
        let tokens = context.image().unwrap();
        assert_eq!(tokens.dims(), [2, 5, 24]);
        assert_eq!(tokens.get(0)?.to_vec2::<f32>()?, tokens.get(1)?.to_vec2::<f32>()?);
        let latents = Tensor::randn(0f32, 1.0, (2, 36, 2, 4, 4), &dev)?;
        let out = model.forward_embedded(&latents, &Tensor::new(&[500f32, 500.0], &dev)?, &context)?;
        assert_eq!(out.dims(), [2, 16, 2, 4, 4]);
        Ok(())
    }

    /// FLF2V: the first and last images' states are one sequence of twice their length, the position embedding
    /// added; it needs exactly that many.
    #[test]
    fn flf2v_joins_two_images() -> Result<()> {
        let dev = Device::Cpu;
        let (model, varmap) = random_model(&tiny_image_config(r#", "pos_embed_seq_len": 10"#))?;
        let text = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let images = Tensor::randn(0f32, 1.0, (2, 5, 10), &dev)?;
        let context = model.embed_context(&text, Some(&images))?;
        let tokens = context.image().unwrap();
        assert_eq!(tokens.dims(), [2, 10, 24]);
        // The same as the I2V embedder (same weights, no position embedding) on the first image's states followed
        // by the last's, plus the position embedding.
        let i2v =
            WanTransformer3DModel::new(&tiny_image_config(""), VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        let pos_embed =
            varmap.data().lock().unwrap()["condition_embedder.image_embedder.pos_embed"].as_tensor().clone();
        let joined = Tensor::cat(&[images.get(0)?, images.get(1)?], 0)?.unsqueeze(0)?.broadcast_add(&pos_embed)?;
        let want = i2v.embed_context(&text, Some(&joined))?;
        assert_eq!(tokens.flatten_all()?.to_vec1::<f32>()?, want.image().unwrap().flatten_all()?.to_vec1::<f32>()?);
        for shape in [(1, 5, 10), (2, 4, 10)] {
            let err = model.embed_context(&text, Some(&Tensor::zeros(shape, DType::F32, &dev)?)).err().unwrap();
            assert!(err.to_string().contains("pos_embed_seq_len"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn image_states_are_required_exactly_when_the_model_has_an_image_embedder() -> Result<()> {
        let dev = Device::Cpu;
        let text = Tensor::zeros((1, 3, 8), DType::F32, &dev)?;
        let image = Tensor::zeros((1, 5, 10), DType::F32, &dev)?;
        let t2v = WanTransformer3DModel::new(&tiny_config(""), VarBuilder::zeros(DType::F32, &dev))?;
        let i2v = WanTransformer3DModel::new(&tiny_image_config(""), VarBuilder::zeros(DType::F32, &dev))?;
        assert!(!t2v.has_image_embedder());
        let err = t2v.embed_context(&text, Some(&image)).err().unwrap();
        assert!(err.to_string().contains("without an image embedder"), "{err}");
        let err = i2v.embed_context(&text, None).err().unwrap();
        assert!(err.to_string().contains("needs the image encoder's states"), "{err}");
        let err = i2v.embed_context(&text, Some(&Tensor::zeros((1, 5, 12), DType::F32, &dev)?)).err().unwrap();
        assert!(err.to_string().contains("image_dim"), "{err}");
        let err = i2v.embed_context(&text, Some(&Tensor::zeros((3, 5, 10), DType::F32, &dev)?)).err().unwrap();
        assert!(err.to_string().contains("batch of 1"), "{err}");
        // A context from one model does not go into the other.
        let latents = Tensor::zeros((1, 4, 1, 2, 2), DType::F32, &dev)?;
        let t = Tensor::new(&[1f32], &dev)?;
        let err = t2v.forward_embedded(&latents, &t, &i2v.embed_context(&text, Some(&image))?).err().unwrap();
        assert!(err.to_string().contains("different image conditioning"), "{err}");
        Ok(())
    }

    /// With its value projection zeroed, the image branch adds nothing: the I2V model then equals the
    /// text-to-video model with the same other weights; with it, the image changes the prediction.
    #[test]
    fn zero_image_values_reduce_to_text_only() -> Result<()> {
        let dev = Device::Cpu;
        let (i2v, varmap) = random_model(&tiny_image_config(""))?;
        let t2v = WanTransformer3DModel::new(&tiny_config(""), VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        let latents = Tensor::randn(0f32, 1.0, (1, 4, 2, 4, 4), &dev)?;
        let t = Tensor::new(&[700f32], &dev)?;
        let text = Tensor::randn(0f32, 1.0, (1, 3, 8), &dev)?;
        let image = Tensor::randn(0f32, 1.0, (1, 5, 10), &dev)?;
        let text_only = t2v.forward(&latents, &t, &text, None)?.flatten_all()?.to_vec1::<f32>()?;
        let with_image = i2v.forward(&latents, &t, &text, Some(&image))?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(with_image, text_only);

        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.contains("add_v_proj") {
                var.set(&var.zeros_like()?)?;
            }
        }
        let with_image = i2v.forward(&latents, &t, &text, Some(&image))?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(with_image, text_only);
        Ok(())
    }

    #[test]
    fn shapes_off_the_patch_grid_are_rejected() -> Result<()> {
        let dev = Device::Cpu;
        let model = WanTransformer3DModel::new(&tiny_config(""), VarBuilder::zeros(DType::F32, &dev))?;
        let text = Tensor::zeros((1, 3, 8), DType::F32, &dev)?;
        let t = Tensor::new(&[500f32], &dev)?;
        let ok = model.forward(&Tensor::zeros((1, 4, 3, 4, 6), DType::F32, &dev)?, &t, &text, None)?;
        assert_eq!(ok.dims(), [1, 4, 3, 4, 6]);
        let err = model.forward(&Tensor::zeros((1, 4, 3, 5, 6), DType::F32, &dev)?, &t, &text, None).err().unwrap();
        assert!(err.to_string().contains("[1, 4, 3, 5, 6]"), "{err}");
        Ok(())
    }

    /// The stages one at a time, the blocks split in two, give exactly what one forward pass gives, with and
    /// without image tokens.
    #[test]
    fn blocks_run_in_parts_equal_one_forward() -> Result<()> {
        let dev = Device::Cpu;
        for (cfg, image) in
            [(tiny_config(""), None), (tiny_image_config(""), Some(Tensor::randn(0f32, 1.0, (1, 5, 10), &dev)?))]
        {
            let (model, _) = random_model(&Config { num_layers: 3, ..cfg })?;
            let latents = Tensor::randn(0f32, 1.0, (2, 4, 3, 4, 6), &dev)?;
            let t = Tensor::new(&[500f32, 500.0], &dev)?;
            let context = model.embed_context(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?, image.as_ref())?;

            let whole = model.forward_embedded(&latents, &t, &context)?;
            let embedded = model.embed(&latents, &t, &context)?;
            let first = model.run_blocks(embedded.tokens(), 0..1, &embedded)?;
            let rest = model.run_blocks(&first, 1..model.num_blocks(), &embedded)?;
            let parts = model.project_out(&rest, &embedded)?;
            assert_eq!(parts.dims(), [2, 4, 3, 4, 6]);
            assert_eq!(parts.flatten_all()?.to_vec1::<f32>()?, whole.flatten_all()?.to_vec1::<f32>()?);

            let err = model.run_blocks(&first, 1..4, &embedded).err().unwrap();
            assert!(err.to_string().contains("outside the model's 0..3"), "{err}");
        }
        Ok(())
    }

    /// The tiny model with VACE blocks after main blocks 0 and 2 of 3, control latents of 6 channels.
    fn tiny_vace_config() -> Config {
        Config { num_layers: 3, ..tiny_config(r#", "vace_layers": [2, 0], "vace_in_channels": 6"#) }
    }

    #[test]
    fn vace_configs_and_keys_are_checked() -> Result<()> {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        for layers in ["[1, 2]", "[0, 3]", "[0, 0]"] {
            let cfg = Config { num_layers: 3, ..tiny_config(&format!(r#", "vace_layers": {layers}"#)) };
            let err = WanTransformer3DModel::new(&cfg, vb.clone()).err().unwrap();
            assert!(err.to_string().contains("must name distinct main blocks of 0..3"), "{layers}: {err}");
        }
        let (model, varmap) = random_model(&tiny_vace_config())?;
        assert_eq!(model.vace_blocks(), 2);
        let names: std::collections::BTreeSet<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for name in [
            "vace_patch_embedding.weight",
            "vace_blocks.0.proj_in.weight",
            "vace_blocks.0.attn1.to_q.weight",
            "vace_blocks.1.ffn.net.0.proj.bias",
            "vace_blocks.1.scale_shift_table",
            "vace_blocks.1.proj_out.bias",
        ] {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains("vace_blocks.1.proj_in.weight"), "only the first VACE block has proj_in");
        Ok(())
    }

    /// At scale 0 (or with the hints' projections zeroed) the control branch adds nothing: the VACE model is the
    /// plain model with the same main weights. A control given to a plain model, or missing on a VACE model, is
    /// refused.
    #[test]
    fn vace_at_scale_zero_is_the_plain_model() -> Result<()> {
        let dev = Device::Cpu;
        let (vace, varmap) = random_model(&tiny_vace_config())?;
        let plain = WanTransformer3DModel::new(
            &Config { vace_layers: None, ..tiny_vace_config() },
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )?;
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 3, 4, 6), &dev)?;
        let t = Tensor::new(&[700f32, 700.0], &dev)?;
        let context = plain.embed_context(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?, None)?;
        // Two of the three latent frames: the control tokens are padded with zeros.
        let control = Tensor::randn(0f32, 1.0, (1, 6, 2, 4, 6), &dev)?;
        let want = plain.forward_embedded(&latents, &t, &context)?.flatten_all()?.to_vec1::<f32>()?;
        let run = |scales: &[f64]| -> Result<Vec<f32>> {
            let context = vace.with_control(context.clone(), &control, scales)?;
            vace.forward_embedded(&latents, &t, &context)?.flatten_all()?.to_vec1::<f32>()
        };
        assert_eq!(run(&[0.0, 0.0])?, want);
        assert_ne!(run(&[1.0, 0.0])?, want);
        assert_ne!(run(&[0.0, 1.0])?, run(&[0.0, 0.5])?);

        let err = vace.forward_embedded(&latents, &t, &context).err().unwrap();
        assert!(err.to_string().contains("needs control latents"), "{err}");
        let err = plain.with_control(context.clone(), &control, &[1.0, 1.0]).err().unwrap();
        assert!(err.to_string().contains("without VACE blocks"), "{err}");
        let err = vace.with_control(context.clone(), &control, &[1.0]).err().unwrap();
        assert!(err.to_string().contains("1 conditioning scales for 2 VACE blocks"), "{err}");
        let long = Tensor::zeros((1, 6, 4, 4, 6), DType::F32, &dev)?;
        let err = vace.forward_embedded(&latents, &t, &vace.with_control(context.clone(), &long, &[1.0, 1.0])?);
        assert!(err.err().unwrap().to_string().contains("at most as many tokens"));
        let err = vace.with_control(context, &Tensor::zeros((1, 5, 2, 4, 6), DType::F32, &dev)?, &[1.0, 1.0]);
        assert!(err.err().unwrap().to_string().contains("control latents of shape [1, 5, 2, 4, 6]"));

        // The blocks run in parts (the step cache) add each hint after its block, as one forward pass does.
        let context = vace.with_control(
            vace.embed_context(&Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?, None)?,
            &control,
            &[0.7, 1.3],
        )?;
        let whole = vace.forward_embedded(&latents, &t, &context)?.flatten_all()?.to_vec1::<f32>()?;
        let embedded = vace.embed(&latents, &t, &context)?;
        let first = vace.run_blocks(embedded.tokens(), 0..1, &embedded)?;
        let rest = vace.run_blocks(&first, 1..3, &embedded)?;
        assert_eq!(vace.project_out(&rest, &embedded)?.flatten_all()?.to_vec1::<f32>()?, whole);
        Ok(())
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-6, "index {i}: got {g}, want {w}");
        }
    }

    /// Values from diffusers 0.35.2 (torch 2.9.1, CPU):
    /// `get_timestep_embedding(torch.tensor([0., 1., 937.25]), 8, flip_sin_to_cos=True, downscale_freq_shift=0)`
    /// and the same for `torch.tensor([999.])` with dimension 256 at a few indices.
    #[test]
    fn timestep_embedding_matches_diffusers() -> Result<()> {
        let t = Tensor::new(&[0f32, 1.0, 937.25], &Device::Cpu)?;
        let emb = timestep_embedding(&t, 8)?.to_vec2::<f32>()?;
        assert_close(&emb[0], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        #[rustfmt::skip]
        assert_close(&emb[1], &[
            0.540_302_3, 0.995_004_2, 0.999_95, 0.999_999_5,
            0.841_470_96, 0.099_833_41, 0.009_999_833, 0.000_999_999_8,
        ]);
        #[rustfmt::skip]
        assert_close(&emb[2], &[
            0.492_889_1, 0.866_430_1, -0.998_633_8, 0.592_006_6,
            0.870_092_15, -0.499_298_33, 0.052_254_684, 0.805_933_1,
        ]);

        let emb = timestep_embedding(&Tensor::new(&[999f32], &Device::Cpu)?, 256)?.get(0)?.to_vec1::<f32>()?;
        let idx = [0, 1, 64, 127, 128, 129, 200, 255];
        let want = [
            0.999_649_8,
            0.963_785_3,
            -0.844_469_8,
            0.994_243_1,
            -0.026_460_752,
            -0.266_679_38,
            -0.617_371,
            0.107_147_22,
        ];
        let got: Vec<f32> = idx.iter().map(|&i| emb[i]).collect();
        assert_close(&got, &want);
        Ok(())
    }
}
