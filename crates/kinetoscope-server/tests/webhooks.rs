//! Webhook delivery against a local receiver: retries until a 2xx, one `webhook-id` across retries,
//! signatures that verify, and redirects that are never followed.

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
    Webhooks::new(WebhookConfig {
        secret: Some(format!("whsec_{}", STANDARD.encode(KEY))),
        allowed_hosts: vec!["127.0.0.1".to_string()],
        max_attempts,
        initial_backoff: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
        ..WebhookConfig::default()
    })
    .unwrap()
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
    webhooks.notify(EventKind::Completed, "video_abc", Some(&url));

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
    let webhooks = webhooks(2);
    webhooks.notify(EventKind::Failed, "video_def", Some(&url));

    for _ in 0..2 {
        let delivery = next(&mut deliveries).await;
        assert_eq!(delivery.path, "/hook");
        assert!(signature_is_valid(&delivery));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(deliveries.try_recv().is_err(), "neither a third attempt nor a followed redirect");
}
