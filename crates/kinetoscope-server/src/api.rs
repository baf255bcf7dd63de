//! The routes: OpenAI's Videos API (`/v1/videos...`, field names and types as `openai/types/video*.py`
//! of the `openai` SDK 3.x), progress as server-sent events, and the operator's health and metrics.

use std::convert::Infallible;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::Stream;
use kinetoscope::scheduler::Schedule;
use kinetoscope::{EditKind, ExtendRequest, GenerateRequest, InputVideo, Preset, TimeRange};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::bucket;
use crate::disk;
use crate::error::{storage_error, ApiError};
use crate::fields::{BodyLimits, Fields, ImageReference, Upload, VideoReference};
use crate::store::{Job, JobLora, NewJob, Settings, Status, StoreError};
use crate::worker::{self, Stop};
use crate::{unix_now, Served, Shared, Update};

type ApiResult<T = Response> = Result<T, ApiError>;

/// The highest frame rate a request may ask for.
const MAX_FPS: u64 = 120;
/// The highest guidance scale a request may ask for: far past any useful one (1–10), and far from where the
/// guided velocity overflows into NaN frames.
const MAX_GUIDANCE: f64 = 100.0;

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/videos", post(create).get(list))
        .route("/v1/videos/{id}", get(retrieve).delete(delete))
        .route("/v1/videos/{id}/content", get(content))
        .route("/v1/videos/{id}/remix", post(remix))
        .route("/v1/videos/edits", post(edit))
        .route("/v1/videos/extensions", post(extension))
        .route("/v1/videos/{id}/events", get(events))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "unknown_route", "no such route") })
        .method_not_allowed_fallback(|request: Request| async move {
            let message = format!("{} is not a method of {}", request.method(), request.uri().path());
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", message)
        })
        .with_state(shared)
}

async fn authenticate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    // The scheme is case-insensitive (RFC 9110 §11.1): `bearer KEY` is as good as `Bearer KEY`.
    let bearer = presented
        .and_then(|v| v.trim_start().split_once(' '))
        .and_then(|(scheme, key)| scheme.eq_ignore_ascii_case("bearer").then_some(key));
    match bearer {
        Some(key) if shared.config.api_keys.allows(key.trim()) => next.run(request).await,
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "the API key is not valid").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send an API key as `Authorization: Bearer <key>`",
        )
        .into_response(),
    }
}

/// axum's `Query`, refusing a bad query string as every other error is: OpenAI-shaped JSON with a code.
struct ApiQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(ApiError::invalid("invalid_query", "query", e.body_text())),
        }
    }
}

/// axum's `Path` for the routes' one `{id}`, refusing an undecodable one (`%FF`) in JSON too.
struct VideoId(String);

impl<S: Send + Sync> FromRequestParts<S> for VideoId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(VideoId(id)),
            Err(e) => Err(ApiError::invalid("invalid_video_id", "video_id", e.body_text())),
        }
    }
}

fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::QueueFull { .. } => ApiError {
            retry_after_s: Some(30),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", format!("{error}; retry later"))
        },
        StoreError::UnknownCursor { .. } => ApiError::invalid("invalid_cursor", "after", error.to_string()),
        ref full if full.is_disk_full() => {
            ApiError::insufficient_storage("the server's disk is full: the job database can't be written; retry later")
        }
        other => ApiError::internal(other),
    }
}

fn new_id() -> String {
    format!("video_{:032x}", rand::random::<u128>())
}

/// Refuses new work when no worker could load the model, or (an API node) when no live worker serves it: it
/// would wait forever, or until a worker comes, which the client is better told to retry for.
fn check_available(shared: &Shared, served: &Served) -> ApiResult<()> {
    if let Some((code, reason)) = shared.unavailable() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            format!("the model could not be loaded, so no video can be made until it is fixed: {reason}"),
        ));
    }
    let model = &served.name;
    match shared.served_models() {
        Some(models) if models.contains(model) => Ok(()),
        served => Err(ApiError {
            retry_after_s: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "model_not_served",
                format!(
                    "no live worker serves {model:?} now (workers serve: {:?}); retry when one has started",
                    served.unwrap_or_default()
                ),
            )
        }),
    }
}

/// The model a request names in `model`, or the first served; `model_not_found` for one this API doesn't serve.
fn served<'a>(shared: &'a Shared, fields: &mut Fields) -> ApiResult<&'a Served> {
    let Some(model) = fields.text("model")? else { return Ok(&shared.models[0]) };
    shared.model(&model).ok_or_else(|| {
        let names: Vec<&str> = shared.models.iter().map(|served| served.name.as_str()).collect();
        ApiError::invalid(
            "model_not_found",
            "model",
            format!("model {model:?} is not served here; this server serves {names:?}"),
        )
    })
}

async fn create(State(shared): State<Arc<Shared>>, request: Request) -> ApiResult {
    disk::check(&shared)?;
    // A model that starts from images, or shows reference images (VACE), takes uploads here.
    let uploads = shared.models.iter().any(|served| served.shape.takes_image || served.shape.vace);
    let mut fields = Fields::from_request(request, &body_limits(&shared, uploads)).await?;
    let served = served(&shared, &mut fields)?;
    check_available(&shared, served)?;
    let shape = served.shape;
    let image = fields.image_reference("input_reference")?;
    let last_image = fields.image_reference("last_image")?;
    // On a Wan VACE model, input_reference is a reference image (a subject or style to show), not a first frame.
    let scale = conditioning_scale(served, &mut fields, image.is_some())?;
    if image.is_some() && !shape.takes_image && !shape.vace {
        return Err(unsupported_reference(served));
    }
    if last_image.is_some() && !shape.takes_last_image {
        return Err(unsupported_last_image(served));
    }
    if image.is_none() && shape.needs_image {
        return Err(missing_reference(served));
    }
    let mut job = resolve(&shared, served, &mut fields)?;
    fields.finish()?;
    let Some(image) = image else { return enqueue(&shared, job).await };
    let id = job.id.clone();
    let kept = async {
        job.settings.source_sha256 =
            Some(keep_image(&shared, image, "input_reference", worker::image_path(&shared, &id)).await?);
        if let Some(last) = last_image {
            let sha256 = keep_image(&shared, last, "last_image", worker::last_image_path(&shared, &id)).await?;
            job.settings.last_image_sha256 = Some(sha256);
        }
        job.settings.edit = Some(match shape.vace {
            true => EditKind::Vace { control: false, references: 1, conditioning_scale: scale },
            false => EditKind::ImageToVideo { last_image: job.settings.last_image_sha256.is_some() },
        });
        Ok(job)
    }
    .await;
    enqueue_with_source(&shared, &id, kept).await
}

/// What a route reads of a body: uploads only where it takes a file, spooled beside the inputs they become.
fn body_limits(shared: &Shared, uploads: bool) -> BodyLimits {
    let limits = &shared.config.limits;
    BodyLimits {
        fields_bytes: limits.max_body_bytes,
        uploads: uploads.then(|| (limits.max_upload_bytes as u64, worker::inputs_dir(shared))),
    }
}

/// An upload that fails its check: refused for what it is (`unsupported_media`, `media_too_large`), or as
/// unreadable (`code`), in a message that names the field and never the server's path for the file.
fn media_error(
    error: kinetoscope_video::VideoError,
    path: &std::path::Path,
    param: &str,
    code: &'static str,
) -> ApiError {
    use kinetoscope_video::VideoError;
    let message = format!("{param}: {}", redact_path(&error.to_string(), path, &format!("`{param}`")));
    match error {
        VideoError::UnsupportedMedia { .. } => ApiError::invalid("unsupported_media", param, message),
        VideoError::TooLarge { .. } => ApiError::invalid("media_too_large", param, message),
        full if full.is_disk_full() => {
            ApiError::insufficient_storage(format!("the server's disk is full: cannot keep {param}; retry later"))
        }
        _ => ApiError::invalid(code, param, message),
    }
}

/// `text` with every mention of the server's `path` replaced by `name`.
fn redact_path(text: &str, path: &std::path::Path, name: &str) -> String {
    text.replace(&path.display().to_string(), name)
}

/// Keeps an image of an image-to-video job (the request's field `param`: `input_reference`, `last_image`) at
/// `target`, once its header and pixels check out; answers its sha256. Only uploads and `data:` URLs are taken:
/// the server fetches nothing.
/// Keeps frame `frame` (`None`: the last) of the finished video `video_id` as the PNG image at `target`, to
/// start a new video where that one left off; returns the PNG's sha256.
async fn keep_frame(
    shared: &Arc<Shared>,
    video_id: &str,
    frame: Option<u64>,
    param: &'static str,
    target: std::path::PathBuf,
) -> ApiResult<String> {
    let job = lookup(shared, video_id).await.map_err(|e| ApiError { param: Some(param.into()), ..e })?;
    if job.status != Status::Completed {
        let message = format!("video {video_id} is {:?}; only a completed video's frame can start another", job.status);
        return Err(ApiError::invalid("video_not_ready", param, message));
    }
    let local = completed_video(shared, &job.id).await?;
    if !local.path.is_file() {
        return Err(video_expired(video_id));
    }
    let limits = shared.config.limits.decode();
    let _permit = shared.decodes.acquire().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let source = &local.path;
        let frames = kinetoscope_video::read_frames_with_limits(source, &limits)
            .map_err(|e| media_error(e, source, param, "invalid_image"))?;
        let count = frames.num_frames() as u64;
        let index = frame.unwrap_or(count.saturating_sub(1));
        if index >= count {
            let reason = format!("{param}: frame {index} is past the video's {count} frames (0 to {})", count - 1);
            return Err(ApiError::invalid("invalid_image", param, reason));
        }
        kinetoscope_video::write_png(&target, &frames, index as usize).map_err(|e| match e {
            kinetoscope_video::VideoError::Io { source, .. } => storage_error(source, "store the frame"),
            other => ApiError::internal(other),
        })?;
        let png = std::fs::read(&target).map_err(|e| storage_error(e, "store the frame"))?;
        Ok(crate::fields::hex(&<sha2::Sha256 as sha2::Digest>::digest(&png)))
    })
    .await
    .map_err(ApiError::internal)?
}

/// A completed video's MP4 here: its file in `videos/`, or a copy of its object, deleted when dropped.
struct LocalVideo {
    path: std::path::PathBuf,
    _copy: Option<tempfile::TempPath>,
}

/// The MP4 of the completed video `id`, to read here; expired when it is not kept anymore.
async fn completed_video(shared: &Arc<Shared>, id: &str) -> ApiResult<LocalVideo> {
    let Some(bucket) = &shared.bucket else {
        return Ok(LocalVideo { path: worker::video_path(shared, id), _copy: None });
    };
    let copy = tempfile::Builder::new()
        .prefix(".download.tmp-")
        .tempfile_in(worker::inputs_dir(shared))
        .map_err(|e| storage_error(e, "copy the source"))?
        .into_temp_path();
    match bucket.run(bucket.download(&bucket::video_name(id, "mp4"), &copy)).await {
        Ok(()) => Ok(LocalVideo { path: copy.to_path_buf(), _copy: Some(copy) }),
        Err(e) if e.is_not_found() => Err(video_expired(id)),
        Err(e) => Err(bucket_error(e, "copy the source")),
    }
}

fn video_expired(id: &str) -> ApiError {
    ApiError::new(StatusCode::GONE, "video_expired", format!("video {id} has expired and its files are deleted"))
}

async fn keep_image(
    shared: &Arc<Shared>,
    reference: ImageReference,
    param: &'static str,
    target: std::path::PathBuf,
) -> ApiResult<String> {
    let invalid = |reason: String| ApiError::invalid("invalid_image", param, format!("{param}: {reason}"));
    let unsupported = |reason: &str| ApiError::invalid("unsupported_parameter", param, format!("{param}: {reason}"));
    let upload = match reference {
        ImageReference::Upload(upload) => upload,
        ImageReference::Url(url) => match url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
            Some((_, data)) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| invalid(format!("the data: URL is not valid base64: {e}")))?;
                let dir = worker::inputs_dir(shared);
                tokio::task::spawn_blocking(move || Upload::from_bytes(&bytes, &dir))
                    .await
                    .map_err(ApiError::internal)?
                    .map_err(|e| storage_error(e, "store the image"))?
            }
            None => {
                return Err(unsupported(
                    "only a base64 data: URL (data:image/png;base64,...) or an upload: this server fetches no URL",
                ))
            }
        },
        ImageReference::FileId => {
            return Err(unsupported("file_id needs a Files API, which this server has not: upload the image instead"))
        }
        ImageReference::VideoFrame { video_id, frame } => {
            return keep_frame(shared, &video_id, frame, param, target).await
        }
    };
    let limits = shared.config.limits.decode();
    let _permit = shared.decodes.acquire().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let path = upload.file.path().to_path_buf();
        kinetoscope_video::read_image_with_limits(&path, &limits)
            .map_err(|e| media_error(e, &path, param, "invalid_image"))?;
        upload.file.persist(&target).map_err(|e| storage_error(e.error, "store the image"))?;
        Ok(upload.sha256)
    })
    .await
    .map_err(ApiError::internal)?
}

async fn remix(State(shared): State<Arc<Shared>>, VideoId(id): VideoId, request: Request) -> ApiResult {
    disk::check(&shared)?;
    let mut fields = Fields::from_request(request, &body_limits(&shared, false)).await?;
    let prompt = required_prompt(&shared, &mut fields)?;
    let webhook_url = webhook_url(&shared, &mut fields)?;
    fields.finish()?;
    let source = lookup(&shared, &id).await?;
    // A remix renders with the source's model.
    let served = shared.model(&source.model).ok_or_else(|| {
        let reason = format!("{} was made with {:?}, which this server no longer serves", source.id, source.model);
        ApiError::invalid("model_not_found", "model", reason)
    })?;
    check_available(&shared, served)?;
    let job = NewJob {
        id: new_id(),
        model: source.model,
        seconds: source.seconds,
        settings: Settings { prompt, ..source.settings },
        remixed_from: Some(source.id.clone()),
        webhook_url: webhook_url.or(source.webhook_url),
    };
    if job.settings.edit.is_none() {
        return enqueue(&shared, job).await;
    }
    // A remix of an edit edits the same source (video, or image and last image) again.
    let edit = job.settings.edit.as_ref().expect("an edit");
    let id = job.id.clone();
    let copies: Vec<_> = worker::source_paths(&shared, &source.id, edit)
        .into_iter()
        .zip(worker::source_paths(&shared, &id, edit))
        .collect();
    let gone = || {
        let message = format!("the source of {} is no longer kept", source.id);
        ApiError::new(StatusCode::GONE, "video_expired", message)
    };
    let queued = async {
        for (from, to) in copies {
            match &shared.bucket {
                Some(bucket) => {
                    match bucket.run(bucket.copy(&worker::input_object(&from), &worker::input_object(&to))).await {
                        Ok(()) => Ok(()),
                        Err(e) if e.is_not_found() => Err(gone()),
                        Err(e) => Err(bucket_error(e, "copy the source")),
                    }
                }
                None => tokio::fs::copy(&from, &to).await.map(drop).map_err(|e| match crate::error::is_disk_full(&e) {
                    true => storage_error(e, "copy the source"),
                    false => gone(),
                }),
            }?;
        }
        // The copies are where the worker looks for them (the bucket's copy is there already: nothing to send).
        enqueue(&shared, job).await
    };
    or_remove_files(&shared, &id, queued.await).await
}

/// The source of an edit, accepted: its file at the job's input path, what it is, and what to do to it.
struct Source {
    edit: EditKind,
    sha256: String,
}

/// A source video as read from the file kept for the job.
struct SourceVideo {
    sha256: String,
    frames: usize,
    width: usize,
    height: usize,
    fps: u32,
}

/// Keeps the source a request names as the new job's input (`inputs/<id>.mp4`): a copy of a completed
/// video's MP4, or the upload. Returns what it is; on any error nothing is left behind.
async fn keep_source(shared: &Arc<Shared>, reference: VideoReference, id: &str) -> ApiResult<SourceVideo> {
    let upload = match reference {
        VideoReference::Upload(upload) => upload,
        VideoReference::Id(source) => {
            let job = lookup(shared, &source).await.map_err(|e| ApiError { param: Some("video".into()), ..e })?;
            if job.status != Status::Completed {
                let message = format!("video {source} is {:?}; only a completed video can be edited", job.status);
                return Err(ApiError::invalid("video_not_ready", "video", message));
            }
            let (local, dir) = (completed_video(shared, &job.id).await?, worker::inputs_dir(shared));
            let copied = tokio::task::spawn_blocking(move || Upload::copy_of(&local.path, &dir)).await;
            match copied.map_err(ApiError::internal)? {
                Ok(upload) => upload,
                Err(e) if crate::error::is_disk_full(&e) => return Err(storage_error(e, "copy the source")),
                Err(_) => return Err(video_expired(&source)),
            }
        }
    };
    let (target, limits) = (worker::input_path(shared, id), shared.config.limits.decode());
    let _permit = shared.decodes.acquire().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let path = upload.file.path().to_path_buf();
        let info = kinetoscope_video::probe_with_limits(&path, &limits)
            .map_err(|e| media_error(e, &path, "video", "invalid_video"))?;
        let fps = info.fps.round();
        if !(1.0..=240.0).contains(&fps) || info.frames == 0 {
            let reason = format!("video: a video of {} frames at {} fps can't be edited", info.frames, info.fps);
            return Err(ApiError::invalid("invalid_video", "video", reason));
        }
        upload.file.persist(&target).map_err(|e| storage_error(e.error, "store the video"))?;
        Ok(SourceVideo {
            sha256: upload.sha256,
            frames: info.frames,
            width: info.width as usize,
            height: info.height as usize,
            fps: fps as u32,
        })
    })
    .await
    .map_err(ApiError::internal)?
}

/// A `redo` range of `source` as `kinetoscope generate --redo` takes it ([`TimeRange`]), as frames inside it.
fn redo_range(text: &str, source: &SourceVideo) -> ApiResult<(usize, usize)> {
    let invalid = |why: String| ApiError::invalid("invalid_redo", "redo", format!("redo: {why}"));
    let frames = text.parse::<TimeRange>().map_err(invalid)?.frames(f64::from(source.fps));
    if frames.start >= frames.end || frames.end > source.frames {
        return Err(invalid(format!(
            "{text:?} is frames {frames:?}, not a range inside the video's {} frames",
            source.frames
        )));
    }
    Ok((frames.start, frames.end))
}

fn seconds_of(frames: usize, fps: u32) -> String {
    let text = format!("{:.2}", frames as f64 / f64::from(fps));
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `POST /v1/videos/edits` (the SDK's `videos.edit`): the source video regenerated with a new prompt,
/// as a whole (`strength`, video-to-video), only a time range (`redo`), or only a region (`mask`: an uploaded
/// picture of it, white inside; or `region`: `X,Y,W,H` in the video's pixels; within `redo`'s range if given).
async fn edit(State(shared): State<Arc<Shared>>, request: Request) -> ApiResult {
    disk::check(&shared)?;
    let mut fields = Fields::from_request(request, &body_limits(&shared, true)).await?;
    let served = served(&shared, &mut fields)?;
    check_available(&shared, served)?;
    check_edits(served)?;
    let prompt = required_prompt(&shared, &mut fields)?;
    let reference = fields.video_reference("video")?.ok_or_else(missing_video)?;
    let (redo, strength) = (fields.text("redo")?, fields.number("strength")?);
    if redo.is_some() && strength.is_some() {
        return Err(ApiError::invalid("invalid_request", "strength", "give strength or redo, not both"));
    }
    let mask = match fields.video_reference("mask")? {
        None => None,
        Some(VideoReference::Upload(upload)) => Some(upload),
        Some(VideoReference::Id(_)) => {
            return Err(ApiError::invalid(
                "invalid_mask",
                "mask",
                "mask: upload a picture of the mask (an image or a video)",
            ))
        }
    };
    let region = fields.text("region")?.map(|text| parse_region(&text)).transpose()?;
    // On a Wan VACE model, a video without a mask or region is a control video to follow (a depth or pose video).
    let control = served.shape.vace && mask.is_none() && region.is_none();
    let scale = conditioning_scale(served, &mut fields, control)?;
    if served.shape.vace && (strength.is_some() || (redo.is_some() && control)) {
        let param = if strength.is_some() { "strength" } else { "redo" };
        let reason = format!(
            "{param}: the served model is a Wan VACE model: it edits a mask or region of the video, or follows the \
             video as a control video (neither strength nor a time range without a region)"
        );
        return Err(ApiError::invalid("unsupported_parameter", param, reason));
    }
    if (mask.is_some() || region.is_some()) && strength.is_some() {
        return Err(ApiError::invalid("invalid_request", "strength", "give strength, or a mask or region, not both"));
    }
    if mask.is_some() && region.is_some() {
        return Err(ApiError::invalid("invalid_request", "region", "give a mask or a region, not both"));
    }
    let mut request = request_defaults(served);
    sampling_fields(&shared, served, &mut fields, &mut request)?;
    let seed = fields.integer("seed")?.unwrap_or_else(rand::random);
    let webhook_url = webhook_url(&shared, &mut fields)?;
    fields.finish()?;

    let id = new_id();
    let source = keep_source(&shared, reference, &id).await?;
    let masked = match mask {
        Some(upload) => keep_mask(&shared, upload, &id, &source).await.map(|()| true),
        None => Ok(false),
    };
    let accepted = masked.and_then(|masked| {
        let frames = redo.as_deref().map(|range| redo_range(range, &source)).transpose()?;
        let edit = match (frames, masked || region.is_some()) {
            (frames, true) => {
                let (start, end) = frames.unwrap_or((0, source.frames));
                if let Some([x, y, w, h]) = region {
                    if x + w > source.width || y + h > source.height {
                        let reason = format!(
                            "region: {x},{y},{w},{h} is not inside the {}x{} video",
                            source.width, source.height
                        );
                        return Err(ApiError::invalid("invalid_region", "region", reason));
                    }
                }
                EditKind::Region { start, end, rectangle: region }
            }
            _ if control => EditKind::Vace { control: true, references: 0, conditioning_scale: scale },
            (Some((start, end)), false) => EditKind::Redo { start, end },
            (None, false) => EditKind::VideoToVideo { strength: strength.unwrap_or(0.8) },
        };
        kinetoscope::edit_steps(&edit, request.steps).map_err(request_error)?;
        let (m, s) = (served.shape.frame_multiple, served.shape.size_multiple);
        let frames = source.frames.min(shared.config.limits.max_frames);
        (request.num_frames, request.fps) = ((frames - 1) / m * m + 1, source.fps);
        (request.width, request.height) = (source.width / s * s, source.height / s * s);
        check_size(&shared, &request)?;
        validate(&shared, served, &request)?;
        Ok(edit_job(served, &id, prompt, &request, seed, webhook_url, Source { edit, sha256: source.sha256.clone() }))
    });
    enqueue_with_source(&shared, &id, accepted).await
}

/// A Wan VACE request's `conditioning_scale` (1 when absent): taken only where the served model is a VACE model
/// and the request gives it something to scale (`applies`: a control video or a reference image).
fn conditioning_scale(served: &Served, fields: &mut Fields, applies: bool) -> ApiResult<f64> {
    let Some(scale) = fields.number("conditioning_scale")? else { return Ok(1.0) };
    let invalid = |reason: String| Err(ApiError::invalid("invalid_request", "conditioning_scale", reason));
    if !served.shape.vace {
        return invalid(format!("conditioning_scale: the model {:?} is no Wan VACE model", served.name));
    }
    if !applies {
        return invalid("conditioning_scale: scales a control video or a reference image, and none is given".into());
    }
    if !scale.is_finite() {
        return invalid(format!("conditioning_scale: {scale} must be a finite number"));
    }
    Ok(scale)
}

/// `X,Y,W,H` in pixels, a positive width and height.
fn parse_region(text: &str) -> ApiResult<[usize; 4]> {
    let values: Option<Vec<usize>> = text.split(',').map(|v| v.trim().parse().ok()).collect();
    match values.as_deref() {
        Some(&[x, y, w, h]) if w > 0 && h > 0 => Ok([x, y, w, h]),
        _ => Err(ApiError::invalid(
            "invalid_region",
            "region",
            format!("region {text:?}: expected X,Y,WIDTH,HEIGHT in the video's pixels, e.g. \"16,8,64,32\""),
        )),
    }
}

/// Keeps a region edit's uploaded mask beside its source, once it decodes (as an image, or a video with a frame for
/// each of the source's) within the limits.
async fn keep_mask(shared: &Arc<Shared>, upload: Upload, id: &str, source: &SourceVideo) -> ApiResult<()> {
    let (target, limits, frames) = (worker::mask_path(shared, id), shared.config.limits.decode(), source.frames);
    let _permit = shared.decodes.acquire().await.map_err(ApiError::internal)?;
    tokio::task::spawn_blocking(move || {
        let path = upload.file.path().to_path_buf();
        if kinetoscope_video::read_image_with_limits(&path, &limits).is_err() {
            let info = kinetoscope_video::probe_with_limits(&path, &limits)
                .map_err(|e| media_error(e, &path, "mask", "invalid_mask"))?;
            if info.frames < frames {
                let reason = format!(
                    "mask: a mask video of {} frames for a video of {frames}: give a frame for each, or one image",
                    info.frames
                );
                return Err(ApiError::invalid("invalid_mask", "mask", reason));
            }
        }
        upload.file.persist(&target).map_err(|e| storage_error(e.error, "store the mask"))?;
        Ok(())
    })
    .await
    .map_err(ApiError::internal)?
}

/// `POST /v1/videos/extensions` (the SDK's `videos.extend`): `seconds` more of the source video, joined
/// to it; the result's `seconds` is the whole.
async fn extension(State(shared): State<Arc<Shared>>, request: Request) -> ApiResult {
    disk::check(&shared)?;
    let mut fields = Fields::from_request(request, &body_limits(&shared, true)).await?;
    let served = served(&shared, &mut fields)?;
    check_available(&shared, served)?;
    check_edits(served)?;
    let prompt = required_prompt(&shared, &mut fields)?;
    let reference = fields.video_reference("video")?.ok_or_else(missing_video)?;
    let seconds_text = fields.text_or_number("seconds")?.ok_or_else(|| {
        ApiError::invalid("missing_required_parameter", "seconds", "seconds is required: how long a part to add")
    })?;
    let mut request = request_defaults(served);
    sampling_fields(&shared, served, &mut fields, &mut request)?;
    let seed = fields.integer("seed")?.unwrap_or_else(rand::random);
    let webhook_url = webhook_url(&shared, &mut fields)?;
    fields.finish()?;

    let id = new_id();
    let source = keep_source(&shared, reference, &id).await?;
    let accepted = (|| {
        let invalid_seconds =
            |why: String| ApiError::invalid("invalid_seconds", "seconds", format!("seconds {seconds_text:?}: {why}"));
        let seconds: f64 = seconds_text.trim().parse().map_err(|_| invalid_seconds("expected a number".into()))?;
        let frames = served.shape.extension_frames(seconds, source.fps).map_err(|e| invalid_seconds(e.to_string()))?;
        let s = served.shape.size_multiple;
        (request.width, request.height, request.fps) = (source.width / s * s, source.height / s * s, source.fps);
        check_size(&shared, &request)?;
        // Only the length of the source matters to where the frames go; its pixels are read by the worker.
        let shape =
            InputVideo { frames: Vec::new(), num_frames: source.frames, height: request.height, width: request.width };
        let layout = served
            .shape
            .extend_layout(&ExtendRequest { base: request.clone(), input: &shape, frames })
            .map_err(request_error)?;
        if layout.generated > shared.config.limits.max_frames {
            return Err(invalid_seconds(format!(
                "{} frames to generate; the limit is {}",
                layout.generated, shared.config.limits.max_frames
            )));
        }
        validate(&shared, served, &GenerateRequest { num_frames: layout.generated, ..request.clone() })?;
        request.num_frames = layout.kept + layout.generated - layout.generated_from;
        let source = Source { edit: EditKind::Extend { frames }, sha256: source.sha256.clone() };
        Ok(edit_job(served, &id, prompt, &request, seed, webhook_url, source))
    })();
    enqueue_with_source(&shared, &id, accepted).await
}

/// The job of an accepted edit: `request` as fitted to the source; its `seconds` are the output clip's.
fn edit_job(
    served: &Served,
    id: &str,
    prompt: String,
    request: &GenerateRequest,
    seed: u64,
    webhook_url: Option<String>,
    source: Source,
) -> NewJob {
    NewJob {
        id: id.to_string(),
        model: served.name.clone(),
        seconds: seconds_of(request.num_frames, request.fps),
        settings: settings(prompt, request, seed, None, Some(source)),
        remixed_from: None,
        webhook_url,
    }
}

fn missing_video() -> ApiError {
    ApiError::invalid(
        "missing_required_parameter",
        "video",
        "video is required: {\"id\": \"video_...\"} or an uploaded file",
    )
}

/// What a request that gives nothing gets.
fn request_defaults(served: &Served) -> GenerateRequest {
    let defaults = &served.defaults;
    GenerateRequest {
        width: defaults.width,
        height: defaults.height,
        steps: defaults.steps,
        guidance_scale: defaults.guidance_scale,
        fps: defaults.fps,
        ..GenerateRequest::default()
    }
}

fn check_size(shared: &Shared, request: &GenerateRequest) -> ApiResult<()> {
    let limits = &shared.config.limits;
    if request.width == 0 || request.height == 0 {
        let (w, h) = (request.width, request.height);
        return Err(ApiError::invalid("invalid_size", "size", format!("size {w}x{h}: both sides must be positive")));
    }
    if request.width > limits.max_width || request.height > limits.max_height {
        let (w, h, mw, mh) = (request.width, request.height, limits.max_width, limits.max_height);
        return Err(ApiError::invalid("invalid_size", "size", format!("size {w}x{h} exceeds the limit {mw}x{mh}")));
    }
    Ok(())
}

/// Queues the edit `id`, whose source is already kept (and sent to the bucket, where there is one), or removes
/// the source if the job was refused.
async fn enqueue_with_source(shared: &Arc<Shared>, id: &str, accepted: ApiResult<NewJob>) -> ApiResult {
    let queued = async {
        let job = accepted?;
        send_sources(shared, &job).await?;
        enqueue(shared, job).await
    };
    or_remove_files(shared, id, queued.await).await
}

/// `queued`, once the files kept for job `id` are removed if it is an error: a refused job leaves no source.
async fn or_remove_files(shared: &Arc<Shared>, id: &str, queued: ApiResult) -> ApiResult {
    if queued.is_err() {
        remove_files(shared, id).await;
    }
    queued
}

async fn send_sources(shared: &Arc<Shared>, job: &NewJob) -> ApiResult<()> {
    let (Some(edit), Some(_)) = (job.settings.edit.clone(), &shared.bucket) else { return Ok(()) };
    let (sending, id) = (shared.clone(), job.id.clone());
    let sent = tokio::task::spawn_blocking(move || worker::send_sources(&sending, &id, &edit)).await;
    sent.map_err(ApiError::internal)?.map_err(|e| bucket_error(e, "keep the source"))
}

/// [`worker::remove_files`] off the async threads (it may wait for the bucket).
async fn remove_files(shared: &Arc<Shared>, id: &str) {
    let (shared, id) = (shared.clone(), id.to_string());
    let _ = tokio::task::spawn_blocking(move || worker::remove_files(&shared, &id)).await;
}

async fn enqueue(shared: &Arc<Shared>, job: NewJob) -> ApiResult {
    let store_shared = shared.clone();
    let max_queue = shared.config.limits.max_queue;
    let job = blocking(move || store_shared.store.insert(&job, unix_now(), max_queue)).await?;
    shared.wake.notify();
    tracing::info!(id = job.id, "queued");
    Ok(Json(job.to_object()).into_response())
}

/// Runs a store call off the async threads (SQLite syncs to disk on every commit).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?.map_err(store_error)
}

async fn lookup(shared: &Arc<Shared>, id: &str) -> ApiResult<Job> {
    let (shared, key) = (shared.clone(), id.to_string());
    blocking(move || shared.store.get(&key)).await?.ok_or_else(|| ApiError::not_found(id))
}

fn required_prompt(shared: &Shared, fields: &mut Fields) -> ApiResult<String> {
    let prompt = fields.text("prompt")?.ok_or_else(|| {
        ApiError::invalid("missing_required_parameter", "prompt", "prompt is required: the text the video shows")
    })?;
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid("invalid_prompt", "prompt", "prompt is empty"));
    }
    check_length(shared, "prompt", &prompt)?;
    Ok(prompt)
}

fn check_length(shared: &Shared, name: &str, text: &str) -> ApiResult<()> {
    let (chars, limit) = (text.chars().count(), shared.config.limits.max_prompt_chars);
    if chars > limit {
        return Err(ApiError::invalid(
            "prompt_too_long",
            name,
            format!("{name} has {chars} characters; the limit is {limit}"),
        ));
    }
    Ok(())
}

fn webhook_url(shared: &Shared, fields: &mut Fields) -> ApiResult<Option<String>> {
    let Some(url) = fields.text("webhook_url")? else { return Ok(None) };
    let limit = shared.config.limits.max_webhook_url_bytes;
    if url.len() > limit {
        return Err(ApiError::invalid(
            "invalid_webhook_url",
            "webhook_url",
            format!("webhook_url is {} bytes long; the limit is {limit}", url.len()),
        ));
    }
    shared
        .webhooks
        .check_target(&url)
        .map_err(|e| ApiError::invalid("invalid_webhook_url", "webhook_url", e.to_string()))?;
    Ok(Some(url))
}

/// Turns a create request into fixed settings: the server's defaults, then the preset, then every
/// field the client gave, each checked against the configured limits and the model.
fn resolve(shared: &Shared, served: &Served, fields: &mut Fields) -> ApiResult<NewJob> {
    let (limits, defaults) = (&shared.config.limits, &served.defaults);
    let prompt = required_prompt(shared, fields)?;
    let mut request = request_defaults(served);
    let preset = fields.text("preset")?;
    if let Some(name) = &preset {
        let preset =
            Preset::from_str(name).map_err(|e| ApiError::invalid("invalid_preset", "preset", e.to_string()))?;
        preset.apply(&mut request);
    }
    if let Some(size) = fields.text("size")? {
        let invalid = || {
            ApiError::invalid("invalid_size", "size", format!("size {size:?}: expected WIDTHxHEIGHT, e.g. \"832x480\""))
        };
        let (w, h) = size.split_once('x').ok_or_else(invalid)?;
        (request.width, request.height) = (w.parse().map_err(|_| invalid())?, h.parse().map_err(|_| invalid())?);
    }
    check_size(shared, &request)?;
    if let Some(fps) = fields.integer("fps")? {
        if !(1..=MAX_FPS).contains(&fps) {
            return Err(ApiError::invalid("invalid_fps", "fps", format!("fps {fps} is outside 1..={MAX_FPS}")));
        }
        request.fps = fps as u32;
    }
    let seconds_text = fields.text_or_number("seconds")?.unwrap_or_else(|| defaults.seconds.to_string());
    let seconds: f64 =
        seconds_text.trim().parse().ok().filter(|s: &f64| s.is_finite() && *s > 0.0).ok_or_else(|| {
            ApiError::invalid(
                "invalid_seconds",
                "seconds",
                format!("seconds {seconds_text:?}: expected a positive number"),
            )
        })?;
    request.num_frames = frames_for(seconds, request.fps, served.shape.frame_multiple)
        .filter(|frames| *frames <= limits.max_frames)
        .ok_or_else(|| {
            let most = (limits.max_frames - 1) as f64 / request.fps as f64;
            ApiError::invalid(
                "invalid_seconds",
                "seconds",
                format!(
                    "{seconds_text} s at {} fps is more than the limit of {} frames ({most:.1} s)",
                    request.fps, limits.max_frames
                ),
            )
        })?;
    sampling_fields(shared, served, fields, &mut request)?;
    let seed = fields.integer("seed")?.unwrap_or_else(rand::random);
    let webhook_url = webhook_url(shared, fields)?;
    let settings = settings(prompt, &request, seed, preset, None);
    // What the configs say is checked at once, loaded or not; the rest once the model is there (the
    // worker checks again before it renders).
    let request = worker::to_request(&settings, shared.config.lora_dir.as_deref());
    validate(shared, served, &request)?;
    Ok(NewJob {
        id: new_id(),
        model: served.name.clone(),
        seconds: seconds_text,
        settings,
        remixed_from: None,
        webhook_url,
    })
}

/// Most adapters a job may ask for.
const MAX_JOB_LORAS: usize = 8;

/// A job's `loras`: `[{"name": "style.safetensors", "scale": 0.8, "low_noise": false}]`, files of the server's
/// `--lora-dir` named by their plain file name (never a path), applied at run time to this job only.
fn job_loras(shared: &Shared, served: &Served, value: Value) -> ApiResult<Vec<kinetoscope::LoraSpec>> {
    let invalid = |reason: String| ApiError::invalid("invalid_lora", "loras", format!("loras: {reason}"));
    let Some(dir) = &shared.config.lora_dir else {
        return Err(ApiError::invalid(
            "unsupported_parameter",
            "loras",
            "loras: this server takes no adapters per request (it was started without --lora-dir)",
        ));
    };
    let Value::Array(items) = value else { return Err(invalid(format!("expected a list, got {value}"))) };
    if items.len() > MAX_JOB_LORAS {
        return Err(invalid(format!("{} adapters; at most {MAX_JOB_LORAS}", items.len())));
    }
    items
        .into_iter()
        .map(|item| {
            let Value::Object(mut item) = item else { return Err(invalid(format!("expected objects, got {item}"))) };
            let name = match item.remove("name") {
                Some(Value::String(name)) => name,
                other => return Err(invalid(format!("each needs a \"name\" (a file name), got {other:?}"))),
            };
            let scale = match item.remove("scale") {
                None => 1.0,
                Some(scale) => scale
                    .as_f64()
                    .filter(|s| s.is_finite() && s.abs() <= 10.0)
                    .ok_or_else(|| invalid(format!("{name}: scale {scale} must be a number from -10 to 10")))?,
            };
            let low_noise = match item.remove("low_noise") {
                None => false,
                Some(Value::Bool(low)) => low,
                Some(other) => return Err(invalid(format!("{name}: low_noise must be true or false, got {other}"))),
            };
            if let Some(key) = item.keys().next() {
                return Err(invalid(format!("{name}: unknown field {key:?}; expected name, scale, low_noise")));
            }
            let plain = !name.is_empty()
                && name.len() <= 255
                && !name.starts_with('.')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            let path = dir.join(&name);
            if !plain || !path.is_file() {
                let message = format!("loras: no adapter named {name:?} in the server's adapter folder");
                return Err(ApiError::invalid("lora_not_found", "loras", message));
            }
            if low_noise && !served.shape.two_experts {
                return Err(ApiError::invalid(
                    "unsupported_parameter",
                    "loras",
                    format!("loras: {name} is for a low-noise expert; the served model has one transformer"),
                ));
            }
            let component = if low_noise { "transformer_2" } else { "transformer" };
            Ok(kinetoscope::LoraSpec { path, scale, component })
        })
        .collect()
}

/// The fields every kind of job takes that shape the sampling: steps or an explicit schedule, shift, guidance,
/// negative prompt, step cache.
fn sampling_fields(
    shared: &Shared,
    served: &Served,
    fields: &mut Fields,
    request: &mut GenerateRequest,
) -> ApiResult<()> {
    let limits = &shared.config.limits;
    // An explicit schedule (few-step distilled models: flow-match Euler over it); its length is the steps.
    // DMD timesteps (FastWan) run with FastVideo's sampler.
    let given = [
        fields.numbers("timesteps", limits.max_steps)?.map(Schedule::Timesteps),
        fields.numbers("sigmas", limits.max_steps)?.map(Schedule::Sigmas),
        fields.numbers("dmd", limits.max_steps)?.map(Schedule::Dmd),
    ];
    request.schedule = match given.into_iter().flatten().collect::<Vec<_>>()[..] {
        // The preset's (turbo's), if any.
        [] => request.schedule.take(),
        [ref one] => Some(one.clone()),
        _ => {
            return Err(ApiError::invalid("invalid_request", "sigmas", "sigmas: give one of timesteps, sigmas and dmd"))
        }
    };
    if let Some(schedule) = &request.schedule {
        request.steps = schedule.len();
    }
    if let Some(steps) = fields.integer("steps")? {
        request.steps = usize::try_from(steps).unwrap_or(usize::MAX);
    }
    if let Some(loras) = fields.json("loras")? {
        request.loras = job_loras(shared, served, loras)?;
    }
    if let Some(shift) = fields.number("shift")? {
        if !(shift > 0.0 && shift <= 100.0) {
            return Err(ApiError::invalid("invalid_request", "shift", format!("shift {shift} is outside (0, 100]")));
        }
        request.shift = Some(shift);
    }
    if request.steps == 0 || request.steps > limits.max_steps {
        return Err(ApiError::invalid(
            "invalid_steps",
            "steps",
            format!("steps {} is outside 1..={}", request.steps, limits.max_steps),
        ));
    }
    if let Some(guidance) = fields.number("guidance_scale")? {
        if !(0.0..=MAX_GUIDANCE).contains(&guidance) {
            return Err(ApiError::invalid(
                "invalid_guidance_scale",
                "guidance_scale",
                format!("guidance_scale {guidance} is outside 0..={MAX_GUIDANCE} (1 turns guidance off; 5 is usual)"),
            ));
        }
        request.guidance_scale = guidance;
    }
    if let Some(guidance) = fields.number("guidance_scale_2")? {
        if !served.shape.two_experts {
            let served = &served.name;
            return Err(ApiError::invalid(
                "unsupported_parameter",
                "guidance_scale_2",
                format!(
                    "guidance_scale_2: the served model {served:?} has one transformer; a second guidance scale is \
                     for the low-noise expert of a two-expert model (Wan 2.2 A14B)"
                ),
            ));
        }
        if !(0.0..=MAX_GUIDANCE).contains(&guidance) {
            return Err(ApiError::invalid(
                "invalid_guidance_scale",
                "guidance_scale_2",
                format!("guidance_scale_2 {guidance} is outside 0..={MAX_GUIDANCE}"),
            ));
        }
        request.guidance_scale_2 = Some(guidance);
    }
    if let Some(negative) = fields.text("negative_prompt")? {
        check_length(shared, "negative_prompt", &negative)?;
        request.negative_prompt = negative;
    }
    if let Some(threshold) = fields.number("step_cache")? {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(ApiError::invalid(
                "invalid_step_cache",
                "step_cache",
                format!("step_cache {threshold} is outside 0..=1 (0.05 is a mild cache)"),
            ));
        }
        request.step_cache = Some(threshold);
    }
    Ok(())
}

fn settings(
    prompt: String,
    request: &GenerateRequest,
    seed: u64,
    preset: Option<String>,
    edit: Option<Source>,
) -> Settings {
    let (edit, source_sha256) = edit.map_or((None, None), |source| (Some(source.edit), Some(source.sha256)));
    Settings {
        prompt,
        negative_prompt: request.negative_prompt.clone(),
        width: request.width,
        height: request.height,
        num_frames: request.num_frames,
        fps: request.fps,
        steps: request.steps,
        guidance_scale: request.guidance_scale,
        guidance_scale_2: request.guidance_scale_2,
        shift: request.shift,
        schedule: request.schedule.clone(),
        loras: request
            .loras
            .iter()
            .map(|lora| JobLora {
                name: lora.path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
                scale: lora.scale,
                low_noise: lora.component == "transformer_2",
            })
            .collect(),
        seed,
        step_cache: request.step_cache,
        preset,
        edit,
        source_sha256,
        last_image_sha256: None,
    }
}

/// Checks a request against the model, naming the API's field for the library's: what its configs say at once,
/// loaded or not (an API node without a worker never loads it); the rest where this process has it loaded (the
/// worker checks again before it renders).
fn validate(shared: &Shared, served: &Served, request: &GenerateRequest) -> ApiResult<()> {
    served.shape.validate(request).map_err(request_error)?;
    match shared.pipeline.get() {
        Some(pipeline) if served.name == shared.config.model_name => pipeline.validate(request).map_err(request_error),
        _ => Ok(()),
    }
}

fn request_error(error: kinetoscope::Error) -> ApiError {
    match error {
        kinetoscope::Error::InvalidRequest { field, reason } => {
            let (code, param) = match field {
                "height" | "width" => ("invalid_size", "size"),
                "num_frames" => ("invalid_seconds", "seconds"),
                "steps" => ("invalid_steps", "steps"),
                "preset" => ("invalid_preset", "preset"),
                "strength" => ("invalid_strength", "strength"),
                "input" | "frames" => ("invalid_video", "video"),
                "guidance_scale" | "guidance_scale_2" => ("invalid_guidance_scale", field),
                "image" => ("invalid_image", "input_reference"),
                "last_image" => ("invalid_image", "last_image"),
                other => ("invalid_request", other),
            };
            ApiError::invalid(code, param, format!("{param}: {reason}"))
        }
        other => ApiError::invalid(other.code(), "request", other.to_string()),
    }
}

fn unsupported_reference(served: &Served) -> ApiError {
    let served = &served.name;
    let reason = format!(
        "the served model {served:?} generates from text only; starting from an image needs a model that takes one \
         (Wan 2.2 TI2V-5B, Wan 2.1 I2V or FLF2V, Wan 2.2 I2V-A14B)"
    );
    ApiError::invalid("unsupported_parameter", "input_reference", format!("input_reference: {reason}"))
}

fn unsupported_last_image(served: &Served) -> ApiError {
    let served = &served.name;
    let reason = format!(
        "the served model {served:?} can't end on a given frame; first-and-last-frame generation needs Wan 2.1 \
         FLF2V or Wan 2.2 I2V-A14B"
    );
    ApiError::invalid("unsupported_parameter", "last_image", format!("last_image: {reason}"))
}

/// A job without the image to start from, for a model that generates only from one (a model that can end on a
/// `last_image` is one of them).
fn missing_reference(served: &Served) -> ApiError {
    let served = &served.name;
    ApiError::invalid(
        "missing_required_parameter",
        "input_reference",
        format!(
            "input_reference is required: the served model {served:?} generates video from an image \
             (image-to-video); send the first frame as an upload or {{\"image_url\": \"data:image/png;base64,...\"}}"
        ),
    )
}

/// Refuses edits and extensions of a video on a model that only generates from an image.
fn check_edits(served: &Served) -> ApiResult<()> {
    if !served.shape.needs_image {
        return Ok(());
    }
    let served = &served.name;
    Err(ApiError::invalid(
        "unsupported_parameter",
        "video",
        format!(
            "video: the served model {served:?} generates video from an image (POST /v1/videos with \
             input_reference); editing or extending a video needs a text-to-video model"
        ),
    ))
}

/// Frames for a duration: the nearest count the model takes (`multiple·k + 1`), at least one step; `None`
/// past what a `usize` counts (`seconds: "1152921504606846976"` once wrapped around to one frame).
pub fn frames_for(seconds: f64, fps: u32, multiple: usize) -> Option<usize> {
    let steps = (seconds * f64::from(fps) / multiple as f64).round().max(1.0);
    // `as` saturates, so a step count past usize is usize::MAX here and fails the checked product.
    (steps as usize).checked_mul(multiple)?.checked_add(1)
}

async fn retrieve(State(shared): State<Arc<Shared>>, VideoId(id): VideoId) -> ApiResult {
    let job = lookup(&shared, &id).await?;
    let mut response = Json(job.to_object()).into_response();
    // What the SDK's `poll` helper waits between requests.
    let poll_ms = shared.config.poll_after.as_millis().to_string();
    response.headers_mut().insert("openai-poll-after-ms", HeaderValue::from_str(&poll_ms).expect("digits"));
    Ok(response)
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
}

async fn list(State(shared): State<Arc<Shared>>, ApiQuery(query): ApiQuery<ListQuery>) -> ApiResult {
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("invalid_limit", "limit", format!("limit {limit} is outside 1..=100")));
    }
    let descending = match query.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::invalid("invalid_order", "order", format!("order {other:?}: expected asc or desc")))
        }
    };
    let store_shared = shared.clone();
    let (jobs, more) = blocking(move || store_shared.store.list(query.after.as_deref(), limit, descending)).await?;
    Ok(Json(json!({
        "object": "list",
        "data": jobs.iter().map(Job::to_object).collect::<Vec<_>>(),
        "first_id": jobs.first().map(|j| &j.id),
        "last_id": jobs.last().map(|j| &j.id),
        "has_more": more,
    }))
    .into_response())
}

async fn delete(State(shared): State<Arc<Shared>>, VideoId(id): VideoId) -> ApiResult {
    let job = lookup(&shared, &id).await?;
    if let Some(running) = shared.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        running.stop.set(Stop::Deleted);
    }
    // Files first: on a full disk the database can't record the delete until they are gone.
    remove_files(&shared, &job.id).await;
    let (store_shared, key) = (shared.clone(), id.clone());
    blocking(move || store_shared.store.delete(&key)).await?.ok_or_else(|| ApiError::not_found(&id))?;
    // A render that finished between the two wrote its files after they were removed.
    remove_files(&shared, &job.id).await;
    // No subscriber is not an error.
    let _ = shared.events.send(Update::Job { id: job.id.clone(), job: None });
    tracing::info!(id, status = ?job.status, "deleted");
    Ok(Json(json!({"id": job.id, "object": "video.deleted", "deleted": true})).into_response())
}

#[derive(Deserialize)]
struct ContentQuery {
    variant: Option<String>,
}

async fn content(
    State(shared): State<Arc<Shared>>,
    VideoId(id): VideoId,
    ApiQuery(query): ApiQuery<ContentQuery>,
    request: Request,
) -> ApiResult {
    let job = lookup(&shared, &id).await?;
    if job.status != Status::Completed {
        let message = format!("video {id} is {:?}; its content exists once it is completed", job.status);
        return Err(ApiError {
            param: Some("video_id".into()),
            ..ApiError::new(StatusCode::CONFLICT, "video_not_ready", message)
        });
    }
    if job.expires_at.is_some_and(|t| t <= unix_now()) {
        return Err(video_expired(&id));
    }
    let (path, extension) = match query.variant.as_deref() {
        None | Some("video") => (worker::video_path(&shared, &job.id), "mp4"),
        Some("thumbnail") => (worker::thumbnail_path(&shared, &job.id), "png"),
        Some(other) => {
            return Err(ApiError::invalid(
                "unsupported_parameter",
                "variant",
                format!("variant {other:?}: expected video or thumbnail"),
            ))
        }
    };
    if let Some(bucket) = &shared.bucket {
        let range = request.headers().get(header::RANGE).and_then(|value| value.to_str().ok()).map(str::to_string);
        return from_bucket(bucket, &job.id, extension, range.as_deref()).await;
    }
    // ServeFile answers Range requests (206 / 416) and conditional requests for the MP4.
    let response = tower_http::services::ServeFile::new(&path).try_call(request).await.map_err(ApiError::internal)?;
    if response.status() == StatusCode::NOT_FOUND {
        return Err(ApiError::internal(format!("{} is missing for a completed video", path.display())));
    }
    Ok(response.map(Body::new))
}

/// A download of video `id`'s `extension` object (its MP4 or its PNG thumbnail): the part a `Range` header asks
/// for (206, or 416 outside it), else all of it.
async fn from_bucket(bucket: &bucket::Bucket, id: &str, extension: &str, range: Option<&str>) -> ApiResult {
    let download = match bucket.get(&bucket::video_name(id, extension), range).await {
        Ok(Ok(download)) => download,
        Ok(Err(size)) => {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            response.headers_mut().insert(header::CONTENT_RANGE, header_value(format!("bytes */{size}"))?);
            return Ok(response);
        }
        Err(e) if e.is_not_found() => return Err(ApiError::internal(format!("{e}: missing for a completed video"))),
        Err(e) => return Err(bucket_error(e, "read the video")),
    };
    let (size, range) = (download.meta.size, download.range.clone());
    let partial = range != (0..size);
    let mut response = Body::from_stream(download.body).into_response();
    *response.status_mut() = if partial { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let headers = response.headers_mut();
    let kind = if extension == "png" { "image/png" } else { "video/mp4" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(range.end - range.start));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if partial {
        let value = format!("bytes {}-{}/{size}", range.start, range.end - 1);
        headers.insert(header::CONTENT_RANGE, header_value(value)?);
    }
    if let Some(tag) = download.meta.e_tag.as_deref().and_then(|tag| HeaderValue::from_str(tag).ok()) {
        headers.insert(header::ETAG, tag);
    }
    Ok(response)
}

/// Object storage failed a call a request needs: 503, worth retrying (the bucket is named in the log only).
pub fn bucket_error(error: bucket::BucketError, action: &str) -> ApiError {
    tracing::error!("cannot {action}: {error}");
    ApiError {
        retry_after_s: Some(5),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            format!("the server's object storage did not answer: cannot {action}; retry later"),
        )
    }
}

fn header_value(text: String) -> ApiResult<HeaderValue> {
    HeaderValue::from_str(&text).map_err(ApiError::internal)
}

/// How often an event stream on a node of a shared store reads its job: its worker is another process, whose
/// updates reach this one only through the store.
const SHARED_STORE_POLL: Duration = Duration::from_millis(500);

async fn events(
    State(shared): State<Arc<Shared>>,
    VideoId(id): VideoId,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    // Subscribe before reading the current state, so no update falls between the two.
    let updates = shared.events.subscribe();
    let job = lookup(&shared, &id).await?;
    let poll = shared.store.is_shared().then(|| tokio::time::interval(SHARED_STORE_POLL));
    let state = JobStream { pending: Some(Some(Box::new(job))), updates, poll, id, shared, last: None, done: false };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let job = match state.pending.take() {
            Some(job) => job,
            None => state.next().await?,
        };
        let (event, done) = match &job {
            Some(job) => {
                let name = format!("video.{}", serde_json::to_value(job.status).ok()?.as_str()?);
                state.last = Some((job.status, job.progress));
                (Event::default().event(name).json_data(job.to_object()).ok()?, job.status.is_terminal())
            }
            None => {
                let deleted = json!({"id": state.id, "deleted": true});
                (Event::default().event("video.deleted").json_data(deleted).ok()?, true)
            }
        };
        state.done = done;
        Some((Ok(event), state))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// An event stream's state: the job's updates from this process's workers, and on a shared store a timer to read
/// it for other processes' changes.
struct JobStream {
    pending: Option<Option<Box<Job>>>,
    updates: broadcast::Receiver<Update>,
    poll: Option<tokio::time::Interval>,
    id: String,
    shared: Arc<Shared>,
    /// What the last event said, so a reading that found no change sends nothing.
    last: Option<(Status, i64)>,
    done: bool,
}

impl JobStream {
    /// The job's next state (`None` inside once deleted), or `None` when the stream ends.
    async fn next(&mut self) -> Option<Option<Box<Job>>> {
        loop {
            let update = match &mut self.poll {
                Some(poll) => tokio::select! {
                    update = self.updates.recv() => update,
                    _ = poll.tick() => {
                        let job = self.read().await?;
                        match &job {
                            Some(job) if Some((job.status, job.progress)) == self.last => continue,
                            _ => return Some(job),
                        }
                    }
                },
                None => self.updates.recv().await,
            };
            match update {
                Ok(Update::Job { id, job }) if id == self.id => return Some(job),
                Ok(Update::Job { .. }) => continue,
                Ok(Update::Shutdown) | Err(broadcast::error::RecvError::Closed) => return None,
                // Fell behind: the stored state is the latest anyway.
                Err(broadcast::error::RecvError::Lagged(_)) => return self.read().await,
            }
        }
    }

    async fn read(&self) -> Option<Option<Box<Job>>> {
        let (shared, id) = (self.shared.clone(), self.id.clone());
        let job = tokio::task::spawn_blocking(move || shared.store.get(&id)).await.ok()?.ok()?;
        Some(job.map(Box::new))
    }
}

/// A worker process's routes: its probes and metrics, without the API.
pub fn probes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// OpenAI's model list: the models live workers serve now.
async fn models(State(shared): State<Arc<Shared>>) -> ApiResult {
    let data: Vec<Value> = shared
        .served_models()
        .unwrap_or_default()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "kinetoscope"}))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if let Some(free) = disk::short(&shared) {
        let body = json!({
            "status": "low_disk",
            "error": "the data folder's disk is below --min-free-disk: new videos are refused",
            "free_bytes": free,
            "min_free_bytes": shared.config.min_free_disk,
        });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    if shared.metrics.workers_ready.get() > 0 {
        return Json(json!({"status": "ready", "model": shared.config.model_name})).into_response();
    }
    // An API node: ready once it has read the store; what it serves is the workers'.
    if shared.config.devices.is_empty() && shared.store.is_shared() {
        if let Some(models) = shared.served_models() {
            return Json(json!({"status": "ready", "model": shared.config.model_name, "served": models}))
                .into_response();
        }
    }
    let body = match shared.unavailable() {
        Some((code, reason)) => json!({"status": "failed", "code": code, "error": reason}),
        None => json!({"status": "loading"}),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> ApiResult {
    let store_shared = shared.clone();
    let depth = blocking(move || store_shared.store.queue_depth()).await?;
    let text = shared.metrics.render(&depth);
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::frames_for;

    #[test]
    fn seconds_become_the_nearest_frame_count_the_model_takes() {
        assert_eq!(frames_for(4.0, 16, 4), Some(65));
        assert_eq!(frames_for(5.0, 16, 4), Some(81));
        assert_eq!(frames_for(1.0, 8, 4), Some(9));
        assert_eq!(frames_for(0.01, 16, 4), Some(5));
        assert_eq!(frames_for(1152921504606846976.0, 16, 4), None);
        assert_eq!(frames_for(f64::MAX, 120, 4), None);
    }
}
