//! A safetensors file's framing as the `safetensors` crate reads it for every loader: the 8-byte header
//! length, the JSON header, and the tensor offsets it checks against the data that follows.

#![no_main]

use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;

fuzz_target!(|data: &[u8]| {
    let _ = SafeTensors::read_metadata(data);
    if let Ok(tensors) = SafeTensors::deserialize(data) {
        for (name, view) in tensors.tensors() {
            let elements: usize = view.shape().iter().product();
            assert_eq!(view.data().len(), elements * view.dtype().bitsize() / 8, "{name}");
        }
    }
});
