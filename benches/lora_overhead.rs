//! The step cost of a LoRA adapter applied at run time ([`kinetoscope_models::layers::Adapters`]: each adapted layer
//! adds `x·Aᵀ·Bᵀ`, the weights left alone) on the Wan 2.1 T2V 1.3B transformer (its real shapes, random weights, f32
//! on the CPU): one forward without adapters and one with a rank-64 adapter on every linear layer, interleaved, the
//! fastest of several each, at a few token counts. Prints a Markdown row per size: the two times, the overhead, and
//! the overhead the multiply-adds predict (the adapter's products against the layers' and attention's), which is what
//! the measurement tends to as the products grow (the GPU's case).
//!
//! ```sh
//! cargo bench -p kinetoscope-models --bench lora_overhead
//! ```
//!
//! About 6 GiB of memory (the model in f32 and the adapter).

#[path = "common/wan_1_3b.rs"]
mod wan_1_3b;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use kinetoscope_models::lora::{ReadOptions, ScaledAdapter, Targets};
use kinetoscope_models::wan::single_file::model_shapes;
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};
use wan_1_3b::{config, RandomWeights};

const RANK: usize = 64;
const RUNS: usize = 2;
/// Latent frames, height and width cells: 64 and 512 tokens after the 1×2×2 patches (a 480p video's 32760 would
/// take minutes a forward on a CPU).
const SIZES: [(usize, usize, usize); 2] = [(1, 16, 16), (2, 32, 32)];
const TEXT_TOKENS: usize = 64;

/// The linear layers the run-time path adapts (the 2-D weights but the patch embedding's), by name, `(out, in)`.
fn linear_layers(cfg: &Config) -> Vec<(String, usize, usize)> {
    model_shapes(cfg)
        .expect("shapes")
        .into_iter()
        .filter_map(|(name, dims)| match dims[..] {
            [out_dim, in_dim] => Some((name.strip_suffix(".weight")?.to_string(), out_dim, in_dim)),
            _ => None,
        })
        .collect()
}

fn main() -> Result<()> {
    let cfg = config();
    let dev = Device::Cpu;
    let model =
        WanTransformer3DModel::new(&cfg, VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone()))?;

    // A rank-64 adapter on every linear layer, in diffusers' (PEFT) layout.
    let layers = linear_layers(&cfg);
    let mut tensors = HashMap::new();
    for (layer, out_dim, in_dim) in &layers {
        tensors.insert(format!("transformer.{layer}.lora_A.weight"), Tensor::randn(0f32, 0.01, (RANK, *in_dim), &dev)?);
        tensors
            .insert(format!("transformer.{layer}.lora_B.weight"), Tensor::randn(0f32, 0.01, (*out_dim, RANK), &dev)?);
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rank64.safetensors");
    candle_core::safetensors::save(&tensors, &file)?;
    drop(tensors);
    let targets = Targets::new(model_shapes(&cfg)?);
    let adapter = kinetoscope_models::wan::lora::read_adapter(&file, &targets, &ReadOptions::default())?;
    let adapters = model.prepare_adapters(&[ScaledAdapter { adapter: Arc::new(adapter), scale: 1.0 }])?;

    let text = Tensor::randn(0f32, 1.0, (1, TEXT_TOKENS, cfg.text_dim), &dev)?;
    let plain = model.embed_context(&text, None)?;
    let adapted = model.embed_context_with_adapters(&text, None, &adapters)?;
    let timestep = Tensor::new(&[500f32], &dev)?;

    println!("| tokens | without s | with rank {RANK} s | overhead | multiply-adds predict |");
    println!("| --- | --- | --- | --- | --- |");
    for (frames, height, width) in SIZES {
        let latents = Tensor::randn(0f32, 1.0, (1, cfg.in_channels, frames, height, width), &dev)?;
        let tokens = frames * (height / 2) * (width / 2);
        let mut best = [f64::INFINITY; 2];
        for _ in 0..RUNS {
            for (i, context) in [&plain, &adapted].into_iter().enumerate() {
                let start = Instant::now();
                model.forward_embedded(&latents, &timestep, context)?;
                best[i] = best[i].min(start.elapsed().as_secs_f64());
            }
        }
        println!(
            "| {tokens} | {:.2} | {:.2} | {:+.1}% | {:+.1}% |",
            best[0],
            best[1],
            (best[1] / best[0] - 1.0) * 100.0,
            predicted_overhead(&cfg, &layers, tokens) * 100.0
        );
    }
    println!(
        "\nAt 480p (81 frames, 832×480: 32760 tokens) the multiply-adds predict {:+.1}%.",
        predicted_overhead(&cfg, &layers, 32760) * 100.0
    );
    Ok(())
}

/// The adapter's multiply-adds per forward over the base's: its two thin products per layer against the layers'
/// products and self- and cross-attention's scores and sums (text of [`TEXT_TOKENS`]).
fn predicted_overhead(cfg: &Config, layers: &[(String, usize, usize)], tokens: usize) -> f64 {
    let (mut base, mut adapter) = (0f64, 0f64);
    for (name, out_dim, in_dim) in layers {
        // The context's projections run on the text tokens, the others on the video's.
        let rows = if name.contains("attn2.to_k") || name.contains("attn2.to_v") || name.contains("text_embedder") {
            TEXT_TOKENS
        } else if name.contains("time") {
            1
        } else {
            tokens
        } as f64;
        base += rows * (*out_dim * *in_dim) as f64;
        adapter += rows * (RANK * (*out_dim + *in_dim)) as f64;
    }
    let (dim, blocks, tokens) = (cfg.inner_dim() as f64, cfg.num_layers as f64, tokens as f64);
    base += blocks * 2.0 * dim * tokens * (tokens + TEXT_TOKENS as f64);
    adapter / base
}
