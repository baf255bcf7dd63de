//! Jobs in one SQLite file (WAL). Every state change is a committed transaction before it is
//! reported, so a crash or restart loses nothing: queued jobs stay queued, and a job that was
//! running is queued again (up to [`MAX_ATTEMPTS`] times, so a job that crashes the server can't
//! crash it forever).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Starts of one job before it is failed instead of retried.
pub const MAX_ATTEMPTS: i64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job database holds an unreadable row for {id}: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("no video with id {id:?} to page after")]
    UnknownCursor { id: String },
    #[error("the queue is full ({limit} jobs queued or running)")]
    QueueFull { limit: usize },
}

impl StoreError {
    /// SQLite could not write for want of space (`SQLITE_FULL`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DiskFull)
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

pub struct Store {
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    seconds TEXT NOT NULL,
    settings TEXT NOT NULL,
    remixed_from TEXT,
    webhook_url TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    completed_at INTEGER,
    expires_at INTEGER,
    error_code TEXT,
    error_message TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS videos_by_status ON videos (status, seq);
";

const COLUMNS: &str = "id, created_at, status, progress, model, seconds, settings, remixed_from, webhook_url, \
                       attempts, completed_at, expires_at, error_code, error_message, result";

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        // WAL lets readers (the API) go on while the worker writes; FULL syncs each commit, so a
        // job acknowledged to a client survives a power cut, not only a crash.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA)?;
        // A database made before jobs had results gains the column (empty for its jobs).
        let has_result: bool =
            db.query_row("SELECT COUNT(*) FROM pragma_table_info('videos') WHERE name = 'result'", [], |r| r.get(0))?;
        if !has_result {
            db.execute_batch("ALTER TABLE videos ADD COLUMN result TEXT")?;
        }
        Ok(Store { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back), so the
        // connection stays usable.
        self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// After a restart: jobs that were running go back to the queue, or fail once they have been
    /// started [`MAX_ATTEMPTS`] times. Returns how many were re-queued.
    pub fn recover(&self, now: i64) -> Result<usize, StoreError> {
        let db = self.db();
        db.execute(
            "UPDATE videos SET status = 'failed', progress = 0, completed_at = ?1, error_code = 'internal_error',
                 error_message = 'the server stopped while rendering this video ' || attempts || ' times'
             WHERE status = 'in_progress' AND attempts >= ?2",
            params![now, MAX_ATTEMPTS],
        )?;
        Ok(db.execute("UPDATE videos SET status = 'queued', progress = 0 WHERE status = 'in_progress'", [])?)
    }

    /// Queues a job unless `max_queue` jobs are already queued or running.
    pub fn insert(&self, job: &NewJob, now: i64, max_queue: usize) -> Result<Job, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let active: i64 =
            tx.query_row("SELECT COUNT(*) FROM videos WHERE status IN ('queued', 'in_progress')", [], |r| r.get(0))?;
        if active as usize >= max_queue {
            return Err(StoreError::QueueFull { limit: max_queue });
        }
        let settings = serde_json::to_string(&job.settings).expect("settings serialize");
        tx.execute(
            "INSERT INTO videos (id, created_at, status, model, seconds, settings, remixed_from, webhook_url)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7)",
            params![job.id, now, job.model, job.seconds, settings, job.remixed_from, job.webhook_url],
        )?;
        tx.commit()?;
        drop(db);
        self.get(&job.id)?.ok_or_else(|| StoreError::Corrupt { id: job.id.clone(), reason: "vanished".into() })
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let db = self.db();
        let sql = format!("SELECT {COLUMNS} FROM videos WHERE id = ?1");
        let raw = db.query_row(&sql, [id], RawJob::from_row).optional()?;
        raw.map(RawJob::parse).transpose()
    }

    /// A page of jobs by creation order, after the job `after` (exclusive). Returns the page and
    /// whether more follow.
    pub fn list(&self, after: Option<&str>, limit: usize, descending: bool) -> Result<(Vec<Job>, bool), StoreError> {
        let db = self.db();
        let cursor: Option<i64> = match after {
            Some(id) => Some(
                db.query_row("SELECT seq FROM videos WHERE id = ?1", [id], |r| r.get(0))
                    .optional()?
                    .ok_or_else(|| StoreError::UnknownCursor { id: id.to_string() })?,
            ),
            None => None,
        };
        let (compare, order) = if descending { ("<", "DESC") } else { (">", "ASC") };
        let bound = cursor.unwrap_or(if descending { i64::MAX } else { i64::MIN });
        let sql = format!("SELECT {COLUMNS} FROM videos WHERE seq {compare} ?1 ORDER BY seq {order} LIMIT ?2");
        let mut statement = db.prepare(&sql)?;
        let rows = statement.query_map(params![bound, limit as i64 + 1], RawJob::from_row)?;
        let mut jobs =
            rows.map(|r| r.map_err(StoreError::from).and_then(RawJob::parse)).collect::<Result<Vec<_>, _>>()?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok((jobs, more))
    }

    /// Takes the oldest queued job and marks it running.
    pub fn claim_next(&self) -> Result<Option<Job>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let id: Option<String> = tx
            .query_row("SELECT id FROM videos WHERE status = 'queued' ORDER BY seq LIMIT 1", [], |r| r.get(0))
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        tx.execute(
            "UPDATE videos SET status = 'in_progress', progress = 0, attempts = attempts + 1 WHERE id = ?1",
            [&id],
        )?;
        tx.commit()?;
        drop(db);
        self.get(&id)
    }

    /// Returns false when the job is gone (deleted while running).
    pub fn set_progress(&self, id: &str, progress: i64) -> Result<bool, StoreError> {
        let changed = self.db().execute(
            "UPDATE videos SET progress = ?2 WHERE id = ?1 AND status = 'in_progress'",
            params![id, progress],
        )?;
        Ok(changed == 1)
    }

    /// Marks a running job completed, with what it reports of its result, if anything.
    pub fn complete(
        &self,
        id: &str,
        now: i64,
        expires_at: i64,
        result: Option<&serde_json::Value>,
    ) -> Result<bool, StoreError> {
        let result = result.map(serde_json::Value::to_string);
        let changed = self.db().execute(
            "UPDATE videos SET status = 'completed', progress = 100, completed_at = ?2, expires_at = ?3, result = ?4
             WHERE id = ?1 AND status = 'in_progress'",
            params![id, now, expires_at, result],
        )?;
        Ok(changed == 1)
    }

    pub fn fail(&self, id: &str, now: i64, code: &str, message: &str) -> Result<bool, StoreError> {
        let changed = self.db().execute(
            "UPDATE videos SET status = 'failed', completed_at = ?2, error_code = ?3, error_message = ?4
             WHERE id = ?1 AND status IN ('queued', 'in_progress')",
            params![id, now, code, message],
        )?;
        Ok(changed == 1)
    }

    /// Puts a running job back at its place in the queue (shutdown while it ran). The start doesn't
    /// count as an attempt, as the job itself didn't fail.
    pub fn requeue(&self, id: &str) -> Result<bool, StoreError> {
        let changed = self.db().execute(
            "UPDATE videos SET status = 'queued', progress = 0, attempts = attempts - 1
             WHERE id = ?1 AND status = 'in_progress'",
            [id],
        )?;
        Ok(changed == 1)
    }

    /// Removes a job; returns it as it was, or `None` if there was none.
    pub fn delete(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let job = self.get(id)?;
        if job.is_some() {
            self.db().execute("DELETE FROM videos WHERE id = ?1", [id])?;
        }
        Ok(job)
    }

    /// Completed jobs that expired after `since` and by `now` (both unix seconds): their files should go.
    pub fn expired(&self, since: i64, now: i64) -> Result<Vec<String>, StoreError> {
        let db = self.db();
        let mut statement =
            db.prepare("SELECT id FROM videos WHERE status = 'completed' AND expires_at > ?1 AND expires_at <= ?2")?;
        let ids = statement.query_map([since, now], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// Jobs queued or running.
    pub fn queue_depth(&self) -> Result<usize, StoreError> {
        let n: i64 =
            self.db()
                .query_row("SELECT COUNT(*) FROM videos WHERE status IN ('queued', 'in_progress')", [], |r| r.get(0))?;
        Ok(n as usize)
    }
}

/// A row as SQLite holds it, before its text columns are checked.
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
    fn from_row(r: &Row) -> rusqlite::Result<Self> {
        Ok(RawJob {
            id: r.get(0)?,
            created_at: r.get(1)?,
            status: r.get(2)?,
            progress: r.get(3)?,
            model: r.get(4)?,
            seconds: r.get(5)?,
            settings: r.get(6)?,
            remixed_from: r.get(7)?,
            webhook_url: r.get(8)?,
            attempts: r.get(9)?,
            completed_at: r.get(10)?,
            expires_at: r.get(11)?,
            error_code: r.get(12)?,
            error_message: r.get(13)?,
            result: r.get(14)?,
        })
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> NewJob {
        NewJob {
            id: id.into(),
            model: "tiny".into(),
            seconds: "1".into(),
            settings: Settings {
                prompt: format!("prompt of {id}"),
                negative_prompt: String::new(),
                width: 48,
                height: 32,
                num_frames: 9,
                fps: 8,
                steps: 2,
                guidance_scale: 5.0,
                seed: 7,
                ..Settings::default()
            },
            remixed_from: None,
            webhook_url: None,
        }
    }

    #[test]
    fn jobs_survive_reopening_and_running_ones_are_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        {
            let store = Store::open(&path).unwrap();
            for id in ["video_a", "video_b", "video_c"] {
                store.insert(&job(id), 100, 10).unwrap();
            }
            let running = store.claim_next().unwrap().unwrap();
            assert_eq!((running.id.as_str(), running.status, running.attempts), ("video_a", Status::InProgress, 1));
            assert!(store.set_progress("video_a", 40).unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.recover(200).unwrap(), 1);
        let a = store.get("video_a").unwrap().unwrap();
        assert_eq!((a.status, a.progress), (Status::Queued, 0));
        assert_eq!(a.settings, job("video_a").settings);
        // Order is kept: the interrupted job runs first again.
        assert_eq!(store.claim_next().unwrap().unwrap().id, "video_a");
        assert!(store.complete("video_a", 300, 400, None).unwrap());
        assert_eq!(store.claim_next().unwrap().unwrap().id, "video_b");
        assert_eq!(store.queue_depth().unwrap(), 2);
    }

    /// A database made before jobs had results opens with the column added; its jobs read with none, and a
    /// completion's result reads back.
    #[test]
    fn an_older_database_gains_the_result_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        let old = SCHEMA.replace("error_message TEXT,\n    result TEXT", "error_message TEXT");
        assert_ne!(old, SCHEMA);
        Connection::open(&path).unwrap().execute_batch(&old).unwrap();
        let store = Store::open(&path).unwrap();
        store.insert(&job("video_a"), 100, 10).unwrap();
        assert_eq!(store.get("video_a").unwrap().unwrap().result, None);
        store.claim_next().unwrap();
        let result = serde_json::json!({"region": {"unmasked_max_abs": 0.0}});
        assert!(store.complete("video_a", 300, 400, Some(&result)).unwrap());
        drop(store);
        let store = Store::open(&path).unwrap();
        let job = store.get("video_a").unwrap().unwrap();
        assert_eq!(job.result, Some(result.clone()));
        assert_eq!(job.to_object()["result"], result);
    }

    #[test]
    fn a_job_that_keeps_crashing_the_server_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite")).unwrap();
        store.insert(&job("video_poison"), 1, 10).unwrap();
        for _ in 0..MAX_ATTEMPTS {
            store.recover(2).unwrap();
            store.claim_next().unwrap().unwrap();
        }
        assert_eq!(store.recover(3).unwrap(), 0);
        let failed = store.get("video_poison").unwrap().unwrap();
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(failed.error.unwrap().code, "internal_error");
    }

    #[test]
    fn the_queue_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite")).unwrap();
        store.insert(&job("video_1"), 1, 2).unwrap();
        store.insert(&job("video_2"), 1, 2).unwrap();
        assert!(matches!(store.insert(&job("video_3"), 1, 2), Err(StoreError::QueueFull { limit: 2 })));
        store.claim_next().unwrap();
        store.complete("video_1", 2, 3, None).unwrap();
        store.insert(&job("video_3"), 1, 2).unwrap();
    }

    #[test]
    fn each_expired_video_is_swept_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite")).unwrap();
        for (id, expires) in [("video_early", 100), ("video_late", 200)] {
            store.insert(&job(id), 1, 10).unwrap();
            store.claim_next().unwrap();
            store.complete(id, 2, expires, None).unwrap();
        }
        assert_eq!(store.expired(i64::MIN, 150).unwrap(), ["video_early"]);
        assert_eq!(store.expired(150, 250).unwrap(), ["video_late"]);
        assert!(store.expired(250, 300).unwrap().is_empty());
    }

    #[test]
    fn pages_follow_the_cursor_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.sqlite")).unwrap();
        for i in 0..5 {
            store.insert(&job(&format!("video_{i}")), i, 10).unwrap();
        }
        let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        let (page, more) = store.list(None, 2, false).unwrap();
        assert_eq!((ids(page), more), (vec!["video_0".to_string(), "video_1".into()], true));
        let (page, more) = store.list(Some("video_3"), 2, false).unwrap();
        assert_eq!((ids(page), more), (vec!["video_4".to_string()], false));
        let (page, more) = store.list(Some("video_3"), 2, true).unwrap();
        assert_eq!((ids(page), more), (vec!["video_2".to_string(), "video_1".into()], true));
        assert!(matches!(store.list(Some("video_x"), 2, true), Err(StoreError::UnknownCursor { .. })));
    }
}
