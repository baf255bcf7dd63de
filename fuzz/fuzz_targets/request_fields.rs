//! The server's request bodies: `Fields::from_request` over a JSON or multipart body (the input's first
//! byte picks the Content-Type, and whether file parts are taken: streamed to a temporary file), then every field reader the API's routes call, in their order. The module
//! is private to kinetoscope-server, so it is compiled in here by path with the error type it returns.

#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, Request};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

// Only the parts the fields module needs are used here; the server uses the rest.
#[allow(dead_code)]
#[path = "../../crates/kinetoscope-server/src/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../crates/kinetoscope-server/src/fields.rs"]
mod fields;

/// The multipart seeds in `seeds/request_fields/` use this boundary.
const CONTENT_TYPES: [&str; 4] =
    ["application/json", "", "multipart/form-data; boundary=kinetoscope-fuzz", "text/plain"];
/// Small, so that the too-large paths are reached too.
const LIMIT: usize = 4096;

/// Where file parts are spooled: a folder of the process's, as the server's `inputs/`.
fn spool() -> &'static tempfile::TempDir {
    static SPOOL: OnceLock<tempfile::TempDir> = OnceLock::new();
    SPOOL.get_or_init(|| tempfile::tempdir().expect("a spool folder"))
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[usize::from(pick) % CONTENT_TYPES.len()];
    let mut request = Request::post("/v1/videos");
    if !content_type.is_empty() {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Body::from(body.to_vec())).expect("a valid request");
    // Half the inputs on a route that takes files (spooled to disk, hashed), half on one that takes none.
    let uploads = (pick & 0x80 != 0).then(|| (2 * LIMIT as u64, spool().path().to_path_buf()));
    let limits = fields::BodyLimits { fields_bytes: LIMIT, uploads };
    let Ok(mut fields) = runtime().block_on(fields::Fields::from_request(request, &limits)) else { return };
    // Every reader, whatever the others said: each takes its field out, and `finish` judges the rest.
    for name in ["prompt", "webhook_url", "model", "preset", "size", "negative_prompt", "redo"] {
        let _ = fields.text(name);
    }
    let _ = fields.image_reference("input_reference");
    let _ = fields.video_reference("video");
    for name in ["fps", "seed", "steps"] {
        let _ = fields.integer(name);
    }
    let _ = fields.text_or_number("seconds");
    for name in ["guidance_scale", "step_cache", "strength"] {
        let _ = fields.number(name);
    }
    if let Err(e) = fields.finish() {
        std::hint::black_box(e.body());
    }
});
