//! The causal 3D convolution and the memory that lets it run chunk by chunk.
//!
//! Tensors here are laid out frames-major, `[batch, frames, channels, height, width]`, so that
//! folding time into the batch for a 2D operation is a free reshape.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

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
/// candle has no conv3d, so the product runs one of two ways, chosen for the device when the layer is
/// built: by cuDNN on a GPU in a build with the `cudnn` feature, else by im2col and matrix products.
/// The zero frames before a stream are made for cuDNN and never made for im2col: the taps that would see
/// them are left out of its products.
#[derive(Debug, Clone)]
pub(super) struct CausalConv3d {
    product: Product,
    /// `[out, 1, 1]`, added to every pixel.
    bias: Tensor,
    taps: usize,
    k: usize,
    /// Zeros around each frame, the same on all four sides.
    padding: usize,
    stride: usize,
    /// Frames of left context: diffusers pads `2·padding` zero frames before the first frame, none
    /// after.
    context: usize,
}

/// How a [`CausalConv3d`] multiplies, with its kernel in the form that way reads.
#[derive(Debug, Clone)]
enum Product {
    /// One matrix product per output frame: every `taps × k × k` window of the input becomes a column,
    /// and the kernel, `[out, in, taps, k, k]` flattened to `[out, taps·k·k·in]` in the order of the
    /// columns, times those columns gives all the frame's pixels at once. candle's conv2d multiplies
    /// many small tiles instead, slow at this VAE's narrow widths.
    Im2col(Tensor),
    /// cuDNN's 3D convolution (`kinetoscope_kernels::cudnn_conv3d`), which never writes the columns out:
    /// the kernel as it is, `[out, in, taps, k, k]`.
    #[cfg(feature = "cudnn")]
    Cudnn(Tensor),
}

/// The most floats the columns of one product may hold: larger frames go by bands of rows, so that
/// the unrolled input (`in·taps·k·k` times the size of the band) stays in cache.
const MAX_COLUMNS: usize = 1 << 21;

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
        let weight = vb.get((out_channels, in_channels, taps, k, k), "weight")?;
        Self::from_weight(weight, vb.get(out_channels, "bias")?, padding, stride)
    }

    /// A k×k×k kernel padded to keep the size: `WanCausalConv3d(in, out, k, padding=k // 2)`.
    pub(super) fn cube(in_channels: usize, out_channels: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(in_channels, out_channels, (k, k), (k / 2, k / 2), 1, vb)
    }

    /// A 2D `Conv2d(in, out, k, padding=k // 2)` applied to each frame: a kernel of one tap.
    pub(super) fn image(in_channels: usize, out_channels: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, k, k), "weight")?.unsqueeze(2)?;
        Self::from_weight(weight, vb.get(out_channels, "bias")?, (0, k / 2), 1)
    }

    /// `weight` is `[out, in, taps, k, k]`.
    fn from_weight(weight: Tensor, bias: Tensor, padding: (usize, usize), stride: usize) -> Result<Self> {
        let (out_channels, in_channels, taps, k, _) = weight.dims5()?;
        let product = match cudnn_convolves(weight.device()) {
            #[cfg(feature = "cudnn")]
            true => Product::Cudnn(weight.contiguous()?),
            _ => Product::Im2col(
                weight.permute((0, 2, 3, 4, 1))?.reshape((out_channels, taps * k * k * in_channels))?.contiguous()?,
            ),
        };
        Ok(Self {
            product,
            bias: bias.reshape((out_channels, 1, 1))?,
            taps,
            k,
            padding: padding.1,
            stride,
            context: 2 * padding.0,
        })
    }

    /// The convolution of a whole sequence, zeros before its first frame.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.convolve(None, &self.prepare(x)?)
    }

    /// The convolution of `x` as the continuation of the frames in `past` (zeros before the
    /// stream's first frame); `past` then holds the last frames for the next chunk.
    pub(super) fn forward_cached(&self, x: &Tensor, past: &mut Option<Tensor>) -> Result<Tensor> {
        let x = &self.prepare(x)?;
        let before = past.take();
        let out = self.convolve(before.as_ref(), x)?;
        let last = |frames: &Tensor| -> Result<Tensor> {
            let t = frames.dim(1)?;
            frames.narrow(1, t - t.min(self.context), t.min(self.context))
        };
        let recent = match &before {
            Some(before) => Tensor::cat(&[last(before)?, last(x)?], 1)?,
            None => last(x)?,
        };
        // A copy, so that the memory does not pin the whole chunk.
        *past = Some(last(&recent)?.copy()?);
        Ok(out)
    }

    /// The frames as the product reads them, and remembers them: padded in space for im2col, as
    /// they are for cuDNN (which pads them itself).
    fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        match &self.product {
            Product::Im2col(_) => {
                let p = self.padding;
                x.pad_with_zeros(3, p, p)?.pad_with_zeros(4, p, p)
            }
            #[cfg(feature = "cudnn")]
            Product::Cudnn(_) => Ok(x.clone()),
        }
    }

    /// The valid convolution in time of the frames `past` then `x` (both [prepared](Self::prepare)),
    /// after the zero frames that complete the left context.
    fn convolve(&self, past: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(1)?;
        let remembered = past.map(|p| p.dim(1)).transpose()?.unwrap_or(0);
        let zeros = self.context.saturating_sub(remembered);
        if zeros + remembered + t < self.taps {
            candle_core::bail!("causal conv: {t} frames with context, the kernel needs {}", self.taps)
        }
        match &self.product {
            Product::Im2col(matrix) => self.im2col(matrix, past, x, zeros),
            #[cfg(feature = "cudnn")]
            Product::Cudnn(kernel) => self.cudnn(kernel, past, x, zeros),
        }
    }

    /// [`Self::convolve`] by cuDNN, on the frames made whole: the zeros, `past`, then `x`.
    #[cfg(feature = "cudnn")]
    fn cudnn(&self, kernel: &Tensor, past: Option<&Tensor>, x: &Tensor, zeros: usize) -> Result<Tensor> {
        let (b, _, c, h, w) = x.dims5()?;
        let mut frames = Vec::with_capacity(3);
        if zeros > 0 {
            frames.push(Tensor::zeros((b, zeros, c, h, w), x.dtype(), x.device())?);
        }
        frames.extend(past.cloned());
        frames.push(x.clone());
        let y = {
            // cuDNN reads channels before time (NCDHW, packed), the layout diffusers gives it: one
            // copy makes it (freed before the next). cuDNN pads in space itself.
            let input = Tensor::cat(&frames, 1)?.transpose(1, 2)?.contiguous()?;
            let p = self.padding;
            kinetoscope_kernels::cudnn_conv3d(&input, kernel, [0, p, p], [self.stride, 1, 1])?
        };
        // Back to frames-major, and the bias added, in one pass.
        y.transpose(1, 2)?.broadcast_add(&self.bias)
    }

    /// [`Self::convolve`] by im2col: the taps that would see the `zeros` frames are left out.
    fn im2col(&self, matrix: &Tensor, past: Option<&Tensor>, x: &Tensor, zeros: usize) -> Result<Tensor> {
        let (b, t, _, h, w) = x.dims5()?;
        let remembered = past.map(|p| p.dim(1)).transpose()?.unwrap_or(0);
        let frames = (zeros + remembered + t - self.taps) / self.stride + 1;
        // Input frame `i` of the stream with its context, zeros at the start.
        let frame = |batch: usize, i: usize| match past {
            Some(past) if i < zeros + remembered => past.get(batch)?.get(i - zeros),
            _ => x.get(batch)?.get(i - zeros - remembered),
        };
        let (h, w) = (h + 1 - self.k, w + 1 - self.k);
        // A 1×1 kernel needs no unrolling: the input already is its columns, whole frames at once.
        let band = if self.k == 1 { h } else { (MAX_COLUMNS / (matrix.dim(1)? * w)).clamp(1, h) };
        let mut out = Vec::with_capacity(b * frames);
        for batch in 0..b {
            for j in 0..frames {
                let first = j * self.stride;
                let skipped = zeros.saturating_sub(first).min(self.taps);
                let seen = (first + skipped..first + self.taps).map(|i| frame(batch, i)).collect::<Result<Vec<_>>>()?;
                let bands =
                    (0..h).step_by(band).map(|top| self.rows(matrix, &seen, skipped, top, band.min(h - top), w));
                out.push(Tensor::cat(&bands.collect::<Result<Vec<_>>>()?, 1)?);
            }
        }
        let out_channels = matrix.dim(0)?;
        Tensor::stack(&out, 0)?.reshape((b, frames, out_channels, h, w))?.broadcast_add(&self.bias)
    }

    /// Output rows `top..top + rows` of one frame, `[out, rows·w]`, from the `[in, H, W]` input
    /// frames its taps see, the first `skipped` taps (on zeros) left out.
    fn rows(
        &self,
        matrix: &Tensor,
        seen: &[Tensor],
        skipped: usize,
        top: usize,
        rows: usize,
        w: usize,
    ) -> Result<Tensor> {
        let windows = seen
            .iter()
            .flat_map(|f| {
                (0..self.k * self.k).map(move |s| f.narrow(1, top + s / self.k, rows)?.narrow(2, s % self.k, w))
            })
            .collect::<Result<Vec<_>>>()?;
        // `[taps·k·k·in, rows·w]`: the same order as the flattened kernel.
        let columns = Tensor::cat(&windows, 0)?;
        let depth = columns.dim(0)?;
        let per_tap = matrix.dim(1)? / self.taps;
        matrix.narrow(1, skipped * per_tap, depth)?.matmul(&columns.reshape((depth, rows * w))?)
    }
}

/// How the VAE's 3D convolutions run on `device`, by name: `cudnn` or `im2col` (see [`CausalConv3d`]).
pub fn convolution_kernel(device: &candle_core::Device) -> &'static str {
    if cudnn_convolves(device) {
        "cudnn"
    } else {
        "im2col"
    }
}

/// Whether cuDNN convolves on `device` (`kinetoscope_kernels::conv3d_kernel`): in a build with the
/// `cudnn` feature, on a GPU, unless `KINETOSCOPE_CONV=im2col`.
fn cudnn_convolves(device: &candle_core::Device) -> bool {
    #[cfg(feature = "cudnn")]
    {
        kinetoscope_kernels::conv3d_kernel(device) == kinetoscope_kernels::ConvKernel::Cudnn
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = device;
        false
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
