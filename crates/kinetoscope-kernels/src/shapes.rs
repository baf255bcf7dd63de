//! What a kernel launch can take, as plain arithmetic on the shapes: the grid each op launches, and the shapes
//! refused before anything is launched (CUDA refuses a grid of no blocks, and has a largest one; the kernels index
//! with `int`s and divide by the width). Compiled with the `cuda` feature, which launches, and in tests, which check
//! it on the CPU without a GPU.

use candle_core::{bail, Result};

/// The most blocks a grid holds along y (CUDA's `maxGridSize[1]`, the same on every architecture).
pub(crate) const MAX_GRID_Y: usize = 65_535;
/// The most blocks a grid holds along x (`maxGridSize[0]`, 2³¹ − 1 from compute capability 3.0); also the largest
/// length or width the kernels' `int` arguments hold.
pub(crate) const MAX_GRID_X: usize = i32::MAX as usize;

/// The fused normalizations' grid over `[batch, len, dim]`: one block per row, `batch · len` of them along x.
/// Refused: no row (a grid of no blocks), a width of 0 (the kernels divide by it), and more rows, or a wider row,
/// than the grid and the kernels' `int` arguments hold.
pub(crate) fn norm_rows(op: &str, batch: usize, len: usize, dim: usize) -> Result<u32> {
    let rows = batch.saturating_mul(len);
    if rows == 0 || dim == 0 {
        bail!("{op}: x [{batch}, {len}, {dim}] is empty: the fused norms need at least one row, of width 1 or more");
    }
    if rows > MAX_GRID_X || dim > MAX_GRID_X {
        bail!(
            "{op}: x [{batch}, {len}, {dim}]: the fused norms take at most {MAX_GRID_X} rows (one block each, along \
             the grid's x) and a width of at most as much"
        );
    }
    Ok(rows as u32)
}

/// `rms_norm_rope`'s heads: `head_dim` channels each, rotated in pairs `(2i, 2i + 1)`, so `head_dim` must be even
/// (a pair never straddles two heads) and a whole number of heads must make the width `dim`.
pub(crate) fn rope_heads(dim: usize, head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !dim.is_multiple_of(head_dim) {
        bail!(
            "rms_norm_rope: head dim {head_dim} must be even (the rotary embedding turns pairs of channels) and \
             divide the width {dim} into whole heads"
        );
    }
    Ok(())
}

/// Any attention kernel needs a query and a key in some batch item and head: a launch over nothing is a CUDA error.
pub(crate) fn something_to_attend(batch: usize, heads: usize, q_len: usize, k_len: usize) -> Result<()> {
    if batch == 0 || heads == 0 || q_len == 0 || k_len == 0 {
        bail!(
            "flash attention: batch {batch}, heads {heads}, {q_len} queries and {k_len} keys: it needs at least one \
             query and one key, in at least one batch item and head"
        );
    }
    Ok(())
}

/// Whether FlashAttention-3 reads a `[batch, len, heads, d]` tensor of these strides in place: through TMA
/// descriptors, which need the head dim contiguous and every other stride a nonzero multiple of 16 bytes (8 bf16),
/// passed as 32-bit numbers. Anything else (a broadcast's stride 0, a misaligned view) is copied first.
#[cfg_attr(not(feature = "flash-attn-v3"), allow(dead_code))]
pub(crate) fn tma_reads_in_place(strides: &[usize]) -> bool {
    let Some((&1, outer)) = strides.split_last() else { return false };
    outer.iter().all(|&s| s > 0 && s.is_multiple_of(8) && s <= u32::MAX as usize)
}

/// FlashAttention-3 takes its strides as 32-bit numbers: a sequence whose contiguous batch stride (`len · heads ·
/// d` elements) is past them is refused.
#[cfg_attr(not(feature = "flash-attn-v3"), allow(dead_code))]
pub(crate) fn flash_attention_3_fits(len: usize, heads: usize, d: usize) -> Result<()> {
    let batch_stride = len.saturating_mul(heads).saturating_mul(d);
    if batch_stride > u32::MAX as usize {
        bail!("FlashAttention-3: {len} tokens × {heads} heads × {d} = {batch_stride} elements per batch item: more than its 32-bit strides reach");
    }
    Ok(())
}

/// Flash attention's grid along y: one row of blocks per (batch, head) pair, `batch · heads` of them. Refused:
/// nothing to compute (no batch item, head, query or key: a grid of no blocks), more pairs than a grid holds along
/// y (65,535), and lengths past the kernel's `int` arguments.
pub(crate) fn flash_attention_grid_y(batch: usize, heads: usize, q_len: usize, k_len: usize) -> Result<u32> {
    something_to_attend(batch, heads, q_len, k_len)?;
    let pairs = batch.saturating_mul(heads);
    if pairs > MAX_GRID_Y {
        bail!(
            "flash attention: batch {batch} × heads {heads} = {pairs} (batch, head) pairs, one row of blocks each: \
             more than the {MAX_GRID_Y} a CUDA grid holds along y; split the batch"
        );
    }
    if q_len > MAX_GRID_X || k_len > MAX_GRID_X {
        bail!("flash attention: {q_len} queries and {k_len} keys: at most {MAX_GRID_X} each");
    }
    Ok(pairs as u32)
}

/// A 3D convolution's output `[batch, out, d, h, w]` for an input `[batch, in, d, h, w]` and a kernel `[out, in,
/// kd, kh, kw]`, zero-padded by `padding` on both sides of each of d, h and w, moved by `stride` along them.
/// Refused, before cuDNN is asked: channels that disagree, a stride of 0, a kernel larger than the padded input,
/// nothing to compute, and a tensor of more elements than cuDNN's `int` dimensions and strides address.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn conv3d_output(
    input: [usize; 5],
    kernel: [usize; 5],
    padding: [usize; 3],
    stride: [usize; 3],
) -> Result<[usize; 5]> {
    let [batch, channels, ..] = input;
    let [out, kernel_channels, ..] = kernel;
    let what = || format!("conv3d: input {input:?}, kernel {kernel:?}, padding {padding:?}, stride {stride:?}");
    if kernel_channels != channels {
        bail!("{}: the kernel takes {kernel_channels} channels, the input has {channels}", what());
    }
    if stride.contains(&0) {
        bail!("{}: every stride must be 1 or more", what());
    }
    let mut dims = [batch, out, 0, 0, 0];
    for i in 0..3 {
        let padded = input[2 + i] + 2 * padding[i];
        let Some(span) = padded.checked_sub(kernel[2 + i]) else {
            bail!("{}: the kernel is larger than the padded input along dim {}", what(), 2 + i)
        };
        dims[2 + i] = span / stride[i] + 1;
    }
    if input.contains(&0) || kernel.contains(&0) {
        bail!("{}: nothing to convolve (a dimension is 0)", what());
    }
    for (name, shape) in [("input", input), ("kernel", kernel), ("output", dims)] {
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements.is_none_or(|n| n > MAX_GRID_X) {
            bail!("{}: the {name} {shape:?} has more than the {MAX_GRID_X} elements cuDNN addresses", what());
        }
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal<T: std::fmt::Debug>(result: Result<T>) -> String {
        result.expect_err("refused").to_string()
    }

    #[test]
    fn norm_rows_are_batch_times_len() {
        assert_eq!(norm_rows("op", 2, 300, 1536).unwrap(), 600);
        assert_eq!(norm_rows("op", 1, 1, 1).unwrap(), 1);
        assert_eq!(norm_rows("op", 1, MAX_GRID_X, 2).unwrap(), i32::MAX as u32);
    }

    #[test]
    fn no_row_and_no_width_are_refused() {
        for (batch, len, dim) in [(0, 4, 64), (1, 0, 64), (0, 0, 64), (1, 4, 0), (0, 0, 0)] {
            let err = refusal(norm_rows("gated_residual", batch, len, dim));
            assert!(err.contains("gated_residual") && err.contains("at least one row"), "{err}");
        }
    }

    #[test]
    fn rows_past_the_grid_are_refused() {
        for (batch, len, dim) in [(1, MAX_GRID_X + 1, 64), (2, 1 << 30, 64), (usize::MAX, 2, 64), (1, 4, 1 << 31)] {
            let err = refusal(norm_rows("ada_layer_norm", batch, len, dim));
            assert!(err.contains("at most 2147483647"), "{err}");
        }
    }

    #[test]
    fn rope_heads_must_be_even_and_whole() {
        for (dim, head_dim) in [(1536, 128), (64, 2), (128, 64), (96, 96)] {
            assert!(rope_heads(dim, head_dim).is_ok(), "{dim} / {head_dim}");
        }
        // 0 (which the width would be divided by), odd (a pair straddling two heads), not dividing the width.
        for (dim, head_dim) in [(64, 0), (66, 33), (96, 3), (64, 48), (64, 128), (0, 0)] {
            let err = refusal(rope_heads(dim, head_dim));
            assert!(err.contains("must be even") && err.contains(&format!("width {dim}")), "{err}");
        }
    }

    #[test]
    fn flash_attention_takes_one_row_of_blocks_per_batch_and_head() {
        assert_eq!(flash_attention_grid_y(2, 12, 32_760, 512).unwrap(), 24);
        assert_eq!(flash_attention_grid_y(1, MAX_GRID_Y, 1, 1).unwrap(), 65_535);
        assert_eq!(flash_attention_grid_y(5, 13_107, 1, 1).unwrap(), 65_535);
    }

    #[test]
    fn tma_reads_aligned_strides_in_place_and_copies_the_rest() {
        // Tokens-major Wan 1.3B at 832×480×81 seen as [batch, len, heads, d], and its [batch, heads, len, d].
        assert!(tma_reads_in_place(&[32_760 * 12 * 128, 12 * 128, 128, 1]));
        assert!(tma_reads_in_place(&[12 * 32_760 * 128, 128, 32_760 * 128, 1]));
        // Broadcast (stride 0), misaligned rows, a head dim not contiguous, 32-bit overflow.
        for strides in [[0, 128, 128, 1], [1000 * 136, 136, 1, 1], [70 * 65, 65, 130, 1], [64, 128, 1, 2]] {
            assert!(!tma_reads_in_place(&strides), "{strides:?}");
        }
        assert!(!tma_reads_in_place(&[1 << 33, 128, 128, 1]));
        assert!(flash_attention_3_fits(75_600, 40, 128).is_ok());
        assert!(refusal(flash_attention_3_fits(1 << 20, 40, 128)).contains("32-bit"));
    }

    #[test]
    fn nothing_to_attend_is_refused() {
        for (batch, heads, q_len, k_len) in [(0, 2, 8, 8), (1, 0, 8, 8), (1, 2, 0, 8), (1, 2, 8, 0)] {
            let err = refusal(flash_attention_grid_y(batch, heads, q_len, k_len));
            assert!(err.contains("at least one query and one key"), "{err}");
        }
    }

    #[test]
    fn more_batch_heads_than_grid_y_holds_are_refused() {
        for (batch, heads) in [(1, 65_536), (256, 256), (65_536, 1), (usize::MAX, 2)] {
            let err = refusal(flash_attention_grid_y(batch, heads, 64, 64));
            assert!(err.contains("65535 a CUDA grid holds along y"), "{err}");
        }
    }

    #[test]
    fn lengths_past_the_kernel_ints_are_refused() {
        for (q_len, k_len) in [(MAX_GRID_X + 1, 64), (64, MAX_GRID_X + 1)] {
            let err = refusal(flash_attention_grid_y(1, 1, q_len, k_len));
            assert!(err.contains("at most 2147483647"), "{err}");
        }
    }

    #[test]
    fn conv3d_output_follows_padding_and_stride() {
        // The Wan VAE's 3×3×3 layer after the causal frames are prepended: time unpadded, space padded by 1.
        assert_eq!(
            conv3d_output([1, 96, 6, 480, 832], [96, 96, 3, 3, 3], [0, 1, 1], [1; 3]).unwrap(),
            [1, 96, 4, 480, 832]
        );
        // The time downsampling: 3 taps, stride 2, no padding.
        assert_eq!(conv3d_output([2, 8, 7, 5, 5], [8, 8, 3, 1, 1], [0; 3], [2, 1, 1]).unwrap(), [2, 8, 3, 5, 5]);
        assert_eq!(conv3d_output([1, 4, 1, 1, 1], [5, 4, 1, 1, 1], [0; 3], [1; 3]).unwrap(), [1, 5, 1, 1, 1]);
    }

    #[test]
    fn conv3d_shapes_cudnn_cannot_take_are_refused() {
        let cases = [
            ([1, 4, 3, 8, 8], [5, 3, 3, 3, 3], [0, 1, 1], [1; 3], "the kernel takes 3 channels, the input has 4"),
            ([1, 4, 3, 8, 8], [5, 4, 3, 3, 3], [0, 1, 1], [1, 0, 1], "every stride must be 1 or more"),
            ([1, 4, 2, 8, 8], [5, 4, 3, 3, 3], [0, 1, 1], [1; 3], "larger than the padded input along dim 2"),
            ([0, 4, 3, 8, 8], [5, 4, 3, 3, 3], [0, 1, 1], [1; 3], "nothing to convolve"),
            ([1, 4, 3, 8, 8], [0, 4, 3, 3, 3], [0, 1, 1], [1; 3], "nothing to convolve"),
            (
                [1, 96, 100, 1080, 1920],
                [96, 96, 3, 3, 3],
                [0, 1, 1],
                [1; 3],
                "the input [1, 96, 100, 1080, 1920] has more",
            ),
            ([usize::MAX, 2, 3, 3, 3], [1, 2, 3, 3, 3], [0; 3], [1; 3], "has more than the 2147483647 elements"),
        ];
        for (input, kernel, padding, stride, expected) in cases {
            let err = refusal(conv3d_output(input, kernel, padding, stride));
            assert!(err.starts_with("conv3d: input") && err.contains(expected), "{err}");
        }
    }
}
