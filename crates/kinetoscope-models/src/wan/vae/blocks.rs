//! The layers the Wan VAE's encoder and decoder are made of, on frames-major tensors
//! `[batch, frames, channels, height, width]`.

use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use super::causal::{per_frame, CausalCache, CausalConv3d};
use crate::layers::attention;

/// Wan's `RMS_norm`: each pixel's channel vector scaled to unit L2 norm, times √C and a gain.
///
/// The norm is floored at 1e-12 as `F.normalize` does: there is no eps inside a root.
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    /// The gain `[C, 1, 1]`, with the √C folded in.
    gamma: Tensor,
}

impl RmsNorm {
    /// `images`: the gain is stored as `[C, 1, 1]` (per-frame attention), else `[C, 1, 1, 1]`.
    pub(super) fn new(dim: usize, images: bool, vb: VarBuilder) -> Result<Self> {
        let gamma = if images { vb.get((dim, 1, 1), "gamma")? } else { vb.get((dim, 1, 1, 1), "gamma")? };
        Ok(Self { gamma: (gamma.reshape((dim, 1, 1))? * (dim as f64).sqrt())? })
    }

    /// Normalizes over the channel dimension of `[…, C, H, W]`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (c, h, w) = (dims[dims.len() - 3], dims[dims.len() - 2], dims[dims.len() - 1]);
        let frames = x.elem_count() / (c * h * w);
        // The sum over channels as a product with ones: candle's sum over a middle dimension is slow.
        let ones = Tensor::ones((frames, 1, c), x.dtype(), x.device())?;
        let sum = ones.matmul(&x.sqr()?.reshape((frames, c, h * w))?)?;
        let mut shape = dims.to_vec();
        shape[dims.len() - 3] = 1;
        let norm = sum.reshape(shape)?.sqrt()?.maximum(1e-12)?;
        x.broadcast_div(&norm)?.broadcast_mul(&self.gamma)
    }
}

/// norm → SiLU → causal conv, twice, plus the input (through a 1×1×1 conv when the width changes).
#[derive(Debug, Clone)]
pub(super) struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    conv_shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub(super) fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let conv_shortcut =
            (in_dim != out_dim).then(|| CausalConv3d::cube(in_dim, out_dim, 1, vb.pp("conv_shortcut"))).transpose()?;
        Ok(Self {
            norm1: RmsNorm::new(in_dim, false, vb.pp("norm1"))?,
            conv1: CausalConv3d::cube(in_dim, out_dim, 3, vb.pp("conv1"))?,
            norm2: RmsNorm::new(out_dim, false, vb.pp("norm2"))?,
            conv2: CausalConv3d::cube(out_dim, out_dim, 3, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let h = self.conv1.forward_cached(&self.norm1.forward(x)?.silu()?, cache.next_slot())?;
        // The dropout between norm2 and conv2 is the identity at inference.
        let h = self.conv2.forward_cached(&self.norm2.forward(&h)?.silu()?, cache.next_slot())?;
        h + shortcut
    }
}

/// Single-head self-attention over the pixels of each frame on its own, with 1×1 convs for q, k, v
/// and the output.
#[derive(Debug, Clone)]
pub(super) struct AttentionBlock {
    norm: RmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
}

impl AttentionBlock {
    pub(super) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: RmsNorm::new(dim, true, vb.pp("norm"))?,
            to_qkv: conv2d(dim, 3 * dim, 1, Default::default(), vb.pp("to_qkv"))?,
            proj: conv2d(dim, dim, 1, Default::default(), vb.pp("proj"))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = per_frame(x, |frames| {
            let (n, c, h, w) = frames.dims4()?;
            let qkv = self.to_qkv.forward(&self.norm.forward(frames)?)?;
            // [n, 3c, h·w] → [n, 1, h·w, 3c]: one head whose tokens are the pixels.
            let qkv = qkv.reshape((n, 3 * c, h * w))?.transpose(1, 2)?.unsqueeze(1)?;
            let (q, k, v) = (qkv.narrow(3, 0, c)?, qkv.narrow(3, c, c)?, qkv.narrow(3, 2 * c, c)?);
            let out = attention(&q, &k, &v, None, 1.0 / (c as f64).sqrt())?;
            let out = out.squeeze(1)?.transpose(1, 2)?.reshape((n, c, h, w))?;
            self.proj.forward(&out)
        })?;
        y + x
    }
}

/// One residual block, attention, another residual block: the bottleneck of the encoder and the
/// decoder.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    resnet_in: ResidualBlock,
    attention: AttentionBlock,
    resnet_out: ResidualBlock,
}

impl MidBlock {
    pub(super) fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resnet_in: ResidualBlock::new(dim, dim, vb.pp("resnets").pp(0))?,
            attention: AttentionBlock::new(dim, vb.pp("attentions").pp(0))?,
            resnet_out: ResidualBlock::new(dim, dim, vb.pp("resnets").pp(1))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        let x = self.resnet_in.forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.resnet_out.forward(&x, cache)
    }
}

/// Halves or doubles the height and width; `time_conv`, when present, also halves or doubles the
/// frame rate.
#[derive(Debug, Clone)]
pub(super) enum Resample {
    /// `time_conv` doubles the frames (before), then nearest 2× and a 3×3 conv that halves the
    /// channels.
    Up { conv: CausalConv3d, time_conv: Option<CausalConv3d> },
    /// Zero pad right and bottom, a stride-2 3×3 conv, then `time_conv` halves the frames (after).
    Down { conv: Conv2d, time_conv: Option<CausalConv3d> },
}

impl Resample {
    /// diffusers' `upsample3d` when `temporal`, else `upsample2d`; `dim` channels in, `out_dim` out
    /// (Wan 2.1 halves them, Wan 2.2's residual blocks keep them).
    pub(super) fn up(dim: usize, out_dim: usize, temporal: bool, vb: VarBuilder) -> Result<Self> {
        let conv = CausalConv3d::image(dim, out_dim, 3, vb.pp("resample.1"))?;
        let time_conv =
            temporal.then(|| CausalConv3d::new(dim, 2 * dim, (3, 1), (1, 0), 1, vb.pp("time_conv"))).transpose()?;
        Ok(Self::Up { conv, time_conv })
    }

    /// diffusers' `downsample3d` when `temporal`, else `downsample2d`.
    pub(super) fn down(dim: usize, temporal: bool, vb: VarBuilder) -> Result<Self> {
        let halving = Conv2dConfig { stride: 2, ..Default::default() };
        let conv = conv2d(dim, dim, 3, halving, vb.pp("resample.1"))?;
        let time_conv =
            temporal.then(|| CausalConv3d::new(dim, dim, (3, 1), (0, 0), 2, vb.pp("time_conv"))).transpose()?;
        Ok(Self::Down { conv, time_conv })
    }

    pub(super) fn forward(&self, x: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        match self {
            Self::Up { conv, time_conv } => {
                let mut x = x.clone();
                if let Some(time_conv) = time_conv {
                    let first_chunk = cache.first_chunk();
                    let past = cache.next_slot();
                    // The first chunk (the first latent frame) is not doubled: 4(T−1)+1 frames come
                    // out of T. The chunks after it see zeros as their past, as diffusers' "Rep"
                    // mark makes them.
                    if !first_chunk {
                        let y = time_conv.forward_cached(&x, past)?;
                        let (b, t, c2, h, w) = y.dims5()?;
                        // The two halves of the channels are two consecutive frames.
                        x = y.reshape((b, 2 * t, c2 / 2, h, w))?;
                    }
                }
                let x = per_frame(&x, |f| {
                    let (_, _, h, w) = f.dims4()?;
                    f.upsample_nearest2d(2 * h, 2 * w)
                })?;
                conv.forward(&x)
            }
            Self::Down { conv, time_conv } => {
                let mut x = per_frame(x, |f| {
                    // ZeroPad2d((0, 1, 0, 1)): one zero row at the bottom, one column on the right.
                    let f = f.pad_with_zeros(D::Minus2, 0, 1)?.pad_with_zeros(D::Minus1, 0, 1)?;
                    conv.forward(&f)
                })?;
                if let Some(time_conv) = time_conv {
                    let t = x.dim(1)?;
                    let last = x.narrow(1, t - 1, 1)?.copy()?;
                    // The first chunk (one frame) passes as is; each later chunk is convolved
                    // together with the last frame of the chunk before it, so that 4 frames become
                    // 2, then 1.
                    if let Some(prev) = cache.next_slot().replace(last) {
                        x = time_conv.forward(&Tensor::cat(&[&prev, &x], 1)?)?;
                    }
                }
                Ok(x)
            }
        }
    }
}

/// The parameter-free shortcut of Wan 2.2's residual down blocks (diffusers' `AvgDown3D`): each
/// `factor_t × factor_s × factor_s` cell of pixels becomes channels, and groups of those channels
/// are averaged down to `out_dim`.
#[derive(Debug, Clone)]
pub(super) struct AvgDown {
    out_dim: usize,
    factor_t: usize,
    factor_s: usize,
}

impl AvgDown {
    pub(super) fn new(in_dim: usize, out_dim: usize, factor_t: usize, factor_s: usize) -> Result<Self> {
        if !(in_dim * factor_t * factor_s * factor_s).is_multiple_of(out_dim) {
            bail!("Wan VAE: a {in_dim} → {out_dim} channel shortcut can't average {factor_t}×{factor_s}² cells")
        }
        Ok(Self { out_dim, factor_t, factor_s })
    }

    /// `[B, T, C, H, W]` → `[B, ⌈T/f_t⌉, out_dim, H/f_s, W/f_s]`. Time is padded with zero frames at
    /// the start to a multiple of `factor_t`, as diffusers does for every chunk on its own: the
    /// stream's first frame is averaged with a zero frame.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ft, fs) = (self.factor_t, self.factor_s);
        let (b, t, c, h, w) = x.dims5()?;
        let pad = (ft - t % ft) % ft;
        let x = x.pad_with_zeros(1, pad, 0)?;
        let t = (t + pad) / ft;
        // Channel `c·f + i_t·f_s² + i_h·f_s + i_w` of the merged cell, as diffusers orders them.
        let cells = x
            .reshape(vec![b, t, ft, c, h / fs, fs, w / fs, fs])?
            .permute(vec![0, 1, 3, 2, 5, 7, 4, 6])?
            .reshape((b, t, self.out_dim, c * ft * fs * fs / self.out_dim, h / fs, w / fs))?;
        cells.mean(3)
    }
}

/// The parameter-free shortcut of Wan 2.2's residual up blocks (diffusers' `DupUp3D`): each channel
/// is repeated, and the copies are spread over a `factor_t × factor_s × factor_s` cell of pixels.
#[derive(Debug, Clone)]
pub(super) struct DupUp {
    out_dim: usize,
    factor_t: usize,
    factor_s: usize,
    repeats: usize,
}

impl DupUp {
    pub(super) fn new(in_dim: usize, out_dim: usize, factor_t: usize, factor_s: usize) -> Result<Self> {
        let cell = out_dim * factor_t * factor_s * factor_s;
        if !cell.is_multiple_of(in_dim) {
            bail!("Wan VAE: a {in_dim} → {out_dim} channel shortcut can't fill {factor_t}×{factor_s}² cells")
        }
        Ok(Self { out_dim, factor_t, factor_s, repeats: cell / in_dim })
    }

    /// `[B, T, C, H, W]` → `[B, T·f_t, out_dim, H·f_s, W·f_s]`; on a stream's first chunk only the
    /// last of each cell's frames is kept, as the main path doesn't double that chunk's frames.
    pub(super) fn forward(&self, x: &Tensor, first_chunk: bool) -> Result<Tensor> {
        let (ft, fs) = (self.factor_t, self.factor_s);
        let (b, t, c, h, w) = x.dims5()?;
        let copies = x.unsqueeze(3)?.broadcast_as((b, t, c, self.repeats, h, w))?;
        let y = copies
            .reshape(vec![b, t, self.out_dim, ft, fs, fs, h, w])?
            .permute(vec![0, 1, 3, 2, 6, 4, 7, 5])?
            .reshape((b, t * ft, self.out_dim, h * fs, w * fs))?;
        if first_chunk {
            y.narrow(1, ft - 1, t * ft - (ft - 1))
        } else {
            Ok(y)
        }
    }
}
