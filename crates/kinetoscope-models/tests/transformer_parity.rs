//! Parity of `WanTransformer3DModel` with diffusers: one forward on the tiny fixtures' reference inputs
//! (`models/tiny/reference/<model>/transformer.safetensors`, see `models/tiny/FIXTURES.md`).

mod common;

use anyhow::Result;
use common::{load, reference, relative_error};
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};

fn check(model: &str) -> Result<()> {
    let (cfg, vb): (Config, _) = load(model, "transformer")?;
    let transformer = WanTransformer3DModel::new(&cfg, vb)?;
    let r = reference(model, "transformer.safetensors")?;
    let out = transformer.forward(&r["hidden_states"], &r["timestep"], &r["encoder_hidden_states"])?;
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
