//! Memory across many jobs: the server renders jobs one after another and the resident memory of the
//! process is sampled after a warm-up and after every job. A leak shows as growth that keeps going.
//!
//!     cargo bench -p kinetoscope-server --bench server_soak [-- JOBS]
//!
//! The tiny model on the CPU: this measures the server's and pipeline's own allocations per job (request,
//! tensors, encoding, SQLite, events), not the model's size.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{store_name, BenchServer, JOB, KEY};
use kinetoscope_server::metrics::resident_memory_bytes;
use reqwest::Client;
use serde_json::{json, Value};

const WARM_UP: usize = 5;

async fn render(client: &Client, base: &str, i: usize) {
    let body = json!({"prompt": format!("soak clip {i}"), "seed": i});
    let created: Value = client
        .post(format!("{base}/v1/videos"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap_or_else(|| panic!("{created}")).to_string();
    loop {
        let video: Value =
            client.get(format!("{base}/v1/videos/{id}")).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
        match video["status"].as_str().unwrap() {
            "completed" => break,
            "failed" => panic!("{id} failed: {video}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let response = client.get(format!("{base}/v1/videos/{id}/content")).bearer_auth(KEY).send().await.unwrap();
    assert!(response.bytes().await.unwrap().len() > 100);
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let jobs: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(50);
    let server = BenchServer::start(|_| {}).await;
    let (client, base) = (&server.client, server.base.as_str());

    for i in 0..WARM_UP {
        render(client, base, i).await;
    }
    let start_rss = resident_memory_bytes().expect("resident memory is read from /proc (Linux)");
    let started = Instant::now();
    let mut samples = Vec::with_capacity(jobs);
    for i in 0..jobs {
        render(client, base, WARM_UP + i).await;
        samples.push(resident_memory_bytes().unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    let end_rss = *samples.last().unwrap();
    let peak = samples.iter().copied().max().unwrap();
    // Growth over the second half alone tells a leak (steady growth) from allocator warm-up (a step).
    let half = samples[jobs / 2 - 1];
    println!("{jobs} sequential jobs after {WARM_UP} warm-up jobs, {JOB}, {}, {seconds:.1} s", store_name());
    println!("| resident memory | MiB |\n| --- | --- |");
    println!("| after warm-up | {:.1} |", mib(start_rss));
    println!("| after job {} | {:.1} |", jobs / 2, mib(half));
    println!("| after job {jobs} | {:.1} |", mib(end_rss));
    println!("| peak | {:.1} |", mib(peak));
    println!(
        "growth: {:+.1} MiB over all {jobs} jobs, {:+.1} MiB over the last {}",
        mib(end_rss) - mib(start_rss),
        mib(end_rss) - mib(half),
        jobs - jobs / 2
    );
    server.stop().await;
}
