//! Parity of the umT5 encoder with `WanPipeline.encode_prompt` on the tiny fixtures
//! (`models/tiny/reference/<model>/text.safetensors`, see `models/tiny/FIXTURES.md`).
//!
//! The reference ran the encoder on ids padded to `max_sequence_length` with an attention mask and
//! zeroed the rows past the true length; ours runs on the true tokens alone, so this also checks
//! that the two agree.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{load, reference, relative_error, tiny};
use kinetoscope_models::umt5::{Config, UMT5Encoder};

fn check(model: &str) -> Result<()> {
    let (cfg, vb): (Config, _) = load(model, "text_encoder")?;
    let encoder = UMT5Encoder::new(&cfg, vb)?;
    let r = reference(model, "text.safetensors")?;
    for name in ["prompt", "negative", "long"] {
        let ids = r[&format!("{name}_ids")].to_dtype(DType::U32)?.unsqueeze(0)?;
        let want = &r[&format!("{name}_embeds")];
        let (n, max_len) = (ids.dim(1)?, want.dim(1)?);
        let got = encoder.forward(&ids)?;
        assert_eq!(got.dims(), &[1, n, cfg.d_model]);

        let err = relative_error(&got, &want.narrow(1, 0, n)?)?;
        println!("{model} {name} ({n} tokens): relative error {err:e}");
        ensure!(err < 1e-4, "{model} {name}: relative error {err}");
        if n < max_len {
            let padding = want.narrow(1, n, max_len - n)?.abs()?.max_all()?.to_scalar::<f32>()?;
            ensure!(padding == 0.0, "{model} {name}: reference rows past the prompt are not zero");
        }
    }
    Ok(())
}

/// Exporters other than transformers store the tied embedding as `encoder.embed_tokens.weight`
/// only.
#[test]
fn umt5_loads_embedding_under_encoder_name() -> Result<()> {
    let dev = Device::Cpu;
    let dir = tiny().join("wan21-tiny-a").join("text_encoder");
    let cfg: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let mut weights = candle_core::safetensors::load(dir.join("model.safetensors"), &dev)?;
    let ids = Tensor::new(&[[5u32, 17, 3, 1]], &dev)?;
    let want = UMT5Encoder::new(&cfg, VarBuilder::from_tensors(weights.clone(), DType::F32, &dev))?.forward(&ids)?;
    let shared = weights.remove("shared.weight").expect("the fixture stores the embedding as shared.weight");
    weights.insert("encoder.embed_tokens.weight".to_string(), shared);
    let got = UMT5Encoder::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &dev))?.forward(&ids)?;
    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    ensure!(diff == 0.0, "outputs differ by {diff}");
    Ok(())
}

#[test]
fn umt5_matches_diffusers_tiny_a() -> Result<()> {
    check("wan21-tiny-a")
}

#[test]
fn umt5_matches_diffusers_tiny_b() -> Result<()> {
    check("wan21-tiny-b")
}
