//! Wan VAEs as one file in the official Wan layout (`models/tiny/single_file/wan21-tiny-a-vae*.safetensors`, see
//! the "Single-file VAEs" section of `models/tiny/FIXTURES.md`): each loads to the tensors of its diffusers folder and
//! decodes as diffusers does (`models/tiny/reference/single_file/vae.safetensors`); files that are no Wan 2.1 VAE are
//! refused by file and key.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{load, max_relative_error, reference, relative_error, tiny};
use kinetoscope_models::wan::vae::single_file::{self, VaeFile};
use kinetoscope_models::wan::vae::{AutoencoderKLWan, Config};

const MODEL: &str = "wan21-tiny-a";

fn file(name: &str) -> PathBuf {
    tiny().join("single_file").join(name)
}

/// The diffusers folder's tensors by name (f32).
fn folder_tensors() -> Result<HashMap<String, Tensor>> {
    let path = tiny().join(MODEL).join("vae").join("diffusion_pytorch_model.safetensors");
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn bf16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

/// `name` opened: no prefix, nothing left out, and exactly the folder's tensors (through `round`), read as f32.
fn check_tensors(name: &str, round: fn(&Tensor) -> Result<Tensor>) -> Result<VarBuilder<'static>> {
    let vae = VaeFile::open(&file(name))?;
    ensure!(vae.prefix().is_none() && vae.ignored().is_empty(), "{name}: {vae:?}");
    let folder = folder_tensors()?;
    let shapes = vae.shapes();
    let mut names: Vec<&String> = shapes.keys().collect();
    let mut want: Vec<&String> = folder.keys().collect();
    names.sort();
    want.sort();
    ensure!(names == want, "{name}: the names differ from the folder's");
    let vb = vae.into_var_builder(DType::F32, &Device::Cpu);
    for (tensor, dims) in &shapes {
        let got = vb.get(dims.as_slice(), tensor)?;
        ensure!(got.dtype() == DType::F32, "{name}: `{tensor}` is {:?}", got.dtype());
        ensure!(max_abs(&got, &round(&folder[tensor])?)? == 0.0, "{name}: `{tensor}` differs from the folder's");
    }
    Ok(vb)
}

fn check_decode(what: &str, vae: &AutoencoderKLWan, want: &Tensor, bound: f32) -> Result<Tensor> {
    let r = reference("single_file", "vae.safetensors")?;
    let out = vae.decode(&r["latents"])?;
    ensure!(out.dims() == want.dims(), "{what}: {:?}, not {:?}", out.dims(), want.dims());
    let (rel, max_rel) = (relative_error(&out, want)?, max_relative_error(&out, want)?);
    println!("{what}: relative error {rel:.2e}, max relative error {max_rel:.2e}");
    ensure!(rel < bound, "{what}: relative error {rel}");
    Ok(out)
}

#[test]
fn the_official_file_is_the_folder_and_decodes_as_diffusers() -> Result<()> {
    let (cfg, folder): (Config, _) = load(MODEL, "vae")?;
    let r = reference("single_file", "vae.safetensors")?;
    let vb = check_tensors(&format!("{MODEL}-vae.safetensors"), |t| Ok(t.clone()))?;
    let out = check_decode("f32 file", &AutoencoderKLWan::new(&cfg, vb)?, &r["decoded"], 1e-4)?;
    // The same network as the folder's: the same decode, bit for bit.
    let from_folder = AutoencoderKLWan::new(&cfg, folder)?.decode(&r["latents"])?;
    ensure!(max_abs(&out, &from_folder)? == 0.0, "the file decodes otherwise than the folder");
    // load_vae: the same, checked both ways.
    let vae = single_file::load_vae(&file(&format!("{MODEL}-vae.safetensors")), &cfg, DType::F32, &Device::Cpu)?;
    ensure!(max_abs(&vae.decode(&r["latents"])?, &out)? == 0.0, "load_vae decodes otherwise");
    Ok(())
}

#[test]
fn the_bf16_file_is_the_folder_rounded() -> Result<()> {
    let (cfg, _): (Config, _) = load(MODEL, "vae")?;
    let vb = check_tensors(&format!("{MODEL}-vae-bf16.safetensors"), bf16)?;
    let r = reference("single_file", "vae.safetensors")?;
    check_decode("bf16 file", &AutoencoderKLWan::new(&cfg, vb)?, &r["decoded"], 3e-2)?;
    Ok(())
}

/// Two residual blocks per stage, as released: the layout diffusers' own converter maps; its `from_single_file`
/// decode is the reference.
#[test]
fn the_released_depth_decodes_as_diffusers_from_single_file() -> Result<()> {
    let (cfg, _): (Config, _) = load(MODEL, "vae")?;
    let cfg = Config { num_res_blocks: 2, ..cfg };
    let path = file(&format!("{MODEL}-vae-res2.safetensors"));
    let vae = single_file::load_vae(&path, &cfg, DType::F32, &Device::Cpu)?;
    let r = reference("single_file", "vae.safetensors")?;
    check_decode("res2 file", &vae, &r["decoded_res2"], 1e-4)?;
    // With the depth of another config, the first tensor it lacks is named.
    let (other, _): (Config, _) = load(MODEL, "vae")?;
    let msg = single_file::load_vae(&path, &other, DType::F32, &Device::Cpu).err().unwrap().to_string();
    ensure!(msg.contains("res2.safetensors") && msg.contains("no tensor for `encoder.down_blocks.1.resample"), "{msg}");
    Ok(())
}

/// The tiny file's tensors, to write variants of.
fn official() -> Result<Vec<(String, Tensor)>> {
    let tensors = candle_core::safetensors::load(file(&format!("{MODEL}-vae.safetensors")), &Device::Cpu)?;
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

fn write(dir: &Path, name: &str, tensors: &[(String, Tensor)]) -> Result<PathBuf> {
    let path = dir.join(name);
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &path)?;
    Ok(path)
}

fn refusal(path: &Path) -> String {
    let msg = VaeFile::open(path).unwrap_err().to_string();
    println!("{msg}");
    msg
}

/// A checkpoint that bundles the VAE with other components, as ComfyUI saves Wan's (`vae.`) or under Stable
/// Diffusion's `first_stage_model.`: the VAE is what is behind the prefix, the rest is left out.
#[test]
fn a_prefixed_checkpoint_gives_the_vae_behind_the_prefix() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, _): (Config, _) = load(MODEL, "vae")?;
    let r = reference("single_file", "vae.safetensors")?;
    let other = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
    let others =
        ["model.diffusion_model.blocks.0.self_attn.q.weight", "text_encoders.umt5xxl.transformer.shared.weight"];
    for prefix in single_file::PREFIXES {
        let mut tensors: Vec<(String, Tensor)> =
            official()?.into_iter().map(|(k, t)| (format!("{prefix}{k}"), t)).collect();
        tensors.extend(others.iter().map(|k| (k.to_string(), other.clone())));
        let path = write(dir.path(), "bundle.safetensors", &tensors)?;
        let vae = VaeFile::open(&path)?;
        ensure!(vae.prefix() == Some(prefix), "{vae:?}");
        ensure!(vae.ignored() == others, "{:?}", vae.ignored());
        let key = vae.file_key("decoder.up_blocks.1.resnets.0.conv_shortcut.weight");
        ensure!(key == Some(&format!("{prefix}decoder.upsamples.3.shortcut.weight")), "{key:?}");
        let decoder = vae.into_vae(&cfg, DType::F32, &Device::Cpu)?;
        check_decode(&format!("`{prefix}` prefix"), &decoder, &r["decoded"], 1e-4)?;
    }

    // Both prefixes: which is the VAE is not guessed.
    let mut tensors: Vec<(String, Tensor)> = official()?.into_iter().map(|(k, t)| (format!("vae.{k}"), t)).collect();
    tensors.push(("first_stage_model.conv1.bias".into(), other));
    let msg = refusal(&write(dir.path(), "both.safetensors", &tensors)?);
    ensure!(msg.contains("both.safetensors") && msg.contains("`vae.`, `first_stage_model.`"), "{msg}");
    Ok(())
}

#[test]
fn a_key_of_no_vae_tensor_is_refused_by_file_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let extra = Tensor::zeros(16, DType::F32, &Device::Cpu)?;
    let mut tensors = official()?;
    tensors.push(("decoder.middle.1.norm.beta".into(), extra.clone()));
    let msg = refusal(&write(dir.path(), "extra.safetensors", &tensors)?);
    ensure!(msg.contains("extra.safetensors") && msg.contains("`decoder.middle.1.norm.beta`"), "{msg}");

    // A residual key on the decoder's upsampler (block 2 resamples in this file) names nothing either.
    let mut tensors = official()?;
    tensors.push(("decoder.upsamples.2.residual.0.gamma".into(), extra.clone()));
    let msg = refusal(&write(dir.path(), "upsampler.safetensors", &tensors)?);
    ensure!(msg.contains("`decoder.upsamples.2.residual.0.gamma`"), "{msg}");

    // A tensor that maps, but that the config's VAE does not read: `into_vae` refuses it by key.
    let mut tensors = official()?;
    let shortcut = Tensor::zeros((16, 16, 1, 1, 1), DType::F32, &Device::Cpu)?;
    tensors.push(("decoder.middle.0.shortcut.weight".into(), shortcut));
    let path = write(dir.path(), "unread.safetensors", &tensors)?;
    let (cfg, _): (Config, _) = load(MODEL, "vae")?;
    let msg = single_file::load_vae(&path, &cfg, DType::F32, &Device::Cpu).err().unwrap().to_string();
    ensure!(msg.contains("unread.safetensors") && msg.contains("`decoder.middle.0.shortcut.weight`"), "{msg}");
    ensure!(msg.contains("does not read"), "{msg}");
    Ok(())
}

#[test]
fn other_files_are_refused_with_what_they_are() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The diffusers folder's own weights.
    let diffusers = tiny().join(MODEL).join("vae").join("diffusion_pytorch_model.safetensors");
    let msg = refusal(&diffusers);
    ensure!(msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("diffusers `vae/` folder"), "{msg}");
    // A Wan transformer in the official layout.
    let msg = refusal(&file("wan21-tiny-a.safetensors"));
    ensure!(msg.contains("`blocks.0.cross_attn.k.bias`") && msg.contains("Wan transformer"), "{msg}");
    // Wan 2.2's VAE: nested residual blocks.
    let gamma = Tensor::ones((4, 1, 1, 1), DType::F32, &Device::Cpu)?;
    let wan22 = [("encoder.downsamples.0.downsamples.0.residual.0.gamma".to_string(), gamma)];
    let msg = refusal(&write(dir.path(), "wan22.safetensors", &wan22)?);
    ensure!(msg.contains("wan22.safetensors") && msg.contains("Wan 2.2"), "{msg}");
    // A PyTorch pickle.
    let pth = dir.path().join("Wan2.1_VAE.pth");
    std::fs::write(&pth, b"PK\x03\x04 not safetensors")?;
    let msg = refusal(&pth);
    ensure!(msg.contains("Wan2.1_VAE.pth") && msg.contains("PyTorch pickles"), "{msg}");
    // Nothing in it.
    let msg = refusal(&write(dir.path(), "empty.safetensors", &[])?);
    ensure!(msg.contains("no tensors"), "{msg}");
    Ok(())
}
