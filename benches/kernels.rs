//! The project's CUDA kernels against the plain candle path they replace, on the GPU, at Wan 2.1's sizes:
//! time per call (median of 10 after 3 warm-ups, the device synchronized before each clock read) and the
//! achieved TFLOP/s. Needs a CUDA build and device:
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
    println!("| attention (batch × heads × q_len × k_len × d) | kernel ms | TFLOP/s | plain ms | TFLOP/s |");
    println!("| --- | --- | --- | --- | --- |");
    // Wan 2.1 1.3B at 832×480×81 with guidance: self-attention over 32,760 tokens, cross-attention to 512.
    for (b, h, lq, lk, d) in [(2, 12, 32760, 32760, 128), (2, 12, 32760, 512, 128), (2, 24, 8190, 8190, 64)] {
        let random = |len: usize| Tensor::randn(0f32, 1.0, (b, h, len, d), &dev)?.to_dtype(DType::BF16);
        let (q, k, v) = (random(lq)?, random(lk)?, random(lk)?);
        let scale = 1.0 / (d as f64).sqrt();
        let flops = 4.0 * (b * h * lq * lk * d) as f64;
        let kernel = median_seconds(&dev, || kinetoscope_kernels::flash_attention(&q, &k, &v, scale))?;
        let plain = median_seconds(&dev, || plain_attention(&q, &k, &v, scale))?;
        println!(
            "| {b} × {h} × {lq} × {lk} × {d} | {:.2} | {:.0} | {:.2} | {:.0} |",
            kernel * 1e3,
            flops / kernel / 1e12,
            plain * 1e3,
            flops / plain / 1e12
        );
    }
    Ok(())
}
