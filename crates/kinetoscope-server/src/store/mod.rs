//! The job store: every job, the lease of the worker rendering it, and the webhook events waiting to be sent.
//!
//! Two backends behind [`JobStore`], with one test suite: SQLite in the data folder (one machine, nothing to
//! set up) and PostgreSQL (one queue for any number of API nodes and workers on any number of machines). Every
//! state change is a committed transaction before it is reported, so a crash loses nothing: queued jobs stay
//! queued, and a job whose worker died is queued again once its lease lapses (up to [`MAX_ATTEMPTS`] starts,
//! so a job that kills its worker can't kill workers forever).
//!
//! Leases fence the workers: every write about a running job names the lease it was claimed with, so a
//! worker that comes back after its lease lapsed (a network split, a long pause) can't overwrite what the
//! job's new owner did. Its output files are put in place inside the same transaction as the completion,
//! while the job's row is locked, so only the owner's files are ever served.

mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;

pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;
use crate::webhooks::EventKind;

/// Starts of one job before it is failed instead of retried.
pub const MAX_ATTEMPTS: i64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job database (PostgreSQL): {}", postgres_reason(.0))]
    Postgres(#[from] ::postgres::Error),
    #[error("job database (PostgreSQL): no connection: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("job database holds an unreadable row for {id}: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("job database: schema version {found} is newer than this build knows ({known}); upgrade Kinetoscope")]
    NewerSchema { found: i64, known: i64 },
    #[error("no video with id {id:?} to page after")]
    UnknownCursor { id: String },
    #[error("the queue is full ({limit} jobs queued or running)")]
    QueueFull { limit: usize },
    #[error("job database (PostgreSQL): TLS: {0}")]
    Tls(String),
    #[error("job database location {location}: {reason}")]
    InvalidLocation { location: String, reason: String },
    #[error("putting the finished video in place: {0}")]
    Publish(std::io::Error),
}

/// What PostgreSQL said, where the client's own message is only "db error".
fn postgres_reason(error: &::postgres::Error) -> String {
    match (error.as_db_error(), std::error::Error::source(error)) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(cause)) => format!("{error}: {cause}"),
        (None, None) => error.to_string(),
    }
}

impl StoreError {
    /// The database (SQLite's file) or the output's filesystem could not be written for want of space.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => e.code == rusqlite::ErrorCode::DiskFull,
            StoreError::Publish(e) => e.raw_os_error() == Some(28),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Status::Queued, Status::InProgress, Status::Completed, Status::Failed].into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

/// Everything the worker needs to render a job, fixed when it is accepted (defaults and preset
/// resolved), so a remix or a rerun after a restart renders the same thing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub num_frames: usize,
    pub fps: u32,
    pub steps: usize,
    pub guidance_scale: f64,
    /// A two-expert model's guidance scale for its low-noise expert; `None` keeps `guidance_scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale_2: Option<f64>,
    /// Shift of the flow sigmas; `None` keeps the model's scheduler config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
    /// An explicit schedule (few-step distilled models), run with flow-match Euler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<kinetoscope::scheduler::Schedule>,
    /// LoRA adapters from the server's `--lora-dir`, by name, applied at run time to this job only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<JobLora>,
    pub seed: u64,
    pub step_cache: Option<f64>,
    pub preset: Option<String>,
    /// An edit of the source video kept beside the job (`inputs/<id>.mp4`), instead of text-to-video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<kinetoscope::EditKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    /// An image-to-video job's last image (`inputs/<id>.last_image`), when it ends on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_image_sha256: Option<String>,
}

/// An adapter a job asked for: a file name in the server's `--lora-dir`, its scale, and whether it is for a
/// two-expert model's low-noise expert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobLora {
    pub name: String,
    pub scale: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub low_noise: bool,
}

/// A job as accepted, before it has a row.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub model: String,
    /// `seconds` as the client gave it (or the default), echoed in the video object.
    pub seconds: String,
    pub settings: Settings,
    pub remixed_from: Option<String>,
    pub webhook_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub created_at: i64,
    pub status: Status,
    pub progress: i64,
    pub model: String,
    pub seconds: String,
    pub settings: Settings,
    pub remixed_from: Option<String>,
    pub webhook_url: Option<String>,
    pub attempts: i64,
    pub completed_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub error: Option<JobError>,
    /// What a completed job reports of its result beyond the video (a region edit: the latent cells regenerated,
    /// the largest change outside the mask, the seam's gradient).
    pub result: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

impl Job {
    /// The video object of OpenAI's API (`openai/types/video.py`).
    pub fn to_object(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": self.expires_at,
            "prompt": self.settings.prompt,
            "seconds": self.seconds,
            "size": format!("{}x{}", self.settings.width, self.settings.height),
            "remixed_from_video_id": self.remixed_from,
            "error": self.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
            // Kinetoscope's: what a client checks of a region edit without looking at the video.
            "result": self.result,
        })
    }
}

/// A worker's hold on a running job, from [`JobStore::claim_next`]: every write about the job names it, and
/// is refused once the lease lapsed and the job went to someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job: String,
    pub id: String,
}

/// A webhook event waiting for delivery: written in the same transaction as the job's end, sent by whichever
/// API node claims it first, and kept until every target took it or the attempts ran out (so a restart loses
/// none).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    /// `evt_...`: the event's id and the `webhook-id` of every attempt.
    pub id: String,
    pub video_id: String,
    pub kind: EventKind,
    pub created_at: i64,
    /// The job's own `webhook_url`, beside the server's configured receivers.
    pub target: Option<String>,
    /// Targets that already answered 2xx: not sent again.
    pub delivered: Vec<String>,
    /// Attempts made so far.
    pub attempts: i64,
}

/// A worker process as the store last saw it: what `GET /v1/models` lists while its heartbeat is fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub id: String,
    pub model: String,
    pub device: String,
}

/// Where jobs live. Every method is blocking (call it from a worker thread or `spawn_blocking`).
pub trait JobStore: Send + Sync {
    /// Whether processes on other machines share this store (PostgreSQL): then no process may take a running
    /// job for dead without its lease lapsing, and changes made elsewhere reach this process only by reading.
    fn is_shared(&self) -> bool;

    /// After this process starts: jobs that were running and can't be anymore go back to the queue (or fail
    /// once they were started [`MAX_ATTEMPTS`] times). SQLite belongs to one process, so every running job
    /// was its own; PostgreSQL takes only those whose lease lapsed. Returns how many were queued again.
    fn recover(&self, now: i64) -> Result<usize, StoreError>;

    /// Running jobs whose worker stopped renewing the lease: queued again, or failed after [`MAX_ATTEMPTS`]
    /// starts. Returns how many lapsed.
    fn requeue_lapsed(&self, now: i64) -> Result<usize, StoreError>;

    /// Queues a job unless `max_queue` jobs are already queued or running.
    fn insert(&self, job: &NewJob, now: i64, max_queue: usize) -> Result<Job, StoreError>;

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// A page of jobs by creation order, after the job `after` (exclusive). Returns the page and whether more
    /// follow.
    fn list(&self, after: Option<&str>, limit: usize, descending: bool) -> Result<(Vec<Job>, bool), StoreError>;

    /// Removes a job; returns it as it was, or `None` if there was none.
    fn delete(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Takes the oldest queued job (for `model`, or any) and marks it running under a new lease of `lease`.
    fn claim_next(
        &self,
        worker: &str,
        model: Option<&str>,
        lease: Duration,
    ) -> Result<Option<(Job, Lease)>, StoreError>;

    /// Extends a lease by `lease` from now; false once it is lost (lapsed and re-queued, or the job deleted).
    fn renew(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError>;

    /// Returns false once the lease is lost.
    fn set_progress(&self, lease: &Lease, progress: i64) -> Result<bool, StoreError>;

    /// Marks a running job completed, with what it reports of its result, and queues its `video.completed`
    /// event. `publish` puts its files in place; it runs inside the transaction, with the row locked, and
    /// only while the lease holds. Returns false (and runs nothing) once the lease is lost.
    fn complete(
        &self,
        lease: &Lease,
        now: i64,
        expires_at: i64,
        result: Option<&serde_json::Value>,
        publish: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<bool, StoreError>;

    /// Marks a running job failed and queues its `video.failed` event; false once the lease is lost.
    fn fail(&self, lease: &Lease, now: i64, code: &str, message: &str) -> Result<bool, StoreError>;

    /// Puts a running job back at its place in the queue (shutdown while it ran, a full disk). The start
    /// doesn't count as an attempt, as the job itself didn't fail.
    fn requeue(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Completed jobs that expired after `since` and by `now` (both unix seconds): their files should go.
    fn expired(&self, since: i64, now: i64) -> Result<Vec<String>, StoreError>;

    /// Jobs queued or running, by model.
    fn queue_depth(&self) -> Result<Vec<(String, usize)>, StoreError>;

    /// Queues an event outside a job's end (an event of the API's own).
    fn add_event(&self, kind: EventKind, video_id: &str, target: Option<&str>, now: i64) -> Result<(), StoreError>;

    /// Claims up to `limit` events that are due, for `lease` (another node takes them after it).
    fn due_events(&self, limit: usize, lease: Duration) -> Result<Vec<PendingEvent>, StoreError>;

    /// Records an attempt at `event`: the targets that have now taken it, and when to try the rest again
    /// (`None`: never, the event is done).
    fn event_attempted(&self, event: &str, delivered: &[String], retry_in: Option<Duration>) -> Result<(), StoreError>;

    /// Records that a worker is alive and what it serves.
    fn worker_seen(&self, worker: &WorkerInfo) -> Result<(), StoreError>;

    /// A worker that stops cleanly leaves the list at once.
    fn worker_gone(&self, worker: &str) -> Result<(), StoreError>;

    /// Workers seen within `within`.
    fn live_workers(&self, within: Duration) -> Result<Vec<WorkerInfo>, StoreError>;
}

/// Opens the store `location` names: a `postgres://` or `postgresql://` URL, or else the path of a SQLite
/// file. Either way its schema is brought to this build's version first.
pub fn open(location: &str) -> Result<Box<dyn JobStore>, StoreError> {
    if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        Ok(Box::new(PostgresStore::open(location)?))
    } else {
        Ok(Box::new(SqliteStore::open(std::path::Path::new(location))?))
    }
}

/// A store location as logs may show it: a URL without its password.
pub fn redact_location(location: &str) -> String {
    match reqwest::Url::parse(location) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => location.to_string(),
    }
}

/// Milliseconds since the epoch, for leases and retries on SQLite (PostgreSQL uses its own clock, the one
/// every node shares).
fn unix_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn millis(duration: Duration) -> i64 {
    duration.as_millis().min(i64::MAX as u128) as i64
}

/// A new lease's or event's random id.
fn random_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

/// The columns of a job, in the order [`RawJob`] reads them.
const COLUMNS: &str = "id, created_at, status, progress, model, seconds, settings, remixed_from, webhook_url, \
                       attempts, completed_at, expires_at, error_code, error_message, result";

/// What a failed job's error says when its worker died [`MAX_ATTEMPTS`] times on it.
const POISON_MESSAGE: &str = "the worker stopped while rendering this video";

/// Statements both stores run alike (what happens to a job is decided once, here), with `#n` for the n-th
/// parameter: each store writes it in its own dialect with [`dialect`]. A fenced update's `WHERE` (the job and its
/// lease, `#1` and `#2`) is the store's.
mod statements {
    pub const ACTIVE: &str = "SELECT COUNT(*) FROM videos WHERE status IN ('queued', 'in_progress')";
    pub const INSERT: &str = "INSERT INTO videos (id, created_at, status, model, seconds, settings, remixed_from, \
                              webhook_url) VALUES (#1, #2, 'queued', #3, #4, #5, #6, #7)";
    pub const PROGRESS: &str = "UPDATE videos SET progress = #3";
    pub const COMPLETE: &str = "UPDATE videos SET status = 'completed', progress = 100, completed_at = #2, \
                                expires_at = #3, result = #4";
    pub const FAIL: &str =
        "UPDATE videos SET status = 'failed', completed_at = #2, error_code = #3, error_message = #4";
    pub const REQUEUE: &str = "UPDATE videos SET status = 'queued', progress = 0, attempts = attempts - 1, \
                               lease_id = NULL, lease_until = NULL";
    /// A job whose worker died [`super::MAX_ATTEMPTS`] times on it.
    pub const POISON: &str = "UPDATE videos SET status = 'failed', progress = 0, completed_at = #2, \
                              error_code = 'internal_error', error_message = #3 || ' ' || attempts || ' times', \
                              lease_id = NULL WHERE id = #1";
    pub const LAPSED: &str =
        "UPDATE videos SET status = 'queued', progress = 0, lease_id = NULL, lease_until = NULL WHERE id = #1";
    pub const EXPIRED: &str =
        "SELECT id FROM videos WHERE status = 'completed' AND expires_at > #1 AND expires_at <= #2";
    pub const QUEUE_DEPTH: &str = "SELECT model, COUNT(*) FROM videos WHERE status IN ('queued', 'in_progress') \
                                   GROUP BY model ORDER BY model";
    pub const DELETE_EVENT: &str = "DELETE FROM events WHERE id = #1";
    pub const DELETE_WORKER: &str = "DELETE FROM workers WHERE id = #1";
}

/// `statement` with its parameters as `mark` (`?` or `$`) and their number.
fn dialect(statement: &str, mark: char) -> String {
    statement.replace('#', &mark.to_string())
}

/// A row as the database holds it, before its text columns are checked.
struct RawJob {
    id: String,
    created_at: i64,
    status: String,
    progress: i64,
    model: String,
    seconds: String,
    settings: String,
    remixed_from: Option<String>,
    webhook_url: Option<String>,
    attempts: i64,
    completed_at: Option<i64>,
    expires_at: Option<i64>,
    error_code: Option<String>,
    error_message: Option<String>,
    result: Option<String>,
}

impl RawJob {
    fn parse(self) -> Result<Job, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { id: self.id.clone(), reason };
        let status = Status::parse(&self.status).ok_or_else(|| corrupt(format!("status {:?}", self.status)))?;
        let settings = serde_json::from_str(&self.settings).map_err(|e| corrupt(format!("settings: {e}")))?;
        let result = match &self.result {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| corrupt(format!("result: {e}")))?),
            None => None,
        };
        let error = match (self.error_code, self.error_message) {
            (Some(code), message) => Some(JobError { code, message: message.unwrap_or_default() }),
            (None, _) => None,
        };
        Ok(Job {
            id: self.id,
            created_at: self.created_at,
            status,
            progress: self.progress,
            model: self.model,
            seconds: self.seconds,
            settings,
            remixed_from: self.remixed_from,
            webhook_url: self.webhook_url,
            attempts: self.attempts,
            completed_at: self.completed_at,
            expires_at: self.expires_at,
            error,
            result,
        })
    }
}

/// An event row as the database holds it.
struct RawEvent {
    id: String,
    video_id: String,
    kind: String,
    created_at: i64,
    target: Option<String>,
    delivered: String,
    attempts: i64,
}

impl RawEvent {
    fn parse(self) -> Result<PendingEvent, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { id: self.id.clone(), reason };
        let kind = EventKind::parse(&self.kind).ok_or_else(|| corrupt(format!("event type {:?}", self.kind)))?;
        let delivered = serde_json::from_str(&self.delivered).map_err(|e| corrupt(format!("delivered: {e}")))?;
        Ok(PendingEvent {
            id: self.id,
            video_id: self.video_id,
            kind,
            created_at: self.created_at,
            target: self.target,
            delivered,
            attempts: self.attempts,
        })
    }
}

/// A database of its own on a PostgreSQL server, dropped when this is: how the tests (and a trial) get a clean
/// store without touching anyone else's. `admin_url` names a role that may create databases.
pub struct ThrowawayDatabase {
    admin: ::postgres::Config,
    name: String,
    /// The new database's URL, for [`open`] and for other processes.
    pub url: String,
}

impl ThrowawayDatabase {
    pub fn create(admin_url: &str) -> Result<Self, StoreError> {
        let admin: ::postgres::Config = admin_url.parse()?;
        let name = format!("kinetoscope_{:016x}", rand::random::<u64>());
        let create = format!("CREATE DATABASE {name}");
        let tls = postgres::tls()?;
        off_runtime(|| admin.connect(tls)?.batch_execute(&create))?;
        let mut url = reqwest::Url::parse(admin_url).map_err(|e| StoreError::InvalidLocation {
            location: redact_location(admin_url),
            reason: format!("not a URL: {e}"),
        })?;
        url.set_path(&format!("/{name}"));
        Ok(ThrowawayDatabase { admin, name, url: url.to_string() })
    }

    /// For tests: a database on the server the environment `variable` names. `None` when it names none (the test
    /// says so and passes), unless `KINETOSCOPE_REQUIRE_POSTGRES` is set, as CI sets it: then it is an error.
    pub fn from_env(variable: &str) -> Result<Option<Self>, StoreError> {
        match std::env::var(variable) {
            Ok(admin_url) => Self::create(&admin_url).map(Some),
            Err(_) if std::env::var_os("KINETOSCOPE_REQUIRE_POSTGRES").is_some() => Err(StoreError::InvalidLocation {
                location: variable.to_string(),
                reason: "KINETOSCOPE_REQUIRE_POSTGRES is set but this is not: start scripts/postgres.sh".into(),
            }),
            Err(_) => {
                eprintln!("{variable} is not set: what needs PostgreSQL there is skipped");
                Ok(None)
            }
        }
    }
}

impl Drop for ThrowawayDatabase {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped =
            postgres::tls().and_then(|tls| Ok(off_runtime(|| self.admin.connect(tls)?.batch_execute(&drop))?));
        if let Err(e) = dropped {
            tracing::warn!(database = self.name, "cannot drop the throwaway database: {e}");
        }
    }
}

/// Runs `work` on a thread of its own: the synchronous PostgreSQL client blocks on a runtime of its own, which may
/// not happen on a thread that drives async tasks.
fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| scope.spawn(work).join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
