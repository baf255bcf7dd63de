//! Flow-matching samplers, read from the model's `scheduler/scheduler_config.json`.
//!
//! A scheduler knows nothing of the network: it gives the timesteps to evaluate the model at, and turns
//! each velocity prediction into the next sample. It steps by index (its own counter), never by looking
//! up a float timestep.

mod dmd;
mod euler;
mod unipc;

use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use dmd::{Dmd, Renoise};
pub use euler::FlowMatchEuler;
pub use unipc::UniPc;

use crate::error::{Error, Result};

/// An explicit schedule, as diffusers' flow-matching schedulers take `timesteps=` or `sigmas=`: what few-step
/// distilled models are run with (lightx2v's 1000, 750, 500, 250 at shift 5). Flow-match Euler runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Training timesteps, decreasing, in (0, num_train_timesteps]: the network sees them as given, and the
    /// sigmas are `t / num_train_timesteps` shifted.
    Timesteps(Vec<f64>),
    /// Sigmas, decreasing, in (0, 1]: shifted, and the network sees `σ · num_train_timesteps`.
    Sigmas(Vec<f64>),
    /// Timesteps of a DMD-distilled model (FastVideo's FastWan: 1000, 757, 522), run with its sampler ([`Dmd`]):
    /// each step predicts the clean latents and noises them afresh to the next step's level.
    Dmd(Vec<f64>),
}

impl Schedule {
    pub fn len(&self) -> usize {
        match self {
            Schedule::Timesteps(values) | Schedule::Sigmas(values) | Schedule::Dmd(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks the values against `num_train_timesteps`, naming the field (`timesteps` or `sigmas`).
    pub fn validate(&self, num_train_timesteps: usize) -> Result<()> {
        let (field, values, max) = match self {
            Schedule::Timesteps(values) => ("timesteps", values, num_train_timesteps as f64),
            Schedule::Sigmas(values) => ("sigmas", values, 1.0),
            Schedule::Dmd(values) => ("dmd", values, num_train_timesteps as f64),
        };
        let invalid = |reason: String| Err(Error::InvalidRequest { field, reason });
        if values.is_empty() {
            return invalid("an explicit schedule needs at least one value".into());
        }
        if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v > 0.0 && **v <= max)) {
            return invalid(format!("{v} is outside (0, {max}]"));
        }
        if values.windows(2).any(|pair| pair[1] >= pair[0]) {
            return invalid(format!("{values:?} must decrease strictly"));
        }
        Ok(())
    }
}

pub trait Scheduler: Send {
    /// The timestep the model is evaluated at for each step, as diffusers passes it to the transformer.
    fn timesteps(&self) -> &[f32];
    /// Noise level σ of each step, and a final one (N + 1 values).
    fn sigmas(&self) -> &[f32];
    /// Advances `sample` by one step given the model's velocity prediction for the current step.
    fn step(&mut self, model_output: &Tensor, sample: &Tensor) -> candle_core::Result<Tensor>;
    /// Makes the next `step` the schedule's step `index` (0-based) instead of the first, with no history:
    /// how diffusers' image- and video-to-video pipelines start part-way down the schedule.
    fn set_begin_index(&mut self, index: usize);
}

/// Which sampler to run; the model folder's config picks one, a request may pick the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// `UniPCMultistepScheduler` with flow sigmas (Wan's default).
    Unipc,
    /// `FlowMatchEulerDiscreteScheduler`.
    Euler,
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unipc" => Ok(Self::Unipc),
            "euler" => Ok(Self::Euler),
            other => Err(format!("unknown scheduler {other:?}: expected unipc or euler")),
        }
    }
}

/// `scheduler_config.json`, for both scheduler classes (fields one class lacks keep their defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    /// UniPC's shift of the flow sigmas.
    #[serde(default)]
    pub flow_shift: Option<f64>,
    /// Flow-match Euler's shift.
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default)]
    pub prediction_type: Option<String>,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
    #[serde(default = "default_true")]
    pub predict_x0: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_solver_order() -> usize {
    2
}
fn default_solver_type() -> String {
    "bh2".into()
}
fn default_true() -> bool {
    true
}
fn default_final_sigmas_type() -> String {
    "zero".into()
}

impl SchedulerConfig {
    /// The sampler the config names.
    pub fn kind(&self) -> Option<SchedulerKind> {
        match self.class_name.as_str() {
            "UniPCMultistepScheduler" => Some(SchedulerKind::Unipc),
            "FlowMatchEulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            _ => None,
        }
    }

    /// The shift this config applies to the sigmas.
    pub fn configured_shift(&self) -> f64 {
        match self.kind() {
            Some(SchedulerKind::Euler) => self.shift.or(self.flow_shift),
            _ => self.flow_shift.or(self.shift),
        }
        .unwrap_or(1.0)
    }

    /// Checks that every option this config sets is one the samplers here implement, naming the first
    /// that isn't. `path` is only for the message.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { path: path.to_path_buf(), reason });
        if self.kind().is_none() {
            return bad(format!(
                "_class_name {:?} is not supported: expected UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler",
                self.class_name
            ));
        }
        let flags = [
            ("thresholding", self.thresholding),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_dynamic_shifting", self.use_dynamic_shifting),
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        if let Some((name, _)) = flags.iter().find(|(_, on)| *on) {
            return bad(format!("{name} = true is not supported"));
        }
        if self.shift_terminal.is_some() {
            return bad("shift_terminal is not supported".into());
        }
        if self.kind() == Some(SchedulerKind::Unipc) {
            if self.prediction_type.as_deref() != Some("flow_prediction") || !self.use_flow_sigmas {
                return bad(format!(
                    "UniPC is supported with prediction_type \"flow_prediction\" and use_flow_sigmas true (as Wan sets it), got {:?} and {}",
                    self.prediction_type, self.use_flow_sigmas
                ));
            }
            if !self.predict_x0 {
                return bad("predict_x0 = false is not supported with flow prediction".into());
            }
            if !(1..=3).contains(&self.solver_order) {
                return bad(format!("solver_order {} is not supported: expected 1, 2 or 3", self.solver_order));
            }
            if !["bh1", "bh2"].contains(&self.solver_type.as_str()) {
                return bad(format!("solver_type {:?} is not supported: expected bh1 or bh2", self.solver_type));
            }
            if self.final_sigmas_type != "zero" {
                return bad(format!(
                    "final_sigmas_type {:?} is not supported: expected \"zero\"",
                    self.final_sigmas_type
                ));
            }
        }
        Ok(())
    }

    /// A scheduler for `steps` steps: of `kind` (default: the config's own) with `shift` (default: the
    /// config's own); with an explicit `schedule`, flow-match Euler over it (its length is the steps).
    /// The sampler for a request: an explicit schedule's (flow-match Euler, or DMD with `renoise` between its
    /// steps), else `kind`'s or the config's over `steps` at `shift`.
    pub fn build(
        &self,
        kind: Option<SchedulerKind>,
        steps: usize,
        shift: Option<f64>,
        schedule: Option<&Schedule>,
        renoise: Renoise,
    ) -> Box<dyn Scheduler> {
        let shift = shift.unwrap_or_else(|| self.configured_shift());
        match schedule {
            Some(Schedule::Dmd(timesteps)) => return Box::new(Dmd::new(timesteps, self.num_train_timesteps, renoise)),
            Some(schedule) => return Box::new(FlowMatchEuler::explicit(schedule, self.num_train_timesteps, shift)),
            None => {}
        }
        match kind.or(self.kind()).unwrap_or(SchedulerKind::Unipc) {
            SchedulerKind::Unipc => Box::new(UniPc::new(self, steps, shift)),
            SchedulerKind::Euler => Box::new(FlowMatchEuler::new(self.num_train_timesteps, steps, shift)),
        }
    }
}

/// The shift of flow-matching sigmas toward the noisy end: `s·σ / (1 + (s − 1)·σ)`.
fn shift_sigma(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// numpy's `linspace(start, stop, num)`: `start + i·step`, with the last value exactly `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn wan_config() -> SchedulerConfig {
        serde_json::from_str(
            r#"{"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0, "prediction_type": "flow_prediction",
                "use_flow_sigmas": true, "solver_order": 2, "num_train_timesteps": 1000}"#,
        )
        .unwrap()
    }

    #[test]
    fn unsupported_options_are_named() {
        let mut cfg = wan_config();
        cfg.use_karras_sigmas = true;
        let err = cfg.validate(Path::new("s.json")).unwrap_err().to_string();
        assert!(err.contains("use_karras_sigmas"), "{err}");
        let mut cfg = wan_config();
        cfg.prediction_type = Some("epsilon".into());
        let err = cfg.validate(Path::new("s.json")).unwrap_err().to_string();
        assert!(err.contains("flow_prediction"), "{err}");
        assert!(wan_config().validate(Path::new("s.json")).is_ok());
    }

    #[test]
    fn linspace_matches_numpy() {
        assert_eq!(linspace(1.0, 0.001, 3), vec![1.0, 0.5005, 0.001]);
        assert_eq!(linspace(2.0, 2.0, 1), vec![2.0]);
    }
}
