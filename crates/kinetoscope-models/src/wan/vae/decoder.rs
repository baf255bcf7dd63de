//! The decoder: z_dim channels → video, 8× larger in space and 4× in time (but the first frame)
//! for Wan 2.1's and Wan 2.2's widths.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{DupUp, MidBlock, Resample, ResidualBlock, RmsNorm};
use super::causal::{CausalCache, CausalConv3d};
use super::Config;

/// `num_res_blocks + 1` residual blocks, then (except in the last block) an upsampler. Wan 2.1's
/// upsampler halves the channels; Wan 2.2's (`is_residual`) keeps them and the block adds its
/// input, spread over the larger output (diffusers' `WanResidualUpBlock`).
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
    avg_shortcut: Option<DupUp>,
}

impl UpBlock {
    fn new(in_dim: usize, out_dim: usize, upsample: Option<bool>, cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let resnets = (0..=cfg.num_res_blocks)
            .map(|j| {
                let in_dim = if j == 0 { in_dim } else { out_dim };
                ResidualBlock::new(in_dim, out_dim, vb.pp("resnets").pp(j))
            })
            .collect::<Result<Vec<_>>>()?;
        let (upsampler, avg_shortcut) = match upsample {
            None => (None, None),
            Some(temporal) if cfg.is_residual => {
                let upsampler = Resample::up(out_dim, out_dim, temporal, vb.pp("upsampler"))?;
                let shortcut = DupUp::new(in_dim, out_dim, if temporal { 2 } else { 1 }, 2)?;
                (Some(upsampler), Some(shortcut))
            }
            Some(temporal) => (Some(Resample::up(out_dim, out_dim / 2, temporal, vb.pp("upsamplers").pp(0))?), None),
        };
        Ok(Self { resnets, upsampler, avg_shortcut })
    }

    fn forward(&self, x: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, cache)?;
        }
        if let Some(upsampler) = &self.upsampler {
            h = upsampler.forward(&h, cache)?;
        }
        match &self.avg_shortcut {
            Some(shortcut) => h + shortcut.forward(x, cache.first_chunk())?,
            None => Ok(h),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    pub(super) fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let base_dim = cfg.decoder_base_dim.unwrap_or(cfg.base_dim);
        let levels = cfg.dim_mult.len();
        // The widths mirror the encoder's: the deepest first, then dim_mult from the end.
        let dims: Vec<usize> =
            cfg.dim_mult.last().into_iter().chain(cfg.dim_mult.iter().rev()).map(|m| base_dim * m).collect();
        let temperal_upsample: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            // Wan 2.1's upsamplers halve the channels, so every block after the first starts at half
            // its predecessor's width.
            let in_dim = if i == 0 || cfg.is_residual { dims[i] } else { dims[i] / 2 };
            let upsample = (i + 1 < levels).then(|| temperal_upsample[i]);
            let vb = vb.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::new(in_dim, dims[i + 1], upsample, cfg, vb)?);
        }
        let out_dim = dims[levels];
        Ok(Self {
            conv_in: CausalConv3d::cube(cfg.z_dim, dims[0], 3, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(dims[0], vb.pp("mid_block"))?,
            up_blocks,
            norm_out: RmsNorm::new(out_dim, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::cube(out_dim, cfg.out_channels, 3, vb.pp("conv_out"))?,
        })
    }

    /// Decodes the next chunk of a stream: `[B, T, z_dim, h, w]` → `[B, F, C, 8h, 8w]`.
    pub(super) fn forward(&self, z: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        cache.begin_chunk();
        let mut x = self.conv_in.forward_cached(z, cache.next_slot())?;
        x = self.mid_block.forward(&x, cache)?;
        for block in &self.up_blocks {
            x = block.forward(&x, cache)?;
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward_cached(&x, cache.next_slot())
    }
}
