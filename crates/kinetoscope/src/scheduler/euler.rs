//! Flow-matching Euler: `x_{i+1} = x_i + (σ_{i+1} − σ_i)·v`, with diffusers'
//! `FlowMatchEulerDiscreteScheduler` schedule.

use candle_core::{Result, Tensor};

use super::{linspace, shift_sigma, Schedule, Scheduler};

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

    /// The explicit `schedule` with `shift`, as diffusers' `set_timesteps(timesteps=...)` or `sigmas=...` sets
    /// it, in f32 as NumPy computes it: given timesteps are passed to the network unchanged while their sigmas
    /// (`t / num_train_timesteps`) are shifted; given sigmas are shifted and the network sees them times
    /// `num_train_timesteps`.
    pub fn explicit(schedule: &Schedule, num_train_timesteps: usize, shift: f64) -> Self {
        let train = num_train_timesteps as f32;
        let shifted = |s: f32| {
            let shift = shift as f32;
            shift * s / (1.0 + (shift - 1.0) * s)
        };
        let (sigmas, timesteps): (Vec<f32>, Vec<f32>) = match schedule {
            // DMD timesteps run with their own sampler (`Dmd`); as Euler steps they are timesteps.
            Schedule::Timesteps(timesteps) | Schedule::Dmd(timesteps) => {
                timesteps.iter().map(|&t| (shifted(t as f32 / train), t as f32)).unzip()
            }
            Schedule::Sigmas(sigmas) => sigmas
                .iter()
                .map(|&s| {
                    let sigma = shifted(s as f32);
                    (sigma, sigma * train)
                })
                .unzip(),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// lightx2v's four steps at shift 5: the network sees the timesteps as given, the sigmas are shifted.
    #[test]
    fn explicit_timesteps_keep_their_values_and_shift_their_sigmas() {
        let timesteps = Schedule::Timesteps(vec![1000.0, 750.0, 500.0, 250.0]);
        let euler = FlowMatchEuler::explicit(&timesteps, 1000, 5.0);
        assert_eq!(euler.timesteps(), [1000.0, 750.0, 500.0, 250.0]);
        let want = [1.0, 0.9375, 0.8333333, 0.625, 0.0];
        assert!(euler.sigmas().iter().zip(want).all(|(got, want)| (got - want).abs() < 1e-6), "{:?}", euler.sigmas());

        let sigmas = FlowMatchEuler::explicit(&Schedule::Sigmas(vec![1.0, 0.5]), 1000, 3.0);
        assert_eq!(sigmas.sigmas(), [1.0, 0.75, 0.0]);
        assert_eq!(sigmas.timesteps(), [1000.0, 750.0]);
    }

    #[test]
    fn explicit_schedules_are_checked_by_field() {
        let field = |schedule: Schedule| match schedule.validate(1000) {
            Err(crate::Error::InvalidRequest { field, reason }) => format!("{field}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert!(field(Schedule::Timesteps(vec![])).starts_with("timesteps: an explicit schedule needs"));
        assert!(field(Schedule::Timesteps(vec![1001.0])).contains("outside (0, 1000]"));
        assert!(field(Schedule::Timesteps(vec![500.0, 750.0])).contains("must decrease"));
        assert!(field(Schedule::Sigmas(vec![1.0, f64::NAN])).starts_with("sigmas: NaN is outside (0, 1]"));
        assert!(Schedule::Sigmas(vec![1.0, 0.5]).validate(1000).is_ok());
    }
}
