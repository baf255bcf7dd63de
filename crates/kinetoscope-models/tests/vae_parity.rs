//! The Wan VAE against diffusers' `AutoencoderKLWan` on the tiny fixtures
//! (models/tiny/FIXTURES.md).

mod common;

use anyhow::Result;
use candle_core::Tensor;
use common::{load, reference, relative_error};
use kinetoscope_models::wan::vae::{AutoencoderKLWan, CausalCache, Config, Tiling};

fn load_vae(model: &str) -> Result<AutoencoderKLWan> {
    let (cfg, vb): (Config, _) = load(model, "vae")?;
    Ok(AutoencoderKLWan::new(&cfg, vb)?)
}

fn assert_close(what: &str, out: &Tensor, reference: &Tensor) -> Result<()> {
    assert_eq!(out.dims(), reference.dims(), "{what}");
    let err = relative_error(out, reference)?;
    println!("{what}: relative error {err:.2e}");
    assert!(err < 1e-4, "{what}: relative error {err}");
    Ok(())
}

fn check_decode(model: &str) -> Result<()> {
    let r = reference(model, "vae.safetensors")?;
    assert_close(&format!("{model} decode"), &load_vae(model)?.decode(&r["latents"])?, &r["decoded"])
}

fn check_encode(model: &str) -> Result<()> {
    let r = reference(model, "vae.safetensors")?;
    let (mean, logvar) = load_vae(model)?.encode(&r["video"])?;
    assert_close(&format!("{model} encode mean"), &mean, &r["encoded_mean"])?;
    assert_close(&format!("{model} encode logvar"), &logvar, &r["encoded_logvar"])
}

#[test]
fn decode_matches_diffusers() -> Result<()> {
    check_decode("wan21-tiny-a")?;
    check_decode("wan21-tiny-b")
}

#[test]
fn encode_matches_diffusers() -> Result<()> {
    check_encode("wan21-tiny-a")?;
    check_encode("wan21-tiny-b")
}

/// Wan 2.2's VAE: patchified pixels, residual blocks with averaging / duplicating shortcuts, a
/// decoder wider than the encoder.
#[test]
fn wan22_decode_matches_diffusers() -> Result<()> {
    check_decode("wan22-ti2v-tiny-a")?;
    check_decode("wan22-ti2v-tiny-b")
}

#[test]
fn wan22_encode_matches_diffusers() -> Result<()> {
    check_encode("wan22-ti2v-tiny-a")?;
    check_encode("wan22-ti2v-tiny-b")
}

/// Streaming equals batch: the first latent frame alone, then all the others in one chunk, gives
/// the same video as diffusers' frame-by-frame decode.
#[test]
fn decode_in_two_chunks_matches_diffusers() -> Result<()> {
    let vae = load_vae("wan21-tiny-b")?;
    let r = reference("wan21-tiny-b", "vae.safetensors")?;
    let latents = &r["latents"];
    let t = latents.dim(2)?;
    let mut cache = CausalCache::new();
    let first = vae.decode_chunk(&latents.narrow(2, 0, 1)?, &mut cache)?;
    let rest = vae.decode_chunk(&latents.narrow(2, 1, t - 1)?, &mut cache)?;
    assert_close("decode in two chunks", &Tensor::cat(&[first, rest], 2)?, &r["decoded"])
}

/// Tiled decoding against diffusers' `enable_tiling` (diffusers 0.42.1, make_tiled_fixtures.py): latents larger
/// than the tiles both ways, edge tiles narrower than the overlap, Wan 2.2 blending in patchified pixels.
#[test]
fn tiled_decode_matches_diffusers() -> Result<()> {
    for model in ["wan21-tiny-a", "wan21-tiny-b", "wan22-ti2v-tiny-a", "wan22-ti2v-tiny-b"] {
        let r = reference(model, "vae_tiled.safetensors")?;
        let sizes = r["tiling"].to_vec1::<i64>()?.iter().map(|&n| n as usize).collect::<Vec<_>>();
        let tiling =
            Tiling { tile_height: sizes[0], tile_width: sizes[1], stride_height: sizes[2], stride_width: sizes[3] };
        let vae = load_vae(model)?;
        let tiled = vae.decode_tiled(&r["latents"], tiling)?;
        assert_close(&format!("{model} tiled decode"), &tiled, &r["decoded"])?;
        // The tiles' seams differ from a whole decode: this is tiling, not a decode that ignored it.
        assert!(relative_error(&vae.decode(&r["latents"])?, &r["decoded"])? > 1e-3, "{model}: tiling had no effect");
    }
    Ok(())
}

/// Latents within one tile are decoded whole, as diffusers does.
#[test]
fn latents_within_a_tile_decode_whole() -> Result<()> {
    let r = reference("wan21-tiny-a", "vae.safetensors")?;
    let vae = load_vae("wan21-tiny-a")?;
    let tiled = vae.decode_tiled(&r["latents"], Tiling::default())?;
    assert_close("one tile", &tiled, &r["decoded"])
}
