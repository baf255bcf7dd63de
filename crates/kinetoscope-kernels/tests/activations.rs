//! The fused bias add and GELU against PyTorch's `gelu(x + bias, approximate="tanh")` (diffusers' `gelu-approximate`,
//! the same formula as candle's `gelu`), evaluated on the CPU in f64 from the same bf16 inputs: bf16 relative error
//! under 1e-2 on random inputs, and value by value in the negative tail and where it saturates. Needs a CUDA device.

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::relative_error;
use kinetoscope_kernels::{bias_gelu, bias_gelu_support};

/// `0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³)))` of `x + bias` (candle's f64 `gelu` is that formula, as PyTorch's
/// `gelu(approximate="tanh")`), on the CPU in f64: accurate where f32 is not, since `1 + tanh(u)` cancels for
/// v ≲ −2 (in f32 it is already 0 below about −5.3, where GELU is still ~1e-8).
fn reference(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let f64_on_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    f64_on_cpu(x)?.broadcast_add(&f64_on_cpu(bias)?)?.gelu()
}

/// The largest of |got − want| / (|want| + `floor`), value by value (NaN counts as the worst).
fn worst_value_error(got: &Tensor, want: &Tensor, floor: f64) -> Result<(f64, f64)> {
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let want = want.flatten_all()?.to_vec1::<f64>()?;
    let errors = got.iter().zip(&want).map(|(g, w)| ((g - w).abs() / (w.abs() + floor), *w));
    Ok(errors.fold((0.0, 0.0), |worst, (e, w)| if e.is_nan() || e > worst.0 { (e, w) } else { worst }))
}

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
        let want = reference(&x, &bias)?;
        let err = relative_error(&got.reshape((rows, cols))?.to_device(&Device::Cpu)?, &want)?;
        println!("bias_gelu {rows}x{cols}: relative error {err:.2e}");
        assert!(err < 1e-2, "{rows}x{cols}: relative error {err}");
    }
    Ok(())
}

/// The negative tail, where GELU is tiny and 1 + tanh(u) cancels: each value within 1% (2.6 bf16 ulps) of the
/// f64 reference, not only the tensor as a whole (a `tanh.approx` was about 50 ulps off here), through a bias.
#[test]
fn bias_gelu_is_accurate_in_the_negative_tail() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let x = Tensor::arange(0u32, 512, &dev)?.to_dtype(DType::F32)?.affine(-4.0 / 512.0, -1.5)?.to_dtype(DType::BF16)?;
    let bias = Tensor::full(-0.5f32, 512, &dev)?.to_dtype(DType::BF16)?;
    let got = bias_gelu(&x.reshape((1, 1, 512))?, &bias)?;
    let (worst, at) = worst_value_error(&got, &reference(&x, &bias)?, 0.0)?;
    println!("bias_gelu on [-6, -2): largest relative error {worst:.2e} (where GELU is {at:.3e})");
    assert!(worst < 1e-2, "largest relative error {worst} (where GELU is {at:e})");
    Ok(())
}

/// Where e^(−2u) overflows or vanishes, and where v³ does: 0 (or a tiny negative) for large negative v, v itself
/// for large positive v; never NaN or infinite for finite v.
#[test]
fn bias_gelu_saturates_without_nan() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let values =
        [-3e38f32, -1e20, -1e4, -100.0, -20.0, -10.0, -9.0, -8.0, -7.0, 7.0, 8.0, 10.0, 100.0, 1e4, 1e20, 3e38];
    let x = Tensor::new(&values, &dev)?.to_dtype(DType::BF16)?;
    let bias = Tensor::zeros(values.len(), DType::BF16, &dev)?;
    let got = bias_gelu(&x.reshape((1, 1, values.len()))?, &bias)?;
    let finite = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(finite.iter().all(|v| v.is_finite()), "{finite:?}");
    // Relative 1% where GELU is representable, absolute 1e-30 where it is (nearly) 0 and f32 flushes it.
    let (worst, at) = worst_value_error(&got, &reference(&x, &bias)?, 1e-28)?;
    println!("bias_gelu where it saturates: largest error {worst:.2e} (where GELU is {at:.3e}): {finite:?}");
    assert!(worst < 1e-2, "largest error {worst} (where GELU is {at:e}): {finite:?}");
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
