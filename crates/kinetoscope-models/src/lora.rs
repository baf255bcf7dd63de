//! LoRA adapters: read and checked against a network, then merged into its weights as they load, or applied at run
//! time by its [`crate::layers::Linear`] layers (see [`crate::layers`]), which leaves the weights alone.
//!
//! Paper: "LoRA: Low-Rank Adaptation of Large Language Models", <https://arxiv.org/abs/2106.09685>.
//! Reference: PEFT's `LoraLayer` (`scaling`, `get_delta_weight`, `lora_bias`),
//! <https://github.com/huggingface/peft/blob/v0.21.2/src/peft/tuners/lora/layer.py>, as diffusers 0.42.1 loads it.
//!
//! An adapter file (safetensors) holds, per layer, a low-rank pair — the down projection `A` `[r, in]` and the up
//! projection `B` `[out, r]` — maybe the pair's `alpha`, maybe a bias for `B`, and, in some formats, full deltas of a
//! weight or a bias. What its keys mean depends on the trainer that wrote it: a family's [`AdapterNaming`] maps them
//! to the network's own tensor names (the Wan transformer's is [`crate::wan::lora::WanNaming`]). This module does
//! the rest: it reads the file within [`Limits`], checks every part against the tensor it changes before loading
//! any data, and does the arithmetic.
//!
//! A tensor `W` changed by adapters `i`, each used at a scale `s_i`, becomes `W + Σ s_i · Δ_i`, summed in f32 and
//! cast to the weight's dtype, where
//! - a low-rank pair gives `Δ = (α / r) · B·A` (PEFT's `scaling`; `α / √r` for rsLoRA), r = `A`'s rows, α the
//!   pair's `alpha` key (folded into `A` and `B` in the file's dtype first, as diffusers' converters fold it), else
//!   the `lora_alpha` (or `alpha_pattern` entry) of diffusers' `lora_adapter_metadata`, else r (a scale of 1, as
//!   diffusers treats a raw state dict);
//! - the up projection's bias (PEFT's `lora_bias`) changes the layer's bias by `(α / r) · b`;
//! - a full delta of a weight or a bias (Wan's `diff` / `diff_b`) is added as it is: `Δ = D`.
//!
//! [`merged_var_builder`] puts this under a `VarBuilder`, so a network builds merged weights with its usual `new`.
//! The run-time path takes the parts apart instead ([`Adapter::low_rank`], [`Adapter::full_delta`]) and computes
//! `x·(W + Σ s_i · Δ_i)ᵀ` as `x·Wᵀ + Σ s_i·(α / r)·(x·Aᵀ)·Bᵀ + Σ s_i·x·Dᵀ`, the bias deltas summed onto the bias.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::compact::{Compact, CompactSource, CompactWeight, Delta};

/// What one tensor of an adapter file is to the layer it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `A` (`lora_A`, `lora_down`): `[r, in]`, or `[r, in, k…]` for a convolution.
    Down,
    /// `B` (`lora_B`, `lora_up`): `[out, r]`, or `[out, r, 1…]` for a convolution.
    Up,
    /// `B`'s bias (PEFT's `lora_bias`): `[out]`, scaled as the pair is.
    UpBias,
    /// The pair's `alpha`: one number.
    Alpha,
    /// A full delta of the layer's weight, added unscaled (but for the adapter's own scale).
    WeightDelta,
    /// A full delta of the layer's bias, added unscaled (but for the adapter's own scale).
    BiasDelta,
}

impl Part {
    /// The tensor of the layer this part changes (or, for `Alpha`, belongs to): `weight` or `bias`.
    fn tensor(self) -> &'static str {
        match self {
            Part::Down | Part::Up | Part::Alpha | Part::WeightDelta => "weight",
            Part::UpBias | Part::BiasDelta => "bias",
        }
    }
}

/// Where one key of an adapter file goes, as an [`AdapterNaming`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTarget {
    /// `part` of the adapter on the layer `module`, by the network's own names (`blocks.0.attn1.to_q`), whose
    /// tensors are `{module}.weight` and `{module}.bias`.
    Layer { module: String, part: Part },
    /// A key the reference implementation drops on purpose, and why; reported by [`Adapter::ignored`], never applied.
    Ignored(&'static str),
    /// Nothing this network has.
    Unmatched,
}

/// The keys of one adapter file, resolved: the format recognized and where each key goes (in the keys' order).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The format, in words, for logs (e.g. "diffusers (PEFT)").
    pub format: &'static str,
    pub targets: Vec<KeyTarget>,
}

/// How one family's adapter files name its layers.
pub trait AdapterNaming {
    /// Where each of `keys` (every key of one file: the format is a property of the whole file) goes.
    fn resolve(&self, keys: &[&str]) -> Resolved;

    /// The pipeline component whose entries of diffusers' `lora_adapter_metadata` apply (`"transformer"`).
    fn component(&self) -> &str;
}

/// The tensors of the network an adapter may change: names (as the network's `VarBuilder` asks for them) and shapes.
#[derive(Debug, Clone, Default)]
pub struct Targets {
    shapes: HashMap<String, Vec<usize>>,
}

impl Targets {
    pub fn new(tensors: impl IntoIterator<Item = (String, Vec<usize>)>) -> Self {
        Self { shapes: tensors.into_iter().collect() }
    }

    /// Every tensor of a checkpoint's safetensors files (one, or the shards of one), from their headers.
    pub fn from_safetensors(files: &[impl AsRef<Path>]) -> Result<Self> {
        // SAFETY: the checkpoint's files are memory-mapped read-only and only their headers are read; a file
        // truncated by another process meanwhile is undefined behaviour, which model folders (written once) don't see.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
        Ok(Self::new(st.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec()))))
    }

    /// Every tensor's name and shape.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.shapes.iter().map(|(name, dims)| (name.as_str(), dims.as_slice()))
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }
}

/// Bounds on an untrusted adapter file, checked before its tensors are allocated.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The file is read whole: at most this many bytes.
    pub max_file_bytes: u64,
    pub max_tensors: usize,
}

impl Default for Limits {
    /// 8 GiB (a rank-256 f32 adapter of a 14B Wan is about 5 GB) and 100 000 tensors (such an adapter has 1 200).
    fn default() -> Self {
        Self { max_file_bytes: 8 << 30, max_tensors: 100_000 }
    }
}

/// How [`Adapter::read`] treats a file.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Keys that match no tensor of the network are collected in [`Adapter::unmatched`] instead of failing the read
    /// (diffusers warns of them and goes on).
    pub allow_unmatched: bool,
    pub limits: Limits,
}

/// A key left out of an adapter on purpose, as the reference implementation leaves it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredKey {
    pub key: String,
    pub reason: &'static str,
}

/// One contribution to a tensor, before the adapter's own scale.
#[derive(Debug, Clone)]
enum Term {
    /// `scale · B·A`, reshaped to the tensor's shape.
    LowRank { down: Tensor, up: Tensor, scale: f64 },
    /// `scale · D`.
    Full { delta: Tensor, scale: f64 },
}

#[derive(Debug, Clone)]
struct TensorDelta {
    shape: Vec<usize>,
    terms: Vec<Term>,
}

/// One adapter file, read and checked against a network: for each tensor it changes (by the network's name,
/// e.g. `blocks.0.attn1.to_q.weight`), the parts of its delta, kept on the CPU in the file's dtype until merged.
#[derive(Debug, Clone)]
pub struct Adapter {
    format: &'static str,
    deltas: BTreeMap<String, TensorDelta>,
    unmatched: Vec<String>,
    ignored: Vec<IgnoredKey>,
}

/// The parts one layer gets from a file: for each, its key and where its data lies.
#[derive(Default, Clone, Copy)]
struct LayerParts<'a> {
    down: Option<(&'a str, &'a TensorInfo)>,
    up: Option<(&'a str, &'a TensorInfo)>,
    up_bias: Option<(&'a str, &'a TensorInfo)>,
    alpha: Option<(&'a str, &'a TensorInfo)>,
    weight_delta: Option<(&'a str, &'a TensorInfo)>,
    bias_delta: Option<(&'a str, &'a TensorInfo)>,
}

impl<'a> LayerParts<'a> {
    fn slot(&mut self, part: Part) -> &mut Option<(&'a str, &'a TensorInfo)> {
        match part {
            Part::Down => &mut self.down,
            Part::Up => &mut self.up,
            Part::UpBias => &mut self.up_bias,
            Part::Alpha => &mut self.alpha,
            Part::WeightDelta => &mut self.weight_delta,
            Part::BiasDelta => &mut self.bias_delta,
        }
    }
}

/// The entries of diffusers' `lora_adapter_metadata` (a PEFT `LoraConfig`) that set the pairs' scale.
#[derive(Debug, Default)]
struct PeftConfig {
    lora_alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

impl PeftConfig {
    /// PEFT's `LoraConfig.lora_alpha` default.
    const DEFAULT_ALPHA: f64 = 8.0;

    /// From the file's `__metadata__`, the entries of `component` (diffusers prefixes them: `transformer.lora_alpha`).
    fn from_metadata(metadata: &Metadata, component: &str) -> Result<Option<Self>> {
        let Some(json) = metadata.metadata().as_ref().and_then(|m| m.get("lora_adapter_metadata")) else {
            return Ok(None);
        };
        let all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|e| Error::Msg(format!("its `lora_adapter_metadata` is not a JSON object: {e}")))?;
        let prefix = format!("{component}.");
        let entries: HashMap<&str, &serde_json::Value> =
            all.iter().filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v))).collect();
        if entries.is_empty() {
            return Ok(None);
        }
        if entries.get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            bail!("it is a DoRA adapter (`use_dora` in its metadata), which is not supported")
        }
        let number = |name: &str, v: &serde_json::Value| {
            v.as_f64().ok_or_else(|| Error::Msg(format!("its metadata's `{component}.{name}` is not a number: {v}")))
        };
        let lora_alpha = entries.get("lora_alpha").map(|v| number("lora_alpha", v)).transpose()?;
        let mut alpha_pattern = Vec::new();
        if let Some(pattern) = entries.get("alpha_pattern").and_then(|v| v.as_object()) {
            for (key, v) in pattern {
                alpha_pattern.push((key.clone(), number("alpha_pattern", v)?));
            }
        }
        let use_rslora = entries.get("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        Ok(Some(Self { lora_alpha, alpha_pattern, use_rslora }))
    }

    /// A pair's `scaling` without an `alpha` key of its own: `alpha / r`, or `alpha / √r` with rsLoRA.
    fn scale(&self, module: &str, rank: usize) -> f64 {
        let rank = rank as f64;
        self.alpha(module) / if self.use_rslora { rank.sqrt() } else { rank }
    }

    /// The layer's alpha: its `alpha_pattern` entry (PEFT's `get_pattern_key`: the module's name, or its tail after a
    /// dot; patterns are taken literally, a leading `^` anchoring at the start), else `lora_alpha`.
    fn alpha(&self, module: &str) -> f64 {
        let matches = |pattern: &str| match pattern.strip_prefix('^') {
            Some(anchored) => module == anchored,
            None => module == pattern || module.strip_suffix(pattern).is_some_and(|head| head.ends_with('.')),
        };
        self.alpha_pattern
            .iter()
            .find(|(pattern, _)| matches(pattern))
            .map(|&(_, alpha)| alpha)
            .or(self.lora_alpha)
            .unwrap_or(Self::DEFAULT_ALPHA)
    }
}

fn candle_dtype(key: &str, dtype: safetensors::Dtype) -> Result<DType> {
    match dtype {
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::F64 => Ok(DType::F64),
        other => bail!("`{key}` is {other:?}; adapter tensors must be floating point (F16, BF16, F32 or F64)"),
    }
}

/// Whether `got` is `want` followed by any number of 1s (a convolution's `[out, r, 1, 1, 1]` up projection).
fn is_padded(got: &[usize], want: &[usize]) -> bool {
    got.len() >= want.len() && got[..want.len()] == *want && got[want.len()..].iter().all(|&d| d == 1)
}

impl Adapter {
    /// Reads an adapter file (untrusted) for the network whose tensors are `targets`, its keys read by `naming`.
    ///
    /// Fails, naming the key, on a key that matches no tensor of the network (unless
    /// [`ReadOptions::allow_unmatched`]), a part whose shape does not fit the tensor it changes, a non-float tensor,
    /// a low-rank pair with a half missing, and a file over [`ReadOptions::limits`].
    pub fn read(path: &Path, naming: &dyn AdapterNaming, targets: &Targets, options: &ReadOptions) -> Result<Self> {
        let context = |e: Error| Error::Msg(format!("LoRA adapter {}: {e}", path.display()));
        let len = std::fs::metadata(path).map_err(|e| context(e.into()))?.len();
        if len > options.limits.max_file_bytes {
            return Err(context(Error::Msg(format!(
                "the file is {len} bytes, over the limit of {}",
                options.limits.max_file_bytes
            ))));
        }
        let bytes = std::fs::read(path).map_err(|e| context(e.into()))?;
        Self::from_bytes(&bytes, naming, targets, options).map_err(context)
    }

    /// [`Self::read`] on a safetensors file already in memory.
    pub fn from_bytes(
        bytes: &[u8],
        naming: &dyn AdapterNaming,
        targets: &Targets,
        options: &ReadOptions,
    ) -> Result<Self> {
        let limits = options.limits;
        if bytes.len() as u64 > limits.max_file_bytes {
            bail!("the file is {} bytes, over the limit of {}", bytes.len(), limits.max_file_bytes)
        }
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| Error::Msg(format!("not a valid safetensors file: {e}")))?;
        let data = &bytes[8 + header_len..];
        let infos = metadata.tensors();
        if infos.len() > limits.max_tensors {
            bail!("it has {} tensors, over the limit of {}", infos.len(), limits.max_tensors)
        }
        let peft = PeftConfig::from_metadata(&metadata, naming.component())?;

        let mut keys: Vec<&str> = infos.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let resolved = naming.resolve(&keys);
        if resolved.targets.len() != keys.len() {
            bail!(
                "the {} naming resolved {} of the file's {} keys",
                resolved.format,
                resolved.targets.len(),
                keys.len()
            )
        }

        // Group the parts by layer, sorting out what is not applied.
        let mut layers: BTreeMap<String, LayerParts> = BTreeMap::new();
        let mut unmatched = Vec::new();
        let mut ignored = Vec::new();
        for (&key, target) in keys.iter().zip(&resolved.targets) {
            match target {
                KeyTarget::Layer { module, part } => {
                    if targets.shape(&format!("{module}.{}", part.tensor())).is_none() {
                        unmatched.push(key.to_string());
                        continue;
                    }
                    let slot = layers.entry(module.clone()).or_default().slot(*part);
                    if let Some((other, _)) = slot {
                        bail!("`{other}` and `{key}` are both the {part:?} part of layer `{module}`")
                    }
                    *slot = Some((key, infos[key]));
                }
                KeyTarget::Ignored(reason) => ignored.push(IgnoredKey { key: key.to_string(), reason }),
                KeyTarget::Unmatched => unmatched.push(key.to_string()),
            }
        }
        if !unmatched.is_empty() && !options.allow_unmatched {
            const SHOWN: usize = 8;
            let mut names = unmatched.iter().take(SHOWN).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
            if unmatched.len() > SHOWN {
                names += &format!(" and {} more", unmatched.len() - SHOWN);
            }
            bail!("{} key(s) match no tensor of the model ({} format): {names}", unmatched.len(), resolved.format)
        }

        // Every part's dtype and shape is checked before any data is loaded.
        let plans = layers
            .iter()
            .map(|(module, parts)| LayerPlan::check(module, parts, targets))
            .collect::<Result<Vec<_>>>()?;
        let mut deltas = BTreeMap::new();
        for plan in plans {
            deltas.extend(plan.build(peft.as_ref(), data)?);
        }
        Ok(Self { format: resolved.format, deltas, unmatched, ignored })
    }

    /// The format the file was recognized as, in words.
    pub fn format(&self) -> &'static str {
        self.format
    }

    /// Keys that match no tensor of the network, when [`ReadOptions::allow_unmatched`] let the read go on.
    pub fn unmatched(&self) -> &[String] {
        &self.unmatched
    }

    /// Keys left out as the reference implementation leaves them out (e.g. diffusers drops Wan's norm deltas).
    pub fn ignored(&self) -> &[IgnoredKey] {
        &self.ignored
    }

    /// The network's tensors this adapter changes, in name order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(String::as_str)
    }

    /// Whether the adapter changes tensor `name`.
    pub fn changes(&self, name: &str) -> bool {
        self.deltas.contains_key(name)
    }

    /// The adapter's delta of tensor `name` at scale 1, in f32 on `device` (`None` for a tensor it leaves alone).
    pub fn delta(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        self.sum_terms(name, device, |_| true)
    }

    /// The low-rank pair that changes weight `name`, as read (on the CPU, in the file's dtype); `None` when the
    /// adapter changes `name` without one, or not at all. Its delta is `scale · up·down`, reshaped to the weight's
    /// shape: the run-time path ([`crate::layers::Linear`]) applies it as two thin products, `scale · (x·downᵀ)·upᵀ`.
    pub fn low_rank(&self, name: &str) -> Option<LowRank<'_>> {
        self.deltas.get(name)?.terms.iter().find_map(|term| match term {
            Term::LowRank { down, up, scale } => Some(LowRank { down, up, scale: *scale }),
            Term::Full { .. } => None,
        })
    }

    /// The rest of the adapter's delta of tensor `name` at scale 1, in f32 on `device`: its full deltas (`diff`,
    /// `diff_b`) and its up projection's bias times the pair's scale, summed; `None` when it has none of them.
    /// [`Self::delta`] is this plus the [`Self::low_rank`] product.
    pub fn full_delta(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        self.sum_terms(name, device, |term| matches!(term, Term::Full { .. }))
    }

    /// The sum of the terms of `name` that `keep` keeps, in f32 on `device`, in the order they were read.
    fn sum_terms(&self, name: &str, device: &Device, keep: impl Fn(&Term) -> bool) -> Result<Option<Tensor>> {
        let Some(entry) = self.deltas.get(name) else { return Ok(None) };
        let f32_on = |t: &Tensor| t.to_device(device)?.to_dtype(DType::F32);
        let mut sum: Option<Tensor> = None;
        for term in entry.terms.iter().filter(|term| keep(term)) {
            let delta = match term {
                Term::LowRank { down, up, scale } => {
                    (f32_on(up)?.matmul(&f32_on(down)?)? * *scale)?.reshape(entry.shape.as_slice())?
                }
                Term::Full { delta, scale } => (f32_on(delta)? * *scale)?,
            };
            sum = Some(match sum {
                Some(sum) => (sum + delta)?,
                None => delta,
            });
        }
        Ok(sum)
    }
}

/// A low-rank pair as an adapter holds it (see [`Adapter::low_rank`]).
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// `A`, `[r, in]` (a convolution's flattened: `[r, in·k…]`).
    pub down: &'a Tensor,
    /// `B`, `[out, r]`.
    pub up: &'a Tensor,
    /// The product's scale: α / r where the file's `alpha` was not folded into the factors, else 1.
    pub scale: f64,
}

/// One layer's parts, checked against the tensors they change: ready to load.
struct LayerPlan<'a> {
    module: &'a str,
    parts: LayerParts<'a>,
    weight: (String, &'a [usize]),
    bias: (String, &'a [usize]),
    /// The low-rank pair's rank and output width, when the layer has one.
    pair: Option<(usize, usize)>,
}

impl<'a> LayerPlan<'a> {
    fn check(module: &'a str, parts: &LayerParts<'a>, targets: &'a Targets) -> Result<Self> {
        let LayerParts { down, up, up_bias, alpha, weight_delta, bias_delta } = *parts;
        for (key, info) in [down, up, up_bias, alpha, weight_delta, bias_delta].into_iter().flatten() {
            candle_dtype(key, info.dtype)?;
        }
        let weight = (format!("{module}.weight"), targets.shape(&format!("{module}.weight")).unwrap_or_default());
        let bias = (format!("{module}.bias"), targets.shape(&format!("{module}.bias")).unwrap_or_default());
        let fits = |part: Option<(&str, &TensorInfo)>, (name, want): &(String, &[usize])| match part {
            Some((key, info)) if info.shape != *want => Err(misfit(key, &info.shape, name, format!("{want:?}"))),
            _ => Ok(()),
        };
        fits(weight_delta, &weight)?;
        fits(bias_delta, &bias)?;
        fits(up_bias, &bias)?;
        if let Some((key, info)) = alpha {
            if info.shape.iter().product::<usize>() != 1 {
                bail!("`{key}` has shape {:?}; an alpha is one number", info.shape)
            }
        }
        let pair = match (down, up) {
            (Some((down_key, down)), Some((up_key, up))) => {
                let (name, shape) = &weight;
                let &[out, ref rest @ ..] = *shape else {
                    bail!("`{down_key}`: `{name}` is a scalar, which a low-rank pair cannot change")
                };
                if rest.is_empty() {
                    bail!("`{down_key}`: `{name}` has shape {shape:?}, not a layer's weight")
                }
                let rank = down.shape.first().copied().unwrap_or(0);
                if rank == 0 || down.shape[1..] != *rest {
                    return Err(misfit(down_key, &down.shape, name, format!("[r, {}]", dims(rest))));
                }
                if !is_padded(&up.shape, &[out, rank]) {
                    return Err(misfit(
                        up_key,
                        &up.shape,
                        name,
                        format!("[{out}, {rank}] (rank {rank} from `{down_key}`)"),
                    ));
                }
                Some((rank, out))
            }
            (Some((key, _)), None) | (None, Some((key, _))) => {
                bail!("`{key}` is half of a low-rank pair for layer `{module}`, whose other half is missing")
            }
            (None, None) => match alpha.or(up_bias) {
                Some((key, _)) => {
                    bail!("`{key}` belongs to a low-rank pair for layer `{module}`, which the file does not have")
                }
                None => None,
            },
        };
        Ok(Self { module, parts: *parts, weight, bias, pair })
    }

    /// Loads the parts: the layer's weight delta and bias delta, those it has.
    fn build(self, peft: Option<&PeftConfig>, data: &[u8]) -> Result<Vec<(String, TensorDelta)>> {
        let LayerParts { down, up, up_bias, alpha, weight_delta, bias_delta } = self.parts;
        let mut weight_terms = Vec::new();
        let mut bias_terms = Vec::new();
        if let (Some((rank, out)), Some((down_key, down)), Some((up_key, up))) = (self.pair, down, up) {
            let mut down = load(down_key, down, data)?.reshape((rank, ()))?;
            let mut up = load(up_key, up, data)?.reshape((out, rank))?;
            let scale = match alpha {
                Some((key, info)) => {
                    let alpha = load(key, info, data)?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
                    if !alpha.is_finite() {
                        bail!("`{key}` is {alpha}")
                    }
                    let scale = alpha / rank as f64;
                    // Folded into the factors in their own dtype, as diffusers' converters fold it (a bf16 file's
                    // factors are rounded after scaling), the product split in powers of two between them.
                    let (scale_down, scale_up) = split_scale(scale);
                    down = scaled_in_dtype(&down, scale_down)?;
                    up = scaled_in_dtype(&up, scale_up)?;
                    if let Some((key, info)) = up_bias {
                        bias_terms.push(Term::Full { delta: load(key, info, data)?, scale });
                    }
                    1.0
                }
                None => {
                    let scale = peft.map_or(1.0, |config| config.scale(self.module, rank));
                    if let Some((key, info)) = up_bias {
                        bias_terms.push(Term::Full { delta: load(key, info, data)?, scale });
                    }
                    scale
                }
            };
            weight_terms.push(Term::LowRank { down, up, scale });
        }
        if let Some((key, info)) = weight_delta {
            weight_terms.push(Term::Full { delta: load(key, info, data)?, scale: 1.0 });
        }
        if let Some((key, info)) = bias_delta {
            bias_terms.push(Term::Full { delta: load(key, info, data)?, scale: 1.0 });
        }
        Ok([(self.weight, weight_terms), (self.bias, bias_terms)]
            .into_iter()
            .filter(|(_, terms)| !terms.is_empty())
            .map(|((name, shape), terms)| (name, TensorDelta { shape: shape.to_vec(), terms }))
            .collect())
    }
}

/// `scale` as a factor for the down projection and one for the up projection, their product `scale`: diffusers'
/// `get_alpha_scales`, which moves powers of two to the up projection while the down one's is under half of it.
fn split_scale(scale: f64) -> (f64, f64) {
    let (mut down, mut up) = (scale, 1.0);
    while down * 2.0 < up {
        down *= 2.0;
        up /= 2.0;
    }
    (down, up)
}

/// `x · scale` rounded to `x`'s dtype, as PyTorch multiplies a tensor by a number (half precision in f32).
fn scaled_in_dtype(x: &Tensor, scale: f64) -> Result<Tensor> {
    match x.dtype() {
        _ if scale == 1.0 => Ok(x.clone()),
        DType::F64 => x * scale,
        dtype => (x.to_dtype(DType::F32)? * scale)?.to_dtype(dtype),
    }
}

fn misfit(key: &str, got: &[usize], name: &str, want: String) -> Error {
    Error::Msg(format!("`{key}` has shape {got:?}, which does not fit `{name}`: expected {want}"))
}

fn dims(dims: &[usize]) -> String {
    dims.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

/// Tensor `key`'s data (already bounded by the file's size and checked to be a float) on the CPU.
fn load(key: &str, info: &TensorInfo, data: &[u8]) -> Result<Tensor> {
    let (start, end) = info.data_offsets;
    Tensor::from_raw_buffer(&data[start..end], candle_dtype(key, info.dtype)?, &info.shape, &Device::Cpu)
}

/// An adapter and the scale it is used at (diffusers' `set_adapters` weight, or `fuse_lora`'s `lora_scale`).
#[derive(Debug, Clone)]
pub struct ScaledAdapter {
    pub adapter: Arc<Adapter>,
    pub scale: f64,
}

/// A `VarBuilder` over `base` that gives each tensor the adapters change as `base + Σ scale · delta`, summed in f32
/// and cast to the dtype asked for; every other tensor comes from `base` untouched. Tensor names are relative to
/// `base`'s prefix (the network's root), the names the adapters were read against.
pub fn merged_var_builder(base: VarBuilder<'static>, adapters: Vec<ScaledAdapter>) -> VarBuilder<'static> {
    let (dtype, device) = (base.dtype(), base.device().clone());
    VarBuilder::from_backend(Box::new(Merged { base, adapters }), dtype, device)
}

/// `compact` with `adapters` merged into its weights as they are dequantized
/// ([`crate::compact::CompactWeight::Patched`]): the compact layers' part of what [`merged_var_builder`] does for
/// the dense tensors, so that a network loaded from both takes every adapter once.
pub fn merged_compact(compact: Compact, adapters: Vec<ScaledAdapter>) -> Compact {
    if adapters.is_empty() {
        return compact;
    }
    Compact::new(MergedCompact { compact, adapters })
}

struct MergedCompact {
    compact: Compact,
    adapters: Vec<ScaledAdapter>,
}

impl CompactSource for MergedCompact {
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, device: &Device) -> Result<Option<CompactWeight>> {
        let Some(base) = self.compact.linear(name, out_dim, in_dim, device)? else { return Ok(None) };
        let weight = format!("{name}.weight");
        let f32_on = |t: &Tensor| t.to_device(device)?.to_dtype(DType::F32);
        let mut deltas = Vec::new();
        for ScaledAdapter { adapter, scale } in &self.adapters {
            if let Some(pair) = adapter.low_rank(&weight) {
                let up = (f32_on(pair.up)? * (pair.scale * scale))?;
                deltas.push(Delta::LowRank { up, down: f32_on(pair.down)? });
            }
            if let Some(full) = adapter.full_delta(&weight, device)? {
                deltas.push(Delta::Full((full * *scale)?));
            }
        }
        Ok(Some(if deltas.is_empty() { base } else { CompactWeight::Patched { base: Box::new(base), deltas } }))
    }
}

struct Merged {
    base: VarBuilder<'static>,
    adapters: Vec<ScaledAdapter>,
}

impl Merged {
    fn merge(&self, name: &str, base: Tensor, dtype: DType) -> Result<Tensor> {
        let mut merged = base;
        for ScaledAdapter { adapter, scale } in &self.adapters {
            if let Some(delta) = adapter.delta(name, merged.device())? {
                merged = (merged + (delta * *scale)?)?;
            }
        }
        merged.to_dtype(dtype)
    }

    fn touched(&self, name: &str) -> bool {
        self.adapters.iter().any(|a| a.adapter.changes(name))
    }
}

impl SimpleBackend for Merged {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, _: &Device) -> Result<Tensor> {
        if !self.touched(name) {
            return self.base.get_with_hints_dtype(s, name, h, dtype);
        }
        self.merge(name, self.base.get_with_hints_dtype(s, name, h, DType::F32)?, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> Result<Tensor> {
        if !self.touched(name) {
            return self.base.get_unchecked_dtype(name, dtype);
        }
        self.merge(name, self.base.get_unchecked_dtype(name, DType::F32)?, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Module;

    /// Keys `{module}.{part}`, parts named plainly; `.skip` is ignored, anything else unmatched.
    pub(crate) struct Plain;

    impl AdapterNaming for Plain {
        fn resolve(&self, keys: &[&str]) -> Resolved {
            let targets = keys
                .iter()
                .map(|key| {
                    let (module, part) = key.rsplit_once('.').unwrap();
                    let part = match part {
                        "down" => Part::Down,
                        "up" => Part::Up,
                        "up_bias" => Part::UpBias,
                        "alpha" => Part::Alpha,
                        "diff" => Part::WeightDelta,
                        "diff_b" => Part::BiasDelta,
                        "skip" => return KeyTarget::Ignored("skipped"),
                        _ => return KeyTarget::Unmatched,
                    };
                    KeyTarget::Layer { module: module.to_string(), part }
                })
                .collect();
            Resolved { format: "plain", targets }
        }

        fn component(&self) -> &str {
            "transformer"
        }
    }

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    fn file(tensors: &[(&str, &Tensor)], metadata: Option<&str>) -> Vec<u8> {
        let metadata = metadata.map(|m| HashMap::from([("lora_adapter_metadata".to_string(), m.to_string())]));
        safetensors::serialize(tensors.iter().map(|&(k, t)| (k, t)), metadata).unwrap()
    }

    /// A linear layer `l` 7 → 5 with a bias, and a 4-row input.
    struct Linear7to5 {
        weight: Tensor,
        bias: Tensor,
        x: Tensor,
    }

    impl Linear7to5 {
        fn new() -> Self {
            Self { weight: randn(&[5, 7]), bias: randn(&[5]), x: randn(&[4, 7]) }
        }

        fn targets(&self) -> Targets {
            Targets::new([("l.weight".to_string(), vec![5, 7]), ("l.bias".to_string(), vec![5])])
        }

        fn base(&self, dtype: DType) -> VarBuilder<'static> {
            let tensors = HashMap::from([
                ("l.weight".to_string(), self.weight.clone()),
                ("l.bias".to_string(), self.bias.clone()),
            ]);
            VarBuilder::from_tensors(tensors, dtype, &Device::Cpu)
        }

        fn read(&self, bytes: &[u8]) -> Result<Adapter> {
            Adapter::from_bytes(bytes, &Plain, &self.targets(), &ReadOptions::default())
        }

        /// The layer built over `adapters` merged into the weights, applied to `x`.
        fn forward(&self, adapters: Vec<ScaledAdapter>) -> Tensor {
            let vb = merged_var_builder(self.base(DType::F32), adapters);
            candle_nn::linear(7, 5, vb.pp("l")).unwrap().forward(&self.x).unwrap()
        }

        /// `x·Wᵀ + b` for a weight and bias given by hand.
        fn expected(&self, weight: &Tensor, bias: &Tensor) -> Tensor {
            self.x.matmul(&weight.t().unwrap()).unwrap().broadcast_add(bias).unwrap()
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn scaled(adapter: Adapter, scale: f64) -> ScaledAdapter {
        ScaledAdapter { adapter: Arc::new(adapter), scale }
    }

    /// x·(W + s·α/r·B·A)ᵀ + b, with α = 6 and r = 3.
    #[test]
    fn merged_linear_is_the_scaled_low_rank_update() -> Result<()> {
        let layer = Linear7to5::new();
        let (down, up) = (randn(&[3, 7]), randn(&[5, 3]));
        let alpha = Tensor::new(6f32, &Device::Cpu)?;
        let adapter = layer.read(&file(&[("l.down", &down), ("l.up", &up), ("l.alpha", &alpha)], None))?;
        assert_eq!(adapter.tensor_names().collect::<Vec<_>>(), ["l.weight"]);
        let got = layer.forward(vec![scaled(adapter, 0.8)]);
        let weight = (&layer.weight + (up.matmul(&down)? * (0.8 * 6.0 / 3.0))?)?;
        let diff = max_diff(&got, &layer.expected(&weight, &layer.bias));
        assert!(diff < 1e-5, "max abs difference {diff}");
        Ok(())
    }

    /// Without an alpha (or metadata), α = r: the update is s·B·A.
    #[test]
    fn alpha_defaults_to_the_rank() -> Result<()> {
        let layer = Linear7to5::new();
        let (down, up) = (randn(&[2, 7]), randn(&[5, 2]));
        let adapter = layer.read(&file(&[("l.down", &down), ("l.up", &up)], None))?;
        let delta = adapter.delta("l.weight", &Device::Cpu)?.unwrap();
        assert!(max_diff(&delta, &up.matmul(&down)?) < 1e-6);
        assert!(adapter.delta("l.bias", &Device::Cpu)?.is_none());
        Ok(())
    }

    /// Full deltas are added times the adapter's scale only; two adapters add up, each at its own scale; the up
    /// projection's bias is scaled as its pair.
    #[test]
    fn full_deltas_and_two_adapters_add_up() -> Result<()> {
        let layer = Linear7to5::new();
        let (down, up, up_bias) = (randn(&[4, 7]), randn(&[5, 4]), randn(&[5]));
        let alpha = Tensor::new(2f32, &Device::Cpu)?;
        let pair = layer
            .read(&file(&[("l.down", &down), ("l.up", &up), ("l.alpha", &alpha), ("l.up_bias", &up_bias)], None))?;
        let (diff, diff_b) = (randn(&[5, 7]), randn(&[5]));
        let full = layer.read(&file(&[("l.diff", &diff), ("l.diff_b", &diff_b)], None))?;
        let got = layer.forward(vec![scaled(pair, 0.7), scaled(full, 0.5)]);
        let weight = ((&layer.weight + (up.matmul(&down)? * (0.7 * 0.5))?)? + (&diff * 0.5)?)?;
        let bias = ((&layer.bias + (&up_bias * (0.7 * 0.5))?)? + (&diff_b * 0.5)?)?;
        let diff = max_diff(&got, &layer.expected(&weight, &bias));
        assert!(diff < 1e-5, "max abs difference {diff}");
        Ok(())
    }

    /// bf16 weights: the sum is taken in f32, then cast once.
    #[test]
    fn bf16_weights_are_merged_in_f32() -> Result<()> {
        let layer = Linear7to5::new();
        let layer = Linear7to5 { weight: layer.weight.to_dtype(DType::BF16)?, ..layer };
        let (down, up) = (randn(&[3, 7]).to_dtype(DType::BF16)?, randn(&[5, 3]).to_dtype(DType::BF16)?);
        let adapter = layer.read(&file(&[("l.down", &down), ("l.up", &up)], None))?;
        let vb = merged_var_builder(layer.base(DType::BF16), vec![scaled(adapter, 0.3)]);
        let got = vb.get((5, 7), "l.weight")?;
        assert_eq!(got.dtype(), DType::BF16);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let want = (f32(&layer.weight) + (f32(&up).matmul(&f32(&down))? * 0.3)?)?.to_dtype(DType::BF16)?;
        assert_eq!(f32(&got).to_vec2::<f32>()?, f32(&want).to_vec2::<f32>()?);
        // Untouched tensors come through as they are.
        let bias = vb.get(5, "l.bias")?;
        assert_eq!(bias.dtype(), DType::BF16);
        assert_eq!(f32(&bias).to_vec1::<f32>()?, f32(&layer.bias.to_dtype(DType::BF16)?).to_vec1::<f32>()?);
        Ok(())
    }

    /// A convolution's weight `[out, in, k…]`: `A` `[r, in, k…]`, `B` `[out, r, 1…]`.
    #[test]
    fn convolution_weights_take_flattened_pairs() -> Result<()> {
        let targets = Targets::new([("c.weight".to_string(), vec![4, 2, 1, 2, 2])]);
        let (down, up) = (randn(&[3, 2, 1, 2, 2]), randn(&[4, 3, 1, 1, 1]));
        let adapter = Adapter::from_bytes(
            &file(&[("c.down", &down), ("c.up", &up)], None),
            &Plain,
            &targets,
            &ReadOptions::default(),
        )?;
        let got = adapter.delta("c.weight", &Device::Cpu)?.unwrap();
        let want = up.reshape((4, 3))?.matmul(&down.reshape((3, 8))?)?.reshape((4, 2, 1, 2, 2))?;
        assert!(max_diff(&got, &want) < 1e-6);
        Ok(())
    }

    /// diffusers' `lora_adapter_metadata`: `lora_alpha`, an `alpha_pattern` entry, rsLoRA; an `alpha` key wins.
    #[test]
    fn peft_metadata_sets_alpha() -> Result<()> {
        let layer = Linear7to5::new();
        let (down, up) = (randn(&[4, 7]), randn(&[5, 4]));
        let ba = up.matmul(&down)?;
        let scale_of = |metadata: &str, alpha: Option<f32>| -> Result<f32> {
            let alpha = alpha.map(|a| Tensor::new(a, &Device::Cpu).unwrap());
            let mut tensors = vec![("l.down", &down), ("l.up", &up)];
            if let Some(alpha) = &alpha {
                tensors.push(("l.alpha", alpha));
            }
            let adapter = layer.read(&file(&tensors, Some(metadata)))?;
            let delta = adapter.delta("l.weight", &Device::Cpu)?.unwrap();
            (delta.sum_all()? / ba.sum_all()?)?.to_scalar::<f32>()
        };
        let close = |got: f32, want: f32| assert!((got - want).abs() < 1e-4, "scale {got}, want {want}");
        close(scale_of(r#"{"transformer.r": 4, "transformer.lora_alpha": 16}"#, None)?, 4.0);
        close(scale_of(r#"{"transformer.lora_alpha": 16, "transformer.alpha_pattern": {"l": 2}}"#, None)?, 0.5);
        close(scale_of(r#"{"transformer.lora_alpha": 16, "transformer.use_rslora": true}"#, None)?, 8.0);
        // Without `lora_alpha`, PEFT's default of 8; another component's entries don't apply.
        close(scale_of(r#"{"transformer.r": 4}"#, None)?, 2.0);
        close(scale_of(r#"{"text_encoder.lora_alpha": 16}"#, None)?, 1.0);
        close(scale_of(r#"{"transformer.lora_alpha": 16}"#, Some(2.0))?, 0.5);
        let err = scale_of(r#"{"transformer.use_dora": true}"#, None).unwrap_err();
        assert!(err.to_string().contains("DoRA"), "{err}");
        Ok(())
    }

    /// diffusers' split of alpha / r between the factors: powers of two moved to the up projection.
    #[test]
    fn alpha_is_split_as_diffusers_splits_it() {
        assert_eq!(split_scale(2.0), (2.0, 1.0));
        assert_eq!(split_scale(0.75), (0.75, 1.0));
        assert_eq!(split_scale(0.25), (0.5, 0.5));
        assert_eq!(split_scale(1.0 / 32.0), (0.125, 0.25));
    }

    /// A bf16 file's factors are scaled by alpha / r in bf16 (rounded), as diffusers' converter scales them.
    #[test]
    fn alpha_is_folded_into_the_factors_in_their_dtype() -> Result<()> {
        let layer = Linear7to5::new();
        let (down, up) = (randn(&[4, 7]).to_dtype(DType::BF16)?, randn(&[5, 4]).to_dtype(DType::BF16)?);
        let alpha = Tensor::new(1.2f32, &Device::Cpu)?; // alpha / r = 0.3, not a power of two
        let adapter = layer.read(&file(&[("l.down", &down), ("l.up", &up), ("l.alpha", &alpha)], None))?;
        let got = adapter.delta("l.weight", &Device::Cpu)?.unwrap();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let scale = f64::from(1.2f32) / 4.0;
        let folded_down = f32(&(f32(&down) * scale)?.to_dtype(DType::BF16)?);
        assert_eq!(max_diff(&got, &f32(&up).matmul(&folded_down)?), 0.0);
        assert!(max_diff(&got, &(f32(&up).matmul(&f32(&down))? * scale)?) > 0.0);
        Ok(())
    }

    #[test]
    fn parts_that_do_not_fit_are_named() {
        let layer = Linear7to5::new();
        let err = |tensors: &[(&str, &Tensor)]| layer.read(&file(tensors, None)).unwrap_err().to_string();
        let (down, up) = (randn(&[3, 7]), randn(&[5, 3]));

        let wide = randn(&[3, 6]);
        let msg = err(&[("l.down", &wide), ("l.up", &up)]);
        assert!(
            msg.contains("`l.down`") && msg.contains("[3, 6]") && msg.contains("l.weight") && msg.contains("[r, 7]"),
            "{msg}"
        );
        let other_rank = randn(&[5, 2]);
        let msg = err(&[("l.down", &down), ("l.up", &other_rank)]);
        assert!(msg.contains("`l.up`") && msg.contains("[5, 2]") && msg.contains("[5, 3]"), "{msg}");
        let tall = randn(&[6, 3]);
        let msg = err(&[("l.down", &down), ("l.up", &tall)]);
        assert!(msg.contains("`l.up`") && msg.contains("[6, 3]"), "{msg}");
        let diff = randn(&[7, 5]);
        let msg = err(&[("l.diff", &diff)]);
        assert!(msg.contains("`l.diff`") && msg.contains("[7, 5]") && msg.contains("[5, 7]"), "{msg}");
        let diff_b = randn(&[4]);
        let msg = err(&[("l.diff_b", &diff_b)]);
        assert!(msg.contains("`l.diff_b`") && msg.contains("[4]") && msg.contains("l.bias"), "{msg}");
        let alpha = randn(&[2]);
        let msg = err(&[("l.down", &down), ("l.up", &up), ("l.alpha", &alpha)]);
        assert!(msg.contains("`l.alpha`") && msg.contains("one number"), "{msg}");
        let msg = err(&[("l.down", &down)]);
        assert!(msg.contains("`l.down`") && msg.contains("other half"), "{msg}");
        let msg = err(&[("l.alpha", &Tensor::new(1f32, &Device::Cpu).unwrap())]);
        assert!(msg.contains("`l.alpha`") && msg.contains("does not have"), "{msg}");
    }

    #[test]
    fn non_float_tensors_are_refused() {
        let layer = Linear7to5::new();
        let down = Tensor::zeros((3, 7), DType::I64, &Device::Cpu).unwrap();
        let up = randn(&[5, 3]);
        let msg = layer.read(&file(&[("l.down", &down), ("l.up", &up)], None)).unwrap_err().to_string();
        assert!(msg.contains("`l.down`") && msg.contains("I64") && msg.contains("floating point"), "{msg}");
    }

    /// A key naming nothing of the network fails the read, named; allowed, it is listed and the rest applies.
    /// Ignored keys are listed apart.
    #[test]
    fn unmatched_keys_are_named_or_listed() -> Result<()> {
        let layer = Linear7to5::new();
        let (down, up, other) = (randn(&[3, 7]), randn(&[5, 3]), randn(&[2]));
        let bytes =
            file(&[("l.down", &down), ("l.up", &up), ("m.down", &other), ("l.what", &other), ("l.skip", &other)], None);
        let msg = layer.read(&bytes).unwrap_err().to_string();
        assert!(msg.contains("2 key(s)") && msg.contains("`l.what`") && msg.contains("`m.down`"), "{msg}");
        let options = ReadOptions { allow_unmatched: true, ..Default::default() };
        let adapter = Adapter::from_bytes(&bytes, &Plain, &layer.targets(), &options)?;
        assert_eq!(adapter.unmatched(), ["l.what", "m.down"]);
        assert_eq!(adapter.ignored(), [IgnoredKey { key: "l.skip".to_string(), reason: "skipped" }]);
        assert!(adapter.changes("l.weight"));
        Ok(())
    }

    #[test]
    fn limits_are_checked_before_reading() {
        let layer = Linear7to5::new();
        let (down, up) = (randn(&[3, 7]), randn(&[5, 3]));
        let bytes = file(&[("l.down", &down), ("l.up", &up)], None);
        let read = |limits| {
            Adapter::from_bytes(&bytes, &Plain, &layer.targets(), &ReadOptions { limits, ..Default::default() })
        };
        let msg = read(Limits { max_tensors: 1, ..Default::default() }).unwrap_err().to_string();
        assert!(msg.contains("2 tensors"), "{msg}");
        let msg = read(Limits { max_file_bytes: 100, ..Default::default() }).unwrap_err().to_string();
        assert!(msg.contains("over the limit of 100"), "{msg}");
        let msg = Adapter::from_bytes(&bytes[..bytes.len() - 1], &Plain, &layer.targets(), &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a valid safetensors file"), "{msg}");
    }
}
