//! Request fields from a JSON object or a multipart form, read the same way. The `openai` SDK sends
//! `videos.create` as multipart even without a file, so every number may arrive as text; every
//! field is checked by name, and a field nobody reads is refused rather than silently ignored.
//!
//! Uploaded files are streamed to disk as they arrive (hashed on the way), never held in memory whole,
//! so the upload limit can be far larger than what the server would want in RAM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::ApiError;

pub struct Fields {
    values: Map<String, Value>,
    /// Multipart parts that came as files, by field name.
    files: HashMap<String, Upload>,
}

/// How much of a request body a route takes.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    /// A JSON body, or the text fields of a multipart form together.
    pub fields_bytes: usize,
    /// Files in a multipart form, if the route takes any: the most the whole form may hold, and the folder
    /// they are spooled to (on the filesystem where they will be kept, so keeping one is a rename).
    pub uploads: Option<(u64, PathBuf)>,
}

impl BodyLimits {
    /// The most a whole body may hold: a form with its files, or a JSON body with an image as a `data:` URL.
    fn whole(&self) -> u64 {
        self.uploads.as_ref().map_or(self.fields_bytes as u64, |(bytes, _)| *bytes)
    }
}

/// A file part of a multipart form, spooled to a temporary file as it arrived.
pub struct Upload {
    pub file: tempfile::NamedTempFile,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
}

impl Upload {
    /// Bytes that came inside a request (a `data:` URL), kept as an upload would be.
    pub fn from_bytes(bytes: &[u8], dir: &Path) -> std::io::Result<Upload> {
        let mut file = spool_file(dir)?;
        std::io::Write::write_all(&mut file, bytes)?;
        Ok(Upload { file, sha256: hex(&Sha256::digest(bytes)) })
    }

    /// A copy of a file the server already has (a finished video to edit), hashed as it is copied.
    pub fn copy_of(source: &Path, dir: &Path) -> std::io::Result<Upload> {
        let mut reader = std::fs::File::open(source)?;
        let mut file = spool_file(dir)?;
        let mut hashed = HashingWriter { inner: &mut file, hasher: Sha256::new() };
        std::io::copy(&mut reader, &mut hashed)?;
        let sha256 = hex(&hashed.hasher.finalize());
        Ok(Upload { file, sha256 })
    }
}

/// A temporary file in `dir` under a name the server's start-up sweep removes if the process dies before it
/// is kept (see lib.rs).
fn spool_file(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(".upload.tmp-").tempfile_in(dir)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A source video a request names: a finished video of this server, or an uploaded file.
pub enum VideoReference {
    Id(String),
    Upload(Upload),
}

/// An image a request starts from (OpenAI's `input_reference`): an uploaded file, or `{"image_url": ...}` /
/// `{"file_id": ...}` / `{"video_id": ..., "frame": n}` (JSON, or `name[image_url]` ... in multipart as the
/// `openai` SDK flattens it).
pub enum ImageReference {
    Upload(Upload),
    Url(String),
    /// A frame of a finished video of this server (`frame` 0-based; `None`: its last), to go on from it.
    VideoFrame {
        video_id: String,
        frame: Option<u64>,
    },
    /// A file of OpenAI's Files API, which this server has not: named only to be refused clearly.
    FileId,
}

impl Fields {
    /// Reads a JSON or multipart body within `limits`. A JSON body may be as large as the uploads a route
    /// takes (an image as a `data:` URL), else `fields_bytes`.
    pub async fn from_request(request: Request<Body>, limits: &BodyLimits) -> Result<Self, ApiError> {
        let content_type =
            request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        // Media types are case-insensitive (RFC 9110 §8.3.1); their parameters (the boundary) are not.
        let media_type = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match media_type.as_str() {
            "multipart/form-data" => {
                let limit = limits.whole();
                refuse_declared(declared, limit)?;
                Self::from_multipart(request, &content_type, limits).await
            }
            "application/json" | "" => {
                let limit = limits.whole();
                refuse_declared(declared, limit)?;
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                let bytes =
                    axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| too_large(limit as u64))?;
                match serde_json::from_slice(&bytes) {
                    Ok(Value::Object(values)) => Ok(Fields { values, files: HashMap::new() }),
                    Ok(_) => {
                        Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "the body must be a JSON object"))
                    }
                    Err(e) => Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_json",
                        format!("the body is not valid JSON: {e}"),
                    )),
                }
            }
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Type {content_type:?}: expected application/json or multipart/form-data"),
            )),
        }
    }

    async fn from_multipart(request: Request<Body>, content_type: &str, limits: &BodyLimits) -> Result<Self, ApiError> {
        let invalid = |reason: String| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_multipart",
                format!("cannot read the multipart form: {reason}"),
            )
        };
        let boundary = multer::parse_boundary(content_type).map_err(|e| invalid(e.to_string()))?;
        let whole = limits.whole();
        let constraints = multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(whole));
        let stream = request.into_body().into_data_stream();
        let mut multipart = multer::Multipart::with_constraints(stream, boundary, constraints);
        let over = |e: &multer::Error| {
            matches!(e, multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. })
        };
        let (mut values, mut files) = (Map::new(), HashMap::new());
        let mut text_bytes = 0usize;
        loop {
            let mut field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) if over(&e) => return Err(too_large(whole)),
                Err(e) => return Err(invalid(e.to_string())),
            };
            let name = field.name().unwrap_or_default().to_string();
            let read_error = |e: multer::Error| {
                if over(&e) {
                    too_large(whole)
                } else {
                    ApiError::invalid("invalid_multipart", &name, format!("{name}: {e}"))
                }
            };
            if field.file_name().is_some() {
                let Some((_, dir)) = &limits.uploads else {
                    return Err(ApiError::invalid(
                        "unsupported_parameter",
                        &name,
                        format!("{name}: no file is expected here"),
                    ));
                };
                let upload = spool(&mut field, dir, &name).await?;
                files.insert(name, upload);
            } else {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(read_error)? {
                    text_bytes += chunk.len();
                    if text_bytes > limits.fields_bytes {
                        let limit = limits.fields_bytes;
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "request_too_large",
                            format!("the form's text fields exceed {limit} bytes together (files are counted apart)"),
                        ));
                    }
                    text.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(text).map_err(|_| {
                    ApiError::invalid("invalid_multipart", &name, format!("{name}: the text is not valid UTF-8"))
                })?;
                values.insert(name, Value::String(text));
            }
        }
        Ok(Fields { values, files })
    }

    /// A text field; `null` counts as absent.
    pub fn text(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => {
                Err(ApiError::invalid("invalid_type", name, format!("{name} must be a string, got {other}")))
            }
        }
    }

    /// A JSON value: as sent in a JSON body, or as JSON text in a multipart field.
    pub fn json(&mut self, name: &str) -> Result<Option<Value>, ApiError> {
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => serde_json::from_str(&text).map(Some).map_err(|e| {
                ApiError::invalid("invalid_type", name, format!("{name} must be JSON in a multipart field: {e}"))
            }),
            Some(value) => Ok(Some(value)),
        }
    }

    /// A source video given as `{"id": ...}` (JSON), `name[id]` (multipart, as the `openai` SDK flattens
    /// it) or an uploaded file.
    pub fn video_reference(&mut self, name: &str) -> Result<Option<VideoReference>, ApiError> {
        if let Some(upload) = self.files.remove(name) {
            return Ok(Some(VideoReference::Upload(upload)));
        }
        if let Some(id) = self.text(&format!("{name}[id]"))? {
            return Ok(Some(VideoReference::Id(id)));
        }
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(mut reference)) => match (reference.remove("id"), reference.keys().next()) {
                (Some(Value::String(id)), None) => Ok(Some(VideoReference::Id(id))),
                _ => Err(ApiError::invalid(
                    "invalid_video",
                    name,
                    format!("{name} must be {{\"id\": \"video_...\"}} or an uploaded file"),
                )),
            },
            Some(other) => Err(ApiError::invalid(
                "invalid_video",
                name,
                format!("{name} must be {{\"id\": \"video_...\"}} or an uploaded file, got {other}"),
            )),
        }
    }

    /// An image reference, see [`ImageReference`].
    pub fn image_reference(&mut self, name: &str) -> Result<Option<ImageReference>, ApiError> {
        if let Some(upload) = self.files.remove(name) {
            return Ok(Some(ImageReference::Upload(upload)));
        }
        if let Some(url) = self.text(&format!("{name}[image_url]"))? {
            return Ok(Some(ImageReference::Url(url)));
        }
        if self.text(&format!("{name}[file_id]"))?.is_some() {
            return Ok(Some(ImageReference::FileId));
        }
        if let Some(video_id) = self.text(&format!("{name}[video_id]"))? {
            let frame = self.integer(&format!("{name}[frame]"))?;
            return Ok(Some(ImageReference::VideoFrame { video_id, frame }));
        }
        let expected = format!(
            "{name} must be an uploaded image, {{\"image_url\": \"data:...\"}}, {{\"video_id\": ..., \"frame\": n}} or \
             {{\"file_id\": ...}}"
        );
        let invalid = |got: String| ApiError::invalid("invalid_image", name, format!("{expected}, got {got}"));
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(reference)) => {
                let keys: Vec<&str> = reference.keys().map(String::as_str).collect();
                match (keys.as_slice(), reference.get("image_url"), reference.get("video_id")) {
                    (["image_url"], Some(Value::String(url)), _) => Ok(Some(ImageReference::Url(url.clone()))),
                    (["file_id"], ..) if reference["file_id"].is_string() => Ok(Some(ImageReference::FileId)),
                    (["video_id"] | ["frame", "video_id"], _, Some(Value::String(video_id))) => {
                        let frame = match reference.get("frame") {
                            None | Some(Value::Null) => None,
                            Some(frame) => Some(frame.as_u64().ok_or_else(|| invalid(format!("frame {frame}")))?),
                        };
                        Ok(Some(ImageReference::VideoFrame { video_id: video_id.clone(), frame }))
                    }
                    _ => Err(invalid(Value::Object(reference.clone()).to_string())),
                }
            }
            Some(other) => Err(invalid(other.to_string())),
        }
    }

    /// A field that may be text or a JSON number (OpenAI's `seconds` is the string "4"; a hand-written
    /// client may well send 4), as text.
    pub fn text_or_number(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.values.remove(name) {
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => {
                self.values.insert(name.to_string(), other);
                self.text(name)
            }
            None => Ok(None),
        }
    }

    /// A finite number, given as a JSON number or as text (multipart).
    pub fn number(&mut self, name: &str) -> Result<Option<f64>, ApiError> {
        let bad = |shown: String| {
            ApiError::invalid("invalid_type", name, format!("{name} must be a finite number, got {shown}"))
        };
        let value = match self.values.remove(name) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Number(n)) => n.as_f64().ok_or_else(|| bad(n.to_string()))?,
            Some(Value::String(s)) => s.trim().parse::<f64>().map_err(|_| bad(format!("{s:?}")))?,
            Some(other) => return Err(bad(other.to_string())),
        };
        if value.is_finite() {
            Ok(Some(value))
        } else {
            Err(bad(value.to_string()))
        }
    }

    /// A list of at most `max` finite numbers: a JSON array, or text with commas between them (multipart).
    pub fn numbers(&mut self, name: &str, max: usize) -> Result<Option<Vec<f64>>, ApiError> {
        let bad = |shown: String| {
            let message = format!("{name} must be a list of at most {max} finite numbers, got {shown}");
            ApiError::invalid("invalid_type", name, message)
        };
        let values: Vec<f64> =
            match self.values.remove(name) {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::Array(items)) if items.len() <= max => items
                    .iter()
                    .map(Value::as_f64)
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(Value::Array(items.clone()).to_string()))?,
                Some(Value::String(text)) if text.split(',').count() <= max => text
                    .split(',')
                    .map(|part| part.trim().parse::<f64>().ok())
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad(format!("{text:?}")))?,
                Some(other) => return Err(bad(other.to_string())),
            };
        match values.iter().find(|v| !v.is_finite()) {
            Some(v) => Err(bad(v.to_string())),
            None => Ok(Some(values)),
        }
    }

    /// A whole number from 0 to `u64::MAX`, exact: it never passes through f64, whose 53-bit mantissa would
    /// round a seed like 9007199254740993. `7.0` and `1e3` are taken where f64 holds them exactly.
    pub fn integer(&mut self, name: &str) -> Result<Option<u64>, ApiError> {
        let bad = |shown: String| {
            let message = format!("{name} must be a whole number from 0 to {}, got {shown}", u64::MAX);
            ApiError::invalid("invalid_type", name, message)
        };
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                n.as_u64().or_else(|| exact_whole(n.as_f64()?)).map(Some).ok_or_else(|| bad(n.to_string()))
            }
            Some(Value::String(s)) => {
                let text = s.trim();
                text.parse::<u64>()
                    .ok()
                    .or_else(|| exact_whole(text.parse().ok()?))
                    .map(Some)
                    .ok_or_else(|| bad(format!("{s:?}")))
            }
            Some(other) => Err(bad(other.to_string())),
        }
    }

    /// Refuses whatever no one read.
    pub fn finish(self) -> Result<(), ApiError> {
        if let Some(name) = self.files.keys().next() {
            return Err(ApiError::invalid("unsupported_parameter", name, format!("{name}: no file is expected here")));
        }
        match self.values.keys().next() {
            Some(name) => Err(ApiError::invalid("unknown_parameter", name, format!("unknown parameter {name:?}"))),
            None => Ok(()),
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!("the request body exceeds this route's limit of {limit} bytes ({})", human_bytes(limit)),
    )
}

/// `value` as a whole number, if it is one that f64 holds exactly (up to 2^53).
fn exact_whole(value: f64) -> Option<u64> {
    (value.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&value)).then_some(value as u64)
}

/// Refuses at once a body whose declared length is over the limit, before reading any of it.
fn refuse_declared(declared: Option<u64>, limit: u64) -> Result<(), ApiError> {
    match declared {
        Some(length) if length > limit => Err(too_large(limit)),
        _ => Ok(()),
    }
}

/// `268435456` as `256 MiB`, for messages.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["bytes", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{} {}", (value * 10.0).round() / 10.0, UNITS[unit])
    }
}

/// Streams a file part into a temporary file in `dir`, hashing it on the way. A full disk is 507, so a
/// client retries later instead of giving up on a request that was fine.
async fn spool(field: &mut multer::Field<'_>, dir: &Path, name: &str) -> Result<Upload, ApiError> {
    let store_error = |e: std::io::Error| crate::error::storage_error(e, "store the upload");
    let file = spool_file(dir).map_err(store_error)?;
    let mut writer = tokio::fs::File::from_std(file.reopen().map_err(store_error)?);
    let mut hasher = Sha256::new();
    loop {
        let chunk = match field.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(multer::Error::StreamSizeExceeded { limit } | multer::Error::FieldSizeExceeded { limit, .. }) => {
                return Err(too_large(limit))
            }
            Err(e) => return Err(ApiError::invalid("invalid_multipart", name, format!("{name}: {e}"))),
        };
        hasher.update(&chunk);
        writer.write_all(&chunk).await.map_err(store_error)?;
    }
    writer.flush().await.map_err(store_error)?;
    let sha256 = hex(&hasher.finalize());
    Ok(Upload { file, sha256 })
}

pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
