//! Single-file checkpoints in the official Wan layout (`models/tiny/single_file/`, see the "Single-file checkpoints"
//! section of `models/tiny/FIXTURES.md`): each loads to the same tensors and the same forward as its diffusers folder,
//! and gives diffusers' `from_single_file` forward (`models/tiny/reference/single_file/`), on the inputs of
//! `models/tiny/reference/<model>/transformer.safetensors`.

mod common;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{load, max_relative_error, reference, tiny};
use kinetoscope_models::wan::single_file::{self, SingleFile};
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

/// One forward on `model`'s reference inputs.
fn forward(model: &str, cfg: &Config, vb: VarBuilder) -> Result<Tensor> {
    let transformer = WanTransformer3DModel::new(cfg, vb)?;
    let r = reference(model, "transformer.safetensors")?;
    let image = r.get("encoder_hidden_states_image");
    Ok(transformer.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"], image)?)
}

/// `file` (in `models/tiny/single_file/`) opened with the diffusers folder's config given, as f32: each tensor equals
/// the folder's, passed through `round` (identity, or bf16 rounding), and the forward is returned.
fn check_file(model: &str, file: &str, prefixed: bool, round: fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (cfg, folder): (Config, _) = load(model, "transformer")?;
    let single = SingleFile::open(&tiny().join("single_file").join(file))?;
    ensure!(single.is_prefixed() == prefixed && single.ignored().is_empty(), "{file}: {single:?}");
    ensure!(single.variant()?.is_none(), "{file}: tiny shapes taken for a released variant");
    ensure!(single.config(Some(&cfg))? == cfg, "{file}: config changed");
    let shapes = single.shapes().clone();
    let vb = single.into_weights(DType::F32, &Device::Cpu).0;
    for (name, dims) in &shapes {
        let (got, want) = (vb.get(dims.as_slice(), name)?, folder.get(dims.as_slice(), name)?);
        ensure!(max_abs(&got, &round(&want)?)? == 0.0, "{file}: `{name}` differs from the folder's");
    }
    let out = forward(model, &cfg, vb)?;
    let from_folder = forward(model, &cfg, folder)?;
    if !prefixed {
        let err = max_abs(&out, &from_folder)?;
        println!("{file}: max |single file − folder| {err:e}");
        ensure!(err <= 1e-6, "{file}: the forward differs from the folder's by {err}");
    }
    Ok(out)
}

fn same(t: &Tensor) -> Result<Tensor> {
    Ok(t.clone())
}

fn bf16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

fn check_model(model: &str) -> Result<()> {
    let want = reference("single_file", &format!("{model}.safetensors"))?;
    let out = check_file(model, &format!("{model}.safetensors"), false, same)?;
    let err = max_relative_error(&out, &want["output"])?;
    println!("{model}: max relative error against diffusers' from_single_file {err:e}");
    ensure!(err < 1e-4, "{model}: max relative error {err}");

    let out = check_file(model, &format!("{model}-comfyui-bf16.safetensors"), true, bf16)?;
    let err = max_relative_error(&out, &want["bf16_output"])?;
    println!("{model} (ComfyUI prefix, bf16): max relative error against diffusers' from_single_file {err:e}");
    ensure!(err < 1e-4, "{model} bf16: max relative error {err}");
    Ok(())
}

#[test]
fn wan21_t2v_single_file_matches_diffusers() -> Result<()> {
    check_model("wan21-tiny-a")
}

#[test]
fn wan21_i2v_single_file_matches_diffusers() -> Result<()> {
    check_model("wan21-i2v-tiny")
}

/// FLF2V's `img_emb.emb_pos` is the position embedding (diffusers' conversion script; its single-file loader drops
/// it and fails): the forward is the folder's, and the folder's reference.
#[test]
fn wan21_flf2v_single_file_keeps_its_position_embedding() -> Result<()> {
    let model = "wan21-flf2v-tiny";
    let out = check_file(model, &format!("{model}.safetensors"), false, same)?;
    let err = max_relative_error(&out, &reference(model, "transformer.safetensors")?["out"])?;
    println!("{model}: max relative error against diffusers (folder) {err:e}");
    ensure!(err < 1e-4, "{model}: max relative error {err}");
    Ok(())
}

/// Without a config (and none beside the file), a tiny file fits no released variant: the error names the file and
/// what its tensors show.
#[test]
fn a_tiny_file_without_config_names_its_shapes() -> Result<()> {
    let t2v = ["width 64, 2 layers, in_channels 16, out_channels 16, patch [1, 2, 2], ffn_dim 64", "no image embedder"];
    let i2v = ["in_channels 36", "text_dim 32, freq_dim 16", "image embedder (image_dim 24, added_kv_proj_dim 64)"];
    let flf2v = ["image embedder (image_dim 24, added_kv_proj_dim 64), pos_embed of 34 positions"];
    for (file, shows) in [
        ("wan21-tiny-a.safetensors", &t2v[..]),
        ("wan21-i2v-tiny-comfyui-bf16.safetensors", &i2v[..]),
        ("wan21-flf2v-tiny.safetensors", &flf2v[..]),
    ] {
        let path = tiny().join("single_file").join(file);
        let msg = single_file::load(&path, None, DType::F32, &Device::Cpu).err().unwrap().to_string();
        println!("{msg}");
        ensure!(msg.contains(file) && shows.iter().all(|part| msg.contains(part)), "{file}: {msg}");
        ensure!(msg.contains("no released Wan transformer") && msg.contains("config"), "{file}: {msg}");
    }
    Ok(())
}
