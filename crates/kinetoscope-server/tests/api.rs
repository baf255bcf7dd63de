//! The server end to end on the tiny model: the real routes over loopback HTTP, the real worker,
//! the real SQLite file. (`scripts/test-server-sdk.sh` drives the same server with the official
//! `openai` Python SDK.)

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kinetoscope_server::Defaults;
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

use common::{config, download, files_in, model, wait_ready, Running, KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_is_created_polled_downloaded_listed_and_deleted() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;

    let (code, created) = server.post("/v1/videos", json!({"prompt": "a red fox", "seed": 42, "steps": 2})).await;
    assert_eq!(code, StatusCode::OK, "{created}");
    assert_eq!(created["object"], "video");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["size"], "48x32");
    assert_eq!(created["seconds"], "1");
    assert_eq!(created["model"], "wan21-tiny-a");
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("video_"), "{id}");

    let done = server.wait_for(&id, "completed").await;
    assert_eq!(done["progress"], 100);
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());
    assert!(done["expires_at"].as_i64().unwrap() > done["completed_at"].as_i64().unwrap());
    assert_eq!(done["error"], Value::Null);

    // The MP4, whole and by range.
    let content = server.url(&format!("/v1/videos/{id}/content"));
    let response = server.client.get(&content).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "video/mp4");
    let mp4 = response.bytes().await.unwrap();
    let saved = data.path().join("downloaded.mp4");
    std::fs::write(&saved, &mp4).unwrap();
    let info = kinetoscope_video::probe(&saved).unwrap();
    assert_eq!((info.width, info.height, info.frames, info.fps), (48, 32, 9, 8.0));
    let response =
        server.client.get(&content).bearer_auth(KEY).header(header::RANGE, "bytes=0-99").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.bytes().await.unwrap(), mp4[..100]);
    let response = server.client.get(format!("{content}?variant=thumbnail")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/png");
    assert!(response.bytes().await.unwrap().starts_with(b"\x89PNG"));

    // Listing, and the same seed and settings again as a remix.
    let (code, remixed) = server.post(&format!("/v1/videos/{id}/remix"), json!({"prompt": "a blue fox"})).await;
    assert_eq!(code, StatusCode::OK, "{remixed}");
    assert_eq!(remixed["remixed_from_video_id"], id.as_str());
    assert_eq!(remixed["prompt"], "a blue fox");
    let remix_id = remixed["id"].as_str().unwrap().to_string();
    server.wait_for(&remix_id, "completed").await;
    let (_, page) = server.get("/v1/videos?order=asc&limit=1").await;
    assert_eq!((page["object"].as_str(), page["has_more"].as_bool()), (Some("list"), Some(true)));
    assert_eq!(page["data"][0]["id"], id.as_str());
    let (_, page) = server.get(&format!("/v1/videos?order=asc&after={id}")).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["id"], remix_id.as_str());

    // Deleting removes the job and its files.
    let response = server.client.delete(server.url(&format!("/v1/videos/{id}"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap(), json!({"id": id, "object": "video.deleted", "deleted": true}));
    let (code, error) = server.get(&format!("/v1/videos/{id}")).await;
    assert_eq!((code, error["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("video_not_found")));
    let names: Vec<String> =
        files_in(&data.path().join("videos")).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert_eq!(names, [format!("{remix_id}.mp4"), format!("{remix_id}.png")]);

    let metrics =
        server.client.get(server.url("/metrics")).bearer_auth(KEY).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kinetoscope_jobs_total{outcome=\"completed\"} 2"), "{metrics}");
    assert!(metrics.contains("kinetoscope_step_duration_seconds_count 4"), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors_with_codes() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.limits.max_prompt_chars = 50;
    let server = Running::start(config).await;

    let cases = [
        (json!({"prompt": "x", "size": "48by32"}), "invalid_size", "size"),
        (json!({"prompt": "x", "size": "4096x32"}), "invalid_size", "size"),
        (json!({"prompt": "x", "seconds": "-1"}), "invalid_seconds", "seconds"),
        (json!({"prompt": "x", "seconds": "60"}), "invalid_seconds", "seconds"),
        (json!({"prompt": "x", "steps": 1000}), "invalid_steps", "steps"),
        (json!({"prompt": "x", "steps": "two"}), "invalid_type", "steps"),
        (json!({"prompt": "x".repeat(51)}), "prompt_too_long", "prompt"),
        (json!({"seconds": "1"}), "missing_required_parameter", "prompt"),
        (json!({"prompt": "x", "model": "sora-2"}), "model_not_found", "model"),
        (json!({"prompt": "x", "colour": "red"}), "unknown_parameter", "colour"),
        (
            json!({"prompt": "x", "input_reference": {"image_url": "http://a/b.png"}}),
            "unsupported_parameter",
            "input_reference",
        ),
        (json!({"prompt": "x", "preset": "fastest"}), "invalid_preset", "preset"),
        (json!({"prompt": "x", "webhook_url": "http://169.254.169.254/"}), "invalid_webhook_url", "webhook_url"),
    ];
    for (body, code, param) in cases {
        let (status, error) = server.post("/v1/videos", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {error}");
        assert_eq!(error["error"]["code"], code, "{body} → {error}");
        assert_eq!(error["error"]["param"], param, "{body} → {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{body} → {error}");
        assert!(!error["error"]["message"].as_str().unwrap().is_empty());
    }

    let response = server.client.get(server.url("/v1/videos")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "missing_api_key");
    let response =
        server.client.get(server.url("/v1/videos")).bearer_auth("wrong-key-0123456789").send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "invalid_api_key");
    let response = server.client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let too_big = json!({"prompt": "x", "negative_prompt": "y".repeat(2 << 20)});
    let response = server.client.post(server.url("/v1/videos")).bearer_auth(KEY).json(&too_big).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The unread rest of the body ends the connection; the client is told, so its next request opens another.
    assert_eq!(response.headers()["connection"], "close");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "request_too_large");

    let (status, error) = server.get("/v1/videos/video_nope/content").await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("video_not_found")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_creates_like_the_sdk_and_events_stream_to_completion() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let form = reqwest::multipart::Form::new()
        .text("prompt", "a lighthouse")
        .text("seconds", "1")
        .text("size", "48x32")
        .text("steps", "3")
        .text("seed", "7");
    let response = server.client.post(server.url("/v1/videos")).bearer_auth(KEY).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    let response =
        server.client.get(server.url(&format!("/v1/videos/{id}/events"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
    // The stream ends by itself once the video is completed.
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events.last(), Some(&"video.completed"), "{text}");
    let progress: Vec<i64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["progress"].as_i64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&100));

    let file = reqwest::multipart::Part::bytes(b"\x89PNG".to_vec()).file_name("ref.png");
    let form = reqwest::multipart::Form::new().text("prompt", "x").part("input_reference", file);
    let response = server.client.post(server.url("/v1/videos")).bearer_auth(KEY).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "unsupported_parameter");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_no_queued_job_and_a_full_queue_says_retry() {
    let data = tempfile::tempdir().unwrap();
    // No worker: jobs stay queued while the server stops.
    let mut idle = config(data.path());
    idle.devices.clear();
    idle.limits.max_queue = 3;
    let server = Running::start(idle).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, created) = server.post("/v1/videos", json!({"prompt": format!("clip {i}")})).await;
        assert_eq!(code, StatusCode::OK, "{created}");
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let response = server
        .client
        .post(server.url("/v1/videos"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "one more"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "30");
    assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "queue_full");
    let response = server.client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    server.stop().await;

    let server = Running::start(config(data.path())).await;
    for id in &ids {
        server.wait_for(id, "completed").await;
    }
    let response = server.client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_by_shutdown_runs_again_after_the_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut impatient = config(data.path());
    impatient.shutdown_grace = Duration::ZERO;
    let server = Running::start(impatient).await;
    let (_, created) = server.post("/v1/videos", json!({"prompt": "long one", "steps": 100})).await;
    let id = created["id"].as_str().unwrap().to_string();
    server.wait_for(&id, "in_progress").await;
    server.stop().await;

    let server = Running::start(config(data.path())).await;
    let (_, video) = server.get(&format!("/v1/videos/{id}")).await;
    assert!(["queued", "in_progress"].contains(&video["status"].as_str().unwrap()), "{video}");
    let done = server.wait_for(&id, "completed").await;
    assert_eq!(done["error"], Value::Null);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_job_stops_it_and_leaves_no_file() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let (_, created) = server.post("/v1/videos", json!({"prompt": "to be deleted", "steps": 100})).await;
    let id = created["id"].as_str().unwrap().to_string();
    server.wait_for(&id, "in_progress").await;
    let response = server.client.delete(server.url(&format!("/v1/videos/{id}"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The worker is free again: the next job completes.
    let (_, next) = server.post("/v1/videos", json!({"prompt": "next"})).await;
    server.wait_for(next["id"].as_str().unwrap(), "completed").await;
    let names: Vec<String> =
        files_in(&data.path().join("videos")).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
    assert!(names.iter().all(|n| !n.contains(&id)), "{names:?}");
    server.stop().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_that_cannot_load_are_reported_not_waited_on() {
    let data = tempfile::tempdir().unwrap();
    let broken = data.path().join("model");
    copy_dir(Path::new(&model()), &broken);
    let weights = broken.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let mut config = config(&data.path().join("data"));
    config.model = broken.display().to_string();
    let server = Running::start(config).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let response = server.client.get(server.url("/readyz")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = response.json().await.unwrap();
        if body["status"] == "failed" || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready["code"], "weights_invalid", "{ready}");
    let (status, error) = server.post("/v1/videos", json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["error"]["code"], "weights_invalid", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("diffusion_pytorch_model.safetensors"), "{error}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_time_limit_fails_with_timed_out_and_the_next_runs() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.job_timeout = Duration::ZERO;
    let server = Running::start(config).await;
    let (_, created) = server.post("/v1/videos", json!({"prompt": "slow", "steps": 3})).await;
    let failed = server.wait_for(created["id"].as_str().unwrap(), "failed").await;
    assert_eq!(failed["error"]["code"], "timed_out", "{failed}");
    assert!(failed["error"]["message"].as_str().unwrap().contains("step 1 of 3"), "{failed}");
    let (status, error) = server.get(&format!("/v1/videos/{}/content", created["id"].as_str().unwrap())).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("video_not_ready")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn videos_are_edited_redone_and_extended_by_id_or_upload() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let source = source_video(&server).await;
    let download = |id: String| {
        let (client, url) = (server.client.clone(), server.url(&format!("/v1/videos/{id}/content")));
        async move { client.get(url).bearer_auth(KEY).send().await.unwrap().bytes().await.unwrap() }
    };
    let probe = |bytes: &[u8], name: &str| {
        let path = data.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let info = kinetoscope_video::probe(&path).unwrap();
        (info.width, info.height, info.frames)
    };

    // Video-to-video of a finished video, by id.
    let body = json!({"prompt": "a blue fox", "video": {"id": source}, "strength": 0.5, "steps": 2});
    let (code, edited) = server.post("/v1/videos/edits", body).await;
    assert_eq!(code, StatusCode::OK, "{edited}");
    assert_eq!((edited["size"].as_str(), edited["seconds"].as_str()), (Some("48x32"), Some("1.12")));
    let edited = edited["id"].as_str().unwrap().to_string();
    server.wait_for(&edited, "completed").await;
    let mp4 = download(edited.clone()).await;
    assert_eq!(probe(&mp4, "edited.mp4"), (48, 32, 9));

    // A time range of an uploaded file, as the SDK sends a file (multipart).
    let form = reqwest::multipart::Form::new()
        .text("prompt", "a fox in the rain")
        .text("redo", "4-8")
        .part("video", reqwest::multipart::Part::bytes(mp4.to_vec()).file_name("clip.mp4"));
    let response = server.client.post(server.url("/v1/videos/edits")).bearer_auth(KEY).multipart(form).send().await;
    let redone: Value = response.unwrap().json().await.unwrap();
    let redone = redone["id"].as_str().unwrap_or_else(|| panic!("{redone}")).to_string();
    server.wait_for(&redone, "completed").await;

    // An extension: the source and one more second, joined.
    let body = json!({"prompt": "the fox runs off", "video": {"id": source}, "seconds": "1"});
    let (code, extended) = server.post("/v1/videos/extensions", body).await;
    assert_eq!(code, StatusCode::OK, "{extended}");
    assert_eq!(extended["seconds"], "2.12");
    let extended = extended["id"].as_str().unwrap().to_string();
    server.wait_for(&extended, "completed").await;
    assert_eq!(probe(&download(extended).await, "extended.mp4"), (48, 32, 17));

    // A remix of an edit edits the same source again.
    let (code, remixed) = server.post(&format!("/v1/videos/{edited}/remix"), json!({"prompt": "a green fox"})).await;
    assert_eq!(code, StatusCode::OK, "{remixed}");
    server.wait_for(remixed["id"].as_str().unwrap(), "completed").await;

    // Bad sources and options are refused before anything is queued, leaving no input file behind.
    let cases = [
        (json!({"prompt": "x", "video": {"id": "video_nope"}}), StatusCode::NOT_FOUND, "video_not_found"),
        (json!({"prompt": "x"}), StatusCode::BAD_REQUEST, "missing_required_parameter"),
        (json!({"prompt": "x", "video": "video_1"}), StatusCode::BAD_REQUEST, "invalid_video"),
        (
            json!({"prompt": "x", "video": {"id": source}, "strength": 0.5, "redo": "1-2"}),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (json!({"prompt": "x", "video": {"id": source}, "strength": 1.5}), StatusCode::BAD_REQUEST, "invalid_strength"),
        (json!({"prompt": "x", "video": {"id": source}, "redo": "5-40"}), StatusCode::BAD_REQUEST, "invalid_redo"),
    ];
    for (body, status, code) in cases {
        let (got, error) = server.post("/v1/videos/edits", body.clone()).await;
        assert_eq!((got, error["error"]["code"].as_str()), (status, Some(code)), "{body} → {error}");
    }
    let (got, error) = server.post("/v1/videos/extensions", json!({"prompt": "x", "video": {"id": source}})).await;
    assert_eq!((got, error["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("missing_required_parameter")));
    let (got, error) =
        server.post("/v1/videos/extensions", json!({"prompt": "x", "video": {"id": source}, "seconds": 60})).await;
    assert_eq!((got, error["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_seconds")), "{error}");
    let form = reqwest::multipart::Form::new()
        .text("prompt", "x")
        .part("video", reqwest::multipart::Part::bytes(b"not a video".to_vec()).file_name("clip.mp4"));
    let response = server.client.post(server.url("/v1/videos/edits")).bearer_auth(KEY).multipart(form).send().await;
    let error: Value = response.unwrap().json().await.unwrap();
    // Text is not a kind of video FFmpeg is let open (see tests/hostile.rs).
    assert_eq!(error["error"]["code"], "unsupported_media", "{error}");
    let inputs = files_in(&data.path().join("inputs"));
    assert_eq!(inputs.len(), 4, "one kept source per accepted edit: {inputs:?}");
    server.stop().await;
}

/// `input_reference` on a Wan 2.2 TI2V model, as the SDK uploads it and as a data: URL: the image starts the
/// video; what the server would have to fetch, or can't decode, is refused with a code before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_reference_starts_an_image_to_video_job() {
    use base64::Engine as _;
    let data = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
    let mut config = config(data.path());
    config.model = tiny.join("wan22-ti2v-tiny-a").display().to_string();
    config.defaults = Defaults { width: 64, height: 64, seconds: 1, fps: 8, steps: 2, guidance_scale: 5.0 };
    let server = Running::start(config).await;
    wait_ready(&server).await;
    let image = std::fs::read(tiny.join("reference/wan22-ti2v-tiny-a/image.png")).unwrap();

    let file = reqwest::multipart::Part::bytes(image.clone()).file_name("still.png");
    let form =
        reqwest::multipart::Form::new().text("prompt", "a fox wakes").text("seed", "3").part("input_reference", file);
    let response = server.client.post(server.url("/v1/videos")).bearer_auth(KEY).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let uploaded = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&image));
    let (code, created) = server
        .post("/v1/videos", json!({"prompt": "a fox wakes", "seed": 3, "input_reference": {"image_url": url}}))
        .await;
    assert_eq!(code, StatusCode::OK, "{created}");
    let inlined = created["id"].as_str().unwrap().to_string();

    let mut thumbnails = Vec::new();
    for id in [&uploaded, &inlined] {
        server.wait_for(id, "completed").await;
        let path = data.path().join(format!("{id}.mp4"));
        let info = download(&server, id, &path).await;
        assert_eq!((info.width, info.height, info.frames), (64, 64, 9), "{id}");
        let thumbnail = format!("/v1/videos/{id}/content?variant=thumbnail");
        let response = server.client.get(server.url(&thumbnail)).bearer_auth(KEY).send().await.unwrap();
        thumbnails.push(response.bytes().await.unwrap());
    }
    // The thumbnail (the middle frame, lossless PNG) shows the generation itself; the MP4s' bytes can differ,
    // as x264's output was seen to vary from run to run in one process.
    assert_eq!(thumbnails[0], thumbnails[1], "the same image, prompt and seed, sent two ways");
    // A remix starts from the same image again.
    let (code, remixed) = server.post(&format!("/v1/videos/{uploaded}/remix"), json!({"prompt": "a fox sleeps"})).await;
    assert_eq!(code, StatusCode::OK, "{remixed}");
    server.wait_for(remixed["id"].as_str().unwrap(), "completed").await;

    for (reference, code) in [
        (json!({"image_url": "https://example.com/fox.png"}), "unsupported_parameter"),
        (json!({"file_id": "file_123"}), "unsupported_parameter"),
        (json!({"image_url": "data:image/png;base64,@@@"}), "invalid_image"),
        (json!({"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}), "unsupported_media"),
        (json!("fox.png"), "invalid_image"),
    ] {
        let (status, error) = server.post("/v1/videos", json!({"prompt": "x", "input_reference": reference})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reference} → {error}");
        assert_eq!(error["error"]["code"], code, "{reference} → {error}");
        assert_eq!(error["error"]["param"], "input_reference", "{reference} → {error}");
    }
    // Nothing refused is kept: three jobs' images only.
    assert_eq!(files_in(&data.path().join("inputs")).len(), 3);
    server.stop().await;
}

/// A job whose stage would need more working memory than the configured limit fails with `out_of_memory`,
/// naming the stage, before it starts; the next job, small enough, completes on the same worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_the_memory_limit_fails_and_the_next_completes() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.load.memory_limit = Some(64 << 20);
    let server = Running::start(config).await;
    wait_ready(&server).await;

    let (code, big) = server.post("/v1/videos", json!({"prompt": "a fox", "size": "832x480", "seconds": "5"})).await;
    assert_eq!(code, StatusCode::OK, "{big}");
    let (_, small) = server.post("/v1/videos", json!({"prompt": "a fox"})).await;
    let big = server.wait_for(big["id"].as_str().unwrap(), "failed").await;
    assert_eq!(big["error"]["code"], "out_of_memory", "{big}");
    let message = big["error"]["message"].as_str().unwrap();
    assert!(message.contains("denoising") && message.contains("64.0 MiB"), "{message}");
    server.wait_for(small["id"].as_str().unwrap(), "completed").await;
    server.stop().await;
}

/// The few-step recipe of distilled models over the API: an explicit schedule (JSON array or, in multipart,
/// text with commas), a shift and guidance 1; the steps are the schedule's length. A schedule that doesn't
/// decrease, or both kinds at once, is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_schedule_runs_a_few_step_job() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let fast = json!({"prompt": "a fox", "timesteps": [1000, 750, 500, 250], "shift": 5, "guidance_scale": 1});
    let (code, created) = server.post("/v1/videos", fast).await;
    assert_eq!(code, StatusCode::OK, "{created}");
    server.wait_for(created["id"].as_str().unwrap(), "completed").await;
    // The turbo preset on a model with no distillation (no distilled weights, no distill LoRA): refused by name now
    // that the model is loaded.
    let (code, error) = server.post("/v1/videos", json!({"prompt": "x", "preset": "turbo"})).await;
    assert_eq!((code, error["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_preset")), "{error}");
    // FastWan's DMD steps.
    let (code, created) =
        server.post("/v1/videos", json!({"prompt": "a fox", "dmd": [1000, 757, 522], "guidance_scale": 1})).await;
    assert_eq!(code, StatusCode::OK, "{created}");
    server.wait_for(created["id"].as_str().unwrap(), "completed").await;
    let form = reqwest::multipart::Form::new().text("prompt", "a fox").text("sigmas", "1, 0.75, 0.5, 0.25");
    let response = server.client.post(server.url("/v1/videos")).bearer_auth(KEY).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    for (body, param) in [
        (json!({"prompt": "x", "timesteps": [250, 500]}), "timesteps"),
        (json!({"prompt": "x", "timesteps": [1000], "sigmas": [1]}), "sigmas"),
        (json!({"prompt": "x", "dmd": [1000, 757], "sigmas": [1]}), "sigmas"),
        (json!({"prompt": "x", "dmd": [757, 1000]}), "dmd"),
        (json!({"prompt": "x", "sigmas": "1,a"}), "sigmas"),
        (json!({"prompt": "x", "shift": 0}), "shift"),
    ] {
        let (code, error) = server.post("/v1/videos", body).await;
        assert_eq!((code, error["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{error}");
    }
    server.stop().await;
}

/// Adapters per job, by file name from the server's `--lora-dir`, applied at run time: a job with them completes
/// on the loaded model; a name that is a path or no file, a low-noise adapter on a one-network model, or any
/// adapter on a server without the folder is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_take_adapters_by_name_from_the_lora_folder() {
    let data = tempfile::tempdir().unwrap();
    let mut with_dir = config(data.path());
    with_dir.lora_dir = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/loras"));
    let server = Running::start(with_dir).await;
    let styled = json!({"prompt": "a fox", "loras": [{"name": "wan21-peft.safetensors", "scale": 0.7},
                                                      {"name": "wan21-official.safetensors"}]});
    let (code, created) = server.post("/v1/videos", styled).await;
    assert_eq!(code, StatusCode::OK, "{created}");
    server.wait_for(created["id"].as_str().unwrap(), "completed").await;
    for (loras, code) in [
        (json!([{"name": "../loras/wan21-peft.safetensors"}]), "lora_not_found"),
        (json!([{"name": "missing.safetensors"}]), "lora_not_found"),
        (json!([{"name": "wan21-peft.safetensors", "low_noise": true}]), "unsupported_parameter"),
        (json!([{"name": "wan21-peft.safetensors", "weight": 1}]), "invalid_lora"),
        (json!({"name": "wan21-peft.safetensors"}), "invalid_lora"),
    ] {
        let (status, error) = server.post("/v1/videos", json!({"prompt": "x", "loras": loras})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert_eq!(
            (error["error"]["code"].as_str(), error["error"]["param"].as_str()),
            (Some(code), Some("loras")),
            "{error}"
        );
    }
    server.stop().await;

    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let (status, error) = server.post("/v1/videos", json!({"prompt": "x", "loras": [{"name": "a.safetensors"}]})).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("unsupported_parameter")));
    server.stop().await;
}

/// Region edits: a rectangle (within a time range) by id, and an uploaded mask image as the SDK sends files; the
/// video object reports the result (nothing outside the mask moved); bad regions and masks are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_of_a_video_is_regenerated() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let source = source_video(&server).await;

    let body = json!({"prompt": "an owl", "video": {"id": source}, "region": "16,8,16,16", "redo": "2-6", "steps": 2});
    let (code, edited) = server.post("/v1/videos/edits", body).await;
    assert_eq!(code, StatusCode::OK, "{edited}");
    let done = server.wait_for(edited["id"].as_str().unwrap(), "completed").await;
    let region = &done["result"]["region"];
    assert_eq!(region["unmasked_max_abs"], 0.0, "{done}");
    assert_eq!(region["masked_pixels"], 5 * 16 * 16, "{done}");

    let mut mask = image::GrayImage::new(48, 32);
    for (x, y, p) in mask.enumerate_pixels_mut() {
        p.0 = [if (8..24).contains(&x) && (8..16).contains(&y) { 255 } else { 0 }];
    }
    let mut png = Vec::new();
    mask.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let form = reqwest::multipart::Form::new()
        .text("prompt", "an owl")
        .text("video[id]", source.clone())
        .text("steps", "2")
        .part("mask", reqwest::multipart::Part::bytes(png).file_name("mask.png"));
    let response = server.client.post(server.url("/v1/videos/edits")).bearer_auth(KEY).multipart(form).send().await;
    let masked: Value = response.unwrap().json().await.unwrap();
    let masked = masked["id"].as_str().unwrap_or_else(|| panic!("{masked}")).to_string();
    let done = server.wait_for(&masked, "completed").await;
    assert_eq!(done["result"]["region"]["masked_pixels"], 9 * 16 * 8, "{done}");

    for (body, code, param) in [
        (json!({"prompt": "x", "video": {"id": source}, "region": "40,8,16,16"}), "invalid_region", "region"),
        (json!({"prompt": "x", "video": {"id": source}, "region": "1,2,3"}), "invalid_region", "region"),
        (
            json!({"prompt": "x", "video": {"id": source}, "region": "0,0,8,8", "strength": 0.5}),
            "invalid_request",
            "strength",
        ),
        (json!({"prompt": "x", "video": {"id": source}, "mask": {"id": source}}), "invalid_mask", "mask"),
    ] {
        let (status, error) = server.post("/v1/videos/edits", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {error}");
        assert_eq!((error["error"]["code"].as_str(), error["error"]["param"].as_str()), (Some(code), Some(param)));
    }
    server.stop().await;
}

/// A completed video to edit, once the model is loaded (edits need it to fit their source).
async fn source_video(server: &Running) -> String {
    while server.client.get(server.url("/readyz")).send().await.unwrap().status() != StatusCode::OK {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, created) = server.post("/v1/videos", json!({"prompt": "a red fox", "seed": 1})).await;
    let source = created["id"].as_str().unwrap().to_string();
    server.wait_for(&source, "completed").await;
    source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_no_job_owns_are_deleted_and_a_jobs_are_kept() {
    // Sources kept for a job that was never inserted (the process died in between), here and, where the tests
    // have one, in the bucket: deleted once older than twice the job limit; a queued job's are kept.
    let data = tempfile::tempdir().unwrap();
    let bucket = kinetoscope_server::bucket::throwaway_location().unwrap();
    let mut idle = config(data.path());
    idle.devices.clear();
    idle.job_timeout = Duration::from_secs(1);
    idle.bucket = bucket.clone();
    let server = Running::start(idle.clone()).await;
    let (_, created) = server.post("/v1/videos", json!({"prompt": "waits"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    server.stop().await;
    let (owned, orphan) = (format!("{id}.mp4"), format!("video_{}.mp4", "0".repeat(32)));
    let inputs = data.path().join("inputs");
    for name in [&owned, &orphan] {
        std::fs::write(inputs.join(name), b"a source").unwrap();
    }
    let objects = bucket.as_ref().map(|url| {
        let bucket = kinetoscope_server::bucket::Bucket::open(url).unwrap();
        for name in [&owned, &orphan] {
            bucket.wait(bucket.upload(&inputs.join(name), &kinetoscope_server::bucket::input_name(name))).unwrap();
        }
        bucket
    });
    let kept = |name: &str| {
        let object =
            objects.as_ref().is_none_or(|b| b.wait(b.head(&kinetoscope_server::bucket::input_name(name))).is_ok());
        (inputs.join(name).exists(), object)
    };
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let server = Running::start(idle).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while kept(&orphan) != (false, objects.is_none()) {
        assert!(Instant::now() < deadline, "the orphaned source is still there: {:?}", kept(&orphan));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kept(&owned), (true, true));
    server.stop().await;
}
