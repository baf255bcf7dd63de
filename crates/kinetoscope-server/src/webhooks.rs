//! Webhook delivery: `video.completed` and `video.failed` events, signed as
//! [Standard Webhooks](https://www.standardwebhooks.com/) and posted with retries.
//!
//! Events wait in the job store's outbox, written in the same transaction as the job's end, so none is lost
//! to a restart; the API nodes' outbox tasks (`outbox`) claim them there, so each is sent by one node, and
//! call [`Webhooks::attempt`] for each.
//!
//! Each event is OpenAI's event object (`{"id": "evt_…", "object": "event", "created_at", "type",
//! "data": {"id": <video id>}}`), the shape the `openai` SDK's `client.webhooks.unwrap` parses. The
//! `webhook-id` header is the event id and stays the same across retries, so a receiver can drop
//! duplicates; `webhook-timestamp` is the time of each attempt, so a late retry still passes the
//! receiver's replay window. The signature is `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))
//! with the key decoded from a `whsec_<base64>` secret.
//!
//! Where requests may go: every target, configured or given with a request, must be an http or https
//! URL whose host (as written in the URL, after the URL parser's normalisation: lower case, canonical
//! IP literals) is listed in `allowed_hosts`, and whose port matches when the entry names one. Host
//! names are resolved by the system resolver when sending; the addresses they resolve to are not
//! checked, because the operator vouched for the name. Redirects are not followed and proxies from
//! the environment are ignored, so a request only ever connects to a listed host.
//!
//! Secrets and URL paths (which often carry tokens) stay out of logs, errors and `Debug` output:
//! targets are shown by their origin only.

use std::fmt;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, STANDARD_PAD_INDIFFERENT};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::Url;
use sha2::Sha256;

use crate::store::PendingEvent;

const SECRET_PREFIX: &str = "whsec_";
/// Standard Webhooks asks for a random key of 24 to 64 bytes.
const MIN_KEY_BYTES: usize = 24;
const MAX_KEY_BYTES: usize = 64;
/// Upper bound of the delay between two attempts, before jitter.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Webhook settings, checked by [`Webhooks::new`].
#[derive(Clone)]
pub struct WebhookConfig {
    /// Receivers of every event.
    pub urls: Vec<String>,
    /// `whsec_<base64 key>`; without it no webhook is sent.
    pub secret: Option<String>,
    /// Host names or IP literals, optionally with `:port` (IPv6 as `[::1]:8080`), that targets may use.
    pub allowed_hosts: Vec<String>,
    /// Attempts per target, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles with each further attempt.
    pub initial_backoff: Duration,
    /// Limit on one attempt, connecting and the receiver's response included.
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            secret: None,
            allowed_hosts: Vec::new(),
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("urls", &self.urls.iter().map(|url| origin_of(url)).collect::<Vec<_>>())
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("allowed_hosts", &self.allowed_hosts)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What happened to a video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Completed,
    Failed,
}

impl EventKind {
    /// The event's `type`, as OpenAI names it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Completed => "video.completed",
            EventKind::Failed => "video.failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [EventKind::Completed, EventKind::Failed].into_iter().find(|kind| kind.as_str() == text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook secret must start with `{SECRET_PREFIX}` (expected `{SECRET_PREFIX}<base64 key>`)")]
    SecretPrefix,
    #[error("webhook secret: the part after `{SECRET_PREFIX}` is not valid standard base64")]
    SecretEncoding,
    #[error(
        "webhook secret key is {len} bytes; expected {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes after base64 decoding"
    )]
    SecretLength { len: usize },
    #[error("webhook secret is required when webhook urls are configured")]
    SecretMissing,
    #[error("webhooks are disabled on this server (no webhook secret is configured)")]
    Disabled,
    #[error("webhook URL is not a valid absolute URL: {reason}")]
    InvalidUrl { reason: String },
    #[error("webhook URL scheme `{scheme}` is not supported; expected http or https")]
    UnsupportedScheme { scheme: String },
    #[error("webhook URL {origin}: host is not in the server's webhook allowed_hosts")]
    HostNotAllowed { origin: String },
    #[error("webhook urls[{index}]: {source}")]
    ConfiguredUrl { index: usize, source: Box<WebhookError> },
    #[error(
        "webhook allowed_hosts entry `{entry}`: {reason}; expected a host name or IP address, optionally with :port"
    )]
    InvalidAllowedHost { entry: String, reason: &'static str },
    #[error("webhook {field} must be {expected}")]
    InvalidSetting { field: &'static str, expected: &'static str },
    #[error("building the webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The checked webhook settings and the client that sends; clones share them.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    allowed_hosts: Vec<AllowedHost>,
    urls: Vec<Url>,
    /// `None` when no secret is configured: webhooks are off.
    sender: Option<Sender>,
}

/// What became of an attempt at an event: every target that has taken it by now, and when to try the others
/// again (`None`: never; all took it, or the attempts ran out).
#[derive(Debug, Clone, PartialEq)]
pub struct Attempted {
    pub delivered: Vec<String>,
    pub retry_in: Option<Duration>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhooks")
            .field("enabled", &self.inner.sender.is_some())
            .field("urls", &self.inner.urls.iter().map(|url| url.origin().ascii_serialization()).collect::<Vec<_>>())
            .field("allowed_hosts", &self.inner.allowed_hosts)
            .finish()
    }
}

impl Webhooks {
    /// Checks the configuration.
    pub fn new(config: WebhookConfig) -> Result<Self, WebhookError> {
        if config.max_attempts == 0 {
            return Err(WebhookError::InvalidSetting { field: "max_attempts", expected: "at least 1" });
        }
        if config.timeout.is_zero() {
            return Err(WebhookError::InvalidSetting { field: "timeout", expected: "greater than zero" });
        }
        let key = config.secret.as_deref().map(SigningKey::parse).transpose()?;
        let allowed_hosts =
            config.allowed_hosts.iter().map(|entry| AllowedHost::parse(entry)).collect::<Result<_, _>>()?;
        let mut inner = Inner { allowed_hosts, urls: Vec::new(), sender: None };
        for (index, url) in config.urls.iter().enumerate() {
            let url = inner
                .check_url(url)
                .map_err(|source| WebhookError::ConfiguredUrl { index, source: Box::new(source) })?;
            inner.urls.push(url);
        }
        let Some(key) = key else {
            if !inner.urls.is_empty() {
                return Err(WebhookError::SecretMissing);
            }
            return Ok(Self { inner: Arc::new(inner) });
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout)
            .user_agent(concat!("kinetoscope/", env!("CARGO_PKG_VERSION")))
            .build()?;
        inner.sender = Some(Sender {
            client,
            key,
            max_attempts: config.max_attempts,
            initial_backoff: config.initial_backoff,
            timeout: config.timeout,
        });
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Whether `url` may receive webhooks: webhooks are enabled, and `url` is http or https on an
    /// allowed host. The API calls this on a request's `webhook_url` before accepting the request.
    pub fn check_target(&self, url: &str) -> Result<(), WebhookError> {
        if self.inner.sender.is_none() {
            return Err(WebhookError::Disabled);
        }
        self.inner.check_url(url).map(drop)
    }

    pub fn enabled(&self) -> bool {
        self.inner.sender.is_some()
    }

    /// Makes one attempt at `event` to each target that hasn't taken it yet (the configured receivers, and the
    /// job's own `webhook_url` unless [`Webhooks::check_target`] refuses it now), all at once. With webhooks off
    /// the event is dropped.
    pub async fn attempt(&self, event: &PendingEvent) -> Attempted {
        let done = |delivered| Attempted { delivered, retry_in: None };
        let Some(sender) = &self.inner.sender else { return done(event.delivered.clone()) };
        let mut targets = self.inner.urls.clone();
        if let Some(target) = &event.target {
            match self.inner.check_url(target) {
                Ok(url) if !targets.contains(&url) => targets.push(url),
                Ok(_) => {}
                Err(err) => tracing::warn!(video_id = event.video_id, "skipping the request's webhook target: {err}"),
            }
        }
        targets.retain(|target| !event.delivered.contains(&target.to_string()));
        let body = Event::body(event);
        let attempt = event.attempts as u32 + 1;
        let sent =
            futures_util::future::join_all(targets.iter().map(|target| sender.attempt(&event.id, &body, target)));
        let mut delivered = event.delivered.clone();
        let mut failed = 0;
        for (target, outcome) in targets.iter().zip(sent.await) {
            let origin = target.origin().ascii_serialization();
            match outcome {
                Ok(()) => {
                    tracing::debug!(event_id = event.id, event_type = event.kind.as_str(), target = %origin, attempt, "webhook delivered");
                    delivered.push(target.to_string());
                }
                Err(failure) if attempt >= sender.max_attempts => {
                    tracing::error!(event_id = event.id, event_type = event.kind.as_str(), target = %origin, attempts = attempt, "webhook not delivered, giving up: {failure}");
                }
                Err(failure) => {
                    failed += 1;
                    tracing::warn!(event_id = event.id, event_type = event.kind.as_str(), target = %origin, attempt, "webhook delivery failed: {failure}");
                }
            }
        }
        match failed {
            0 => done(delivered),
            _ => Attempted { delivered, retry_in: Some(backoff(sender.initial_backoff, attempt)) },
        }
    }

    /// How long a node may take over one attempt at an event (every target at once) before another node may
    /// claim it.
    pub fn attempt_time(&self) -> Duration {
        self.inner.sender.as_ref().map_or(Duration::ZERO, |sender| sender.timeout) + Duration::from_secs(5)
    }
}

impl Inner {
    fn check_url(&self, url: &str) -> Result<Url, WebhookError> {
        let url = Url::parse(url).map_err(|err| WebhookError::InvalidUrl { reason: err.to_string() })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(WebhookError::UnsupportedScheme { scheme: url.scheme().to_string() });
        }
        if !self.allowed_hosts.iter().any(|allowed| allowed.admits(&url)) {
            return Err(WebhookError::HostNotAllowed { origin: url.origin().ascii_serialization() });
        }
        Ok(url)
    }
}

/// One `allowed_hosts` entry: a host in the URL parser's normal form, and the port if one is named.
#[derive(Debug, PartialEq)]
struct AllowedHost {
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    fn parse(entry: &str) -> Result<Self, WebhookError> {
        let invalid = |reason| WebhookError::InvalidAllowedHost { entry: entry.to_string(), reason };
        if entry.is_empty() {
            return Err(invalid("it is empty"));
        }
        if entry.contains(['/', '@', '?', '#', '*']) || entry.contains(char::is_whitespace) {
            return Err(invalid("it must be a bare host, without scheme, path, credentials or wildcards"));
        }
        let (host, port) = if entry.parse::<Ipv6Addr>().is_ok() {
            (format!("[{entry}]"), None)
        } else {
            let split = match entry.rfind(':') {
                Some(colon) if !entry[colon..].contains(']') => Some(colon),
                _ => None,
            };
            match split {
                Some(colon) => {
                    let port = entry[colon + 1..]
                        .parse::<u16>()
                        .map_err(|_| invalid("its port is not a number from 0 to 65535"))?;
                    (entry[..colon].to_string(), Some(port))
                }
                None => (entry.to_string(), None),
            }
        };
        // Normalise the host exactly as target URLs are normalised, so that the comparison is exact.
        let url = Url::parse(&format!("http://{host}/")).map_err(|_| invalid("it is not a valid host"))?;
        let host = url.host_str().ok_or_else(|| invalid("it is not a valid host"))?.to_string();
        Ok(Self { host, port })
    }

    fn admits(&self, url: &Url) -> bool {
        url.host_str() == Some(self.host.as_str())
            && self.port.is_none_or(|port| url.port_or_known_default() == Some(port))
    }
}

/// The HMAC key decoded from a `whsec_` secret.
struct SigningKey(Vec<u8>);

impl SigningKey {
    fn parse(secret: &str) -> Result<Self, WebhookError> {
        let encoded = secret.trim().strip_prefix(SECRET_PREFIX).ok_or(WebhookError::SecretPrefix)?;
        let key = STANDARD_PAD_INDIFFERENT.decode(encoded).map_err(|_| WebhookError::SecretEncoding)?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(WebhookError::SecretLength { len: key.len() });
        }
        Ok(Self(key))
    }

    /// The `webhook-signature` header value.
    fn sign(&self, id: &str, timestamp: u64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// An event's body: OpenAI's event object, the exact bytes that get signed.
struct Event;

impl Event {
    fn body(event: &PendingEvent) -> String {
        serde_json::json!({
            "id": event.id,
            "object": "event",
            "created_at": event.created_at,
            "type": event.kind.as_str(),
            "data": { "id": event.video_id },
        })
        .to_string()
    }
}

/// Sends events: owns the HTTP client and the key.
struct Sender {
    client: reqwest::Client,
    key: SigningKey,
    max_attempts: u32,
    initial_backoff: Duration,
    timeout: Duration,
}

impl Sender {
    async fn attempt(&self, id: &str, body: &str, target: &Url) -> Result<(), AttemptFailure> {
        let timestamp = unix_now();
        let response = self
            .client
            .post(target.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", self.key.sign(id, timestamp, body))
            .body(body.to_string())
            .send()
            .await
            .map_err(|err| AttemptFailure::Transport(err.without_url()))?;
        match response.status() {
            status if status.is_success() => Ok(()),
            status => Err(AttemptFailure::Status(status)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum AttemptFailure {
    #[error("{0}")]
    Transport(reqwest::Error),
    #[error("receiver answered {0}")]
    Status(reqwest::StatusCode),
}

/// Delay after failed attempt `attempt` (1-based): `initial` doubled per attempt, capped, then
/// scaled by a random factor in [0.5, 1] so that receivers coming back up are not hit in lockstep.
fn backoff(initial: Duration, attempt: u32) -> Duration {
    let doubled = initial.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
    doubled.min(MAX_BACKOFF).mul_f64(rand::random_range(0.5..=1.0))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

/// A URL's origin for `Debug` output, or a placeholder: paths and credentials stay out.
fn origin_of(url: &str) -> String {
    Url::parse(url).map_or_else(|_| "<invalid URL>".to_string(), |url| url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed with the Python `standardwebhooks` package (1.1.0):
    /// `Webhook(SECRET).sign(ID, datetime.fromtimestamp(1700000000, timezone.utc), BODY)`.
    const SECRET: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const ID: &str = "evt_0123456789abcdef0123456789abcdef";
    const BODY: &str = r#"{"id":"evt_0123456789abcdef0123456789abcdef","object":"event","created_at":1700000000,"type":"video.completed","data":{"id":"video_123"}}"#;
    const SIGNATURE: &str = "v1,uz49hIUOHGTK2FwkX8lhFlqlUXEkL9sNKUt/rVK+8ds=";

    fn config(allowed_hosts: &[&str]) -> WebhookConfig {
        WebhookConfig {
            secret: Some(SECRET.to_string()),
            allowed_hosts: allowed_hosts.iter().map(|host| host.to_string()).collect(),
            ..WebhookConfig::default()
        }
    }

    #[test]
    fn signature_matches_the_reference_implementation() {
        let key = SigningKey::parse(SECRET).unwrap();
        assert_eq!(key.sign(ID, 1_700_000_000, BODY), SIGNATURE);
        let unpadded = SigningKey::parse(SECRET.trim_end_matches('=')).unwrap();
        assert_eq!(unpadded.sign(ID, 1_700_000_000, BODY), SIGNATURE);
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        let cases = [
            ("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "must start with `whsec_`"),
            ("whsec_AAEC!wQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "not valid standard base64"),
            ("whsec_AAECAwQFBgcICQoL", "is 12 bytes; expected 24 to 64 bytes"),
            ("whsec_", "is 0 bytes"),
        ];
        for (secret, expected) in cases {
            let message = SigningKey::parse(secret).err().unwrap().to_string();
            assert!(message.contains(expected), "{secret}: {message}");
            assert!(!message.contains("AAEC"), "{message}");
        }
    }

    #[test]
    fn debug_output_hides_the_secret_and_url_paths() {
        let mut config = config(&["hooks.example.com"]);
        config.urls = vec!["https://hooks.example.com/services/T0/B0/token".to_string()];
        let debug = format!("{config:?}");
        assert!(!debug.contains("AAEC") && !debug.contains("token"), "{debug}");
        assert!(debug.contains("https://hooks.example.com"), "{debug}");
    }

    #[test]
    fn allowed_host_entries_are_parsed_and_normalised() {
        let parsed = |entry: &str| AllowedHost::parse(entry).unwrap();
        assert_eq!(parsed("Hooks.Example.com"), AllowedHost { host: "hooks.example.com".into(), port: None });
        assert_eq!(parsed("127.0.0.1:8080"), AllowedHost { host: "127.0.0.1".into(), port: Some(8080) });
        assert_eq!(parsed("::1"), AllowedHost { host: "[::1]".into(), port: None });
        assert_eq!(parsed("[0:0::1]:443"), AllowedHost { host: "[::1]".into(), port: Some(443) });
        for bad in ["", "https://example.com", "example.com/path", "*.example.com", "example.com:http", "exa mple.com"]
        {
            let message = AllowedHost::parse(bad).err().unwrap().to_string();
            assert!(message.contains("allowed_hosts entry"), "{bad}: {message}");
        }
    }

    #[tokio::test]
    async fn targets_must_be_http_on_an_allowed_host_and_port() {
        let webhooks = Webhooks::new(config(&["hooks.example.com", "127.0.0.1:9000", "::1"])).unwrap();
        for ok in [
            "https://hooks.example.com/a?b=c",
            "http://HOOKS.example.com:8443/",
            "http://127.0.0.1:9000/hook",
            "http://[::1]:1234/",
        ] {
            assert!(webhooks.check_target(ok).is_ok(), "{ok}");
        }
        let refused = [
            ("ftp://hooks.example.com/", "scheme `ftp` is not supported"),
            ("hooks.example.com/hook", "not a valid absolute URL"),
            ("https://evil.example.com/secret-path", "webhook URL https://evil.example.com: host is not in"),
            ("https://hooks.example.com.evil.com/", "host is not in"),
            ("http://127.0.0.1/hook", "host is not in"),
            ("http://127.0.0.1:9001/hook", "host is not in"),
            ("http://localhost:9000/hook", "host is not in"),
            ("http://hooks.example.com@evil.example.com/", "host is not in"),
        ];
        for (url, expected) in refused {
            let message = webhooks.check_target(url).err().unwrap().to_string();
            assert!(message.contains(expected), "{url}: {message}");
            assert!(!message.contains("secret-path"), "{message}");
        }
    }

    #[tokio::test]
    async fn configuration_is_checked() {
        let mut bad_url = config(&["hooks.example.com"]);
        bad_url.urls = vec!["https://hooks.example.com/".into(), "https://other.example.com/".into()];
        let message = Webhooks::new(bad_url).err().unwrap().to_string();
        assert!(message.starts_with("webhook urls[1]: webhook URL https://other.example.com"), "{message}");

        let no_secret = WebhookConfig {
            urls: vec!["https://hooks.example.com/".into()],
            secret: None,
            ..config(&["hooks.example.com"])
        };
        assert!(matches!(Webhooks::new(no_secret), Err(WebhookError::SecretMissing)));

        let no_attempts = WebhookConfig { max_attempts: 0, ..config(&[]) };
        assert!(Webhooks::new(no_attempts).err().unwrap().to_string().contains("max_attempts must be at least 1"));

        let disabled = Webhooks::new(WebhookConfig::default()).unwrap();
        assert!(matches!(disabled.check_target("https://hooks.example.com/"), Err(WebhookError::Disabled)));
        // With webhooks off an event is done at once, sent nowhere.
        let event = pending(EventKind::Completed, "video_1");
        assert_eq!(disabled.attempt(&event).await, Attempted { delivered: Vec::new(), retry_in: None });
    }

    fn pending(kind: EventKind, video_id: &str) -> PendingEvent {
        PendingEvent {
            id: "evt_0123456789abcdef0123456789abcdef".into(),
            video_id: video_id.into(),
            kind,
            created_at: 1_765_000_000,
            target: None,
            delivered: Vec::new(),
            attempts: 0,
        }
    }

    #[test]
    fn events_have_openai_shape() {
        let event = pending(EventKind::Failed, "video_42");
        let body: serde_json::Value = serde_json::from_str(&Event::body(&event)).unwrap();
        assert_eq!(body["id"], event.id.as_str());
        assert_eq!(body["object"], "event");
        assert_eq!(body["type"], "video.failed");
        assert_eq!(body["data"]["id"], "video_42");
        assert_eq!(body["created_at"], 1_765_000_000);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let initial = Duration::from_millis(100);
        for attempt in 1..=4 {
            let full = initial * 2u32.pow(attempt - 1);
            let delay = backoff(initial, attempt);
            assert!(delay >= full / 2 && delay <= full, "attempt {attempt}: {delay:?}");
        }
        assert!(backoff(initial, 40) <= MAX_BACKOFF);
        assert!(backoff(initial, u32::MAX) >= MAX_BACKOFF / 2);
    }
}
