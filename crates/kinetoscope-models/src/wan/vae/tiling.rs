//! Decoding large frames tile by tile: diffusers' `AutoencoderKLWan.enable_tiling` / `tiled_decode`.
//!
//! The decoder's causal cache keeps two past frames of every convolution's input at every resolution, so
//! its memory grows with the frame's area; at 1280×720 it is the largest thing a decode holds. Tiling
//! decodes overlapping spatial tiles of the latents as separate streams (each with its own, small, cache,
//! all frames of a tile before the next tile) and cross-fades each tile into the one above and the one to
//! its left over the overlap, so no seam shows. The result is not the untiled decode (each tile sees less
//! context near its edges) but diffusers' tiled decode, which is what the parity fixtures check.

use candle_core::{bail, Result, Tensor};
use serde::Serialize;

use super::{AutoencoderKLWan, CausalCache};

/// Tile and stride sizes in pixels: tiles of `tile_height × tile_width` start every `stride_height`
/// rows and `stride_width` columns, so neighbours overlap by `tile − stride` pixels, over which they are
/// blended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tiling {
    pub tile_height: usize,
    pub tile_width: usize,
    pub stride_height: usize,
    pub stride_width: usize,
}

impl Default for Tiling {
    /// diffusers' defaults: 256-pixel tiles every 192 pixels (64 pixels blended).
    fn default() -> Self {
        Tiling { tile_height: 256, tile_width: 256, stride_height: 192, stride_width: 192 }
    }
}

impl Tiling {
    /// Checks the sizes for a VAE compressing `compression`× in space: tiles and strides are whole latent
    /// cells (diffusers floors them silently), and a stride is no longer than its tile (else pixels
    /// between tiles would be missing).
    pub fn check(&self, compression: usize) -> Result<()> {
        let sizes = [
            ("tile_height", self.tile_height),
            ("tile_width", self.tile_width),
            ("stride_height", self.stride_height),
            ("stride_width", self.stride_width),
        ];
        for (name, size) in sizes {
            if size == 0 || !size.is_multiple_of(compression) {
                bail!("VAE tiling: {name} {size} must be a positive multiple of {compression} pixels (one latent cell)")
            }
        }
        if self.stride_height > self.tile_height || self.stride_width > self.tile_width {
            bail!(
                "VAE tiling: strides {}×{} must not exceed the tiles {}×{} (height × width)",
                self.stride_height,
                self.stride_width,
                self.tile_height,
                self.tile_width
            )
        }
        Ok(())
    }

    /// Whether latents of `height × width` cells span more than one tile, so that decoding them tiled
    /// differs from decoding them whole (diffusers tiles only then).
    pub fn splits(&self, compression: usize, height: usize, width: usize) -> bool {
        height > self.tile_height / compression || width > self.tile_width / compression
    }
}

impl AutoencoderKLWan {
    /// [`AutoencoderKLWan::decode`] tile by tile: the same `[B, C, 4(T−1)+1, s·h, s·w]`, within diffusers'
    /// tiled decode. Latents that fit in one tile are decoded whole, as diffusers does.
    pub fn decode_tiled(&self, z: &Tensor, tiling: Tiling) -> Result<Tensor> {
        let frames = self.latent_frames(z)?;
        let (s, p) = (self.spatial_compression, self.patch);
        tiling.check(s)?;
        let (_, _, _, height, width) = z.dims5()?;
        if frames == 0 || !tiling.splits(s, height, width) {
            return self.decode(z);
        }
        // In latent cells, then in the decoder's output (patchified pixels in Wan 2.2).
        let (tile_h, tile_w) = (tiling.tile_height / s, tiling.tile_width / s);
        let (step_h, step_w) = (tiling.stride_height / s, tiling.stride_width / s);
        let (keep_h, keep_w) = (tiling.stride_height / p, tiling.stride_width / p);
        let (blend_h, blend_w) = (tiling.tile_height / p - keep_h, tiling.tile_width / p - keep_w);

        let mut above: Vec<Tensor> = Vec::new();
        let mut bands = Vec::new();
        for top in (0..height).step_by(step_h) {
            let rows = z.narrow(3, top, tile_h.min(height - top))?;
            let mut row: Vec<Tensor> = Vec::new();
            let mut kept = Vec::new();
            for (column, left) in (0..width).step_by(step_w).enumerate() {
                let mut tile = self.decode_stream(&rows.narrow(4, left, tile_w.min(width - left))?)?;
                // Blended tiles are what the next ones blend with, as diffusers blends in place.
                if let Some(up) = above.get(column) {
                    tile = blend(up, &tile, 3, blend_h)?;
                }
                if let Some(previous) = row.last() {
                    tile = blend(previous, &tile, 4, blend_w)?;
                }
                let (_, _, _, h, w) = tile.dims5()?;
                kept.push(tile.narrow(3, 0, keep_h.min(h))?.narrow(4, 0, keep_w.min(w))?);
                row.push(tile);
            }
            bands.push(Tensor::cat(&kept, 4)?);
            above = row;
        }
        drop(above);
        let decoded = Tensor::cat(&bands, 3)?;
        drop(bands);
        self.finish(&decoded.narrow(3, 0, height * s / p)?.narrow(4, 0, width * s / p)?)
    }

    /// One tile's latents `[B, z_dim, T, h, w]` decoded as a stream of its own, a latent frame at a time:
    /// frames-major, patchified.
    fn decode_stream(&self, z: &Tensor) -> Result<Tensor> {
        let mut cache = CausalCache::new();
        let frames = (0..z.dim(2)?)
            .map(|k| self.decode_patchified(&z.narrow(2, k, 1)?, &mut cache))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&frames, 1)
    }
}

/// `b` with its first `extent` rows (`dim` 3) or columns (`dim` 4) faded in from the last ones of `a`, the
/// tile before it: weight `i / extent` for `b`'s `i`-th, the rest for `a`'s. `extent` shrinks to the
/// smaller tile's size, as in diffusers' `blend_v` / `blend_h`.
fn blend(a: &Tensor, b: &Tensor, dim: usize, extent: usize) -> Result<Tensor> {
    let (len_a, len_b) = (a.dim(dim)?, b.dim(dim)?);
    let extent = extent.min(len_a).min(len_b);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1; 5];
    shape[dim] = extent;
    let ramp = |f: &dyn Fn(f64) -> f64| {
        let weights: Vec<f32> = (0..extent).map(|i| f(i as f64 / extent as f64) as f32).collect();
        Tensor::from_vec(weights, shape.as_slice(), b.device())?.to_dtype(b.dtype())
    };
    let faded = (a.narrow(dim, len_a - extent, extent)?.broadcast_mul(&ramp(&|x| 1.0 - x)?)?
        + b.narrow(dim, 0, extent)?.broadcast_mul(&ramp(&|x| x)?)?)?;
    Tensor::cat(&[&faded, &b.narrow(dim, extent, len_b - extent)?], dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn bad_tilings_are_refused_by_field() {
        let err = Tiling { tile_width: 100, ..Default::default() }.check(8).unwrap_err().to_string();
        assert!(err.contains("tile_width 100") && err.contains("multiple of 8"), "{err}");
        let err = Tiling { stride_height: 320, ..Default::default() }.check(16).unwrap_err().to_string();
        assert!(err.contains("must not exceed"), "{err}");
        assert!(Tiling::default().check(16).is_ok());
    }

    #[test]
    fn blending_fades_linearly_and_shrinks_to_the_smaller_tile() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::ones((1, 1, 1, 1, 6), DType::F32, &dev)?;
        let b = Tensor::zeros((1, 1, 1, 1, 3), DType::F32, &dev)?;
        // extent 4 shrinks to b's 3 columns: weights of a are 1, 2/3, 1/3.
        let out = blend(&a, &b, 4, 4)?.flatten_all()?.to_vec1::<f32>()?;
        let want = [1.0, 2.0 / 3.0, 1.0 / 3.0];
        assert!(out.iter().zip(want).all(|(o, w)| (o - w).abs() < 1e-6), "{out:?}");
        Ok(())
    }
}
