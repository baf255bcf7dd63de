//! The Wan causal 3D VAE: video ↔ latents, 8× smaller in height and width and 4× in time (Wan
//! 2.1), or 16× in space (Wan 2.2: 2×2 pixels patchified into channels first, residual down and
//! up blocks with parameter-free shortcuts, a wider decoder).
//!
//! Wan (<https://arxiv.org/abs/2503.20314>, "Wan-VAE") compresses `1 + 4k` frames into `1 + k`
//! latent frames with convolutions that are causal in time, so that the first frame is encoded
//! alone (an image) and a long video can be processed in chunks with a small memory of the frames
//! before each chunk. Reference: diffusers' `AutoencoderKLWan`
//! (<https://github.com/huggingface/diffusers/blob/v0.35.2/src/diffusers/models/autoencoders/autoencoder_kl_wan.py>),
//! whose chunking this reproduces: the encoder takes frame 0, then 4 frames at a time; the decoder
//! one latent frame at a time.
//!
//! Inside, tensors are frames-major (`[batch, frames, channels, height, width]`); the public
//! methods take and return diffusers' `[batch, channels, frames, height, width]`.

mod blocks;
mod causal;
mod decoder;
mod encoder;
pub mod single_file;
mod tiling;

use candle_core::{bail, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use causal::CausalConv3d;
pub use causal::{convolution_kernel, CausalCache};
use decoder::Decoder;
use encoder::Encoder;
pub use tiling::Tiling;

/// Frames per encoder chunk after the first frame: diffusers' `_encode` steps by 4 whatever the
/// config says.
const ENCODE_CHUNK: usize = 4;

/// The VAE's `config.json`, with diffusers' defaults for absent fields (the Wan 2.2 ones included).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Config {
    pub base_dim: usize,
    /// The decoder's base width when it differs from the encoder's.
    pub decoder_base_dim: Option<usize>,
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Resolutions (1, 1/2, 1/4, …) where the encoder would add attention: always empty, since
    /// neither diffusers nor the original Wan code can run the encoder otherwise.
    pub attn_scales: Vec<f64>,
    /// Which of the encoder's downsamplings also halve the frame rate (sic: diffusers' spelling).
    pub temperal_downsample: Vec<bool>,
    pub dropout: f64,
    /// Per-channel statistics of the latents: the pipeline decodes `latents · std + mean`.
    pub latents_mean: Vec<f64>,
    pub latents_std: Vec<f64>,
    /// Wan 2.2: residual down/up blocks with averaging / duplicating shortcuts.
    pub is_residual: bool,
    /// Channels the encoder takes and the decoder gives: after patchifying, so 3·patch².
    pub in_channels: usize,
    pub out_channels: usize,
    /// Wan 2.2: each `patch × patch` square of pixels becomes channels before the encoder, and back
    /// after the decoder.
    pub patch_size: Option<usize>,
    pub scale_factor_temporal: usize,
    pub scale_factor_spatial: usize,
    /// Whether decoded frames are clamped to [-1, 1] (diffusers 0.35 always clamps).
    pub clip_output: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            latents_mean: vec![
                -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632,
                -0.1922, -0.9497, 0.2503, -0.2921,
            ],
            latents_std: vec![
                2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
                1.1253, 2.8251, 1.9160,
            ],
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: 4,
            scale_factor_spatial: 8,
            clip_output: true,
        }
    }
}

impl Config {
    /// Pixels per latent cell along height and width: one halving per downsampling, times the patch.
    pub fn spatial_compression(&self) -> usize {
        (1 << self.dim_mult.len().saturating_sub(1)) * self.patch()
    }

    fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1)
    }
}

/// Frames-major `[B, T, C, H, W]` → `[B, T, C·p², H/p, W/p]`, channel `c·p² + i_w·p + i_h` for the
/// pixel at `(i_h, i_w)` of its square, as diffusers' `patchify` orders them (width first).
fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, t, c, h, w) = x.dims5()?;
    x.reshape(vec![b, t, c, h / p, p, w / p, p])?.permute(vec![0, 1, 2, 6, 4, 3, 5])?.reshape((
        b,
        t,
        c * p * p,
        h / p,
        w / p,
    ))
}

/// The inverse of [`patchify`].
fn unpatchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, t, cp, h, w) = x.dims5()?;
    let c = cp / (p * p);
    x.reshape(vec![b, t, c, p, p, h, w])?.permute(vec![0, 1, 2, 5, 4, 6, 3])?.reshape((b, t, c, h * p, w * p))
}

/// diffusers' `[B, C, T, H, W]` ↔ frames-major `[B, T, C, H, W]` (the swap is its own inverse).
fn swap_channels_frames(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 1, 3, 4))
}

/// The Wan VAE: `encode` gives the Gaussian posterior's mean and log-variance, `decode` the video.
#[derive(Debug, Clone)]
pub struct AutoencoderKLWan {
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
    z_dim: usize,
    /// Channels of the video itself, before patchifying.
    video_channels: usize,
    patch: usize,
    /// How much smaller latents are than pixels in height and width.
    spatial_compression: usize,
    clip_output: bool,
}

impl AutoencoderKLWan {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let patch = cfg.patch();
        if patch == 0
            || !cfg.in_channels.is_multiple_of(patch * patch)
            || !cfg.out_channels.is_multiple_of(patch * patch)
        {
            bail!(
                "Wan VAE config: `in_channels` {} and `out_channels` {} must be multiples of `patch_size`² ({patch}²)",
                cfg.in_channels,
                cfg.out_channels
            )
        }
        if cfg.scale_factor_spatial != cfg.spatial_compression() {
            bail!(
                "Wan VAE config: `scale_factor_spatial` {} disagrees with the network, which compresses {}× \
                 (`dim_mult` {:?}, `patch_size` {patch})",
                cfg.scale_factor_spatial,
                cfg.spatial_compression(),
                cfg.dim_mult
            )
        }
        if !cfg.attn_scales.is_empty() {
            bail!(
                "Wan VAE config: `attn_scales` {:?}: attention in the encoder's down blocks is not \
                 supported (diffusers fails on it too)",
                cfg.attn_scales
            )
        }
        if cfg.temperal_downsample.len() + 1 != cfg.dim_mult.len() {
            bail!(
                "Wan VAE config: `temperal_downsample` {:?} needs one entry per downsampling, {} \
                 for `dim_mult` {:?}",
                cfg.temperal_downsample,
                cfg.dim_mult.len().saturating_sub(1),
                cfg.dim_mult
            )
        }
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv: CausalConv3d::cube(2 * cfg.z_dim, 2 * cfg.z_dim, 1, vb.pp("quant_conv"))?,
            post_quant_conv: CausalConv3d::cube(cfg.z_dim, cfg.z_dim, 1, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            z_dim: cfg.z_dim,
            video_channels: cfg.in_channels / (patch * patch),
            patch,
            spatial_compression: cfg.spatial_compression(),
            clip_output: cfg.clip_output,
        })
    }

    /// Encodes a video `[B, C, 1 + 4k, H, W]` (values in [-1, 1], H and W multiples of the spatial
    /// compression s) into the posterior's `(mean, logvar)`, each `[B, z_dim, 1 + k, H/s, W/s]`;
    /// the log-variance is clamped to [-30, 20].
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, f, h, w) = x.dims5()?;
        let s = self.spatial_compression;
        if c != self.video_channels {
            bail!("Wan VAE encode: expected {} channels in [B, C, F, H, W], got {:?}", self.video_channels, x.dims())
        }
        if f % ENCODE_CHUNK != 1 {
            bail!("Wan VAE encode: the frame count must be 4k+1, got {f} in [B, C, F, H, W] = {:?}", x.dims())
        }
        if h % s != 0 || w % s != 0 {
            bail!("Wan VAE encode: height and width must be multiples of {s}, got [B, C, F, H, W] = {:?}", x.dims())
        }
        let x = patchify(&swap_channels_frames(x)?.contiguous()?, self.patch)?;
        let mut cache = CausalCache::new();
        let mut chunks = vec![self.encoder.forward(&x.narrow(1, 0, 1)?, &mut cache)?];
        for start in (1..f).step_by(ENCODE_CHUNK) {
            chunks.push(self.encoder.forward(&x.narrow(1, start, ENCODE_CHUNK)?, &mut cache)?);
        }
        let moments = swap_channels_frames(&self.quant_conv.forward(&Tensor::cat(&chunks, 1)?)?)?;
        let mean = moments.narrow(1, 0, self.z_dim)?.contiguous()?;
        let logvar = moments.narrow(1, self.z_dim, self.z_dim)?.clamp(-30.0, 20.0)?;
        Ok((mean, logvar))
    }

    /// Decodes latents `[B, z_dim, T, h, w]` (already de-normalized) into a video `[B, C, 4(T−1)+1,
    /// s·h, s·w]`, one latent frame at a time.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let t = self.latent_frames(z)?;
        if t == 0 {
            bail!("Wan VAE decode: no latent frames in {:?}", z.dims())
        }
        let mut cache = CausalCache::new();
        let chunks = (0..t).map(|i| self.decode_chunk(&z.narrow(2, i, 1)?, &mut cache)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&chunks, 2)
    }

    /// The frame count of latents `[B, z_dim, T, h, w]`, or why they are not such latents.
    fn latent_frames(&self, z: &Tensor) -> Result<usize> {
        let (_, c, t, _, _) = z.dims5()?;
        if c != self.z_dim {
            bail!("Wan VAE decode: expected {} channels in [B, C, T, h, w], got {:?}", self.z_dim, z.dims())
        }
        Ok(t)
    }

    /// Decodes the next latent frames of a stream whose past `cache` remembers: the first chunk
    /// must be one latent frame and gives one frame; each later latent frame gives four.
    pub fn decode_chunk(&self, z: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        let t = self.latent_frames(z)?;
        if t == 0 || (cache.is_fresh() && t != 1) {
            bail!("Wan VAE decode: a stream starts with one latent frame, then any number; got {:?}", z.dims())
        }
        self.finish(&self.decode_patchified(z, cache)?)
    }

    /// The decoder's output for latents `[B, z_dim, T, h, w]` continuing `cache`'s stream, still
    /// patchified (Wan 2.2) and unclipped: frames-major `[B, F, C·p², s·h/p, s·w/p]`.
    fn decode_patchified(&self, z: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        let z = self.post_quant_conv.forward(&swap_channels_frames(z)?)?;
        self.decoder.forward(&z, cache)
    }

    /// The decoder's frames-major output → the video `[B, C, F, H, W]`: pixels, clipped to [-1, 1].
    fn finish(&self, decoded: &Tensor) -> Result<Tensor> {
        let x = swap_channels_frames(&unpatchify(decoded, self.patch)?)?;
        if self.clip_output {
            x.clamp(-1.0, 1.0)
        } else {
            x.contiguous()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn tiny_vae(cfg: &Config) -> Result<AutoencoderKLWan> {
        AutoencoderKLWan::new(cfg, VarBuilder::zeros(DType::F32, &Device::Cpu))
    }

    fn small() -> Config {
        Config { base_dim: 2, z_dim: 2, num_res_blocks: 1, ..Default::default() }
    }

    fn error_of<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("an error").to_string()
    }

    fn small_wan22() -> Config {
        let patch = Config { patch_size: Some(2), in_channels: 12, out_channels: 12, ..small() };
        Config { is_residual: true, decoder_base_dim: Some(3), scale_factor_spatial: 16, ..patch }
    }

    #[test]
    fn inconsistent_patch_configs_are_refused_by_field() {
        let odd_channels = Config { in_channels: 3, ..small_wan22() };
        assert!(error_of(tiny_vae(&odd_channels)).contains("`in_channels` 3"));
        let wrong_scale = Config { scale_factor_spatial: 8, ..small_wan22() };
        let err = error_of(tiny_vae(&wrong_scale));
        assert!(err.contains("scale_factor_spatial") && err.contains("16×"), "{err}");
    }

    #[test]
    fn patchify_orders_channels_as_diffusers_and_inverts() -> Result<()> {
        // One frame, one channel, 2×4 pixels numbered row-major.
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 1, 1, 2, 4))?;
        let p = patchify(&x, 2)?;
        assert_eq!(p.dims(), &[1, 1, 4, 1, 2]);
        // Channel i_w·2 + i_h: (0,0), (1,0), (0,1), (1,1) of each 2×2 square.
        assert_eq!(p.flatten_all()?.to_vec1::<f32>()?, [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]);
        assert_eq!(unpatchify(&p, 2)?.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn wan22_decode_and_encode_give_diffusers_shapes() -> Result<()> {
        let vae = tiny_vae(&small_wan22())?;
        let video = vae.decode(&Tensor::zeros((1, 2, 3, 2, 3), DType::F32, &Device::Cpu)?)?;
        assert_eq!(video.dims(), &[1, 3, 9, 32, 48]);
        let (mean, _) = vae.encode(&video)?;
        assert_eq!(mean.dims(), &[1, 2, 3, 2, 3]);
        Ok(())
    }

    #[test]
    fn impossible_shapes_are_refused_with_the_shape() -> Result<()> {
        let vae = tiny_vae(&small())?;
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        let err = error_of(vae.encode(&zeros(&[1, 3, 8, 16, 16])?));
        assert!(err.contains("4k+1") && err.contains("[1, 3, 8, 16, 16]"), "{err}");
        let err = error_of(vae.encode(&zeros(&[1, 3, 5, 12, 16])?));
        assert!(err.contains("multiples of 8") && err.contains("[1, 3, 5, 12, 16]"), "{err}");
        let err = error_of(vae.decode(&zeros(&[1, 3, 2, 2, 2])?));
        assert!(err.contains("expected 2 channels") && err.contains("[1, 3, 2, 2, 2]"), "{err}");
        let err = error_of(vae.decode_chunk(&zeros(&[1, 2, 2, 2, 2])?, &mut CausalCache::new()));
        assert!(err.contains("one latent frame"), "{err}");
        Ok(())
    }

    #[test]
    fn decode_and_encode_give_diffusers_shapes() -> Result<()> {
        let vae = tiny_vae(&small())?;
        let video = vae.decode(&Tensor::zeros((2, 2, 3, 2, 3), DType::F32, &Device::Cpu)?)?;
        assert_eq!(video.dims(), &[2, 3, 9, 16, 24]);
        let (mean, logvar) = vae.encode(&video)?;
        assert_eq!(mean.dims(), &[2, 2, 3, 2, 3]);
        assert_eq!(logvar.dims(), mean.dims());
        Ok(())
    }
}
