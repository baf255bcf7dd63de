//! GPU parity: the CPU parity tests' stage-by-stage comparisons with diffusers' reference outputs on the tiny
//! random-weight fixtures (`models/tiny/FIXTURES.md`, references in `models/tiny/reference/<model>/`), run on
//! CUDA device 0 in f32 and in bf16.
//!
//! | stage | models | f32 | bf16 |
//! | --- | --- | --- | --- |
//! | text encoder (prompt, negative, long, messy) | wan21-tiny-a/b | relative error < 1e-4 | relative error < 3e-2 |
//! | transformer forward | all four | relative error < 1e-4 | relative error < 1e-2 |
//! | transformer forward, heads 64, 128 | wan21-head64/128-tiny | < 1e-4; 0 flash launches | < 1e-2; 2 a block |
//! | VAE decode, encode (mean, log-variance), tiled decode | all four | relative error < 1e-4 | (the VAE runs in f32) |
//! | VAE decode in two causal chunks | wan21-tiny-b | relative error < 1e-4 | |
//! | pipeline: denoised latents from the reference noise | all four | relative error < 1e-4 | |
//! | pipeline: frames from the reference noise | f32 all four, bf16 wan21-tiny-a/b | max abs < 2e-3 | relative < 3e-2 |
//!
//! The tiled decode also checks that tiling took effect: the whole decode differs from the tiled reference by
//! more than 1e-3 relative error. The scheduler is CPU-only math and is not checked here. In a build with the
//! `cudnn` feature the VAE's convolutions run by cuDNN (the first line names the path); `benches/gpu/run.sh`
//! runs the binary again under `KINETOSCOPE_CONV=im2col`, so that both paths meet the same bounds.
//!
//! The four models' heads are 32 and 24 wide, which the flash-attention kernel (head dims 64 and 128) does not
//! take: their bf16 forwards run the plain attention. The head-dim fixtures (`models/tiny/make_head_dim_fixtures.py`,
//! a transformer each, 100 tokens: a full 64-row tile of the kernel and a partial one) reach it; their check counts
//! the kernel's launches during the forward (`kinetoscope_kernels::flash_attention_launches`)
//! and wants one per attention in bf16 with the project's kernels on (so it fails under `KINETOSCOPE_KERNELS=plain`,
//! which keeps every op on candle's path), none in f32.
//!
//! Prints one `PASS`/`FAIL` line per check and a summary line, and writes the same lines as a JSON array of
//! strings to `$GPU_PARITY_JSON` when it is set. A check that errors or panics is a `FAIL` and the run goes on.
//! Exit status: 0 all passed, 1 some check failed, 2 could not run (no CUDA device, no fixtures, JSON unwritable).
//!
//! Fixtures: `$KINETOSCOPE_FIXTURES` when set, else `models/tiny` in the source tree the binary was built from,
//! else `models/tiny` under the current directory.
//!
//! `benches/gpu/run.sh` runs it. By hand, from the repo root:
//!
//! ```sh
//! cargo bench --no-run -p kinetoscope --features cuda --bench gpu_parity   # prints the binary's path
//! target/release/deps/gpu_parity-<hash>
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline, TextEncoder, TextEncoderPlacement};
use kinetoscope_models::wan::transformer::{self, WanTransformer3DModel};
use kinetoscope_models::wan::vae::{self, AutoencoderKLWan, CausalCache, Tiling};

/// Wan 2.1 text-to-video.
const WAN21_MODELS: [&str; 2] = ["wan21-tiny-a", "wan21-tiny-b"];
/// Wan 2.1 and Wan 2.2 TI2V.
const ALL_MODELS: [&str; 4] = ["wan21-tiny-a", "wan21-tiny-b", "wan22-ti2v-tiny-a", "wan22-ti2v-tiny-b"];
/// Wan 2.1 transformers alone (a `transformer/` folder each, no pipeline) with heads 64 and 128 wide: the head dims
/// the flash-attention kernel takes.
const HEAD_DIM_MODELS: [&str; 2] = ["wan21-head64-tiny", "wan21-head128-tiny"];
/// The prompts of `text.safetensors`: (name of the reference tensors, key of the text in `ref.json`).
const PROMPTS: [(&str, &str); 4] =
    [("prompt", "prompt"), ("negative", "negative_prompt"), ("long", "long_prompt"), ("messy", "messy_prompt")];

/// f32 stages, relative error: the CPU tests' limit, kept as is on the GPU (2e-4 is the most a GPU's other
/// reduction order may be allowed, should a stage ever need it).
const F32_RELATIVE: f32 = 1e-4;
/// bf16 stages, relative error against the f32 reference: the transformer's (measured 6.3e-3 to 7.2e-3 on the
/// CPU in bf16).
const BF16_RELATIVE: f32 = 1e-2;
/// The bf16 text encoder's relative error: above `BF16_RELATIVE` already on the CPU in bf16 (measured 1.4e-2 to
/// 2.3e-2, the most on wan21-tiny-b's long prompt), so it gets the bf16 frames' limit instead.
const BF16_TEXT_RELATIVE: f32 = 3e-2;
/// f32 pipeline frames (in [0, 1]), max abs error: the CPU test's limit.
const F32_FRAMES_MAX_ABS: f32 = 2e-3;
/// bf16 pipeline frames, relative error against the f32 reference: the CPU bf16 test's limit.
const BF16_FRAMES_RELATIVE: f32 = 3e-2;
/// The whole decode differs from the tiled reference by more than this: the tiling took effect.
const TILING_EFFECT_MIN: f32 = 1e-3;

fn main() -> ExitCode {
    match run() {
        Ok(report) => report.finish(),
        Err(e) => {
            eprintln!("gpu_parity: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<Report> {
    let root = fixtures_dir();
    ensure!(
        root.join("reference").is_dir(),
        "no fixtures at {} (set KINETOSCOPE_FIXTURES to the repo's models/tiny)",
        root.display()
    );
    let device = Device::new_cuda(0).context("no usable CUDA device 0 (check the NVIDIA driver)")?;
    eprintln!(
        "gpu_parity: fixtures {}, device cuda:0, VAE convolutions by {}",
        root.display(),
        vae::convolution_kernel(&device)
    );
    let fixtures = Fixtures { root, device };
    let mut report = Report::default();
    for precision in [Precision::F32, Precision::Bf16] {
        run_checks(&fixtures, precision, &mut report);
    }
    report.summarize();
    if let Some(path) = std::env::var_os("GPU_PARITY_JSON") {
        report.write_json(Path::new(&path))?;
    }
    Ok(report)
}

/// `$KINETOSCOPE_FIXTURES`, else the build tree's `models/tiny`, else `models/tiny` here.
fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KINETOSCOPE_FIXTURES") {
        return PathBuf::from(dir);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("models/tiny")
    }
}

/// Every check of `precision`, in stage order.
fn run_checks(fixtures: &Fixtures, precision: Precision, report: &mut Report) {
    for model in WAN21_MODELS {
        report.run(precision, model, "text encoder", || text_encoder(fixtures, model, precision));
    }
    for model in ALL_MODELS {
        report.run(precision, model, "transformer", || transformer_forward(fixtures, model, precision));
    }
    for model in HEAD_DIM_MODELS {
        report.run(precision, model, "transformer", || head_dim_transformer_forward(fixtures, model, precision));
    }
    if precision == Precision::F32 {
        for model in ALL_MODELS {
            report.run(precision, model, "VAE decode", || vae_decode(fixtures, model));
            report.run(precision, model, "VAE encode", || vae_encode(fixtures, model));
            report.run(precision, model, "VAE tiled decode", || vae_tiled_decode(fixtures, model));
        }
        report.run(precision, "wan21-tiny-b", "VAE decode in two chunks", || {
            vae_decode_in_two_chunks(fixtures, "wan21-tiny-b")
        });
        for model in ALL_MODELS {
            report.run(precision, model, "pipeline", || pipeline_f32(fixtures, model));
        }
    } else {
        for model in WAN21_MODELS {
            report.run(precision, model, "pipeline", || pipeline_bf16(fixtures, model));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precision {
    F32,
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The relative error a stage's output may have in this precision.
    fn stage_limit(self) -> f32 {
        match self {
            Precision::F32 => F32_RELATIVE,
            Precision::Bf16 => BF16_RELATIVE,
        }
    }

    /// The relative error the text states may have in this precision.
    fn text_encoder_limit(self) -> f32 {
        match self {
            Precision::F32 => F32_RELATIVE,
            Precision::Bf16 => BF16_TEXT_RELATIVE,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Checks: each returns its measurements, named by stage.

/// A stage's name and what was measured on it.
type Measurements = Vec<(String, Measured)>;

/// The text states of each reference prompt (`text_parity.rs`), the encoder resident on the GPU.
fn text_encoder(fixtures: &Fixtures, model: &str, precision: Precision) -> Result<Measurements> {
    let settings = fixtures.settings(model)?;
    let max_len = setting_usize(&settings, "max_sequence_length")?;
    let dir = fixtures.model_dir(model)?;
    let encoder = TextEncoder::load(&dir, precision.dtype(), &fixtures.device, TextEncoderPlacement::Resident)?;
    let r = fixtures.reference(model, "text.safetensors")?;
    PROMPTS
        .iter()
        .map(|&(name, key)| {
            let prompt = setting_str(&settings, key)?;
            let states = encoder.encode(&[prompt], max_len)?.into_iter().next().context("no text states")?;
            let want = tensor(&r, &format!("{name}_embeds"))?;
            Ok((format!("text encoder ({name})"), relative(&states, want, precision.text_encoder_limit())?))
        })
        .collect()
}

/// One `WanTransformer3DModel` forward on the reference inputs (`transformer_parity.rs`).
fn transformer_forward(fixtures: &Fixtures, model: &str, precision: Precision) -> Result<Measurements> {
    let dir = fixtures.model_dir(model)?;
    let cfg: transformer::Config = dir.config("transformer", "config.json")?;
    let network =
        WanTransformer3DModel::new(&cfg, dir.var_builder("transformer", precision.dtype(), &fixtures.device)?)?;
    let r = fixtures.reference(model, "transformer.safetensors")?;
    let input = |name: &str| fixtures.on_device(&r, name);
    let out = network.forward(&input("hidden_states")?, &input("timestep")?, &input("encoder_hidden_states")?, None)?;
    Ok(vec![("transformer".into(), relative(&out, tensor(&r, "output")?, precision.stage_limit())?)])
}

/// A head-dim fixture's transformer (`transformer/` only: no `model_index.json`, so not through `ModelDir`), one
/// forward on the reference inputs (`head_dim_parity.rs`), and the flash-attention kernel's launches during it:
/// in bf16 every self- and cross-attention of every block takes it, 2 per block; in f32 none does.
fn head_dim_transformer_forward(fixtures: &Fixtures, model: &str, precision: Precision) -> Result<Measurements> {
    let folder = fixtures.root.join(model).join("transformer");
    let config = folder.join("config.json");
    let text = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
    let cfg: transformer::Config =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", config.display()))?;
    let weights = [folder.join("diffusion_pytorch_model.safetensors")];
    // SAFETY: the fixture files are not modified while the bench runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, precision.dtype(), &fixtures.device)? };
    let network = WanTransformer3DModel::new(&cfg, vb)?;
    let r = fixtures.reference(model, "transformer.safetensors")?;
    let input = |name: &str| fixtures.on_device(&r, name);
    let (latents, t, text) = (input("hidden_states")?, input("timestep")?, input("encoder_hidden_states")?);
    let before = kinetoscope_kernels::flash_attention_launches();
    let out = network.forward(&latents, &t, &text, None)?;
    let launches = kinetoscope_kernels::flash_attention_launches() - before;
    let expected = match precision {
        Precision::F32 => 0,
        Precision::Bf16 => 2 * cfg.num_layers,
    };
    let flash =
        Measured { metric: "flash-attention launches", value: launches as f32, bound: Bound::Exactly(expected as f32) };
    Ok(vec![
        ("transformer".into(), relative(&out, tensor(&r, "output")?, precision.stage_limit())?),
        (format!("transformer flash attention (heads {} wide)", cfg.attention_head_dim), flash),
    ])
}

/// `vae.decode(latents)` (`vae_parity.rs`).
fn vae_decode(fixtures: &Fixtures, model: &str) -> Result<Measurements> {
    let r = fixtures.reference(model, "vae.safetensors")?;
    let decoded = load_vae(fixtures, model)?.decode(&fixtures.on_device(&r, "latents")?)?;
    Ok(vec![("VAE decode".into(), relative(&decoded, tensor(&r, "decoded")?, F32_RELATIVE)?)])
}

/// `vae.encode(video)`: the posterior's mean and log-variance (`vae_parity.rs`).
fn vae_encode(fixtures: &Fixtures, model: &str) -> Result<Measurements> {
    let r = fixtures.reference(model, "vae.safetensors")?;
    let (mean, logvar) = load_vae(fixtures, model)?.encode(&fixtures.on_device(&r, "video")?)?;
    Ok(vec![
        ("VAE encode mean".into(), relative(&mean, tensor(&r, "encoded_mean")?, F32_RELATIVE)?),
        ("VAE encode logvar".into(), relative(&logvar, tensor(&r, "encoded_logvar")?, F32_RELATIVE)?),
    ])
}

/// Streaming equals batch: the first latent frame alone, then the others in one chunk (`vae_parity.rs`).
fn vae_decode_in_two_chunks(fixtures: &Fixtures, model: &str) -> Result<Measurements> {
    let r = fixtures.reference(model, "vae.safetensors")?;
    let vae = load_vae(fixtures, model)?;
    let latents = fixtures.on_device(&r, "latents")?;
    let frames = latents.dim(2)?;
    let mut cache = CausalCache::new();
    let first = vae.decode_chunk(&latents.narrow(2, 0, 1)?, &mut cache)?;
    let rest = vae.decode_chunk(&latents.narrow(2, 1, frames - 1)?, &mut cache)?;
    let decoded = Tensor::cat(&[first, rest], 2)?;
    Ok(vec![("VAE decode in two chunks".into(), relative(&decoded, tensor(&r, "decoded")?, F32_RELATIVE)?)])
}

/// `decode_tiled` with the reference's tiles against diffusers' `enable_tiling` (`vae_parity.rs`), and the whole
/// decode against the same reference, which must differ: the tiles' seams are there.
fn vae_tiled_decode(fixtures: &Fixtures, model: &str) -> Result<Measurements> {
    let r = fixtures.reference(model, "vae_tiled.safetensors")?;
    let sizes = tensor(&r, "tiling")?.to_vec1::<i64>()?;
    ensure!(sizes.len() == 4, "tiling holds {} sizes, expected 4", sizes.len());
    let size = |i: usize| usize::try_from(sizes[i]).context("negative tile size");
    let tiling =
        Tiling { tile_height: size(0)?, tile_width: size(1)?, stride_height: size(2)?, stride_width: size(3)? };
    let vae = load_vae(fixtures, model)?;
    let latents = fixtures.on_device(&r, "latents")?;
    let want = tensor(&r, "decoded")?;
    let tiled = relative(&vae.decode_tiled(&latents, tiling)?, want, F32_RELATIVE)?;
    let seams = Measured {
        metric: "whole decode's relative error",
        value: relative_error(&vae.decode(&latents)?, want)?,
        bound: Bound::Above(TILING_EFFECT_MIN),
    };
    Ok(vec![("VAE tiled decode".into(), tiled), ("VAE tiled decode seams".into(), seams)])
}

fn load_vae(fixtures: &Fixtures, model: &str) -> Result<AutoencoderKLWan> {
    let dir = fixtures.model_dir(model)?;
    let cfg: vae::Config = dir.config("vae", "config.json")?;
    Ok(AutoencoderKLWan::new(&cfg, dir.var_builder("vae", DType::F32, &fixtures.device)?)?)
}

/// Text-to-video from the reference noise in f32 (`assert_text_to_video_matches`): the denoised latents stage
/// by stage, then the frames end to end.
fn pipeline_f32(fixtures: &Fixtures, model: &str) -> Result<Measurements> {
    let pipeline = load_pipeline(fixtures, model, Precision::F32)?;
    let r = fixtures.reference(model, "pipeline.safetensors")?;
    with_reference_noise(fixtures, model, |request| {
        let text = Tensor::cat(
            &[
                pipeline.encode_prompt(&request.prompt, request.max_sequence_length)?,
                pipeline.encode_prompt(&request.negative_prompt, request.max_sequence_length)?,
            ],
            0,
        )?;
        let noise = pipeline.initial_latents(request)?;
        let latents = pipeline.denoise(noise, &text, request, &mut |_| ControlFlow::Continue(()))?;
        let final_latents = relative(&latents, tensor(&r, "final_latents")?, F32_RELATIVE)?;
        let want = tensor(&r, "frames")?;
        let frames = Tensor::from_vec(pipeline.generate(request)?.frames, want.shape(), &Device::Cpu)?;
        let frames = Measured {
            metric: "frames max abs error",
            value: max_abs_error(&frames, want)?,
            bound: Bound::Below(F32_FRAMES_MAX_ABS),
        };
        Ok(vec![("pipeline final latents".into(), final_latents), ("pipeline frames".into(), frames)])
    })
}

/// Text-to-video from the reference noise in bf16, the VAE in f32: the frames against the f32 reference
/// (`pipeline_parity.rs`, `bf16_stays_close_to_the_f32_reference`).
fn pipeline_bf16(fixtures: &Fixtures, model: &str) -> Result<Measurements> {
    let pipeline = load_pipeline(fixtures, model, Precision::Bf16)?;
    let r = fixtures.reference(model, "pipeline.safetensors")?;
    with_reference_noise(fixtures, model, |request| {
        let want = tensor(&r, "frames")?;
        let frames = Tensor::from_vec(pipeline.generate(request)?.frames, want.shape(), &Device::Cpu)?;
        let frames = Measured {
            metric: "frames relative error",
            value: relative_error(&frames, want)?,
            bound: Bound::Below(BF16_FRAMES_RELATIVE),
        };
        Ok(vec![("pipeline frames".into(), frames)])
    })
}

fn load_pipeline(fixtures: &Fixtures, model: &str, precision: Precision) -> Result<Pipeline> {
    let options = LoadOptions { device: fixtures.device.clone(), dtype: precision.dtype(), ..Default::default() };
    Ok(Pipeline::load(&fixtures.model_dir(model)?, &options)?)
}

/// Runs `f` on the reference run's request, its initial noise written to a latents file in a temporary folder.
fn with_reference_noise<T>(
    fixtures: &Fixtures,
    model: &str,
    f: impl FnOnce(&GenerateRequest) -> Result<T>,
) -> Result<T> {
    let noise = tensor(&fixtures.reference(model, "pipeline.safetensors")?, "latents")?.clone();
    let dir = tempfile::tempdir().context("creating a temporary folder for the noise")?;
    let path = dir.path().join("noise.safetensors");
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), noise)]), &path)?;
    let request = GenerateRequest { latents: Some(path), ..reference_request(&fixtures.settings(model)?)? };
    f(&request)
}

/// The request the reference pipeline ran with (`ref.json`).
fn reference_request(settings: &serde_json::Value) -> Result<GenerateRequest> {
    Ok(GenerateRequest {
        prompt: setting_str(settings, "prompt")?.into(),
        negative_prompt: setting_str(settings, "negative_prompt")?.into(),
        height: setting_usize(settings, "height")?,
        width: setting_usize(settings, "width")?,
        num_frames: setting_usize(settings, "num_frames")?,
        steps: setting_usize(settings, "num_inference_steps")?,
        guidance_scale: settings["guidance_scale"].as_f64().context("ref.json: no number guidance_scale")?,
        max_sequence_length: setting_usize(settings, "max_sequence_length")?,
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Fixtures.

/// Where the fixtures are, and the device the checks run on.
struct Fixtures {
    root: PathBuf,
    device: Device,
}

impl Fixtures {
    fn model_dir(&self, model: &str) -> Result<ModelDir> {
        Ok(ModelDir::from_path(&self.root.join(model))?)
    }

    /// diffusers' outputs for `model`, from `reference/<model>/<file>`, on the CPU.
    fn reference(&self, model: &str, file: &str) -> Result<HashMap<String, Tensor>> {
        let path = self.root.join("reference").join(model).join(file);
        candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))
    }

    /// The settings the references were made with (`reference/<model>/ref.json`).
    fn settings(&self, model: &str) -> Result<serde_json::Value> {
        let path = self.root.join("reference").join(model).join("ref.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The reference tensor `name`, copied to the GPU as a network's input.
    fn on_device(&self, reference: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
        Ok(tensor(reference, name)?.to_device(&self.device)?)
    }
}

fn tensor<'a>(reference: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    reference.get(name).with_context(|| format!("no tensor {name} in the reference"))
}

fn setting_str<'a>(settings: &'a serde_json::Value, key: &str) -> Result<&'a str> {
    settings[key].as_str().with_context(|| format!("ref.json: no string {key}"))
}

fn setting_usize(settings: &serde_json::Value, key: &str) -> Result<usize> {
    let n = settings[key].as_u64().with_context(|| format!("ref.json: no whole number {key}"))?;
    Ok(usize::try_from(n)?)
}

// ---------------------------------------------------------------------------------------------------------------
// Comparisons: outputs are brought to the CPU in f32 and compared with the references there.

/// What a check measured, and the bound it must keep.
struct Measured {
    metric: &'static str,
    value: f32,
    bound: Bound,
}

enum Bound {
    /// Passes when the value is below the limit (NaN never is).
    Below(f32),
    /// Passes when the value exceeds the limit.
    Above(f32),
    /// Passes when the value is this count.
    Exactly(f32),
}

impl Measured {
    fn passed(&self) -> bool {
        match self.bound {
            Bound::Below(limit) => self.value < limit,
            Bound::Above(limit) => self.value > limit,
            Bound::Exactly(count) => self.value == count,
        }
    }

    fn describe(&self) -> String {
        let (metric, value) = (self.metric, self.value);
        match self.bound {
            Bound::Below(limit) => format!("{metric} {value:.1e} (limit {limit:e})"),
            Bound::Above(limit) => format!("{metric} {value:.1e} (must exceed {limit:e})"),
            Bound::Exactly(count) => format!("{metric} {value} (expected {count})"),
        }
    }
}

/// `got`'s relative error against `want`, which must stay below `limit`.
fn relative(got: &Tensor, want: &Tensor, limit: f32) -> Result<Measured> {
    Ok(Measured { metric: "relative error", value: relative_error(got, want)?, bound: Bound::Below(limit) })
}

/// ‖got − want‖ / ‖want‖, in f32 on the CPU; the shapes must be equal.
fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let (got, want) = same_shape_on_cpu(got, want)?;
    let norm = |t: &Tensor| -> Result<f32> { Ok(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?) };
    Ok(norm(&(&got - &want)?)? / norm(&want)?)
}

/// max |got − want|, in f32 on the CPU; the shapes must be equal.
fn max_abs_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let (got, want) = same_shape_on_cpu(got, want)?;
    Ok((&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

fn same_shape_on_cpu(got: &Tensor, want: &Tensor) -> Result<(Tensor, Tensor)> {
    ensure!(got.dims() == want.dims(), "shape {:?}, the reference's is {:?}", got.dims(), want.dims());
    let on_cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
    Ok((on_cpu(got)?, on_cpu(want)?))
}

// ---------------------------------------------------------------------------------------------------------------
// The report.

/// The lines printed so far, and the counts.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    passed: usize,
    failed: usize,
}

impl Report {
    /// Runs one check of `model` and records a line per measurement. An error or a panic in it is one `FAIL` line
    /// named `component`, and the run goes on.
    fn run(
        &mut self,
        precision: Precision,
        model: &str,
        component: &str,
        check: impl FnOnce() -> Result<Measurements>,
    ) {
        let outcome = panic::catch_unwind(AssertUnwindSafe(check))
            .unwrap_or_else(|payload| Err(anyhow!("panicked: {}", panic_message(payload.as_ref()))));
        let label = |stage: &str| format!("{} {model} {stage}", precision.name());
        match outcome {
            Ok(measurements) => {
                for (stage, measured) in measurements {
                    self.record(measured.passed(), &label(&stage), &measured.describe());
                }
            }
            Err(e) => self.record(false, &label(component), &format!("error: {e:#}")),
        }
    }

    fn record(&mut self, passed: bool, label: &str, detail: &str) {
        let line = format!("{} {label}: {detail}", if passed { "PASS" } else { "FAIL" });
        println!("{line}");
        self.lines.push(line);
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    fn summarize(&mut self) {
        let line = format!("gpu_parity: {} passed, {} failed", self.passed, self.failed);
        println!("{line}");
        self.lines.push(line);
    }

    /// The printed lines, the summary included, as a JSON array of strings.
    fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.lines)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    fn finish(&self) -> ExitCode {
        if self.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
