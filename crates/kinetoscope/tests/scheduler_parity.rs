//! The schedulers against diffusers' `UniPCMultistepScheduler` and `FlowMatchEulerDiscreteScheduler`:
//! the same timesteps and sigmas, and the same sample after every step given the same model outputs.

mod common;

use common::{model_dir, reference, relative_error, settings, MODELS};
use kinetoscope::scheduler::{SchedulerConfig, SchedulerKind};

fn check(model: &str, prefix: &str, kind: SchedulerKind, steps: usize, shift: f64) {
    let config: SchedulerConfig = model_dir(model).config("scheduler", "scheduler_config.json").unwrap();
    let mut scheduler = config.build(Some(kind), steps, Some(shift), None, kinetoscope::scheduler::Renoise::Seeded(0));
    let r = reference(model, "scheduler.safetensors");
    let want_t: Vec<f32> = r[&format!("{prefix}_timesteps")].to_vec1().unwrap();
    let want_s: Vec<f32> = r[&format!("{prefix}_sigmas")].to_vec1().unwrap();
    assert_eq!(scheduler.timesteps(), &want_t[..], "{model} {prefix} timesteps");
    for (got, want) in scheduler.sigmas().iter().zip(&want_s) {
        assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "{model} {prefix} sigmas {got} vs {want}");
    }
    assert_eq!(scheduler.sigmas().len(), want_s.len());
    let mut sample = r[&format!("{prefix}_sample_0")].clone();
    for k in 0..steps {
        sample = scheduler.step(&r[&format!("{prefix}_model_output_{k}")], &sample).unwrap();
        let err = relative_error(&sample, &r[&format!("{prefix}_sample_{}", k + 1)]);
        println!("{model} {prefix} step {k}: relative error {err:.2e}");
        assert!(err < 1e-5, "{model} {prefix} step {k}: relative error {err}");
    }
}

#[test]
fn unipc_matches_diffusers() {
    for model in MODELS {
        let s = settings(model);
        let steps = s["num_inference_steps"].as_u64().unwrap() as usize;
        check(model, "unipc", SchedulerKind::Unipc, steps, s["flow_shift"].as_f64().unwrap());
        check(model, "unipc2", SchedulerKind::Unipc, steps + 3, 5.0);
    }
}

#[test]
fn euler_matches_diffusers() {
    for model in MODELS {
        let s = settings(model);
        let steps = s["num_inference_steps"].as_u64().unwrap() as usize;
        check(model, "euler", SchedulerKind::Euler, steps, s["flow_shift"].as_f64().unwrap());
    }
}
