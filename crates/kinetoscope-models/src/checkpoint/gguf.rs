//! The header of a GGUF file (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>), read with every count
//! and length checked against the file's size and [`Limits`] before anything is allocated.
//!
//! candle has a GGUF reader, but it refuses tensors of more than 4 dimensions, and city96's Wan files store the
//! 5-D patch embedding as one (ComfyUI-GGUF's `fix_5d_tensors`); so the header is read here and candle takes over
//! for the tensors' blocks (`qtensor_from_ggml`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{bail, Error, Result};

use super::Limits;

/// Where city96's converter records the real shape of a tensor it stored flattened.
pub(super) const ORIG_SHAPE: &str = "comfy.gguf.orig_shape.";

/// The most dimensions a tensor may have (ggml has 4; city96's 5-D tensors are the reason this is more).
const MAX_DIMS: u32 = 8;
/// The longest string (a key, a tensor's name, a metadata value) read.
const MAX_STRING: u64 = 1 << 20;

pub(super) struct TensorInfo {
    pub(super) name: String,
    /// PyTorch's order (ggml's reversed).
    pub(super) dims: Vec<usize>,
    pub(super) dtype: GgmlDType,
    /// From the start of the data section.
    pub(super) offset: u64,
}

pub(super) struct Header {
    pub(super) tensors: Vec<TensorInfo>,
    /// `comfy.gguf.orig_shape.<tensor>`, PyTorch's order.
    pub(super) orig_shapes: BTreeMap<String, Vec<usize>>,
    pub(super) data_offset: u64,
    pub(super) file_len: u64,
    /// `general.architecture`: `wan` for city96's transformers, `t5encoder` for their umT5 encoders.
    pub(super) architecture: Option<String>,
}

/// A reader that knows how much of the header it may still read.
struct Bounded {
    reader: BufReader<File>,
    position: u64,
    /// Where reading must stop: the file's end or the header limit, whichever is first.
    end: u64,
    file_len: u64,
}

impl Bounded {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.end.saturating_sub(self.position) {
            if self.end < self.file_len {
                bail!("its header is over the limit of {} bytes (at {what})", self.end)
            }
            bail!(
                "truncated: {what} needs {n} bytes at byte {}, past the file's end ({} bytes)",
                self.position,
                self.file_len
            )
        }
        let mut buffer = vec![0u8; n as usize];
        self.reader.read_exact(&mut buffer)?;
        self.position += n;
        Ok(buffer)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64, what)?.try_into().expect("N bytes were read"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            bail!("{what}: a string of {len} bytes, over the limit of {MAX_STRING}")
        }
        String::from_utf8(self.bytes(len, what)?).map_err(|_| Error::Msg(format!("{what}: not UTF-8")))
    }
}

/// A metadata value, kept where it is one this reader uses.
enum Value {
    Integer(i128),
    String(String),
    Array(Vec<Value>),
    Other,
}

/// Bytes of one value of each scalar type; `None` for strings and arrays.
fn scalar_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_value(r: &mut Bounded, value_type: u32, key: &str, depth: usize) -> Result<Value> {
    let integer = |bytes: &[u8], signed: bool| -> i128 {
        let mut wide = [if signed && bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 }; 16];
        wide[..bytes.len()].copy_from_slice(bytes);
        i128::from_le_bytes(wide)
    };
    Ok(match value_type {
        0 | 2 | 4 | 10 => Value::Integer(integer(&r.bytes(scalar_size(value_type).unwrap(), key)?, false)),
        1 | 3 | 5 | 11 => Value::Integer(integer(&r.bytes(scalar_size(value_type).unwrap(), key)?, true)),
        6 | 7 | 12 => {
            r.bytes(scalar_size(value_type).unwrap(), key)?;
            Value::Other
        }
        8 => Value::String(r.string(key)?),
        9 => {
            if depth > 4 {
                bail!("`{key}`: arrays nested too deep")
            }
            let element_type = r.u32(key)?;
            let len = r.u64(key)?;
            // Each element takes at least a byte (a string its 8-byte length): a count the file can't hold is a
            // lie, refused before anything is allocated for it.
            let least = scalar_size(element_type).unwrap_or(8);
            if len.saturating_mul(least) > r.end.saturating_sub(r.position) {
                bail!("`{key}`: an array of {len} elements does not fit in the file")
            }
            let keep = key.starts_with(ORIG_SHAPE);
            let mut items = Vec::new();
            for _ in 0..len {
                let item = read_value(r, element_type, key, depth + 1)?;
                if keep {
                    items.push(item);
                }
            }
            Value::Array(items)
        }
        other => bail!("`{key}`: unknown metadata value type {other}"),
    })
}

/// ggml's type of id `id`, where candle reads it; the error names the others.
fn ggml_type(id: u32, tensor: &str) -> Result<GgmlDType> {
    Ok(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        other => {
            let name = match other {
                16 => "IQ2_XXS",
                17 => "IQ2_XS",
                18 => "IQ3_XXS",
                19 => "IQ1_S",
                20 => "IQ4_NL",
                21 => "IQ3_S",
                22 => "IQ2_S",
                23 => "IQ4_XS",
                24 => "I8",
                25 => "I16",
                26 => "I32",
                27 => "I64",
                28 => "F64",
                29 => "IQ1_M",
                34 => "TQ1_0",
                35 => "TQ2_0",
                _ => "an unknown type",
            };
            bail!(
                "`{tensor}` is GGUF tensor type {other} ({name}), which is not supported: F32, F16, BF16, Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K are"
            )
        }
    })
}

pub(super) fn read_header(path: &Path, limits: &Limits) -> Result<Header> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r =
        Bounded { reader: BufReader::new(file), position: 0, end: file_len.min(limits.max_header_bytes), file_len };
    r.bytes(4, "the magic")?;
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        bail!("GGUF version {version}: versions 2 and 3 are read")
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    if tensor_count > limits.max_tensors as u64 {
        bail!("it has {tensor_count} tensors, over the limit of {}", limits.max_tensors)
    }
    let mut alignment = 32u64;
    let mut architecture = None;
    let mut orig_shapes = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let value_type = r.u32(&key)?;
        let value = read_value(&mut r, value_type, &key, 0)?;
        match (key.as_str(), value) {
            ("general.alignment", Value::Integer(n)) => {
                alignment = u64::try_from(n)
                    .ok()
                    .filter(|n| n.is_power_of_two())
                    .ok_or_else(|| Error::Msg(format!("general.alignment {n} is not a power of two")))?;
            }
            ("general.architecture", Value::String(name)) => architecture = Some(name),
            (key, Value::Array(items)) if key.starts_with(ORIG_SHAPE) => {
                let dims = items
                    .iter()
                    .map(|item| match item {
                        Value::Integer(n) => usize::try_from(*n).ok(),
                        _ => None,
                    })
                    .collect::<Option<Vec<usize>>>()
                    .filter(|dims| !dims.is_empty() && dims.len() <= MAX_DIMS as usize)
                    .ok_or_else(|| Error::Msg(format!("`{key}` is not a shape")))?;
                orig_shapes.insert(key[ORIG_SHAPE.len()..].to_string(), dims);
            }
            _ => {}
        }
    }
    let mut tensors = Vec::new();
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("`{name}` has {n_dims} dimensions; 1 to {MAX_DIMS} are read")
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let dim =
                usize::try_from(r.u64(&name)?).map_err(|_| Error::Msg(format!("`{name}`: a dimension too large")))?;
            dims.push(dim);
        }
        dims.reverse();
        if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none_or(|n| n as u64 > file_len.saturating_mul(16))
        {
            bail!("`{name}` has shape {dims:?}, more elements than the file can hold")
        }
        let dtype = ggml_type(r.u32(&name)?, &name)?;
        let offset = r.u64(&name)?;
        tensors.push(TensorInfo { name, dims, dtype, offset });
    }
    let data_offset = r.position.div_ceil(alignment) * alignment;
    Ok(Header { tensors, orig_shapes, data_offset, file_len, architecture })
}
