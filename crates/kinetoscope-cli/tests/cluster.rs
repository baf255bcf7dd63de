//! Many machines behind one queue, on one: 2 API nodes (`serve --no-worker`) and 3 workers (`worker`) sharing a
//! PostgreSQL store and a data folder, serving two models. 300 jobs go in through both API nodes; while they run,
//! a worker and an API node are killed with SIGKILL and started again. Every job must complete exactly once (no
//! job lost, none rendered into place twice), every MP4 must decode, every job's `video.completed` webhook must
//! reach the receiver, and a job's progress events must reach a client of either API node.
//!
//! Needs a PostgreSQL server: `KINETOSCOPE_TEST_POSTGRES` (see `scripts/postgres.sh`; `scripts/test.sh` starts one).
//! Without it the test says so and passes, unless `KINETOSCOPE_REQUIRE_POSTGRES` is set, as CI sets it.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{free_port, http, json, log_tails, receiver, tiny, wait_for, Node};
use kinetoscope_server::store::ThrowawayDatabase;
use serde_json::Value;

const KEY: &str = "cluster-test-key-0123456789abcdef";
const WEBHOOK_SECRET: &str = "whsec_a2luZXRvc2NvcGUtY2x1c3Rlci10ZXN0LXNlY3JldC0z";
const ENV: [(&str, &str); 2] = [("KINETOSCOPE_API_KEYS", KEY), ("KINETOSCOPE_WEBHOOK_SECRET", WEBHOOK_SECRET)];
const JOBS: usize = 300;
/// Short, so that the killed worker's job is queued again soon.
const LEASE_S: &str = "2";

/// Every job the store holds, through `port`'s API, by id.
fn all_jobs(port: u16) -> HashMap<String, Value> {
    let mut jobs = HashMap::new();
    let mut after = String::new();
    loop {
        let (status, page) = http(port, "GET", &format!("/v1/videos?limit=100&order=asc{after}"), KEY, "");
        assert_eq!(status, 200, "{page}");
        let page = json(&page);
        for job in page["data"].as_array().unwrap() {
            jobs.insert(job["id"].as_str().unwrap().to_string(), job.clone());
        }
        if page["has_more"] != true {
            return jobs;
        }
        after = format!("&after={}", page["last_id"].as_str().unwrap());
    }
}

fn completed(port: u16) -> usize {
    all_jobs(port).values().filter(|job| job["status"] == "completed").count()
}

/// Creates job `i` through `port`, for `model`; its prompt names it, so that the test can tell jobs apart.
fn submit(port: u16, i: usize, model: &str) -> String {
    let body = format!(r#"{{"prompt": "job {i}", "model": "{model}", "seed": {i}}}"#);
    let (status, created) = http(port, "POST", "/v1/videos", KEY, &body);
    assert_eq!(status, 200, "job {i}: {created}");
    json(&created)["id"].as_str().unwrap().to_string()
}

#[test]
fn jobs_survive_killed_workers_and_api_nodes_and_complete_exactly_once() {
    let Some(database) = ThrowawayDatabase::from_env("KINETOSCOPE_TEST_POSTGRES").unwrap() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (hook_port, received) = receiver();
    let (model_a, model_b) = (tiny("wan21-tiny-a"), tiny("wan21-tiny-b"));
    let node = |role: &str, model: &str, name: &str| -> Vec<String> {
        let args = [role, "--store", &database.url, "--data-dir", data.to_str().unwrap(), "--lease-s", LEASE_S];
        let model = ["--model", model, "--model-name", name, "--device", "cpu"];
        args.iter().chain(&model).map(|s| s.to_string()).collect()
    };
    let api_ports = [free_port(), free_port()];
    let mut apis: Vec<Node> = api_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let mut args = node("serve", &model_a, "tiny-a");
            let api = ["--no-worker", "--also-serve", &format!("tiny-b={model_b}"), "--max-queue", "400"];
            let listen = ["--listen", &format!("127.0.0.1:{port}")];
            let defaults = ["--default-size", "48x32", "--default-seconds", "1", "--default-fps", "8"];
            let hooks = [
                "--default-steps",
                "2",
                "--webhook-url",
                &format!("http://127.0.0.1:{hook_port}/hook"),
                "--webhook-allowed-host",
                &format!("127.0.0.1:{hook_port}"),
            ];
            args.extend(api.iter().chain(&listen).chain(&defaults).chain(&hooks).map(|s| s.to_string()));
            Node::start(args, dir.path().join(format!("api{i}.log")), &ENV)
        })
        .collect();
    let mut workers: Vec<Node> = [(&model_a, "tiny-a"), (&model_b, "tiny-b"), (&model_a, "tiny-a")]
        .iter()
        .enumerate()
        .map(|(i, (model, name))| {
            Node::start(node("worker", model, name), dir.path().join(format!("worker{i}.log")), &ENV)
        })
        .collect();
    let logs = || log_tails(dir.path());
    // Both API nodes see both models served before any job goes in.
    for port in api_ports {
        wait_for("both models to be served", Duration::from_secs(120), || {
            let (status, models) = http(port, "GET", "/v1/models", KEY, "");
            status == 200 && models.contains("tiny-a") && models.contains("tiny-b")
        });
    }
    let model_of = |i: usize| if i % 3 == 1 { "tiny-b" } else { "tiny-a" };
    let mut ids: HashMap<String, usize> = HashMap::new();
    for i in 0..JOBS / 2 {
        ids.insert(submit(api_ports[i % 2], i, model_of(i)), i);
    }
    // While jobs run, one of each kind of process dies without a word, and comes back.
    wait_for("the first jobs", Duration::from_secs(300), || completed(api_ports[1]) >= 30);
    workers[0].kill();
    apis[0].kill();
    std::thread::sleep(Duration::from_millis(500));
    workers[0].restart();
    apis[0].restart();
    wait_for("the API node to be back", Duration::from_secs(60), || {
        http(api_ports[0], "GET", "/readyz", "", "").0 == 200
    });
    for i in JOBS / 2..JOBS {
        ids.insert(submit(api_ports[i % 2], i, model_of(i)), i);
    }
    // Progress reaches a client of either API node, whichever worker renders the job: the stream of the last job
    // (still queued) runs through its states to `completed`, and then ends.
    let last = ids.iter().find(|(_, i)| **i == JOBS - 1).unwrap().0.clone();
    let (status, stream) = http(api_ports[0], "GET", &format!("/v1/videos/{last}/events"), KEY, "");
    assert_eq!(status, 200, "{stream}");
    let at = |event: &str| stream.find(&format!("event: video.{event}"));
    let first = at("queued").or(at("in_progress")).unwrap_or_else(|| panic!("{stream}"));
    assert!(at("completed").is_some_and(|done| done > first), "{stream}");
    wait_for("every job to end", Duration::from_secs(900), || {
        all_jobs(api_ports[0]).values().filter(|job| job["status"] == "completed" || job["status"] == "failed").count()
            == JOBS
    });

    // Every job, exactly the ones submitted, completed for its model, with a video that decodes.
    let jobs = all_jobs(api_ports[1]);
    assert_eq!(jobs.len(), JOBS, "{}", logs());
    for (id, job) in &jobs {
        let i = ids[id];
        assert_eq!(job["status"], "completed", "job {i}: {job}\n{}", logs());
        assert_eq!(
            (job["prompt"].as_str(), job["model"].as_str()),
            (Some(format!("job {i}").as_str()), Some(model_of(i)))
        );
        let video = kinetoscope_video::probe(&data.join("videos").join(format!("{id}.mp4")))
            .unwrap_or_else(|e| panic!("job {i}'s MP4: {e}"));
        assert_eq!((video.width, video.height, video.frames), (48, 32, 9), "job {i}");
    }
    // The killed worker's job ran again, under a new lease; no job ran more than twice.
    let store = kinetoscope_server::store::open(&database.url).unwrap();
    let attempts: Vec<i64> = ids.keys().map(|id| store.get(id).unwrap().unwrap().attempts).collect();
    assert!(attempts.contains(&2), "the killed worker's job was started again");
    assert!(attempts.iter().all(|n| (1..=2).contains(n)), "{attempts:?}");
    drop(store);
    // Nothing half-written is served: beside the videos and thumbnails there is at most what the killed worker was
    // writing, hidden and named by its lost lease (swept once older than any job could run).
    for entry in std::fs::read_dir(data.join("videos")).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let served = name.strip_suffix(".mp4").or(name.strip_suffix(".png")).is_some_and(|id| ids.contains_key(id));
        assert!(served || (name.starts_with('.') && name.contains(".lease_")), "{name}");
    }

    // One video.completed event per job, each delivered; a receiver de-duplicates by webhook-id, and the same id is
    // sent twice only if a node dies between the receiver's answer and recording it.
    wait_for("every webhook", Duration::from_secs(120), || {
        received.lock().unwrap().iter().map(|d| d.id.clone()).collect::<HashSet<_>>().len() >= JOBS
    });
    std::thread::sleep(Duration::from_secs(1));
    let deliveries = received.lock().unwrap();
    let mut events_of: HashMap<String, HashSet<String>> = HashMap::new();
    for delivery in deliveries.iter() {
        let event = json(&delivery.body);
        assert_eq!(event["type"], "video.completed", "{event}");
        assert_eq!(event["id"].as_str(), Some(delivery.id.as_str()));
        events_of.entry(event["data"]["id"].as_str().unwrap().to_string()).or_default().insert(delivery.id.clone());
    }
    assert_eq!(events_of.len(), JOBS);
    assert!(events_of.values().all(|events| events.len() == 1), "a job had two events");
    let repeated = deliveries.len() - JOBS;
    eprintln!("{JOBS} jobs, {} webhook deliveries ({repeated} repeated after the API node's kill)", deliveries.len());
    assert!(repeated <= 16, "more repeats than the killed node could have had in flight");
    drop(apis);
    drop(workers);
}
