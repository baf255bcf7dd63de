//! Parity of LoRA adapters with diffusers: the tiny Wan 2.1 transformer with adapters in each format
//! (`models/tiny/loras/`, made by `models/tiny/make_lora_fixtures.py`) against diffusers' forward with the same
//! adapters loaded (`models/tiny/reference/lora/forward.safetensors`, settings in its `ref.json`), both merged into
//! the weights at load and applied at run time on one loaded model.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use common::{load, max_relative_error, reference, relative_error, tiny};
use kinetoscope_models::layers::Adapters;
use kinetoscope_models::lora::{merged_var_builder, Adapter, ReadOptions, ScaledAdapter, Targets};
use kinetoscope_models::wan::lora::read_adapter;
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};

const MODEL: &str = "wan21-tiny-a";

fn adapter_path(file: &str) -> PathBuf {
    tiny().join("loras").join(file)
}

/// The tensors of `model`'s `component` (its single safetensors file).
fn targets(model: &str, component: &str) -> Result<Targets> {
    Ok(Targets::from_safetensors(&[tiny().join(model).join(component).join("diffusion_pytorch_model.safetensors")])?)
}

fn read(file: &str, targets: &Targets) -> Result<Adapter> {
    Ok(read_adapter(&adapter_path(file), targets, &ReadOptions::default())?)
}

/// `model`'s `component` with `adapters` at their scales merged in, on `inputs` (the component's reference inputs).
fn forward(model: &str, component: &str, adapters: Vec<ScaledAdapter>, inputs: &str) -> Result<Tensor> {
    let (cfg, base): (Config, VarBuilder) = load(model, component)?;
    let transformer = WanTransformer3DModel::new(&cfg, merged_var_builder(base, adapters))?;
    let r = reference(model, inputs)?;
    Ok(transformer.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"], None)?)
}

fn scaled(adapter: Adapter, scale: f64) -> ScaledAdapter {
    ScaledAdapter { adapter: Arc::new(adapter), scale }
}

/// `model`'s `component` on `inputs` with `adapters` at run time (prepared for `transformer`, loaded without any).
fn forward_at_run_time(
    transformer: &WanTransformer3DModel,
    adapters: &Adapters,
    model: &str,
    inputs: &str,
) -> Result<Tensor> {
    let r = reference(model, inputs)?;
    let context = transformer.embed_context_with_adapters(&r["encoder_hidden_states"], None, adapters)?;
    Ok(transformer.forward_embedded(&r["hidden_states"], &r["timestep"], &context)?)
}

/// Fails unless `got` is within `tolerance` of `want`, by the relative error and the worst element's.
fn ensure_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f32) -> Result<()> {
    let (err, max_err) = (relative_error(got, want)?, max_relative_error(got, want)?);
    println!("{what}: relative error {err:e}, max relative error {max_err:e}");
    ensure!(err < tolerance && max_err < tolerance, "{what}: relative error {err}, max relative error {max_err}");
    Ok(())
}

fn check(case: &str, adapters: &[(&str, f64)]) -> Result<()> {
    let targets = targets(MODEL, "transformer")?;
    let adapters =
        adapters.iter().map(|&(file, scale)| Ok(scaled(read(file, &targets)?, scale))).collect::<Result<Vec<_>>>()?;
    let out = forward(MODEL, "transformer", adapters, "transformer.safetensors")?;
    let want = &candle_core::safetensors::load(tiny().join("reference/lora/forward.safetensors"), &Device::Cpu)?[case];
    let (err, max_err) = (relative_error(&out, want)?, max_relative_error(&out, want)?);
    println!("{case}: relative error {err:e}, max relative error {max_err:e}");
    ensure!(err < 1e-4 && max_err < 1e-4, "{case}: relative error {err}, max relative error {max_err}");
    Ok(())
}

#[test]
fn peft_matches_diffusers() -> Result<()> {
    check("peft", &[("wan21-peft.safetensors", 0.8)])
}

/// alpha / rank, `diff_b` on layers with and without a pair, pairs outside the blocks, `head.head.diff`, and the
/// norms' deltas diffusers drops.
#[test]
fn official_matches_diffusers() -> Result<()> {
    let adapter = read("wan21-official.safetensors", &targets(MODEL, "transformer")?)?;
    let mut ignored: Vec<&str> = adapter.ignored().iter().map(|k| k.key.as_str()).collect();
    ignored.sort();
    assert_eq!(
        ignored,
        [
            "diffusion_model.blocks.0.norm3.diff",
            "diffusion_model.blocks.0.norm3.diff_b",
            "diffusion_model.blocks.0.self_attn.norm_k.diff",
            "diffusion_model.blocks.0.self_attn.norm_q.diff",
            "diffusion_model.blocks.1.cross_attn.norm_q.diff",
        ]
    );
    assert!(adapter.changes("proj_out.weight") && adapter.changes("blocks.1.attn2.to_v.bias"));
    assert!(!adapter.changes("blocks.1.attn2.to_v.weight"));
    check("official", &[("wan21-official.safetensors", 0.8)])
}

/// f16 factors, alpha 1 on rank 4.
#[test]
fn musubi_matches_diffusers() -> Result<()> {
    check("musubi", &[("wan21-musubi.safetensors", 0.8)])
}

#[test]
fn two_adapters_match_diffusers() -> Result<()> {
    check("peft_official", &[("wan21-peft.safetensors", 0.7), ("wan21-official.safetensors", 0.5)])?;
    check("peft_official_fused", &[("wan21-peft.safetensors", 0.7), ("wan21-official.safetensors", 0.5)])
}

/// A pair on a layer Wan lacks (a fused QKV): named in the error; allowed, listed, and the rest applies as the PEFT
/// file alone does (diffusers warns and loads the rest).
#[test]
fn unmatched_layer_is_named_or_skipped() -> Result<()> {
    let targets = targets(MODEL, "transformer")?;
    let path = adapter_path("wan21-unmatched.safetensors");
    let err = read_adapter(&path, &targets, &ReadOptions::default()).unwrap_err().to_string();
    ensure!(err.contains("`transformer.blocks.0.attn1.to_qkv.lora_A.weight`"), "{err}");
    ensure!(err.contains("wan21-unmatched.safetensors"), "{err}");
    let adapter = read_adapter(&path, &targets, &ReadOptions { allow_unmatched: true, ..Default::default() })?;
    assert_eq!(
        adapter.unmatched(),
        ["transformer.blocks.0.attn1.to_qkv.lora_A.weight", "transformer.blocks.0.attn1.to_qkv.lora_B.weight"]
    );
    let out = forward(MODEL, "transformer", vec![scaled(adapter, 0.8)], "transformer.safetensors")?;
    let want =
        &candle_core::safetensors::load(tiny().join("reference/lora/forward.safetensors"), &Device::Cpu)?["peft"];
    let err = relative_error(&out, want)?;
    ensure!(err < 1e-4, "relative error {err}");
    Ok(())
}

/// Wan 2.2 A14B: each expert with its own adapter (bf16, original format; the low-noise one with a `head.head.diff`
/// on a non-square head), on the expert's reference inputs (`reference/wan22-t2v-a14b-tiny/<expert>.safetensors`),
/// against diffusers' `<expert>_out` in `reference/lora/a14b.safetensors`.
#[test]
fn a14b_experts_take_their_own_adapters() -> Result<()> {
    let model = "wan22-t2v-a14b-tiny";
    let want = candle_core::safetensors::load(tiny().join("reference/lora/a14b.safetensors"), &Device::Cpu)?;
    for (expert, file) in
        [("transformer", "wan22-a14b-high.safetensors"), ("transformer_2", "wan22-a14b-low.safetensors")]
    {
        let adapter = read(file, &targets(model, expert)?)?;
        // Each file fits its own expert only (the two differ in width).
        let other = if expert == "transformer" { "transformer_2" } else { "transformer" };
        ensure!(read(file, &targets(model, other)?).is_err(), "{file} read against {other}");
        let out = forward(model, expert, vec![scaled(adapter, 1.0)], &format!("{expert}.safetensors"))?;
        let want = &want[&format!("{expert}_out")];
        let (err, max_err) = (relative_error(&out, want)?, max_relative_error(&out, want)?);
        println!("{expert}: relative error {err:e}, max relative error {max_err:e}");
        ensure!(err < 1e-4 && max_err < 1e-4, "{expert}: relative error {err}, max relative error {max_err}");
    }
    Ok(())
}

/// The run-time path: one transformer loaded without adapters, each reference case's adapters set in turn (and
/// none in between, and the first case again, its factors from the cache): each matches diffusers within 1e-4 and
/// the merged path within 1e-5, and none gives the base model's output exactly.
#[test]
fn adapters_switch_at_run_time() -> Result<()> {
    let targets = targets(MODEL, "transformer")?;
    let inputs = "transformer.safetensors";
    let want = candle_core::safetensors::load(tiny().join("reference/lora/forward.safetensors"), &Device::Cpu)?;
    let files = [
        ("peft", "wan21-peft.safetensors"),
        ("official", "wan21-official.safetensors"),
        ("musubi", "wan21-musubi.safetensors"),
    ];
    let adapters: Vec<(&str, Arc<Adapter>)> =
        files.iter().map(|&(name, file)| Ok((name, Arc::new(read(file, &targets)?)))).collect::<Result<_>>()?;
    let adapter = |name: &str, scale: f64| {
        let adapter = adapters.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        ScaledAdapter { adapter, scale }
    };
    let cases: Vec<(&str, Vec<ScaledAdapter>)> = vec![
        ("peft", vec![adapter("peft", 0.8)]),
        ("base", vec![]),
        ("official", vec![adapter("official", 0.8)]),
        ("musubi", vec![adapter("musubi", 0.8)]),
        ("peft_official", vec![adapter("peft", 0.7), adapter("official", 0.5)]),
        ("peft", vec![adapter("peft", 0.8)]),
        ("base", vec![]),
    ];

    let (cfg, base): (Config, VarBuilder) = load(MODEL, "transformer")?;
    let transformer = WanTransformer3DModel::new(&cfg, base)?;
    let base_out = forward_at_run_time(&transformer, &Adapters::none(), MODEL, inputs)?;
    let mut first_peft: Option<Tensor> = None;
    for (case, set) in cases {
        let prepared = transformer.prepare_adapters(&set)?;
        let out = forward_at_run_time(&transformer, &prepared, MODEL, inputs)?;
        ensure_close(&format!("{case} at run time against diffusers"), &out, &want[case], 1e-4)?;
        if set.is_empty() {
            assert!(prepared.is_empty());
            assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, base_out.flatten_all()?.to_vec1::<f32>()?);
            continue;
        }
        let merged = forward(MODEL, "transformer", set, inputs)?;
        ensure_close(&format!("{case} at run time against merged"), &out, &merged, 1e-5)?;
        if case == "peft" {
            match &first_peft {
                None => first_peft = Some(out),
                Some(first) => assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, first.flatten_all()?.to_vec1::<f32>()?),
            }
        }
    }
    Ok(())
}

/// Two generations on one model at the same time, each with its own adapters: the adapters go with each one's
/// context, not with the model; a context from one expert's adapters is refused by the other's.
#[test]
fn contexts_carry_their_own_adapters() -> Result<()> {
    let targets = targets(MODEL, "transformer")?;
    let (cfg, base): (Config, VarBuilder) = load(MODEL, "transformer")?;
    let transformer = WanTransformer3DModel::new(&cfg, base)?;
    let peft = transformer.prepare_adapters(&[scaled(read("wan21-peft.safetensors", &targets)?, 0.8)])?;
    let official = transformer.prepare_adapters(&[scaled(read("wan21-official.safetensors", &targets)?, 0.8)])?;
    let r = reference(MODEL, "transformer.safetensors")?;
    let want = candle_core::safetensors::load(tiny().join("reference/lora/forward.safetensors"), &Device::Cpu)?;
    let text = &r["encoder_hidden_states"];
    let contexts = [
        ("peft", transformer.embed_context_with_adapters(text, None, &peft)?),
        ("official", transformer.embed_context_with_adapters(text, None, &official)?),
        ("base", transformer.embed_context(text, None)?),
    ];
    for (case, context) in contexts.iter().chain(contexts.iter().rev()) {
        // In stages, as the step cache runs it.
        let embedded = transformer.embed(&r["hidden_states"], &r["timestep"], context)?;
        let half = transformer.run_blocks(embedded.tokens(), 0..1, &embedded)?;
        let x = transformer.run_blocks(&half, 1..transformer.num_blocks(), &embedded)?;
        let out = transformer.project_out(&x, &embedded)?;
        ensure_close(&format!("{case} in stages"), &out, &want[*case], 1e-4)?;
    }

    let other = WanTransformer3DModel::new(&cfg, load::<Config>(MODEL, "transformer")?.1)?;
    let err = other.embed_context_with_adapters(text, None, &peft).err().unwrap().to_string();
    ensure!(err.contains("another network"), "{err}");
    let err = other.embed(&r["hidden_states"], &r["timestep"], &contexts[0].1).err().unwrap().to_string();
    ensure!(err.contains("another network"), "{err}");
    Ok(())
}

/// Wan 2.2 A14B at run time: each expert with its own adapter (bf16 files; the low-noise one's `head.head.diff` on a
/// non-square head, a full weight delta), as the merged path and diffusers give it.
#[test]
fn a14b_experts_take_their_own_adapters_at_run_time() -> Result<()> {
    let model = "wan22-t2v-a14b-tiny";
    let want = candle_core::safetensors::load(tiny().join("reference/lora/a14b.safetensors"), &Device::Cpu)?;
    for (expert, file) in
        [("transformer", "wan22-a14b-high.safetensors"), ("transformer_2", "wan22-a14b-low.safetensors")]
    {
        let adapter = Arc::new(read(file, &targets(model, expert)?)?);
        let (cfg, base): (Config, VarBuilder) = load(model, expert)?;
        let transformer = WanTransformer3DModel::new(&cfg, base)?;
        let set = [ScaledAdapter { adapter, scale: 1.0 }];
        let inputs = format!("{expert}.safetensors");
        let out = forward_at_run_time(&transformer, &transformer.prepare_adapters(&set)?, model, &inputs)?;
        ensure_close(&format!("{expert} at run time against diffusers"), &out, &want[&format!("{expert}_out")], 1e-4)?;
        let merged = forward(model, expert, set.to_vec(), &inputs)?;
        ensure_close(&format!("{expert} at run time against merged"), &out, &merged, 1e-5)?;
    }
    Ok(())
}
