//! What the server benches share: `kinetoscope serve` in-process on loopback with one CPU worker on tiny
//! model a at small defaults, and a client keyed for it. With `KINETOSCOPE_BENCH_POSTGRES` (a PostgreSQL URL whose
//! role may create databases, as `scripts/postgres.sh` prints) its jobs live in a throwaway PostgreSQL database
//! instead of SQLite.

use std::path::Path;
use std::time::Duration;

use kinetoscope_server::{ApiKeys, Config, Defaults, Server};
use reqwest::{Client, StatusCode};

pub const KEY: &str = "bench-key-0123456789abcdef";

/// What every job renders unless a request says otherwise, as the benches print it.
pub const JOB: &str = "tiny model a (48x32, 9 frames, 2 steps)";

pub struct BenchServer {
    pub base: String,
    pub client: Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The job database and videos; removed when the bench ends.
    _data: tempfile::TempDir,
    _database: Option<kinetoscope_server::store::ThrowawayDatabase>,
}

/// Which store the bench runs on, as its report names it.
pub fn store_name() -> &'static str {
    match std::env::var_os("KINETOSCOPE_BENCH_POSTGRES") {
        Some(_) => "PostgreSQL",
        None => "SQLite",
    }
}

impl BenchServer {
    /// Starts the server with the benches' defaults, then `configure`'s changes, and waits until its model
    /// is loaded.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> BenchServer {
        let data = tempfile::tempdir().unwrap();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan21-tiny-a");
        let mut config = Config::new(&model.display().to_string(), data.path(), ApiKeys::new(&[KEY]).unwrap());
        config.defaults = Defaults { width: 48, height: 32, seconds: 1, fps: 8, steps: 2, guidance_scale: 5.0 };
        configure(&mut config);
        let database = std::env::var("KINETOSCOPE_BENCH_POSTGRES")
            .ok()
            .map(|admin| kinetoscope_server::store::ThrowawayDatabase::create(&admin).unwrap());
        config.store = database.as_ref().map(|database| database.url.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // Blocking (the PostgreSQL client may not block an async thread).
        let server = tokio::task::spawn_blocking(move || Server::start(config)).await.unwrap().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = stopped.await;
        }));
        let client = Client::builder().timeout(Duration::from_secs(120)).pool_max_idle_per_host(64).build().unwrap();
        while client.get(format!("{base}/readyz")).send().await.map(|r| r.status()).ok() != Some(StatusCode::OK) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        BenchServer { base, client, stop, task, _data: data, _database: database }
    }

    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}
