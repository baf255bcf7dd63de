//! A bounded load test of `kinetoscope serve` on loopback, in one of two modes:
//!
//!     cargo bench -p kinetoscope-server --bench server_load [-- WAVES CREATES_PER_WAVE]
//!     cargo bench -p kinetoscope-server --bench server_load -- --job-seconds SECONDS
//!
//! - Waves (the default, 4 × 32, seconds): bursts of concurrent creates against a small queue, each
//!   polled until the queue drains, then every video downloaded.
//! - Sustained (`--job-seconds`): creators, pollers and downloaders run at once, without pause, until the
//!   worker has spent SECONDS rendering (its own `job_duration_seconds`); creators keep the queue at its
//!   bound, so many creates get 429; downloaders delete some videos once fetched, creators delete some jobs
//!   right after creating them (queued or already running).
//!
//! Both end with the same checks: every accepted job completed (a failure is an error) unless it was
//! deleted, deleted ones are gone, the listing holds each remaining job exactly once, every download is an
//! MP4 of the requested size and frame count, and the only non-2xx answers were 429 `queue_full`.
//!
//! The tiny model renders each job in a fraction of a second on a CPU, so the figures are the API's own
//! cost under load, not the model's. With `KINETOSCOPE_BENCH_POSTGRES` set the jobs live in PostgreSQL (see
//! `common`), for comparing the two stores under the same load.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{store_name, BenchServer, JOB, KEY};
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};

const MAX_QUEUE: usize = 16;
/// Frames of a default job: 1 s at 8 fps, rounded to the model's 4k+1 frame counts.
const FRAMES: usize = 9;
const CREATORS: usize = 4;
const POLLERS: usize = 2;
const DOWNLOADERS: usize = 2;
/// Every n-th accepted job is deleted at once (it may be queued or running).
const DELETE_CREATED_EVERY: usize = 25;
/// Every n-th downloaded video is deleted after its download.
const DELETE_DOWNLOADED_EVERY: usize = 8;
/// How long the queue may take to drain once creating stops before the remaining jobs count as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);

const CREATE: &str = "POST /v1/videos";
const CREATE_REFUSED: &str = "POST /v1/videos (429)";
const RETRIEVE: &str = "GET /v1/videos/{id}";
const LIST: &str = "GET /v1/videos?limit=100";
const CONTENT: &str = "GET /v1/videos/{id}/content";
const DELETE: &str = "DELETE /v1/videos/{id}";
const METRICS: &str = "GET /metrics";

enum Mode {
    Waves { waves: usize, per_wave: usize },
    Sustained { job_seconds: f64 },
}

impl Mode {
    /// `cargo bench` adds `--bench`; any argument that isn't ours is ignored.
    fn from_args(args: &[String]) -> Mode {
        if let Some(at) = args.iter().position(|a| a == "--job-seconds") {
            let value = args.get(at + 1).and_then(|v| v.parse().ok()).filter(|s: &f64| *s > 0.0);
            let job_seconds = value.expect("--job-seconds takes a number of seconds > 0");
            return Mode::Sustained { job_seconds };
        }
        let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
        Mode::Waves { waves: numbers.first().copied().unwrap_or(4), per_wave: numbers.get(1).copied().unwrap_or(32) }
    }
}

/// One answer, read whole.
struct Answer {
    status: StatusCode,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the clients saw: every accepted id and where it is, and everything that went wrong.
#[derive(Default)]
struct Ledger {
    accepted: Vec<String>,
    /// Accepted, not yet seen finished, not deleted.
    pending: Vec<String>,
    /// Completed, not yet downloaded.
    ready: VecDeque<String>,
    downloads: BTreeMap<String, usize>,
    deleted: HashSet<String>,
    refused: usize,
    errors: Vec<String>,
}

/// The clients' shared state: the server, the latency of every call by route, and the ledger.
struct Load {
    server: BenchServer,
    latencies: Mutex<BTreeMap<&'static str, Vec<f64>>>,
    ledger: Mutex<Ledger>,
    /// Downloads are written here to be probed.
    scratch: tempfile::TempDir,
    downloaded: AtomicUsize,
}

impl Load {
    fn new(server: BenchServer) -> Load {
        Load {
            server,
            latencies: Mutex::default(),
            ledger: Mutex::default(),
            scratch: tempfile::tempdir().unwrap(),
            downloaded: AtomicUsize::new(0),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap()
    }

    fn error(&self, message: String) {
        self.ledger().errors.push(message);
    }

    /// Sends a call, reads the whole answer and records the time under `route`; a transport error is
    /// recorded as an error and answers `None`.
    async fn call(&self, route: &'static str, method: Method, path: &str, body: Option<Value>) -> Option<Answer> {
        let mut request = self.server.client.request(method, format!("{}{path}", self.server.base)).bearer_auth(KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let started = Instant::now();
        let answer = match request.send().await {
            Ok(response) => {
                let (status, headers) = (response.status(), response.headers().clone());
                response.bytes().await.map(|body| Answer { status, headers, body: body.to_vec() })
            }
            Err(e) => Err(e),
        };
        let seconds = started.elapsed().as_secs_f64();
        // A refusal costs no commit: it gets a row of its own.
        let refused = answer.as_ref().is_ok_and(|a| a.status == StatusCode::TOO_MANY_REQUESTS);
        let route = if route == CREATE && refused { CREATE_REFUSED } else { route };
        self.latencies.lock().unwrap().entry(route).or_default().push(seconds);
        answer.map_err(|e| self.error(format!("{route} {path}: {e}"))).ok()
    }

    /// Creates one job; if accepted, its id and how many were accepted before it; `None` if refused (429)
    /// or wrong (recorded). The caller tracks it or deletes it.
    async fn create(&self, prompt: String, seed: usize) -> Option<(String, usize)> {
        let answer =
            self.call(CREATE, Method::POST, "/v1/videos", Some(json!({"prompt": prompt, "seed": seed}))).await?;
        let body = answer.json();
        match answer.status {
            StatusCode::OK => match body["id"].as_str() {
                Some(id) => {
                    let mut ledger = self.ledger();
                    ledger.accepted.push(id.to_string());
                    Some((id.to_string(), ledger.accepted.len() - 1))
                }
                None => {
                    self.error(format!("create answered no id: {body}"));
                    None
                }
            },
            StatusCode::TOO_MANY_REQUESTS => {
                if body["error"]["code"] != "queue_full" || !answer.headers.contains_key(header::RETRY_AFTER) {
                    self.error(format!("a 429 without queue_full and Retry-After: {body}"));
                }
                self.ledger().refused += 1;
                None
            }
            other => {
                self.error(format!("create answered {other}: {body}"));
                None
            }
        }
    }

    /// Polls `id` from now on, until it finishes.
    fn track(&self, id: String) {
        self.ledger().pending.push(id);
    }

    /// Whether polling should go on: jobs are pending and nothing has gone wrong.
    fn waiting(&self) -> bool {
        let ledger = self.ledger();
        !ledger.pending.is_empty() && ledger.errors.is_empty()
    }

    /// Retrieves every pending job whose position is `share` modulo `shares`: completed ones become ready
    /// to download, failed ones are errors.
    async fn poll(&self, share: usize, shares: usize) {
        let ids: Vec<String> = self.ledger().pending.iter().skip(share).step_by(shares).cloned().collect();
        for id in ids {
            let Some(answer) = self.call(RETRIEVE, Method::GET, &format!("/v1/videos/{id}"), None).await else {
                continue;
            };
            let video = answer.json();
            if answer.status != StatusCode::OK {
                self.error(format!("retrieve {id} answered {}: {video}", answer.status));
                continue;
            }
            let finished = match video["status"].as_str() {
                Some("queued" | "in_progress") => continue,
                Some("completed") => true,
                _ => false,
            };
            let mut ledger = self.ledger();
            let before = ledger.pending.len();
            ledger.pending.retain(|p| *p != id);
            // The pollers' shares are positions in a list that shrinks, so two may see the same job finish.
            if ledger.pending.len() == before {
                continue;
            }
            if finished {
                ledger.ready.push_back(id);
            } else {
                ledger.errors.push(format!("{id} ended {video}"));
            }
        }
    }

    async fn list(&self) {
        if let Some(answer) = self.call(LIST, Method::GET, "/v1/videos?limit=100", None).await {
            if answer.status != StatusCode::OK {
                self.error(format!("list answered {}: {}", answer.status, answer.json()));
            }
        }
    }

    /// Downloads a completed video and checks it is a whole MP4 of the default job's size and frames.
    async fn download(&self, id: &str) {
        let Some(answer) = self.call(CONTENT, Method::GET, &format!("/v1/videos/{id}/content"), None).await else {
            return;
        };
        *self.ledger().downloads.entry(id.to_string()).or_default() += 1;
        if answer.status != StatusCode::OK {
            return self.error(format!("content of {id} answered {}: {}", answer.status, answer.json()));
        }
        let length = answer.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if length != Some(answer.body.len()) {
            return self.error(format!("content of {id}: {} bytes, Content-Length {length:?}", answer.body.len()));
        }
        let path = self.scratch.path().join(format!("{id}.mp4"));
        std::fs::write(&path, &answer.body).unwrap();
        let probed = kinetoscope_video::probe(&path);
        std::fs::remove_file(&path).unwrap();
        match probed {
            Ok(info) if (info.width, info.height, info.frames) == (48, 32, FRAMES) => {}
            Ok(info) => {
                self.error(format!("content of {id} is {}x{}, {} frames", info.width, info.height, info.frames))
            }
            Err(e) => self.error(format!("content of {id} is not a valid MP4: {e}")),
        }
    }

    async fn delete(&self, id: &str) {
        let Some(answer) = self.call(DELETE, Method::DELETE, &format!("/v1/videos/{id}"), None).await else {
            return;
        };
        let body = answer.json();
        let mut ledger = self.ledger();
        if answer.status == StatusCode::OK && body["deleted"] == true {
            ledger.deleted.insert(id.to_string());
        } else {
            ledger.errors.push(format!("delete {id} answered {}: {body}", answer.status));
        }
    }

    /// The worker's total rendering time so far and its completed jobs, from `/metrics`.
    async fn rendered(&self) -> (f64, u64) {
        let text = match self.call(METRICS, Method::GET, "/metrics", None).await {
            Some(answer) if answer.status == StatusCode::OK => String::from_utf8_lossy(&answer.body).into_owned(),
            _ => return (0.0, 0),
        };
        let value = |prefix: &str| {
            text.lines().find_map(|line| line.strip_prefix(prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        (value("kinetoscope_job_duration_seconds_sum "), value("kinetoscope_jobs_total{outcome=\"completed\"} ") as u64)
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = Mode::from_args(&args);
    let server = BenchServer::start(|config| config.limits.max_queue = MAX_QUEUE).await;
    let load = Arc::new(Load::new(server));
    let started = Instant::now();
    let attempted = match mode {
        Mode::Waves { waves, per_wave } => {
            println!(
                "{waves} waves of {per_wave} concurrent creates, queue bound {MAX_QUEUE}, {JOB}, {}",
                store_name()
            );
            run_waves(&load, waves, per_wave).await;
            waves * per_wave
        }
        Mode::Sustained { job_seconds } => {
            println!(
                "sustained until {job_seconds} s rendered: {CREATORS} creators, {POLLERS} pollers, {DOWNLOADERS} \
                 downloaders at once, queue bound {MAX_QUEUE}, {JOB}, {}",
                store_name()
            );
            run_sustained(&load, job_seconds).await
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let (job_seconds, completed_metric) = load.rendered().await;
    let errors = check_outcome(&load, attempted).await;

    // A block, not a drop: the guard must visibly end before the server's stop is awaited.
    {
        let ledger = load.ledger();
        let completed = ledger.downloads.len();
        println!(
            "creates: {attempted}; accepted {}, refused with 429 queue_full {}; completed and downloaded {completed} \
         (the server counts {completed_metric} completed), deleted {}",
            ledger.accepted.len(),
            ledger.refused,
            ledger.deleted.len()
        );
        println!(
            "wall {wall:.1} s; job-seconds (worker rendering) {job_seconds:.1} s, {:.3} s per job; {:.1} jobs/s\n",
            job_seconds / completed_metric.max(1) as f64,
            completed as f64 / wall
        );
        println!("| call | n | p50 ms | p95 ms | p99 ms |\n| --- | --- | --- | --- | --- |");
        for (route, samples) in load.latencies.lock().unwrap().iter_mut() {
            samples.sort_by(f64::total_cmp);
            let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize] * 1e3;
            println!("| {route} | {} | {:.2} | {:.2} | {:.2} |", samples.len(), at(0.5), at(0.95), at(0.99));
        }
    }
    assert!(errors.is_empty(), "{} errors:\n{}", errors.len(), errors.join("\n"));
    println!("\nchecks passed: nothing lost, duplicated or failed; every download a whole MP4; no non-2xx but 429");
    Arc::into_inner(load).expect("every client has finished").server.stop().await;
}

/// Each wave fires `per_wave` creates at once (more than the queue holds), then polls until the queue
/// drains; at the end every video is downloaded.
async fn run_waves(load: &Arc<Load>, waves: usize, per_wave: usize) {
    for wave in 0..waves {
        let creates = (0..per_wave).map(|i| {
            let load = load.clone();
            tokio::spawn(async move {
                if let Some((id, _)) = load.create(format!("wave {wave} clip {i}"), i).await {
                    load.track(id);
                }
            })
        });
        futures_util::future::join_all(creates).await;
        while load.waiting() {
            load.poll(0, 1).await;
            load.list().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ready: Vec<String> = load.ledger().ready.drain(..).collect();
    for id in ready {
        load.download(&id).await;
    }
}

/// Creators, pollers, downloaders and a watcher of `/metrics` at once, until the worker has rendered for
/// `job_seconds`; then the queue drains. Answers the number of creates attempted.
async fn run_sustained(load: &Arc<Load>, job_seconds: f64) -> usize {
    let creating = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(AtomicUsize::new(0));
    let creators: Vec<_> = (0..CREATORS)
        .map(|c| {
            let (load, creating, attempts) = (load.clone(), creating.clone(), attempts.clone());
            tokio::spawn(async move {
                while creating.load(Ordering::Relaxed) {
                    let n = attempts.fetch_add(1, Ordering::Relaxed);
                    match load.create(format!("creator {c} clip {n}"), n).await {
                        Some((id, index)) if index % DELETE_CREATED_EVERY == DELETE_CREATED_EVERY - 1 => {
                            load.delete(&id).await
                        }
                        Some((id, _)) => load.track(id),
                        // Refused: back off briefly, as a client honouring Retry-After would, only shorter, to
                        // keep the queue at its bound.
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        })
        .collect();
    // Creating has stopped and every accepted job is finished (or deleted) and downloaded.
    let drained = {
        let creating = creating.clone();
        move |ledger: &Ledger| !creating.load(Ordering::Relaxed) && ledger.pending.is_empty() && ledger.ready.is_empty()
    };
    let pollers: Vec<_> = (0..POLLERS)
        .map(|share| {
            let (load, drained) = (load.clone(), drained.clone());
            tokio::spawn(async move {
                while !drained(&load.ledger()) {
                    load.poll(share, POLLERS).await;
                    load.list().await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    let downloaders: Vec<_> = (0..DOWNLOADERS)
        .map(|_| {
            let (load, drained) = (load.clone(), drained.clone());
            tokio::spawn(async move {
                loop {
                    let next = load.ledger().ready.pop_front();
                    match next {
                        Some(id) => {
                            load.download(&id).await;
                            if load.downloaded.fetch_add(1, Ordering::Relaxed) % DELETE_DOWNLOADED_EVERY == 0 {
                                load.delete(&id).await;
                            }
                        }
                        None if drained(&load.ledger()) => break,
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect();

    let mut last_report = Instant::now();
    loop {
        let (rendered, completed) = load.rendered().await;
        if rendered >= job_seconds {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(60) {
            eprintln!("{rendered:.0} of {job_seconds} s rendered, {completed} jobs completed");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    creating.store(false, Ordering::Relaxed);
    for task in creators {
        task.await.unwrap();
    }
    let clients = futures_util::future::join_all(pollers.into_iter().chain(downloaders));
    if tokio::time::timeout(DRAIN_LIMIT, clients).await.is_err() {
        let mut ledger = load.ledger();
        let stuck = ledger.pending.len() + ledger.ready.len();
        ledger
            .errors
            .push(format!("{stuck} jobs neither finished nor downloaded {DRAIN_LIMIT:?} after creating stopped"));
        // Nothing may be counted twice below: the stuck clients are abandoned with their work.
        ledger.pending.clear();
        ledger.ready.clear();
    }
    attempts.load(Ordering::Relaxed)
}

/// Nothing lost or duplicated: each accepted job was downloaded exactly once unless deleted, deleted ones
/// are gone, and the listing holds exactly the rest. Answers every error seen, during the run or now.
async fn check_outcome(load: &Load, attempted: usize) -> Vec<String> {
    let (expected, deleted): (Vec<String>, Vec<String>) = {
        let ledger = load.ledger();
        let deleted: Vec<String> = ledger.deleted.iter().cloned().collect();
        let mut expected: Vec<String> =
            ledger.accepted.iter().filter(|id| !ledger.deleted.contains(*id)).cloned().collect();
        expected.sort();
        (expected, deleted)
    };
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after.as_ref().map_or(String::new(), |a| format!("&after={a}"));
        let page = load.call(LIST, Method::GET, &format!("/v1/videos?limit=100&order=asc{query}"), None).await.unwrap();
        let page = page.json();
        listed.extend(page["data"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_string()));
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = page["last_id"].as_str().map(String::from);
    }
    for id in &deleted {
        let answer = load.call(RETRIEVE, Method::GET, &format!("/v1/videos/{id}"), None).await.unwrap();
        if answer.status != StatusCode::NOT_FOUND || answer.json()["error"]["code"] != "video_not_found" {
            load.error(format!("deleted {id} still answers {}: {}", answer.status, answer.json()));
        }
    }

    let ledger = load.ledger();
    let mut errors = ledger.errors.clone();
    let listed_count = listed.len();
    listed.sort();
    listed.dedup();
    if listed_count != listed.len() {
        errors.push(format!("the listing holds {} jobs more than once", listed_count - listed.len()));
    }
    if listed != expected {
        errors.push(format!("the listing has {} jobs, {} were accepted and not deleted", listed.len(), expected.len()));
    }
    let twice: Vec<&String> = ledger.downloads.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id).collect();
    if !twice.is_empty() {
        errors.push(format!("downloaded more than once: {twice:?}"));
    }
    let undelivered = expected.iter().filter(|id| !ledger.downloads.contains_key(*id)).count();
    if undelivered > 0 {
        errors.push(format!("{undelivered} accepted jobs never completed or were never downloaded"));
    }
    if ledger.accepted.len() + ledger.refused != attempted {
        errors.push(format!("{attempted} creates, {} accepted + {} refused", ledger.accepted.len(), ledger.refused));
    }
    errors
}
