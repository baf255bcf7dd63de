//! The `turbo` preset: a distilled model's recipe (`models/distilled.json`: 4 steps of flow-match Euler over sigmas
//! 1, 0.75, 0.5, 0.25 at shift 5, no guidance), refused on a model with no distillation, run with a distill LoRA
//! merged at load or given per request (known by its file's name). The schedule's parity with diffusers is
//! `few_step_parity`.

mod common;

use common::{denoised, model_dir, reference_request, tiny};
use kinetoscope::{Error, GenerateRequest, LoadOptions, LoraSpec, Pipeline, Preset};

fn turbo() -> GenerateRequest {
    let mut request = GenerateRequest { steps: 2, ..reference_request("wan21-tiny-a") };
    Preset::Turbo.apply(&mut request);
    request
}

/// A copy of a tiny adapter under a distill LoRA's name.
fn distill_lora(dir: &std::path::Path) -> LoraSpec {
    let path = dir.join("wan21_lightx2v_cfg_step_distill_lora_rank4.safetensors");
    std::fs::copy(tiny().join("loras/wan21-peft.safetensors"), &path).unwrap();
    LoraSpec { path, scale: 1.0, component: "transformer" }
}

#[test]
fn turbo_needs_distilled_weights() {
    let request = turbo();
    assert_eq!((request.steps, request.guidance_scale, request.distilled), (4, 1.0, true));
    let plain = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    assert!(plain.distillation(&request).is_none());
    let err = plain.generate(&request).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest { field: "preset", .. }), "{err}");
    assert!(err.to_string().contains("distill LoRA") && err.to_string().contains("--sigmas"), "{err}");

    // Per request, on the same pipeline: the adapter makes the request a distilled one.
    let dir = tempfile::tempdir().unwrap();
    let lora = distill_lora(dir.path());
    let with_lora = GenerateRequest { loras: vec![lora.clone()], ..request.clone() };
    assert!(plain.distillation(&with_lora).is_some());
    let mut steps = 0;
    denoised(&plain, &with_lora, &mut |_| steps += 1);
    assert_eq!(steps, 4);

    // Merged at load: every request of the pipeline is.
    let merged =
        Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions { loras: vec![lora], ..LoadOptions::default() })
            .unwrap();
    let recipe = merged.distillation(&request).expect("a distill LoRA merged");
    assert_eq!(recipe.schedule, kinetoscope::scheduler::Schedule::Sigmas(vec![1.0, 0.75, 0.5, 0.25]));
    let a = denoised(&merged, &request, &mut |_| {});
    let b = denoised(&plain, &with_lora, &mut |_| {});
    assert!(common::relative_error(&a, &b) < 1e-5, "merged and per-request adapters give the same video");
}

/// On a FastWan model (known by its repository id, here the tiny model in a Hugging Face cache under that name),
/// turbo runs the model's own recipe, FastVideo's 3 DMD steps, not the default's 4 Euler ones.
#[test]
fn turbo_runs_a_fastwan_models_dmd_steps() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = cache.path().join("models--FastVideo--FastWan2.1-T2V-1.3B-Diffusers/snapshots/0123");
    common::copy_tree(&tiny().join("wan21-tiny-a"), &snapshot);
    let dir = kinetoscope::ModelDir::from_hf_cache("FastVideo/FastWan2.1-T2V-1.3B-Diffusers", cache.path()).unwrap();
    let pipeline = Pipeline::load(&dir, &LoadOptions::default()).unwrap();
    let request = turbo();
    let recipe = pipeline.distillation(&request).expect("FastWan is distilled");
    assert_eq!(recipe.schedule, kinetoscope::scheduler::Schedule::Dmd(vec![1000.0, 757.0, 522.0]));
    let ran = pipeline.distilled_request(&request);
    assert_eq!((ran.steps, ran.schedule.as_ref()), (3, Some(&recipe.schedule)));
    let mut steps = 0;
    denoised(&pipeline, &request, &mut |_| steps += 1);
    assert_eq!(steps, 3);
    // An explicit schedule is the user's: kept.
    let explicit =
        GenerateRequest { schedule: Some(kinetoscope::scheduler::Schedule::Sigmas(vec![1.0, 0.5])), ..request };
    assert_eq!(pipeline.distilled_request(&explicit).schedule, explicit.schedule);
}
