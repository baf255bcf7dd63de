//! The fused bias add and GELU against the plain candle ops they replace in the Wan transformer's
//! feed-forward, computed in f32 on random inputs: bf16 relative error under 1e-2. Needs a CUDA device.

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::relative_error;
use kinetoscope_kernels::{bias_gelu, bias_gelu_support};

#[test]
fn bias_gelu_matches_add_then_gelu() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    // Wan 1.3B's ffn width (the vector path), an odd width (the scalar path), and a single row.
    for (rows, cols) in [(2 * 1560, 8960), (37, 13), (1, 64)] {
        let x = Tensor::randn(0f32, 2.0, (rows, cols), &dev)?.to_dtype(DType::BF16)?;
        let bias = Tensor::randn(0f32, 0.5, cols, &dev)?.to_dtype(DType::BF16)?;
        assert!(bias_gelu_support(&x));
        let got = bias_gelu(&x.reshape((1, rows, cols))?, &bias)?;
        assert_eq!(got.dims(), [1, rows, cols]);
        let want = x.to_dtype(DType::F32)?.broadcast_add(&bias.to_dtype(DType::F32)?)?.gelu()?;
        let err = relative_error(&got.reshape((rows, cols))?, &want)?;
        println!("bias_gelu {rows}x{cols}: relative error {err:.2e}");
        assert!(err < 1e-2, "{rows}x{cols}: relative error {err}");
    }
    Ok(())
}

/// The negative tail, where GELU is tiny and 1 + tanh(u) cancels: each value within 1% (2.6 bf16 ulps) of the
/// f32 reference, not only the tensor as a whole (a `tanh.approx` was about 50 ulps off here).
#[test]
fn bias_gelu_is_accurate_in_the_negative_tail() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let x = Tensor::arange(0u32, 512, &dev)?.to_dtype(DType::F32)?.affine(-4.0 / 512.0, -2.0)?.to_dtype(DType::BF16)?;
    let bias = Tensor::zeros(512, DType::BF16, &dev)?;
    let got = bias_gelu(&x.reshape((1, 1, 512))?, &bias)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let want = x.to_dtype(DType::F32)?.gelu()?.to_vec1::<f32>()?;
    let worst = got.iter().zip(&want).map(|(g, w)| ((g - w) / w).abs()).fold(0f32, f32::max);
    println!("bias_gelu on [-6, -2): largest relative error {worst:.2e}");
    assert!(worst < 1e-2, "largest relative error {worst}");
    Ok(())
}

#[test]
fn a_bias_of_the_wrong_width_is_refused() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let x = Tensor::zeros((4, 16), DType::BF16, &dev)?;
    let err = bias_gelu(&x, &Tensor::zeros(8, DType::BF16, &dev)?).unwrap_err().to_string();
    assert!(err.contains("expected [16]"), "{err}");
    Ok(())
}
