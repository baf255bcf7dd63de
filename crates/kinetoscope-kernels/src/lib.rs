//! Kinetoscope's own CUDA kernels as candle ops, each with the plain candle computation it replaces as its
//! reference (the tests compare them), and with the `cudnn` feature cuDNN's 3D convolution. Compiled only with the
//! `cuda` feature; without it the crate is empty and callers keep the plain path.

#[cfg(feature = "cuda")]
mod activations;
#[cfg(feature = "cudnn")]
mod conv3d;
#[cfg(feature = "cuda")]
mod flash_attention;
#[cfg(feature = "cuda")]
mod norms;
// The shapes each launch takes and refuses, as plain arithmetic: used by the ops, and tested without a GPU.
#[cfg(any(feature = "cuda", test))]
mod shapes;
// The flash-attention kernel's per-lane indexing emulated on the CPU: tests that run without a GPU (and the feature).
#[cfg(test)]
mod flash_attention_emulation;

#[cfg(feature = "cuda")]
/// The part of `storage` that `layout` starts at, as a device view of `T` (the kernels index it themselves).
fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a candle_core::CudaStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
}

#[cfg(feature = "cuda")]
pub use activations::{bias_gelu, bias_gelu_support};
#[cfg(feature = "cudnn")]
pub use conv3d::{conv3d_kernel, cudnn_conv3d, ConvKernel};
#[cfg(feature = "cuda")]
pub use flash_attention::{
    attention_kernel, attention_kernels, flash_attention, flash_attention_launches, flash_attention_supports,
    flash_attention_with, AttentionKernel, FLASH_ATTENTION_HEAD_DIMS,
};
#[cfg(feature = "cuda")]
pub use norms::{ada_layer_norm, fused_norms_support, gated_residual, rms_norm_rope};

#[cfg(feature = "cuda")]
/// Whether the project's kernels replace the plain candle ops where they apply: yes unless
/// `KINETOSCOPE_KERNELS=plain` (read once), which keeps every op on candle's own path, to compare or to rule a
/// kernel out.
pub fn kernels_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("KINETOSCOPE_KERNELS").map_or(true, |v| v != "plain"))
}
