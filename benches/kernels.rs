//! The project's CUDA kernels (and FlashAttention-3, where the device and build have it) against the plain candle
//! path they replace, and cuDNN's 3D convolution (in a build with `cudnn`), on the GPU, at Wan 2.1's sizes:
//! time per call (median of 10 after 3 warm-ups, the device synchronized before each clock read) and the
//! achieved TFLOP/s (attention) or GB/s of memory traffic, each byte read or written counted once (the
//! normalizations and the activation, which are bound by memory). Needs a CUDA build and device:
//!
//! ```sh
//! cargo bench -p kinetoscope-kernels --features cuda --bench kernels
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

const RUNS: usize = 10;

fn median_seconds(dev: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

/// The plain path: scores in blocks of query rows, f32 softmax (as `layers::attention` on the CPU).
fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let block = ((1usize << 24) / k.dim(2)?).max(1);
    let k_t = k.transpose(2, 3)?.contiguous()?;
    let mut outs = Vec::new();
    for start in (0..q.dim(2)?).step_by(block) {
        let len = block.min(q.dim(2)? - start);
        let scores = (q.narrow(2, start, len)?.contiguous()?.matmul(&k_t)? * scale)?.to_dtype(DType::F32)?;
        outs.push(candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?.matmul(v)?);
    }
    Tensor::cat(&outs, 2)
}

fn main() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    println!("| attention (batch × heads × q_len × k_len × d) | kernel | ms | TFLOP/s | plain ms | TFLOP/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    // Wan 2.1 1.3B at 832×480×81 with guidance: self-attention over 32,760 tokens, cross-attention to 512.
    for (b, h, lq, lk, d) in [(2, 12, 32760, 32760, 128), (2, 12, 32760, 512, 128), (2, 24, 8190, 8190, 64)] {
        let random = |len: usize| Tensor::randn(0f32, 1.0, (b, h, len, d), &dev)?.to_dtype(DType::BF16);
        let (q, k, v) = (random(lq)?, random(lk)?, random(lk)?);
        let scale = 1.0 / (d as f64).sqrt();
        let flops = 4.0 * (b * h * lq * lk * d) as f64;
        let plain = median_seconds(&dev, || plain_attention(&q, &k, &v, scale))?;
        // Every kernel this device runs: FlashAttention-3 on Hopper (in a build with it), the project's own.
        for kernel in kinetoscope_kernels::attention_kernels(&dev) {
            let seconds =
                median_seconds(&dev, || kinetoscope_kernels::flash_attention_with(kernel, &q, &k, &v, scale))?;
            println!(
                "| {b} × {h} × {lq} × {lk} × {d} | {} | {:.2} | {:.0} | {:.2} | {:.0} |",
                kernel.name(),
                seconds * 1e3,
                flops / seconds / 1e12,
                plain * 1e3,
                flops / plain / 1e12
            );
        }
    }
    memory_bound(&dev)?;
    #[cfg(feature = "cudnn")]
    convolutions(&dev)?;
    Ok(())
}

/// cuDNN's 3×3×3 convolutions as the Wan 2.1 VAE decodes 832×480: a chunk of 4 frames after 2 of causal context,
/// at each level's width and size, f32 with TF32 allowed (as a half-precision pipeline decodes). TFLOP/s counts 2
/// per multiply-add of the convolution itself.
#[cfg(feature = "cudnn")]
fn convolutions(dev: &Device) -> Result<()> {
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    println!();
    println!("| conv3d 3×3×3 (channels, frames in, h × w) | cuDNN ms | TFLOP/s |");
    println!("| --- | --- | --- |");
    for (channels, h, w) in [(384, 60, 104), (384, 120, 208), (192, 240, 416), (96, 480, 832)] {
        let x = Tensor::randn(0f32, 1.0, (1, channels, 6, h, w), dev)?;
        let kernel = Tensor::randn(0f32, 0.02, (channels, channels, 3, 3, 3), dev)?;
        let seconds = median_seconds(dev, || kinetoscope_kernels::cudnn_conv3d(&x, &kernel, [0, 1, 1], [1; 3]))?;
        let flops = 2.0 * (channels * channels * 27 * 4 * h * w) as f64;
        println!("| {channels}, 6, {h} × {w} | {:.2} | {:.0} |", seconds * 1e3, flops / seconds / 1e12);
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    Ok(())
}

/// One way of computing a case's output.
type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;

/// The fused normalizations and the feed-forward's activation at Wan 1.3B's widths, 832×480×81 with guidance
/// (2 × 32,760 tokens), against the plain ops: GB/s counts the kernel's own traffic (bf16 in and out, the f32
/// tables), for both.
fn memory_bound(dev: &Device) -> Result<()> {
    let (b, l, heads, d, ffn) = (2, 32760, 12, 128, 8960);
    let dim = heads * d;
    let bf16 = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16);
    let x = bf16(&[b, l, dim])?;
    let weight = bf16(&[dim])?;
    let angles = Tensor::rand(0f32, 6.3, (l, d / 2), dev)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let cos_sin = Tensor::cat(&[&cos, &sin], 1)?;
    let shift = Tensor::randn(0f32, 1.0, (b, 1, dim), dev)?;
    let scale = Tensor::randn(0f32, 1.0, (b, 1, dim), dev)?;
    let hidden = bf16(&[b, l, ffn])?;
    let bias = bf16(&[ffn])?;
    let tokens = (b * l * dim * 2) as f64;
    let y = bf16(&[b, l, dim])?;
    let cases: [(&str, f64, Op, Op); 4] = [
        (
            "q/k RMSNorm + RoPE",
            2.0 * tokens + (l * d * 4) as f64,
            Box::new(|| kinetoscope_kernels::rms_norm_rope(&x, &weight, &cos_sin, d, 1e-6)),
            Box::new(|| {
                let normed = candle_nn::ops::rms_norm(&x, &weight, 1e-6)?;
                let heads = normed.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?;
                candle_nn::rotary_emb::rope_i(&heads, &cos.to_dtype(DType::BF16)?, &sin.to_dtype(DType::BF16)?)
            }),
        ),
        (
            "LayerNorm + adaLN",
            2.0 * tokens,
            Box::new(|| kinetoscope_kernels::ada_layer_norm(&x, &shift, &scale, 1e-6)),
            Box::new(|| {
                let normed = candle_nn::ops::layer_norm(
                    &x.to_dtype(DType::F32)?,
                    &Tensor::ones(dim, DType::F32, dev)?,
                    &Tensor::zeros(dim, DType::F32, dev)?,
                    1e-6,
                )?;
                normed.broadcast_mul(&(&scale + 1.0)?)?.broadcast_add(&shift)?.to_dtype(DType::BF16)
            }),
        ),
        (
            "gated residual add",
            1.5 * tokens,
            Box::new(|| kinetoscope_kernels::gated_residual(&x, &y, &scale)),
            Box::new(|| {
                (x.to_dtype(DType::F32)? + y.to_dtype(DType::F32)?.broadcast_mul(&scale)?)?.to_dtype(DType::BF16)
            }),
        ),
        (
            "bias + GELU (tanh)",
            (2 * b * l * ffn * 2) as f64,
            Box::new(|| kinetoscope_kernels::bias_gelu(&hidden, &bias)),
            Box::new(|| hidden.broadcast_add(&bias)?.gelu()),
        ),
    ];
    println!();
    println!("| op at [{b}, {l}, {dim}] (FFN [{b}, {l}, {ffn}]) | kernel ms | GB/s | plain ms | GB/s |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, bytes, kernel, plain) in cases {
        let kernel = median_seconds(dev, kernel)?;
        let plain = median_seconds(dev, plain)?;
        println!(
            "| {name} | {:.3} | {:.0} | {:.3} | {:.0} |",
            kernel * 1e3,
            bytes / kernel / 1e9,
            plain * 1e3,
            bytes / plain / 1e9
        );
    }
    Ok(())
}
