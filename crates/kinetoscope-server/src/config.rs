//! What the operator decides: where to listen, which model on which devices, who may call, and the
//! limits every request is held to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kinetoscope::LoadOptions;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::webhooks::WebhookConfig;

#[derive(Debug, Clone)]
pub struct Config {
    /// A diffusers-layout folder or a Hugging Face repository id in the local cache.
    pub model: String,
    /// The name clients pass as `model` (and see in the video object).
    pub model_name: String,
    /// Further models an API node takes requests for, rendered by workers on other machines (which serve them
    /// by the same names); only with a shared store.
    pub also_serve: Vec<ServedModel>,
    /// One worker per entry (`cpu`, `cuda:0`, `cuda:1`, ...), each with its own copy of the model.
    pub devices: Vec<String>,
    /// How each worker loads the model (precision, memory limit, text encoder, VAE tiling, experts, adapters
    /// merged at load, single-file transformers), as `kinetoscope generate` loads it; each worker's `device` is
    /// its entry of `devices`, whatever this one says.
    pub load: LoadOptions,
    /// The folder whose adapter files requests may name (`loras: [{"name", "scale"}]`), applied at run time per
    /// job; `None`: requests can't ask for adapters.
    pub lora_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Where the finished videos and the jobs' sources live (and the job database, unless `store` says
    /// otherwise); shared by every node of a deployment on several machines.
    pub data_dir: PathBuf,
    /// The job store: a `postgres://` URL for a deployment on several machines; `None`: `jobs.sqlite` in
    /// `data_dir`.
    pub store: Option<String>,
    /// Object storage for the videos and the jobs' sources (`s3://BUCKET/PREFIX`, credentials and endpoint from
    /// the `AWS_*` environment variables), instead of `data_dir`, which then holds only each machine's working
    /// copies; `None`: `data_dir` (shared by every node, on several machines).
    pub bucket: Option<String>,
    /// How long a worker's hold on a running job lasts unless renewed (every third of it): after a worker dies,
    /// its job is queued again within this.
    pub lease: Duration,
    pub api_keys: ApiKeys,
    pub limits: Limits,
    pub defaults: Defaults,
    /// How long finished videos stay downloadable.
    pub retention: Duration,
    /// A job running longer than this fails with `timed_out`.
    pub job_timeout: Duration,
    /// On shutdown, how long the running job may take to finish before it is stopped and re-queued.
    pub shutdown_grace: Duration,
    /// How often clients polling a video are told to come back (`openai-poll-after-ms`).
    pub poll_after: Duration,
    /// The time each part of a request may take, and how many connections are served at once.
    pub connections: ConnectionLimits,
    pub webhooks: WebhookConfig,
    /// Free bytes the data folder's disk must keep: below it new jobs are refused with 507
    /// `insufficient_storage`, queued jobs wait, and `/readyz` says so, before the disk is full.
    pub min_free_disk: u64,
}

/// The most any request may ask for; requests beyond are refused with 400/413/429 and a code.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_prompt_chars: usize,
    pub max_width: usize,
    pub max_height: usize,
    pub max_frames: usize,
    pub max_steps: usize,
    /// Request bodies (JSON or multipart) larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// The same for the routes that take an uploaded video (edits, extensions).
    pub max_upload_bytes: usize,
    /// Jobs queued or running at once; beyond it creates are refused with 429.
    pub max_queue: usize,
    /// Pixels in one frame of an uploaded image or video, read from its header before anything is
    /// decoded (a 345 KB PNG can hold 11000×11000 pixels).
    pub max_input_pixels: u64,
    /// Uploads decoded at once to check them; more wait their turn.
    pub max_concurrent_decodes: usize,
    /// Bytes in a `webhook_url`; a longer URL is refused (no receiver takes one).
    pub max_webhook_url_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_chars: 4000,
            max_width: 1280,
            max_height: 1280,
            max_frames: 129,
            max_steps: 100,
            max_body_bytes: 1 << 20,
            max_upload_bytes: 256 << 20,
            max_queue: 64,
            // 4096×4096: past any size the models make (1280 wide), and 48 MiB as RGB.
            max_input_pixels: 4096 * 4096,
            max_concurrent_decodes: 2,
            // What browsers and most HTTP servers take in a URL.
            max_webhook_url_bytes: 2048,
        }
    }
}

/// How long a client may take over each part of a request, and how many may be connected at once, so
/// that slow or unfinished requests cannot hold the server (see `transport`).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this, counted from the request's first byte (or, on a new
    /// connection, from connecting); otherwise the connection is closed.
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this, counted from the end of its headers; otherwise it
    /// is answered 408 `request_timeout` and the connection is closed.
    pub body_timeout: Duration,
    /// A kept-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the kernel's backlog until one closes.
    pub max_connections: usize,
    /// On shutdown, how long requests in flight may take to finish before every connection is closed.
    pub drain_timeout: Duration,
}

impl Default for ConnectionLimits {
    /// Headers are a few hundred bytes, so 10 s is ample on any working link; 60 s lets a 1 MiB JSON
    /// body through a very slow link and an upload of tens of MiB through an ordinary one (raise it for
    /// large uploads); 60 s idle keeps a polling client's connection (polls come every second) without
    /// holding abandoned ones long. 256 connections, each with a video file open, stay under the usual
    /// limit of 1024 open files; 10 s of drain lets ordinary requests finish.
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// How far an upload may decode, checked when it is accepted and again when it is rendered.
    pub fn decode(&self) -> kinetoscope_video::DecodeLimits {
        kinetoscope_video::DecodeLimits { max_pixels: self.max_input_pixels, ..Default::default() }
    }
}

/// A model an API node also serves: its folder (whose configs say what it takes), its name, its defaults.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub model: String,
    pub name: String,
    pub defaults: Defaults,
}

/// What a request that leaves a field out gets.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub width: usize,
    pub height: usize,
    pub seconds: u32,
    pub fps: u32,
    pub steps: usize,
    pub guidance_scale: f64,
}

impl Default for Defaults {
    /// Wan 2.1's pipeline defaults: 832×480 at 16 fps, 50 steps, guidance 5; 4 s as OpenAI's API.
    fn default() -> Self {
        Defaults { width: 832, height: 480, seconds: 4, fps: 16, steps: 50, guidance_scale: 5.0 }
    }
}

impl Config {
    /// A configuration with the defaults above for `model`, served on 127.0.0.1:8080 from the CPU.
    pub fn new(model: &str, data_dir: &Path, api_keys: ApiKeys) -> Self {
        Config {
            model: model.to_string(),
            model_name: default_model_name(model),
            also_serve: Vec::new(),
            devices: vec!["cpu".into()],
            load: LoadOptions::default(),
            lora_dir: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.to_path_buf(),
            store: None,
            bucket: None,
            lease: Duration::from_secs(30),
            api_keys,
            limits: Limits::default(),
            defaults: Defaults::default(),
            retention: Duration::from_secs(24 * 3600),
            job_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(30),
            poll_after: Duration::from_millis(1000),
            connections: ConnectionLimits::default(),
            webhooks: WebhookConfig::default(),
            min_free_disk: 1 << 30,
        }
    }
}

impl Config {
    /// The job store's location: `store`, or the SQLite file in the data folder.
    pub fn store_location(&self) -> String {
        match &self.store {
            Some(location) => location.clone(),
            None => self.data_dir.join("jobs.sqlite").to_string_lossy().into_owned(),
        }
    }
}

/// The model's name as clients see it: the last part of its path or repository id.
pub fn default_model_name(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_string()
}

/// Bearer keys. Only their SHA-256 digests are kept, and a presented key is compared with each in
/// constant time, so neither timing nor a memory dump gives a key away.
#[derive(Clone)]
pub struct ApiKeys(Vec<[u8; 32]>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    pub fn new<S: AsRef<str>>(keys: &[S]) -> Result<Self> {
        let keys: Vec<&str> = keys.iter().map(|k| k.as_ref().trim()).filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            bail!("no API keys: give --api-keys-file (one key per line) or KINETOSCOPE_API_KEYS (comma-separated)");
        }
        if let Some(short) = keys.iter().find(|k| k.len() < 16) {
            bail!("an API key is {} characters long; use at least 16", short.len());
        }
        Ok(ApiKeys(keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect()))
    }

    /// Keys from a file (one per line, `#` comments) and/or a comma-separated list, both optional.
    pub fn load(file: Option<&Path>, list: Option<&str>) -> Result<Self> {
        let mut keys: Vec<String> = Vec::new();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading API keys from {}", path.display()))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        if let Some(list) = list {
            keys.extend(list.split(',').map(|k| k.trim().to_string()));
        }
        Self::new(&keys)
    }

    /// No key: nothing is allowed (a worker process, which serves no API).
    pub fn none() -> Self {
        ApiKeys(Vec::new())
    }

    pub fn allows(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every key is compared, so the time taken doesn't say which one matched.
        self.0.iter().fold(subtle::Choice::from(0), |found, key| found | key.ct_eq(&digest)).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_a_file_and_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# ops\nkey-from-the-file-0001\n\n").unwrap();
        let keys = ApiKeys::load(Some(&file), Some(" key-from-the-env-0002 ,")).unwrap();
        assert!(keys.allows("key-from-the-file-0001"));
        assert!(keys.allows("key-from-the-env-0002"));
        assert!(!keys.allows("key-from-the-file-000"));
        assert!(!keys.allows(""));
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
    }

    #[test]
    fn no_keys_or_short_keys_are_refused() {
        let err = ApiKeys::load(None, Some(" , ")).unwrap_err();
        assert!(err.to_string().contains("KINETOSCOPE_API_KEYS"), "{err}");
        let err = ApiKeys::new(&["short"]).unwrap_err();
        assert!(err.to_string().contains("at least 16"), "{err}");
    }

    #[test]
    fn model_name_is_the_last_path_part() {
        assert_eq!(default_model_name("Wan-AI/Wan2.1-T2V-1.3B-Diffusers"), "Wan2.1-T2V-1.3B-Diffusers");
        assert_eq!(default_model_name("/models/tiny/"), "tiny");
    }
}
