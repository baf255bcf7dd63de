//! Flow-matching Euler: `x_{i+1} = x_i + (σ_{i+1} − σ_i)·v`, with diffusers'
//! `FlowMatchEulerDiscreteScheduler` schedule.

use candle_core::{Result, Tensor};

use super::{linspace, shift_sigma, Scheduler};

pub struct FlowMatchEuler {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step_index: usize,
}

impl FlowMatchEuler {
    pub fn new(num_train_timesteps: usize, steps: usize, shift: f64) -> Self {
        let train = num_train_timesteps as f64;
        // diffusers builds its training table in f32 with the shift already applied, takes its ends as the
        // schedule's range, and then shifts the range again: the endpoint is shifted twice. Kept for parity.
        let table_sigma = |t: f32| {
            let (s, shift) = (t / num_train_timesteps as f32, shift as f32);
            (shift * s / (1.0 + (shift - 1.0) * s)) as f64
        };
        let sigma_max = table_sigma(num_train_timesteps as f32);
        let sigma_min = table_sigma(1.0);
        let sigmas: Vec<f32> = linspace(sigma_max * train, sigma_min * train, steps)
            .into_iter()
            .map(|t| shift_sigma(t / train, shift) as f32)
            .collect();
        let timesteps = sigmas.iter().map(|s| s * num_train_timesteps as f32).collect();
        let sigmas = sigmas.into_iter().chain(std::iter::once(0.0)).collect();
        FlowMatchEuler { sigmas, timesteps, step_index: 0 }
    }
}

impl Scheduler for FlowMatchEuler {
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
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        self.step_index += 1;
        sample + (model_output * dt as f64)?
    }
}
