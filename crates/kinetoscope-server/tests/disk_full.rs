//! A full disk, on a real one: the data folder on a 32 MiB tmpfs and its `videos/` on a 4 MiB one (as an
//! operator may put outputs on their own volume), filled with a file. The test re-runs itself inside a new
//! user and mount namespace (`unshare`), where it may mount them without being root and where the mounts
//! vanish with the process.
//!
//! Below `--min-free-disk` new work is refused with 507 `insufficient_storage`, `/readyz` says so and
//! queued jobs wait; with a disk full to the last byte a job that can't be written stays queued, a delete
//! frees its files, and an upload is 507; once space is back, every waiting job completes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Running, KEY};
use kinetoscope_server::store::{self, NewJob, Settings};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Set in the re-run: the tmpfs mounted for it.
const TMPFS: &str = "KINETOSCOPE_TEST_TMPFS";

#[test]
fn a_full_disk_refuses_new_work_keeps_queued_work_and_frees_on_delete() {
    if let Some(mount) = std::env::var_os(TMPFS) {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(on_a_small_disk(Path::new(&mount)));
    }
    let mount = tempfile::tempdir().unwrap();
    let output = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(concat!(
            r#"mount -t tmpfs -o size=32m kinetoscope-test "$0" && mkdir -p "$0/data/videos" && "#,
            r#"mount -t tmpfs -o size=4m kinetoscope-test "$0/data/videos" && exec "$@""#
        ))
        .arg(mount.path())
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "a_full_disk_refuses_new_work_keeps_queued_work_and_frees_on_delete", "--nocapture"])
        .env(TMPFS, mount.path())
        .output()
        .expect("unshare (util-linux) runs this test in its own mount namespace");
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the test on a tmpfs failed:\n{log}");
    assert!(log.contains("1 passed"), "the re-run ran no test:\n{log}");
}

fn queued_job(id: &str) -> NewJob {
    NewJob {
        id: id.into(),
        model: "wan21-tiny-a".into(),
        seconds: "1".into(),
        settings: Settings {
            prompt: format!("prompt of {id}"),
            negative_prompt: String::new(),
            width: 48,
            height: 32,
            num_frames: 9,
            fps: 8,
            steps: 2,
            guidance_scale: 5.0,
            seed: 7,
            ..Settings::default()
        },
        remixed_from: None,
        webhook_url: None,
    }
}

/// Fills the filesystem of `path` to the last page (a file at `path`), then frees `leave` bytes of it.
fn fill(path: &Path, leave: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    let page = vec![0xA5u8; 4096];
    let mut written = 0u64;
    loop {
        match file.write(&page) {
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    file.set_len(written.saturating_sub(leave)).unwrap();
    file.sync_all().unwrap();
}

async fn status_of(server: &Running, id: &str) -> String {
    let (code, video) = server.get(&format!("/v1/videos/{id}")).await;
    assert_eq!(code, StatusCode::OK, "{video}");
    video["status"].as_str().unwrap().to_string()
}

async fn on_a_small_disk(mount: &Path) {
    let data = mount.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let filler = mount.join("filler");
    let config = |min_free_disk| {
        let mut config = common::config(&data);
        config.min_free_disk = min_free_disk;
        config
    };

    // Below the threshold: a job already queued waits; new ones are refused; readiness says why.
    store::open(data.join("jobs.sqlite").to_str().unwrap()).unwrap().insert(&queued_job("video_waits"), 1, 10).unwrap();
    fill(&filler, 2 << 20);
    let server = Running::start(config(8 << 20)).await;
    let (code, ready) = server.get("/readyz").await;
    assert_eq!((code, ready["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("low_disk")), "{ready}");
    assert!(ready["free_bytes"].as_u64().unwrap() < 8 << 20, "{ready}");
    let (code, error) = server.post("/v1/videos", json!({"prompt": "a fox"})).await;
    assert_eq!(
        (code, error["error"]["code"].as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, Some("insufficient_storage"))
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("--min-free-disk"), "{error}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status_of(&server, "video_waits").await, "queued");
    // Space is back: the job runs, and new ones are taken.
    std::fs::remove_file(&filler).unwrap();
    server.wait_for("video_waits", "completed").await;
    let (code, ready) = server.get("/readyz").await;
    assert_eq!(code, StatusCode::OK, "{ready}");
    server.stop().await;

    // Full to the last byte, with no threshold to warn first: the outputs' disk. The job that can't be
    // written is not failed for it: it is queued again, or still waiting to be taken.
    store::open(data.join("jobs.sqlite").to_str().unwrap()).unwrap().insert(&queued_job("video_stuck"), 2, 10).unwrap();
    let full_outputs = data.join("videos").join("filler");
    fill(&full_outputs, 0);
    let server = Running::start(config(0)).await;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let status = status_of(&server, "video_stuck").await;
        assert!(["queued", "in_progress"].contains(&status.as_str()), "video_stuck is {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A delete frees its files even now.
    let response = server.client.delete(server.url("/v1/videos/video_waits")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());
    let left: Vec<PathBuf> = common::files_in(&data.join("videos"));
    assert!(!left.iter().any(|p| p.to_string_lossy().contains("video_waits")), "{left:?}");

    // And the data folder's disk full too: an upload can't be kept.
    let clip = mount.join("clip.mp4");
    let frames = kinetoscope_video::Frames::new(vec![90; 9 * 32 * 48 * 3], 9, 32, 48).unwrap();
    kinetoscope_video::write_mp4(&clip, &frames, 8).unwrap();
    let video = std::fs::read(&clip).unwrap();
    fill(&filler, 0);
    let form = Form::new().text("prompt", "a fox").part("video", Part::bytes(video).file_name("clip.mp4"));
    let response = server.client.post(server.url("/v1/videos/edits")).bearer_auth(KEY).multipart(form).send().await;
    let response = response.unwrap();
    let code = response.status();
    let error: Value = response.json().await.unwrap();
    assert_eq!(
        (code, error["error"]["code"].as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, Some("insufficient_storage")),
        "{error}"
    );
    assert!(common::files_in(&data.join("inputs")).is_empty());

    // Space is back: the stuck job completes.
    std::fs::remove_file(&full_outputs).unwrap();
    // Space is back: the stuck job completes.
    std::fs::remove_file(&filler).unwrap();
    server.wait_for("video_stuck", "completed").await;
    server.stop().await;
}
