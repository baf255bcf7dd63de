//! `kinetoscope serve`: the OpenAI Videos API over HTTP (see the kinetoscope-server crate); `kinetoscope worker`: a
//! process that only renders, taking jobs from a job store it shares with API nodes on other machines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kinetoscope::DType;
use kinetoscope_server::config::ConnectionLimits;
use kinetoscope_server::webhooks::WebhookConfig;
use kinetoscope_server::{ApiKeys, Config, Defaults, Limits, ServedModel};

/// What every node of a deployment is given: the model it serves, how its workers render, and where the jobs and
/// files live. `kinetoscope worker` takes these alone.
#[derive(clap::Args)]
pub struct Node {
    /// A diffusers-layout model folder, or a Hugging Face repository id found in the local cache.
    #[arg(long, default_value = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")]
    model: String,
    /// The name clients pass as `model` [default: the last part of --model].
    #[arg(long)]
    model_name: Option<String>,
    /// A device to render on; repeat for one worker per GPU (cuda:0, cuda:1, ...)
    /// [default: cuda in a CUDA build, else cpu].
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Precision of the text encoder and the transformer: f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = crate::generate::parse_dtype)]
    dtype: DType,
    #[command(flatten)]
    memory: crate::generate::MemoryArgs,
    /// A folder of LoRA adapters that requests may name (`loras: [{"name": "style.safetensors", "scale": 0.8}]`),
    /// applied at run time to that job only, without reloading the model; requests name files, never paths.
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// Where the finished videos and the jobs' sources live, and the job database unless --store names one;
    /// on several machines, a folder they all share (NFS, a shared volume), unless --bucket holds the files.
    #[arg(long, default_value = "kinetoscope-data")]
    data_dir: PathBuf,
    /// The job store: a PostgreSQL URL (postgres://user:password@host:5432/database) for API nodes and workers
    /// on several machines [default: jobs.sqlite in --data-dir] (also read: KINETOSCOPE_STORE).
    #[arg(long, env = "KINETOSCOPE_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Object storage for the finished videos and the jobs' sources, shared by every node instead of
    /// --data-dir: s3://BUCKET or s3://BUCKET/PREFIX, on AWS or any S3-compatible server (endpoint, region and
    /// keys from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; AWS_ALLOW_HTTP=true
    /// for a plain-HTTP endpoint) (also read: KINETOSCOPE_BUCKET).
    #[arg(long, env = "KINETOSCOPE_BUCKET", value_name = "URL")]
    bucket: Option<String>,
    /// Seconds a worker's hold on a running job lasts unless renewed (every third of it): a job whose worker died
    /// runs again within this.
    #[arg(long, default_value_t = 30, value_parser = seconds())]
    lease_s: u64,
    /// Pixels in one frame of an uploaded image or video, read from its header before it is decoded;
    /// more is refused (media_too_large).
    #[arg(long, default_value_t = Limits::default().max_input_pixels)]
    max_input_pixels: u64,
    /// Free space the data folder's disk must keep (8GiB, 512MiB): below it new videos get 507
    /// insufficient_storage, queued ones wait and /readyz says low_disk; 0 turns the check off.
    #[arg(long, default_value = "1GiB", value_parser = parse_free_disk)]
    min_free_disk: u64,
    /// Hours a finished video stays downloadable.
    #[arg(long, default_value_t = 24.0)]
    retention_hours: f64,
    /// A job running longer fails with timed_out.
    #[arg(long, default_value_t = 3600)]
    job_timeout_s: u64,
    /// On SIGTERM, seconds the running job may take to finish before it is stopped and re-queued.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_s: u64,
}

/// `kinetoscope serve`'s flags: a node's, and the API's.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    node: Node,
    /// Serve the API only, with no worker in this process: jobs are rendered by `kinetoscope worker` processes
    /// sharing --store (PostgreSQL) and --data-dir.
    #[arg(long)]
    no_worker: bool,
    /// Another model this API node takes requests for, as NAME=FOLDER (repeat for several): rendered by
    /// `kinetoscope worker --model FOLDER --model-name NAME` processes; jobs go to the workers of the model they
    /// name. Needs --no-worker.
    #[arg(long, value_name = "NAME=FOLDER", value_parser = parse_served)]
    also_serve: Vec<(String, String)>,
    /// Address to listen on; only this machine can connect unless told otherwise.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// A file of API keys, one per line (also read: KINETOSCOPE_API_KEYS, comma-separated).
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// Prompts longer than this many characters are refused (prompt_too_long).
    #[arg(long, default_value_t = Limits::default().max_prompt_chars)]
    max_prompt_chars: usize,
    #[arg(long, default_value_t = Limits::default().max_width)]
    max_width: usize,
    #[arg(long, default_value_t = Limits::default().max_height)]
    max_height: usize,
    #[arg(long, default_value_t = Limits::default().max_frames)]
    max_frames: usize,
    #[arg(long, default_value_t = Limits::default().max_steps)]
    max_steps: usize,
    /// Request bodies larger than this are refused with 413.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// The same for edits and extensions, which may upload a video.
    #[arg(long, default_value_t = Limits::default().max_upload_bytes)]
    max_upload_bytes: usize,
    /// Jobs queued or running at once; beyond it, creates get 429 with Retry-After.
    #[arg(long, default_value_t = Limits::default().max_queue)]
    max_queue: usize,
    /// Uploads decoded at once to check them; more wait their turn.
    #[arg(long, default_value_t = Limits::default().max_concurrent_decodes as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_concurrent_decodes: u64,
    /// Size of a request that gives none, WIDTHxHEIGHT [default: the model's registry entry's (Wan 2.2 TI2V:
    /// 1280x704), else 832x480].
    #[arg(long, value_parser = parse_size)]
    default_size: Option<(usize, usize)>,
    #[arg(long, default_value_t = Defaults::default().seconds)]
    default_seconds: u32,
    /// [default: the model's registry entry's, else 16]
    #[arg(long)]
    default_fps: Option<u32>,
    /// [default: the model's registry entry's, else 50]
    #[arg(long)]
    default_steps: Option<usize>,
    /// [default: the model's registry entry's, else 5]
    #[arg(long)]
    default_guidance: Option<f64>,
    /// Tells polling clients how long to wait between polls (openai-poll-after-ms).
    #[arg(long, default_value_t = 1000)]
    poll_after_ms: u64,
    /// Seconds a client may take to send a request's headers; then the connection is closed.
    #[arg(long, default_value_t = ConnectionLimits::default().header_timeout.as_secs(), value_parser = seconds())]
    header_timeout_s: u64,
    /// Seconds a client may take to send a request's whole body; then it gets 408 and is disconnected.
    /// Raise it to accept large uploads over slow links.
    #[arg(long, default_value_t = ConnectionLimits::default().body_timeout.as_secs(), value_parser = seconds())]
    body_timeout_s: u64,
    /// Seconds a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, default_value_t = ConnectionLimits::default().idle_timeout.as_secs(), value_parser = seconds())]
    idle_timeout_s: u64,
    /// Connections served at once; more wait to be accepted. Keep it well under the open-file limit
    /// (ulimit -n): each may also hold a video file open.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// On SIGTERM, seconds requests in flight may take to finish before every connection is closed
    /// (then the running job gets --shutdown-grace-s).
    #[arg(long, default_value_t = ConnectionLimits::default().drain_timeout.as_secs())]
    drain_timeout_s: u64,
    /// Receiver of video.completed / video.failed events; repeat for several.
    #[arg(long = "webhook-url")]
    webhook_urls: Vec<String>,
    /// Hosts webhooks may be sent to (host, IP or host:port); repeat for several. A request's own
    /// webhook_url must also be on this list.
    #[arg(long = "webhook-allowed-host")]
    webhook_allowed_hosts: Vec<String>,
    /// A file holding the `whsec_...` signing secret (also read: KINETOSCOPE_WEBHOOK_SECRET).
    #[arg(long)]
    webhook_secret_file: Option<PathBuf>,
    /// Delivery attempts per event and target.
    #[arg(long, default_value_t = 5)]
    webhook_attempts: u32,
}

/// A whole number of seconds, at least one: a zero timeout would close every connection at once.
fn seconds() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..)
}

/// A size in bytes as `--memory-limit` takes it (`1GiB`, `512MiB`), or 0.
fn parse_free_disk(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    crate::generate::parse_memory_limit(text)
}

fn parse_served(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, folder)) if !name.is_empty() && !folder.is_empty() => Ok((name.to_string(), folder.to_string())),
        _ => Err(format!("{text:?}: expected NAME=FOLDER, e.g. wan22-ti2v=/models/Wan2.2-TI2V-5B-Diffusers")),
    }
}

fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let parse = || {
        let (w, h) = text.split_once('x')?;
        Some((w.parse().ok()?, h.parse().ok()?))
    };
    parse().ok_or_else(|| format!("{text:?}: expected WIDTHxHEIGHT, e.g. 832x480"))
}

/// A request's defaults for `model`: the flags given, else the model's registry entry's (identified from its configs,
/// as `generate` does), else Wan 2.1's. A model that can't be opened yet gets Wan 2.1's here; the server reports why
/// it can't load.
fn defaults(args: &Args, model: &str) -> Defaults {
    let built_in = Defaults::default();
    let entry = kinetoscope::ModelDir::open(model).ok().and_then(|dir| kinetoscope::registry::identify(&dir).ok()?);
    let model = entry.map(|entry| &entry.defaults);
    let (width, height) =
        args.default_size.or(model.map(|d| (d.width, d.height))).unwrap_or((built_in.width, built_in.height));
    Defaults {
        width,
        height,
        seconds: args.default_seconds,
        fps: args.default_fps.or(model.map(|d| d.fps)).unwrap_or(built_in.fps),
        steps: args.default_steps.or(model.map(|d| d.steps)).unwrap_or(built_in.steps),
        guidance_scale: args.default_guidance.or(model.map(|d| d.guidance_scale)).unwrap_or(built_in.guidance_scale),
    }
}

impl Node {
    /// The configuration of a node with these flags; what only the API uses keeps its defaults.
    fn config(self, api_keys: ApiKeys) -> Config {
        let mut config = Config::new(&self.model, &self.data_dir, api_keys);
        if let Some(name) = self.model_name {
            config.model_name = name;
        }
        if !self.devices.is_empty() {
            config.devices = self.devices;
        } else if cfg!(feature = "cuda") {
            config.devices = vec!["cuda".into()];
        }
        // The device is each worker's own (`devices`).
        config.load = self.memory.load_options(kinetoscope::Device::Cpu, self.dtype);
        config.lora_dir = self.lora_dir;
        config.store = self.store;
        config.bucket = self.bucket;
        config.lease = Duration::from_secs(self.lease_s);
        config.limits.max_input_pixels = self.max_input_pixels;
        config.min_free_disk = self.min_free_disk;
        config.retention = Duration::from_secs_f64(self.retention_hours.max(0.0) * 3600.0);
        config.job_timeout = Duration::from_secs(self.job_timeout_s);
        config.shutdown_grace = Duration::from_secs(self.shutdown_grace_s);
        config
    }
}

pub fn run(args: Args) -> Result<()> {
    let api_keys = ApiKeys::load(args.api_keys_file.as_deref(), std::env::var("KINETOSCOPE_API_KEYS").ok().as_deref())?;
    let secret = match &args.webhook_secret_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the webhook secret from {}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("KINETOSCOPE_WEBHOOK_SECRET").ok(),
    };
    let also_serve = args
        .also_serve
        .iter()
        .map(|(name, model)| ServedModel { model: model.clone(), name: name.clone(), defaults: defaults(&args, model) })
        .collect();
    let defaults = defaults(&args, &args.node.model);
    let mut config = args.node.config(api_keys);
    config.defaults = defaults;
    config.also_serve = also_serve;
    if !config.also_serve.is_empty() && !args.no_worker {
        anyhow::bail!("--also-serve is for API nodes (--no-worker): this process's workers render --model only");
    }
    if args.no_worker {
        if config.store.is_none() {
            anyhow::bail!(
                "--no-worker needs --store postgres://...: with the default SQLite store no other process can render \
                 the jobs"
            );
        }
        config.devices.clear();
    }
    config.listen = args.listen;
    config.limits = Limits {
        max_prompt_chars: args.max_prompt_chars,
        max_width: args.max_width,
        max_height: args.max_height,
        max_frames: args.max_frames,
        max_steps: args.max_steps,
        max_body_bytes: args.max_body_bytes,
        max_upload_bytes: args.max_upload_bytes,
        max_queue: args.max_queue,
        max_concurrent_decodes: args.max_concurrent_decodes as usize,
        ..config.limits
    };
    config.poll_after = Duration::from_millis(args.poll_after_ms);
    config.connections = ConnectionLimits {
        header_timeout: Duration::from_secs(args.header_timeout_s),
        body_timeout: Duration::from_secs(args.body_timeout_s),
        idle_timeout: Duration::from_secs(args.idle_timeout_s),
        max_connections: args.max_connections as usize,
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
    };
    config.webhooks = WebhookConfig {
        urls: args.webhook_urls,
        secret,
        allowed_hosts: args.webhook_allowed_hosts,
        max_attempts: args.webhook_attempts,
        ..WebhookConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(kinetoscope_server::serve(config))
}

/// `kinetoscope worker`'s flags.
#[derive(clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    node: Node,
    /// Serve /healthz, /readyz and /metrics (no API, no keys) on this address, for probes and Prometheus; keep it
    /// on a private interface.
    #[arg(long, value_name = "ADDRESS")]
    metrics_listen: Option<SocketAddr>,
}

pub fn run_worker(args: WorkerArgs) -> Result<()> {
    if args.node.store.is_none() {
        anyhow::bail!(
            "kinetoscope worker needs --store postgres://... (the job store it shares with the API nodes); on one \
             machine, `kinetoscope serve` renders its own jobs"
        );
    }
    let config = args.node.config(ApiKeys::none());
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(kinetoscope_server::work(config, args.metrics_listen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        serve: Args,
    }

    fn parse(args: &[&str]) -> Args {
        Command::try_parse_from(["serve"].iter().chain(args)).unwrap().serve
    }

    fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// A folder the registry knows serves its entry's defaults unless a flag says otherwise; one it doesn't,
    /// Wan 2.1's.
    #[test]
    fn defaults_come_from_the_flags_then_the_registry_then_wan21() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
        let unknown = tiny.join("wan22-ti2v-tiny-a");
        let d = defaults(&parse(&["--model", unknown.to_str().unwrap()]), unknown.to_str().unwrap());
        assert_eq!((d.width, d.height, d.fps, d.steps), (832, 480, 16, 50));

        // The tiny TI2V folder with the configs of the registry's Wan 2.2 TI2V-5B (identify reads configs only).
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("ti2v");
        copy_tree(&unknown, &folder);
        let entry = kinetoscope::models().iter().find(|m| m.id == "wan2.2-ti2v-5b").unwrap();
        for (component, values) in &entry.configs {
            let path = folder.join(component).join("config.json");
            let mut config: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config.extend(values.clone());
            std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
        }
        let model = folder.to_str().unwrap();
        let d = defaults(&parse(&["--model", model]), model);
        assert_eq!((d.width, d.height, d.fps, d.steps), (1280, 704, 24, 50));
        let d = defaults(&parse(&["--model", model, "--default-size", "640x352", "--default-steps", "8"]), model);
        assert_eq!((d.width, d.height, d.fps, d.steps), (640, 352, 24, 8));
    }
}
