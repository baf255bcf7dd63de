//! What the tests that run `kinetoscope serve` and `kinetoscope worker` as processes share: the processes, a bare
//! HTTP client, a webhook receiver, and waiting.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The folder of one of the tiny test models.
pub fn tiny(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny").join(name).display().to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// One process of a deployment (`kinetoscope serve`, `kinetoscope worker`), its log appended to a file,
/// restartable; killed with SIGKILL when dropped.
pub struct Node {
    args: Vec<String>,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Child,
}

impl Node {
    pub fn start(args: Vec<String>, log: PathBuf, env: &[(&str, &str)]) -> Node {
        let env: Vec<_> = env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        let child = Self::spawn(&args, &log, &env);
        Node { args, log, env, child }
    }

    fn spawn(args: &[String], log: &Path, env: &[(String, String)]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
            .args(args)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// SIGKILL: no shutdown, no lease given back, nothing flushed.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.args, &self.log, &self.env);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of every `.log` file in `dir`, for a failing assertion's message.
pub fn log_tails(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            text +=
                &format!("--- {:?}\n{}\n", entry.file_name(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    text
}

/// One HTTP/1.1 exchange over a fresh connection; the status and the body (status 0: no answer).
pub fn http(port: u16, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    let answer = request(port, method, path, key, &[], body);
    (answer.status, String::from_utf8_lossy(&answer.body).into_owned())
}

/// An HTTP answer: status 0 where none came.
pub struct Answer {
    pub status: u16,
    /// The header lines, as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// [`http`] with more request headers, the answer's headers, and its body as bytes (an answer of a known length:
/// no chunked encoding).
pub fn request(port: u16, method: &str, path: &str, key: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let none = Answer { status: 0, head: String::new(), body: Vec::new() };
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return none };
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return none;
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else { return none };
    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Answer { status, head, body: answer[end + 4..].to_vec() }
}

/// A webhook as received: its `webhook-id` header and its body.
pub struct Delivery {
    pub id: String,
    pub body: String,
}

/// A webhook receiver that answers 200 to every request and keeps them.
pub fn receiver() -> (u16, Arc<Mutex<Vec<Delivery>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let kept = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let (mut length, mut id) = (0, String::new());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                let lower = line.to_ascii_lowercase();
                if let Some(value) = lower.strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if let Some(value) = lower.strip_prefix("webhook-id:") {
                    id = value.trim().to_string();
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let body = String::from_utf8_lossy(&body).into_owned();
            kept.lock().unwrap().push(Delivery { id, body });
        }
    });
    (port, received)
}

pub fn wait_until(what: &str, done: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(120), done)
}

pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
