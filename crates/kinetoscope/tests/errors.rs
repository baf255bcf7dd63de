//! Bad model folders and bad requests fail at load or validation, before any long work, with a message
//! naming what was wrong and what was expected.

mod common;

use std::path::Path;

use common::{copy_tree, model_dir, reference_request, tiny};
use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline};

/// A copy of tiny model a, changed by `edit`, and the error loading it gives.
fn load_error(edit: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&tiny().join("wan21-tiny-a"), dir.path());
    edit(dir.path());
    let err = ModelDir::from_path(dir.path()).and_then(|m| Pipeline::load(&m, &LoadOptions::default()).map(drop));
    err.expect_err("loading should fail").to_string()
}

fn edit_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(path, serde_json::to_string(&json).unwrap()).unwrap();
}

#[test]
fn config_that_does_not_match_the_weights_names_the_tensor_and_shapes() {
    let err = load_error(|m| edit_json(&m.join("transformer/config.json"), "ffn_dim", 72.into()));
    assert!(err.contains("transformer") && err.contains("ffn.net.0.proj"), "{err}");
    assert!(err.contains("72") && err.contains("64"), "expected and found shapes: {err}");
}

#[test]
fn missing_weights_name_the_file() {
    let err = load_error(|m| std::fs::remove_file(m.join("vae/diffusion_pytorch_model.safetensors")).unwrap());
    assert!(err.contains("vae") && err.contains("diffusion_pytorch_model.safetensors"), "{err}");
    let err = load_error(|m| std::fs::remove_file(m.join("tokenizer/tokenizer.json")).unwrap());
    assert!(err.contains("tokenizer.json"), "{err}");
    let err = load_error(|m| std::fs::remove_file(m.join("scheduler/scheduler_config.json")).unwrap());
    assert!(err.contains("scheduler_config.json"), "{err}");
}

#[test]
fn truncated_weights_are_reported_not_read() {
    let err = load_error(|m| {
        let path = m.join("transformer/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(err.contains("transformer") && err.contains("safetensors"), "{err}");
}

#[test]
fn a_tokenizer_larger_than_the_encoder_vocabulary_is_refused() {
    // A tokenizer from another model: more pieces than the encoder has embeddings for.
    let err = load_error(|m| {
        let path = m.join("tokenizer/tokenizer.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_array_mut().unwrap();
        vocab.extend((0..8).map(|i| serde_json::json!([format!("extra{i}"), -30.0])));
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    });
    assert!(err.contains("tokenizer.json") && err.contains("vocab_size"), "{err}");
}

#[test]
fn unreadable_config_names_the_file() {
    let err = load_error(|m| std::fs::write(m.join("vae/config.json"), "{ not json").unwrap());
    assert!(err.contains("vae/config.json"), "{err}");
}

#[test]
fn requests_the_model_cannot_take_are_refused_by_field() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    let ok = reference_request("wan21-tiny-a");
    let check = |request: GenerateRequest, field: &str, hint: &str| {
        let err = pipeline.validate(&request).expect_err(field).to_string();
        assert!(err.contains(field) && err.contains(hint), "{err}");
    };
    check(GenerateRequest { height: 40, ..ok.clone() }, "height", "multiple of 16");
    check(GenerateRequest { width: 0, ..ok.clone() }, "width", "multiple of 16");
    check(GenerateRequest { num_frames: 10, ..ok.clone() }, "num_frames", "4k+1 (nearest: 9 or 13)");
    check(GenerateRequest { steps: 0, ..ok.clone() }, "steps", "1..=1000");
    check(GenerateRequest { guidance_scale: f64::NAN, ..ok.clone() }, "guidance_scale", "finite");
    check(GenerateRequest { shift: Some(-1.0), ..ok.clone() }, "shift", "> 0");
    assert!(pipeline.validate(&ok).is_ok());
    let err = pipeline
        .generate(&GenerateRequest { latents: Some("/nonexistent/noise.safetensors".into()), ..ok })
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/noise.safetensors"), "{err}");
}

/// Sizes no checkpoint has, in each network's config: a clear error naming the component and the key or the
/// tensor whose shape it changed, before any large allocation, never a panic or an overflow.
#[test]
fn absurd_config_sizes_are_refused_before_any_work() {
    // What the error must name besides the component: the key, or the tensor a size shapes.
    let cases: [(&str, &str, serde_json::Value, &str); 10] = [
        ("transformer/config.json", "ffn_dim", 1_000_000_000_000u64.into(), "ffn_dim"),
        ("transformer/config.json", "num_layers", 1_000_000_000u64.into(), "num_layers"),
        ("transformer/config.json", "num_layers", 3.into(), "blocks.2"),
        ("transformer/config.json", "attention_head_dim", 0.into(), "patch_embedding.weight"),
        ("transformer/config.json", "num_attention_heads", u64::MAX.into(), "num_attention_heads"),
        ("transformer/config.json", "patch_size", serde_json::json!([0, 0, 0]), "patch_embedding.weight"),
        ("vae/config.json", "base_dim", 1_000_000_000_000u64.into(), "base_dim"),
        ("vae/config.json", "z_dim", 0.into(), "conv_out.weight"),
        ("text_encoder/config.json", "num_heads", 0.into(), "SelfAttention.q.weight"),
        ("text_encoder/config.json", "d_model", (-1).into(), "expected usize"),
    ];
    let mut wrong = Vec::new();
    for (file, key, value, named) in cases {
        let shown = value.to_string();
        let component = file.split('/').next().unwrap();
        match std::panic::catch_unwind(|| load_error(|m| edit_json(&m.join(file), key, value))) {
            Ok(err) if err.contains(component) && err.contains(named) => {}
            Ok(err) => {
                wrong.push(format!("{file} {key} = {shown}: the error doesn't name {component} and {named}: {err}"))
            }
            Err(_) => wrong.push(format!("{file} {key} = {shown}: panicked")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
