//! The Wan VAE against diffusers' `AutoencoderKLWan` on the tiny fixtures
//! (models/tiny/FIXTURES.md).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kinetoscope_models::wan::vae::{AutoencoderKLWan, CausalCache, Config};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny")
}

fn load_vae(model_dir: &Path) -> Result<AutoencoderKLWan> {
    let vae_dir = model_dir.join("vae");
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(vae_dir.join("config.json"))?)?;
    let weights = vae_dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
    Ok(AutoencoderKLWan::new(&cfg, vb)?)
}

fn load_reference(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

/// ‖out − ref‖ / ‖ref‖.
fn relative_error(out: &Tensor, reference: &Tensor) -> Result<f32> {
    assert_eq!(out.dims(), reference.dims());
    let norm = |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?) };
    Ok(norm(&(out - reference)?)? / norm(reference)?)
}

fn assert_close(what: &str, out: &Tensor, reference: &Tensor) -> Result<()> {
    let err = relative_error(out, reference)?;
    println!("{what}: relative error {err:.2e}");
    assert!(err < 1e-4, "{what}: relative error {err}");
    Ok(())
}

fn check_decode(model_dir: &Path, reference: &Path) -> Result<()> {
    let vae = load_vae(model_dir)?;
    let r = load_reference(reference)?;
    assert_close("decode", &vae.decode(&r["latents"])?, &r["decoded"])
}

fn check_encode(model_dir: &Path, reference: &Path) -> Result<()> {
    let vae = load_vae(model_dir)?;
    let r = load_reference(reference)?;
    let (mean, logvar) = vae.encode(&r["video"])?;
    assert_close("encode mean", &mean, &r["encoded_mean"])?;
    assert_close("encode logvar", &logvar, &r["encoded_logvar"])
}

/// Streaming equals batch: the first latent frame alone, then all the others in one chunk, gives
/// the same video as diffusers' frame-by-frame decode.
fn check_decode_in_two_chunks(model_dir: &Path, reference: &Path) -> Result<()> {
    let vae = load_vae(model_dir)?;
    let r = load_reference(reference)?;
    let latents = &r["latents"];
    let t = latents.dim(2)?;
    let mut cache = CausalCache::new();
    let first = vae.decode_chunk(&latents.narrow(2, 0, 1)?, &mut cache)?;
    let rest = vae.decode_chunk(&latents.narrow(2, 1, t - 1)?, &mut cache)?;
    assert_close("decode in two chunks", &Tensor::cat(&[first, rest], 2)?, &r["decoded"])
}

fn model(name: &str) -> PathBuf {
    tiny().join(name)
}

fn reference(name: &str) -> PathBuf {
    tiny().join("reference").join(name).join("vae.safetensors")
}

#[test]
fn decode_matches_diffusers_a() -> Result<()> {
    check_decode(&model("wan21-tiny-a"), &reference("wan21-tiny-a"))
}

#[test]
fn decode_matches_diffusers_b() -> Result<()> {
    check_decode(&model("wan21-tiny-b"), &reference("wan21-tiny-b"))
}

#[test]
fn encode_matches_diffusers_a() -> Result<()> {
    check_encode(&model("wan21-tiny-a"), &reference("wan21-tiny-a"))
}

#[test]
fn encode_matches_diffusers_b() -> Result<()> {
    check_encode(&model("wan21-tiny-b"), &reference("wan21-tiny-b"))
}

#[test]
fn decode_in_two_chunks_matches_diffusers() -> Result<()> {
    check_decode_in_two_chunks(&model("wan21-tiny-b"), &reference("wan21-tiny-b"))
}
