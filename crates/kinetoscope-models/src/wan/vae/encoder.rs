//! The encoder: video → 2·z_dim channels (mean and log-variance), 8× smaller in space and 4× in
//! time for Wan 2.1's and Wan 2.2's widths.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{AvgDown, MidBlock, Resample, ResidualBlock, RmsNorm};
use super::causal::{CausalCache, CausalConv3d};
use super::Config;

/// One entry of the encoder's `down_blocks` list: Wan 2.1 lists residual blocks and resamplers
/// flat; Wan 2.2 (`is_residual`) groups each level into one block with an averaging shortcut.
#[derive(Debug, Clone)]
enum DownLayer {
    Residual(ResidualBlock),
    Resample(Resample),
    Level(ResidualDownBlock),
}

/// Wan 2.2's level of the encoder: residual blocks and the downsampler, plus the input averaged
/// down to the output's shape (diffusers' `WanResidualDownBlock`).
#[derive(Debug, Clone)]
struct ResidualDownBlock {
    resnets: Vec<ResidualBlock>,
    downsampler: Option<Resample>,
    avg_shortcut: AvgDown,
}

impl ResidualDownBlock {
    /// `down`: `Some(temporal)` when the level ends with a downsampling, which also halves the
    /// frames when `temporal`.
    fn new(in_dim: usize, out_dim: usize, down: Option<bool>, cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let resnets = (0..cfg.num_res_blocks)
            .map(|j| ResidualBlock::new(if j == 0 { in_dim } else { out_dim }, out_dim, vb.pp("resnets").pp(j)))
            .collect::<Result<Vec<_>>>()?;
        let downsampler = down.map(|temporal| Resample::down(out_dim, temporal, vb.pp("downsampler"))).transpose()?;
        let factor_t = if down == Some(true) { 2 } else { 1 };
        let factor_s = if down.is_some() { 2 } else { 1 };
        Ok(Self { resnets, downsampler, avg_shortcut: AvgDown::new(in_dim, out_dim, factor_t, factor_s)? })
    }

    fn forward(&self, x: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, cache)?;
        }
        if let Some(downsampler) = &self.downsampler {
            h = downsampler.forward(&h, cache)?;
        }
        h + self.avg_shortcut.forward(x)?
    }
}

#[derive(Debug, Clone)]
pub(super) struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    pub(super) fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let dims: Vec<usize> = [1].iter().chain(&cfg.dim_mult).map(|m| cfg.base_dim * m).collect();
        let levels = cfg.dim_mult.len();
        let conv_in = CausalConv3d::cube(cfg.in_channels, dims[0], 3, vb.pp("conv_in"))?;
        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::new();
        for i in 0..levels {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            let down = (i + 1 < levels).then(|| cfg.temperal_downsample[i]);
            if cfg.is_residual {
                let block = ResidualDownBlock::new(in_dim, out_dim, down, cfg, vb_down.pp(i))?;
                down_blocks.push(DownLayer::Level(block));
                continue;
            }
            for _ in 0..cfg.num_res_blocks {
                let block = ResidualBlock::new(in_dim, out_dim, vb_down.pp(down_blocks.len()))?;
                down_blocks.push(DownLayer::Residual(block));
                in_dim = out_dim;
            }
            if let Some(temporal) = down {
                let block = Resample::down(out_dim, temporal, vb_down.pp(down_blocks.len()))?;
                down_blocks.push(DownLayer::Resample(block));
            }
        }
        let dim = dims[levels];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(dim, vb.pp("mid_block"))?,
            norm_out: RmsNorm::new(dim, false, vb.pp("norm_out"))?,
            conv_out: CausalConv3d::cube(dim, 2 * cfg.z_dim, 3, vb.pp("conv_out"))?,
        })
    }

    /// Encodes the next chunk of a stream: `[B, F, C, H, W]` → `[B, F', 2·z_dim, H/8, W/8]` (sizes after any patchifying).
    pub(super) fn forward(&self, x: &Tensor, cache: &mut CausalCache) -> Result<Tensor> {
        cache.begin_chunk();
        let mut x = self.conv_in.forward_cached(x, cache.next_slot())?;
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Residual(block) => block.forward(&x, cache)?,
                DownLayer::Resample(block) => block.forward(&x, cache)?,
                DownLayer::Level(block) => block.forward(&x, cache)?,
            };
        }
        let x = self.mid_block.forward(&x, cache)?;
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward_cached(&x, cache.next_slot())
    }
}
