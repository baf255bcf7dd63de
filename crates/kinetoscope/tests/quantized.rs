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
        let [weights] = &pipeline.weights().unwrap()[..] else { panic!("one transformer") };
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
    assert_eq!(pipeline.weights().unwrap()[0].quantized_on_load.as_deref(), Some("q8_0"));
    let err = common::relative_error(&denoised(&pipeline, &request, &mut |_| {}), &r["final_latents_f32"]);
    assert!(err < 0.03, "q8_0 on load: relative error {err} against the f32 weights' video");

    let err = load(LoadOptions { transformer: Some(file("wan21-tiny-q-Q8_0.gguf")), ..options }).err().unwrap();
    assert!(matches!(err, Error::InvalidRequest { field: "quantize", .. }), "{err}");
    assert!(err.to_string().contains("wan21-tiny-q-Q8_0.gguf") && err.to_string().contains("Q8_0"), "{err}");
}

/// `--text-encoder-weights`: the folder's umT5 tensors as one safetensors file give the folder's video bit for bit;
/// as a GGUF file under llama.cpp's T5 names with its matrices in Q8_0 (city96's layout), nearly; a Wan GGUF is
/// refused as a text encoder.
#[test]
fn text_encoder_weights_from_one_file() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};

    let dir = tempfile::tempdir().unwrap();
    let folder = tiny().join("wan21-tiny-a/text_encoder/model.safetensors");
    let tensors = candle_core::safetensors::load(&folder, &candle_core::Device::Cpu).unwrap();
    let same = dir.path().join("umt5.safetensors");
    candle_core::safetensors::save(&tensors, &same).unwrap();

    // transformers' names → llama.cpp's, as its T5 converter writes them.
    let llama = |name: &str| -> String {
        if name == "shared.weight" {
            return "token_embd.weight".into();
        }
        if name == "encoder.final_layer_norm.weight" {
            return "enc.output_norm.weight".into();
        }
        let rest = name.strip_prefix("encoder.block.").unwrap();
        let (block, part) = rest.split_once('.').unwrap();
        let part = match part {
            "layer.0.layer_norm.weight" => "attn_norm",
            "layer.0.SelfAttention.q.weight" => "attn_q",
            "layer.0.SelfAttention.k.weight" => "attn_k",
            "layer.0.SelfAttention.v.weight" => "attn_v",
            "layer.0.SelfAttention.o.weight" => "attn_o",
            "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b",
            "layer.1.layer_norm.weight" => "ffn_norm",
            "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate",
            "layer.1.DenseReluDense.wi_1.weight" => "ffn_up",
            "layer.1.DenseReluDense.wo.weight" => "ffn_down",
            other => panic!("a tensor this test doesn't map: {other}"),
        };
        format!("enc.blk.{block}.{part}.weight")
    };
    let quantized: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t.to_dtype(candle_core::DType::F32).unwrap();
            let q8 = t.rank() == 2 && t.dim(1).unwrap() % 32 == 0 && !name.contains("relative_attention_bias");
            let dtype = if q8 { GgmlDType::Q8_0 } else { GgmlDType::F32 };
            (llama(name), QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();
    let write = |path: &std::path::Path, architecture: &str| {
        let mut file = std::fs::File::create(path).unwrap();
        let architecture = gguf_file::Value::String(architecture.into());
        let tensors: Vec<(&str, &QTensor)> = quantized.iter().map(|(n, q)| (n.as_str(), q)).collect();
        gguf_file::write(&mut file, &[("general.architecture", &architecture)], &tensors).unwrap();
    };
    let gguf = dir.path().join("umt5-Q8_0.gguf");
    write(&gguf, "t5encoder");
    assert!(quantized.iter().any(|(_, q)| q.dtype() == GgmlDType::Q8_0));

    let r = reference("quantized", "pipeline.safetensors");
    let request =
        GenerateRequest { latents: Some(noise_file(&r["latents"], dir.path())), ..reference_request("wan21-tiny-a") };
    let with = |file: Option<PathBuf>| {
        load(LoadOptions { text_encoder_weights: file, ..LoadOptions::default() }).map(|p| {
            let weights: Vec<&str> = p.weights().unwrap().iter().map(|w| w.component).collect();
            (denoised(&p, &request, &mut |_| {}), weights)
        })
    };
    let (folder_latents, _) = with(None).unwrap();
    let (file_latents, weights) = with(Some(same)).unwrap();
    assert_eq!(weights, ["transformer", "text_encoder"]);
    assert_eq!(common::max_abs_error(&file_latents, &folder_latents), 0.0);
    let (gguf_latents, _) = with(Some(gguf)).unwrap();
    let err = common::relative_error(&gguf_latents, &folder_latents);
    assert!(err > 0.0 && err < 0.05, "Q8_0 text encoder: relative error {err}");

    let wan = dir.path().join("wan.gguf");
    write(&wan, "wan");
    let err = with(Some(wan)).err().unwrap().to_string();
    assert!(err.contains("wan.gguf") && err.contains("not a T5 encoder"), "{err}");
}
