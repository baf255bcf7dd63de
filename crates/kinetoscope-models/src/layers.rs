//! Building blocks shared by every model: one attention, so that a faster kernel replaces it in one place.

use candle_core::{Result, Tensor};

/// Queries are processed in blocks so that the score matrix never holds more than this many elements
/// per (batch, head): attention over a long video sequence must not materialize L×L at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Scaled dot-product attention, `softmax(q·kᵀ·scale + bias)·v`, over `[batch, heads, len, head_dim]`.
///
/// `bias`, when given, is added to the scores and must broadcast to `[batch, heads, q_len, k_len]`
/// (umT5's relative position bias). The softmax runs in f32 whatever the input dtype, as PyTorch's
/// SDPA accumulates it.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    // On the GPU in bf16 (the Wan transformer's attentions, which have no bias): the project's flash attention,
    // which never materializes the scores.
    #[cfg(feature = "cuda")]
    if bias.is_none() && kinetoscope_kernels::kernels_enabled() && kinetoscope_kernels::flash_attention_supports(q) {
        return kinetoscope_kernels::flash_attention(q, k, v, scale);
    }
    let block = MAX_SCORE_ELEMENTS / k.dim(2)?.max(1);
    attention_in_blocks(q, k, v, bias, scale, block)
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    block: usize,
) -> Result<Tensor> {
    let q_len = q.dim(2)?;
    let block = block.clamp(1, q_len.max(1));
    let k_t = k.transpose(2, 3)?.contiguous()?;
    let v = v.contiguous()?;
    let mut outs = Vec::with_capacity(q_len.div_ceil(block));
    for start in (0..q_len).step_by(block) {
        let len = block.min(q_len - start);
        let q_blk = q.narrow(2, start, len)?.contiguous()?;
        let mut scores = (q_blk.matmul(&k_t)? * scale)?.to_dtype(candle_core::DType::F32)?;
        if let Some(bias) = bias {
            let bias = if bias.dim(2)? == 1 { bias.clone() } else { bias.narrow(2, start, len)? };
            scores = scores.broadcast_add(&bias.to_dtype(candle_core::DType::F32)?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outs.push(probs.matmul(&v)?);
    }
    Tensor::cat(&outs, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The blocked computation must equal the one-shot softmax(q·kᵀ)·v.
    #[test]
    fn blocked_attention_matches_direct() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, (1, 3, 37, 29), &dev)?;
        let scale = 1.0 / 8f64.sqrt();
        let direct = {
            let s = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)?
        };
        let got = attention_in_blocks(&q, &k, &v, Some(&bias), scale, 5)?;
        let err = (got - &direct)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }
}
