//! FastVideo's DMD sampling, which its step-distilled FastWan models are run with (`models/tiny/DMD.md`, from
//! FastVideo's `DmdDenoisingStage`): each step predicts the clean latents from the velocity,
//! `x0 = x − σ·v`, and, but at the last, noises them afresh to the next step's level,
//! `x' = (1 − σ')·x0 + σ'·ε` with new Gaussian noise ε; the last step's `x0` is the result. The network sees the
//! given timesteps (1000, 757, 522) as they are; each one's σ is the nearest entry of the flow-matching training
//! table at shift 8 (FastVideo fixes that shift whatever the model's config says): 1, 0.7568, 0.5217.

use candle_core::{Result, Tensor};

use super::Scheduler;

/// The shift FastVideo's DMD stage builds its table with.
const TABLE_SHIFT: f32 = 8.0;

/// Where the noise between steps comes from.
#[derive(Debug, Clone)]
pub enum Renoise {
    /// Drawn from `seed + i` before step `i` (1-based), on the latents' device.
    Seeded(u64),
    /// Given, one tensor per step after the first, in order (a reference run's, to replay it).
    Given(Vec<Tensor>),
}

pub struct Dmd {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    step_index: usize,
    renoise: Renoise,
}

impl Dmd {
    pub fn new(timesteps: &[f64], num_train_timesteps: usize, renoise: Renoise) -> Self {
        let table: Vec<(f32, f32)> = (0..num_train_timesteps)
            .map(|k| {
                let s = (num_train_timesteps - k) as f32 / num_train_timesteps as f32;
                let sigma = TABLE_SHIFT * s / (1.0 + (TABLE_SHIFT - 1.0) * s);
                (sigma * num_train_timesteps as f32, sigma)
            })
            .collect();
        let sigma_of = |t: f64| {
            // The first of the nearest entries, as `argmin` picks it.
            let mut best = (f64::INFINITY, 1.0f32);
            for &(timestep, sigma) in &table {
                let distance = (f64::from(timestep) - t).abs();
                if distance < best.0 {
                    best = (distance, sigma);
                }
            }
            best.1
        };
        let sigmas = timesteps.iter().map(|&t| sigma_of(t)).chain(std::iter::once(0.0)).collect();
        Dmd { timesteps: timesteps.iter().map(|&t| t as f32).collect(), sigmas, step_index: 0, renoise }
    }

    fn noise(&self, step: usize, like: &Tensor) -> Result<Tensor> {
        match &self.renoise {
            Renoise::Seeded(seed) => {
                let noise = crate::noise::seeded_noise(seed.wrapping_add(step as u64), like.dims(), like.device())
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                noise.to_dtype(like.dtype())
            }
            Renoise::Given(noise) => match noise.get(step - 1) {
                Some(noise) => noise.to_device(like.device())?.to_dtype(like.dtype()),
                None => candle_core::bail!("no re-noising noise given for step {step}"),
            },
        }
    }
}

impl Scheduler for Dmd {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn set_begin_index(&mut self, index: usize) {
        self.step_index = index;
    }

    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        self.step_index += 1;
        let clean = (sample - (model_output * f64::from(self.sigmas[i]))?)?;
        let next = self.sigmas[i + 1];
        if i + 1 == self.timesteps.len() {
            return Ok(clean);
        }
        let noise = self.noise(i + 1, &clean)?;
        (clean * f64::from(1.0 - next))? + (noise * f64::from(next))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FastWan's steps: σ from the shift-8 table's nearest entries (entries 720 and 880, about 28/37 and 12/23, as
    /// diffusers' f32 table holds them), the timesteps unchanged.
    #[test]
    fn fastwan_steps_take_the_shift_8_tables_sigmas() {
        let dmd = Dmd::new(&[1000.0, 757.0, 522.0], 1000, Renoise::Seeded(0));
        assert_eq!(dmd.timesteps(), [1000.0, 757.0, 522.0]);
        assert_eq!(dmd.sigmas(), [1.0, 0.756_756_7, 0.521_739_1, 0.0]);
    }
}
