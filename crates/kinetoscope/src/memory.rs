//! A cap on the working memory of a request (`LoadOptions::memory_limit`, the CLI's `--memory-limit`), and
//! per-stage estimates of that memory, so that a request too large for the machine fails with
//! [`Error::OutOfMemory`] naming the stage before the stage starts, instead of being killed by the kernel
//! halfway through.
//!
//! "Working memory" is what a stage allocates beyond the loaded weights and the tensors it is given: peak
//! resident-set growth while it runs. Each estimate counts the largest tensors the code allocates at once,
//! in f32 whatever the dtype (layer norms, RoPE and softmax run in f32 anyway, so bf16 saves less than
//! half), and is then multiplied by [`MARGIN`] and given [`SLACK_BYTES`] for what the count leaves out
//! (small temporaries, allocator rounding, per-thread buffers of the matrix products).
//!
//! - **Text encoding** (umT5 on `S = max_sequence_length` tokens, an upper bound on the real count): the
//!   bucket table (`S²` u32, twice: the `Vec` and the tensor), the per-layer position bias `[heads, S, S]`
//!   (twice: embedded and cast), the token states (8 × `S·max(d_model, heads·d_kv)`), and the larger of the
//!   attention scores and the gated feed-forward (3 × `S·d_ff`). Scores are counted as two f32 copies of
//!   `[heads, block, S]`, `block` the query rows `layers::attention` processes at once (at most 2²⁴
//!   scores per head): the product and its softmax live together. An offloaded encoder
//!   (`TextEncoderPlacement::Offload`) is loaded for each request, so its weights count too.
//! - **One denoising step** (the transformer on `B` = 2 with guidance, else 1, and
//!   `L = latent_frames/pt · h/ph · w/pw` tokens): [`TOKEN_COPIES`] `[B, L, dim]` tensors (the residual
//!   stream, the embedded tokens, q, k, v, their f32 RoPE copies, the transposed keys, the attention output
//!   and the gated sum) plus the larger of the feed-forward (2 × `[B, L, ffn_dim]`: the projection and its
//!   GELU) and the scores of self- or cross-attention (two f32 copies of `[B, heads, block, L or S]`);
//!   and 8 latent-sized tensors (the guidance batch, the velocity, the scheduler's history). A Wan VACE model
//!   also keeps one `[B, L, dim]` hint per VACE block and the control tokens, and the control latents.
//! - **VAE decoding** (one latent frame at a time with a causal cache, `layers` through the decoder's
//!   levels): the cache (two past frames of every 3×3×3 convolution's padded input, at every level: it
//!   lives for the whole stream and at full resolution is the largest term), plus the widest moment of
//!   one chunk — [`CONV_COPIES`] activations of a residual block (its input, the norm's output, the padded
//!   input, the per-frame outputs, their stack and the bias sum) or the nearest-upsampled tensor of an
//!   upsampler with its padded copies and its convolution's outputs (and, in Wan 2.2's residual up blocks,
//!   the duplicated shortcut) — plus two copies of the video (the decoded chunks and their concatenation,
//!   then the pipeline's [0, 1] conversion), three where Wan 2.2 unpatchifies the chunks into pixels. The 3×3×3 convolution
//!   is `vae::causal`'s banded im2col, whose unrolled columns are capped at 2²¹ floats, so they are left to
//!   the slack; candle's conv2d (the encoder's downsampling) is tiled and copies only its input. By cuDNN
//!   (a GPU build with the `cudnn` feature) a convolution holds its input, one channels-first copy of it
//!   with the context frames, and its output twice (channels-first, then frames-major): within the
//!   residual block's count; cuDNN's workspace, capped at 256 MiB, is left to the margin.
//!   Tiled (`VaeTiling`), the cache and the widest moment are one tile's, and the video is held four times
//!   (the finished bands, their concatenation, the clipped result, the conversion) plus two rows of tiles.
//! - **VAE encoding** (edits: the clip, 4 frames a chunk after the first): the same walk through the
//!   encoder's levels, and three copies of the clip (scaled to [-1, 1], permuted, frames-major).
//!
//! `cargo bench -p kinetoscope --bench memory` measures each stage's peak resident-set growth on the tiny
//! models against these estimates; its figures are in `benches/RESULTS.md`.

use candle_core::Tensor;
use kinetoscope_models::umt5;
use kinetoscope_models::wan::{transformer, vae};

use crate::error::{Error, Result, StageContext};
use crate::request::VaeTiling;

/// Headroom over the counted tensors, for the temporaries each count leaves out.
const MARGIN: f64 = 1.25;
/// Fixed headroom: thread stacks and per-thread GEMM buffers, allocator rounding, small tensors.
const SLACK_BYTES: u64 = 16 << 20;
/// `[B, L, dim]` tensors alive at once inside a transformer block (see the module doc).
const TOKEN_COPIES: usize = 12;
/// Activations of one chunk alive at once inside a VAE residual block (see the module doc).
const CONV_COPIES: usize = 7;
/// Score elements per (batch, head) that `layers::attention` materializes at most.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;
const F32: usize = 4;

/// What each stage of a request needs beyond the weights, in bytes, as the memory limit checks it
/// ([`crate::Pipeline::working_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WorkingMemory {
    pub text_encoding: u64,
    /// One step: the transformer on the guided batch, and the scheduler's tensors.
    pub denoising_step: u64,
    pub vae_decoding: u64,
}

/// The shapes of the networks that the estimates depend on.
#[derive(Debug, Clone)]
struct Networks {
    text: umt5::Config,
    /// One transformer, or a two-expert model's two: a step needs the larger one's memory.
    transformers: Vec<transformer::Config>,
    vae: vae::Config,
}

/// The pipeline's memory check: the limit (none: every check passes) and what each stage would need.
#[derive(Debug, Clone)]
pub(crate) struct MemoryBudget {
    limit: Option<u64>,
    networks: Networks,
    vae_tiling: VaeTiling,
    /// The text encoder's weights when they are loaded for each request (offloaded), else 0: text encoding
    /// then allocates them too.
    text_weight_bytes: u64,
}

impl MemoryBudget {
    pub(crate) fn new(
        limit: Option<u64>,
        text: &umt5::Config,
        transformers: &[&transformer::Config],
        vae: &vae::Config,
        vae_tiling: VaeTiling,
        text_weight_bytes: u64,
    ) -> Self {
        let transformers = transformers.iter().map(|&cfg| cfg.clone()).collect();
        let networks = Networks { text: text.clone(), transformers, vae: vae.clone() };
        MemoryBudget { limit, networks, vae_tiling, text_weight_bytes }
    }

    /// How latents `latent` are decoded: whole (`None`) or in these tiles. `free_bytes` is what the GPU has
    /// free, `None` on the CPU (or before denoising, when what the loop frees isn't known yet).
    pub(crate) fn decode_tiling(&self, latent: LatentShape, free_bytes: Option<u64>) -> Option<vae::Tiling> {
        let vae = &self.networks.vae;
        let tiling = match self.vae_tiling {
            VaeTiling::Off => None,
            VaeTiling::On(tiling) => Some(tiling),
            VaeTiling::Auto => {
                let available = self.limit.into_iter().chain(free_bytes).min();
                let whole = vae_decoding_bytes(vae, latent, None);
                available.filter(|&bytes| whole > bytes).map(|_| vae::Tiling::default())
            }
        };
        tiling.filter(|t| t.splits(vae.spatial_compression(), latent[3], latent[4]))
    }

    /// Before a request's first stage: text encoding, one denoising step on `latents` `[1, z, T, h, w]`
    /// (a batch of two with guidance) and the VAE decoding of the result, so that a request that could not
    /// finish fails before minutes are spent on it. Names the first stage that would exceed the limit.
    pub(crate) fn check_request(&self, latents: &Tensor, max_sequence_length: usize, guidance: bool) -> Result<()> {
        let Some(limit) = self.limit else { return Ok(()) };
        let latent = latents.dims5().stage("denoising")?.into();
        let needed = self.estimate(latent, max_sequence_length, guidance);
        check(limit, "text encoding", needed.text_encoding)?;
        check(limit, "denoising", needed.denoising_step)?;
        check(limit, "VAE decoding", needed.vae_decoding)
    }

    /// What a request on latents of shape `latent` needs at each stage.
    pub(crate) fn estimate(&self, latent: LatentShape, max_sequence_length: usize, guidance: bool) -> WorkingMemory {
        let net = &self.networks;
        let batch = if guidance { 2 } else { 1 };
        WorkingMemory {
            text_encoding: text_encoding_bytes(&net.text, max_sequence_length) + self.text_weight_bytes,
            denoising_step: net
                .transformers
                .iter()
                .map(|cfg| denoising_step_bytes(cfg, latent, batch, max_sequence_length))
                .max()
                .unwrap_or(0),
            vae_decoding: vae_decoding_bytes(&net.vae, latent, self.decode_tiling(latent, None)),
        }
    }

    /// Before decoding latents of shape `latent` with `tiling`.
    pub(crate) fn check_decoding(&self, latent: LatentShape, tiling: Option<vae::Tiling>) -> Result<()> {
        let Some(limit) = self.limit else { return Ok(()) };
        check(limit, "VAE decoding", vae_decoding_bytes(&self.networks.vae, latent, tiling))
    }

    /// Before encoding frames `[F, H, W, 3]`.
    pub(crate) fn check_encoding(&self, frames: &Tensor) -> Result<()> {
        let Some(limit) = self.limit else { return Ok(()) };
        let (f, h, w, _) = frames.dims4().stage("VAE encoding")?;
        check(limit, "VAE encoding", vae_encoding_bytes(&self.networks.vae, f, h, w))
    }
}

/// Working memory assumed for a request when deciding, at load and without a memory limit, whether a
/// two-expert model's second expert may stay on the GPU beside the first.
const EXPERT_HEADROOM_BYTES: u64 = 8 << 30;

/// Whether a two-expert model keeps its second expert (`weight_bytes` on the device) beside the first, for
/// `ExpertPlacement::Auto`: on the CPU always (the weights are in host memory either way); on a GPU when the
/// memory free now holds them and, beside them, the memory limit's worth of working memory (without a limit,
/// [`EXPERT_HEADROOM_BYTES`]). Otherwise the experts swap at the boundary and only one is ever resident.
pub(crate) fn second_expert_fits(weight_bytes: u64, limit: Option<u64>, device: &candle_core::Device) -> bool {
    crate::device::gpu_memory_free(device)
        .is_none_or(|free| weight_bytes.saturating_add(limit.unwrap_or(EXPERT_HEADROOM_BYTES)) <= free)
}

fn check(limit: u64, stage: &'static str, needed_bytes: u64) -> Result<()> {
    if needed_bytes > limit {
        return Err(Error::OutOfMemory { stage, needed_bytes, limit_bytes: limit });
    }
    Ok(())
}

/// Counted bytes with the margin and the slack.
fn with_headroom(counted_bytes: usize) -> u64 {
    (counted_bytes as f64 * MARGIN) as u64 + SLACK_BYTES
}

/// Query rows `layers::attention` takes at once against `keys` keys.
fn score_rows(queries: usize, keys: usize) -> usize {
    (MAX_SCORE_ELEMENTS / keys.max(1)).clamp(1, queries.max(1))
}

/// Bytes of two f32 copies of the scores of `batch_heads` attention maps of `queries` × `keys`.
fn score_bytes(batch_heads: usize, queries: usize, keys: usize) -> usize {
    2 * F32 * batch_heads * score_rows(queries, keys) * keys
}

/// Bytes of umT5's weights at `bytes_per_weight`: the shared embedding, and per layer the attention's four
/// projections, the gated feed-forward's three, the relative position bias and two norms; the final norm.
pub(crate) fn text_encoder_weight_bytes(cfg: &umt5::Config, bytes_per_weight: usize) -> u64 {
    let inner = cfg.num_heads * cfg.d_kv;
    let layer = 4 * cfg.d_model * inner
        + 3 * cfg.d_model * cfg.d_ff
        + cfg.relative_attention_num_buckets * cfg.num_heads
        + 2 * cfg.d_model;
    ((cfg.vocab_size * cfg.d_model + cfg.num_layers * layer + cfg.d_model) * bytes_per_weight) as u64
}

fn text_encoding_bytes(cfg: &umt5::Config, tokens: usize) -> u64 {
    let s = tokens;
    let buckets = 2 * s * s * F32;
    let bias = 2 * cfg.num_heads * s * s * F32;
    let states = 8 * s * cfg.d_model.max(cfg.num_heads * cfg.d_kv) * F32;
    let feed_forward = 3 * s * cfg.d_ff * F32;
    with_headroom(buckets + bias + states + score_bytes(cfg.num_heads, s, s).max(feed_forward))
}

/// Latents `[batch, channels, frames, height, width]`.
pub(crate) type LatentShape = [usize; 5];

fn denoising_step_bytes(cfg: &transformer::Config, latent: LatentShape, batch: usize, text_tokens: usize) -> u64 {
    let [_, channels, t, h, w] = latent;
    let [pt, ph, pw] = cfg.patch_size;
    let tokens = (t / pt) * (h / ph) * (w / pw);
    let dim = cfg.inner_dim();
    let stream = TOKEN_COPIES * batch * tokens * dim * F32;
    let feed_forward = 2 * batch * tokens * cfg.ffn_dim * F32;
    let heads = batch * cfg.num_attention_heads;
    let scores = score_bytes(heads, tokens, tokens).max(score_bytes(heads, tokens, text_tokens));
    // An image-conditioned model's input carries the mask and the image's latents beside the noise.
    let latents = 8 * batch * channels.max(cfg.in_channels) * t * h * w * F32;
    let text = 2 * batch * text_tokens * dim * F32;
    // A VACE model keeps every VACE block's hint through the step, and the control tokens and latents.
    let vace = cfg
        .vace_layers
        .as_ref()
        .map_or(0, |layers| (layers.len() + 1) * batch * tokens * dim * F32 + cfg.vace_in_channels * t * h * w * F32);
    with_headroom(stream + feed_forward.max(scores) + latents + text + vace)
}

/// Elements of `frames` frames of `channels` × (`h`+2) × (`w`+2): an activation with the 3×3 convolutions'
/// padding, which the causal cache keeps and the padded copies hold.
fn padded(frames: usize, channels: usize, h: usize, w: usize) -> usize {
    frames * channels * (h + 2) * (w + 2)
}

/// Decoding latents `latent` whole (`tiling` `None`) or in tiles: one stream's cache and widest moment (a
/// tile's, when tiled), and the copies of the video. Tiled, the video is held as the finished bands, their
/// concatenation and the clipped result (one more where Wan 2.2 unpatchifies), and two rows of whole tiles
/// (the row blended against and the row being decoded).
fn vae_decoding_bytes(cfg: &vae::Config, latent: LatentShape, tiling: Option<vae::Tiling>) -> u64 {
    let [_, z_dim, t, h, w] = latent;
    let s = cfg.spatial_compression();
    let patch = cfg.patch_size.unwrap_or(1);
    let unpatchify_copy = usize::from(patch > 1);
    let video = |frames_per_latent: usize, h: usize, w: usize| {
        cfg.out_channels * ((t.max(1) - 1) * frames_per_latent + 1) * (h * s / patch) * (w * s / patch)
    };
    let counted = match tiling {
        None => {
            let (stream, frames) = decoder_stream(cfg, z_dim, h, w);
            stream + (2 + unpatchify_copy) * video(frames, h, w)
        }
        Some(tiling) => {
            let (tile_h, tile_w) = ((tiling.tile_height / s).min(h), (tiling.tile_width / s).min(w));
            let columns = w.div_ceil(tiling.stride_width / s);
            let (stream, frames) = decoder_stream(cfg, z_dim, tile_h, tile_w);
            stream + (3 + unpatchify_copy) * video(frames, h, w) + 2 * columns * video(frames, tile_h, tile_w)
        }
    };
    with_headroom(counted * F32)
}

/// Elements one stream of latents `h0 × w0` holds at its widest in the decoder (its cache and the widest
/// moment of a chunk), and the frames a latent frame after the first becomes.
fn decoder_stream(cfg: &vae::Config, z_dim: usize, h0: usize, w0: usize) -> (usize, usize) {
    let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
    let levels = cfg.dim_mult.len();
    // Widths as the decoder builds them: the deepest first, then dim_mult from the end.
    let dims: Vec<usize> = cfg.dim_mult.last().into_iter().chain(cfg.dim_mult.iter().rev()).map(|m| base * m).collect();
    let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();

    // Every cached convolution keeps two past frames of its padded input.
    let mut cache = padded(2, z_dim, h0, w0) + 4 * padded(2, dims[0], h0, w0);
    let mut widest = 0;
    let (mut frames, mut h, mut w) = (1, h0, w0);
    for level in 0..levels {
        // Each upsampler halves the channels, so the levels after the first start at half their width.
        let input = if level == 0 { dims[0] } else { dims[level] / 2 };
        let width = input.max(dims[level + 1]);
        cache += 2 * (cfg.num_res_blocks + 1) * padded(2, width, h, w);
        widest = widest.max(CONV_COPIES * padded(frames, width, h, w));
        if level + 1 < levels {
            if temporal_up[level] {
                cache += 2 * dims[level + 1] * h * w;
                frames *= 2;
            }
            (h, w) = (2 * h, 2 * w);
            // The nearest-upsampled input, its two padded copies, and the three copies of the halved output;
            // Wan 2.2's residual up blocks also hold their duplicated shortcut at the upsampled size.
            let upsampled = padded(frames, dims[level + 1], h, w);
            let shortcut = if cfg.is_residual { upsampled } else { 0 };
            widest = widest.max(3 * upsampled + 3 * upsampled / 2 + shortcut);
        }
    }
    cache += padded(2, dims[levels], h, w);
    (cache + widest, frames)
}

fn vae_encoding_bytes(cfg: &vae::Config, num_frames: usize, height: usize, width: usize) -> u64 {
    let levels = cfg.dim_mult.len();
    let dims: Vec<usize> = [1].iter().chain(&cfg.dim_mult).map(|m| cfg.base_dim * m).collect();
    let mut cache = padded(2, cfg.in_channels, height, width);
    let mut widest = 0;
    // Chunks after the first hold 4 frames; temporal downsamplings halve them.
    let (mut frames, mut h, mut w) = (4.min(num_frames), height, width);
    for level in 0..levels {
        let channels = dims[level].max(dims[level + 1]);
        cache += 2 * cfg.num_res_blocks * padded(2, channels, h, w);
        widest = widest.max(CONV_COPIES * padded(frames, channels, h, w));
        if level + 1 < levels {
            // Two padded copies, candle's channels-last copy, and the strided output twice.
            widest =
                widest.max(3 * padded(frames, dims[level + 1], h, w) + padded(frames, dims[level + 1], h / 2, w / 2));
            if cfg.temperal_downsample[level] {
                cache += dims[level + 1] * (h / 2) * (w / 2);
                frames = frames.div_ceil(2);
            }
            (h, w) = (h / 2, w / 2);
        }
    }
    cache += 5 * padded(2, dims[levels], h, w);
    let video = cfg.in_channels * num_frames * height * width;
    with_headroom((cache + widest + 3 * video) * F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wan_1_3b() -> Networks {
        let transformer = serde_json::from_str(
            r#"{"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30,
                "text_dim": 4096, "freq_dim": 256}"#,
        )
        .unwrap();
        let text =
            umt5::Config { d_model: 4096, d_kv: 64, d_ff: 10240, num_layers: 24, num_heads: 64, ..Default::default() };
        Networks { text, transformers: vec![transformer], vae: vae::Config::default() }
    }

    const MIB: f64 = (1 << 20) as f64;

    fn counted_mib(bytes: u64) -> f64 {
        (bytes - SLACK_BYTES) as f64 / MARGIN / MIB
    }

    /// umT5-XXL on 512 tokens: the 64 heads' 512×512 scores (twice), the bias (twice) and the buckets.
    #[test]
    fn umt5_xxl_weighs_what_its_checkpoint_does() {
        // google/umt5-xxl's encoder, as Wan ships it: 5.68e9 parameters (11.4 GB in bf16).
        let params = text_encoder_weight_bytes(&wan_1_3b().text, 1) as f64;
        assert!((params / 5.68e9 - 1.0).abs() < 0.01, "{params:e}");
    }

    #[test]
    fn text_encoding_counts_scores_bias_and_states() {
        let net = wan_1_3b();
        let s = 512 * 512 * 4;
        let want = (2 * s + 2 * 64 * s + 8 * 512 * 4096 * 4 + 2 * 64 * s) as f64 / MIB;
        assert!((counted_mib(text_encoding_bytes(&net.text, 512)) - want).abs() < 1e-6);
    }

    /// Wan 1.3B at 832×480, 81 frames, guidance: L = 21·30·52 = 32760 tokens, so attention takes
    /// 2²⁴ / L = 512 query rows at once and the scores stay at 2 · 4 · 24 · 512 · 32760 bytes.
    #[test]
    fn denoising_step_counts_the_stream_and_the_blocked_scores() {
        let net = wan_1_3b();
        let l: usize = 21 * 30 * 52;
        let bytes = denoising_step_bytes(&net.transformers[0], [1, 16, 21, 60, 104], 2, 512);
        let stream = 12 * 2 * l * 1536 * 4;
        let feed_forward = 2 * 2 * l * 8960 * 4;
        let scores = 2 * 4 * 24 * 512 * l;
        assert!(feed_forward > scores);
        let want = (stream + feed_forward + 8 * 2 * 16 * 21 * 60 * 104 * 4 + 2 * 2 * 512 * 1536 * 4) as f64 / MIB;
        assert!((counted_mib(bytes) - want).abs() < 1e-6, "{} vs {want}", counted_mib(bytes));
        // A short clip: every query row at once, L² scores.
        let small = denoising_step_bytes(&net.transformers[0], [1, 16, 1, 4, 4], 1, 8);
        let want = (12 * 4 * 1536 * 4 + 2 * 4 * 8960 * 4 + 8 * 16 * 16 * 4 + 2 * 8 * 1536 * 4) as f64 / MIB;
        assert!((counted_mib(small) - want).abs() < 1e-6);

        // Wan 2.1 VACE 1.3B: 15 hints and the control tokens of the batch, and the 96-channel control latents.
        let vace =
            transformer::Config { vace_layers: Some((0..30).step_by(2).collect()), ..net.transformers[0].clone() };
        let more = denoising_step_bytes(&vace, [1, 16, 21, 60, 104], 2, 512) - bytes;
        let want = (16 * 2 * l * 1536 * 4 + 96 * 21 * 60 * 104 * 4) as f64 / MIB;
        assert!(((more as f64 / MARGIN / MIB) - want).abs() < 1e-3, "{} vs {want}", more as f64 / MARGIN / MIB);
    }

    /// Tiny model a's VAE (base_dim 4, dim_mult [1, 2, 4, 4], one res block, z_dim 16, temporal [F, T, T]).
    fn tiny_vae() -> vae::Config {
        vae::Config { base_dim: 4, num_res_blocks: 1, ..Default::default() }
    }

    /// Latents [1, 16, 3, 4, 6] → 9 frames of 32×48. Decoder widths [16, 16, 16, 8, 4]; a chunk is
    /// 1, 2, 4, 4 frames at 4×6, 8×12, 16×24, 32×48. Padded frames are (h+2)·(w+2).
    #[test]
    fn vae_decoding_counts_cache_widest_chunk_and_two_videos() {
        let cache = 5 * 2 * 16 * 6 * 8 // conv_in and the mid block's four convolutions
            + 4 * 2 * 16 * 6 * 8 + 2 * 16 * 4 * 6 // level 0 res blocks, time_conv
            + 4 * 2 * 16 * 10 * 14 + 2 * 16 * 8 * 12 // level 1
            + 4 * 2 * 8 * 18 * 26 // level 2
            + 4 * 2 * 4 * 34 * 50 // level 3
            + 2 * 4 * 34 * 50; // conv_out
                               // Level 2's upsampler: 4 frames of 8 channels at 32×48, upsampled, padded twice, and halved thrice.
        let upsampled = 4 * 8 * 34 * 50;
        let widest = 3 * upsampled + 3 * upsampled / 2;
        let videos = 2 * 3 * 9 * 32 * 48;
        let want = with_headroom((cache + widest + videos) * 4);
        assert_eq!(vae_decoding_bytes(&tiny_vae(), [1, 16, 3, 4, 6], None), want);
    }

    /// 9 frames of 32×48. Encoder widths [4, 4, 8, 16, 16]; a chunk is 4, 4, 2, 1 frames at 32×48, 16×24,
    /// 8×12, 4×6.
    #[test]
    fn vae_encoding_counts_cache_widest_chunk_and_three_clips() {
        let cache = 2 * 3 * 34 * 50 // conv_in
            + 2 * 2 * 4 * 34 * 50 // level 0 res block
            + 2 * 2 * 8 * 18 * 26 + 8 * 8 * 12 // level 1, time_conv's last frame
            + 2 * 2 * 16 * 10 * 14 + 16 * 4 * 6 // level 2
            + 2 * 2 * 16 * 6 * 8 // level 3
            + 5 * 2 * 16 * 6 * 8; // the mid block's four convolutions and conv_out
                                  // Level 0's residual block: seven copies of 4 frames of 4 channels at 32×48.
        let widest = 7 * 4 * 4 * 34 * 50;
        let clips = 3 * 3 * 9 * 32 * 48;
        let want = with_headroom((cache + widest + clips) * 4);
        assert_eq!(vae_encoding_bytes(&tiny_vae(), 9, 32, 48), want);
        assert!(vae_encoding_bytes(&tiny_vae(), 1, 32, 48) < want);
    }

    /// 1280×720, 81 frames (latents [1, 16, 21, 90, 160]) with Wan 2.1's VAE: whole, the decode needs more
    /// than a 24 GB card has (27 GiB, most of it the causal cache at full resolution); in diffusers' default
    /// tiles it needs 6 GiB, beside the 1.3B model's weights (2.8 GB in bf16).
    #[test]
    fn a_720p_decode_fits_24_gb_only_in_tiles() {
        let vae = wan_1_3b().vae;
        let latent = [1, 16, 21, 90, 160];
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        let whole = gib(vae_decoding_bytes(&vae, latent, None));
        let tiled = gib(vae_decoding_bytes(&vae, latent, Some(vae::Tiling::default())));
        println!("720p×81 VAE decoding: whole {whole:.1} GiB, tiled {tiled:.1} GiB");
        assert!(whole > 24.0 && tiled < 8.0, "whole {whole:.1} GiB, tiled {tiled:.1} GiB");
    }
}
