//! The OpenAI Videos API, self-hosted: `kinetoscope serve`.
//!
//! Clients written for OpenAI's Videos API (the official `openai` SDKs included) work by changing
//! their base URL. Jobs live in SQLite and survive restarts; one worker per device renders them in
//! order; progress streams as server-sent events; finished and failed jobs are announced by signed
//! webhooks (Standard Webhooks). See the README's "Server" section for the routes and settings.

pub mod api;
pub mod config;
mod disk;
pub mod error;
mod fields;
pub mod metrics;
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
use tokio::sync::broadcast;

pub use config::{ApiKeys, Config, Defaults, Limits};
use metrics::Metrics;
use store::{Job, Store};
use webhooks::Webhooks;
use worker::{Stop, StopFlag, Wake};

/// What the API, the workers and the housekeeping share.
pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub metrics: Metrics,
    pub webhooks: Webhooks,
    /// Every change of a job, for the event streams.
    pub events: broadcast::Sender<Update>,
    pub wake: Wake,
    /// Stop flags of the jobs being rendered now, by id.
    pub running: Mutex<HashMap<String, Arc<StopFlag>>>,
    /// The first worker's model, for checking requests against it.
    pub pipeline: OnceLock<Arc<Pipeline>>,
    /// The model's size, frame and step rules from its configs, for checking requests before it is loaded.
    pub shape: kinetoscope::ModelShape,
    /// Permits to decode an upload (bounds the memory that checking uploads can take at once).
    pub decodes: tokio::sync::Semaphore,
    /// Workers whose model could not be loaded: (error code, message), for `/readyz` and for refusing
    /// work no worker can do.
    pub load_failures: Mutex<Vec<(&'static str, String)>>,
    stopping: AtomicBool,
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
        for folder in ["videos", "inputs"] {
            let dir = config.data_dir.join(folder);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating the data folder {}", dir.display()))?;
            remove_temporary_files(&dir);
        }
        // Fail now on a model that isn't there, not in a worker after the port is open; its configs say what
        // requests it takes before its weights are loaded.
        let shape = kinetoscope::ModelShape::read(&kinetoscope::ModelDir::open(&config.model)?)?;
        let db = config.data_dir.join("jobs.sqlite");
        let store = Store::open(&db).with_context(|| format!("opening the job database {}", db.display()))?;
        let requeued = store.recover(unix_now())?;
        if requeued > 0 {
            tracing::info!(requeued, "jobs that were running when the server stopped are queued again");
        }
        let webhooks = Webhooks::new(config.webhooks.clone())?;
        let decodes = tokio::sync::Semaphore::new(config.limits.max_concurrent_decodes.max(1));
        let shared = Arc::new(Shared {
            config,
            store,
            metrics: Metrics::default(),
            webhooks,
            events: broadcast::channel(1024).0,
            wake: Wake::default(),
            running: Mutex::default(),
            pipeline: OnceLock::new(),
            shape,
            decodes,
            load_failures: Mutex::default(),
            stopping: AtomicBool::new(false),
        });
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
        self.stop_workers().await;
        Ok(())
    }

    async fn stop_workers(self) {
        let grace = Instant::now() + self.shared.config.shutdown_grace;
        while self.workers.iter().any(|w| !w.is_finished()) && Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for stop in self.shared.running.lock().unwrap_or_else(|p| p.into_inner()).values() {
            stop.set(Stop::Shutdown);
        }
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join()))).await;
        tracing::info!("stopped");
    }
}

/// Serves `config` until SIGINT or SIGTERM.
pub async fn serve(config: Config) -> Result<()> {
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    Server::start(config)?.run(listener, shutdown_signal()).await
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

/// Deletes the files of expired videos (their rows stay, so a download says "expired", not "unknown").
/// Each sweep takes the videos that expired since the one before; the first, at start, takes every
/// video that ever expired, in case the server was down when it should have.
async fn expire_outputs(shared: Arc<Shared>) {
    let mut interval =
        tokio::time::interval(Duration::from_secs(60).min(shared.config.retention.max(Duration::from_secs(1))));
    let mut swept_until = i64::MIN;
    loop {
        interval.tick().await;
        let now = unix_now();
        let task_shared = shared.clone();
        let expired = tokio::task::spawn_blocking(move || {
            let ids = task_shared.store.expired(swept_until, now)?;
            ids.iter().for_each(|id| worker::remove_files(&task_shared, id));
            Ok::<_, store::StoreError>(ids.len())
        })
        .await;
        match expired {
            Ok(Ok(n)) => {
                swept_until = now;
                if n > 0 {
                    tracing::debug!(n, "expired videos' files deleted");
                }
            }
            Ok(Err(e)) => tracing::warn!("cannot expire videos: {e}"),
            Err(e) => tracing::warn!("the expiry task failed: {e}"),
        }
    }
}

/// Temporary files a killed process left behind (`.name.tmp-...`, see kinetoscope-video): never
/// complete, never served.
fn remove_temporary_files(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') && name.to_string_lossy().contains(".tmp-") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
