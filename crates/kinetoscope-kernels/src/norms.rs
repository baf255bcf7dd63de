//! The Wan transformer's normalizations fused with what follows them (`kernels/norms.cu`), bf16 on CUDA, f32
//! inside: RMSNorm of q or k across heads with the rotary embedding, LayerNorm with the adaLN modulation, and the
//! gated residual add that ends each half of a block.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use crate::shapes::{norm_rows, rope_heads};
use crate::view;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norms.ptx"));
const MODULE: &str = "kinetoscope_norms";
const THREADS: u32 = 256;

/// Whether the fused normalizations take `x`: bf16 on a CUDA device.
pub fn fused_norms_support(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16
}

/// `x` `[B, L, dim]` normalized by its root mean square over `dim` (plus `eps`), times `weight` `[dim]`, then
/// each head of `head_dim` channels rotated: pair `(2i, 2i+1)` of a head at token `l` by the angle whose cosine
/// is `cos_sin[l][i]` and sine `cos_sin[l][head_dim/2 + i]` (`cos_sin` `[L, head_dim]` f32). bf16 out, same
/// shape. `head_dim` must be even and divide `dim`; an empty `x` (no row, or `dim` 0) is an error.
pub fn rms_norm_rope(x: &Tensor, weight: &Tensor, cos_sin: &Tensor, head_dim: usize, eps: f32) -> Result<Tensor> {
    let (batch, len, dim) = x.dims3()?;
    norm_rows("rms_norm_rope", batch, len, dim)?;
    rope_heads(dim, head_dim)?;
    if weight.dims() != [dim] || cos_sin.dims() != [len, head_dim] {
        candle_core::bail!(
            "rms_norm_rope: x {:?}, weight {:?}, cos_sin {:?} and head dim {head_dim} don't fit: expected weight [dim] \
             and cos_sin [len, head_dim]",
            x.dims(),
            weight.dims(),
            cos_sin.dims()
        );
    }
    let op = NormOp::RmsNormRope { len, head_dim, eps };
    bf16_contiguous(x)?.apply_op3_no_bwd(&bf16_contiguous(weight)?, &f32_contiguous(cos_sin)?, &op)
}

/// `x` `[B, L, dim]` normalized over `dim` without affine parameters (mean, then the variance of the centred
/// values, plus `eps`), then `· (1 + scale) + shift`, with `shift` and `scale` `[B, 1, dim]` (one row per batch
/// item) or `[B, L, dim]` (one per token), f32. bf16 out, same shape. An empty `x` is an error.
pub fn ada_layer_norm(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
    let (batch, len, dim) = x.dims3()?;
    norm_rows("ada_layer_norm", batch, len, dim)?;
    let (shift_batch, rows, shift_dim) = shift.dims3()?;
    if shift.dims() != scale.dims() || (shift_batch, shift_dim) != (batch, dim) || (rows != 1 && rows != len) {
        candle_core::bail!(
            "ada_layer_norm: x {:?}, shift {:?} and scale {:?} don't fit: expected shift and scale [B, 1, dim] or \
             [B, L, dim]",
            x.dims(),
            shift.dims(),
            scale.dims()
        );
    }
    let op = NormOp::AdaLayerNorm { len, per_token: rows != 1, eps };
    bf16_contiguous(x)?.apply_op3_no_bwd(&f32_contiguous(shift)?, &f32_contiguous(scale)?, &op)
}

/// `x + y · gate`, `x` and `y` `[B, L, dim]`, `gate` `[B, 1, dim]` (one row per batch item) or `[B, L, dim]` (one
/// per token), summed in f32. bf16 out, `x`'s shape. An empty `x` is an error.
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (batch, len, dim) = x.dims3()?;
    norm_rows("gated_residual", batch, len, dim)?;
    let (gate_batch, rows, gate_dim) = gate.dims3()?;
    if y.dims() != x.dims() || (gate_batch, gate_dim) != (batch, dim) || (rows != 1 && rows != len) {
        candle_core::bail!(
            "gated_residual: x {:?}, y {:?} and gate {:?} don't fit: expected y like x and gate [B, 1, dim] or \
             [B, L, dim]",
            x.dims(),
            y.dims(),
            gate.dims()
        );
    }
    let op = NormOp::GatedResidual { len, per_token: rows != 1 };
    bf16_contiguous(x)?.apply_op3_no_bwd(&bf16_contiguous(y)?, &f32_contiguous(gate)?, &op)
}

fn bf16_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.contiguous()
}

fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

enum NormOp {
    RmsNormRope { len: usize, head_dim: usize, eps: f32 },
    AdaLayerNorm { len: usize, per_token: bool, eps: f32 },
    GatedResidual { len: usize, per_token: bool },
}

impl CustomOp3 for NormOp {
    fn name(&self) -> &'static str {
        match self {
            NormOp::RmsNormRope { .. } => "rms-norm-rope",
            NormOp::AdaLayerNorm { .. } => "ada-layer-norm",
            NormOp::GatedResidual { .. } => "gated-residual",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only; the CPU path is the plain candle ops", self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        a: &CudaStorage,
        a_layout: &Layout,
        b: &CudaStorage,
        b_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let shape = x_layout.shape().clone();
        let (batch, len, dim) = shape.dims3()?;
        // One block per row; refused here too, before anything is allocated, should a caller not have checked.
        let rows = norm_rows(self.name(), batch, len, dim)?;
        let x_view = view::<bf16>(x, x_layout)?;
        // SAFETY: every element is written by the kernel before the tensor is read.
        let out = unsafe { dev.alloc::<bf16>(shape.elem_count())? };
        let config = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        // Every kernel here takes (x, a, b, out, len, dim, one more int[, eps]); b is always f32.
        match *self {
            NormOp::RmsNormRope { len, head_dim, eps } => {
                let (weight, cos_sin) = (view::<bf16>(a, a_layout)?, view::<f32>(b, b_layout)?);
                let ints = [len as i32, dim as i32, head_dim as i32];
                launch(dev, "rms_norm_rope_bf16", (&x_view, &weight, &cos_sin), &out, config, ints, Some(eps))?;
            }
            NormOp::AdaLayerNorm { len, per_token, eps } => {
                let (shift, scale) = (view::<f32>(a, a_layout)?, view::<f32>(b, b_layout)?);
                let ints = [len as i32, dim as i32, i32::from(per_token)];
                launch(dev, "ada_layer_norm_bf16", (&x_view, &shift, &scale), &out, config, ints, Some(eps))?;
            }
            NormOp::GatedResidual { len, per_token } => {
                let (y, gate) = (view::<bf16>(a, a_layout)?, view::<f32>(b, b_layout)?);
                let ints = [len as i32, dim as i32, i32::from(per_token)];
                launch(dev, "gated_residual_bf16", (&x_view, &y, &gate), &out, config, ints, None)?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

/// Launches `kernel(x, a, b, out, ints..., eps)` (`eps` only where given) from this module's PTX.
fn launch<A: DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    (x, a, b): (&CudaView<bf16>, &CudaView<A>, &CudaView<f32>),
    out: &CudaSlice<bf16>,
    config: LaunchConfig,
    ints: [i32; 3],
    eps: Option<f32>,
) -> Result<()> {
    let func = dev.get_or_load_custom_func(kernel, MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(x);
    builder.arg(a);
    builder.arg(b);
    builder.arg(out);
    for int in &ints {
        builder.arg(int);
    }
    if let Some(eps) = &eps {
        builder.arg(eps);
    }
    // SAFETY: the callers pass what each kernel's signature takes; every view is contiguous and whole.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}
