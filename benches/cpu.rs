//! CPU benchmark on the small test model: one transformer forward (half a guided denoising step) and
//! one VAE decode, at a size where the work is measurable. Prints the median of several runs.
//!
//! ```sh
//! cargo bench -p kinetoscope --bench cpu
//! ```

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kinetoscope::ModelDir;
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};
use kinetoscope_models::wan::vae::{self, AutoencoderKLWan};

const RUNS: usize = 5;
const HEIGHT: usize = 256;
const WIDTH: usize = 256;
const FRAMES: usize = 17;

fn median_seconds(mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?; // warm-up
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f().map(|_| start.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let dir = ModelDir::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny/wan21-tiny-a"))?;
    let t_cfg: transformer::Config = dir.config("transformer", "config.json")?;
    let model = WanTransformer3DModel::new(&t_cfg, dir.var_builder("transformer", DType::F32, &dev)?)?;
    let v_cfg: vae::Config = dir.config("vae", "config.json")?;
    let vae = AutoencoderKLWan::new(&v_cfg, dir.var_builder("vae", DType::F32, &dev)?)?;

    let latent_frames = (FRAMES - 1) / 4 + 1;
    let latents = Tensor::randn(0f32, 1.0, (1, v_cfg.z_dim, latent_frames, HEIGHT / 8, WIDTH / 8), &dev)?;
    let text = model.embed_context(&Tensor::randn(0f32, 1.0, (1, 512, t_cfg.text_dim), &dev)?, None)?;
    let timestep = Tensor::new(&[500f32], &dev)?;
    let tokens = latent_frames * HEIGHT / 16 * WIDTH / 16;

    let step = median_seconds(|| model.forward_embedded(&latents, &timestep, &text))?;
    let decode = median_seconds(|| vae.decode(&latents))?;
    println!(
        "model: models/tiny/wan21-tiny-a, {WIDTH}x{HEIGHT}, {FRAMES} frames ({tokens} tokens), {RUNS} runs, median"
    );
    println!("transformer forward: {:.1} ms", step * 1e3);
    println!("VAE decode:          {:.1} ms", decode * 1e3);
    Ok(())
}
