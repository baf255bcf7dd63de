//! `flash_attention` against the plain computation in f32, `softmax(q·kᵀ·scale)·v`, on random inputs: bf16
//! relative error under 1e-2 for both head dims, lengths that are and aren't multiples of the kernel's tiles,
//! cross-attention lengths, strided and misaligned inputs. Needs a CUDA device.

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use common::relative_error;
use kinetoscope_kernels::{flash_attention, flash_attention_supports};

fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
}

fn random(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16)
}

/// The worst row's largest difference, relative to that row's largest reference value: one wrong row (of a
/// partial tile, say) that the whole tensor's relative error would average away.
fn worst_row_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let d = want.dim(D::Minus1)?;
    let rows = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous()?.reshape(((), d));
    let (got, want) = (rows(got)?, rows(want)?);
    let largest_difference = (got - &want)?.abs()?.max(D::Minus1)?;
    let largest_value = want.abs()?.max(D::Minus1)?.clamp(1e-6f32, f32::MAX)?;
    (largest_difference / largest_value)?.max(0)?.to_scalar::<f32>()
}

#[test]
fn matches_the_plain_computation() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    // (batch, heads, q_len, k_len, head_dim)
    for (b, h, lq, lk, d) in [
        (1, 1, 1, 1, 64),
        (2, 3, 17, 29, 64),
        (1, 2, 64, 64, 128),
        (1, 2, 65, 130, 128),
        (1, 12, 100, 512, 128),
        (2, 4, 333, 77, 64),
        (1, 2, 1000, 1000, 128),
    ] {
        let (q, k, v) = (random(&[b, h, lq, d], &dev)?, random(&[b, h, lk, d], &dev)?, random(&[b, h, lk, d], &dev)?);
        assert!(flash_attention_supports(&q));
        let scale = 1.0 / (d as f64).sqrt();
        let (got, want) = (flash_attention(&q, &k, &v, scale)?, reference(&q, &k, &v, scale)?);
        let (err, worst_row) = (relative_error(&got, &want)?, worst_row_error(&got, &want)?);
        println!("{b}x{h}x{lq}x{lk}x{d}: relative error {err:.2e}, worst row {worst_row:.2e}");
        assert!(err < 1e-2, "{b}x{h}x{lq}x{lk}x{d}: relative error {err}");
        assert!(worst_row < 3e-2, "{b}x{h}x{lq}x{lk}x{d}: worst row's error {worst_row}");
    }
    Ok(())
}

/// Tokens-major `[batch, len, heads, d]` seen as `[batch, heads, len, d]` (what the transformer's projections
/// give) is read in place; a view whose rows start off the kernel's alignment is copied first. Both agree with
/// the reference, and large scores (a peaked softmax) stay finite.
#[test]
fn strided_misaligned_and_peaked_inputs() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (b, h, l, d) = (2, 3, 70, 64);
    let q = random(&[b, l, h, d], &dev)?.transpose(1, 2)?;
    let k = random(&[b, l, h, d], &dev)?.transpose(1, 2)?;
    let v = random(&[b, h, l, d + 8], &dev)?.narrow(D::Minus1, 1, d)?;
    let scale = 1.0 / (d as f64).sqrt();
    let err = relative_error(&flash_attention(&q, &k, &v, scale)?, &reference(&q, &k, &v, scale)?)?;
    assert!(err < 1e-2, "strided: relative error {err}");

    let peaked = (random(&[1, 2, 50, 128], &dev)? * 8.0)?.to_dtype(DType::BF16)?;
    let out = flash_attention(&peaked, &peaked, &peaked, 1.0)?;
    let err = relative_error(&out, &reference(&peaked, &peaked, &peaked, 1.0)?)?;
    assert!(err < 1e-2, "peaked: relative error {err}");
    Ok(())
}

/// A peaked softmax over 1000 keys whose maximum is the last key, in the last and partial tile (1000 = 15·64 +
/// 40): every row's running maximum jumps there, so every rescale of what was accumulated runs. Compared row by
/// row as well as whole.
#[test]
fn a_maximum_in_the_last_partial_tile() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (b, h, l, d) = (1, 2, 1000, 128);
    let toward = Tensor::randn(0f32, 1.0, (1, 1, 1, d), &dev)?;
    let q = (toward.broadcast_as((b, h, l, d))? + Tensor::randn(0f32, 0.1, (b, h, l, d), &dev)?)?;
    let last_key = (toward.broadcast_as((b, h, 1, d))? * 4.0)?;
    let k = Tensor::cat(&[Tensor::randn(0f32, 1.0, (b, h, l - 1, d), &dev)?, last_key], 2)?;
    let v = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev)?;
    let [q, k, v] = [q, k, v].map(|t| t.to_dtype(DType::BF16));
    let (q, k, v) = (q?, k?, v?);
    let scale = 1.0 / (d as f64).sqrt();
    let (got, want) = (flash_attention(&q, &k, &v, scale)?, reference(&q, &k, &v, scale)?);
    let (err, worst_row) = (relative_error(&got, &want)?, worst_row_error(&got, &want)?);
    println!("maximum in the last tile: relative error {err:.2e}, worst row {worst_row:.2e}");
    assert!(err < 1e-2 && worst_row < 3e-2, "relative error {err}, worst row {worst_row}");
    Ok(())
}

#[test]
fn bad_inputs_are_refused_by_shape_and_dtype() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let q = random(&[1, 2, 8, 64], &dev)?;
    let err = flash_attention(&q, &random(&[1, 2, 8, 128], &dev)?, &random(&[1, 2, 8, 128], &dev)?, 1.0);
    assert!(err.unwrap_err().to_string().contains("head dim"));
    let odd = random(&[1, 2, 8, 96], &dev)?;
    assert!(!flash_attention_supports(&odd));
    assert!(flash_attention(&odd, &odd, &odd, 1.0).is_err());
    let f32 = q.to_dtype(DType::F32)?;
    assert!(flash_attention(&f32, &f32, &f32, 1.0).is_err());
    Ok(())
}

/// No query or no key is refused before anything is launched (a grid of no blocks is a CUDA error).
#[test]
fn empty_queries_or_keys_are_refused() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (q, kv) = (random(&[1, 2, 8, 64], &dev)?, random(&[1, 2, 8, 64], &dev)?);
    let (no_q, no_kv) = (random(&[1, 2, 0, 64], &dev)?, random(&[1, 2, 0, 64], &dev)?);
    for (q, k) in [(&no_q, &kv), (&q, &no_kv)] {
        let err = flash_attention(q, k, k, 0.125).unwrap_err().to_string();
        assert!(err.contains("at least one query and one key"), "{err}");
    }
    Ok(())
}
