//! The OpenAI Videos API, self-hosted: `kinetoscope serve`.
//!
//! Clients written for OpenAI's Videos API (the official `openai` SDKs included) work by changing
//! their base URL. Jobs live in SQLite (one machine) or PostgreSQL (many) and survive restarts; one worker
//! per device renders them in order, under a lease; progress streams as server-sent events; finished and
//! failed jobs are announced by signed webhooks (Standard Webhooks) from a durable outbox. See the README's
//! "Server" and "Many machines" sections for the routes, settings and deployments.

pub mod api;
pub mod bucket;
pub mod config;
mod disk;
pub mod error;
mod fields;
pub mod metrics;
pub mod outbox;
pub mod store;
mod transport;
pub mod webhooks;
pub mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use kinetoscope::Pipeline;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Notify};

pub use config::{ApiKeys, Config, Defaults, Limits, ServedModel};
use metrics::Metrics;
use store::{Job, JobStore, WorkerInfo};
use webhooks::Webhooks;
use worker::{Running, Stop, Wake};

/// What the API, the workers and the housekeeping share.
pub struct Shared {
    pub config: Config,
    pub store: Arc<dyn JobStore>,
    /// Where the videos and the jobs' sources are kept when not in the data folder.
    pub bucket: Option<bucket::Bucket>,
    /// This process's name in the store (`host-pid-random`); its workers are `<node>/<device>`.
    pub node: String,
    pub metrics: Metrics,
    pub webhooks: Webhooks,
    /// Every change of a job, for the event streams.
    pub events: broadcast::Sender<Update>,
    pub wake: Wake,
    /// The jobs this process renders now, by id: their leases (renewed by the heartbeat) and stop flags.
    pub running: Mutex<HashMap<String, Running>>,
    /// This process's workers with their model loaded, for the heartbeat.
    pub workers: Mutex<Vec<WorkerInfo>>,
    /// Wakes the webhook outbox when a job of this process ends.
    pub outbox: Arc<Notify>,
    /// The workers alive anywhere, as the store said at its last reading (every second, on a node of a shared
    /// store); `None` before the first.
    pub live_workers: Mutex<Option<Vec<WorkerInfo>>>,
    /// The first worker's model, for checking requests against it.
    pub pipeline: OnceLock<Arc<Pipeline>>,
    /// The models requests may name: this process's own (`config.model`, the one its workers render) first, then
    /// those an API node also takes (`config.also_serve`), rendered by workers elsewhere.
    pub models: Vec<Served>,
    /// Permits to decode an upload (bounds the memory that checking uploads can take at once).
    pub decodes: tokio::sync::Semaphore,
    /// Workers whose model could not be loaded: (error code, message), for `/readyz` and for refusing
    /// work no worker can do.
    pub load_failures: Mutex<Vec<(&'static str, String)>>,
    stopping: AtomicBool,
    /// Set once every worker has stopped: the heartbeat ends.
    finished: AtomicBool,
}

/// A model the API takes requests for: its name, its size, frame and step rules from its configs (checked before,
/// or without, loading it), and what a request that leaves a field out gets.
#[derive(Debug, Clone)]
pub struct Served {
    pub name: String,
    pub shape: kinetoscope::ModelShape,
    pub defaults: Defaults,
}

#[derive(Debug, Clone)]
pub enum Update {
    /// A job changed; `None` once it is deleted.
    Job { id: String, job: Option<Box<Job>> },
    /// The server is stopping: event streams end.
    Shutdown,
}

impl Shared {
    /// Tells the event streams that a job changed (reading its stored state).
    pub fn publish(&self, id: &str) {
        match self.store.get(id) {
            Ok(job) => {
                // No subscriber is not an error.
                let _ = self.events.send(Update::Job { id: id.to_string(), job: job.map(Box::new) });
            }
            Err(e) => tracing::warn!(id, "cannot read the job to publish it: {e}"),
        }
    }

    /// The load failure to report when every worker failed to load the model (no job could ever run).
    pub fn unavailable(&self) -> Option<(&'static str, String)> {
        let failures = self.load_failures.lock().unwrap_or_else(|p| p.into_inner());
        (failures.len() == self.config.devices.len()).then(|| failures.first().cloned()).flatten()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The served model named `name`.
    pub fn model(&self, name: &str) -> Option<&Served> {
        self.models.iter().find(|served| served.name == name)
    }

    /// The models live workers serve: this process's own model where its workers render, else (an API node of a
    /// shared store) those of the workers seen lately; `None` before the store was first read.
    pub fn served_models(&self) -> Option<Vec<String>> {
        if !self.store.is_shared() || !self.config.devices.is_empty() {
            return Some(vec![self.config.model_name.clone()]);
        }
        let live = self.live_workers.lock().unwrap_or_else(|p| p.into_inner());
        let mut models: Vec<String> = live.as_ref()?.iter().map(|w| w.model.clone()).collect();
        models.sort();
        models.dedup();
        Some(models)
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A started server: the store opened and recovered, the workers loading the model.
pub struct Server {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(config: Config) -> Result<Server> {
        // Fail now on a model that isn't there, not in a worker after the port is open; its configs say what
        // requests it takes before its weights are loaded.
        let read = |model: &str, name: &str, defaults: &Defaults| -> Result<Served> {
            let shape = kinetoscope::ModelShape::read(&kinetoscope::ModelDir::open(model)?)?;
            Ok(Served { name: name.to_string(), shape, defaults: defaults.clone() })
        };
        let mut models = vec![read(&config.model, &config.model_name, &config.defaults)?];
        for other in &config.also_serve {
            if models.iter().any(|served| served.name == other.name) {
                anyhow::bail!("two served models are named {:?}: give each its own --model-name", other.name);
            }
            models.push(read(&other.model, &other.name, &other.defaults)?);
        }
        let folders = DATA_FOLDERS.map(|folder| config.data_dir.join(folder));
        for dir in &folders {
            std::fs::create_dir_all(dir).with_context(|| format!("creating the data folder {}", dir.display()))?;
        }
        let location = config.store_location();
        let store: Arc<dyn JobStore> = Arc::from(
            store::open(&location)
                .with_context(|| format!("opening the job database {}", store::redact_location(&location)))?,
        );
        // Other machines may be writing into a shared data folder: only what is older than any job is theirs no
        // longer.
        let older_than = if store.is_shared() { config.job_timeout * 2 } else { Duration::ZERO };
        folders.iter().for_each(|dir| remove_temporary_files(dir, older_than));
        let bucket = match &config.bucket {
            Some(url) => {
                let bucket = bucket::Bucket::open(url)?;
                tracing::info!(bucket = bucket.url(), "videos and sources are kept in object storage");
                Some(bucket)
            }
            None => None,
        };
        let requeued = store.recover(unix_now())?;
        if requeued > 0 {
            tracing::info!(requeued, "jobs whose worker stopped while they ran are queued again");
        }
        let webhooks = Webhooks::new(config.webhooks.clone())?;
        let decodes = tokio::sync::Semaphore::new(config.limits.max_concurrent_decodes.max(1));
        let node = format!(
            "{}-{}-{:04x}",
            rustix::system::uname().nodename().to_string_lossy(),
            std::process::id(),
            rand::random::<u16>()
        );
        let shared = Arc::new(Shared {
            config,
            store,
            bucket,
            node,
            metrics: Metrics::default(),
            webhooks,
            events: broadcast::channel(1024).0,
            wake: Wake::default(),
            running: Mutex::default(),
            workers: Mutex::default(),
            outbox: Arc::new(Notify::new()),
            live_workers: Mutex::default(),
            pipeline: OnceLock::new(),
            models,
            decodes,
            load_failures: Mutex::default(),
            stopping: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        });
        let heartbeat = shared.clone();
        std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || beat(&heartbeat))
            .context("starting the heartbeat thread")?;
        let workers = shared
            .config
            .devices
            .iter()
            .map(|device| {
                let (shared, device) = (shared.clone(), device.clone());
                std::thread::Builder::new()
                    .name(format!("worker {device}"))
                    .spawn(move || worker::run(shared, device))
                    .context("starting a worker thread")
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Server { shared, workers })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves on `listener` until `shutdown` resolves, then stops: requests in flight get the configured
    /// drain timeout to finish, after which every connection is closed; then running jobs get the
    /// configured grace to finish, after which they are stopped and queued again for the next start.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let address = listener.local_addr()?;
        tracing::info!(%address, model = self.shared.config.model_name, "listening");
        let housekeeping = tokio::spawn(expire_outputs(self.shared.clone()));
        let watch = self.shared.store.is_shared().then(|| tokio::spawn(watch_workers(self.shared.clone())));
        let shared = &self.shared;
        let outbox = tokio::spawn(outbox::run(shared.store.clone(), shared.webhooks.clone(), shared.outbox.clone()));
        let shared = self.shared.clone();
        let stop = async move {
            shutdown.await;
            tracing::info!("shutting down");
            shared.stopping.store(true, Ordering::SeqCst);
            // Event streams end here, so they don't hold the drain.
            let _ = shared.events.send(Update::Shutdown);
            shared.wake.notify();
        };
        let limits = self.shared.config.connections.clone();
        transport::serve(listener, api::router(self.shared.clone()), limits, stop).await;
        housekeeping.abort();
        watch.inspect(tokio::task::JoinHandle::abort);
        // Events not sent yet wait in the store for the next start (or another node).
        outbox.abort();
        self.stop_workers().await;
        Ok(())
    }

    /// Renders jobs, with no API, until `shutdown` resolves (`kinetoscope worker`); then stops as [`Server::run`]
    /// does: running jobs get the grace to finish, then go back to the queue.
    pub async fn work(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        tracing::info!(node = self.shared.node, model = self.shared.config.model_name, "working");
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if self.workers.iter().all(|w| w.is_finished()) {
                        anyhow::bail!("no worker is running: {}", self.shared.unavailable().map_or_else(
                            || "they stopped".to_string(),
                            |(code, reason)| format!("{code}: {reason}"),
                        ));
                    }
                }
            }
        }
        tracing::info!("shutting down");
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake.notify();
        self.stop_workers().await;
        Ok(())
    }

    async fn stop_workers(self) {
        let grace = Instant::now() + self.shared.config.shutdown_grace;
        while self.workers.iter().any(|w| !w.is_finished()) && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for running in self.shared.running.lock().unwrap_or_else(|p| p.into_inner()).values() {
            running.stop.set(Stop::Shutdown);
        }
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join()))).await;
        self.shared.finished.store(true, Ordering::SeqCst);
        tracing::info!("stopped");
    }
}

/// Serves `config` until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<()> {
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    start(config).await?.run(listener, shutdown_signal()).await
}

/// [`Server::start`] off the async threads: it connects to the store, whose client blocks.
async fn start(config: Config) -> Result<Server> {
    tokio::task::spawn_blocking(move || Server::start(config)).await.context("starting the server")?
}

/// Renders `config`'s jobs, with no API, until SIGINT or SIGTERM; serves probes and metrics on `metrics_listen`.
pub async fn work(config: Config, metrics_listen: Option<std::net::SocketAddr>) -> Result<()> {
    let server = start(config).await?;
    if let Some(address) = metrics_listen {
        let listener =
            TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address} for metrics"))?;
        let router = api::probes(server.shared.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
    }
    server.work(shutdown_signal()).await
}

/// Every third of a lease, until the workers have stopped: renews the leases of the jobs this process renders
/// (a lease that can't be renewed stops its job), tells the store this process's workers are alive, and queues
/// again the jobs of workers that died anywhere (any process may: the first to look does).
fn beat(shared: &Shared) {
    let period = shared.config.lease / 3;
    let mut next = Instant::now();
    while !shared.finished.load(Ordering::SeqCst) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50).min(period));
            continue;
        }
        next = Instant::now() + period;
        let running: Vec<_> = shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|r| (r.lease.clone(), r.stop.clone()))
            .collect();
        for (lease, stop) in running {
            match shared.store.renew(&lease, shared.config.lease) {
                Ok(true) => {}
                Ok(false) => stop.set(Stop::Lost),
                Err(e) => tracing::warn!(id = lease.job, "cannot renew the lease: {e}"),
            }
        }
        let workers = shared.workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for worker in &workers {
            if let Err(e) = shared.store.worker_seen(worker) {
                tracing::warn!(worker = worker.id, "cannot record this worker as alive: {e}");
            }
        }
        match shared.store.requeue_lapsed(unix_now()) {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(n, "jobs whose worker stopped renewing its lease are queued again (or failed)");
                shared.metrics.lease_expiries.inc_by(n as u64);
                shared.wake.notify();
                shared.outbox.notify_one();
            }
            Err(e) => tracing::warn!("cannot look for lapsed leases: {e}"),
        }
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

/// A worker is alive while it was seen within this many leases (it says so every third of one).
const LIVE_LEASES: u32 = 2;

/// Reads which workers are alive, every second, for `/v1/models`, `/readyz` and refusing work no worker can do.
async fn watch_workers(shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        let reading = shared.clone();
        let within = shared.config.lease * LIVE_LEASES;
        if let Some(workers) = off_async("read the live workers", move || reading.store.live_workers(within)).await {
            *shared.live_workers.lock().unwrap_or_else(|p| p.into_inner()) = Some(workers);
        }
    }
}

/// Runs a store call off the async threads (both stores block); a failure (of the call, or of its task) is logged
/// as what could not be done, and is `None`.
async fn off_async<T: Send + 'static>(
    what: &str,
    call: impl FnOnce() -> Result<T, store::StoreError> + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            tracing::warn!("cannot {what}: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("cannot {what}: the task failed: {e}");
            None
        }
    }
}

/// The data folder's subfolders: the outputs (`videos/`) and the jobs' sources and spooled uploads (`inputs/`).
const DATA_FOLDERS: [&str; 2] = ["videos", "inputs"];

/// How often sources no job owns are looked for (each look reads the store once per source kept).
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// Deletes the files of expired videos (their rows stay, so a download says "expired", not "unknown"), and
/// temporary files older than any job.
/// Each sweep takes the videos that expired since the one before; the first, at start, takes every
/// video that ever expired, in case the server was down when it should have.
async fn expire_outputs(shared: Arc<Shared>) {
    let mut interval =
        tokio::time::interval(Duration::from_secs(60).min(shared.config.retention.max(Duration::from_secs(1))));
    let mut swept_until = i64::MIN;
    let mut orphans_swept: Option<std::time::Instant> = None;
    loop {
        interval.tick().await;
        let now = unix_now();
        let task_shared = shared.clone();
        let sweep_orphans = orphans_swept.is_none_or(|at| at.elapsed() >= ORPHAN_SWEEP_EVERY);
        if sweep_orphans {
            orphans_swept = Some(std::time::Instant::now());
        }
        let expired = off_async("expire videos", move || {
            let ids = task_shared.store.expired(swept_until, now)?;
            ids.iter().for_each(|id| worker::remove_files(&task_shared, id));
            if sweep_orphans {
                remove_orphaned_sources(&task_shared, task_shared.config.job_timeout * 2);
            }
            // What a killed worker was writing, once no job can still be writing it.
            for folder in DATA_FOLDERS {
                remove_temporary_files(&task_shared.config.data_dir.join(folder), task_shared.config.job_timeout * 2);
            }
            if let Some(bucket) = &task_shared.bucket {
                match bucket.wait(bucket.sweep("staging", task_shared.config.job_timeout * 2)) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(n, "staged objects no completion took are deleted"),
                    Err(e) => tracing::warn!("cannot sweep the staged objects: {e}"),
                }
            }
            Ok(ids.len())
        })
        .await;
        if let Some(n) = expired {
            swept_until = now;
            if n > 0 {
                tracing::debug!(n, "expired videos' files deleted");
            }
        }
    }
}

/// Sources kept for a job the store never recorded (the process died between keeping them, here or in the bucket,
/// and inserting the job), which no job would ever use or delete. Only those older than `older_than`: another
/// node may be about to insert its job.
fn remove_orphaned_sources(shared: &Shared, older_than: Duration) {
    // A source is named by its job's id (`<id>.mp4`, `<id>.image`, ...); a store that can't answer keeps it.
    let orphaned = |name: &str| matches!(shared.store.get(name.split('.').next().unwrap_or_default()), Ok(None));
    if let Ok(entries) = std::fs::read_dir(worker::inputs_dir(shared)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            // Hidden names are uploads and copies in progress (see remove_temporary_files).
            if !name.starts_with('.') && age.is_some_and(|age| age >= older_than) && orphaned(&name) {
                tracing::info!(name, "a source no job owns is deleted");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let Some(bucket) = &shared.bucket else { return };
    let names = match bucket.wait(bucket.list_older("inputs", older_than)) {
        Ok(names) => names,
        Err(e) => return tracing::warn!("cannot list the sources in object storage: {e}"),
    };
    let orphans: Vec<String> =
        names.into_iter().filter(|name| orphaned(name.strip_prefix("inputs/").unwrap_or(name))).collect();
    if !orphans.is_empty() {
        tracing::info!(n = orphans.len(), "sources in object storage no job owns are deleted");
        if let Err(e) = bucket.wait(bucket.delete(&orphans)) {
            tracing::warn!("cannot delete sources no job owns: {e}");
        }
    }
}

/// Temporary files a killed process left behind (`.name.tmp-...`, see kinetoscope-video, and outputs staged
/// under a lease, `.id.lease_....mp4`): never complete, never served. Only those last changed more than
/// `older_than` ago.
fn remove_temporary_files(dir: &std::path::Path, older_than: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let temporary = name.starts_with('.') && (name.contains(".tmp-") || name.contains(".lease_"));
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if temporary && age.is_none_or(|age| age >= older_than) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
