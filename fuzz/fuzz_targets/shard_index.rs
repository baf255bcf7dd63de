//! A sharded checkpoint's `*.safetensors.index.json`, as `ModelDir::weight_files` and `kinetoscope::verify`
//! read it for the tiny test model's transformer (whose single weight file is the only valid shard).

#![no_main]

use kinetoscope_fuzz::ScratchModel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rel = "transformer/diffusion_pytorch_model.safetensors.index.json";
    ScratchModel::get().with_file(rel, data, |model| {
        if let Ok(shards) = model.weight_files("transformer") {
            // An index names files beside it, never a path elsewhere on the machine.
            let folder = model.component("transformer");
            for shard in &shards {
                assert_eq!(shard.parent(), Some(folder.as_path()), "shard {} is outside its folder", shard.display());
            }
        }
        let _ = kinetoscope::verify(model);
    });
});
