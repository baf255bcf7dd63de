//! `kinetoscope serve` through the binary with debug logging on: a job created with the right key, a request
//! with a wrong one, a webhook delivered to a URL with a token in its path and query. What the server logs must
//! hold none of the secrets it handled: API keys (right or wrong), the webhook secret, the webhook URL's path
//! and query.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{http, receiver, wait_until};

const KEY: &str = "log-test-key-KEYSECRET-0123456789";
const WRONG_KEY: &str = "log-test-key-WRONGSECRET-01234567";
/// `whsec_` and base64 of 32 bytes, as Standard Webhooks secrets are.
const WEBHOOK_SECRET: &str = "whsec_a2luZXRvc2NvcGUtbG9nLXRlc3Qtc2VjcmV0LTMyYnk=";
const PATH_TOKEN: &str = "PATHSECRET7f3a";
const QUERY_TOKEN: &str = "QUERYSECRET91c2";

#[test]
fn the_logs_hold_no_key_secret_or_webhook_url() {
    let dir = tempfile::tempdir().unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan21-tiny-a");
    let (hook_port, received) = receiver();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log_path = dir.path().join("server.log");
    let hook = format!("http://127.0.0.1:{hook_port}/hooks/{PATH_TOKEN}?token={QUERY_TOKEN}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
        .args(["serve", "--model", model.to_str().unwrap(), "--device", "cpu"])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--default-size", "48x32", "--default-seconds", "1", "--default-fps", "8", "--default-steps", "2"])
        .args(["--webhook-url", &hook, "--webhook-allowed-host", &format!("127.0.0.1:{hook_port}")])
        .env("KINETOSCOPE_API_KEYS", KEY)
        .env("KINETOSCOPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("KINETOSCOPE_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();

    let ready = || TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/readyz", "", "").0 == 200;
    wait_until("the server to be ready", ready);
    let (status, created) = http(port, "POST", "/v1/videos", KEY, r#"{"prompt": "a red fox", "seed": 1}"#);
    assert_eq!(status, 200, "{created}");
    let id = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(http(port, "GET", "/v1/videos", WRONG_KEY, "").0, 401);
    wait_until("the job to complete", || {
        http(port, "GET", &format!("/v1/videos/{id}"), KEY, "").1.contains("completed")
    });
    wait_until("the webhook", || !received.lock().unwrap().is_empty());
    server.kill().unwrap();
    server.wait().unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("webhook delivered") && log.contains(&id), "debug logging was on:\n{log}");
    let base64_secret = WEBHOOK_SECRET.strip_prefix("whsec_").unwrap();
    for secret in [KEY, WRONG_KEY, WEBHOOK_SECRET, base64_secret, PATH_TOKEN, QUERY_TOKEN] {
        assert!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
    }
}
