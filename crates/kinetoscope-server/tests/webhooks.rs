//! Webhook delivery from the store's outbox against a local receiver: retries until a 2xx, one `webhook-id`
//! across retries, signatures that verify, redirects that are never followed, and an event pending when the
//! server stops sent after it starts again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use kinetoscope_server::store::{self, JobStore};
use kinetoscope_server::webhooks::{EventKind, WebhookConfig, Webhooks};
use sha2::Sha256;
use tokio::sync::mpsc;

const KEY: [u8; 32] = [7; 32];

struct Delivery {
    path: String,
    headers: HeaderMap,
    body: String,
}

/// A receiver on 127.0.0.1 that answers each request with the next status in `script` (200 once it
/// runs out) and reports every request it gets.
async fn start_receiver(script: Vec<StatusCode>) -> (String, mpsc::UnboundedReceiver<Delivery>) {
    struct Receiver {
        script: Mutex<std::vec::IntoIter<StatusCode>>,
        seen: mpsc::UnboundedSender<Delivery>,
    }
    async fn receive(
        State(receiver): State<Arc<Receiver>>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        receiver.seen.send(Delivery { path: uri.path().to_string(), headers, body }).unwrap();
        match receiver.script.lock().unwrap().next().unwrap_or(StatusCode::OK) {
            StatusCode::TEMPORARY_REDIRECT => Redirect::temporary("/elsewhere").into_response(),
            status => status.into_response(),
        }
    }
    let (seen, deliveries) = mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver { script: Mutex::new(script.into_iter()), seen });
    let app = Router::new().route("/hook", post(receive)).route("/elsewhere", post(receive)).with_state(receiver);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{address}/hook"), deliveries)
}

fn webhooks(max_attempts: u32) -> Webhooks {
    backing_off(max_attempts, Duration::from_millis(20))
}

fn backing_off(max_attempts: u32, initial_backoff: Duration) -> Webhooks {
    Webhooks::new(WebhookConfig {
        secret: Some(format!("whsec_{}", STANDARD.encode(KEY))),
        allowed_hosts: vec!["127.0.0.1".to_string()],
        max_attempts,
        initial_backoff,
        timeout: Duration::from_secs(2),
        ..WebhookConfig::default()
    })
    .unwrap()
}

/// The outbox of a SQLite store in `dir`, sending with `webhooks`; the task stops when dropped.
struct Outbox {
    store: Arc<dyn JobStore>,
    task: tokio::task::JoinHandle<()>,
}

impl Outbox {
    fn start(dir: &std::path::Path, webhooks: Webhooks) -> Outbox {
        let store: Arc<dyn JobStore> = Arc::from(store::open(dir.join("jobs.sqlite").to_str().unwrap()).unwrap());
        let task = tokio::spawn(kinetoscope_server::outbox::run(store.clone(), webhooks, Arc::default()));
        Outbox { store, task }
    }

    fn notify(&self, kind: EventKind, video_id: &str, target: &str) {
        self.store.add_event(kind, video_id, Some(target), 1_765_000_000).unwrap();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn next(deliveries: &mut mpsc::UnboundedReceiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(3), deliveries.recv()).await.expect("a delivery within 3 s").unwrap()
}

fn header<'a>(delivery: &'a Delivery, name: &str) -> &'a str {
    delivery.headers.get(name).unwrap_or_else(|| panic!("missing {name}")).to_str().unwrap()
}

/// Standard Webhooks verification, written out here rather than reusing the server's signer.
fn signature_is_valid(delivery: &Delivery) -> bool {
    let signed =
        format!("{}.{}.{}", header(delivery, "webhook-id"), header(delivery, "webhook-timestamp"), delivery.body);
    let mut mac = Hmac::<Sha256>::new_from_slice(&KEY).unwrap();
    mac.update(signed.as_bytes());
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    header(delivery, "webhook-signature").split(' ').any(|signature| signature.strip_prefix("v1,") == Some(&expected))
}

#[tokio::test]
async fn retries_until_delivered_with_one_id_and_valid_signatures() {
    let (url, mut deliveries) =
        start_receiver(vec![StatusCode::INTERNAL_SERVER_ERROR, StatusCode::INTERNAL_SERVER_ERROR]).await;
    let webhooks = webhooks(5);
    webhooks.check_target(&url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::start(dir.path(), webhooks);
    outbox.notify(EventKind::Completed, "video_abc", &url);

    let attempts = [next(&mut deliveries).await, next(&mut deliveries).await, next(&mut deliveries).await];
    let id = header(&attempts[0], "webhook-id");
    for delivery in &attempts {
        assert_eq!(header(delivery, "webhook-id"), id);
        assert_eq!(delivery.body, attempts[0].body);
        assert_eq!(header(delivery, "content-type"), "application/json");
        assert!(signature_is_valid(delivery));
    }
    let event: serde_json::Value = serde_json::from_str(&attempts[2].body).unwrap();
    assert_eq!(event["id"], id);
    assert_eq!(event["object"], "event");
    assert_eq!(event["type"], "video.completed");
    assert_eq!(event["data"]["id"], "video_abc");

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(deliveries.try_recv().is_err(), "no attempt after a 2xx");
}

#[tokio::test]
async fn redirects_are_not_followed_and_attempts_are_bounded() {
    let (url, mut deliveries) = start_receiver(vec![StatusCode::TEMPORARY_REDIRECT; 10]).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::start(dir.path(), webhooks(2));
    outbox.notify(EventKind::Failed, "video_def", &url);

    for _ in 0..2 {
        let delivery = next(&mut deliveries).await;
        assert_eq!(delivery.path, "/hook");
        assert!(signature_is_valid(&delivery));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(deliveries.try_recv().is_err(), "neither a third attempt nor a followed redirect");
}

/// The receiver is down when the event is first tried; the server stops before the retry. The event waits in the
/// store and is sent, with the same id, once the server is back.
#[tokio::test]
async fn an_event_pending_at_shutdown_is_sent_after_the_restart() {
    let (url, mut deliveries) = start_receiver(vec![StatusCode::SERVICE_UNAVAILABLE]).await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::start(dir.path(), backing_off(5, Duration::from_secs(30)));
    outbox.notify(EventKind::Completed, "video_restart", &url);
    let first = next(&mut deliveries).await;
    // Stopped with the retry 15-30 s away; the claim is released when the attempt is recorded.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(outbox);

    let store = store::open(dir.path().join("jobs.sqlite").to_str().unwrap()).unwrap();
    let waiting = store.due_events(10, Duration::ZERO).unwrap();
    assert!(waiting.is_empty(), "not due before its backoff");
    drop(store);
    // The stored due time holds across the restart; move it to now, as waiting would.
    let db = rusqlite::Connection::open(dir.path().join("jobs.sqlite")).unwrap();
    assert_eq!(db.execute("UPDATE events SET due_ms = 0", []).unwrap(), 1);
    drop(db);
    let _outbox = Outbox::start(dir.path(), webhooks(5));
    let second = next(&mut deliveries).await;
    assert_eq!(header(&second, "webhook-id"), header(&first, "webhook-id"));
    assert_eq!(second.body, first.body);
    assert!(signature_is_valid(&second));
}
