//! Compact weights, as users download them (`models/tiny/quantized/`, see the "Quantized checkpoints" section of
//! `models/tiny/FIXTURES.md`): FP8 (plain and ComfyUI's scaled), GGUF in Q8_0, a Q4_K_M mix, a file of every ggml type
//! city96's files use, and city96's own layout (a 5-D patch embedding). Each loads with its linear weights kept
//! compact, dequantizes every tensor as the `gguf` package (ggml) does, and gives the forward of diffusers'
//! `WanTransformer3DModel` holding the same dequantized weights in f32 (`models/tiny/reference/quantized/`).

mod common;

use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use common::{max_relative_error, reference, tiny};
use kinetoscope_models::checkpoint::{Checkpoint, Limits};
use kinetoscope_models::compact::{Compact, Quantization, QuantizeOnLoad};
use kinetoscope_models::wan::single_file::{self, SingleFile};
use kinetoscope_models::wan::transformer::WanTransformer3DModel;

fn file(name: &str) -> PathBuf {
    tiny().join("quantized").join(name)
}

/// The forward of `name` on the reference inputs, with its compact weights kept compact; the formats its linear
/// layers hold.
fn forward(name: &str) -> Result<(Tensor, Vec<String>)> {
    let (config, vb, compact) = single_file::load(&file(name), None, DType::F32, &Device::Cpu)?;
    forward_with(&config, vb, &compact)
}

fn forward_with(
    config: &kinetoscope_models::wan::transformer::Config,
    vb: candle_nn::VarBuilder,
    compact: &Compact,
) -> Result<(Tensor, Vec<String>)> {
    let model = WanTransformer3DModel::with_compact(config, vb, compact)?;
    let r = reference("quantized", "forward.safetensors")?;
    let out = model.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"], None)?;
    Ok((out, model.compact_formats()))
}

fn check(name: &str, output: &str, compact: &[&str]) -> Result<()> {
    let (out, formats) = forward(name)?;
    let want = &reference("quantized", "forward.safetensors")?[output];
    let err = max_relative_error(&out, want)?;
    println!("{name}: max relative error against diffusers {err:e}; compact layers {formats:?}");
    ensure!(err < 1e-4, "{name}: max relative error {err}");
    for format in compact {
        ensure!(formats.iter().any(|f| f == format), "{name}: no layer kept as {format}: {formats:?}");
    }
    Ok(())
}

#[test]
fn f32_file_matches_diffusers() -> Result<()> {
    let (_, formats) = forward("wan21-tiny-q.safetensors")?;
    ensure!(formats.is_empty(), "an f32 file has no compact layers: {formats:?}");
    check("wan21-tiny-q.safetensors", "f32", &[])
}

#[test]
fn fp8_files_match_diffusers() -> Result<()> {
    check("wan21-tiny-q-fp8.safetensors", "fp8", &["F8_E4M3"])?;
    check("wan21-tiny-q-fp8-scaled.safetensors", "fp8_scaled", &["F8_E4M3"])
}

#[test]
fn gguf_files_match_diffusers() -> Result<()> {
    check("wan21-tiny-q-Q8_0.gguf", "Q8_0", &["Q8_0"])?;
    check("wan21-tiny-q-Q4_K_M.gguf", "Q4_K_M", &["Q4_K", "Q6_K"])?;
    check(
        "wan21-tiny-q-mixed.gguf",
        "mixed",
        &["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"],
    )?;
    check("wan21-tiny-q-Q4_K_S-5d.gguf", "Q4_K_S_5d", &["Q4_K"])
}

/// Every tensor of the file of every type, dequantized, equals what the `gguf` package (ggml) gives.
#[test]
fn every_ggml_type_dequantizes_as_ggml_does() -> Result<()> {
    let checkpoint = Checkpoint::open(&file("wan21-tiny-q-mixed.gguf"), &Limits::default())?;
    let want = reference("quantized", "dequantized.safetensors")?;
    ensure!(!want.is_empty());
    for (key, tensor) in &want {
        let stored = &checkpoint.tensors()[key];
        let got = checkpoint.dense(key, DType::F32, &Device::Cpu)?;
        ensure!(got.dims() == tensor.dims(), "{key}: shape {:?}, want {:?}", got.dims(), tensor.dims());
        let err = (got - tensor)?.abs()?.max_all()?.to_scalar::<f32>()?;
        ensure!(err == 0.0, "{key} ({}): max abs difference {err}", stored.format.name());
    }
    Ok(())
}

/// `--quantize`: the f32 file's linear weights quantized on load (every format), close to the f32 forward, and
/// kept in the format asked for.
#[test]
fn dense_weights_quantize_on_load() -> Result<()> {
    let f32_out = &reference("quantized", "forward.safetensors")?["f32"];
    for (quantization, format, tolerance) in
        [(Quantization::Q8_0, "Q8_0", 0.03), (Quantization::Q4K, "Q4_K", 0.3), (Quantization::Fp8, "F8_E4M3", 0.15)]
    {
        let single = SingleFile::open(&file("wan21-tiny-q.safetensors"))?;
        let config = single.config(single_file::sibling_config(single.path())?.as_ref())?;
        let (vb, _) = single.into_weights(DType::F32, &Device::Cpu);
        let compact = Compact::new(QuantizeOnLoad::new(vb.clone(), quantization));
        let (out, formats) = forward_with(&config, vb, &compact)?;
        let err = common::relative_error(&out, f32_out)?;
        println!("--quantize {quantization}: relative error against f32 {err:e}; {formats:?}");
        ensure!(err < tolerance, "{quantization}: relative error {err}");
        ensure!(formats.iter().any(|f| f == format), "{quantization}: {formats:?}");
    }
    Ok(())
}

/// Bad files are refused by name: an unknown GGUF type, a truncated file, a scaled FP8 file missing a scale.
#[test]
fn bad_files_are_refused_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let open = |path: &PathBuf| SingleFile::open(path).expect_err("refused").to_string();

    let bytes = std::fs::read(file("wan21-tiny-q-Q8_0.gguf"))?;
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000])?;
    let msg = open(&truncated);
    ensure!(msg.contains("truncated.gguf") && msg.contains("truncated"), "{msg}");
    let header_cut = dir.path().join("header-cut.gguf");
    std::fs::write(&header_cut, &bytes[..200])?;
    let msg = open(&header_cut);
    ensure!(msg.contains("header-cut.gguf") && msg.contains("truncated"), "{msg}");

    // The type of the first Q8_0 tensor (8) made 16, IQ2_XXS: the u32 after a tensor's dimensions.
    let name = b"blocks.0.ffn.0.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("a tensor name") + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into()?) as usize;
    let type_at = at + 4 + 8 * n_dims;
    ensure!(bytes[type_at] == 8, "not Q8_0 where expected");
    let mut unknown = bytes.clone();
    unknown[type_at] = 16;
    let path = dir.path().join("iq2.gguf");
    std::fs::write(&path, unknown)?;
    let msg = open(&path);
    ensure!(msg.contains("iq2.gguf") && msg.contains("IQ2_XXS") && msg.contains("blocks.0.ffn.0.weight"), "{msg}");

    let mut tensors = candle_core::safetensors::load(file("wan21-tiny-q-fp8-scaled.safetensors"), &Device::Cpu)?;
    tensors.remove("blocks.0.ffn.0.scale_weight");
    let path = dir.path().join("unscaled.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let msg = open(&path);
    ensure!(
        msg.contains("unscaled.safetensors") && msg.contains("no scale") && msg.contains("blocks.0.ffn.0.weight"),
        "{msg}"
    );
    Ok(())
}

/// A LoRA adapter on a compact file: merged into each compact weight as it is dequantized, it gives what merging it
/// into the same weights held dense gives (the adapter changes compact layers, a dense-stored layer's weight, and a
/// bias).
#[test]
fn adapters_merge_into_compact_weights() -> Result<()> {
    use kinetoscope_models::lora::{merged_compact, merged_var_builder, ReadOptions, ScaledAdapter};
    use std::sync::Arc;

    let dir = tempfile::tempdir()?;
    let path = file("wan21-tiny-q-Q4_K_M.gguf");
    let single = SingleFile::open(&path)?;
    let targets = single.targets();
    let config = single.config(single_file::sibling_config(&path)?.as_ref())?;
    // diffusers (PEFT) names; `blocks.0.attn1.to_q` is Q4_K, `condition_embedder.text_embedder.linear_1` Q8_0,
    // `blocks.0.ffn.net.2` Q6_K.
    let rank = 4;
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.05, shape, &Device::Cpu);
    let mut tensors = std::collections::HashMap::new();
    for (layer, out_dim, in_dim) in [
        ("blocks.0.attn1.to_q", 256, 256),
        ("condition_embedder.text_embedder.linear_1", 256, 32),
        ("blocks.0.ffn.net.2", 256, 512),
    ] {
        tensors.insert(format!("transformer.{layer}.lora_A.weight"), randn((rank, in_dim))?);
        tensors.insert(format!("transformer.{layer}.lora_B.weight"), randn((out_dim, rank))?);
    }
    tensors.insert("transformer.blocks.0.attn1.to_q.lora_B.bias".into(), Tensor::randn(0f32, 0.05, 256, &Device::Cpu)?);
    let lora = dir.path().join("lora.safetensors");
    candle_core::safetensors::save(&tensors, &lora)?;
    let adapter = kinetoscope_models::wan::lora::read_adapter(&lora, &targets, &ReadOptions::default())?;
    let adapters = vec![ScaledAdapter { adapter: Arc::new(adapter), scale: 0.8 }];

    let (vb, compact) = SingleFile::open(&path)?.into_weights(DType::F32, &Device::Cpu);
    let vb = merged_var_builder(vb, adapters.clone());
    let (on_compact, formats) = forward_with(&config, vb.clone(), &merged_compact(compact, adapters))?;
    ensure!(formats.iter().any(|f| f == "Q4_K"), "{formats:?}");
    let (on_dense, dense_formats) = forward_with(&config, vb, &Compact::none())?;
    ensure!(dense_formats.is_empty());
    let (base, _) = forward("wan21-tiny-q-Q4_K_M.gguf")?;
    let err = max_relative_error(&on_compact, &on_dense)?;
    println!("LoRA on Q4_K_M: compact vs dense max relative error {err:e}");
    ensure!(err < 1e-5, "max relative error {err}");
    ensure!(common::relative_error(&on_compact, &base)? > 1e-3, "the adapter changes the output");
    Ok(())
}

/// The umT5 encoder from one file (`umt5::file_weights`): city96's GGUF layout (llama.cpp's T5 names, Q8_0) and
/// ComfyUI's scaled FP8 (transformers' names), each against transformers' `UMT5EncoderModel` holding the file's
/// dequantized weights, on the valid tokens of a padded batch of two prompts.
#[test]
fn text_encoder_files_match_transformers() -> Result<()> {
    use kinetoscope_models::umt5::{self, UMT5Encoder};

    let (cfg, _): (umt5::Config, _) = common::load("wan21-tiny-a", "text_encoder")?;
    let r = reference("quantized", "text.safetensors")?;
    for (name, output) in [
        ("umt5-tiny-Q8_0.gguf", "last_hidden_state_Q8_0"),
        ("umt5-tiny-fp8-scaled.safetensors", "last_hidden_state_fp8_scaled"),
    ] {
        let vb = umt5::file_weights(&file(name), DType::F32, &Device::Cpu)?;
        let encoder = UMT5Encoder::new(&cfg, vb)?;
        for row in 0..2 {
            let mask = r["attention_mask"].get(row)?.to_dtype(DType::U32)?;
            let n = mask.sum_all()?.to_scalar::<u32>()? as usize;
            let ids = r["input_ids"].get(row)?.narrow(0, 0, n)?.to_dtype(DType::U32)?.unsqueeze(0)?;
            let got = encoder.forward(&ids)?;
            let want = r[output].get(row)?.narrow(0, 0, n)?.unsqueeze(0)?;
            let err = max_relative_error(&got, &want)?;
            println!("{name}, prompt {row} ({n} tokens): max relative error against transformers {err:e}");
            ensure!(err < 1e-4, "{name} prompt {row}: max relative error {err}");
        }
    }
    Ok(())
}
