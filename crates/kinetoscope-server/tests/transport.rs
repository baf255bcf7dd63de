//! The server's connections under slow, unfinished and idle clients, over raw loopback sockets: each
//! timeout closes what it should, the connection cap makes newcomers wait instead of exhausting the
//! process, and a shutdown ends in bounded time whatever is still connected.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kinetoscope_server::config::ConnectionLimits;
use kinetoscope_server::Config;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{Running, KEY};

/// How long past a timeout a connection may stay open before the test fails: generous, for a loaded machine.
const SLACK: Duration = Duration::from_secs(3);

fn config(data_dir: &Path, connections: ConnectionLimits) -> Config {
    Config { connections, ..common::config(data_dir) }
}

/// Limits long enough not to interfere, for a test to shorten the one it is about.
fn patient() -> ConnectionLimits {
    ConnectionLimits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        max_connections: 64,
        drain_timeout: Duration::from_secs(30),
    }
}

async fn connect(server: &Running) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap()
}

/// Everything the server sends until it closes the connection, and when it closed; panics if it is still
/// open after `within`.
async fn until_closed(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> (String, Instant) {
    let mut received = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received).into_owned();
    assert!(read.is_ok(), "the connection is still open after {within:?}; received {text:?}");
    (text, Instant::now())
}

/// Sends `bytes` one at a time, `every` apart, while waiting for the server to close the connection;
/// answers as `until_closed`.
async fn trickle(stream: &mut TcpStream, bytes: &[u8], every: Duration, within: Duration) -> (String, Instant) {
    let (mut read, mut write) = stream.split();
    let writing = async {
        for byte in bytes {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        closed = until_closed(&mut read, within) => closed,
        () = writing => unreachable!(),
    }
}

/// One whole response (headers and a body of Content-Length bytes), leaving the connection open.
async fn response(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .expect("a Content-Length")
                .parse::<usize>()
                .unwrap();
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed mid-response: {text:?}");
        received.extend_from_slice(&buf[..n]);
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_never_finish_are_cut_off_after_the_header_timeout() {
    let data = tempfile::tempdir().unwrap();
    let header_timeout = Duration::from_millis(500);
    let server = Running::start(config(data.path(), ConnectionLimits { header_timeout, ..patient() })).await;

    let start = Instant::now();
    // Half a request, then nothing.
    let mut half = connect(&server).await;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: loc").await.unwrap();
    // Nothing at all.
    let mut silent = connect(&server).await;
    // A byte every 100 ms: steady progress, but the headers would take 6 s.
    let mut slow = connect(&server).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: ...................\r\n\r\n";
    let within = header_timeout + SLACK;
    let (half, silent, slow) = tokio::join!(
        until_closed(&mut half, within),
        until_closed(&mut silent, within),
        trickle(&mut slow, request, Duration::from_millis(100), within),
    );
    for (what, (received, closed)) in [("half", half), ("silent", silent), ("trickle", slow)] {
        assert_eq!(received, "", "{what}: no response to an incomplete request");
        let after = closed - start;
        assert!(after >= header_timeout.mul_f64(0.8), "{what}: closed too early, after {after:?}");
    }

    // A whole request is still answered.
    let mut whole = connect(&server).await;
    whole.write_all(HEALTHZ).await.unwrap();
    assert!(response(&mut whole).await.starts_with("HTTP/1.1 200"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_gets_408_and_the_connection_closed() {
    let data = tempfile::tempdir().unwrap();
    let body_timeout = Duration::from_millis(800);
    let server = Running::start(config(data.path(), ConnectionLimits { body_timeout, ..patient() })).await;
    let head = format!(
        "POST /v1/videos HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );

    let start = Instant::now();
    // Half the body, then nothing.
    let mut stalled = connect(&server).await;
    stalled.write_all(format!("{head}{{\"prompt\": \"a fox").as_bytes()).await.unwrap();
    // The body a byte every 50 ms: progress throughout, but the whole would take 5 s.
    let mut slow = connect(&server).await;
    slow.write_all(head.as_bytes()).await.unwrap();
    let within = body_timeout + SLACK;
    let (stalled, slow) = tokio::join!(
        until_closed(&mut stalled, within),
        trickle(&mut slow, &[b' '; 100], Duration::from_millis(50), within)
    );
    for (what, (received, closed)) in [("stalled", stalled), ("trickle", slow)] {
        assert!(received.starts_with("HTTP/1.1 408"), "{what}: {received:?}");
        let body: Value = serde_json::from_str(received.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout", "{what}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{what}: {body}");
        let after = closed - start;
        assert!(after >= body_timeout.mul_f64(0.8), "{what}: answered too early, after {after:?}");
    }

    // A body sent in time is read as before.
    let mut prompt = connect(&server).await;
    let body = json!({"prompt": "a fox", "size": "not a size"}).to_string();
    let request = format!(
        "POST /v1/videos HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    prompt.write_all(request.as_bytes()).await.unwrap();
    let answer = response(&mut prompt).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout_not_the_header_one() {
    let data = tempfile::tempdir().unwrap();
    let (header_timeout, idle_timeout) = (Duration::from_millis(300), Duration::from_millis(1500));
    let limits = ConnectionLimits { header_timeout, idle_timeout, ..patient() };
    let server = Running::start(config(data.path(), limits)).await;

    let mut connection = connect(&server).await;
    connection.write_all(HEALTHZ).await.unwrap();
    assert!(response(&mut connection).await.starts_with("HTTP/1.1 200"));
    // Idle for longer than the header timeout, shorter than the idle one: still open, and reused.
    tokio::time::sleep(header_timeout * 2).await;
    connection.write_all(HEALTHZ).await.unwrap();
    assert!(response(&mut connection).await.starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();
    let (received, closed) = until_closed(&mut connection, idle_timeout + SLACK).await;
    assert_eq!(received, "");
    let after = closed - idle_since;
    assert!(after >= idle_timeout.mul_f64(0.8), "closed too early, after {after:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_a_client_waits_for_a_slot_and_is_served() {
    let data = tempfile::tempdir().unwrap();
    let header_timeout = Duration::from_secs(1);
    let limits = ConnectionLimits { header_timeout, max_connections: 3, ..patient() };
    let server = Running::start(config(data.path(), limits)).await;

    // Every slot held by a connection that never finishes its request.
    let mut slowloris = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(&server).await;
        stream.write_all(b"GET /v1/videos HTTP/1.1\r\n").await.unwrap();
        slowloris.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let listed = server.client.get(server.url("/v1/videos")).bearer_auth(KEY).send().await.unwrap();
    let waited = start.elapsed();
    assert_eq!(listed.status(), StatusCode::OK);
    assert_eq!(listed.json::<Value>().await.unwrap()["object"], "list");
    // It was served only once the header timeout freed a slot.
    assert!(waited >= header_timeout.mul_f64(0.7), "served after {waited:?}: the cap let it in at once");
    for stream in &mut slowloris {
        assert_eq!(until_closed(stream, SLACK).await.0, "");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_connection_within_the_drain_timeout() {
    let data = tempfile::tempdir().unwrap();
    let drain_timeout = Duration::from_secs(1);
    let mut config = config(data.path(), ConnectionLimits { drain_timeout, ..patient() });
    config.shutdown_grace = Duration::ZERO;
    let server = Running::start(config).await;
    let client = &server.client;

    // An event stream of a job that runs for seconds: only the shutdown ends it.
    let (_, created) =
        server.post("/v1/videos", json!({"prompt": "a long one", "steps": 100, "size": "128x128"})).await;
    let id = created["id"].as_str().expect("an id").to_string();
    let mut events = client.get(server.url(&format!("/v1/videos/{id}/events"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    events.chunk().await.unwrap().expect("a first event");
    // A kept-alive connection after one request.
    let mut idle = connect(&server).await;
    idle.write_all(HEALTHZ).await.unwrap();
    assert!(response(&mut idle).await.starts_with("HTTP/1.1 200"));
    // Half a request's headers.
    let mut half_head = connect(&server).await;
    half_head.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // A request in flight whose body stalls: only the drain timeout ends it.
    let mut half_body = connect(&server).await;
    let head = format!(
        "POST /v1/videos HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    half_body.write_all(head.as_bytes()).await.unwrap();
    // A request in flight whose body ends during the drain: it is answered.
    let mut finishing = connect(&server).await;
    let body = json!({"prompt": "a fox", "size": "not a size"}).to_string();
    let (first, second) = body.split_at(10);
    let head = format!(
        "POST /v1/videos HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
        body.len()
    );
    finishing.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let start = Instant::now();
    let finish = async {
        tokio::time::sleep(drain_timeout / 4).await;
        finishing.write_all(second.as_bytes()).await.unwrap();
        until_closed(&mut finishing, drain_timeout + SLACK).await.0
    };
    let (stopped, answer) = tokio::join!(tokio::time::timeout(drain_timeout + SLACK * 2, server.stop()), finish);
    assert!(stopped.is_ok(), "the server was still draining after {:?}", start.elapsed());
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    for stream in [&mut idle, &mut half_head, &mut half_body] {
        until_closed(stream, Duration::from_millis(100)).await;
    }
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_millis(100), async {
        while let Ok(Some(chunk)) = events.chunk().await {
            rest.extend_from_slice(&chunk);
        }
    })
    .await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(ended.is_ok(), "the event stream is still open: {rest}");
    assert!(!rest.contains("video.completed"), "the job ended before the shutdown: {rest}");
}
