//! Each attention kernel the device runs (FlashAttention-3 on Hopper in a build with it, the project's own
//! everywhere) against the plain computation in f32, `softmax(q·kᵀ·scale)·v`, on random inputs: bf16
//! relative error under 1e-2 for both head dims, lengths that are and aren't multiples of the kernel's tiles,
//! cross-attention lengths, strided, broadcast and misaligned inputs, and rows sampled at Wan 1.3B's real length;
//! every case also row by row. Needs a CUDA device (the kernel's indexing is also emulated on the CPU, without
//! one: `src/flash_attention_emulation.rs`).

#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Result, Tensor, D};
use common::relative_error;
use kinetoscope_kernels::{
    attention_kernel, attention_kernels, flash_attention, flash_attention_launches, flash_attention_supports,
    flash_attention_with, AttentionKernel,
};

fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)
}

fn random(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16)
}

/// The worst row's largest difference, relative to that row's largest reference value (one wrong row, of a
/// partial tile say, that the whole tensor's relative error would average away), and that row's index (in the
/// rows of all batch items and heads, one after the other).
fn worst_row(got: &Tensor, want: &Tensor) -> Result<(f32, usize)> {
    let d = want.dim(D::Minus1)?;
    let rows = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous()?.reshape(((), d));
    let (got, want) = (rows(got)?, rows(want)?);
    let largest_difference = (got - &want)?.abs()?.max(D::Minus1)?;
    let largest_value = want.abs()?.max(D::Minus1)?.clamp(1e-6f32, f32::MAX)?;
    let errors = (largest_difference / largest_value)?.to_vec1::<f32>()?;
    // NaN counts as the worst.
    let worst =
        errors.iter().enumerate().fold((0f32, 0), |(e, i), (j, &x)| if x.is_nan() || x > e { (x, j) } else { (e, i) });
    Ok(worst)
}

/// `got` against `want`, printed and asserted as `case`: the whole tensor's relative error under 1e-2 and the worst
/// row's under 3e-2.
fn assert_close(case: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let (err, (worst, row)) = (relative_error(got, want)?, worst_row(got, want)?);
    println!("{case}: relative error {err:.2e}, worst row {worst:.2e} (row {row})");
    assert!(err < 1e-2 && worst < 3e-2, "{case}: relative error {err}, worst row {worst} (row {row})");
    Ok(())
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
        let want = reference(&q, &k, &v, scale)?;
        for kernel in attention_kernels(&dev) {
            let got = flash_attention_with(kernel, &q, &k, &v, scale)?;
            assert_close(&format!("{}: {b}x{h}x{lq}x{lk}x{d}", kernel.name()), &got, &want)?;
        }
    }
    Ok(())
}

/// Tokens-major `[batch, len, heads, d]` seen as `[batch, heads, len, d]` (what the transformer's projections
/// give: head stride d, row stride heads·d) is read in place, at both head dims; a view whose rows start off the
/// kernel's alignment is copied first. Both agree with the reference, and large scores (a peaked softmax) stay
/// finite. Small: compute-sanitizer runs it (benches/gpu/run.sh).
#[test]
fn strided_misaligned_and_peaked_inputs() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    for d in [64, 128] {
        let (b, h, l) = (2, 3, 70);
        let q = random(&[b, l, h, d], &dev)?.transpose(1, 2)?;
        let k = random(&[b, l, h, d], &dev)?.transpose(1, 2)?;
        assert_eq!(q.stride(), [l * h * d, d, h * d, 1]);
        let v = random(&[b, h, l, d + 8], &dev)?.narrow(D::Minus1, 1, d)?;
        let scale = 1.0 / (d as f64).sqrt();
        let want = reference(&q, &k, &v, scale)?;
        for kernel in attention_kernels(&dev) {
            let got = flash_attention_with(kernel, &q, &k, &v, scale)?;
            assert_close(&format!("{}: strided d {d}", kernel.name()), &got, &want)?;
        }
    }

    let peaked = (random(&[1, 2, 50, 128], &dev)? * 8.0)?.to_dtype(DType::BF16)?;
    let want = reference(&peaked, &peaked, &peaked, 1.0)?;
    for kernel in attention_kernels(&dev) {
        let err = relative_error(&flash_attention_with(kernel, &peaked, &peaked, &peaked, 1.0)?, &want)?;
        assert!(err < 1e-2, "{}: peaked: relative error {err}", kernel.name());
    }
    Ok(())
}

/// Keys and values broadcast over batch and heads (strides 0, as `broadcast_as` makes them: one key/value head
/// for all) are taken as they are, strides included; so is a value broadcast over the keys (row stride 0), where
/// every key weighs the same row and each output row is that row. Small: compute-sanitizer runs it.
#[test]
fn broadcast_keys_and_values() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (b, h, lq, lk, d) = (2, 3, 70, 90, 128);
    let scale = 1.0 / (d as f64).sqrt();
    let q = random(&[b, h, lq, d], &dev)?;
    let k = random(&[1, 1, lk, d], &dev)?.broadcast_as((b, h, lk, d))?;
    let v = random(&[1, 1, lk, d], &dev)?.broadcast_as((b, h, lk, d))?;
    assert_eq!(k.stride(), [0, 0, d, 1]);
    let row_of_v = random(&[b, h, 1, d], &dev)?;
    let one_row = row_of_v.broadcast_as((b, h, lk, d))?;
    assert_eq!(one_row.stride()[2], 0);
    let (want, want_row) = (reference(&q, &k, &v, scale)?, row_of_v.to_dtype(DType::F32)?.broadcast_as((b, h, lq, d))?);
    for kernel in attention_kernels(&dev) {
        let name = kernel.name();
        let got = flash_attention_with(kernel, &q, &k, &v, scale)?;
        assert_close(&format!("{name}: k and v broadcast over batch and heads"), &got, &want)?;
        let got = flash_attention_with(kernel, &q, &k, &one_row, scale)?;
        assert_close(&format!("{name}: v broadcast over the keys (one value row)"), &got, &want_row)?;
    }
    Ok(())
}

/// A peaked softmax over 1000 keys whose maximum is the last key, in the last and partial tile (1000 = 15·64 +
/// 40): every row's running maximum jumps there, so every rescale of what was accumulated runs. Compared row by
/// row as well as whole, and the rows of the last, partial query block (960..1000) on their own.
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
    let want = reference(&q, &k, &v, scale)?;
    for kernel in attention_kernels(&dev) {
        let name = kernel.name();
        let got = flash_attention_with(kernel, &q, &k, &v, scale)?;
        assert_close(&format!("{name}: maximum in the last tile"), &got, &want)?;
        let (got, want) = (got.narrow(2, 960, 40)?, want.narrow(2, 960, 40)?);
        assert_close(&format!("{name}: its last, partial query block"), &got, &want)?;
    }
    Ok(())
}

/// Wan 2.1 1.3B at 832×480×81: 21 latent frames of 60×104, in 2×2 patches, 21·30·52 = 32,760 tokens, heads of
/// 128, tokens-major as the transformer gives them; 32,760 = 511·64 + 56, so both the last query block and the
/// last key tile are partial. The kernel computes every row; a sample of rows (the first, tile edges, the last
/// block's, spread ones) is compared with a reference computed on the CPU for those rows only.
#[test]
fn sampled_rows_at_wan_length() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let (b, h, l, d) = (1, 2, 32_760, 128);
    // Scores of standard deviation 2: a softmax neither flat nor one-hot over 32,760 keys.
    let q = (Tensor::randn(0f32, 2.0, (b, l, h, d), &dev)?.to_dtype(DType::BF16)?).transpose(1, 2)?;
    let k = random(&[b, l, h, d], &dev)?.transpose(1, 2)?;
    let v = random(&[b, l, h, d], &dev)?.transpose(1, 2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut rows: Vec<u32> = vec![0, 1, 15, 16, 63, 64, 127, 4095, 16_383, 16_384, 32_703, 32_704, 32_705, 32_759];
    let mut state = 12_345u32;
    rows.extend((0..18).map(|_| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        state % l as u32
    }));
    let cpu = Device::Cpu;
    let picked = Tensor::new(rows.as_slice(), &cpu)?;
    let on_cpu = |t: &Tensor| t.to_device(&cpu)?.to_dtype(DType::F32)?.contiguous();
    let want = reference(&on_cpu(&q)?.index_select(&picked, 2)?, &on_cpu(&k)?, &on_cpu(&v)?, scale)?;
    for kernel in attention_kernels(&dev) {
        let name = kernel.name();
        let got = on_cpu(&flash_attention_with(kernel, &q, &k, &v, scale)?)?.index_select(&picked, 2)?;
        let (err, (worst, row)) = (relative_error(&got, &want)?, worst_row(&got, &want)?);
        let row = rows[row % rows.len()];
        println!("{name}: {} rows of {l}: relative error {err:.2e}, worst row {worst:.2e} (token {row})", rows.len());
        assert!(
            err < 1e-2 && worst < 3e-2,
            "{name}: length {l}: relative error {err}, worst row {worst} (token {row})"
        );
    }
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
        for kernel in attention_kernels(&dev) {
            let err = flash_attention_with(kernel, q, k, k, 0.125).unwrap_err().to_string();
            assert!(err.contains("at least one query and one key"), "{}: {err}", kernel.name());
        }
    }
    Ok(())
}

/// The project's kernel has one row of blocks per (batch, head) pair: more than a grid holds along y (65,535) is
/// refused before anything is launched; 65,535 run, and are counted as one launch. q, k and v are one row
/// broadcast over batch and heads (strides 0) and a single key, so every output row is v's row.
#[test]
fn batch_times_heads_up_to_the_grid_limit() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let d = 64;
    let (q_row, v_row) = (random(&[1, 1, 1, d], &dev)?, random(&[1, 1, 1, d], &dev)?);
    for (b, h) in [(1, 65_536), (256, 256), (65_536, 1)] {
        let (q, v) = (q_row.broadcast_as((b, h, 1, d))?, v_row.broadcast_as((b, h, 1, d))?);
        let err = flash_attention_with(AttentionKernel::Own, &q, &q, &v, 0.125).unwrap_err().to_string();
        assert!(err.contains("65535 a CUDA grid holds along y"), "{b}x{h}: {err}");
    }

    let (b, h) = (5, 13_107);
    let (q, v) = (q_row.broadcast_as((b, h, 1, d))?, v_row.broadcast_as((b, h, 1, d))?);
    let before = flash_attention_launches();
    let got = flash_attention_with(AttentionKernel::Own, &q, &q, &v, 0.125)?;
    // Other tests launch at the same time: at least this one.
    assert!(flash_attention_launches() > before);
    let err = relative_error(&got, &v.to_dtype(DType::F32)?)?;
    println!("{b}x{h} (batch, head) pairs: relative error {err:.2e}");
    assert!(err < 1e-2, "{b}x{h}: relative error {err}");
    Ok(())
}

/// On Hopper, in a build with it, FlashAttention-3 is what `flash_attention` runs (unless
/// `KINETOSCOPE_ATTENTION=own`); elsewhere the project's kernel, and asking for FlashAttention-3 is refused by name.
#[test]
fn the_kernel_is_chosen_by_the_device() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let kernels = attention_kernels(&dev);
    println!("kernels on this device: {:?}; flash_attention runs {:?}", kernels, attention_kernel(&dev));
    assert_eq!(kernels.last(), Some(&AttentionKernel::Own));
    if std::env::var_os("KINETOSCOPE_ATTENTION").is_none() {
        assert_eq!(attention_kernel(&dev), kernels[0]);
    }
    if !kernels.contains(&AttentionKernel::FlashAttention3) {
        let q = random(&[1, 2, 8, 64], &dev)?;
        let err = flash_attention_with(AttentionKernel::FlashAttention3, &q, &q, &q, 0.125).unwrap_err().to_string();
        assert!(err.contains("FlashAttention-3"), "{err}");
    }
    Ok(())
}
