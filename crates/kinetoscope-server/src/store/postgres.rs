//! The store in PostgreSQL: one queue for any number of API nodes and workers on any number of machines.
//!
//! Workers claim jobs with `FOR UPDATE SKIP LOCKED`, so two never take the same one and none waits on
//! another's claim. Leases and event retries are timed by the database's clock, the one every node shares,
//! so a machine whose clock drifts can neither steal a live job nor keep a dead one.
//!
//! The connection is encrypted as the URL's `sslmode` says (libpq's names): `prefer`, the default, where the
//! server offers TLS; `require` always (refusing a server without it); `disable` never. The server's certificate is
//! always verified, against the PEM file `PGSSLROOTCERT` names (as libpq reads it) or else the system's roots.

use std::sync::Arc;
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Row, Transaction};
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::statements::*;
use super::{
    millis, random_id, Job, JobStore, Lease, NewJob, PendingEvent, RawEvent, RawJob, StoreError, WorkerInfo, COLUMNS,
    MAX_ATTEMPTS, POISON_MESSAGE,
};
use crate::webhooks::EventKind;

/// The database's time in milliseconds since the epoch.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Advisory-lock keys: one node at a time migrates the schema, and inserts count the queue.
const MIGRATION_LOCK: i64 = 0x6b69_6e65_0001;
const INSERT_LOCK: i64 = 0x6b69_6e65_0002;

/// Connections each process keeps: its workers' claims, renewals and progress, plus the API's reads.
const POOL_SIZE: u32 = 8;

/// The schema, one step per version (`kinetoscope_schema`); every node brings it forward on start.
const MIGRATIONS: &[&str] = &[
    // 1: jobs with their leases, the webhook outbox, and the workers seen.
    "CREATE TABLE videos (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        status TEXT NOT NULL,
        progress BIGINT NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        seconds TEXT NOT NULL,
        settings TEXT NOT NULL,
        remixed_from TEXT,
        webhook_url TEXT,
        attempts BIGINT NOT NULL DEFAULT 0,
        completed_at BIGINT,
        expires_at BIGINT,
        error_code TEXT,
        error_message TEXT,
        result TEXT,
        lease_id TEXT,
        lease_until BIGINT,
        worker TEXT
    );
    CREATE INDEX videos_by_status ON videos (status, seq);
    CREATE INDEX videos_queued ON videos (model, seq) WHERE status = 'queued';
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        video_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        target TEXT,
        delivered TEXT NOT NULL DEFAULT '[]',
        attempts BIGINT NOT NULL DEFAULT 0,
        due_ms BIGINT NOT NULL,
        lease_until BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX events_by_due ON events (due_ms);
    CREATE TABLE workers (id TEXT PRIMARY KEY, model TEXT NOT NULL, device TEXT NOT NULL, seen_ms BIGINT NOT NULL);",
];

const EVENT_COLUMNS: &str = "id, video_id, kind, created_at, target, delivered, attempts";

/// A shared statement in PostgreSQL's words.
fn sql(statement: &str) -> String {
    super::dialect(statement, '$')
}

type Manager = PostgresConnectionManager<MakeRustlsConnect>;
type Connection = PooledConnection<Manager>;

/// How connections are encrypted where the URL's `sslmode` asks for TLS (see the module's comment).
pub(super) fn tls() -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match std::env::var_os("PGSSLROOTCERT") {
        Some(path) => {
            let invalid = |reason: String| StoreError::Tls(format!("PGSSLROOTCERT {}: {reason}", path.display()));
            for certificate in CertificateDer::pem_file_iter(&path).map_err(|e| invalid(e.to_string()))? {
                let certificate = certificate.map_err(|e| invalid(e.to_string()))?;
                roots.add(certificate).map_err(|e| invalid(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(invalid("holds no certificate".into()));
            }
        }
        None => {
            // Certificates the system store holds but rustls can't read are left out, as browsers do.
            let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

pub struct PostgresStore {
    /// Always `Some` but in `drop`.
    pool: Option<Pool<Manager>>,
}

impl Drop for PostgresStore {
    /// The synchronous client closes its connections by blocking on a runtime of its own, which may not happen on
    /// a thread that drives async tasks (where the server drops its last handle): the pool goes on a thread of its
    /// own.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            super::off_runtime(move || drop(pool));
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and brings the schema forward.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let config: postgres::Config = url.parse()?;
        let tls = tls()?;
        // A first connection, here, says at once why the database can't be reached (the pool would retry until its
        // timeout, and keep only a summary of the last error).
        config.connect(tls.clone())?;
        let manager = PostgresConnectionManager::new(config, tls);
        let pool =
            Pool::builder().max_size(POOL_SIZE).connection_timeout(Duration::from_secs(10)).build_unchecked(manager);
        let store = PostgresStore { pool: Some(pool) };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> Result<Connection, StoreError> {
        Ok(self.pool.as_ref().expect("the pool lives until drop").get()?)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // Several nodes starting at once: one migrates, the others wait and then find nothing to do.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS kinetoscope_schema (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)",
        )?;
        let version: i64 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM kinetoscope_schema", &[])?.try_get(0)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::NewerSchema { found: version, known });
        }
        for (step, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(migration)?;
            tx.execute("INSERT INTO kinetoscope_schema VALUES ($1, now())", &[&(step as i64 + 1)])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs `update` (with `$1` the job id, `$2` the lease id, then `extra`) on the job while `lease` holds.
    fn fenced(&self, lease: &Lease, update: &str, extra: &[&(dyn ToSql + Sync)]) -> Result<bool, StoreError> {
        let text = format!("{update} WHERE id = $1 AND lease_id = $2 AND status = 'in_progress'");
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![&lease.job, &lease.id];
        values.extend_from_slice(extra);
        Ok(self.conn()?.execute(&text, &values)? == 1)
    }

    /// Ends a running job in one transaction with its event, its row locked: false, and nothing done, once
    /// the lease is lost.
    fn finish(
        &self,
        lease: &Lease,
        kind: EventKind,
        now: i64,
        update: &str,
        extra: &[&(dyn ToSql + Sync)],
        publish: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let holds = tx.query_opt(
            "SELECT 1 FROM videos WHERE id = $1 AND lease_id = $2 AND status = 'in_progress' FOR UPDATE",
            &[&lease.job, &lease.id],
        )?;
        if holds.is_none() {
            return Ok(false);
        }
        publish().map_err(StoreError::Publish)?;
        let text = format!("{update}, lease_id = NULL, lease_until = NULL WHERE id = $1");
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![&lease.job];
        values.extend_from_slice(extra);
        tx.execute(&text, &values)?;
        insert_event(&mut tx, kind, &lease.job, now)?;
        tx.commit()?;
        Ok(true)
    }
}

/// Queues the event of job `id`'s end, for its own `webhook_url` and the configured receivers.
fn insert_event(tx: &mut Transaction, kind: EventKind, id: &str, now: i64) -> Result<(), StoreError> {
    let text = format!(
        "INSERT INTO events (id, video_id, kind, created_at, target, due_ms)
         SELECT $1, id, $2, $3, webhook_url, {NOW_MS} FROM videos WHERE id = $4"
    );
    tx.execute(&text, &[&random_id("evt_"), &kind.as_str(), &now, &id])?;
    Ok(())
}

fn job_from_row(r: &Row) -> Result<Job, StoreError> {
    RawJob {
        id: r.try_get(0)?,
        created_at: r.try_get(1)?,
        status: r.try_get(2)?,
        progress: r.try_get(3)?,
        model: r.try_get(4)?,
        seconds: r.try_get(5)?,
        settings: r.try_get(6)?,
        remixed_from: r.try_get(7)?,
        webhook_url: r.try_get(8)?,
        attempts: r.try_get(9)?,
        completed_at: r.try_get(10)?,
        expires_at: r.try_get(11)?,
        error_code: r.try_get(12)?,
        error_message: r.try_get(13)?,
        result: r.try_get(14)?,
    }
    .parse()
}

fn event_from_row(r: &Row) -> Result<PendingEvent, StoreError> {
    RawEvent {
        id: r.try_get(0)?,
        video_id: r.try_get(1)?,
        kind: r.try_get(2)?,
        created_at: r.try_get(3)?,
        target: r.try_get(4)?,
        delivered: r.try_get(5)?,
        attempts: r.try_get(6)?,
    }
    .parse()
}

impl JobStore for PostgresStore {
    fn is_shared(&self) -> bool {
        true
    }

    fn recover(&self, now: i64) -> Result<usize, StoreError> {
        // Other processes may be rendering right now: only what lapsed is dead.
        self.requeue_lapsed(now)
    }

    fn requeue_lapsed(&self, now: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // A row a worker is finishing right now is locked, and skipped: its lease still names that worker.
        let select = format!(
            "SELECT id, attempts FROM videos WHERE status = 'in_progress' AND lease_until < {NOW_MS}
             FOR UPDATE SKIP LOCKED"
        );
        let lapsed = tx.query(&select, &[])?;
        for row in &lapsed {
            let (id, attempts): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            if attempts >= MAX_ATTEMPTS {
                tx.execute(&sql(POISON), &[&id, &now, &POISON_MESSAGE])?;
                insert_event(&mut tx, EventKind::Failed, &id, now)?;
            } else {
                tx.execute(&sql(LAPSED), &[&id])?;
            }
        }
        tx.commit()?;
        Ok(lapsed.len())
    }

    fn insert(&self, job: &NewJob, now: i64, max_queue: usize) -> Result<Job, StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // Inserts take turns, so that two API nodes can't both fill the last place in the queue.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INSERT_LOCK])?;
        let active: i64 = tx.query_one(ACTIVE, &[])?.try_get(0)?;
        if active as usize >= max_queue {
            return Err(StoreError::QueueFull { limit: max_queue });
        }
        let settings = serde_json::to_string(&job.settings).expect("settings serialize");
        let insert = format!("{} RETURNING {COLUMNS}", sql(INSERT));
        let row = tx.query_one(
            &insert,
            &[&job.id, &now, &job.model, &job.seconds, &settings, &job.remixed_from, &job.webhook_url],
        )?;
        tx.commit()?;
        job_from_row(&row)
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let text = format!("SELECT {COLUMNS} FROM videos WHERE id = $1");
        self.conn()?.query_opt(&text, &[&id])?.as_ref().map(job_from_row).transpose()
    }

    fn list(&self, after: Option<&str>, limit: usize, descending: bool) -> Result<(Vec<Job>, bool), StoreError> {
        let mut conn = self.conn()?;
        let cursor: Option<i64> = match after {
            Some(id) => Some(
                conn.query_opt("SELECT seq FROM videos WHERE id = $1", &[&id])?
                    .ok_or_else(|| StoreError::UnknownCursor { id: id.to_string() })?
                    .try_get(0)?,
            ),
            None => None,
        };
        let (compare, order) = if descending { ("<", "DESC") } else { (">", "ASC") };
        let bound = cursor.unwrap_or(if descending { i64::MAX } else { i64::MIN });
        let text = format!("SELECT {COLUMNS} FROM videos WHERE seq {compare} $1 ORDER BY seq {order} LIMIT $2");
        let rows = conn.query(&text, &[&bound, &(limit as i64 + 1)])?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
        let more = jobs.len() > limit;
        jobs.truncate(limit);
        Ok((jobs, more))
    }

    fn delete(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let text = format!("DELETE FROM videos WHERE id = $1 RETURNING {COLUMNS}");
        self.conn()?.query_opt(&text, &[&id])?.as_ref().map(job_from_row).transpose()
    }

    fn claim_next(
        &self,
        worker: &str,
        model: Option<&str>,
        duration: Duration,
    ) -> Result<Option<(Job, Lease)>, StoreError> {
        let lease_id = random_id("lease_");
        let text = format!(
            "UPDATE videos SET status = 'in_progress', progress = 0, attempts = attempts + 1, lease_id = $1,
                 lease_until = {NOW_MS} + $2, worker = $3
             WHERE seq = (SELECT seq FROM videos WHERE status = 'queued' AND ($4::TEXT IS NULL OR model = $4)
                          ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {COLUMNS}"
        );
        let row = self.conn()?.query_opt(&text, &[&lease_id, &millis(duration), &worker, &model])?;
        let Some(row) = row else { return Ok(None) };
        let job = job_from_row(&row)?;
        let lease = Lease { job: job.id.clone(), id: lease_id };
        Ok(Some((job, lease)))
    }

    fn renew(&self, lease: &Lease, duration: Duration) -> Result<bool, StoreError> {
        self.fenced(lease, &format!("UPDATE videos SET lease_until = {NOW_MS} + $3"), &[&millis(duration)])
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
        let rows = self.conn()?.query(&sql(EXPIRED), &[&since, &now])?;
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    fn queue_depth(&self) -> Result<Vec<(String, usize)>, StoreError> {
        let rows = self.conn()?.query(QUEUE_DEPTH, &[])?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as usize))).collect()
    }

    fn add_event(&self, kind: EventKind, video_id: &str, target: Option<&str>, now: i64) -> Result<(), StoreError> {
        let text = format!(
            "INSERT INTO events (id, video_id, kind, created_at, target, due_ms) VALUES ($1, $2, $3, $4, $5, {NOW_MS})"
        );
        self.conn()?.execute(&text, &[&random_id("evt_"), &video_id, &kind.as_str(), &now, &target])?;
        Ok(())
    }

    fn due_events(&self, limit: usize, lease: Duration) -> Result<Vec<PendingEvent>, StoreError> {
        let text = format!(
            "UPDATE events SET lease_until = {NOW_MS} + $2
             WHERE id IN (SELECT id FROM events WHERE due_ms <= {NOW_MS} AND lease_until <= {NOW_MS}
                          ORDER BY due_ms LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING {EVENT_COLUMNS}"
        );
        let rows = self.conn()?.query(&text, &[&(limit as i64), &millis(lease)])?;
        rows.iter().map(event_from_row).collect()
    }

    fn event_attempted(&self, event: &str, delivered: &[String], retry_in: Option<Duration>) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        match retry_in {
            None => conn.execute(&sql(DELETE_EVENT), &[&event])?,
            Some(delay) => {
                let text = format!(
                    "UPDATE events SET delivered = $2, attempts = attempts + 1, due_ms = {NOW_MS} + $3, lease_until = 0
                     WHERE id = $1"
                );
                let delivered = serde_json::to_string(delivered).expect("strings serialize");
                conn.execute(&text, &[&event, &delivered, &millis(delay)])?
            }
        };
        Ok(())
    }

    fn worker_seen(&self, worker: &WorkerInfo) -> Result<(), StoreError> {
        let text = format!(
            "INSERT INTO workers (id, model, device, seen_ms) VALUES ($1, $2, $3, {NOW_MS})
             ON CONFLICT (id) DO UPDATE SET model = $2, device = $3, seen_ms = {NOW_MS}"
        );
        self.conn()?.execute(&text, &[&worker.id, &worker.model, &worker.device])?;
        Ok(())
    }

    fn worker_gone(&self, worker: &str) -> Result<(), StoreError> {
        self.conn()?.execute(&sql(DELETE_WORKER), &[&worker])?;
        Ok(())
    }

    fn live_workers(&self, within: Duration) -> Result<Vec<WorkerInfo>, StoreError> {
        let text = format!("SELECT id, model, device FROM workers WHERE seen_ms >= {NOW_MS} - $1 ORDER BY id");
        let rows = self.conn()?.query(&text, &[&millis(within)])?;
        rows.iter().map(|r| Ok(WorkerInfo { id: r.try_get(0)?, model: r.try_get(1)?, device: r.try_get(2)? })).collect()
    }
}
