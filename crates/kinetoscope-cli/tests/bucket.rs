//! Object storage in place of a shared folder: 2 API nodes (`serve --no-worker`) and a worker, each with a data
//! folder of its own, sharing a PostgreSQL store and a bucket on an S3-compatible server. A video made through one
//! node downloads whole and in ranges from either; edits, extensions and a remix of an edit take their sources
//! from the bucket through whichever node accepts them; deleting the videos leaves nothing in the bucket; no data
//! folder keeps a video.
//!
//! Needs a PostgreSQL server (`KINETOSCOPE_TEST_POSTGRES`, `scripts/postgres.sh`) and an S3-compatible one
//! (`KINETOSCOPE_TEST_BUCKET` and the `AWS_*` variables, `scripts/s3.sh`); `scripts/test.sh` starts both. Without
//! them the test says so and passes, unless `KINETOSCOPE_REQUIRE_POSTGRES` and `KINETOSCOPE_REQUIRE_S3` are set, as
//! CI sets them.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{free_port, http, json, log_tails, request, tiny, wait_for, Node};
use kinetoscope_server::bucket::{self, Bucket};
use kinetoscope_server::store::ThrowawayDatabase;

const KEY: &str = "bucket-test-key-0123456789abcdef";

/// Creates a video through `port` (`route` and its JSON `body`); its id.
fn create(port: u16, route: &str, body: &str) -> String {
    let (status, created) = http(port, "POST", route, KEY, body);
    assert_eq!(status, 200, "{route} {body}: {created}");
    json(&created)["id"].as_str().unwrap().to_string()
}

/// Video `id`'s MP4 through `port`, whole, after it completed; checked to decode at the tiny size, with more
/// than `min_frames` frames.
fn download(port: u16, id: &str, min_frames: usize, dir: &Path) -> Vec<u8> {
    let answer = request(port, "GET", &format!("/v1/videos/{id}/content"), KEY, &[], "");
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.header("content-type"), Some("video/mp4"));
    assert_eq!(answer.header("accept-ranges"), Some("bytes"));
    assert_eq!(answer.header("content-length"), Some(answer.body.len().to_string().as_str()));
    let path = dir.join(format!("{id}.mp4"));
    std::fs::write(&path, &answer.body).unwrap();
    let video = kinetoscope_video::probe(&path).unwrap_or_else(|e| panic!("{id}'s MP4: {e}"));
    assert_eq!((video.width, video.height), (48, 32), "{id}");
    assert!(video.frames >= min_frames, "{id}: {} frames", video.frames);
    answer.body
}

#[test]
fn a_bucket_holds_the_files_of_nodes_that_share_no_folder() {
    let Some(database) = ThrowawayDatabase::from_env("KINETOSCOPE_TEST_POSTGRES").unwrap() else { return };
    let Some(url) = bucket::throwaway_location().unwrap() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("wan21-tiny-a");
    let data = |name: &str| dir.path().join(name).display().to_string();
    let node = |role: &str, data: &str| -> Vec<String> {
        let args = [role, "--store", &database.url, "--bucket", &url, "--data-dir", data, "--lease-s", "5"];
        let model = ["--model", &model, "--model-name", "tiny-a", "--device", "cpu"];
        args.iter().chain(&model).map(|s| s.to_string()).collect()
    };
    let env = [("KINETOSCOPE_API_KEYS", KEY)];
    let ports = [free_port(), free_port()];
    let apis: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let mut args = node("serve", &data(&format!("api{i}")));
            let listen = ["--no-worker", "--listen", &format!("127.0.0.1:{port}")];
            let defaults = ["--default-size", "48x32", "--default-seconds", "1", "--default-fps", "8"];
            args.extend(listen.iter().chain(&defaults).chain(&["--default-steps", "2"]).map(|s| s.to_string()));
            Node::start(args, dir.path().join(format!("api{i}.log")), &env)
        })
        .collect();
    let worker = Node::start(node("worker", &data("worker")), dir.path().join("worker.log"), &env);
    for port in ports {
        wait_for("the model to be served", Duration::from_secs(120), || {
            let (status, models) = http(port, "GET", "/v1/models", KEY, "");
            status == 200 && models.contains("tiny-a")
        });
    }
    let completed = |ids: &[&str]| {
        for id in ids {
            let mut job = serde_json::Value::Null;
            wait_for(&format!("{id} to end"), Duration::from_secs(300), || {
                job = json(&http(ports[1], "GET", &format!("/v1/videos/{id}"), KEY, "").1);
                job["status"] == "completed" || job["status"] == "failed"
            });
            assert_eq!(job["status"], "completed", "{job}\n{}", log_tails(dir.path()));
        }
    };

    // Made through one node, served whole and in ranges by either.
    let first = create(ports[0], "/v1/videos", r#"{"prompt": "a red fox", "seed": 1}"#);
    completed(&[&first]);
    let whole = download(ports[1], &first, 9, dir.path());
    let content = format!("/v1/videos/{first}/content");
    let part = request(ports[0], "GET", &content, KEY, &[("Range", "bytes=100-199")], "");
    assert_eq!(part.status, 206, "{}", part.head);
    assert_eq!(part.header("content-range"), Some(format!("bytes 100-199/{}", whole.len()).as_str()));
    assert_eq!(part.body, whole[100..200]);
    let tail = request(ports[1], "GET", &content, KEY, &[("Range", "bytes=-10")], "");
    assert_eq!((tail.status, &tail.body[..]), (206, &whole[whole.len() - 10..]));
    let past = request(ports[0], "GET", &content, KEY, &[("Range", &format!("bytes={}-", whole.len()))], "");
    assert_eq!(past.status, 416, "{}", past.head);
    assert_eq!(past.header("content-range"), Some(format!("bytes */{}", whole.len()).as_str()));
    let thumbnail = request(ports[1], "GET", &format!("{content}?variant=thumbnail"), KEY, &[], "");
    assert_eq!((thumbnail.status, thumbnail.header("content-type")), (200, Some("image/png")));
    assert!(thumbnail.body.starts_with(b"\x89PNG"));

    // Sources come from the bucket through whichever node takes the request, and reach the worker through it.
    let edit = create(
        ports[1],
        "/v1/videos/edits",
        &format!(r#"{{"prompt": "a blue fox", "video": {{"id": "{first}"}}, "strength": 0.5}}"#),
    );
    let extension = create(
        ports[0],
        "/v1/videos/extensions",
        &format!(r#"{{"prompt": "it runs", "seconds": 1, "video": {{"id": "{first}"}}}}"#),
    );
    completed(&[&edit, &extension]);
    download(ports[0], &edit, 9, dir.path());
    download(ports[1], &extension, 10, dir.path());
    // A remix of an edit edits the same source again: a copy inside the bucket.
    let remix = create(ports[0], &format!("/v1/videos/{edit}/remix"), r#"{"prompt": "a green fox"}"#);
    completed(&[&remix]);
    download(ports[1], &remix, 9, dir.path());

    // No machine keeps a finished video or a source: they live in the bucket.
    for name in ["api0", "api1", "worker"] {
        for folder in ["videos", "inputs"] {
            let kept: Vec<_> = std::fs::read_dir(dir.path().join(name).join(folder))
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.file_name())
                .collect();
            assert!(kept.is_empty(), "{name}/{folder} keeps {kept:?}");
        }
    }
    // Deleting the videos, through either node, deletes their objects: nothing is left, nothing staged.
    let bucket = Bucket::open(&url).unwrap();
    assert!(bucket.wait(bucket.head(&bucket::video_name(&remix, "mp4"))).is_ok());
    for (i, id) in [&first, &edit, &extension, &remix].into_iter().enumerate() {
        let (status, deleted) = http(ports[i % 2], "DELETE", &format!("/v1/videos/{id}"), KEY, "");
        assert_eq!(status, 200, "{deleted}");
    }
    assert_eq!(http(ports[1], "GET", &content, KEY, "").0, 404);
    for prefix in ["videos", "inputs", "staging"] {
        assert_eq!(bucket.wait(bucket.sweep(prefix, Duration::ZERO)).unwrap(), 0, "objects left under {prefix}/");
    }
    drop(apis);
    drop(worker);
}
