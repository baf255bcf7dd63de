//! The server on the tiny model for the end-to-end tests: the real routes over loopback HTTP, the real
//! worker, the real SQLite file.
// Each test binary uses its own part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kinetoscope_server::{ApiKeys, Config, Defaults, Server};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const KEY: &str = "test-key-0123456789abcdef";

pub fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan21-tiny-a").display().to_string()
}

pub fn config(data_dir: &Path) -> Config {
    let mut config = Config::new(&model(), data_dir, ApiKeys::new(&[KEY]).unwrap());
    config.model_name = "wan21-tiny-a".into();
    config.defaults = Defaults { width: 48, height: 32, seconds: 1, fps: 8, steps: 2, guidance_scale: 5.0 };
    config.poll_after = Duration::from_millis(50);
    config
}

/// A server on an ephemeral loopback port, stopped by dropping or calling `stop`.
pub struct Running {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub client: Client,
}

impl Running {
    pub async fn start(config: Config) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = Server::start(config).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async move {
            let _ = stopped.await;
        }));
        let client = Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Running { base, stop: Some(stop), task, client }
    }

    pub async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        (&mut self.task).await.unwrap().unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self.client.post(self.url(path)).bearer_auth(KEY).json(&body).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.client.get(self.url(path)).bearer_auth(KEY).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    pub async fn wait_for(&self, id: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (code, video) = self.get(&format!("/v1/videos/{id}")).await;
            assert_eq!(code, StatusCode::OK, "{video}");
            if video["status"] == status {
                return video;
            }
            assert!(!["completed", "failed"].contains(&video["status"].as_str().unwrap()), "{video}");
            assert!(Instant::now() < deadline, "{id} never became {status}: {video}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

pub async fn wait_ready(server: &Running) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.client.get(server.url("/readyz")).send().await.unwrap().status() != StatusCode::OK {
        assert!(Instant::now() < deadline, "the model never loaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn download(server: &Running, id: &str, to: &Path) -> kinetoscope_video::VideoInfo {
    let response =
        server.client.get(server.url(&format!("/v1/videos/{id}/content"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    std::fs::write(to, response.bytes().await.unwrap()).unwrap();
    kinetoscope_video::probe(to).unwrap()
}
