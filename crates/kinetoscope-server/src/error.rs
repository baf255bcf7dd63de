//! Errors as the OpenAI API returns them: an HTTP status and `{"error": {"message", "type", "param",
//! "code"}}`, where `code` is a stable snake_case string a client can branch on.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// Seconds after which a refused request may be retried (429, 503).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), param: None, retry_after_s: None }
    }

    /// A 400 about one request field.
    pub fn invalid(code: &'static str, param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), ..Self::new(StatusCode::BAD_REQUEST, code, message) }
    }

    pub fn not_found(id: &str) -> Self {
        ApiError {
            param: Some("video_id".into()),
            ..Self::new(StatusCode::NOT_FOUND, "video_not_found", format!("no video with id {id:?}"))
        }
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {what}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "internal error; see the server log")
    }

    /// The disk the server keeps jobs on is too full for this request: worth retrying once space is freed.
    pub fn insufficient_storage(message: impl Into<String>) -> Self {
        ApiError {
            retry_after_s: Some(60),
            ..Self::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", message)
        }
    }

    /// OpenAI's error `type`, derived from the status as its API does.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// An I/O failure while keeping something a request sent: 507 when the disk is full (the client may retry),
/// else an internal error. The message never names a server path.
pub fn storage_error(error: std::io::Error, action: &str) -> ApiError {
    if is_disk_full(&error) {
        ApiError::insufficient_storage(format!("the server's disk is full: cannot {action}; retry later"))
    } else {
        ApiError::internal(format!("cannot {action}: {error}"))
    }
}

/// ENOSPC, and EDQUOT (a quota is a full disk to this process).
pub fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
}

/// The code a failed generation is reported with: the library's own, except that every way the
/// weights can be unusable is one code, as clients handle them alike.
pub fn job_error_code(error: &kinetoscope::Error) -> &'static str {
    match error {
        kinetoscope::Error::Weights { .. } | kinetoscope::Error::MissingFile { .. } => "weights_invalid",
        other => other.code(),
    }
}
