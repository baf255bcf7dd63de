//! The feed-forward's bias add and GELU in one pass (`kernels/activations.cu`), bf16 on CUDA, f32 inside.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use crate::view;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activations.ptx"));
const MODULE: &str = "kinetoscope_activations";
const THREADS: u32 = 256;
/// Blocks per launch at most: a grid-stride loop covers the rest (a few waves on any current GPU).
const MAX_BLOCKS: usize = 4096;

/// Whether [`bias_gelu`] takes `x`: bf16 on a CUDA device.
pub fn bias_gelu_support(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16
}

/// GELU (tanh approximation) of `x + bias`, `x` `[..., cols]` and `bias` `[cols]`; bf16 out, `x`'s shape.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let cols = x.dim(candle_core::D::Minus1)?;
    if bias.dims() != [cols] {
        candle_core::bail!("bias_gelu: bias {:?} doesn't fit x {:?}: expected [{cols}]", bias.dims(), x.dims());
    }
    let (x, bias) = (x.to_dtype(DType::BF16)?.contiguous()?, bias.to_dtype(DType::BF16)?.contiguous()?);
    x.apply_op2_no_bwd(&bias, &BiasGelu { cols })
}

struct BiasGelu {
    cols: usize,
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu-tanh"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA only; the CPU path is the plain candle ops", self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        bias: &CudaStorage,
        bias_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let shape = x_layout.shape().clone();
        let n = shape.elem_count();
        let x_view = view::<bf16>(x, x_layout)?;
        let bias_view = view::<bf16>(bias, bias_layout)?;
        // Eight values a thread where rows hold whole 16-byte vectors and both views start on one (candle's
        // allocations do; an offset into one might not).
        let vectorized = self.cols.is_multiple_of(8)
            && x_layout.start_offset().is_multiple_of(8)
            && bias_layout.start_offset().is_multiple_of(8);
        // SAFETY: every element is written by the kernel before the tensor is read.
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let per_thread = if vectorized { 8 } else { 1 };
        let blocks = n.div_ceil(per_thread * THREADS as usize).clamp(1, MAX_BLOCKS) as u32;
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let func = dev.get_or_load_custom_func("bias_gelu_tanh_bf16", MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&x_view);
        builder.arg(&bias_view);
        builder.arg(&out);
        candle_core::builder_arg!(builder, n as i64, self.cols as i32, i32::from(vectorized));
        // SAFETY: the arguments match the kernel's signature; both views are contiguous and whole.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}
