//! A single-file transformer checkpoint (official Wan layout, or ComfyUI's with `model.diffusion_model.` and bf16)
//! standing in for a model folder's `transformer/` (`LoadOptions::transformer`, `--transformer`): the same
//! weights give the same video as the folder, bit for bit, LoRA adapters apply to it as to the folder, and a file
//! for a network the model doesn't have is refused by name. (`models/tiny/make_single_file_fixtures.py`; the
//! file's own parity with diffusers' `from_single_file` is `-p kinetoscope-models --test single_file_parity`.)

mod common;

use std::path::PathBuf;

use common::{denoised, model_dir, reference_request, tiny};
use kinetoscope::{GenerateRequest, LoadOptions, LoraSpec, Pipeline};

fn file(name: &str) -> PathBuf {
    tiny().join("single_file").join(name)
}

fn latents(options: LoadOptions) -> candle_core::Tensor {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &options).unwrap();
    let request = GenerateRequest { steps: 2, seed: 7, ..reference_request("wan21-tiny-a") };
    denoised(&pipeline, &request, &mut |_| {})
}

#[test]
fn a_single_file_transformer_gives_the_folders_video() {
    let folder = latents(LoadOptions::default());
    let single = latents(LoadOptions { transformer: Some(file("wan21-tiny-a.safetensors")), ..LoadOptions::default() });
    assert_eq!(common::max_abs_error(&single, &folder), 0.0);

    let lora = LoraSpec { path: tiny().join("loras/wan21-official.safetensors"), scale: 0.5, component: "transformer" };
    let on_folder = latents(LoadOptions { loras: vec![lora.clone()], ..LoadOptions::default() });
    let on_file = latents(LoadOptions {
        transformer: Some(file("wan21-tiny-a.safetensors")),
        loras: vec![lora],
        ..LoadOptions::default()
    });
    assert_eq!(common::max_abs_error(&on_file, &on_folder), 0.0);
    assert!(common::max_abs_error(&on_folder, &folder) > 1e-3, "the adapter changes the video");

    // ComfyUI's layout in bf16: the folder's weights rounded, so close but not equal.
    let comfy = latents(LoadOptions {
        transformer: Some(file("wan21-tiny-a-comfyui-bf16.safetensors")),
        ..LoadOptions::default()
    });
    let err = common::relative_error(&comfy, &folder);
    assert!(err < 5e-2, "bf16 weights: relative error {err}");
}

#[test]
fn a_file_for_a_network_the_model_lacks_is_refused() {
    let refuse = |options: LoadOptions| Pipeline::load(&model_dir("wan21-tiny-a"), &options).err().expect("refused");
    let err = refuse(LoadOptions { transformer_2: Some(file("wan21-tiny-a.safetensors")), ..LoadOptions::default() });
    assert!(err.to_string().contains("transformer_2"), "{err}");
    // An image-to-video transformer in a text-to-video folder: its 36 input channels don't fit the VAE's 16 ...
    // unless the folder is image-to-video; here the folder's text encoder and VAE are tiny-a's, so the shapes
    // name the mismatch.
    let err = refuse(LoadOptions { transformer: Some(file("wan21-flf2v-tiny.safetensors")), ..LoadOptions::default() });
    assert!(err.to_string().contains("wan21-flf2v-tiny.safetensors") || err.to_string().contains("image"), "{err}");
}

/// `--vae FILE`: the folder's VAE as one file in the official Wan layout gives the folder's video bit for bit;
/// a VAE file of another structure than the folder's config is refused, at load and by `verify_with`.
#[test]
fn a_single_file_vae_gives_the_folders_video() {
    let request = GenerateRequest { steps: 2, seed: 7, ..reference_request("wan21-tiny-a") };
    let generate = |options: LoadOptions| {
        let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &options).unwrap();
        let components: Vec<&str> = pipeline.weights().unwrap().iter().map(|w| w.component).collect();
        (pipeline.generate(&request).unwrap().frames, components)
    };
    let (folder, _) = generate(LoadOptions::default());
    let vae = file("wan21-tiny-a-vae.safetensors");
    let (single, components) = generate(LoadOptions { vae: Some(vae.clone()), ..LoadOptions::default() });
    assert_eq!(components, ["transformer", "vae"]);
    assert_eq!(single, folder);

    let options = LoadOptions { vae: Some(vae), ..LoadOptions::default() };
    let report = kinetoscope::verify_with(&model_dir("wan21-tiny-a"), &options).unwrap();
    assert!(report.to_string().contains("wan21-tiny-a-vae.safetensors"), "{report}");

    let other = LoadOptions { vae: Some(file("wan21-tiny-a-vae-res2.safetensors")), ..LoadOptions::default() };
    let err = Pipeline::load(&model_dir("wan21-tiny-a"), &other).err().unwrap().to_string();
    assert!(err.contains("wan21-tiny-a-vae-res2.safetensors"), "{err}");
    let err = kinetoscope::verify_with(&model_dir("wan21-tiny-a"), &other).unwrap_err().to_string();
    assert!(err.contains("wan21-tiny-a-vae-res2.safetensors"), "{err}");
}
