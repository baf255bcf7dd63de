//! The store in one SQLite file (WAL), for a server on one machine: nothing to set up, and one process owns it.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::statements::*;
use super::{
    millis, random_id, unix_millis, Job, JobStore, Lease, NewJob, PendingEvent, RawEvent, RawJob, StoreError,
    WorkerInfo, COLUMNS, MAX_ATTEMPTS, POISON_MESSAGE,
};
use crate::webhooks::EventKind;

/// The schema, one step per version (`PRAGMA user_version`); a database is brought forward step by step.
const MIGRATIONS: &[&str] = &[
    // 1: jobs (a database from before versions had this already, perhaps without `result`: see `open`).
    "CREATE TABLE IF NOT EXISTS videos (
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
    CREATE INDEX IF NOT EXISTS videos_by_status ON videos (status, seq);",
    // 2: leases, the webhook outbox, and the workers seen.
    "ALTER TABLE videos ADD COLUMN lease_id TEXT;
    ALTER TABLE videos ADD COLUMN lease_until INTEGER;
    ALTER TABLE videos ADD COLUMN worker TEXT;
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        video_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        target TEXT,
        delivered TEXT NOT NULL DEFAULT '[]',
        attempts INTEGER NOT NULL DEFAULT 0,
        due_ms INTEGER NOT NULL,
        lease_until INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX events_by_due ON events (due_ms);
    CREATE TABLE workers (id TEXT PRIMARY KEY, model TEXT NOT NULL, device TEXT NOT NULL, seen_ms INTEGER NOT NULL);",
];

const EVENT_COLUMNS: &str = "id, video_id, kind, created_at, target, delivered, attempts";

/// A shared statement in SQLite's words.
fn sql(statement: &str) -> String {
    super::dialect(statement, '?')
}

pub struct SqliteStore {
    db: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut db = Connection::open(path)?;
        // WAL lets readers (the API) go on while the worker writes; FULL syncs each commit, so a
        // job acknowledged to a client survives a power cut, not only a crash.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(Duration::from_secs(5))?;
        migrate(&mut db)?;
        Ok(SqliteStore { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back), so the
        // connection stays usable.
        self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Running jobs matching `condition` (with `?1` the time in milliseconds) lapse: failed past
    /// [`MAX_ATTEMPTS`], queued again otherwise.
    fn lapse(&self, now: i64, condition: &str) -> Result<usize, StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let poisoned: Vec<String> = {
            let text = format!("SELECT id FROM videos WHERE status = 'in_progress' AND attempts >= ?2 AND {condition}");
            let mut statement = tx.prepare(&text)?;
            let ids = statement.query_map(params![unix_millis(), MAX_ATTEMPTS], |r| r.get(0))?;
            ids.collect::<Result<_, _>>()?
        };
        for id in &poisoned {
            tx.execute(&sql(POISON), params![id, now, POISON_MESSAGE])?;
            insert_event(&tx, EventKind::Failed, id, now)?;
        }
        let text = format!(
            "UPDATE videos SET status = 'queued', progress = 0, lease_id = NULL, lease_until = NULL
             WHERE status = 'in_progress' AND {condition}"
        );
        let requeued = tx.execute(&text, params![unix_millis()])?;
        tx.commit()?;
        Ok(requeued + poisoned.len())
    }

    /// Runs `update` (with `?1` the job id, `?2` the lease id, then `extra`) on the job while `lease` holds.
    fn fenced(&self, lease: &Lease, update: &str, extra: &[&dyn rusqlite::ToSql]) -> Result<bool, StoreError> {
        let text = format!("{update} WHERE id = ?1 AND lease_id = ?2 AND status = 'in_progress'");
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&lease.job, &lease.id];
        values.extend_from_slice(extra);
        Ok(self.db().execute(&text, values.as_slice())? == 1)
    }

    /// Ends a running job in one transaction with its event: false, and nothing done, once the lease is lost.
    fn finish(
        &self,
        lease: &Lease,
        kind: EventKind,
        now: i64,
        update: &str,
        extra: &[&dyn rusqlite::ToSql],
        publish: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<bool, StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let holds: i64 = tx.query_row(
            "SELECT COUNT(*) FROM videos WHERE id = ?1 AND lease_id = ?2 AND status = 'in_progress'",
            params![lease.job, lease.id],
            |r| r.get(0),
        )?;
        if holds != 1 {
            return Ok(false);
        }
        publish().map_err(StoreError::Publish)?;
        let text = format!("{update}, lease_id = NULL, lease_until = NULL WHERE id = ?1");
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&lease.job];
        values.extend_from_slice(extra);
        tx.execute(&text, values.as_slice())?;
        insert_event(&tx, kind, &lease.job, now)?;
        tx.commit()?;
        Ok(true)
    }
}

fn migrate(db: &mut Connection) -> Result<(), StoreError> {
    let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::NewerSchema { found: version, known });
    }
    for (step, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(migration)?;
        if step == 0 {
            // A database made before jobs had results gains the column (empty for its jobs).
            let has_result: bool =
                tx.query_row("SELECT COUNT(*) FROM pragma_table_info('videos') WHERE name = 'result'", [], |r| {
                    r.get(0)
                })?;
            if !has_result {
                tx.execute_batch("ALTER TABLE videos ADD COLUMN result TEXT")?;
            }
        }
        tx.pragma_update(None, "user_version", step as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

/// Queues the event of job `id`'s end, for its own `webhook_url` and the configured receivers.
fn insert_event(tx: &Transaction, kind: EventKind, id: &str, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO events (id, video_id, kind, created_at, target, due_ms)
         SELECT ?1, id, ?2, ?3, webhook_url, ?4 FROM videos WHERE id = ?5",
        params![random_id("evt_"), kind.as_str(), now, unix_millis(), id],
    )?;
    Ok(())
}

fn job_from_row(r: &Row) -> rusqlite::Result<RawJob> {
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

fn event_from_row(r: &Row) -> rusqlite::Result<RawEvent> {
    Ok(RawEvent {
        id: r.get(0)?,
        video_id: r.get(1)?,
        kind: r.get(2)?,
        created_at: r.get(3)?,
        target: r.get(4)?,
        delivered: r.get(5)?,
        attempts: r.get(6)?,
    })
}

impl JobStore for SqliteStore {
    fn is_shared(&self) -> bool {
        false
    }

    fn recover(&self, now: i64) -> Result<usize, StoreError> {
        self.lapse(now, "?1 = ?1")
    }

    fn requeue_lapsed(&self, now: i64) -> Result<usize, StoreError> {
        self.lapse(now, "lease_until < ?1")
    }

    fn insert(&self, job: &NewJob, now: i64, max_queue: usize) -> Result<Job, StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let active: i64 = tx.query_row(ACTIVE, [], |r| r.get(0))?;
        if active as usize >= max_queue {
            return Err(StoreError::QueueFull { limit: max_queue });
        }
        let settings = serde_json::to_string(&job.settings).expect("settings serialize");
        // The row as inserted: read after the commit, a worker may already have claimed it.
        let raw = tx.query_row(
            &format!("{} RETURNING {COLUMNS}", sql(INSERT)),
            params![job.id, now, job.model, job.seconds, settings, job.remixed_from, job.webhook_url],
            job_from_row,
        )?;
        tx.commit()?;
        raw.parse()
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let db = self.db();
        let text = format!("SELECT {COLUMNS} FROM videos WHERE id = ?1");
        let raw = db.query_row(&text, [id], job_from_row).optional()?;
        raw.map(RawJob::parse).transpose()
    }

    fn list(&self, after: Option<&str>, limit: usize, descending: bool) -> Result<(Vec<Job>, bool), StoreError> {
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
        let text = format!("SELECT {COLUMNS} FROM videos WHERE seq {compare} ?1 ORDER BY seq {order} LIMIT ?2");
        let mut statement = db.prepare(&text)?;
        let rows = statement.query_map(params![bound, limit as i64 + 1], job_from_row)?;
        let mut jobs =
            rows.map(|r| r.map_err(StoreError::from).and_then(RawJob::parse)).collect::<Result<Vec<_>, _>>()?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok((jobs, more))
    }

    fn delete(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let job = self.get(id)?;
        if job.is_some() {
            self.db().execute("DELETE FROM videos WHERE id = ?1", [id])?;
        }
        Ok(job)
    }

    fn claim_next(
        &self,
        worker: &str,
        model: Option<&str>,
        duration: Duration,
    ) -> Result<Option<(Job, Lease)>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: Option<String> = tx
            .query_row(
                "SELECT id FROM videos WHERE status = 'queued' AND (?1 IS NULL OR model = ?1) ORDER BY seq LIMIT 1",
                [model],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        let lease = Lease { job: id, id: random_id("lease_") };
        tx.execute(
            "UPDATE videos SET status = 'in_progress', progress = 0, attempts = attempts + 1, lease_id = ?2,
                 lease_until = ?3, worker = ?4
             WHERE id = ?1",
            params![lease.job, lease.id, unix_millis() + millis(duration), worker],
        )?;
        tx.commit()?;
        drop(db);
        Ok(self.get(&lease.job)?.map(|job| (job, lease)))
    }

    fn renew(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError> {
        self.fenced(lease, "UPDATE videos SET lease_until = ?3", &[&(unix_millis() + millis(duration))])
    }

    fn set_progress(&self, lease: &Lease, progress: i64) -> Result<bool, StoreError> {
        self.fenced(lease, &sql(PROGRESS), &[&progress])
    }

    fn complete(
        &self,
        lease: &Lease,
        now: i64,
        expires_at: i64,
        result: Option<&serde_json::Value>,
        publish: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<bool, StoreError> {
        let result = result.map(serde_json::Value::to_string);
        self.finish(lease, EventKind::Completed, now, &sql(COMPLETE), &[&now, &expires_at, &result], publish)
    }

    fn fail(&self, lease: &Lease, now: i64, code: &str, message: &str) -> Result<bool, StoreError> {
        self.finish(lease, EventKind::Failed, now, &sql(FAIL), &[&now, &code, &message], &mut || Ok(()))
    }

    fn requeue(&self, lease: &Lease) -> Result<bool, StoreError> {
        self.fenced(lease, REQUEUE, &[])
    }

    fn expired(&self, since: i64, now: i64) -> Result<Vec<String>, StoreError> {
        let db = self.db();
        let mut statement = db.prepare(&sql(EXPIRED))?;
        let ids = statement.query_map([since, now], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    fn queue_depth(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let db = self.db();
        let mut statement = db.prepare(QUEUE_DEPTH)?;
        let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as usize)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_event(&self, kind: EventKind, video_id: &str, target: Option<&str>, now: i64) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO events (id, video_id, kind, created_at, target, due_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![random_id("evt_"), video_id, kind.as_str(), now, target, unix_millis()],
        )?;
        Ok(())
    }

    fn due_events(&self, limit: usize, lease: Duration) -> Result<Vec<PendingEvent>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = unix_millis();
        let raw: Vec<RawEvent> = {
            let text = format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE due_ms <= ?1 AND lease_until <= ?1 ORDER BY due_ms LIMIT ?2"
            );
            let mut statement = tx.prepare(&text)?;
            let rows = statement.query_map(params![now, limit as i64], event_from_row)?;
            rows.collect::<Result<_, _>>()?
        };
        for event in &raw {
            tx.execute("UPDATE events SET lease_until = ?2 WHERE id = ?1", params![event.id, now + millis(lease)])?;
        }
        tx.commit()?;
        raw.into_iter().map(RawEvent::parse).collect()
    }

    fn event_attempted(&self, event: &str, delivered: &[String], retry_in: Option<Duration>) -> Result<(), StoreError> {
        let db = self.db();
        match retry_in {
            None => db.execute(&sql(DELETE_EVENT), [event])?,
            Some(delay) => db.execute(
                "UPDATE events SET delivered = ?2, attempts = attempts + 1, due_ms = ?3, lease_until = 0 WHERE id = ?1",
                params![
                    event,
                    serde_json::to_string(delivered).expect("strings serialize"),
                    unix_millis() + millis(delay)
                ],
            )?,
        };
        Ok(())
    }

    fn worker_seen(&self, worker: &WorkerInfo) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT INTO workers (id, model, device, seen_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET model = ?2, device = ?3, seen_ms = ?4",
            params![worker.id, worker.model, worker.device, unix_millis()],
        )?;
        Ok(())
    }

    fn worker_gone(&self, worker: &str) -> Result<(), StoreError> {
        self.db().execute(&sql(DELETE_WORKER), [worker])?;
        Ok(())
    }

    fn live_workers(&self, within: Duration) -> Result<Vec<WorkerInfo>, StoreError> {
        let db = self.db();
        let mut statement = db.prepare("SELECT id, model, device FROM workers WHERE seen_ms >= ?1 ORDER BY id")?;
        let rows = statement.query_map([unix_millis() - millis(within)], |r| {
            Ok(WorkerInfo { id: r.get(0)?, model: r.get(1)?, device: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
