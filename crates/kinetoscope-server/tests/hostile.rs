//! What an outside attack on the server found, each as it was sent: local files read through an uploaded
//! playlist, decompression bombs, uploads over 2 MiB refused, numbers that overflow, seeds rounded through
//! f64, requests accepted unchecked while the model loads, plain-text errors, server paths in messages, and
//! the nits (case of `Bearer` and Content-Type, a huge guidance scale, invalid UTF-8 in a form).

mod common;

use std::path::Path;

use common::{config, wait_ready, Running, KEY};
use kinetoscope_server::store;
use kinetoscope_server::Defaults;
use reqwest::multipart::{Form, Part};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};

/// A short real MP4 (48×32, 9 frames at 8 fps), as the tiny model makes them.
fn clip(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("clip.mp4");
    let frames = kinetoscope_video::Frames::new(vec![90; 9 * 32 * 48 * 3], 9, 32, 48).unwrap();
    kinetoscope_video::write_mp4(&path, &frames, 8).unwrap();
    path
}

async fn upload(server: &Running, route: &str, form: Form) -> (StatusCode, Value) {
    let response = server.client.post(server.url(route)).bearer_auth(KEY).multipart(form).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_else(|e| panic!("{route} answered {status} without JSON: {e}")))
}

fn edit_form(video: Vec<u8>, name: &str) -> Form {
    Form::new()
        .text("prompt", "a fox")
        .text("strength", "0.5")
        .part("video", Part::bytes(video).file_name(name.to_string()))
}

/// The probe's attack: an HLS playlist naming a local video, uploaded as an edit's source, made FFmpeg
/// read that file into the job. Now only MP4/MOV and Matroska/WebM bytes are opened, by their own demuxer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn playlists_and_scripts_are_refused_and_real_videos_accepted() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    wait_ready(&server).await;
    let secret = clip(data.path());
    let target = secret.display();
    let playlist = format!("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target}\n#EXT-X-ENDLIST\n");
    let concat = format!("ffconcat version 1.0\nfile '{target}'\n");
    for (bytes, name, found) in
        [(playlist.clone(), "attack.m3u8", "HLS"), (playlist, "attack.mp4", "HLS"), (concat, "list.mp4", "concat")]
    {
        for route in ["/v1/videos/edits", "/v1/videos/extensions"] {
            let mut form = edit_form(bytes.clone().into_bytes(), name);
            if route.ends_with("extensions") {
                form = Form::new()
                    .text("prompt", "a fox")
                    .text("seconds", "1")
                    .part("video", Part::bytes(bytes.clone().into_bytes()).file_name(name.to_string()));
            }
            let (status, error) = upload(&server, route, form).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name} on {route}: {error}");
            assert_eq!(error["error"]["code"], "unsupported_media", "{name} on {route}: {error}");
            assert_eq!(error["error"]["param"], "video");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains(found), "{name}: {message}");
            assert!(!message.contains(&data.path().display().to_string()), "a server path shown: {message}");
        }
    }
    // Nothing refused is kept.
    assert!(common::files_in(&data.path().join("inputs")).is_empty());

    // MP4, WebM and Matroska are what the server takes.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kinetoscope-video/tests/data");
    for (path, name) in [
        (secret.clone(), "clip.mp4"),
        (fixtures.join("clip.webm"), "clip.webm"),
        (fixtures.join("clip.mkv"), "clip.mkv"),
    ] {
        let (status, video) = upload(&server, "/v1/videos/edits", edit_form(std::fs::read(&path).unwrap(), name)).await;
        assert_eq!(status, StatusCode::OK, "{name}: {video}");
    }
    server.stop().await;
}

/// PNG chunk: length, type, data, CRC-32 (ISO-HDLC) of type and data.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = !0u32;
    for &byte in kind.iter().chain(data) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    [&(data.len() as u32).to_be_bytes()[..], kind, data, &(!crc).to_be_bytes()].concat()
}

/// A PNG whose header says 11000×11000 RGB (363 MB decoded) in a few dozen bytes; its one IDAT chunk is
/// an empty zlib stream, as far as a decoder would get before it allocated.
fn png_bomb() -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&11_000u32.to_be_bytes());
    header.extend_from_slice(&11_000u32.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    [
        &b"\x89PNG\r\n\x1a\n"[..],
        &png_chunk(b"IHDR", &header),
        &png_chunk(b"IDAT", &[0x78, 0x9c, 3, 0, 0, 0, 0, 1]),
        &png_chunk(b"IEND", &[]),
    ]
    .concat()
}

/// Sizes are read from headers before anything is decoded: an image or video frame over the pixel cap is
/// refused with `media_too_large`, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_and_videos_over_the_pixel_cap_are_refused_before_decoding() {
    let data = tempfile::tempdir().unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny");
    let mut config = config(data.path());
    config.model = tiny.join("wan22-ti2v-tiny-a").display().to_string();
    config.defaults = Defaults { width: 64, height: 64, seconds: 1, fps: 8, steps: 2, guidance_scale: 5.0 };
    let server = Running::start(config).await;
    let form = Form::new().text("prompt", "a fox").part("input_reference", Part::bytes(png_bomb()).file_name("a.png"));
    let (status, error) = upload(&server, "/v1/videos", form).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("media_too_large")),
        "{error}"
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("11000x11000"), "{error}");
    server.stop().await;

    // A video: 48×32 frames against a cap of 1,000 pixels.
    let data = tempfile::tempdir().unwrap();
    let mut config = common::config(data.path());
    config.limits.max_input_pixels = 1000;
    let server = Running::start(config).await;
    wait_ready(&server).await;
    let video = std::fs::read(clip(data.path())).unwrap();
    let (status, error) = upload(&server, "/v1/videos/edits", edit_form(video, "clip.mp4")).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("media_too_large")),
        "{error}"
    );
    server.stop().await;
}

/// An MP4 padded to `bytes` with a `free` box, which demuxers skip: a large upload that is still a video.
fn padded_clip(dir: &Path, bytes: usize) -> Vec<u8> {
    let mut video = std::fs::read(clip(dir)).unwrap();
    let pad = bytes - video.len();
    video.extend_from_slice(&(pad as u32).to_be_bytes());
    video.extend_from_slice(b"free");
    video.resize(bytes, 0);
    video
}

/// Uploads stream to disk under `max_upload_bytes`, far past axum's 2 MiB default; over it, 413 names the
/// configured limit. A route that takes no file keeps `max_body_bytes`, also as 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_up_to_the_configured_limit_are_taken_and_larger_ones_get_413() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.limits.max_upload_bytes = 64 << 20;
    let server = Running::start(config).await;
    wait_ready(&server).await;

    let video = padded_clip(data.path(), 50_000_000);
    let (status, accepted) = upload(&server, "/v1/videos/edits", edit_form(video, "big.mp4")).await;
    assert_eq!(status, StatusCode::OK, "{accepted}");
    let kept = data.path().join("inputs").join(format!("{}.mp4", accepted["id"].as_str().unwrap()));
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), 50_000_000);

    let video = padded_clip(data.path(), (64 << 20) + 1);
    let (status, error) = upload(&server, "/v1/videos/edits", edit_form(video, "huge.mp4")).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large")));
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("67108864 bytes (64 MiB)"), "{message}");

    let form = Form::new().text("prompt", "x".repeat(2 << 20));
    let (status, error) =
        upload(&server, &format!("/v1/videos/{}/remix", accepted["id"].as_str().unwrap()), form).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("request_too_large")));
    // No spooled upload is left behind: only the accepted source.
    assert_eq!(common::files_in(&data.path().join("inputs")), [kept]);
    server.stop().await;
}

/// Numbers are parsed exactly and held to ranges; seeds are u64 end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_are_exact_and_in_range() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    for (body, code, param) in [
        (json!({"prompt": "x", "seconds": "1152921504606846976"}), "invalid_seconds", "seconds"),
        (json!({"prompt": "x", "seconds": "1e308"}), "invalid_seconds", "seconds"),
        (json!({"prompt": "x", "seconds": "inf"}), "invalid_seconds", "seconds"),
        (json!({"prompt": "x", "size": "0x32"}), "invalid_size", "size"),
        (json!({"prompt": "x", "size": "99999999999999999999x32"}), "invalid_size", "size"),
        (json!({"prompt": "x", "fps": 1_000_000_000_000u64}), "invalid_fps", "fps"),
        (json!({"prompt": "x", "steps": u64::MAX}), "invalid_steps", "steps"),
        (json!({"prompt": "x", "guidance_scale": 1e308}), "invalid_guidance_scale", "guidance_scale"),
        (json!({"prompt": "x", "guidance_scale": -1}), "invalid_guidance_scale", "guidance_scale"),
        (json!({"prompt": "x", "step_cache": 7}), "invalid_step_cache", "step_cache"),
        (json!({"prompt": "x", "seed": -1}), "invalid_type", "seed"),
        (json!({"prompt": "x", "seed": 1.5}), "invalid_type", "seed"),
        (json!({"prompt": "x", "seed": "18446744073709551616"}), "invalid_type", "seed"),
    ] {
        let (status, error) = server.post("/v1/videos", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {error}");
        assert_eq!(
            (error["error"]["code"].as_str(), error["error"]["param"].as_str()),
            (Some(code), Some(param)),
            "{body} → {error}"
        );
    }
    // The guided velocity of 1e308 once overflowed to NaN frames with a hint about precision.
    let (_, error) = server.post("/v1/videos", json!({"prompt": "x", "guidance_scale": 1e308})).await;
    assert!(!error["error"]["message"].as_str().unwrap().contains("f32"), "{error}");

    // Seeds past 2^53, as JSON numbers and as multipart text, are kept exactly.
    let mut ids = Vec::new();
    for seed in [9_007_199_254_740_993u64, u64::MAX] {
        let (status, created) = server.post("/v1/videos", json!({"prompt": "x", "seed": seed})).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        ids.push((created["id"].as_str().unwrap().to_string(), seed));
        let form = Form::new().text("prompt", "x").text("seed", seed.to_string());
        let (status, created) = upload(&server, "/v1/videos", form).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        ids.push((created["id"].as_str().unwrap().to_string(), seed));
    }
    server.stop().await;
    let store = store::open(data.path().join("jobs.sqlite").to_str().unwrap()).unwrap();
    for (id, seed) in ids {
        assert_eq!(store.get(&id).unwrap().unwrap().settings.seed, seed);
    }
}

/// Before the model is loaded (here: never, as no worker runs), what its configs decide is still checked
/// at once rather than failing the job later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_checked_against_the_model_before_it_is_loaded() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.devices.clear();
    let server = Running::start(config).await;
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("loading")));
    for (body, code) in [
        (json!({"prompt": "x", "size": "50x32"}), "invalid_size"),
        (json!({"prompt": "x", "size": "48x20"}), "invalid_size"),
        (json!({"prompt": "x", "steps": 1001}), "invalid_steps"),
    ] {
        let (status, error) = server.post("/v1/videos", body.clone()).await;
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{body} → {error}"
        );
    }
    let (status, created) = server.post("/v1/videos", json!({"prompt": "x", "size": "64x32"})).await;
    assert_eq!((status, created["status"].as_str()), (StatusCode::OK, Some("queued")), "{created}");
    server.stop().await;
}

/// Every error is OpenAI-shaped JSON with a code, the query's and the path's and a wrong method's too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_json_with_a_code() {
    let data = tempfile::tempdir().unwrap();
    let mut config = config(data.path());
    config.devices.clear();
    let server = Running::start(config).await;
    let requests = [
        (server.client.get(server.url("/v1/videos?limit=lots")), StatusCode::BAD_REQUEST, "invalid_query"),
        (server.client.get(server.url("/v1/videos?limit=-1")), StatusCode::BAD_REQUEST, "invalid_query"),
        (server.client.get(server.url("/v1/videos/%FF%FE")), StatusCode::BAD_REQUEST, "invalid_video_id"),
        (server.client.put(server.url("/v1/videos")), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (server.client.get(server.url("/v1/nothing")), StatusCode::NOT_FOUND, "unknown_route"),
    ];
    for (request, status, code) in requests {
        let response = request.bearer_auth(KEY).send().await.unwrap();
        let url = response.url().to_string();
        assert_eq!(response.status(), status, "{url}");
        let error: Value = response.json().await.unwrap_or_else(|e| panic!("{url}: not JSON: {e}"));
        assert_eq!(error["error"]["code"], code, "{url}: {error}");
    }
    let (status, error) = server
        .post("/v1/videos", json!({"prompt": "x", "webhook_url": format!("https://a.example/{}", "x".repeat(900_000))}))
        .await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_webhook_url")));
    assert!(error["error"]["message"].as_str().unwrap().contains("the limit is 2048"), "{error}");
    server.stop().await;
}

/// `bearer` and `Application/JSON` are the same as `Bearer` and `application/json`; a form's text must be
/// UTF-8; an upload's error names no server path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_utf8_and_paths() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let response = server
        .client
        .post(server.url("/v1/videos"))
        .header(header::AUTHORIZATION, format!("bearer {KEY}"))
        .header(header::CONTENT_TYPE, "Application/JSON; charset=UTF-8")
        .body(json!({"prompt": "a fox"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{}", response.text().await.unwrap());

    let form = Form::new().part("prompt", Part::bytes(vec![b'a', 0xff, 0xfe, b'b']));
    let (status, error) = upload(&server, "/v1/videos", form).await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_multipart")),
        "{error}"
    );
    assert!(error["error"]["message"].as_str().unwrap().contains("UTF-8"), "{error}");

    wait_ready(&server).await;
    // An MP4 whose boxes are cut short: it sniffs as MP4 and fails in FFmpeg, whose message named the file.
    let mut video = std::fs::read(clip(data.path())).unwrap();
    video.truncate(video.len() / 2);
    let (status, error) = upload(&server, "/v1/videos/edits", edit_form(video, "cut.mp4")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(!message.contains(&data.path().display().to_string()) && !message.contains(".tmp"), "{message}");
    server.stop().await;
}
