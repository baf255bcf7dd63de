//! The causal 3D convolution and the memory that lets it run chunk by chunk.
//!
//! Tensors here are laid out frames-major, `[batch, frames, channels, height, width]`, so that
//! folding time into the batch for a 2D operation is a free reshape.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

/// What the causal layers of one encoder or decoder remember between the chunks of a stream.
///
/// Each layer that looks back in time owns one slot, and the network visits those layers in the
/// same order for every chunk, so a slot is found by its rank in that order (diffusers'
/// `feat_cache` / `feat_idx`). A fresh cache starts a new stream; use one per stream, never one for
/// the encoder and the decoder together.
#[derive(Debug, Default)]
pub struct CausalCache {
    slots: Vec<Option<Tensor>>,
    cursor: usize,
    first_chunk: bool,
}

impl CausalCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing has gone through yet: the next chunk is the stream's first.
    pub(super) fn is_fresh(&self) -> bool {
        self.slots.is_empty()
    }

    /// Called by the network before it visits its layers for a chunk.
    pub(super) fn begin_chunk(&mut self) {
        self.first_chunk = self.is_fresh();
        self.cursor = 0;
    }

    /// Whether the chunk going through is the stream's first: some layers treat it apart.
    pub(super) fn first_chunk(&self) -> bool {
        self.first_chunk
    }

    /// The memory of the next layer that looks back in time (empty on the first chunk).
    pub(super) fn next_slot(&mut self) -> &mut Option<Tensor> {
        if self.cursor == self.slots.len() {
            self.slots.push(None);
        }
        self.cursor += 1;
        &mut self.slots[self.cursor - 1]
    }
}

/// Applies a 2D operation to every frame of a `[batch, frames, channels, height, width]` tensor.
pub(super) fn per_frame(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (b, t, c, h, w) = x.dims5()?;
    let y = f(&x.reshape((b * t, c, h, w))?)?;
    let (_, c, h, w) = y.dims4()?;
    y.reshape((b, t, c, h, w))
}

/// A Conv3d that pads time with zeros on the left only, so that an output frame never sees a later
/// input frame.
///
/// candle has no conv3d: the `taps` input frames an output frame sees are stacked along the
/// channels and go through one conv2d whose kernel holds the time taps side by side, time folded
/// into the batch.
#[derive(Debug, Clone)]
pub(super) struct CausalConv3d {
    /// The kernel `[out, in, taps, k, k]` as `[out, taps·in, k, k]`.
    conv: Conv2d,
    taps: usize,
    stride: usize,
    /// Frames of left context: diffusers pads `2·padding` zero frames before the first frame, none
    /// after.
    context: usize,
}

impl CausalConv3d {
    /// `kernel` and `padding` are (time, space); the spatial padding is symmetric.
    pub(super) fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
        padding: (usize, usize),
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (taps, k) = kernel;
        let weight = vb.get((out_channels, in_channels, taps, k, k), "weight")?.permute((0, 2, 1, 3, 4))?.reshape((
            out_channels,
            taps * in_channels,
            k,
            k,
        ))?;
        let bias = vb.get(out_channels, "bias")?;
        let cfg = Conv2dConfig { padding: padding.1, ..Default::default() };
        Ok(Self { conv: Conv2d::new(weight, Some(bias), cfg), taps, stride, context: 2 * padding.0 })
    }

    /// A k×k×k kernel padded to keep the size: `WanCausalConv3d(in, out, k, padding=k // 2)`.
    pub(super) fn cube(in_channels: usize, out_channels: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(in_channels, out_channels, (k, k), (k / 2, k / 2), 1, vb)
    }

    /// The convolution of a whole sequence, zeros before its first frame.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.convolve(&x.pad_with_zeros(1, self.context, 0)?)
    }

    /// The convolution of `x` as the continuation of the frames in `past` (zeros before the
    /// stream's first frame); `past` then holds the last frames for the next chunk.
    pub(super) fn forward_cached(&self, x: &Tensor, past: &mut Option<Tensor>) -> Result<Tensor> {
        let (seen, remembered) = match past.take() {
            Some(p) => (Tensor::cat(&[&p, x], 1)?, p.dim(1)?),
            None => (x.clone(), 0),
        };
        let out = self.convolve(&seen.pad_with_zeros(1, self.context - remembered, 0)?)?;
        let t = seen.dim(1)?;
        let keep = t.min(self.context);
        // A copy, so that the memory does not pin the whole chunk.
        *past = Some(seen.narrow(1, t - keep, keep)?.copy()?);
        Ok(out)
    }

    /// The valid convolution in time of an input that already carries its left context.
    fn convolve(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c, h, w) = x.dims5()?;
        let Some(span) = t.checked_sub(self.taps) else {
            candle_core::bail!("causal conv: {t} frames with context, the kernel needs {}", self.taps)
        };
        let frames = span / self.stride + 1;
        let stacked = if self.taps == 1 && self.stride == 1 {
            x.clone()
        } else {
            let taps = (0..self.taps).map(|k| self.tap(x, k, frames)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&taps, 2)?
        };
        let y = self.conv.forward(&stacked.reshape((b * frames, self.taps * c, h, w))?)?;
        let (_, c, h, w) = y.dims4()?;
        y.reshape((b, frames, c, h, w))
    }

    /// The input frames that time tap `k` of the kernel sees: `k, k + stride, …`.
    fn tap(&self, x: &Tensor, k: usize, frames: usize) -> Result<Tensor> {
        if self.stride == 1 {
            return x.narrow(1, k, frames);
        }
        let ids = (0..frames).map(|j| (k + j * self.stride) as u32).collect::<Vec<_>>();
        x.index_select(&Tensor::new(ids, x.device())?, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    fn random_conv(kernel: (usize, usize), padding: (usize, usize), stride: usize) -> Result<CausalConv3d> {
        let dev = Device::Cpu;
        let (taps, k) = kernel;
        let weights = HashMap::from([
            ("weight".to_string(), Tensor::randn(0f32, 0.3, (5, 4, taps, k, k), &dev)?),
            ("bias".to_string(), Tensor::randn(0f32, 0.3, 5, &dev)?),
        ]);
        CausalConv3d::new(4, 5, kernel, padding, stride, VarBuilder::from_tensors(weights, DType::F32, &dev))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Streaming equals batch: the sequence fed in chunks of 1, 4, 1 and 3 frames, with the memory
    /// carried between them, gives the frames of the whole sequence convolved at once.
    #[test]
    fn chunked_conv_equals_whole_sequence() -> Result<()> {
        let conv = random_conv((3, 3), (1, 1), 1)?;
        let x = Tensor::randn(0f32, 1.0, (2, 9, 4, 6, 7), &Device::Cpu)?;
        let whole = conv.forward(&x)?;
        let mut past = None;
        let mut chunks = Vec::new();
        let mut start = 0;
        for len in [1, 4, 1, 3] {
            chunks.push(conv.forward_cached(&x.narrow(1, start, len)?, &mut past)?);
            start += len;
        }
        let streamed = Tensor::cat(&chunks, 1)?;
        assert_eq!(streamed.dims(), whole.dims());
        let err = max_abs_diff(&streamed, &whole)?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    /// An output frame depends on its input frame and the two before it, and never on later ones.
    #[test]
    fn conv_is_causal() -> Result<()> {
        let conv = random_conv((3, 3), (1, 1), 1)?;
        let x = Tensor::randn(0f32, 1.0, (1, 6, 4, 5, 5), &Device::Cpu)?;
        let changed = Tensor::cat(&[x.narrow(1, 0, 4)?, (x.narrow(1, 4, 2)? + 1.0)?], 1)?;
        let (a, b) = (conv.forward(&x)?, conv.forward(&changed)?);
        assert_eq!(max_abs_diff(&a.narrow(1, 0, 4)?, &b.narrow(1, 0, 4)?)?, 0.0);
        assert!(max_abs_diff(&a.narrow(1, 4, 1)?, &b.narrow(1, 4, 1)?)? > 1e-3);
        Ok(())
    }

    /// With stride 2 and no padding, output frame j sees input frames 2j, 2j+1, 2j+2.
    #[test]
    fn strided_conv_takes_every_other_frame() -> Result<()> {
        let conv = random_conv((3, 1), (0, 0), 2)?;
        let x = Tensor::randn(0f32, 1.0, (1, 7, 4, 3, 3), &Device::Cpu)?;
        let y = conv.forward(&x)?;
        assert_eq!(y.dims(), &[1, 3, 5, 3, 3]);
        let last = conv.forward(&x.narrow(1, 4, 3)?)?;
        assert!(max_abs_diff(&y.narrow(1, 2, 1)?, &last)? < 1e-6);
        Ok(())
    }
}
