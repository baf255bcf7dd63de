//! The whole pipeline on compact transformer files (`models/tiny/quantized/`, FIXTURES.md "Quantized checkpoints"):
//! wan21-tiny-a's folder with its transformer replaced by a GGUF Q4_K_M file, a scaled-FP8 file or the f32 file of the
//! same network (`--transformer`), from the reference run's noise, against diffusers 0.42.1 holding the files'
//! dequantized weights in f32: denoised latents within 1e-4 relative error, frames within 2e-3. The weights stay
//! compact; the sidecar's record names each file's formats and hash; `--quantize` is for dense weights only.

mod common;

use std::path::PathBuf;

use common::{assert_frames, assert_relative, denoised, model_dir, noise_file, reference, reference_request, tiny};
use kinetoscope::{Error, GenerateRequest, LoadOptions, Pipeline, Quantization};

fn file(name: &str) -> PathBuf {
    tiny().join("quantized").join(name)
}

fn load(options: LoadOptions) -> kinetoscope::Result<Pipeline> {
    Pipeline::load(&model_dir("wan21-tiny-a"), &options)
}

#[test]
fn compact_files_generate_as_diffusers_does() {
    let r = reference("quantized", "pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let request =
        GenerateRequest { latents: Some(noise_file(&r["latents"], dir.path())), ..reference_request("wan21-tiny-a") };
    for (name, variant, format) in [
        ("wan21-tiny-q-Q4_K_M.gguf", "Q4_K_M", "Q4_K"),
        ("wan21-tiny-q-fp8-scaled.safetensors", "fp8_scaled", "F8_E4M3 (scaled)"),
        ("wan21-tiny-q.safetensors", "f32", "F32"),
    ] {
        let pipeline = load(LoadOptions { transformer: Some(file(name)), ..LoadOptions::default() }).unwrap();
        let [weights] = pipeline.weights() else { panic!("one transformer") };
        assert_eq!(weights.file.as_deref(), Some(file(name).as_path()));
        assert_eq!(weights.sha256.as_ref().map(String::len), Some(64));
        assert!(weights.format.contains(format), "{name}: {}", weights.format);
        let what = format!("{variant}: final latents");
        assert_relative(
            name,
            &what,
            &denoised(&pipeline, &request, &mut |_| {}),
            &r[&format!("final_latents_{variant}")],
        );
        assert_frames(name, variant, pipeline.generate(&request).unwrap().frames, &r[&format!("frames_{variant}")]);
    }
}

/// `--quantize` holds a dense file's linear weights compact (close to the dense video), and is refused for a file
/// already stored compact.
#[test]
fn dense_weights_quantize_on_load_and_compact_files_refuse_it() {
    let r = reference("quantized", "pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let request =
        GenerateRequest { latents: Some(noise_file(&r["latents"], dir.path())), ..reference_request("wan21-tiny-a") };
    let options = LoadOptions {
        transformer: Some(file("wan21-tiny-q.safetensors")),
        quantize: Some(Quantization::Q8_0),
        ..LoadOptions::default()
    };
    let pipeline = load(options.clone()).unwrap();
    assert_eq!(pipeline.weights()[0].quantized_on_load.as_deref(), Some("q8_0"));
    let err = common::relative_error(&denoised(&pipeline, &request, &mut |_| {}), &r["final_latents_f32"]);
    assert!(err < 0.03, "q8_0 on load: relative error {err} against the f32 weights' video");

    let err = load(LoadOptions { transformer: Some(file("wan21-tiny-q-Q8_0.gguf")), ..options }).err().unwrap();
    assert!(matches!(err, Error::InvalidRequest { field: "quantize", .. }), "{err}");
    assert!(err.to_string().contains("wan21-tiny-q-Q8_0.gguf") && err.to_string().contains("Q8_0"), "{err}");
}
