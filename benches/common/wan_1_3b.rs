//! The Wan 2.1 T2V 1.3B transformer for the benches that need its real shapes: its config from the registry, and
//! random weights made one tensor at a time as the network asks for them.

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use kinetoscope_models::wan::transformer::Config;

/// `configs.transformer` of `models/registry/wan2.1-t2v-1.3b.json`.
pub fn config() -> Config {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/registry/wan2.1-t2v-1.3b.json");
    let registry: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect(path)).expect("registry JSON");
    serde_json::from_value(registry["configs"]["transformer"].clone()).expect("the 1.3B transformer's config")
}

/// Makes each tensor when the network asks for it: normal, σ 0.02, in the dtype asked for.
pub struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, _: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        bail!("the Wan transformer asked for `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
