//! Parity of `WanTransformer3DModel` with diffusers: one forward on the tiny fixtures' reference inputs
//! (`models/tiny/reference/<model>/transformer.safetensors`, see `models/tiny/FIXTURES.md`).

mod common;

use anyhow::{ensure, Result};
use candle_core::Tensor;
use common::{load, max_relative_error, reference, relative_error};
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};

fn check(model: &str) -> Result<()> {
    let (cfg, vb): (Config, _) = load(model, "transformer")?;
    let transformer = WanTransformer3DModel::new(&cfg, vb)?;
    let r = reference(model, "transformer.safetensors")?;
    let out = transformer.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"], None)?;
    let want = &r["output"];
    assert_eq!(out.dims(), want.dims());
    let err = relative_error(&out, want)?;
    println!("{model}: relative error {err:e}");
    assert!(err < 1e-4, "{model}: relative error {err}");
    Ok(())
}

#[test]
fn tiny_a_matches_diffusers() -> Result<()> {
    check("wan21-tiny-a")
}

#[test]
fn tiny_b_sharded_bf16_matches_diffusers() -> Result<()> {
    check("wan21-tiny-b")
}

/// Wan 2.2 TI2V: one timestep per token, the first latent frame's tokens at 0 (`timestep` is `[1, L]`).
#[test]
fn ti2v_per_token_timesteps_match_diffusers() -> Result<()> {
    check("wan22-ti2v-tiny-a")?;
    check("wan22-ti2v-tiny-b")
}

/// Wan 2.1 I2V / FLF2V: 36 input channels and CLIP image states (`[1, 17, 24]`, or FLF2V's first and last frame
/// `[2, 17, 24]`), the text padded to 512 tokens (diffusers splits the image tokens off by that length; this
/// model keeps them apart). Also as classifier-free guidance runs it: the prompt twice in one batch of two, the
/// image's states given once, each row as the single forward.
fn check_with_image(model: &str) -> Result<()> {
    let (cfg, vb): (Config, _) = load(model, "transformer")?;
    let transformer = WanTransformer3DModel::new(&cfg, vb)?;
    ensure!(transformer.has_image_embedder(), "{model}: no image embedder");
    let r = reference(model, "transformer.safetensors")?;
    let (latents, t, text, image) =
        (&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"], &r["encoder_hidden_states_image"]);
    let want = &r["out"];
    let out = transformer.forward(latents, t, text, Some(image))?;
    assert_eq!(out.dims(), want.dims());
    let err = max_relative_error(&out, want)?;
    println!("{model}: max relative error {err:e}");
    ensure!(err < 1e-4, "{model}: max relative error {err}");

    let pair = |x: &Tensor| Tensor::cat(&[x, x], 0);
    let out = transformer.forward(&pair(latents)?, &pair(t)?, &pair(text)?, Some(image))?;
    for row in 0..2 {
        let err = max_relative_error(&out.narrow(0, row, 1)?, want)?;
        ensure!(err < 1e-4, "{model}: batch of two, row {row}: max relative error {err}");
    }
    Ok(())
}

#[test]
fn wan21_i2v_matches_diffusers() -> Result<()> {
    check_with_image("wan21-i2v-tiny")
}

#[test]
fn wan21_flf2v_matches_diffusers() -> Result<()> {
    check_with_image("wan21-flf2v-tiny")
}

/// Wan 2.2 A14B: each expert (`transformer`, `transformer_2`, of different widths) on its own inputs; the
/// image-to-video experts read 36 channels and no image tokens.
#[test]
fn a14b_experts_match_diffusers() -> Result<()> {
    for model in ["wan22-t2v-a14b-tiny", "wan22-i2v-a14b-tiny"] {
        for expert in ["transformer", "transformer_2"] {
            let (cfg, vb): (Config, _) = load(model, expert)?;
            let transformer = WanTransformer3DModel::new(&cfg, vb)?;
            let r = reference(model, &format!("{expert}.safetensors"))?;
            let out = transformer.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"], None)?;
            let err = relative_error(&out, &r["out"])?;
            println!("{model} {expert}: relative error {err:e}");
            ensure!(err < 1e-4, "{model} {expert}: relative error {err}");
        }
    }
    Ok(())
}

/// Wan VACE: control latents through the VACE blocks, their hints added after main blocks 0 and 2, against
/// diffusers' `WanVACETransformer3DModel` (`models/tiny/wan21-vace-tiny`): control latents covering fewer frames
/// than the latents (padded with zeros) at scales 0.7 and 1.3, covering all of them at 1, and at scale 0, where the
/// control changes nothing.
#[test]
fn vace_control_matches_diffusers() -> Result<()> {
    let model = "wan21-vace-tiny";
    let (cfg, vb): (Config, _) = load(model, "transformer")?;
    let transformer = WanTransformer3DModel::new(&cfg, vb)?;
    ensure!(transformer.vace_blocks() == 2, "{model}: {} VACE blocks", transformer.vace_blocks());
    let r = reference("vace", "transformer.safetensors")?;
    let context = transformer.embed_context(&r["encoder_hidden_states"], None)?;
    for (case, want) in [("padded", "padded.output"), ("full", "full.output"), ("full", "no_control.output")] {
        let scales: Vec<f64> = match want {
            "no_control.output" => vec![0.0, 0.0],
            _ => {
                r[&format!("{case}.control_hidden_states_scale")].to_vec1::<f32>()?.into_iter().map(f64::from).collect()
            }
        };
        let control = &r[&format!("{case}.control_hidden_states")];
        let context = transformer.with_control(context.clone(), control, &scales)?;
        let out = transformer.forward_embedded(&r["hidden_states"], &r["timestep"], &context)?;
        let err = relative_error(&out, &r[want])?;
        println!("{model} {want}: relative error {err:e}");
        ensure!(err < 1e-4, "{model} {want}: relative error {err}");
    }
    Ok(())
}
