//! One checkpoint file's tensors, in the formats people download: safetensors (F32/F16/BF16/F64, and FP8 e4m3,
//! plain or "scaled" with a per-tensor scale) and GGUF (city96's files: ggml's quantized types, F16/F32/BF16 for
//! the small tensors, tensors of more than 4 dimensions stored flattened with their shape in the metadata).
//!
//! A tensor is read dense ([`Checkpoint::dense`]: dequantized, scaled, in its real shape) or, for a linear layer's
//! weight stored FP8 or quantized, compact ([`Checkpoint::compact`], see [`crate::compact`]).
//!
//! **Scaled FP8.** ComfyUI's scaled files mark themselves with an empty `scaled_fp8` tensor and give each FP8
//! weight `<layer>.weight` a scale `<layer>.scale_weight`; other tools name it `<layer>.weight_scale`. The weight
//! is `fp8 × scale`. Only per-tensor scales (one value) exist in the Wan files; anything else is refused. Input
//! scales (`scale_input`, `input_scale`) serve FP8 matrix products of the activations, which this path doesn't
//! do (it dequantizes the weight), so they are read past, and listed by [`Checkpoint::ignored`].
//!
//! **Untrusted files.** Headers are bounded before they are parsed (safetensors: [`Limits`]; GGUF: candle's reader
//! checks every count and length against the file's size), every tensor's bytes must lie inside the file, and
//! every error names the file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::compact::{ggml_name, Compact, CompactSource, CompactWeight};

mod gguf;

/// Bounds on an untrusted checkpoint, checked before its header is parsed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_header_bytes: u64,
    pub max_tensors: usize,
}

impl Default for Limits {
    /// 16 MiB and 100 000 tensors: a 14B Wan transformer has 1 015 tensors (1 303 for I2V) and a header of about
    /// 150 KB, a ComfyUI checkpoint with its text encoder and VAE about twice that.
    fn default() -> Self {
        Self { max_header_bytes: 16 << 20, max_tensors: 100_000 }
    }
}

/// How a tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A floating-point safetensors tensor (F32, F16, BF16, F64).
    Float(DType),
    /// Safetensors `F8_E4M3`, times its scale if it has one.
    Fp8 { scaled: bool },
    /// A GGUF tensor of this ggml type (F32, F16 and BF16 included).
    Ggml(GgmlDType),
}

impl Format {
    /// As files name it: `BF16`, `F8_E4M3`, `F8_E4M3 (scaled)`, `Q4_K`.
    pub fn name(&self) -> String {
        match self {
            Self::Float(dtype) => format!("{dtype:?}").to_uppercase(),
            Self::Fp8 { scaled: false } => "F8_E4M3".into(),
            Self::Fp8 { scaled: true } => "F8_E4M3 (scaled)".into(),
            Self::Ggml(dtype) => ggml_name(*dtype).into(),
        }
    }

    /// Whether a linear layer keeps it compact: FP8, or a quantized ggml type.
    pub fn is_compact(&self) -> bool {
        match self {
            Self::Float(_) => false,
            Self::Fp8 { .. } => true,
            Self::Ggml(dtype) => !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16),
        }
    }
}

/// One tensor of the file.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its shape, in PyTorch's order (a GGUF tensor's original shape where the file records one).
    pub dims: Vec<usize>,
    pub format: Format,
    /// Bytes it takes in the file.
    pub bytes: u64,
    /// A scaled FP8 tensor's scale.
    scale: Option<f32>,
}

enum Storage {
    Safetensors(MmapedSafetensors),
    /// The file, and each tensor's type, shape as stored (ggml's order reversed: PyTorch's) and byte offset.
    Gguf {
        file: Mutex<File>,
        tensors: BTreeMap<String, GgufTensor>,
        architecture: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct GgufTensor {
    dtype: GgmlDType,
    dims: Vec<usize>,
    start: u64,
}

/// A checkpoint file, its header read and checked; the data is read as tensors are asked for (safetensors are
/// memory-mapped).
pub struct Checkpoint {
    path: PathBuf,
    storage: Storage,
    tensors: BTreeMap<String, Stored>,
    ignored: Vec<String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl Checkpoint {
    /// Opens `path` (untrusted), a safetensors or GGUF file by its first bytes, within `limits`.
    pub fn open(path: &Path, limits: &Limits) -> Result<Arc<Self>> {
        let mut magic = [0u8; 4];
        let read = File::open(path).and_then(|mut f| f.read(&mut magic))?;
        let checkpoint = if read == 4 && &magic == GGUF_MAGIC {
            Self::open_gguf(path, limits)
        } else {
            Self::open_safetensors(path, limits)
        }?;
        if checkpoint.tensors.len() > limits.max_tensors {
            bail!("it has {} tensors, over the limit of {}", checkpoint.tensors.len(), limits.max_tensors)
        }
        Ok(Arc::new(checkpoint))
    }

    fn open_safetensors(path: &Path, limits: &Limits) -> Result<Self> {
        check_safetensors_header(path, limits)?;
        // SAFETY: the file is mapped read-only; one truncated by another process meanwhile is undefined behaviour,
        // which checkpoint files (written once) don't see.
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| Error::Msg(format!("not a valid safetensors file: {e}")))?;
        let views = st.tensors();
        if views.len() > limits.max_tensors {
            bail!("it has {} tensors, over the limit of {}", views.len(), limits.max_tensors)
        }
        let marked_scaled = views.iter().any(|(key, _)| key == "scaled_fp8" || key.ends_with(".scaled_fp8"));
        let mut scales = BTreeMap::new();
        let (mut tensors, mut ignored) = (BTreeMap::new(), Vec::new());
        for (key, view) in &views {
            if key == "scaled_fp8" || key.ends_with(".scaled_fp8") || is_input_scale(key) {
                ignored.push(key.clone());
                continue;
            }
            if let Some(layer) = key.strip_suffix(".scale_weight").or_else(|| key.strip_suffix(".weight_scale")) {
                if view.shape().iter().product::<usize>() != 1 {
                    bail!("`{key}` has shape {:?}: only per-tensor FP8 scales (one value) are supported", view.shape())
                }
                let scale = st.load(key, &Device::Cpu)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?[0];
                if !scale.is_finite() {
                    bail!("`{key}` is {scale}, not a finite scale")
                }
                scales.insert(format!("{layer}.weight"), (key.clone(), scale));
                continue;
            }
            let format = match view.dtype() {
                safetensors::Dtype::F16 => Format::Float(DType::F16),
                safetensors::Dtype::BF16 => Format::Float(DType::BF16),
                safetensors::Dtype::F32 => Format::Float(DType::F32),
                safetensors::Dtype::F64 => Format::Float(DType::F64),
                safetensors::Dtype::F8_E4M3 => Format::Fp8 { scaled: false },
                other => bail!(
                    "`{key}` is {other:?}; tensors must be F16, BF16, F32, F64 or F8_E4M3 (FP8 e4m3, plain or scaled)"
                ),
            };
            let bytes = view.data().len() as u64;
            tensors.insert(key.clone(), Stored { dims: view.shape().to_vec(), format, bytes, scale: None });
        }
        drop(views);
        for (weight, (key, scale)) in scales {
            match tensors.get_mut(&weight) {
                Some(stored) if matches!(stored.format, Format::Fp8 { .. }) => {
                    stored.format = Format::Fp8 { scaled: true };
                    stored.scale = Some(scale);
                }
                Some(stored) => bail!("`{key}` scales `{weight}`, which is {}, not FP8", stored.format.name()),
                None => bail!("`{key}` scales `{weight}`, which the file lacks"),
            }
        }
        if marked_scaled {
            if let Some((key, _)) = tensors.iter().find(|(_, s)| s.format == Format::Fp8 { scaled: false }) {
                bail!("the file is scaled FP8 (it has `scaled_fp8`) but `{key}` has no scale (`scale_weight`)")
            }
        }
        ignored.sort_unstable();
        Ok(Self { path: path.to_path_buf(), storage: Storage::Safetensors(st), tensors, ignored })
    }

    fn open_gguf(path: &Path, limits: &Limits) -> Result<Self> {
        let header = gguf::read_header(path, limits)?;
        let mut tensors = BTreeMap::new();
        let mut located = BTreeMap::new();
        for info in header.tensors {
            let (key, dtype) = (info.name, info.dtype);
            let elements: usize = info.dims.iter().product();
            let block = dtype.block_size();
            // Blocks run along the innermost dimension (a row of a linear weight: its input).
            if info.dims.last().is_some_and(|&inner| inner % block != 0) {
                bail!(
                    "`{key}` is {} of shape {:?}, whose rows are no whole number of its blocks of {block}",
                    ggml_name(dtype),
                    info.dims
                )
            }
            let bytes = (elements / block * dtype.type_size()) as u64;
            let start = header
                .data_offset
                .checked_add(info.offset)
                .filter(|start| start.checked_add(bytes).is_some_and(|end| end <= header.file_len));
            let Some(start) = start else {
                bail!(
                    "truncated: `{key}` ({}, {bytes} bytes at offset {}) does not fit in the file's {} bytes",
                    ggml_name(dtype),
                    info.offset,
                    header.file_len
                )
            };
            let dims = match header.orig_shapes.get(&key) {
                None => info.dims.clone(),
                Some(dims) if dims.iter().product::<usize>() == elements => dims.clone(),
                Some(dims) => {
                    bail!(
                        "`{}{key}` is {dims:?}, which doesn't hold the tensor's {elements} elements",
                        gguf::ORIG_SHAPE
                    )
                }
            };
            tensors.insert(key.clone(), Stored { dims, format: Format::Ggml(dtype), bytes, scale: None });
            located.insert(key, GgufTensor { dtype, dims: info.dims, start });
        }
        let storage =
            Storage::Gguf { file: Mutex::new(File::open(path)?), tensors: located, architecture: header.architecture };
        Ok(Self { path: path.to_path_buf(), storage, tensors, ignored: Vec::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's tensors by key (scales and markers are not tensors of their own here).
    pub fn tensors(&self) -> &BTreeMap<String, Stored> {
        &self.tensors
    }

    /// Keys read past: the scaled-FP8 marker and input scales.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// A GGUF file's `general.architecture` (`wan`, `t5encoder`); `None` for safetensors or a GGUF file without one.
    pub fn architecture(&self) -> Option<&str> {
        match &self.storage {
            Storage::Gguf { architecture, .. } => architecture.as_deref(),
            Storage::Safetensors(_) => None,
        }
    }

    fn stored(&self, key: &str) -> Result<&Stored> {
        self.tensors.get(key).ok_or_else(|| Error::Msg(format!("no tensor `{key}`")))
    }

    /// Tensor `key` dense in `dtype` on `device`: FP8 cast and scaled, ggml blocks dequantized, in its real shape.
    pub fn dense(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let stored = self.stored(key)?;
        let tensor = match (&self.storage, stored.scale) {
            (Storage::Safetensors(st), None) => st.load(key, device)?,
            (Storage::Safetensors(st), Some(scale)) => {
                st.load(key, device)?.to_dtype(DType::F32)?.affine(f64::from(scale), 0.0)?
            }
            // Dequantized on the CPU, then moved: these are the small tensors (norms, biases, modulation, the patch
            // embedding), and the CPU reads every ggml type, F16 and BF16 included, on any build.
            (Storage::Gguf { .. }, _) => {
                let cpu = Device::Cpu;
                self.ggml(key, &cpu)?.dequantize(&cpu)?.reshape(stored.dims.as_slice())?.to_device(device)?
            }
        };
        tensor.to_dtype(dtype)
    }

    /// Tensor `key` compact on `device` if it is stored FP8 or quantized; `None` if it is stored as floats.
    pub fn compact(&self, key: &str, device: &Device) -> Result<Option<CompactWeight>> {
        let stored = self.stored(key)?;
        if !stored.format.is_compact() || stored.dims.len() != 2 {
            return Ok(None);
        }
        Ok(Some(match &self.storage {
            Storage::Safetensors(st) => CompactWeight::Fp8 { weight: st.load(key, device)?, scale: stored.scale },
            Storage::Gguf { .. } => CompactWeight::Ggml(Arc::new(self.ggml(key, device)?)),
        }))
    }

    /// GGUF tensor `key` as ggml blocks on `device`, in the shape it is stored in.
    fn ggml(&self, key: &str, device: &Device) -> Result<QTensor> {
        let Storage::Gguf { file, tensors, .. } = &self.storage else { bail!("`{key}` is not a GGUF tensor") };
        let (Some(tensor), Some(stored)) = (tensors.get(key), self.tensors.get(key)) else {
            bail!("no tensor `{key}`")
        };
        let mut data = vec![0u8; stored.bytes as usize];
        {
            let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            file.seek(SeekFrom::Start(tensor.start))?;
            file.read_exact(&mut data)?;
        }
        qtensor_from_ggml(tensor.dtype, &data, tensor.dims.clone(), device)
    }

    /// The formats of its tensors and how many of each, for messages and the sidecar: `Q4_K ×400, F32 ×615`.
    pub fn format_summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for stored in self.tensors.values() {
            *counts.entry(stored.format.name()).or_default() += 1;
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        counts.iter().map(|(name, n)| format!("{name} ×{n}")).collect::<Vec<_>>().join(", ")
    }
}

/// `checkpoint`'s tensors under a network's own names (`keys`: the network's name → the file's key): a `VarBuilder`
/// serving them dense, converted to `dtype` (or the dtype the network asks for) on `device` as they are read, and
/// the linear weights stored FP8 or quantized, kept compact. Errors start with `label` (which names the file); a
/// name the file lacks is followed by `hint(name)`.
pub fn renamed_weights(
    checkpoint: Arc<Checkpoint>,
    keys: HashMap<String, String>,
    label: String,
    hint: fn(&str) -> String,
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, Compact) {
    let renamed = Arc::new(Renamed { checkpoint, keys, label, hint });
    let compact = Compact::new(RenamedCompact(renamed.clone()));
    (VarBuilder::from_backend(Box::new(RenamedBackend(renamed)), dtype, device.clone()), compact)
}

struct Renamed {
    checkpoint: Arc<Checkpoint>,
    keys: HashMap<String, String>,
    label: String,
    hint: fn(&str) -> String,
}

impl Renamed {
    fn key(&self, name: &str) -> Result<&str> {
        self.keys
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::Msg(format!("{}: no tensor for `{name}`{}", self.label, (self.hint)(name))))
    }

    fn reading<'a>(&'a self, key: &'a str) -> impl Fn(Error) -> Error + 'a {
        move |e| Error::Msg(format!("{}: reading `{key}`: {e}", self.label))
    }
}

/// The linear weights stored FP8 or quantized, by the network's layer names.
struct RenamedCompact(Arc<Renamed>);

impl CompactSource for RenamedCompact {
    fn linear(&self, name: &str, _out_dim: usize, _in_dim: usize, device: &Device) -> Result<Option<CompactWeight>> {
        let renamed = &self.0;
        let Some(key) = renamed.keys.get(&format!("{name}.weight")) else { return Ok(None) };
        renamed.checkpoint.compact(key, device).map_err(renamed.reading(key))
    }
}

/// [`Renamed`] as a `VarBuilder`'s backend (shared with [`RenamedCompact`]).
struct RenamedBackend(Arc<Renamed>);

impl SimpleBackend for RenamedBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (renamed, key) = (&self.0, self.0.key(name)?);
        let dims = &renamed.checkpoint.tensors[key].dims;
        if dims.as_slice() != s.dims() {
            bail!("{}: `{key}` has shape {dims:?}, where the network's `{name}` is {:?}", renamed.label, s.dims())
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let (renamed, key) = (&self.0, self.0.key(name)?);
        renamed.checkpoint.dense(key, dtype, dev).map_err(renamed.reading(key))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.keys.contains_key(name)
    }
}

/// At most `max` of `names`, backquoted, and how many more: for errors that name a file's keys.
pub(crate) fn listed<'a>(names: impl IntoIterator<Item = &'a str>, max: usize) -> String {
    let names: Vec<&str> = names.into_iter().collect();
    let mut out = names.iter().take(max).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.len() > max {
        out.push_str(&format!(" and {} more", names.len() - max));
    }
    out
}

fn is_input_scale(key: &str) -> bool {
    key.ends_with(".scale_input") || key.ends_with(".input_scale")
}

/// Reads the 8-byte header length and checks it against the file's size and `limits` before anything is parsed.
fn check_safetensors_header(path: &Path, limits: &Limits) -> Result<()> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(|_| Error::Msg(format!("not a safetensors or GGUF file: {len} bytes")))?;
    let header = u64::from_le_bytes(prefix);
    if header > limits.max_header_bytes {
        bail!("its header is {header} bytes, over the limit of {}", limits.max_header_bytes)
    }
    if header > len - 8 {
        bail!("not a safetensors or GGUF file: a header of {header} bytes in a file of {len}")
    }
    Ok(())
}
