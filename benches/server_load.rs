//! A bounded load test of `kinetoscope serve` on loopback: bursts of concurrent creates against a
//! small queue, polls and downloads while the worker renders, then a check that every accepted job
//! completed and every refused one got 429 with a code (none lost, none duplicated).
//!
//!     cargo bench -p kinetoscope-server --bench server_load [-- WAVES CREATES_PER_WAVE]
//!
//! The tiny model renders each job in a fraction of a second on a CPU, so the figures are the API's
//! own cost under load, not the model's.

use std::path::Path;
use std::time::{Duration, Instant};

use kinetoscope_server::{ApiKeys, Config, Defaults, Server};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const KEY: &str = "bench-key-0123456789abcdef";

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(((samples.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

fn summary(name: &str, samples: &mut [f64]) {
    let (p50, p95) = (percentile(samples, 0.5), percentile(samples, 0.95));
    println!("| {name} | {} | {:.2} | {:.2} |", samples.len(), p50 * 1e3, p95 * 1e3);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (waves, per_wave) = (args.first().copied().unwrap_or(4), args.get(1).copied().unwrap_or(32));
    let data = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan21-tiny-a");
    let mut config = Config::new(&model.display().to_string(), data.path(), ApiKeys::new(&[KEY]).unwrap());
    config.defaults = Defaults { width: 48, height: 32, seconds: 1, fps: 8, steps: 2, guidance_scale: 5.0 };
    config.limits.max_queue = 16;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = Server::start(config).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(listener, async move {
        let _ = stopped.await;
    }));
    let client = Client::builder().timeout(Duration::from_secs(120)).pool_max_idle_per_host(64).build().unwrap();
    while client.get(format!("{base}/readyz")).send().await.map(|r| r.status()).ok() != Some(StatusCode::OK) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let (mut create_s, mut retrieve_s, mut list_s, mut download_s) = (vec![], vec![], vec![], vec![]);
    let (mut accepted, mut refused) = (Vec::new(), 0usize);
    for wave in 0..waves {
        // A burst larger than the queue: some must be refused, none may vanish.
        let creates = (0..per_wave).map(|i| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let body = json!({"prompt": format!("wave {wave} clip {i}"), "seed": i});
                let t = Instant::now();
                let response =
                    client.post(format!("{base}/v1/videos")).bearer_auth(KEY).json(&body).send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                (t.elapsed().as_secs_f64(), status, body)
            })
        });
        for created in futures_util::future::join_all(creates).await {
            let (seconds, status, body) = created.unwrap();
            create_s.push(seconds);
            match status {
                StatusCode::OK => accepted.push(body["id"].as_str().unwrap().to_string()),
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(body["error"]["code"], "queue_full", "{body}");
                    refused += 1;
                }
                other => panic!("create answered {other}: {body}"),
            }
        }
        // Poll everything until the queue drains, timing each call.
        loop {
            let mut pending = 0;
            for id in &accepted {
                let t = Instant::now();
                let video: Value = client
                    .get(format!("{base}/v1/videos/{id}"))
                    .bearer_auth(KEY)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                retrieve_s.push(t.elapsed().as_secs_f64());
                match video["status"].as_str().unwrap() {
                    "completed" => {}
                    "queued" | "in_progress" => pending += 1,
                    other => panic!("{id} ended {other}: {video}"),
                }
            }
            let t = Instant::now();
            client.get(format!("{base}/v1/videos?limit=100")).bearer_auth(KEY).send().await.unwrap();
            list_s.push(t.elapsed().as_secs_f64());
            if pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for id in &accepted {
        let t = Instant::now();
        let response = client.get(format!("{base}/v1/videos/{id}/content")).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.bytes().await.unwrap().len() > 100);
        download_s.push(t.elapsed().as_secs_f64());
    }
    let wall = started.elapsed().as_secs_f64();

    // Nothing lost or duplicated: the listing holds exactly the accepted jobs.
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after.as_ref().map_or(String::new(), |a| format!("&after={a}"));
        let page: Value = client
            .get(format!("{base}/v1/videos?limit=100&order=asc{query}"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed.extend(page["data"].as_array().unwrap().iter().map(|v| v["id"].as_str().unwrap().to_string()));
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        after = page["last_id"].as_str().map(String::from);
    }
    let (mut listed_sorted, mut accepted_sorted) = (listed.clone(), accepted.clone());
    listed_sorted.sort();
    listed_sorted.dedup();
    accepted_sorted.sort();
    assert_eq!(listed.len(), accepted.len(), "the listing holds a job twice or misses one");
    assert_eq!(listed_sorted, accepted_sorted, "the listing differs from the accepted jobs");
    assert_eq!(accepted.len() + refused, waves * per_wave);

    println!("{waves} waves of {per_wave} concurrent creates, queue bound 16, tiny model a (48x32, 9 frames, 2 steps)");
    println!("accepted and completed: {}, refused with 429 queue_full: {refused}, lost: 0", accepted.len());
    println!("wall {wall:.1} s, {:.1} jobs/s\n", accepted.len() as f64 / wall);
    println!("| call | n | p50 ms | p95 ms |\n| --- | --- | --- | --- |");
    summary("POST /v1/videos", &mut create_s);
    summary("GET /v1/videos/{id}", &mut retrieve_s);
    summary("GET /v1/videos?limit=100", &mut list_s);
    summary("GET /v1/videos/{id}/content", &mut download_s);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
