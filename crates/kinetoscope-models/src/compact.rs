//! Linear weights kept compact in memory: as a checkpoint stores them (FP8 e4m3, plain or with a per-tensor
//! scale; GGUF's ggml blocks: Q8_0, the K-quants, ...) or quantized as a dense network loads ([`Quantization`]).
//!
//! A network's [`crate::layers::Linear`] layers ask their [`Compact`] for their weight before their `VarBuilder`;
//! a layer that gets one keeps it compact and dequantizes it into the compute dtype each time it runs, then
//! multiplies as a dense layer does. Only one layer's weight is ever dense at a time, so memory is the file's size
//! plus one layer. Dequantizing per layer is what ComfyUI-GGUF does too: the matrix products of a video transformer
//! have thousands of rows (tokens), so they are bound by arithmetic, not by reading the weight, and a dense GEMM
//! in the compute dtype is the fastest product there is; candle's own quantized matmul would also round the
//! activations to 8 bits on the CPU (ggml's scheme), about 1e-3 off the dequantized weights' product.
//!
//! Everything else (norms, biases, modulation tables, the patch embedding) is read dense through the
//! `VarBuilder`, as the network always has.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// One linear layer's weight `[out, in]` in a compact format.
#[derive(Debug, Clone)]
pub enum CompactWeight {
    /// `[out, in]` in `F8E4M3`; the weight is `weight × scale` (scaled FP8: ComfyUI's `scale_weight`, or
    /// `weight_scale`), or `weight` alone.
    Fp8 { weight: Tensor, scale: Option<f32> },
    /// ggml blocks along `in` (a GGUF tensor, or a dense weight quantized on load).
    Ggml(Arc<QTensor>),
    /// A compact weight with LoRA adapters merged into it as it is dequantized ([`crate::lora::merged_compact`]):
    /// `base + Σ delta`, in f32, as [`crate::lora::merged_var_builder`] merges a dense weight. The weight stays
    /// compact; the deltas are kept as their low-rank pairs where they have them.
    Patched { base: Box<CompactWeight>, deltas: Vec<Delta> },
}

/// One adapter's change to a compact weight, at its scale, in f32 on the weight's device.
#[derive(Debug, Clone)]
pub enum Delta {
    /// `up · down`: `up` `[out, r]` with the scales folded in, `down` `[r, in]`.
    LowRank { up: Tensor, down: Tensor },
    /// A full `[out, in]` delta (an adapter's `diff`).
    Full(Tensor),
}

impl Delta {
    fn dense(&self) -> Result<Tensor> {
        match self {
            Self::LowRank { up, down } => up.matmul(down),
            Self::Full(delta) => Ok(delta.clone()),
        }
    }
}

impl CompactWeight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Fp8 { weight, .. } => weight.dims2(),
            Self::Ggml(q) => q.shape().dims2(),
            Self::Patched { base, .. } => base.dims(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Fp8 { weight, .. } => weight.device().clone(),
            Self::Ggml(q) => q.device(),
            Self::Patched { base, .. } => base.device(),
        }
    }

    /// Bytes its weight holds (an adapter's factors not counted).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Fp8 { weight, .. } => weight.elem_count(),
            Self::Ggml(q) => q.storage_size_in_bytes(),
            Self::Patched { base, .. } => base.bytes(),
        }
    }

    /// Its format, as files name it: `F8_E4M3`, `Q4_K`, ...
    pub fn format(&self) -> String {
        match self {
            Self::Fp8 { .. } => "F8_E4M3".into(),
            Self::Ggml(q) => ggml_name(q.dtype()).into(),
            Self::Patched { base, .. } => base.format(),
        }
    }

    /// The dense weight `[out, in]` in `dtype`, on its device: FP8 cast (and scaled in `dtype`, as PyTorch
    /// dequantizes `weight.to(dtype) * scale`), ggml blocks dequantized in f32 exactly as ggml does.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Fp8 { weight, scale: None } => weight.to_dtype(dtype),
            Self::Fp8 { weight, scale: Some(scale) } => weight.to_dtype(dtype)?.affine(f64::from(*scale), 0.0),
            Self::Ggml(q) => q.dequantize(&q.device())?.to_dtype(dtype),
            Self::Patched { base, deltas } => {
                let mut weight = base.dequantize(DType::F32)?;
                for delta in deltas {
                    weight = (weight + delta.dense()?)?;
                }
                weight.to_dtype(dtype)
            }
        }
    }
}

/// The name files and llama.cpp give a ggml type.
pub fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Where a network's linear layers find compact weights, by the layer's name (`blocks.0.attn1.to_q`).
pub trait CompactSource: Send + Sync {
    /// Layer `name`'s weight `[out_dim, in_dim]` on `device` if it is kept compact; `None` reads it dense through
    /// the `VarBuilder`.
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, device: &Device) -> Result<Option<CompactWeight>>;
}

/// The compact weights a network loads with, if any (cheap to clone).
#[derive(Clone, Default)]
pub struct Compact(Option<Arc<dyn CompactSource>>);

impl fmt::Debug for Compact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Compact(some)" } else { "Compact(none)" })
    }
}

impl Compact {
    /// Every weight dense, as the `VarBuilder` holds it.
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(source: impl CompactSource + 'static) -> Self {
        Self(Some(Arc::new(source)))
    }

    /// Layer `name`'s compact weight, checked against the layer's shape.
    pub fn linear(&self, name: &str, out_dim: usize, in_dim: usize, device: &Device) -> Result<Option<CompactWeight>> {
        let Some(source) = &self.0 else { return Ok(None) };
        let weight = source.linear(name, out_dim, in_dim, device)?;
        if let Some(weight) = &weight {
            let dims = weight.dims()?;
            if dims != (out_dim, in_dim) {
                bail!("`{name}.weight` is {dims:?} in the compact weights, where the layer is ({out_dim}, {in_dim})")
            }
        }
        Ok(weight)
    }
}

/// A compact format to quantize dense weights into as they load (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantization {
    /// ggml Q8_0: 8-bit values in blocks of 32 with an f16 scale (8.5 bits a weight).
    Q8_0,
    /// ggml Q4_K: 4-bit values in super-blocks of 256 (4.5 bits a weight); a layer whose input width 256 doesn't
    /// divide gets Q8_0.
    Q4K,
    /// FP8 e4m3 with a per-tensor scale (absmax / 448), as scaled-FP8 checkpoints are.
    Fp8,
}

impl Quantization {
    pub const ALL: [Quantization; 3] = [Self::Q8_0, Self::Q4K, Self::Fp8];

    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
            Self::Fp8 => "fp8",
        }
    }

    /// The bytes a `[out_dim, in_dim]` weight takes in this format; `None` where it stays dense
    /// ([`Self::quantize`]).
    pub fn bytes(self, out_dim: usize, in_dim: usize) -> Option<u64> {
        let ggml = match self.ggml_type(in_dim)? {
            None => return Some((out_dim * in_dim) as u64),
            Some(ggml) => ggml,
        };
        Some((out_dim * in_dim / ggml.block_size() * ggml.type_size()) as u64)
    }

    /// The ggml type a weight of `in_dim` inputs gets (`Some(None)`: FP8; `None`: it stays dense).
    fn ggml_type(self, in_dim: usize) -> Option<Option<GgmlDType>> {
        match self {
            Self::Fp8 => Some(None),
            Self::Q4K if in_dim.is_multiple_of(GgmlDType::Q4K.block_size()) => Some(Some(GgmlDType::Q4K)),
            Self::Q8_0 | Self::Q4K if in_dim.is_multiple_of(GgmlDType::Q8_0.block_size()) => {
                Some(Some(GgmlDType::Q8_0))
            }
            Self::Q8_0 | Self::Q4K => None,
        }
    }

    /// `weight` `[out, in]` (any dtype and device) in this format, on `device`; `None` where no block size of the
    /// format divides the input width (the layer stays dense).
    pub fn quantize(self, weight: &Tensor, device: &Device) -> Result<Option<CompactWeight>> {
        let (_, in_dim) = weight.dims2()?;
        // Quantized on the CPU (ggml's reference quantizers), then moved: the same blocks on every device.
        let weight = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let ggml = match self.ggml_type(in_dim) {
            None => return Ok(None),
            Some(Some(ggml)) => ggml,
            Some(None) => {
                let absmax = weight.abs()?.max_all()?.to_scalar::<f32>()?;
                // 448 is e4m3's largest finite value; an all-zero weight keeps scale 1.
                let scale = if absmax > 0.0 { absmax / 448.0 } else { 1.0 };
                let fp8 = weight.affine(1.0 / f64::from(scale), 0.0)?.to_dtype(DType::F8E4M3)?;
                return Ok(Some(CompactWeight::Fp8 { weight: fp8.to_device(device)?, scale: Some(scale) }));
            }
        };
        Ok(Some(CompactWeight::Ggml(Arc::new(QTensor::quantize_onto(&weight, ggml, device)?))))
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|q| q.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|q| q.name()).collect();
            format!("unknown quantization {s:?}: expected one of {}", names.join(", "))
        })
    }
}

/// Quantizes a dense network's linear weights as it loads: each is read through `vb` (which may merge LoRA
/// adapters into it first), quantized, and only the compact form is kept.
pub struct QuantizeOnLoad {
    vb: VarBuilder<'static>,
    quantization: Quantization,
}

impl QuantizeOnLoad {
    /// `vb` at the network's root, where its layers' names start.
    pub fn new(vb: VarBuilder<'static>, quantization: Quantization) -> Self {
        Self { vb, quantization }
    }
}

impl CompactSource for QuantizeOnLoad {
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, device: &Device) -> Result<Option<CompactWeight>> {
        let weight = self.vb.pp(name).get_with_hints_dtype(
            (out_dim, in_dim),
            "weight",
            candle_nn::Init::Const(0.0),
            DType::F32,
        )?;
        self.quantization.quantize(&weight, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (diff / norm).sqrt()
    }

    /// Each format keeps the weight within its precision, in its own size.
    #[test]
    fn quantized_weights_dequantize_close_to_the_dense_ones() -> Result<()> {
        let weight = Tensor::randn(0f32, 0.02, (64, 512), &Device::Cpu)?;
        for (quantization, bytes, tolerance) in [
            (Quantization::Q8_0, 64 * 512 / 32 * 34, 0.01),
            (Quantization::Q4K, 64 * 512 / 256 * 144, 0.1),
            (Quantization::Fp8, 64 * 512, 0.05),
        ] {
            let compact = quantization.quantize(&weight, &Device::Cpu)?.expect("512 takes every block size");
            assert_eq!(compact.bytes(), bytes, "{quantization}");
            assert_eq!(compact.dims()?, (64, 512));
            let err = relative(&compact.dequantize(DType::F32)?, &weight);
            assert!(err < tolerance, "{quantization}: relative error {err}");
        }
        Ok(())
    }

    /// A width no block divides stays dense; Q4_K falls back to Q8_0 where 256 doesn't divide but 32 does.
    #[test]
    fn widths_choose_the_block() -> Result<()> {
        let narrow = Tensor::randn(0f32, 1.0, (8, 48), &Device::Cpu)?;
        assert!(Quantization::Q8_0.quantize(&narrow, &Device::Cpu)?.is_none());
        let mid = Tensor::randn(0f32, 1.0, (8, 96), &Device::Cpu)?;
        assert_eq!(Quantization::Q4K.quantize(&mid, &Device::Cpu)?.unwrap().format(), "Q8_0");
        assert_eq!(Quantization::Fp8.quantize(&narrow, &Device::Cpu)?.unwrap().format(), "F8_E4M3");
        assert_eq!("Q4_K".parse::<Quantization>(), Ok(Quantization::Q4K));
        assert!("q5".parse::<Quantization>().unwrap_err().contains("q8_0, q4_k, fp8"));
        Ok(())
    }
}
