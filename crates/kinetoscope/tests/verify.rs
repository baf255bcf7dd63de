//! `registry::verify` on the tiny models and on broken copies of them: each fault is reported naming the file
//! and the tensor, and the check reads safetensors headers only.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::copy_tree;
use kinetoscope::{verify, Error, ModelDir};
use safetensors::tensor::{Metadata, TensorInfo};

fn tiny(name: &str) -> PathBuf {
    common::tiny().join(name)
}

fn broken_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join(name);
    copy_tree(&tiny(name), &root);
    (tmp, root)
}

fn verify_path(root: &Path) -> kinetoscope::Result<kinetoscope::VerifyReport> {
    verify(&ModelDir::from_path(root)?)
}

#[test]
fn both_tiny_models_verify_as_the_wan21_family() {
    for name in ["wan21-tiny-a", "wan21-tiny-b"] {
        let report = verify_path(&tiny(name)).unwrap();
        assert!(report.model.is_none(), "{name} is no registry entry");
        assert_eq!(report.family, "Wan 2.1 text-to-video");
        let components: Vec<_> = report.weights.iter().map(|w| w.component).collect();
        assert_eq!(components, ["text_encoder", "transformer", "vae"]);
        assert!(report.weights.iter().all(|w| w.tensors > 0 && w.parameters > 0), "{report}");
        assert!(report.to_string().contains("unknown model"), "{report}");
    }
    let b = verify_path(&tiny("wan21-tiny-b")).unwrap();
    let transformer = &b.weights[1];
    assert_eq!((transformer.files, transformer.dtypes.as_slice()), (4, ["bf16".to_string()].as_slice()));
}

#[test]
fn both_tiny_ti2v_models_verify_as_the_wan22_family() {
    for name in ["wan22-ti2v-tiny-a", "wan22-ti2v-tiny-b"] {
        let report = verify_path(&tiny(name)).unwrap();
        assert!(report.model.is_none(), "{name} is no registry entry");
        assert_eq!(report.family, "Wan 2.2 text- and image-to-video");
        assert!(report.weights.iter().all(|w| w.tensors > 0 && w.parameters > 0), "{report}");
    }
}

/// Wan 2.2 A14B's two transformers (a `boundary_ratio`) are refused by name before any weight is read.
#[test]
fn a_two_expert_pipeline_is_refused_by_field() {
    let (_tmp, root) = broken_copy("wan22-ti2v-tiny-a");
    let index_path = root.join("model_index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["boundary_ratio"] = 0.875.into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = verify_path(&root).unwrap_err().to_string();
    assert!(err.contains("boundary_ratio 0.875") && err.contains("model_index.json"), "{err}");
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    let file = root.join("transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.insert("proj_out.weight".into(), Tensor::zeros((64, 63), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = verify_path(&root).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::Weights { component: "transformer", .. }), "{text}");
    assert!(text.contains("proj_out.weight") && text.contains("[64, 63]") && text.contains("[64, 64]"), "{text}");
    assert!(text.contains("diffusion_pytorch_model.safetensors"), "{text}");
}

#[test]
fn a_missing_tensor_is_named() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    let file = root.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    tensors.remove("post_quant_conv.bias").unwrap();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let text = verify_path(&root).unwrap_err().to_string();
    assert!(text.contains("post_quant_conv.bias") && text.contains("missing"), "{text}");
}

#[test]
fn a_missing_shard_is_named() {
    let (_tmp, root) = broken_copy("wan21-tiny-b");
    let shard = root.join("transformer/diffusion_pytorch_model-00003-of-00004.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let err = verify_path(&root).unwrap_err();
    assert!(matches!(&err, Error::MissingFile { path, .. } if *path == shard), "{err}");
}

#[test]
fn a_truncated_file_is_named() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    let file = root.join("vae/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 100).unwrap();
    let err = verify_path(&root).unwrap_err();
    let text = err.to_string();
    assert!(matches!(&err, Error::Weights { component: "vae", path, .. } if *path == file), "{text}");
    assert!(text.contains("truncated"), "{text}");
}

#[test]
fn configs_that_disagree_are_named() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    let config_path = root.join("vae/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"z_dim\": 16", "\"z_dim\": 8");
    std::fs::write(&config_path, config).unwrap();
    let err = verify_path(&root).unwrap_err();
    assert!(matches!(err, Error::Config { .. }) && err.to_string().contains("z_dim 8"), "{err}");
}

#[test]
fn a_missing_tokenizer_is_named() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    std::fs::remove_file(root.join("tokenizer/tokenizer.json")).unwrap();
    let err = verify_path(&root).unwrap_err();
    assert!(matches!(&err, Error::MissingFile { path, .. } if path.ends_with("tokenizer/tokenizer.json")), "{err}");
}

#[test]
fn an_unsupported_dtype_is_named() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    let file = root.join("transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let bias = tensors["proj_out.bias"].to_dtype(DType::I64).unwrap();
    tensors.insert("proj_out.bias".into(), bias);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let text = verify_path(&root).unwrap_err().to_string();
    assert!(text.contains("proj_out.bias") && text.contains("I64"), "{text}");
}

/// The transformer's weights rewritten as a sparse file with a feed-forward width of 2^24, 16 GB of (absent)
/// data: verify passes without reading or allocating it, which loading the weights could not.
#[test]
fn verify_reads_headers_only() {
    let (_tmp, root) = broken_copy("wan21-tiny-a");
    let ffn_dim = 1usize << 24;
    let config_path = root.join("transformer/config.json");
    let config =
        std::fs::read_to_string(&config_path).unwrap().replace("\"ffn_dim\": 64", &format!("\"ffn_dim\": {ffn_dim}"));
    std::fs::write(&config_path, config).unwrap();

    let file = root.join("transformer/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let mut infos = Vec::new();
    let mut offset = 0;
    for (name, tensor) in tensors {
        let mut shape = tensor.dims().to_vec();
        if name.ends_with("ffn.net.0.proj.weight") || name.ends_with("ffn.net.0.proj.bias") {
            shape[0] = ffn_dim;
        } else if name.ends_with("ffn.net.2.weight") {
            shape[1] = ffn_dim;
        }
        let bytes = shape.iter().product::<usize>() * 4;
        infos
            .push((name, TensorInfo { dtype: safetensors::Dtype::F32, shape, data_offsets: (offset, offset + bytes) }));
        offset += bytes;
    }
    let header = serde_json::to_vec(&Metadata::new(None, infos).unwrap()).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    std::fs::write(&file, &bytes).unwrap();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len((bytes.len() + offset) as u64).unwrap();
    assert!(offset > 16 << 30);

    let report = verify_path(&root).unwrap();
    assert!(report.weights[1].parameters > (4 << 30), "{report}");
}

/// A mixed set: single files standing in for the folder's transformer and text encoder are checked by their
/// headers in their place (their formats reported), and a file whose network doesn't fit the folder is refused
/// naming it.
#[test]
fn a_set_with_single_files_verifies_by_their_headers() {
    let quantized = common::tiny().join("quantized");
    let options = kinetoscope::LoadOptions {
        transformer: Some(quantized.join("wan21-tiny-q-Q4_K_M.gguf")),
        text_encoder_weights: Some(quantized.join("umt5-tiny-Q8_0.gguf")),
        ..Default::default()
    };
    let report = kinetoscope::verify_with(&ModelDir::from_path(&tiny("wan21-tiny-a")).unwrap(), &options).unwrap();
    let [text, transformer, _vae] = report.weights.as_slice() else { panic!("{report}") };
    assert_eq!(transformer.file, options.transformer);
    assert!(transformer.dtypes.contains(&"Q4_K".to_string()) && transformer.dtypes.contains(&"Q6_K".to_string()));
    assert_eq!(text.file, options.text_encoder_weights);
    assert!(text.dtypes.contains(&"Q8_0".to_string()), "{report}");
    assert!(report.to_string().contains("wan21-tiny-q-Q4_K_M.gguf"), "{report}");

    let i2v = kinetoscope::LoadOptions {
        transformer: Some(common::tiny().join("single_file/wan21-i2v-tiny.safetensors")),
        ..Default::default()
    };
    let err = kinetoscope::verify_with(&ModelDir::from_path(&tiny("wan21-tiny-a")).unwrap(), &i2v).unwrap_err();
    assert!(err.to_string().contains("wan21-i2v-tiny") || err.to_string().contains("in_channels"), "{err}");
}
