//! Compact linear weights ([`kinetoscope_models::compact`]) against dense bf16: the resident memory of the Wan 2.1
//! T2V 1.3B transformer (its real shapes, random weights, on the CPU) held as bf16, FP8, Q8_0 and Q4_K. For each
//! format it measures the resident-set growth of loading the model, the peak during the load (each linear weight is
//! made, quantized and dropped one at a time, so the whole model is never dense), and the peak during one forward
//! on a small input (each layer's weight is dequantized as the layer runs, then dropped), and compares them with the
//! bytes the weights should take: compact linear weights at [`Quantization::bytes`], every other tensor at its
//! dtype's size (bf16, and f32 where the network keeps a part in f32). Every figure is growth over the resident set
//! before the load, the forward's peak included (so it counts the weights too).
//!
//! ```sh
//! cargo bench -p kinetoscope-models --bench compact_memory
//! ```
//!
//! The bench exits non-zero if the resident growth is not within 10% (+ 64 MiB) of the weights' bytes, if a peak
//! exceeds the weights' bytes plus three of the largest linear weight dense in f32 (+ 256 MiB), or if a compact
//! format does not stay well under bf16 (resident under 60% of it, peaks under its resident growth).
//!
//! Linux only: memory is read from `/proc/self/status` (`VmRSS`, `VmHWM`, reset through `/proc/self/clear_refs`).
//! Each format runs in its own process (the bench runs itself with `--format NAME`), with glibc's mmap threshold
//! fixed low (`MALLOC_MMAP_THRESHOLD_`) so that what a step frees leaves the resident set; about 3 GiB at most.

#[path = "common/wan_1_3b.rs"]
mod wan_1_3b;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{bail, DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use kinetoscope_models::compact::{Compact, CompactSource, CompactWeight, Quantization, QuantizeOnLoad};
use kinetoscope_models::wan::single_file::model_shapes;
use kinetoscope_models::wan::transformer::{Config, WanTransformer3DModel};
use wan_1_3b::{config, RandomWeights};

const MIB: f64 = (1 << 20) as f64;
/// The formats in the table's order; `bf16` is dense.
const FORMATS: [&str; 4] = ["bf16", "fp8", "q8_0", "q4_k"];
/// Latents `[B, C, T, H, W]` of the forward (64 tokens) and its text length.
const LATENTS: (usize, usize, usize, usize, usize) = (1, 16, 1, 16, 16);
const TEXT_TOKENS: usize = 16;

/// Kilobytes on the line of `/proc/self/status` that starts with `field`.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status (Linux)");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number of kB")
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting the peak resident set (Linux ≥ 4.0)");
}

/// Tensors by name: shape and the dtype the network holds them in.
type Tensors = BTreeMap<String, (Vec<usize>, DType)>;

/// Notes each tensor's shape and the dtype the network asks for it in; hands back a zero broadcast to the shape.
#[derive(Default)]
struct Recorder(Arc<Mutex<Tensors>>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.lock().unwrap().insert(name.to_string(), (s.dims().to_vec(), dtype));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        bail!("the Wan transformer asked for `{name}` without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor a bf16 model reads, by name: its shape and the dtype it is held in.
fn tensors(cfg: &Config) -> Tensors {
    let recorder = Recorder::default();
    let seen = recorder.0.clone();
    WanTransformer3DModel::new(cfg, VarBuilder::from_backend(Box::new(recorder), DType::BF16, Device::Cpu))
        .expect("the shape recorder builds the model");
    let seen = seen.lock().unwrap().clone();
    let shapes: BTreeMap<String, Vec<usize>> = seen.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    assert_eq!(shapes, model_shapes(cfg).expect("model_shapes"), "the recorder and single_file::model_shapes agree");
    seen
}

/// `[out, in]` of a linear layer's weight (the 2-D `.weight` tensors), by the layer's name.
fn linear_dims(tensors: &Tensors) -> BTreeMap<String, (usize, usize)> {
    tensors
        .iter()
        .filter_map(|(name, (shape, _))| match (name.strip_suffix(".weight"), shape.as_slice()) {
            (Some(layer), [out, inp]) => Some((layer.to_string(), (*out, *inp))),
            _ => None,
        })
        .collect()
}

/// What the weights should take in `format`: compact linear weights at their format's size, everything else at its
/// dtype's.
fn expected_bytes(tensors: &Tensors, format: Option<Quantization>) -> u64 {
    let linears = linear_dims(tensors);
    tensors
        .iter()
        .map(|(name, (shape, dtype))| {
            let compact = name
                .strip_suffix(".weight")
                .and_then(|layer| linears.get(layer))
                .and_then(|&(out, inp)| format.and_then(|q| q.bytes(out, inp)));
            compact.unwrap_or((shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64)
        })
        .sum()
}

fn quantization(format: &str) -> Option<Quantization> {
    match format {
        "bf16" => None,
        name => Some(name.parse().unwrap_or_else(|e| panic!("{e}"))),
    }
}

/// [`QuantizeOnLoad`], noting which layers it made compact and the bytes they hold.
struct Counting {
    inner: QuantizeOnLoad,
    made: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl CompactSource for Counting {
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize, device: &Device) -> Result<Option<CompactWeight>> {
        let weight = self.inner.linear(name, out_dim, in_dim, device)?;
        if let Some(weight) = &weight {
            self.made.lock().unwrap().insert(name.to_string(), weight.bytes());
        }
        Ok(weight)
    }
}

/// One format's measurements (a child process's answer), in bytes and seconds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Measured {
    format: String,
    compact_formats: Vec<String>,
    resident: u64,
    load_peak: u64,
    forward_peak: u64,
    load_s: f64,
    forward_s: f64,
}

/// The child: loads the model in `format`, runs one forward, prints a `RESULT {json}` line.
fn measure(format: &str) -> Measured {
    let cfg = config();
    let dev = Device::Cpu;
    let q = quantization(format);
    // The inputs and the shapes first, so that the baseline holds them.
    let shapes = tensors(&cfg);
    let (b, c, t, h, w) = LATENTS;
    let latents = Tensor::randn(0f32, 1.0, (b, c, t, h, w), &dev).unwrap();
    let timestep = Tensor::new(&[500f32], &dev).unwrap();
    let text = Tensor::randn(0f32, 1.0, (b, TEXT_TOKENS, cfg.text_dim), &dev).unwrap();

    reset_peak();
    let before = status_kib("VmRSS:");
    let start = Instant::now();
    let bf16 = VarBuilder::from_backend(Box::new(RandomWeights), DType::BF16, dev.clone());
    let (model, made) = match q {
        None => (WanTransformer3DModel::new(&cfg, bf16).unwrap(), BTreeMap::new()),
        Some(q) => {
            // The source makes each linear weight in f32, which is what QuantizeOnLoad reads it as.
            let f32s = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, dev.clone());
            let made = Arc::new(Mutex::new(BTreeMap::new()));
            let compact = Compact::new(Counting { inner: QuantizeOnLoad::new(f32s, q), made: made.clone() });
            let model = WanTransformer3DModel::with_compact(&cfg, bf16, &compact).unwrap();
            let made = std::mem::take(&mut *made.lock().unwrap());
            (model, made)
        }
    };
    let load_s = start.elapsed().as_secs_f64();
    let after = status_kib("VmRSS:");
    let load_peak = status_kib("VmHWM:");

    // The expectation counts every linear weight the format keeps compact; check the model kept those.
    if let Some(q) = q {
        let want: BTreeMap<String, usize> = linear_dims(&shapes)
            .into_iter()
            .filter_map(|(layer, (out, inp))| Some((layer, q.bytes(out, inp)? as usize)))
            .collect();
        assert_eq!(made, want, "{format}: the layers kept compact and their bytes are the ones expected");
    }

    reset_peak();
    let start = Instant::now();
    let out = model.forward(&latents, &timestep, &text, None).unwrap();
    let forward_s = start.elapsed().as_secs_f64();
    let forward_peak = status_kib("VmHWM:");
    assert_eq!(out.dims5().unwrap(), LATENTS, "the forward's output shape");
    let finite = out.to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(finite.is_finite(), "{format}: the forward's output is finite");

    Measured {
        format: format.to_string(),
        compact_formats: model.compact_formats(),
        resident: after.saturating_sub(before) * 1024,
        load_peak: load_peak.saturating_sub(before) * 1024,
        forward_peak: forward_peak.saturating_sub(before) * 1024,
        load_s,
        forward_s,
    }
}

/// Runs `format` in a child process with the mmap threshold fixed low; its measurements.
fn run_child(format: &str) -> Measured {
    let output = Command::new(std::env::current_exe().expect("this bench's path"))
        .args(["--format", format])
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .stderr(Stdio::inherit())
        .output()
        .expect("the bench runs itself again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        eprintln!("{stdout}");
        eprintln!("the {format} run failed: {}", output.status);
        std::process::exit(1);
    }
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("a RESULT line from the child");
    serde_json::from_str(line).expect("the child's RESULT")
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--format") {
        let format = args.get(i + 1).expect("--format NAME");
        assert!(FORMATS.contains(&format.as_str()), "--format: one of {FORMATS:?}");
        let measured = measure(format);
        println!("RESULT {}", serde_json::to_string(&measured).unwrap());
        return;
    }

    let cfg = config();
    let shapes = tensors(&cfg);
    let linears = linear_dims(&shapes);
    let params: usize = shapes.values().map(|(s, _)| s.iter().product::<usize>()).sum();
    let linear_params: usize = linears.values().map(|(o, i)| o * i).sum();
    let (largest_name, largest) = linears.iter().max_by_key(|(_, (o, i))| o * i).map(|(n, (o, i))| (n, o * i)).unwrap();
    let largest_f32 = (largest * 4) as u64;
    println!(
        "Wan 2.1 T2V 1.3B transformer: {params} parameters, {linear_params} in {} linear weights; the largest, \
         `{largest_name}`, is {} MiB in f32. Forward: latents {LATENTS:?}, {TEXT_TOKENS} text tokens.",
        linears.len(),
        mib(largest_f32)
    );
    println!();

    let mut rows = Vec::new();
    for format in FORMATS {
        eprintln!("{format}...");
        let measured = run_child(format);
        let expected = expected_bytes(&shapes, quantization(format));
        rows.push((measured, expected));
    }

    println!(
        "| format | compact_formats() | weights MiB (expected) | resident after load MiB | resident / expected | \
         peak during load MiB | peak during forward MiB | load s | forward s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (m, expected) in &rows {
        let formats = if m.compact_formats.is_empty() { "—".to_string() } else { m.compact_formats.join(", ") };
        println!(
            "| {} | {formats} | {} | {} | {:.3} | {} | {} | {:.1} | {:.2} |",
            m.format,
            mib(*expected),
            mib(m.resident),
            m.resident as f64 / *expected as f64,
            mib(m.load_peak),
            mib(m.forward_peak),
            m.load_s,
            m.forward_s
        );
    }

    let mut failures = Vec::new();
    let slack = 64 << 20;
    let dense = &rows[0].0;
    for (m, expected) in &rows {
        let f = &m.format;
        if m.resident.abs_diff(*expected) > expected / 10 + slack {
            failures.push(format!(
                "{f}: resident {} MiB is not within 10% + 64 MiB of {}",
                mib(m.resident),
                mib(*expected)
            ));
        }
        let ceiling = expected + 3 * largest_f32 + (256 << 20);
        for (what, peak) in [("load", m.load_peak), ("forward", m.forward_peak)] {
            if peak > ceiling {
                failures.push(format!(
                    "{f}: the peak during the {what}, {} MiB, is over the weights plus 3 largest layers in f32 + 256 \
                     MiB ({} MiB)",
                    mib(peak),
                    mib(ceiling)
                ));
            }
        }
        if m.format == "bf16" {
            if !m.compact_formats.is_empty() {
                failures.push(format!("bf16: compact formats {:?} in a dense model", m.compact_formats));
            }
            continue;
        }
        if m.compact_formats.is_empty() {
            failures.push(format!("{f}: no linear weight kept compact"));
        }
        if m.resident as f64 > 0.6 * dense.resident as f64 {
            failures.push(format!(
                "{f}: resident {} MiB is not under 60% of bf16's {}",
                mib(m.resident),
                mib(dense.resident)
            ));
        }
        if m.load_peak.max(m.forward_peak) >= dense.resident {
            failures.push(format!("{f}: a peak reaches bf16's resident {} MiB", mib(dense.resident)));
        }
    }
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("{failure}");
        }
        std::process::exit(1);
    }
}
