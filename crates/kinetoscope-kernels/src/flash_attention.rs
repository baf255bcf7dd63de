//! `softmax(q·kᵀ·scale)·v` on the GPU without the `q_len × k_len` score matrix, bf16, head dims 64 and 128, any
//! lengths, non-causal, by one of two kernels chosen per device: FlashAttention-3 on Hopper (wgmma, TMA, warp
//! specialization: `third_party/candle-flash-attn-v3`, in a build with the `flash-attn-v3` feature), else the
//! project's `kernels/flash_attention.cu` (FlashAttention-2's algorithm on the tensor cores, any GPU of compute
//! capability 8.0 or more).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use half::bf16;

use crate::shapes::{flash_attention_grid_y, something_to_attend};
use crate::view;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
/// Query rows per block (16 per warp) and threads per block, as the kernel is compiled.
const BLOCK_M: usize = 64;
const THREADS: u32 = 128;
/// The kernel's 16-byte loads need every row, head and batch to start on a multiple of 8 bf16.
const ALIGN: usize = 8;

/// Head dimensions the kernel is compiled for.
pub const FLASH_ATTENTION_HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether [`flash_attention`] takes `q` (and keys and values like it): bf16 on a CUDA device, `[batch, heads,
/// len, head_dim]` with a head dim it is compiled for.
pub fn flash_attention_supports(q: &Tensor) -> bool {
    q.device().is_cuda()
        && q.dtype() == DType::BF16
        && q.rank() == 4
        && FLASH_ATTENTION_HEAD_DIMS.contains(&q.dims()[3])
}

/// The attention kernels, chosen per device by [`attention_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// FlashAttention-3's forward kernels, compiled for sm_90a: Hopper (compute capability 9.0) only, in a build
    /// with the `flash-attn-v3` feature.
    FlashAttention3,
    /// `kernels/flash_attention.cu`: any GPU of compute capability 8.0 or more.
    Own,
}

impl AttentionKernel {
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::FlashAttention3 => "flash-attention-3",
            AttentionKernel::Own => "own",
        }
    }
}

/// The kernels this build can run on `device`, the fastest first.
pub fn attention_kernels(device: &Device) -> Vec<AttentionKernel> {
    has_flash_attention_3(device)
        .then_some(AttentionKernel::FlashAttention3)
        .into_iter()
        .chain([AttentionKernel::Own])
        .collect()
}

/// The kernel [`flash_attention`] runs on `device`: the fastest of [`attention_kernels`], unless
/// `KINETOSCOPE_ATTENTION=own` (read once) keeps the project's kernel, to compare or to rule FlashAttention-3 out.
pub fn attention_kernel(device: &Device) -> AttentionKernel {
    static OWN: OnceLock<bool> = OnceLock::new();
    let own = *OWN.get_or_init(|| std::env::var("KINETOSCOPE_ATTENTION").is_ok_and(|v| v == "own"));
    if !own && has_flash_attention_3(device) {
        AttentionKernel::FlashAttention3
    } else {
        AttentionKernel::Own
    }
}

/// This build has FlashAttention-3 and `device` runs it.
fn has_flash_attention_3(device: &Device) -> bool {
    cfg!(feature = "flash-attn-v3") && is_hopper(device)
}

/// Compute capability 9.0: sm_90a code (wgmma, TMA) runs there and nowhere else, not even on later GPUs.
fn is_hopper(device: &Device) -> bool {
    let Device::Cuda(cuda) = device else { return false };
    cuda.cuda_stream().context().compute_capability().is_ok_and(|capability| capability == (9, 0))
}

/// Launches of an attention kernel in this process so far, by [`flash_attention`] (each call launches one).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// How many times [`flash_attention`] has launched a kernel in this process: read before and after a forward
/// pass, whether (and how often) the model's attention took a kernel rather than the plain path.
pub fn flash_attention_launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// `softmax(q·kᵀ·scale)·v` for `q` `[batch, heads, q_len, d]`, `k` and `v` `[batch, heads, k_len, d]`, bf16 on
/// one CUDA device (see [`flash_attention_supports`]), by the device's [`attention_kernel`]; the softmax and the
/// products accumulate in f32. Any strides are taken (copied first where a kernel can't read them in place: the
/// head dim not contiguous, or misaligned; for FlashAttention-3 also broadcast, stride 0). The output is
/// `[batch, heads, q_len, d]`. Errors, before anything is launched: no query or no key, shapes that disagree, and
/// what a kernel can't index (see [`flash_attention_with`]).
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    flash_attention_with(attention_kernel(q.device()), q, k, v, scale)
}

/// [`flash_attention`] by the kernel named (tests and benchmarks run each). The project's kernel refuses more than
/// 65,535 (batch, head) pairs (one row of blocks each: CUDA's grid limit along y), and FlashAttention-3 a batch
/// item of more than 2³² elements (its strides are 32-bit) and any GPU but Hopper.
pub fn flash_attention_with(kernel: AttentionKernel, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (batch, heads, q_len, d) = q.dims4()?;
    let (k_batch, k_heads, k_len, k_d) = k.dims4()?;
    if (k_batch, k_heads, k_d) != (batch, heads, d) || k.dims() != v.dims() {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?} and v {:?} must share batch, heads and head dim, k and v their shape",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    something_to_attend(batch, heads, q_len, k_len)?;
    if !flash_attention_supports(q) || k.dtype() != DType::BF16 || v.dtype() != DType::BF16 {
        candle_core::bail!(
            "flash attention takes bf16 on CUDA with head dim {FLASH_ATTENTION_HEAD_DIMS:?}, got {:?} {:?} on {:?}",
            q.dtype(),
            q.dims(),
            q.device().location()
        );
    }
    let out = match kernel {
        AttentionKernel::Own => {
            flash_attention_grid_y(batch, heads, q_len, k_len)?;
            let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
            q.apply_op3_no_bwd(&k, &v, &FlashAttention { scale })?
        }
        AttentionKernel::FlashAttention3 => flash_attention_3(q, k, v, scale)?,
    };
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    Ok(out)
}

/// FlashAttention-3 over Wan's `[batch, heads, len, d]`: it takes `[batch, len, heads, d]`, which is what the
/// transformer's projections give before their heads are split, so the transposed views are read in place.
#[cfg(feature = "flash-attn-v3")]
fn flash_attention_3(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if !is_hopper(q.device()) {
        candle_core::bail!(
            "FlashAttention-3 runs on compute capability 9.0 (H100, H200) only: use AttentionKernel::Own"
        )
    }
    let (_, heads, q_len, d) = q.dims4()?;
    crate::shapes::flash_attention_3_fits(q_len.max(k.dim(2)?), heads, d)?;
    let tokens_major = |t: &Tensor| {
        let t = t.transpose(1, 2)?;
        if crate::shapes::tma_reads_in_place(t.stride()) && t.layout().start_offset().is_multiple_of(ALIGN) {
            Ok(t)
        } else {
            t.contiguous()
        }
    };
    let (q, k, v) = (tokens_major(q)?, tokens_major(k)?, tokens_major(v)?);
    candle_flash_attn_v3::flash_attn(&q, &k, &v, scale as f32, false, false)?.transpose(1, 2)
}

#[cfg(not(feature = "flash-attn-v3"))]
fn flash_attention_3(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Tensor> {
    candle_core::bail!(
        "this build has no FlashAttention-3: build with the flash-attn-v3 feature (scripts/build-cuda.sh does for \
         CUDA_COMPUTE_CAP=90)"
    )
}

/// `t` itself when the kernel can read it in place (head dim contiguous; rows, heads and batches starting on
/// multiples of [`ALIGN`]), else a contiguous copy.
fn aligned(t: &Tensor) -> Result<Tensor> {
    let layout = t.layout();
    let stride = layout.stride();
    let in_place = stride[3] == 1
        && layout.start_offset().is_multiple_of(ALIGN)
        && stride[..3].iter().zip(t.dims()).all(|(s, n)| *n == 1 || s.is_multiple_of(ALIGN));
    if in_place {
        Ok(t.clone())
    } else {
        t.copy()
    }
}

struct FlashAttention {
    scale: f64,
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        candle_core::bail!("flash attention runs on CUDA only; the CPU path is layers::attention")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_layout: &Layout,
        k: &CudaStorage,
        k_layout: &Layout,
        v: &CudaStorage,
        v_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let (batch, heads, q_len, d) = q_layout.shape().dims4()?;
        let k_len = k_layout.shape().dims()[2];
        let (q_view, k_view, v_view) =
            (view::<bf16>(q, q_layout)?, view::<bf16>(k, k_layout)?, view::<bf16>(v, v_layout)?);
        // SAFETY: every element is written by the kernel before the tensor is read.
        let out = unsafe { dev.alloc::<bf16>(batch * heads * q_len * d)? };
        let func =
            dev.get_or_load_custom_func(&format!("flash_attention_bf16_d{d}"), "kinetoscope_flash_attention", PTX)?;
        let grid_y = flash_attention_grid_y(batch, heads, q_len, k_len)?;
        let config = LaunchConfig {
            grid_dim: (q_len.div_ceil(BLOCK_M) as u32, grid_y, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let strides = |l: &Layout| -> [i64; 3] {
            let s = l.stride();
            [s[0] as i64, s[1] as i64, s[2] as i64]
        };
        let (qs, ks, vs) = (strides(q_layout), strides(k_layout), strides(v_layout));
        let mut builder = func.builder();
        builder.arg(&q_view);
        builder.arg(&k_view);
        builder.arg(&v_view);
        builder.arg(&out);
        candle_core::builder_arg!(builder, heads as i32, q_len as i32, k_len as i32);
        candle_core::builder_arg!(builder, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2]);
        // The kernel works in base 2: exp(x·scale) = 2^(x·scale·log2 e).
        candle_core::builder_arg!(builder, (self.scale * std::f64::consts::LOG2_E) as f32);
        // SAFETY: the arguments match the kernel's signature; the views cover what the strides reach.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((batch, heads, q_len, d))))
    }
}
