//! `kinetoscope generate`: one prompt → one MP4 (+ sidecar JSON, + optional PNG frames).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kinetoscope::scheduler::{Schedule, SchedulerKind};
use kinetoscope::{
    DType, Device, ExpertPlacement, GenerateRequest, LoadOptions, LoraSpec, ModelDir, ModelManifest, ModelShape,
    Pipeline, Preset, Quantization, TextEncoderPlacement, VaeTiling,
};

use crate::edit::EditArgs;
use crate::output::{self, Candidates};

#[derive(clap::Args)]
pub struct Args {
    /// What the video shows.
    #[arg(long)]
    prompt: String,
    /// Where the MP4 goes; the sidecar is written beside it with the extension `.json`.
    #[arg(long, short, default_value = "out.mp4")]
    output: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Steps, size and step cache in one choice: draft (20 steps, 416x240, cache 0.10), balanced (30 steps,
    /// 832x480, cache 0.05), quality (50 steps, 832x480, no cache), over the model's defaults, or turbo (a
    /// distilled model's or distill LoRA's 4 steps without guidance; refused on a model with neither). Flags given
    /// explicitly override it.
    #[arg(long)]
    preset: Option<Preset>,
    /// What the video should not show (used when guidance > 1).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// [default: the model's (Wan 2.1: 480), or the preset's]
    #[arg(long)]
    height: Option<usize>,
    /// [default: the model's (Wan 2.1: 832), or the preset's]
    #[arg(long)]
    width: Option<usize>,
    /// Number of frames, 4k+1 [default: the model's (Wan 2.1: 81)].
    #[arg(long)]
    frames: Option<usize>,
    /// Denoising steps [default: the model's (Wan 2.1: 50), or the preset's].
    #[arg(long)]
    steps: Option<usize>,
    /// Step caching: a step whose first transformer block's residual changed by less than THRESHOLD
    /// (relative L1) since the last full step reuses the other blocks' residual instead of running them;
    /// 0.05 is mild, 0.1 strong [default: off, or the preset's].
    #[arg(long, value_name = "THRESHOLD")]
    step_cache: Option<f64>,
    /// Classifier-free guidance scale (1 or less turns guidance off) [default: the model's (Wan 2.1: 5)]; with a
    /// two-expert model (Wan 2.2 A14B), the high-noise expert's.
    #[arg(long)]
    guidance: Option<f64>,
    /// The low-noise expert's guidance scale, for a two-expert model (Wan 2.2 A14B); whether guidance runs at all
    /// is --guidance's to say [default: the model's (Wan 2.2 T2V-A14B: 3), else --guidance].
    #[arg(long = "guidance-2", value_name = "GUIDANCE")]
    guidance_2: Option<f64>,
    /// Shift of the flow sigmas [default: the model's (Wan 2.1: 3), or for a folder that is no registry entry
    /// its scheduler config's].
    #[arg(long)]
    shift: Option<f64>,
    /// Sampler: unipc or euler [default: the model's scheduler config].
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// An explicit schedule of training timesteps, decreasing, run with flow-match Euler and --shift, as
    /// diffusers' `timesteps=`: the few-step recipe of distilled models (lightx2v: 1000,750,500,250 at shift
    /// 5, --guidance 1). Sets --steps to its length.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with_all = ["sigmas", "scheduler"])]
    timesteps: Option<Vec<f64>>,
    /// An explicit schedule of sigmas in (0, 1], decreasing, shifted by --shift and run with flow-match Euler,
    /// as diffusers' `sigmas=`. Sets --steps to its length.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with = "scheduler")]
    sigmas: Option<Vec<f64>>,
    /// DMD timesteps of a FastVideo-distilled model (FastWan: 1000,757,522), run with its sampler: each step
    /// predicts the clean latents and noises them afresh to the next step's level (noise from --seed). Use with
    /// --guidance 1; sets --steps to its length. `--preset turbo` picks it on a FastWan model.
    #[arg(long, value_delimiter = ',', num_args = 1.., conflicts_with_all = ["timesteps", "sigmas", "scheduler"])]
    dmd: Option<Vec<f64>>,
    /// Seed of the initial noise [default: random, recorded in the sidecar].
    #[arg(long)]
    seed: Option<u64>,
    /// Frames per second of the MP4 [default: the model's (Wan 2.1: 16)].
    #[arg(long)]
    fps: Option<u32>,
    /// Text tokens the prompt is cut or padded to.
    #[arg(long, default_value_t = 512)]
    max_sequence_length: usize,
    /// Initial noise: a safetensors file with a tensor `latents` of shape [1, z_dim, (frames-1)/4+1, height/8, width/8].
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Also write every frame as PNG into this folder (frame_00000.png, ...); of the kept candidate.
    #[arg(long)]
    save_frames: Option<PathBuf>,
    #[command(flatten)]
    candidates: Candidates,
    #[command(flatten)]
    edit: EditArgs,
}

/// Which model, where and in what precision: the flags every subcommand that renders shares.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A diffusers-layout model folder, or a Hugging Face repository id found in the local cache.
    #[arg(long, default_value = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")]
    model: String,
    /// Where to run: cpu, cuda (the first GPU) or cuda:N [default: cuda in a CUDA build, else cpu].
    #[arg(long, default_value = if cfg!(feature = "cuda") { "cuda" } else { "cpu" })]
    device: String,
    /// Precision of the text encoder and the transformer: f32, bf16 or f16 (the VAE always runs in f32).
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    #[command(flatten)]
    memory: MemoryArgs,
}

/// How the pipeline uses memory: the flags `generate`, `batch` and `serve` share.
#[derive(clap::Args, Clone, Debug)]
pub struct MemoryArgs {
    /// Working memory (beyond the weights) a stage may need, e.g. 8GiB or 512MiB; a request that would need
    /// more fails with out_of_memory before the stage starts; an offloaded text encoder's weights count in
    /// text encoding's need [default: no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_limit)]
    pub memory_limit: Option<u64>,
    /// Where the text encoder lives: resident (on the device for good), offload (loaded onto the GPU for
    /// each request's prompts and freed before denoising) or cpu (runs on the CPU in f32).
    #[arg(long, value_name = "WHERE", default_value = "offload")]
    pub text_encoder: TextEncoderPlacement,
    /// VAE decoding in spatial tiles: auto (only when decoding whole would not fit in the memory limit or
    /// the GPU's free memory), on (256-pixel tiles every 192 pixels, as diffusers' enable_tiling) or off.
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    pub vae_tiling: VaeTiling,
    /// Where a two-expert model's (Wan 2.2 A14B) experts live: resident (both on the device: no load at the
    /// switch, twice the weights' memory), swap (one on the device at a time, the other loaded in its place at
    /// the step where the low-noise expert takes over: runs where one expert fits) or auto (resident where both
    /// fit in the memory limit, or on a GPU in its free memory; else swap).
    #[arg(long, value_name = "WHERE", default_value = "auto")]
    pub experts: ExpertPlacement,
    #[command(flatten)]
    pub loras: LoraArgs,
    #[command(flatten)]
    pub files: ComponentFiles,
}

/// Single-file checkpoints standing in for a model folder's networks, and how their weights are held.
#[derive(clap::Args, Debug, Clone)]
pub struct ComponentFiles {
    /// A single-file transformer checkpoint used instead of the model folder's transformer/: safetensors in the
    /// official Wan layout or ComfyUI's (model.diffusion_model.), in f32/f16/bf16 or FP8 e4m3 (plain or scaled),
    /// or a GGUF file (city96's: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_S, ...). FP8 and quantized weights stay compact
    /// in memory. Its config is a config.json beside it, else the released model its tensors' shapes are, else the
    /// folder's.
    #[arg(long = "transformer", value_name = "FILE")]
    pub transformer: Option<PathBuf>,
    /// The same for a two-expert model's low-noise expert (transformer_2/).
    #[arg(long = "transformer-2", value_name = "FILE")]
    pub transformer_2: Option<PathBuf>,
    /// Quantize the transformer's dense (f32/f16/bf16) linear weights as they load, keeping only the compact form
    /// in memory: q8_0 (8.5 bits a weight, closest to the original), q4_k (4.5 bits; layers whose width 256
    /// doesn't divide get q8_0) or fp8 (e4m3 with a per-tensor scale). Each layer is dequantized to --dtype as it
    /// runs.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<Quantization>,
    /// A single file with the text encoder's (umT5's) weights, used instead of the folder's text_encoder/:
    /// safetensors under transformers' names in f32/f16/bf16 or FP8 (ComfyUI's umt5_xxl files), or a GGUF file
    /// (city96's umt5-xxl-encoder-*.gguf). The tokenizer and config stay the folder's.
    #[arg(long, value_name = "FILE")]
    pub text_encoder_weights: Option<PathBuf>,
    /// A single-file Wan 2.1 VAE in the official layout (ComfyUI's wan_2.1_vae.safetensors, optionally under vae.
    /// or first_stage_model.) used instead of the folder's vae/.
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
}

/// LoRA adapters, merged into the weights as the model loads.
#[derive(clap::Args, Debug, Clone)]
pub struct LoraArgs {
    /// A LoRA adapter (safetensors in the diffusers/PEFT, official Wan/ComfyUI/lightx2v or kohya/musubi layout)
    /// and its scale, merged into the transformer's weights at load (a two-expert model's high-noise one);
    /// repeat for several. A key that matches no tensor of the model is an error.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = |s: &str| LoraSpec::parse(s, "transformer"))]
    pub lora: Vec<LoraSpec>,
    /// A LoRA adapter for a two-expert model's low-noise expert (transformer_2): the low-noise file of a Wan 2.2
    /// LoRA pair.
    #[arg(long = "lora-2", value_name = "FILE[:SCALE]", value_parser = |s: &str| LoraSpec::parse(s, "transformer_2"))]
    pub lora_2: Vec<LoraSpec>,
    /// Leave out (and list in the sidecar) adapter keys that match no tensor of the model, instead of failing.
    #[arg(long)]
    pub lora_allow_unmatched: bool,
}

impl LoraArgs {
    pub fn specs(&self) -> Vec<LoraSpec> {
        self.lora.iter().chain(&self.lora_2).cloned().collect()
    }
}

impl MemoryArgs {
    pub fn load_options(&self, device: Device, dtype: DType) -> LoadOptions {
        LoadOptions {
            device,
            dtype,
            memory_limit: self.memory_limit,
            text_encoder: self.text_encoder,
            vae_tiling: self.vae_tiling,
            experts: self.experts,
            loras: self.loras.specs(),
            lora_allow_unmatched: self.loras.lora_allow_unmatched,
            transformer: self.files.transformer.clone(),
            transformer_2: self.files.transformer_2.clone(),
            quantize: self.files.quantize,
            text_encoder_weights: self.files.text_encoder_weights.clone(),
            vae: self.files.vae.clone(),
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    // Fail on an unwritable destination now, not after minutes of denoising.
    output::check_writable(&args.output)?;
    if let Some(dir) = &args.save_frames {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the frames folder {}", dir.display()))?;
        output::check_writable(&dir.join("frame_00000.png"))?;
    }

    let model = args.model.open()?;
    let mut request = args.request(model.defaults());
    args.candidates.seeds(request.seed)?;
    args.edit.check(&model)?;
    if args.guidance_2.is_some() && !model.shape()?.two_experts {
        bail!(
            "--guidance-2: {} has one transformer; a second guidance scale is for the low-noise expert of a \
             two-expert model (Wan 2.2 A14B)",
            model.name()
        );
    }
    let edit = args.edit.read()?;

    let (pipeline, load_s) = args.model.load(&model)?;
    let edit = edit.map(|edit| edit.fit(&request, &pipeline)).transpose()?;
    if let Some(edit) = &edit {
        edit.shape(&mut request);
    }
    pipeline.validate(&request)?;
    let steps = match &edit {
        Some(edit) => edit.steps(request.steps)?,
        None => request.steps,
    };

    let count = args.candidates.count;
    let template = if count > 1 {
        "{spinner} {msg:20} {bar:40} {pos}/{len} steps [{elapsed} < {eta}]"
    } else {
        "{spinner} {msg:9} {bar:40} {pos}/{len} steps [{elapsed} < {eta}]"
    };
    let bar = ProgressBar::new((count * steps) as u64)
        .with_style(ProgressStyle::with_template(template).expect("static template"));
    // The VAE decode after each candidate's last step has no steps of its own; the steady tick keeps the
    // spinner turning through it.
    bar.enable_steady_tick(Duration::from_millis(120));
    let label =
        |k: usize, stage: &str| if count > 1 { format!("candidate {}/{count} {stage}", k + 1) } else { stage.into() };
    bar.set_message(label(0, "denoising"));
    let setup = args.model.setup(&pipeline, &model, load_s);
    let job = output::Job {
        request: &request,
        preset: args.preset,
        output: &args.output,
        save_frames: args.save_frames.as_deref(),
        started,
        edit: edit.as_ref(),
    };
    output::render(&setup, &job, args.candidates, &mut |k, p| {
        bar.set_position((k * p.steps + p.step) as u64);
        bar.set_message(label(k, if p.step == p.steps { "decoding" } else { "denoising" }));
    })?;
    bar.finish_and_clear();
    eprintln!("wrote {} and {}", args.output.display(), output::sidecar_path(&args.output).display());
    Ok(())
}

impl Args {
    /// The request the flags ask for: `defaults` (the model's), then the preset's, then the flags given.
    fn request(&self, defaults: GenerateRequest) -> GenerateRequest {
        let mut request = GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            scheduler: self.scheduler,
            // Seeds stay below 2^53 so that JSON readers in every language keep them exact.
            seed: self.seed.unwrap_or_else(|| rand::random::<u64>() >> 11),
            latents: self.latents.clone(),
            max_sequence_length: self.max_sequence_length,
            ..defaults
        };
        if let Some(preset) = self.preset {
            preset.apply(&mut request);
        }
        request.height = self.height.unwrap_or(request.height);
        request.width = self.width.unwrap_or(request.width);
        request.num_frames = self.frames.unwrap_or(request.num_frames);
        request.schedule = match (&self.timesteps, &self.sigmas, &self.dmd) {
            (Some(timesteps), _, _) => Some(Schedule::Timesteps(timesteps.clone())),
            (None, Some(sigmas), _) => Some(Schedule::Sigmas(sigmas.clone())),
            (None, None, Some(dmd)) => Some(Schedule::Dmd(dmd.clone())),
            (None, None, None) => request.schedule,
        };
        request.steps = self.steps.or(request.schedule.as_ref().map(Schedule::len)).unwrap_or(request.steps);
        request.guidance_scale = self.guidance.unwrap_or(request.guidance_scale);
        request.guidance_scale_2 = self.guidance_2.or(request.guidance_scale_2);
        request.shift = self.shift.or(request.shift);
        request.fps = self.fps.unwrap_or(request.fps);
        request.step_cache = self.step_cache.or(request.step_cache);
        request
    }
}

/// A model folder and the registry entry it is, if any, which gives the defaults of the settings a user leaves
/// out.
pub struct Model {
    dir: ModelDir,
    entry: Option<&'static ModelManifest>,
}

impl Model {
    /// A request with the model's defaults: its registry entry's recommended settings, or for a folder that is
    /// no entry (a fine-tune of another depth, the tiny test models) the request's own, which are Wan 2.1's.
    pub fn defaults(&self) -> GenerateRequest {
        let mut request = GenerateRequest::default();
        if let Some(entry) = self.entry {
            entry.defaults.apply(&mut request);
        }
        request
    }

    /// Where [`Model::defaults`] come from, for the sidecar: `registry:<id>`, or `built-in` (Wan 2.1's, with
    /// the shift left to the scheduler config).
    pub fn defaults_from(&self) -> String {
        self.entry.map_or_else(|| "built-in".to_string(), |entry| format!("registry:{}", entry.id))
    }

    /// What the model's configs allow a request (read again on each call; cheap).
    pub fn shape(&self) -> Result<ModelShape> {
        Ok(ModelShape::read(&self.dir)?)
    }

    /// The model as messages name it: its registry name, else its folder.
    pub fn name(&self) -> String {
        let path = self.dir.root().display();
        self.entry.map_or_else(|| format!("the model {path}"), |entry| format!("{} ({path})", entry.name))
    }
}

impl ModelArgs {
    /// Finds the model folder and tells which registry entry it is, from its configs alone: quick, so that a
    /// request's defaults are known and checked before the weights load.
    pub fn open(&self) -> Result<Model> {
        let dir = ModelDir::open(&self.model)?;
        let entry = kinetoscope::registry::identify(&dir)?;
        Ok(Model { dir, entry })
    }

    /// Loads `model`'s pipeline on the device asked for; returns it with the seconds loading took.
    pub fn load(&self, model: &Model) -> Result<(Pipeline, f64)> {
        let start = Instant::now();
        let options = self.memory.load_options(kinetoscope::open_device(&self.device)?, self.dtype);
        let pipeline = Pipeline::load(&model.dir, &options)?;
        Ok((pipeline, start.elapsed().as_secs_f64()))
    }

    pub fn setup<'a>(&'a self, pipeline: &'a Pipeline, model: &Model, load_s: f64) -> output::Setup<'a> {
        let defaults_from = model.defaults_from();
        output::Setup { pipeline, device: &self.device, dtype: self.dtype, load_s, defaults_from }
    }
}

pub(crate) fn parse_dtype(s: &str) -> Result<DType, String> {
    kinetoscope::parse_dtype(s).map_err(|e| e.to_string())
}

pub(crate) fn parse_memory_limit(s: &str) -> Result<u64, String> {
    s.parse::<kinetoscope::MemoryLimit>().map(kinetoscope::MemoryLimit::bytes)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        Command::parse_from(["generate", "--prompt", "a fox"].iter().chain(flags)).args
    }

    fn ti2v() -> &'static ModelManifest {
        kinetoscope::models().iter().find(|m| m.id == "wan2.2-ti2v-5b").expect("in the registry")
    }

    /// Size, frames, frame rate, steps, guidance, shift.
    type Settings = (usize, usize, usize, u32, usize, f64, Option<f64>);

    fn settings(r: &GenerateRequest) -> Settings {
        (r.width, r.height, r.num_frames, r.fps, r.steps, r.guidance_scale, r.shift)
    }

    #[test]
    fn flags_and_presets_override_the_models_defaults() {
        let mut defaults = GenerateRequest::default();
        ti2v().defaults.apply(&mut defaults);
        assert_eq!(settings(&args(&[]).request(defaults.clone())), (1280, 704, 121, 24, 50, 5.0, Some(5.0)));
        let given = args(&["--width", "640", "--frames", "49", "--fps", "12", "--guidance", "3", "--shift", "4"]);
        assert_eq!(settings(&given.request(defaults.clone())), (640, 704, 49, 12, 50, 3.0, Some(4.0)));
        // The preset's size and steps over the model's, and a flag over the preset's.
        let draft = args(&["--preset", "draft", "--height", "256"]);
        assert_eq!(settings(&draft.request(defaults)), (416, 256, 121, 24, 20, 5.0, Some(5.0)));
        assert_eq!(settings(&args(&[]).request(GenerateRequest::default())), (832, 480, 81, 16, 50, 5.0, None));
    }

    #[test]
    fn guidance_2_overrides_a_two_expert_models_default() {
        let a14b = kinetoscope::models().iter().find(|m| m.id == "wan2.2-t2v-a14b").expect("in the registry");
        let mut defaults = GenerateRequest::default();
        a14b.defaults.apply(&mut defaults);
        let scales = |r: GenerateRequest| (r.guidance_scale, r.guidance_scale_2);
        assert_eq!(scales(args(&[]).request(defaults.clone())), (4.0, Some(3.0)));
        assert_eq!(scales(args(&["--guidance", "5"]).request(defaults.clone())), (5.0, Some(3.0)));
        assert_eq!(scales(args(&["--guidance-2", "2.5"]).request(defaults)), (4.0, Some(2.5)));
        assert_eq!(scales(args(&[]).request(GenerateRequest::default())), (5.0, None));
    }

    /// A folder with `entry`'s `model_index.json` and identifying config values, and no weights.
    fn configs_of(entry: &ModelManifest) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let index =
            serde_json::json!({ "_class_name": entry.pipeline_class, "expand_timesteps": entry.expand_timesteps });
        std::fs::write(tmp.path().join("model_index.json"), index.to_string()).unwrap();
        for (component, values) in &entry.configs {
            let dir = tmp.path().join(component);
            std::fs::create_dir_all(&dir).unwrap();
            let config = serde_json::Value::Object(values.clone()).to_string();
            std::fs::write(dir.join(&entry.components[component].files[0]), config).unwrap();
        }
        tmp
    }

    fn open(path: &Path) -> Model {
        args(&["--model", path.to_str().unwrap()]).model.open().unwrap()
    }

    #[test]
    fn a_registry_model_gives_its_defaults_and_another_folder_the_built_in_ones() {
        let folder = configs_of(ti2v());
        let model = open(folder.path());
        assert_eq!(settings(&model.defaults()), (1280, 704, 121, 24, 50, 5.0, Some(5.0)));
        assert_eq!(model.defaults_from(), "registry:wan2.2-ti2v-5b");
        assert_eq!(model.name(), format!("Wan 2.2 TI2V 5B ({})", folder.path().display()));

        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan22-ti2v-tiny-a");
        let model = open(&tiny);
        assert_eq!(settings(&model.defaults()), settings(&GenerateRequest::default()));
        assert_eq!(model.defaults_from(), "built-in");
        assert_eq!(model.name(), format!("the model {}", tiny.display()));
    }
}
