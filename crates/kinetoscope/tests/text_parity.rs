//! Prompt handling against `WanPipeline.encode_prompt`: cleaning, token ids (truncation included) and the
//! zero-padded text states.

mod common;

use candle_core::{DType, Device};
use common::{model_dir, reference, relative_error, settings, MODELS};
use kinetoscope::{clean_prompt, TextEncoder, TextEncoderPlacement};

/// In every placement of the encoder: where it lives changes where it runs, not what it computes.
#[test]
fn prompts_encode_like_diffusers() {
    let placements = [TextEncoderPlacement::Resident, TextEncoderPlacement::Offload, TextEncoderPlacement::Cpu];
    for (model, placement) in MODELS.into_iter().flat_map(|m| placements.map(|p| (m, p))) {
        let s = settings(model);
        let max_len = s["max_sequence_length"].as_u64().unwrap() as usize;
        let encoder = TextEncoder::load(&model_dir(model), DType::F32, &Device::Cpu, placement).unwrap();
        let r = reference(model, "text.safetensors");
        for (name, prompt) in
            [("prompt", "prompt"), ("negative", "negative_prompt"), ("long", "long_prompt"), ("messy", "messy_prompt")]
        {
            let prompt = s[prompt].as_str().unwrap();
            let ids: Vec<u32> = encoder.token_ids(prompt, max_len).unwrap();
            let want: Vec<i64> = r[&format!("{name}_ids")].to_vec1().unwrap();
            assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want, "{model} {name} ids");
            let states = encoder.encode(&[prompt], max_len).unwrap().remove(0);
            let err = relative_error(&states, &r[&format!("{name}_embeds")]);
            println!("{model} {placement:?} {name}: {} tokens, relative error {err:.2e}", ids.len());
            assert!(err < 1e-4, "{model} {placement:?} {name}: relative error {err}");
        }
    }
}

#[test]
fn messy_prompt_is_cleaned_like_diffusers() {
    let s = settings("wan21-tiny-a");
    assert_eq!(clean_prompt(s["messy_prompt"].as_str().unwrap()), s["messy_prompt_cleaned"].as_str().unwrap());
}
