//! Building blocks shared by every model: one attention, so that a faster kernel replaces it in one place, and
//! one linear layer, which applies LoRA adapters at run time.
//!
//! # Adapters at run time
//!
//! [`crate::lora::merged_var_builder`] merges adapters into the weights as a network loads: a step then costs what
//! it costs without them, but changing adapters means loading the network again. The run-time path leaves the
//! weights alone: a network built of [`Linear`] layers takes the [`Adapters`] a generation runs with as an
//! argument of its forward pass, and each layer they change adds `x·Aᵀ·Bᵀ` (two thin products, the adapters'
//! pairs concatenated along their ranks, each `B` scaled by its adapter's scale and α / r), and `x·Δᵀ` for a full
//! weight delta, and uses its bias with the bias deltas added. A layer they leave alone, and every layer when
//! the set is empty, runs exactly as without adapters.
//!
//! An [`AdapterCache`], one per network, prepares each adapter once (its factors moved to the network's device
//! and each layer's dtype) and keeps them while the adapter (its `Arc`) lives, so switching between adapters
//! from one generation to the next costs a concatenation of small tensors per adapted layer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::compact::{Compact, CompactWeight};
use crate::lora::{Adapter, ScaledAdapter};

/// Queries are processed in blocks so that the score matrix never holds more than this many elements
/// per (batch, head): attention over a long video sequence must not materialize L×L at once.
const MAX_SCORE_ELEMENTS: usize = 1 << 24;

/// Scaled dot-product attention, `softmax(q·kᵀ·scale + bias)·v`, over `[batch, heads, len, head_dim]`.
///
/// `bias`, when given, is added to the scores and must broadcast to `[batch, heads, q_len, k_len]`
/// (umT5's relative position bias). The softmax runs in f32 whatever the input dtype, as PyTorch's
/// SDPA accumulates it.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    // On the GPU in bf16 (the Wan transformer's attentions, which have no bias): the project's flash attention,
    // which never materializes the scores.
    #[cfg(feature = "cuda")]
    if bias.is_none() && kinetoscope_kernels::kernels_enabled() && kinetoscope_kernels::flash_attention_supports(q) {
        return kinetoscope_kernels::flash_attention(q, k, v, scale);
    }
    let block = MAX_SCORE_ELEMENTS / k.dim(2)?.max(1);
    attention_in_blocks(q, k, v, bias, scale, block)
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
    block: usize,
) -> Result<Tensor> {
    let q_len = q.dim(2)?;
    let block = block.clamp(1, q_len.max(1));
    let k_t = k.transpose(2, 3)?.contiguous()?;
    let v = v.contiguous()?;
    let mut outs = Vec::with_capacity(q_len.div_ceil(block));
    for start in (0..q_len).step_by(block) {
        let len = block.min(q_len - start);
        let q_blk = q.narrow(2, start, len)?.contiguous()?;
        let mut scores = (q_blk.matmul(&k_t)? * scale)?.to_dtype(candle_core::DType::F32)?;
        if let Some(bias) = bias {
            let bias = if bias.dim(2)? == 1 { bias.clone() } else { bias.narrow(2, start, len)? };
            scores = scores.broadcast_add(&bias.to_dtype(candle_core::DType::F32)?)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outs.push(probs.matmul(&v)?);
    }
    Tensor::cat(&outs, 2)
}

/// A linear layer `y = x·Wᵀ + b` that knows the name it was loaded under (`blocks.0.attn1.to_q`, the network's own
/// name, which adapters are read against), so that [`Adapters`] find it at run time. Its weight is dense, or kept
/// compact and dequantized as the layer runs ([`crate::compact`]).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    name: String,
    /// The dtype it computes in: the weight's, or for a compact weight the `VarBuilder`'s it was loaded from.
    dtype: DType,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Dense(Tensor),
    Compact(CompactWeight),
}

impl Linear {
    /// `weight` `[out, in]` and `bias` `[out]` under `vb` (named by `vb`'s prefix: build the network from a
    /// `VarBuilder` at its root, where adapters and compact weights name its layers); the weight from `compact`
    /// when it holds this layer's.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder, compact: &Compact) -> Result<Self> {
        let name = vb.prefix();
        let weight = match compact.linear(&name, out_dim, in_dim, vb.device())? {
            Some(weight) => LinearWeight::Compact(weight),
            None => LinearWeight::Dense(vb.get((out_dim, in_dim), "weight")?),
        };
        Ok(Self { weight, bias: Some(vb.get(out_dim, "bias")?), name, dtype: vb.dtype() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            LinearWeight::Dense(weight) => weight.dims2(),
            LinearWeight::Compact(weight) => weight.dims(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.weight {
            LinearWeight::Dense(weight) => weight.device().clone(),
            LinearWeight::Compact(weight) => weight.device(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The compact weight, if it is kept compact.
    pub fn compact(&self) -> Option<&CompactWeight> {
        match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Compact(weight) => Some(weight),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x` `[…, in]` → `[…, out]`, with what `adapters` change in this layer.
    pub fn forward(&self, x: &Tensor, adapters: &Adapters) -> Result<Tensor> {
        let (y, bias) = self.forward_unbiased(x, adapters)?;
        match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// [`Self::forward`] without the bias, and the bias to add (for a kernel that fuses the addition with what
    /// follows).
    pub fn forward_unbiased<'a>(&'a self, x: &Tensor, adapters: &'a Adapters) -> Result<(Tensor, Option<&'a Tensor>)> {
        let product = match &self.weight {
            LinearWeight::Dense(weight) => x.apply(&candle_nn::Linear::new(weight.clone(), None))?,
            LinearWeight::Compact(weight) => x.apply(&candle_nn::Linear::new(weight.dequantize(self.dtype)?, None))?,
        };
        match adapters.layer(&self.name) {
            None => Ok((product, self.bias())),
            Some(adapted) => Ok((adapted.add_to(x, product)?, adapted.bias.as_ref().or(self.bias()))),
        }
    }
}

/// What the active adapters change in one layer, ready to apply: every adapter's pair, weight delta and bias
/// delta at its scale, combined.
#[derive(Debug)]
struct AdaptedLinear {
    /// `x ↦ x·Aᵀ` and `h ↦ h·Bᵀ`: the adapters' `A`s `[r_i, in]` stacked along their ranks, `[Σ r_i, in]`, and their
    /// `B`s times their scales side by side, `[out, Σ r_i]`, in the layer's dtype.
    pair: Option<(candle_nn::Linear, candle_nn::Linear)>,
    /// `x ↦ x·Δᵀ`: the full weight deltas times their adapters' scales, summed in f32, in the layer's dtype.
    weight_delta: Option<candle_nn::Linear>,
    /// The layer's bias plus the bias deltas times their adapters' scales, summed in f32, in the bias's dtype.
    bias: Option<Tensor>,
}

impl AdaptedLinear {
    /// `y` (the layer's `x·Wᵀ`) plus the adapters' changes to it.
    fn add_to(&self, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        if let Some((down, up)) = &self.pair {
            y = (y + x.apply(down)?.apply(up)?)?;
        }
        if let Some(delta) = &self.weight_delta {
            y = (y + x.apply(delta)?)?;
        }
        Ok(y)
    }
}

/// The adapters one generation runs with, prepared for one network by its [`AdapterCache`]: per layer they
/// change, what they change, combined at their scales. Cheap to clone; empty ([`Adapters::none`]), the network is
/// its base model.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    /// The cache that made them (0 for none).
    owner: u64,
    layers: Arc<HashMap<String, AdaptedLinear>>,
}

impl Adapters {
    /// No adapters: every layer as it was loaded.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    fn layer(&self, name: &str) -> Option<&AdaptedLinear> {
        if self.layers.is_empty() {
            return None;
        }
        self.layers.get(name)
    }
}

/// One layer's part of one adapter at scale 1, on the network's device.
#[derive(Debug)]
struct PreparedLayer {
    pair: Option<PreparedPair>,
    /// The full weight delta `[out, in]`, in f32.
    weight_delta: Option<Tensor>,
    /// The bias delta `[out]` (full deltas and the pair's up-projection bias at its scale), in f32.
    bias_delta: Option<Tensor>,
}

/// A low-rank pair on the network's device.
#[derive(Debug)]
struct PreparedPair {
    /// `A` `[r, in]`, in the layer's dtype.
    down: Tensor,
    /// `B` `[out, r]`, in the file's dtype: scaled (and rounded to the layer's dtype) once the adapter's scale is
    /// known, by [`combine`].
    up: Tensor,
    /// The pair's own scale (α / r where the file did not fold it into the factors).
    scale: f64,
}

/// One adapter on the network's device: its layers by name.
#[derive(Debug)]
struct PreparedAdapter {
    layers: HashMap<String, PreparedLayer>,
}

/// One network's adapters prepared for its device and its layers' dtypes, each once for as long as it lives.
///
/// Entries are keyed by the adapter's `Arc` (its identity, not its contents) and dropped once nothing else
/// holds the adapter; the lock is held only while a set is made ([`Self::activate`]), never during a step.
#[derive(Debug)]
pub struct AdapterCache {
    id: u64,
    prepared: Mutex<Vec<(Weak<Adapter>, Arc<PreparedAdapter>)>>,
}

impl Default for AdapterCache {
    fn default() -> Self {
        Self::new()
    }
}

impl AdapterCache {
    pub fn new() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), prepared: Mutex::new(Vec::new()) }
    }

    /// `adapters` at their scales for the network whose adapter-aware layers are `layers` (the same at every call:
    /// the cache is that network's): each adapter prepared (or taken from the cache), then combined per layer.
    /// Fails, naming the tensor, when an adapter changes a tensor that is not one of `layers`' weights or biases,
    /// or whose shape differs from the layer's.
    pub fn activate<'a>(
        &self,
        adapters: &[ScaledAdapter],
        layers: impl IntoIterator<Item = &'a Linear>,
    ) -> Result<Adapters> {
        if adapters.is_empty() {
            return Ok(Adapters::none());
        }
        let layers: HashMap<&str, &Linear> = layers.into_iter().map(|layer| (layer.name(), layer)).collect();
        let prepared = adapters
            .iter()
            .map(|scaled| Ok((self.prepare(&scaled.adapter, &layers)?, scaled.scale)))
            .collect::<Result<Vec<_>>>()?;
        let mut names: Vec<&str> = prepared.iter().flat_map(|(p, _)| p.layers.keys().map(String::as_str)).collect();
        names.sort_unstable();
        names.dedup();
        let combined = names
            .into_iter()
            .map(|name| {
                let parts: Vec<(&PreparedLayer, f64)> =
                    prepared.iter().filter_map(|(p, scale)| Some((p.layers.get(name)?, *scale))).collect();
                let Some(layer) = layers.get(name) else {
                    bail!("an adapter prepared for this cache changes layer `{name}`, which `layers` lacks")
                };
                Ok((name.to_string(), combine(layer, &parts)?))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Adapters { owner: self.id, layers: Arc::new(combined) })
    }

    /// Fails unless `adapters` were made by this cache (or are none): a set made for another network, even one of
    /// the same shapes (a two-expert model's other expert), would change the wrong weights.
    pub fn check(&self, adapters: &Adapters) -> Result<()> {
        if !adapters.is_empty() && adapters.owner != self.id {
            bail!("these adapters were prepared for another network")
        }
        Ok(())
    }

    /// `adapter` on the network's device, from the cache or prepared now; entries of adapters dropped since are
    /// let go.
    fn prepare(&self, adapter: &Arc<Adapter>, layers: &HashMap<&str, &Linear>) -> Result<Arc<PreparedAdapter>> {
        let mut cache = self.prepared.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.retain(|(weak, _)| weak.strong_count() > 0);
        let key = Arc::downgrade(adapter);
        if let Some((_, prepared)) = cache.iter().find(|(weak, _)| weak.ptr_eq(&key)) {
            return Ok(prepared.clone());
        }
        let prepared = Arc::new(prepare(adapter, layers)?);
        cache.push((key, prepared.clone()));
        Ok(prepared)
    }

    /// How many adapters are prepared (and still held elsewhere).
    pub fn len(&self) -> usize {
        let cache = self.prepared.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.iter().filter(|(weak, _)| weak.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `adapter`'s parts per layer, on the layers' device, each checked against its layer.
fn prepare(adapter: &Adapter, layers: &HashMap<&str, &Linear>) -> Result<PreparedAdapter> {
    let mut prepared: HashMap<String, PreparedLayer> = HashMap::new();
    for tensor in adapter.tensor_names() {
        let layer = tensor
            .rsplit_once('.')
            .filter(|(_, kind)| matches!(*kind, "weight" | "bias"))
            .and_then(|(module, _)| layers.get(module));
        let Some(layer) = layer else {
            bail!("the adapter changes `{tensor}`, which is not the weight or bias of a layer that takes adapters at run time")
        };
        let (out_dim, in_dim) = layer.dims()?;
        let device = layer.device();
        let entry = prepared.entry(layer.name().to_string()).or_insert(PreparedLayer {
            pair: None,
            weight_delta: None,
            bias_delta: None,
        });
        let delta = adapter.full_delta(tensor, &device)?;
        let want: &[usize] = if tensor.ends_with(".weight") { &[out_dim, in_dim] } else { &[out_dim] };
        if let Some(delta) = delta.as_ref().filter(|delta| delta.dims() != want) {
            bail!("the adapter's delta of `{tensor}` is {:?}, which does not fit the layer's {want:?}", delta.dims())
        }
        if tensor.ends_with(".bias") {
            entry.bias_delta = delta;
            continue;
        }
        entry.weight_delta = delta;
        if let Some(pair) = adapter.low_rank(tensor) {
            let rank = pair.down.dim(0)?;
            if pair.down.dims() != [rank, in_dim] || pair.up.dims() != [out_dim, rank] {
                bail!(
                    "the adapter's pair for `{tensor}` (down {:?}, up {:?}) does not fit the layer's weight {:?}",
                    pair.down.dims(),
                    pair.up.dims(),
                    (out_dim, in_dim)
                )
            }
            entry.pair = Some(PreparedPair {
                down: pair.down.to_device(&device)?.to_dtype(layer.dtype())?,
                up: pair.up.to_device(&device)?,
                scale: pair.scale,
            });
        }
    }
    Ok(PreparedAdapter { layers: prepared })
}

/// One layer's `parts` (each an adapter's, with its scale) combined: the pairs concatenated along their ranks, each
/// `B` times its scales in f32 and rounded once to the layer's dtype; the weight deltas summed in f32; the bias
/// deltas summed in f32 onto the layer's bias, in the order [`crate::lora::merged_var_builder`] sums them.
fn combine(layer: &Linear, parts: &[(&PreparedLayer, f64)]) -> Result<AdaptedLinear> {
    let dtype = layer.dtype();
    let (mut downs, mut ups) = (Vec::new(), Vec::new());
    let (mut weight_delta, mut bias): (Option<Tensor>, Option<Tensor>) = (None, None);
    let add = |sum: Option<Tensor>, delta: Tensor| match sum {
        Some(sum) => sum + delta,
        None => Ok(delta),
    };
    for &(part, scale) in parts {
        if let Some(pair) = &part.pair {
            downs.push(pair.down.clone());
            ups.push((pair.up.to_dtype(DType::F32)? * (pair.scale * scale))?.to_dtype(dtype)?);
        }
        if let Some(delta) = &part.weight_delta {
            weight_delta = Some(add(weight_delta, (delta * scale)?)?);
        }
        if let Some(delta) = &part.bias_delta {
            if bias.is_none() {
                bias = layer.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
            }
            bias = Some(add(bias, (delta * scale)?)?);
        }
    }
    let pair = match downs.len() {
        0 => None,
        1 => Some((downs.remove(0), ups.remove(0))),
        _ => Some((Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 1)?)),
    };
    let bias_dtype = layer.bias().map_or(dtype, Tensor::dtype);
    Ok(AdaptedLinear {
        pair: pair.map(|(down, up)| (candle_nn::Linear::new(down, None), candle_nn::Linear::new(up, None))),
        weight_delta: weight_delta.map(|d| d.to_dtype(dtype)).transpose()?.map(|d| candle_nn::Linear::new(d, None)),
        bias: bias.map(|b| b.to_dtype(bias_dtype)).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::lora::tests::Plain;
    use crate::lora::{merged_var_builder, ReadOptions, Targets};

    /// The blocked computation must equal the one-shot softmax(q·kᵀ)·v.
    #[test]
    fn blocked_attention_matches_direct() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, (1, 3, 37, 29), &dev)?;
        let scale = 1.0 / 8f64.sqrt();
        let direct = {
            let s = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)?
        };
        let got = attention_in_blocks(&q, &k, &v, Some(&bias), scale, 5)?;
        let err = (got - &direct)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        (f32(a) - f32(b)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Two linear layers `a` (7 → 5) and `b` (5 → 3) with biases, and an input `[2, 4, 7]`.
    struct TwoLayers {
        tensors: HashMap<String, Tensor>,
        x: Tensor,
    }

    impl TwoLayers {
        fn new() -> Self {
            let tensors = HashMap::from([
                ("a.weight".to_string(), randn(&[5, 7])),
                ("a.bias".to_string(), randn(&[5])),
                ("b.weight".to_string(), randn(&[3, 5])),
                ("b.bias".to_string(), randn(&[3])),
            ]);
            Self { tensors, x: randn(&[2, 4, 7]) }
        }

        fn read(&self, tensors: &[(&str, Tensor)], metadata: Option<&str>) -> Arc<Adapter> {
            let metadata = metadata.map(|m| HashMap::from([("lora_adapter_metadata".to_string(), m.to_string())]));
            let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (*k, t)), metadata).unwrap();
            let targets = Targets::new(self.tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())));
            Arc::new(Adapter::from_bytes(&bytes, &Plain, &targets, &ReadOptions::default()).unwrap())
        }

        /// The layers from `vb`, in `dtype`.
        fn layers(&self, vb: VarBuilder) -> [Linear; 2] {
            [
                Linear::load(7, 5, vb.pp("a"), &Compact::none()).unwrap(),
                Linear::load(5, 3, vb.pp("b"), &Compact::none()).unwrap(),
            ]
        }

        fn base(&self, dtype: DType) -> VarBuilder<'static> {
            VarBuilder::from_tensors(self.tensors.clone(), dtype, &Device::Cpu)
        }

        fn forward(&self, layers: &[Linear; 2], adapters: &Adapters) -> Tensor {
            let x = self.x.to_dtype(layers[0].dtype()).unwrap();
            let h = layers[0].forward(&x, adapters).unwrap();
            layers[1].forward(&h, adapters).unwrap()
        }

        /// The layers with `adapters` merged into their weights, on `x`.
        fn merged(&self, adapters: &[ScaledAdapter], dtype: DType) -> Tensor {
            let layers = self.layers(merged_var_builder(self.base(dtype), adapters.to_vec()));
            self.forward(&layers, &Adapters::none())
        }
    }

    fn scaled(adapter: &Arc<Adapter>, scale: f64) -> ScaledAdapter {
        ScaledAdapter { adapter: adapter.clone(), scale }
    }

    /// A pair with alpha and an up-projection bias on `a`; pairs on both layers and full deltas on `b`.
    fn pair_and_deltas(layers: &TwoLayers) -> (Arc<Adapter>, Arc<Adapter>) {
        let first = layers.read(
            &[
                ("a.down", randn(&[3, 7])),
                ("a.up", randn(&[5, 3])),
                ("a.alpha", Tensor::new(6f32, &Device::Cpu).unwrap()),
                ("a.up_bias", randn(&[5])),
            ],
            None,
        );
        let second = layers.read(
            &[
                ("a.down", randn(&[2, 7])),
                ("a.up", randn(&[5, 2])),
                ("b.down", randn(&[2, 5])),
                ("b.up", randn(&[3, 2])),
                ("b.diff", randn(&[3, 5])),
                ("b.diff_b", randn(&[3])),
            ],
            None,
        );
        (first, second)
    }

    /// One adapter, then two, at run time equal the same merged into the weights; no adapters give the base
    /// output exactly, before and after.
    #[test]
    fn adapted_linear_equals_merged() -> Result<()> {
        let two = TwoLayers::new();
        let (first, second) = pair_and_deltas(&two);
        let layers = two.layers(two.base(DType::F32));
        let cache = AdapterCache::new();
        let base = two.forward(&layers, &Adapters::none());
        assert_eq!(max_diff(&base, &two.merged(&[], DType::F32)), 0.0);
        for set in
            [vec![scaled(&first, 0.7)], vec![scaled(&second, 0.5)], vec![scaled(&first, 0.7), scaled(&second, 0.5)]]
        {
            let got = two.forward(&layers, &cache.activate(&set, &layers)?);
            let merged = two.merged(&set, DType::F32);
            // Relative to the output's size: the factors are random and unscaled, so the output's magnitude varies.
            let diff = max_diff(&got, &merged) / merged.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "max relative difference {diff}");
            assert!(max_diff(&got, &base) > 1e-2);
        }
        assert_eq!(two.forward(&layers, &Adapters::none()).to_vec3::<f32>()?, base.to_vec3::<f32>()?);
        assert_eq!(two.forward(&layers, &cache.activate(&[], &layers)?).to_vec3::<f32>()?, base.to_vec3::<f32>()?);
        Ok(())
    }

    /// On one layer, two adapters' changes add up: each one's on its own, summed (their pairs concatenated).
    #[test]
    fn adapters_add_up() -> Result<()> {
        let two = TwoLayers::new();
        let (first, second) = pair_and_deltas(&two);
        let layers = two.layers(two.base(DType::F32));
        let cache = AdapterCache::new();
        let a = |set: &[ScaledAdapter]| layers[0].forward(&two.x, &cache.activate(set, &layers).unwrap()).unwrap();
        let base = a(&[]);
        let (one, other) = ((a(&[scaled(&first, 0.7)]) - &base)?, (a(&[scaled(&second, -1.5)]) - &base)?);
        let both = (a(&[scaled(&first, 0.7), scaled(&second, -1.5)]) - &base)?;
        let diff = max_diff(&both, &(one + other)?);
        assert!(diff < 1e-5, "max abs difference {diff}");
        Ok(())
    }

    /// diffusers' `lora_adapter_metadata` scale (α / r not folded into the factors) applies at run time too.
    #[test]
    fn metadata_alpha_applies_at_run_time() -> Result<()> {
        let two = TwoLayers::new();
        let adapter = two
            .read(&[("a.down", randn(&[4, 7])), ("a.up", randn(&[5, 4]))], Some(r#"{"transformer.lora_alpha": 16}"#));
        assert_eq!(adapter.low_rank("a.weight").unwrap().scale, 4.0);
        let layers = two.layers(two.base(DType::F32));
        let set = [scaled(&adapter, 0.3)];
        let diff = max_diff(
            &two.forward(&layers, &AdapterCache::new().activate(&set, &layers)?),
            &two.merged(&set, DType::F32),
        );
        assert!(diff < 1e-5, "max abs difference {diff}");
        Ok(())
    }

    /// In bf16 the run-time path computes in bf16: close to the merged path, in bf16.
    #[test]
    fn bf16_layers_compute_in_bf16() -> Result<()> {
        let two = TwoLayers::new();
        let (first, second) = pair_and_deltas(&two);
        let layers = two.layers(two.base(DType::BF16));
        let set = [scaled(&first, 0.7), scaled(&second, 0.5)];
        let got = two.forward(&layers, &AdapterCache::new().activate(&set, &layers)?);
        assert_eq!(got.dtype(), DType::BF16);
        let want = two.merged(&set, DType::F32);
        let diff = max_diff(&got, &want) / want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 2e-2, "max relative difference {diff}");
        Ok(())
    }

    /// An adapter is prepared once while it lives, and let go once it doesn't.
    #[test]
    fn prepared_adapters_are_cached_by_identity() -> Result<()> {
        let two = TwoLayers::new();
        let (first, second) = pair_and_deltas(&two);
        let layers = two.layers(two.base(DType::F32));
        let cache = AdapterCache::new();
        let prepared = |adapter: &Arc<Adapter>| {
            let by_name: HashMap<&str, &Linear> = layers.iter().map(|l| (l.name(), l)).collect();
            cache.prepare(adapter, &by_name).unwrap()
        };
        let one = prepared(&first);
        cache.activate(&[scaled(&first, 0.2), scaled(&second, 1.0)], &layers)?;
        cache.activate(&[scaled(&first, 0.9)], &layers)?;
        assert!(Arc::ptr_eq(&one, &prepared(&first)));
        assert_eq!(cache.len(), 2);
        // The same contents in another `Arc` are another adapter.
        let copy = Arc::new(Adapter::clone(&first));
        assert!(!Arc::ptr_eq(&one, &prepared(&copy)));
        drop((first, copy));
        assert_eq!(cache.len(), 1);
        let adapters = cache.activate(&[scaled(&second, 1.0)], &layers)?;
        assert_eq!(cache.prepared.lock().unwrap().len(), 1);
        let mut names: Vec<&str> = adapters.layers.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "b"]);
        Ok(())
    }

    /// A set is for the network it was prepared for; an adapter must change only layers the network has.
    #[test]
    fn sets_and_adapters_are_checked() -> Result<()> {
        let two = TwoLayers::new();
        let (first, _) = pair_and_deltas(&two);
        let layers = two.layers(two.base(DType::F32));
        let (cache, other) = (AdapterCache::new(), AdapterCache::new());
        let adapters = cache.activate(&[scaled(&first, 1.0)], &layers)?;
        cache.check(&adapters)?;
        other.check(&Adapters::none())?;
        let err = other.check(&adapters).unwrap_err().to_string();
        assert!(err.contains("another network"), "{err}");
        let err = AdapterCache::new().activate(&[scaled(&first, 1.0)], &layers[1..]).unwrap_err().to_string();
        assert!(err.contains("`a.bias`"), "{err}");
        Ok(())
    }
}
