//! Request fields from a JSON object or a multipart form, read the same way. The `openai` SDK sends
//! `videos.create` as multipart even without a file, so every number may arrive as text; every
//! field is checked by name, and a field nobody reads is refused rather than silently ignored.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart};
use axum::http::{header, Request, StatusCode};
use serde_json::{Map, Value};

use crate::error::ApiError;

pub struct Fields {
    values: Map<String, Value>,
    /// Multipart parts that came as files, by field name.
    files: HashMap<String, Bytes>,
}

/// A source video a request names: a finished video of this server, or an uploaded file.
pub enum VideoReference {
    Id(String),
    Upload(Bytes),
}

/// An image a request starts from (OpenAI's `input_reference`): an uploaded file, or `{"image_url": ...}` /
/// `{"file_id": ...}` (JSON, or `name[image_url]` in multipart as the `openai` SDK flattens it).
pub enum ImageReference {
    Upload(Bytes),
    Url(String),
    /// A file of OpenAI's Files API, which this server has not: named only to be refused clearly.
    FileId,
}

impl Fields {
    /// Reads a JSON or multipart body of at most `limit` bytes.
    pub async fn from_request(request: Request<Body>, limit: usize) -> Result<Self, ApiError> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if content_type.starts_with("multipart/form-data") {
            Self::from_multipart(request, limit).await
        } else if content_type.starts_with("application/json") || content_type.is_empty() {
            let bytes = axum::body::to_bytes(request.into_body(), limit).await.map_err(|_| too_large(limit))?;
            match serde_json::from_slice(&bytes) {
                Ok(Value::Object(values)) => Ok(Fields { values, files: HashMap::new() }),
                Ok(_) => Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "the body must be a JSON object")),
                Err(e) => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the body is not valid JSON: {e}"),
                )),
            }
        } else {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Type {content_type:?}: expected application/json or multipart/form-data"),
            ))
        }
    }

    async fn from_multipart(request: Request<Body>, limit: usize) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        let body = Body::new(http_body_util::Limited::new(body, limit));
        let mut multipart = Multipart::from_request(Request::from_parts(parts, body), &()).await.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", format!("cannot read the multipart form: {e}"))
        })?;
        let (mut values, mut files) = (Map::new(), HashMap::new());
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large(limit)),
                Err(e) => {
                    let message = format!("cannot read the multipart form: {}", e.body_text());
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", message));
                }
            };
            let name = field.name().unwrap_or_default().to_string();
            let read_error = |e: axum::extract::multipart::MultipartError| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    too_large(limit)
                } else {
                    ApiError::invalid("invalid_multipart", &name, format!("{name}: {}", e.body_text()))
                }
            };
            if field.file_name().is_some() {
                let bytes = field.bytes().await.map_err(read_error)?;
                files.insert(name, bytes);
            } else {
                let text = field.text().await.map_err(read_error)?;
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

    /// A source video given as `{"id": ...}` (JSON), `name[id]` (multipart, as the `openai` SDK flattens
    /// it) or an uploaded file.
    pub fn video_reference(&mut self, name: &str) -> Result<Option<VideoReference>, ApiError> {
        if let Some(bytes) = self.files.remove(name) {
            return Ok(Some(VideoReference::Upload(bytes)));
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
        if let Some(bytes) = self.files.remove(name) {
            return Ok(Some(ImageReference::Upload(bytes)));
        }
        if let Some(url) = self.text(&format!("{name}[image_url]"))? {
            return Ok(Some(ImageReference::Url(url)));
        }
        if self.text(&format!("{name}[file_id]"))?.is_some() {
            return Ok(Some(ImageReference::FileId));
        }
        let expected =
            format!("{name} must be an uploaded image, {{\"image_url\": \"data:...\"}} or {{\"file_id\": ...}}");
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(mut reference)) if reference.len() == 1 => {
                match (reference.remove("image_url"), reference.remove("file_id")) {
                    (Some(Value::String(url)), _) => Ok(Some(ImageReference::Url(url))),
                    (_, Some(Value::String(_))) => Ok(Some(ImageReference::FileId)),
                    _ => Err(ApiError::invalid("invalid_image", name, expected)),
                }
            }
            Some(other) => Err(ApiError::invalid("invalid_image", name, format!("{expected}, got {other}"))),
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

    /// A number, given as a JSON number or as text (multipart).
    pub fn number(&mut self, name: &str) -> Result<Option<f64>, ApiError> {
        let bad =
            |shown: String| ApiError::invalid("invalid_type", name, format!("{name} must be a number, got {shown}"));
        match self.values.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or_else(|| bad(n.to_string())),
            Some(Value::String(s)) => s.trim().parse::<f64>().map(Some).map_err(|_| bad(format!("{s:?}"))),
            Some(other) => Err(bad(other.to_string())),
        }
    }

    /// A whole number ≥ 0.
    pub fn integer(&mut self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.number(name)? {
            Some(n) if n >= 0.0 && n.fract() == 0.0 && n < 2f64.powi(64) => Ok(Some(n as u64)),
            Some(n) => {
                Err(ApiError::invalid("invalid_type", name, format!("{name} must be a whole number ≥ 0, got {n}")))
            }
            None => Ok(None),
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

fn too_large(limit: usize) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", format!("the request body exceeds {limit} bytes"))
}
