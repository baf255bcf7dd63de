//! The initial noise: drawn from a seed, identically on every device, or read from a file so that a
//! run can be compared with any other implementation given the same noise.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// Standard normal noise of `shape` from `seed`. Drawn on the CPU with a portable generator (ChaCha8)
/// and then moved, so a seed gives the same video on every machine and device.
pub fn seeded_noise(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(values, shape, device).map_err(|source| Error::Compute { stage: "noise", source })
}

/// Reads the tensor `latents` from a safetensors file and checks it has `shape` and finite values.
pub fn read_latents(path: &Path, shape: &[usize], device: &Device) -> Result<Tensor> {
    let bad = |reason: String| Error::Latents { path: path.to_path_buf(), reason };
    if !path.is_file() {
        return Err(bad("no such file".into()));
    }
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let Some(latents) = tensors.remove("latents") else {
        let mut names: Vec<_> = tensors.into_keys().collect();
        names.sort();
        return Err(bad(format!("has no tensor named \"latents\" (it has: {})", names.join(", "))));
    };
    if latents.dims() != shape {
        return Err(bad(format!(
            "tensor \"latents\" has shape {:?}, expected {shape:?} for this size and frame count",
            latents.dims()
        )));
    }
    let latents = latents.to_dtype(candle_core::DType::F32).map_err(|e| bad(e.to_string()))?;
    let finite = latents
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        return Err(bad("tensor \"latents\" holds NaN or infinite values".into()));
    }
    latents.to_device(device).map_err(|e| bad(e.to_string()))
}

/// The noise a DMD schedule draws between its steps, when the latents file gives it (`renoise`, `[steps − 1, …]`:
/// a reference run's, to replay it); `None` when the file has none.
pub fn read_renoise(path: &Path) -> Result<Option<Vec<Tensor>>> {
    let bad = |reason: String| Error::Latents { path: path.to_path_buf(), reason };
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let Some(renoise) = tensors.remove("renoise") else { return Ok(None) };
    let steps = renoise.dim(0).map_err(|e| bad(format!("renoise: {e}")))?;
    (0..steps).map(|i| renoise.get(i).map_err(|e| bad(format!("renoise: {e}")))).collect::<Result<Vec<_>>>().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_noise() {
        let a = seeded_noise(7, &[1, 2, 3, 4], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = seeded_noise(7, &[1, 2, 3, 4], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = seeded_noise(8, &[1, 2, 3, 4], &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn wrong_latents_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise.safetensors");
        let t = Tensor::zeros((1, 4, 2, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&[("noise", t.clone())].into_iter().collect(), &path).unwrap();
        let err = read_latents(&path, &[1, 4, 2, 2, 2], &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("no tensor named \"latents\"") && err.contains("noise"), "{err}");
        candle_core::safetensors::save(&[("latents", t)].into_iter().collect(), &path).unwrap();
        let err = read_latents(&path, &[1, 4, 3, 2, 2], &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("[1, 4, 2, 2, 2]") && err.contains("[1, 4, 3, 2, 2]"), "{err}");
        assert!(read_latents(&path, &[1, 4, 2, 2, 2], &Device::Cpu).is_ok());
    }
}
