//! The fused normalizations (and the gated residual add) against the plain candle ops they replace in the Wan transformer, computed in f32
//! on random inputs: bf16 relative error under 1e-2. Needs a CUDA device.

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use common::relative_error;
use kinetoscope_kernels::{ada_layer_norm, fused_norms_support, gated_residual, rms_norm_rope};

#[test]
fn rms_norm_rope_matches_norm_then_rotate() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    // (batch, len, heads, head_dim): Wan 1.3B's width, a small one, and head dim 64.
    for (b, l, h, d) in [(2, 300, 12, 128), (1, 7, 2, 32), (2, 65, 4, 64)] {
        let dim = h * d;
        let x = (Tensor::randn(0f32, 3.0, (b, l, dim), &dev)? + 0.5)?.to_dtype(DType::BF16)?;
        let weight = Tensor::randn(1f32, 0.2, dim, &dev)?.to_dtype(DType::BF16)?;
        let angles = Tensor::rand(0f32, 6.3, (l, d / 2), &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        assert!(fused_norms_support(&x));
        let got = rms_norm_rope(&x, &weight, &Tensor::cat(&[&cos, &sin], 1)?, d, 1e-6)?;

        let x32 = x.to_dtype(DType::F32)?;
        let normed = candle_nn::ops::rms_norm(&x32, &weight.to_dtype(DType::F32)?, 1e-6)?;
        let heads = normed.reshape((b, l, h, d))?.transpose(1, 2)?.contiguous()?;
        let want = candle_nn::rotary_emb::rope_i(&heads, &cos, &sin)?.transpose(1, 2)?.reshape((b, l, dim))?;
        let err = relative_error(&got, &want)?;
        println!("rms_norm_rope {b}x{l}x{h}x{d}: relative error {err:.2e}");
        assert!(err < 1e-2, "{b}x{l}x{h}x{d}: relative error {err}");
    }
    Ok(())
}

#[test]
fn ada_layer_norm_matches_norm_then_modulate() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    for (b, l, dim, per_token) in [(2, 300, 1536, false), (1, 9, 64, true), (2, 40, 5120, true)] {
        // A large mean: the two-pass variance must not lose it.
        let x = (Tensor::randn(0f32, 1.0, (b, l, dim), &dev)? + 20.0)?.to_dtype(DType::BF16)?;
        let rows = if per_token { l } else { 1 };
        let shift = Tensor::randn(0f32, 0.5, (b, rows, dim), &dev)?;
        let scale = Tensor::randn(0f32, 0.5, (b, rows, dim), &dev)?;
        let got = ada_layer_norm(&x, &shift, &scale, 1e-6)?;

        let x32 = x.to_dtype(DType::F32)?;
        let centred = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let normed = centred.broadcast_div(&(centred.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?;
        let want = normed.broadcast_mul(&(&scale + 1.0)?)?.broadcast_add(&shift)?;
        let err = relative_error(&got, &want)?;
        println!("ada_layer_norm {b}x{l}x{dim} per token {per_token}: relative error {err:.2e}");
        assert!(err < 1e-2, "{b}x{l}x{dim}: relative error {err}");
    }
    Ok(())
}

#[test]
fn gated_residual_matches_multiply_then_add() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    for (b, l, dim, per_token) in [(2, 300, 1536, false), (1, 9, 64, true), (2, 40, 5120, true)] {
        let x = Tensor::randn(0f32, 4.0, (b, l, dim), &dev)?.to_dtype(DType::BF16)?;
        let y = Tensor::randn(0f32, 1.0, (b, l, dim), &dev)?.to_dtype(DType::BF16)?;
        let gate = Tensor::randn(0f32, 0.5, (b, if per_token { l } else { 1 }, dim), &dev)?;
        let got = gated_residual(&x, &y, &gate)?;
        let want = (x.to_dtype(DType::F32)? + y.to_dtype(DType::F32)?.broadcast_mul(&gate)?)?;
        let err = relative_error(&got, &want)?;
        println!("gated_residual {b}x{l}x{dim} per token {per_token}: relative error {err:.2e}");
        assert!(err < 1e-2, "{b}x{l}x{dim}: relative error {err}");
    }
    Ok(())
}

#[test]
fn shapes_that_do_not_fit_are_refused() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let x = Tensor::zeros((1, 4, 64), DType::BF16, &dev)?;
    let weight = Tensor::ones(64, DType::BF16, &dev)?;
    assert!(rms_norm_rope(&x, &weight, &Tensor::zeros((4, 16), DType::F32, &dev)?, 32, 1e-6).is_err());
    assert!(rms_norm_rope(&x, &weight, &Tensor::zeros((4, 32), DType::F32, &dev)?, 48, 1e-6).is_err());
    let modulation = Tensor::zeros((1, 2, 64), DType::F32, &dev)?;
    assert!(ada_layer_norm(&x, &modulation, &modulation, 1e-6).is_err());
    assert!(gated_residual(&x, &x, &modulation).is_err());
    assert!(gated_residual(&x, &Tensor::zeros((1, 4, 32), DType::BF16, &dev)?, &modulation.narrow(1, 0, 1)?).is_err());
    Ok(())
}

/// An empty `x` (no row, or a width of 0) is refused by each op before anything is launched: one block per row
/// would make a grid of no blocks (a CUDA error), and the kernels divide by the width.
#[test]
fn empty_inputs_are_refused() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    for (b, l, dim) in [(0, 4, 64), (1, 0, 64), (1, 4, 0)] {
        let x = Tensor::zeros((b, l, dim), DType::BF16, &dev)?;
        let weight = Tensor::ones(dim, DType::BF16, &dev)?;
        let cos_sin = Tensor::zeros((l, 32), DType::F32, &dev)?;
        let modulation = Tensor::zeros((b, 1, dim), DType::F32, &dev)?;
        let results = [
            ("rms_norm_rope", rms_norm_rope(&x, &weight, &cos_sin, 32, 1e-6)),
            ("ada_layer_norm", ada_layer_norm(&x, &modulation, &modulation, 1e-6)),
            ("gated_residual", gated_residual(&x, &x, &modulation)),
        ];
        for (op, result) in results {
            let err = result.expect_err(op).to_string();
            println!("{op} of [{b}, {l}, {dim}]: {err}");
            assert!(err.contains(op) && err.contains("at least one row"), "{op} [{b}, {l}, {dim}]: {err}");
        }
    }
    Ok(())
}

/// `rms_norm_rope` turns pairs of channels `(2i, 2i + 1)` within a head: an odd head dim (a pair would straddle
/// two heads), 0, or one that does not divide the width is refused, with tables of the matching size.
#[test]
fn odd_or_partial_heads_are_refused() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    for (dim, head_dim) in [(66, 33), (96, 3), (64, 0), (64, 48)] {
        let x = Tensor::zeros((1, 4, dim), DType::BF16, &dev)?;
        let weight = Tensor::ones(dim, DType::BF16, &dev)?;
        let cos_sin = Tensor::zeros((4, head_dim), DType::F32, &dev)?;
        let err = rms_norm_rope(&x, &weight, &cos_sin, head_dim, 1e-6).unwrap_err().to_string();
        assert!(err.contains("must be even") && err.contains(&format!("width {dim}")), "{dim}/{head_dim}: {err}");
    }
    Ok(())
}
