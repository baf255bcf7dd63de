//! A whole safetensors file, truncated or corrupt, as Kinetoscope meets it in a model folder: the text
//! encoder's `model.safetensors` of the tiny test model is replaced by the input, then checked by
//! `kinetoscope::verify` (headers only) and loaded as `Pipeline::load` does (memory-mapped, then the umT5
//! encoder built over it).

#![no_main]

use kinetoscope::{DType, Device};
use kinetoscope_fuzz::ScratchModel;
use kinetoscope_models::umt5::{self, UMT5Encoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ScratchModel::get().with_file("text_encoder/model.safetensors", data, |model| {
        let verified = kinetoscope::verify(model);
        let config: umt5::Config = model.config("text_encoder", "config.json").expect("the tiny model's config");
        let loaded = model
            .var_builder("text_encoder", DType::F32, &Device::Cpu)
            .map_err(|e| e.to_string())
            .and_then(|vb| UMT5Encoder::new(&config, vb).map_err(|e| e.to_string()));
        // What verify passes, loading must not refuse.
        if verified.is_ok() {
            if let Err(e) = loaded {
                panic!("verify passed a file that loading refuses: {e}");
            }
        }
    });
});
