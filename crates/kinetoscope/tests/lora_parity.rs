//! LoRA adapters merged at load against diffusers 0.42.1's `load_lora_weights` + `set_adapters`
//! (`models/tiny/make_lora_fixtures.py`, FIXTURES.md): the whole wan21-tiny-a pipeline with a diffusers/PEFT and an
//! official-Wan adapter at once (0.7 and 0.5), and Wan 2.2 T2V-A14B with a high-noise and a low-noise adapter,
//! each merged into its expert, from the reference runs' noise: the denoised latents within 1e-4 relative error,
//! the frames within 2e-3. Adapters a model can't take are refused by name.

mod common;

use common::{assert_frames, assert_relative, denoised, model_dir, noise_file, reference, reference_request, tiny};
use kinetoscope::{GenerateRequest, LoadOptions, LoraSpec, Pipeline};

fn lora(file: &str, scale: f64, component: &'static str) -> LoraSpec {
    LoraSpec { path: tiny().join("loras").join(file), scale, component }
}

fn load(model: &str, loras: Vec<LoraSpec>) -> kinetoscope::Result<Pipeline> {
    Pipeline::load(&model_dir(model), &LoadOptions { loras, ..LoadOptions::default() })
}

#[test]
fn two_adapters_at_once_generate_as_diffusers_does() {
    let model = "wan21-tiny-a";
    let loras = vec![
        lora("wan21-peft.safetensors", 0.7, "transformer"),
        lora("wan21-official.safetensors", 0.5, "transformer"),
    ];
    let pipeline = load(model, loras).unwrap();
    let applied = pipeline.loras();
    let formats: Vec<(&str, f64)> = applied.iter().map(|l| (l.format, l.scale)).collect();
    assert_eq!(formats, [("diffusers (PEFT)", 0.7), ("original Wan (diffusion_model.)", 0.5)]);
    assert!(applied.iter().all(|l| l.tensors > 0 && l.sha256.len() == 64 && l.unmatched.is_empty()));

    let r = reference("lora", "pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let request = GenerateRequest { latents: Some(noise_file(&r["latents"], dir.path())), ..reference_request(model) };
    assert_relative(
        model,
        "two adapters: final latents",
        &denoised(&pipeline, &request, &mut |_| {}),
        &r["final_latents"],
    );
    assert_frames(model, "two adapters", pipeline.generate(&request).unwrap().frames, &r["frames"]);
}

#[test]
fn each_expert_takes_its_own_adapter() {
    let model = "wan22-t2v-a14b-tiny";
    let loras = vec![
        lora("wan22-a14b-high.safetensors", 1.0, "transformer"),
        lora("wan22-a14b-low.safetensors", 1.0, "transformer_2"),
    ];
    let pipeline = load(model, loras).unwrap();
    let r = reference("lora", "a14b.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let request = GenerateRequest { latents: Some(noise_file(&r["noise"], dir.path())), ..reference_request(model) };
    assert_relative(
        model,
        "expert adapters: final latents",
        &denoised(&pipeline, &request, &mut |_| {}),
        &r["final_latents"],
    );
    assert_frames(model, "expert adapters", pipeline.generate(&request).unwrap().frames, &r["frames"]);
}

#[test]
fn adapters_a_model_cannot_take_are_refused_by_name() {
    let message = |loras: Vec<LoraSpec>| {
        let err = load("wan21-tiny-a", loras).err().expect("refused");
        assert_eq!(err.code(), "lora_invalid", "{err}");
        err.to_string()
    };
    // A key that matches no tensor of the model.
    let err = message(vec![lora("wan21-unmatched.safetensors", 1.0, "transformer")]);
    assert!(err.contains("transformer.blocks.0.attn1.to_qkv.lora_A.weight"), "{err}");
    // An adapter for a low-noise expert the model doesn't have.
    let err = message(vec![lora("wan21-peft.safetensors", 1.0, "transformer_2")]);
    assert!(err.contains("transformer_2") && err.contains("two-expert"), "{err}");
    // Another model's adapter: shapes that don't fit.
    let err = message(vec![lora("wan22-a14b-low.safetensors", 1.0, "transformer")]);
    assert!(err.contains("wan22-a14b-low.safetensors"), "{err}");

    // Allowed, the unmatched keys are listed and the rest applies.
    let options = LoadOptions {
        loras: vec![lora("wan21-unmatched.safetensors", 1.0, "transformer")],
        lora_allow_unmatched: true,
        ..LoadOptions::default()
    };
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &options).unwrap();
    assert_eq!(pipeline.loras()[0].unmatched.len(), 2, "{:?}", pipeline.loras());
}

/// The same adapters given per request, applied at run time on one loaded pipeline, match diffusers as the merged
/// ones do; requests switch adapters (and back to none) without reloading, each giving its own video.
#[test]
fn adapters_per_request_switch_without_reloading() {
    let model = "wan21-tiny-a";
    let pipeline = load(model, Vec::new()).unwrap();
    let r = reference("lora", "pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let plain = GenerateRequest { latents: Some(noise_file(&r["latents"], dir.path())), ..reference_request(model) };
    let loras = vec![
        lora("wan21-peft.safetensors", 0.7, "transformer"),
        lora("wan21-official.safetensors", 0.5, "transformer"),
    ];
    let styled = GenerateRequest { loras, ..plain.clone() };

    let without = denoised(&pipeline, &plain, &mut |_| {});
    assert_relative(
        model,
        "run-time adapters: final latents",
        &denoised(&pipeline, &styled, &mut |_| {}),
        &r["final_latents"],
    );
    assert_eq!(common::max_abs_error(&denoised(&pipeline, &plain, &mut |_| {}), &without), 0.0, "none again: the base");
    assert_relative(model, "run-time adapters again", &denoised(&pipeline, &styled, &mut |_| {}), &r["final_latents"]);

    let elsewhere = GenerateRequest { loras: vec![lora("wan21-peft.safetensors", 1.0, "transformer_2")], ..plain };
    let err = pipeline.generate(&elsewhere).unwrap_err();
    assert!(err.to_string().contains("transformer_2"), "{err}");
}

/// A server switching among many adapters keeps the 16 most recently used read, not every one it ever saw.
#[test]
fn read_adapters_are_bounded() {
    let model = "wan21-tiny-a";
    let pipeline = load(model, Vec::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let request = GenerateRequest { steps: 1, ..reference_request(model) };
    for i in 0..20 {
        let path = dir.path().join(format!("style-{i}.safetensors"));
        std::fs::copy(tiny().join("loras/wan21-peft.safetensors"), &path).unwrap();
        let loras = vec![LoraSpec { path, scale: 0.5, component: "transformer" }];
        denoised(&pipeline, &GenerateRequest { loras, ..request.clone() }, &mut |_| {});
        assert_eq!(pipeline.read_adapters(), (i + 1).min(16));
    }
}
