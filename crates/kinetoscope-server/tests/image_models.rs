//! The server end to end on the tiny image-to-video and two-expert models (models/tiny/FIXTURES.md): Wan 2.1 I2V
//! from `input_reference`, Wan 2.1 FLF2V from `input_reference` and `last_image` (uploaded or as data: URLs, kept
//! beside each other, copied by a remix, deleted with the job), Wan 2.2 I2V-A14B with `guidance_scale_2`; and what
//! a model can't take refused by name before any work.

mod common;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use kinetoscope_server::Defaults;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::{json, Value};

use common::{config, download, files_in, wait_ready, Running, KEY};

fn tiny(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny").join(path)
}

/// A server on `models/tiny/<model>`, loaded, whose requests default to the fixtures' run: 48×32, 1 s at 8 fps
/// (9 frames), 2 steps.
async fn serve(model: &str, data: &Path) -> Running {
    let mut config = config(data);
    config.model = tiny(model).display().to_string();
    config.defaults = Defaults { width: 48, height: 32, seconds: 1, fps: 8, steps: 2, guidance_scale: 5.0 };
    let server = Running::start(config).await;
    wait_ready(&server).await;
    server
}

fn png(path: &str) -> Vec<u8> {
    std::fs::read(tiny(path)).unwrap()
}

fn data_url(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

async fn post_form(server: &Running, form: Form) -> (StatusCode, Value) {
    let response = server.client.post(server.url("/v1/videos")).bearer_auth(KEY).multipart(form).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

async fn thumbnail(server: &Running, id: &str) -> Vec<u8> {
    let url = server.url(&format!("/v1/videos/{id}/content?variant=thumbnail"));
    server.client.get(url).bearer_auth(KEY).send().await.unwrap().bytes().await.unwrap().to_vec()
}

/// A 400 naming `code` and `param`.
fn assert_refused(status: StatusCode, error: &Value, code: &str, param: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(
        (error["error"]["code"].as_str(), error["error"]["param"].as_str()),
        (Some(code), Some(param)),
        "{error}"
    );
}

fn names(dir: &Path) -> Vec<String> {
    files_in(dir).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_reference_starts_a_wan21_i2v_job_and_what_it_cannot_take_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let server = serve("wan21-i2v-tiny", data.path()).await;
    let image = png("reference/wan21-i2v-tiny/image.png");

    let form = Form::new()
        .text("prompt", "a fox wakes")
        .text("seed", "3")
        .part("input_reference", Part::bytes(image.clone()).file_name("still.png"));
    let (code, created) = post_form(&server, form).await;
    assert_eq!(code, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap();
    server.wait_for(id, "completed").await;
    let info = download(&server, id, &data.path().join("woken.mp4")).await;
    assert_eq!((info.codec.as_str(), info.width, info.height, info.frames), ("h264", 48, 32, 9));

    // Text alone: the model generates only from an image.
    let (status, error) = server.post("/v1/videos", json!({"prompt": "a fox"})).await;
    assert_refused(status, &error, "missing_required_parameter", "input_reference");
    assert!(error["error"]["message"].as_str().unwrap().contains("generates video from an image"), "{error}");
    // A last image: Wan 2.1 I2V can't end on one.
    let both = json!({"prompt": "a fox", "input_reference": {"image_url": data_url(&image)}, "last_image": {"image_url": data_url(&image)}});
    let (status, error) = server.post("/v1/videos", both).await;
    assert_refused(status, &error, "unsupported_parameter", "last_image");
    // A second guidance scale: one network.
    let guided = json!({"prompt": "a fox", "input_reference": {"image_url": data_url(&image)}, "guidance_scale_2": 3});
    let (status, error) = server.post("/v1/videos", guided).await;
    assert_refused(status, &error, "unsupported_parameter", "guidance_scale_2");
    // Edits and extensions of a video.
    let (status, error) = server.post("/v1/videos/edits", json!({"prompt": "a fox", "video": {"id": id}})).await;
    assert_refused(status, &error, "unsupported_parameter", "video");
    let (status, error) =
        server.post("/v1/videos/extensions", json!({"prompt": "a fox", "seconds": 1, "video": {"id": id}})).await;
    assert_refused(status, &error, "unsupported_parameter", "video");

    // Only the accepted job's image is kept.
    assert_eq!(names(&data.path().join("inputs")), [format!("{id}.image")]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_image_ends_a_flf2v_job_sent_either_way_and_goes_with_it() {
    let data = tempfile::tempdir().unwrap();
    let server = serve("wan21-flf2v-tiny", data.path()).await;
    let (image, last) = (png("reference/wan21-flf2v-tiny/image.png"), png("reference/wan21-flf2v-tiny/last_image.png"));
    let inputs = data.path().join("inputs");

    // As the SDK sends files, and as data: URLs in JSON.
    let form = Form::new()
        .text("prompt", "a fox wakes")
        .text("seed", "3")
        .part("input_reference", Part::bytes(image.clone()).file_name("first.png"))
        .part("last_image", Part::bytes(last.clone()).file_name("last.png"));
    let (code, uploaded) = post_form(&server, form).await;
    assert_eq!(code, StatusCode::OK, "{uploaded}");
    let body = json!({
        "prompt": "a fox wakes",
        "seed": 3,
        "input_reference": {"image_url": data_url(&image)},
        "last_image": {"image_url": data_url(&last)},
    });
    let (code, inlined) = server.post("/v1/videos", body).await;
    assert_eq!(code, StatusCode::OK, "{inlined}");
    let ids = [uploaded["id"].as_str().unwrap().to_string(), inlined["id"].as_str().unwrap().to_string()];
    let mut thumbnails = Vec::new();
    for id in &ids {
        server.wait_for(id, "completed").await;
        let info = download(&server, id, &data.path().join(format!("{id}.mp4"))).await;
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9), "{id}");
        thumbnails.push(thumbnail(&server, id).await);
    }
    assert_eq!(thumbnails[0], thumbnails[1], "the same images, prompt and seed, sent two ways");
    // The same first image ending elsewhere is another video.
    let body = json!({
        "prompt": "a fox wakes",
        "seed": 3,
        "input_reference": {"image_url": data_url(&image)},
        "last_image": {"image_url": data_url(&image)},
    });
    let (code, looped) = server.post("/v1/videos", body).await;
    assert_eq!(code, StatusCode::OK, "{looped}");
    let looped = looped["id"].as_str().unwrap();
    server.wait_for(looped, "completed").await;
    assert_ne!(thumbnail(&server, looped).await, thumbnails[0]);

    // A remix ends on the same last image: both are copied.
    let (code, remixed) = server.post(&format!("/v1/videos/{}/remix", ids[0]), json!({"prompt": "a fox wakes"})).await;
    assert_eq!(code, StatusCode::OK, "{remixed}");
    let remixed = remixed["id"].as_str().unwrap();
    server.wait_for(remixed, "completed").await;
    assert_eq!(thumbnail(&server, remixed).await, thumbnails[0], "the remix of the same prompt is the same video");
    assert!(inputs.join(format!("{remixed}.last_image")).is_file());

    // Refused before any work: a last image the server would have to fetch, or that isn't an image.
    for (reference, code) in [
        (json!({"image_url": "https://example.com/last.png"}), "unsupported_parameter"),
        (json!({"image_url": "data:image/png;base64,@@@"}), "invalid_image"),
        (json!({"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}), "unsupported_media"),
        (json!(7), "invalid_image"),
    ] {
        let body = json!({"prompt": "x", "input_reference": {"image_url": data_url(&image)}, "last_image": reference});
        let (status, error) = server.post("/v1/videos", body).await;
        assert_refused(status, &error, code, "last_image");
    }
    let (status, error) =
        server.post("/v1/videos", json!({"prompt": "x", "last_image": {"image_url": data_url(&last)}})).await;
    assert_refused(status, &error, "missing_required_parameter", "input_reference");

    let mut kept = names(&inputs);
    kept.sort();
    let mut expected: Vec<String> = [&ids[0], &ids[1], &looped.to_string(), &remixed.to_string()]
        .iter()
        .flat_map(|id| [format!("{id}.image"), format!("{id}.last_image")])
        .collect();
    expected.sort();
    assert_eq!(kept, expected, "each accepted job's two images, nothing of the refused ones");

    // Deleting a job deletes both of its images.
    let response =
        server.client.delete(server.url(&format!("/v1/videos/{}", ids[0]))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!names(&inputs).iter().any(|name| name.starts_with(&ids[0])), "{:?}", names(&inputs));
    server.stop().await;
}

/// Wan 2.2 I2V-A14B: both experts, an image and a last image, and the low-noise expert's own guidance scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guidance_scale_2_goes_to_a_two_expert_model() {
    let data = tempfile::tempdir().unwrap();
    let server = serve("wan22-i2v-a14b-tiny", data.path()).await;
    let (image, last) =
        (png("reference/wan22-i2v-a14b-tiny/image.png"), png("reference/wan22-i2v-a14b-tiny/last_image.png"));
    // The same job with and without a second scale: the low-noise expert's steps differ.
    let mut thumbnails = Vec::new();
    for second in [Some("2"), None] {
        let mut form = Form::new()
            .text("prompt", "a fox wakes")
            .text("seed", "3")
            .text("guidance_scale", "3.5")
            .part("input_reference", Part::bytes(image.clone()).file_name("first.png"))
            .text("last_image[image_url]", data_url(&last));
        if let Some(scale) = second {
            form = form.text("guidance_scale_2", scale);
        }
        let (code, created) = post_form(&server, form).await;
        assert_eq!(code, StatusCode::OK, "{created}");
        let id = created["id"].as_str().unwrap();
        server.wait_for(id, "completed").await;
        let info = download(&server, id, &data.path().join(format!("{id}.mp4"))).await;
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9));
        thumbnails.push(thumbnail(&server, id).await);
    }
    assert_ne!(thumbnails[0], thumbnails[1], "guidance_scale_2 reaches the low-noise expert");

    let first = json!({"image_url": data_url(&image)});
    for (scale, code) in [
        (json!(-1), "invalid_guidance_scale"),
        (json!(1000), "invalid_guidance_scale"),
        (json!("high"), "invalid_type"),
    ] {
        let body = json!({"prompt": "x", "input_reference": first, "guidance_scale_2": scale});
        let (status, error) = server.post("/v1/videos", body).await;
        assert_refused(status, &error, code, "guidance_scale_2");
    }
    server.stop().await;
}

/// A one-network text-to-video model refuses the new fields by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_model_refuses_a_last_image_and_a_second_guidance_scale() {
    let data = tempfile::tempdir().unwrap();
    let server = Running::start(config(data.path())).await;
    let image = png("reference/wan21-i2v-tiny/image.png");
    let (status, error) = server.post("/v1/videos", json!({"prompt": "x", "guidance_scale_2": 3.0})).await;
    assert_refused(status, &error, "unsupported_parameter", "guidance_scale_2");
    let (status, error) =
        server.post("/v1/videos", json!({"prompt": "x", "last_image": {"image_url": data_url(&image)}})).await;
    assert_refused(status, &error, "unsupported_parameter", "last_image");
    server.stop().await;
}

/// `input_reference` as a frame of a finished video (`{"video_id", "frame"}`, the last frame by default): a shot
/// goes on from where the last one ended; a frame past the end, an unknown video or an unfinished one are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_videos_frame_starts_the_next() {
    let data = tempfile::tempdir().unwrap();
    let server = serve("wan21-i2v-tiny", data.path()).await;
    let image = png("reference/wan21-i2v-tiny/image.png");
    let first = json!({"prompt": "a fox wakes", "seed": 3, "input_reference": {"image_url": data_url(&image)}});
    let (status, created) = server.post("/v1/videos", first).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    server.wait_for(&id, "completed").await;

    for reference in [json!({"video_id": id}), json!({"video_id": id, "frame": 0})] {
        let next = json!({"prompt": "the fox runs", "seed": 4, "input_reference": reference});
        let (status, created) = server.post("/v1/videos", next).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        let next_id = created["id"].as_str().unwrap();
        server.wait_for(next_id, "completed").await;
        let kept = std::fs::read(data.path().join("inputs").join(format!("{next_id}.image"))).unwrap();
        assert!(kept.starts_with(b"\x89PNG"), "the frame is kept as a PNG");
    }
    // As the SDK flattens an object in multipart.
    let form = Form::new()
        .text("prompt", "the fox rests")
        .text("input_reference[video_id]", id.clone())
        .text("input_reference[frame]", "8");
    let (status, created) = post_form(&server, form).await;
    assert_eq!(status, StatusCode::OK, "{created}");

    let past = json!({"prompt": "x", "input_reference": {"video_id": id, "frame": 9}});
    let (status, error) = server.post("/v1/videos", past).await;
    assert_refused(status, &error, "invalid_image", "input_reference");
    assert!(error["error"]["message"].as_str().unwrap().contains("9 frames"), "{error}");
    let unknown = json!({"prompt": "x", "input_reference": {"video_id": "video_0123456789abcdef"}});
    let (status, error) = server.post("/v1/videos", unknown).await;
    assert_eq!((status, error["error"]["param"].as_str()), (StatusCode::NOT_FOUND, Some("input_reference")), "{error}");
    let extra = json!({"prompt": "x", "input_reference": {"video_id": id, "seconds": 1}});
    let (status, error) = server.post("/v1/videos", extra).await;
    assert_refused(status, &error, "invalid_image", "input_reference");
    server.stop().await;
}

/// A Wan VACE model served (the tiny VACE fixture): `input_reference` is a reference image (with
/// `conditioning_scale`), the prompt alone generates, an edit's video without a mask or region is a control video
/// and with a region a masked edit; what VACE can't take is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vace_model_takes_reference_images_control_videos_and_regions() {
    let data = tempfile::tempdir().unwrap();
    let server = serve("wan21-vace-tiny", data.path()).await;
    let image = png("reference/wan21-i2v-tiny/image.png");

    let form = Form::new()
        .text("prompt", "an owl in a tree")
        .text("seed", "3")
        .text("conditioning_scale", "0.7")
        .part("input_reference", Part::bytes(image.clone()).file_name("owl.png"));
    let (code, styled) = post_form(&server, form).await;
    assert_eq!(code, StatusCode::OK, "{styled}");
    let styled = styled["id"].as_str().unwrap().to_string();
    let (code, plain) = server.post("/v1/videos", json!({"prompt": "an owl", "seed": 4})).await;
    assert_eq!(code, StatusCode::OK, "{plain}");
    let plain = plain["id"].as_str().unwrap().to_string();
    for id in [&styled, &plain] {
        server.wait_for(id, "completed").await;
    }
    let info = download(&server, &styled, &data.path().join("styled.mp4")).await;
    assert_eq!((info.width, info.height, info.frames), (48, 32, 9));

    let (code, control) = server
        .post("/v1/videos/edits", json!({"prompt": "a fox", "video": {"id": plain}, "conditioning_scale": 0.5}))
        .await;
    assert_eq!(code, StatusCode::OK, "{control}");
    let (code, region) = server
        .post("/v1/videos/edits", json!({"prompt": "a fox", "video": {"id": plain}, "region": "16,8,16,16"}))
        .await;
    assert_eq!(code, StatusCode::OK, "{region}");
    for id in [control["id"].as_str().unwrap(), region["id"].as_str().unwrap()] {
        server.wait_for(id, "completed").await;
        let info = download(&server, id, &data.path().join(format!("{id}.mp4"))).await;
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9));
    }

    let (status, error) =
        server.post("/v1/videos/edits", json!({"prompt": "a fox", "video": {"id": plain}, "strength": 0.5})).await;
    assert_refused(status, &error, "unsupported_parameter", "strength");
    let (status, error) = server.post("/v1/videos", json!({"prompt": "a fox", "conditioning_scale": 2})).await;
    assert_refused(status, &error, "invalid_request", "conditioning_scale");
    server.stop().await;

    // On another model, conditioning_scale means nothing.
    let data = tempfile::tempdir().unwrap();
    let server = serve("wan21-tiny-a", data.path()).await;
    let (status, error) = server.post("/v1/videos", json!({"prompt": "a fox", "conditioning_scale": 2})).await;
    assert_refused(status, &error, "invalid_request", "conditioning_scale");
    server.stop().await;
}
