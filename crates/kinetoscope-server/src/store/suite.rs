//! One suite for both stores: each test runs on SQLite and on PostgreSQL.
//!
//! PostgreSQL's runs need a server: `KINETOSCOPE_TEST_POSTGRES` names one (a URL whose role may create
//! databases; `scripts/postgres.sh` starts one, and `scripts/test.sh` sets it). Each test gets a database of
//! its own. Without the variable the PostgreSQL runs say so and pass, unless `KINETOSCOPE_REQUIRE_POSTGRES`
//! is set, as CI sets it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Where a test's store lives; `open` may be called again, as a restarted process would.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(Box<ThrowawayDatabase>),
}

impl Backend {
    fn open(&self) -> Box<dyn JobStore> {
        match self {
            Backend::Sqlite(dir) => open(dir.path().join("jobs.sqlite").to_str().unwrap()).unwrap(),
            Backend::Postgres(database) => open(&database.url).unwrap(),
        }
    }
}

fn sqlite() -> Backend {
    Backend::Sqlite(tempfile::tempdir().unwrap())
}

fn postgres() -> Option<Backend> {
    let database = ThrowawayDatabase::from_env("KINETOSCOPE_TEST_POSTGRES").unwrap()?;
    Some(Backend::Postgres(Box::new(database)))
}

/// `fn name(backend: &Backend)` run as `name::sqlite` and `name::postgres`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn sqlite() {
                super::$name(&super::sqlite());
            }

            #[test]
            fn postgres() {
                if let Some(backend) = super::postgres() {
                    super::$name(&backend);
                }
            }
        }
    )*};
}

on_both!(
    jobs_survive_reopening_and_a_dead_workers_job_is_requeued,
    a_job_that_keeps_killing_its_worker_fails,
    the_queue_is_bounded,
    each_expired_video_is_swept_once,
    pages_follow_the_cursor_both_ways,
    a_lapsed_lease_fences_its_worker_out,
    workers_take_only_their_models_jobs,
    concurrent_workers_never_share_a_job,
    each_end_queues_one_event_and_each_event_is_claimed_once,
    live_workers_are_those_seen_lately,
);

const LEASE: Duration = Duration::from_secs(30);

fn job(id: &str) -> NewJob {
    job_for(id, "tiny")
}

fn job_for(id: &str, model: &str) -> NewJob {
    NewJob {
        id: id.into(),
        model: model.into(),
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

fn claim(store: &dyn JobStore) -> (Job, Lease) {
    store.claim_next("worker-a", None, LEASE).unwrap().expect("a queued job")
}

/// Waits out a lease of `lease`, so that it has lapsed by both clocks.
fn lapse(lease: Duration) {
    std::thread::sleep(lease + Duration::from_millis(30));
}

fn complete(store: &dyn JobStore, lease: &Lease, expires_at: i64) -> bool {
    store.complete(lease, 2, expires_at, None, &mut || Ok(())).unwrap()
}

fn jobs_survive_reopening_and_a_dead_workers_job_is_requeued(backend: &Backend) {
    let short = Duration::from_millis(50);
    {
        let store = backend.open();
        for id in ["video_a", "video_b", "video_c"] {
            store.insert(&job(id), 100, 10).unwrap();
        }
        let (running, lease) = store.claim_next("worker-a", None, short).unwrap().unwrap();
        assert_eq!((running.id.as_str(), running.status, running.attempts), ("video_a", Status::InProgress, 1));
        assert!(store.set_progress(&lease, 40).unwrap());
    }
    let store = backend.open();
    lapse(short);
    assert_eq!(store.recover(200).unwrap(), 1);
    let a = store.get("video_a").unwrap().unwrap();
    assert_eq!((a.status, a.progress), (Status::Queued, 0));
    assert_eq!(a.settings, job("video_a").settings);
    // Order is kept: the interrupted job runs first again.
    let (again, lease) = claim(&*store);
    assert_eq!((again.id.as_str(), again.attempts), ("video_a", 2));
    assert!(complete(&*store, &lease, 400));
    assert_eq!(claim(&*store).0.id, "video_b");
    assert_eq!(store.queue_depth().unwrap(), [("tiny".to_string(), 2)]);
}

fn a_job_that_keeps_killing_its_worker_fails(backend: &Backend) {
    let store = backend.open();
    let short = Duration::from_millis(20);
    store.insert(&job("video_poison"), 1, 10).unwrap();
    for _ in 0..MAX_ATTEMPTS {
        store.requeue_lapsed(2).unwrap();
        store.claim_next("worker-a", None, short).unwrap().unwrap();
        lapse(short);
    }
    assert_eq!(store.requeue_lapsed(3).unwrap(), 1);
    assert_eq!(store.requeue_lapsed(3).unwrap(), 0);
    let failed = store.get("video_poison").unwrap().unwrap();
    assert_eq!(failed.status, Status::Failed);
    let error = failed.error.unwrap();
    assert_eq!(error.code, "internal_error");
    assert!(error.message.ends_with("3 times"), "{}", error.message);
    // Its webhook event is queued with the failure.
    let events = store.due_events(10, LEASE).unwrap();
    assert_eq!(
        events.iter().map(|e| (e.video_id.as_str(), e.kind)).collect::<Vec<_>>(),
        [("video_poison", EventKind::Failed)]
    );
}

fn the_queue_is_bounded(backend: &Backend) {
    let store = backend.open();
    store.insert(&job("video_1"), 1, 2).unwrap();
    store.insert(&job("video_2"), 1, 2).unwrap();
    assert!(matches!(store.insert(&job("video_3"), 1, 2), Err(StoreError::QueueFull { limit: 2 })));
    let (_, lease) = claim(&*store);
    assert!(complete(&*store, &lease, 3));
    store.insert(&job("video_3"), 1, 2).unwrap();
}

fn each_expired_video_is_swept_once(backend: &Backend) {
    let store = backend.open();
    for (id, expires) in [("video_early", 100), ("video_late", 200)] {
        store.insert(&job(id), 1, 10).unwrap();
        let (_, lease) = claim(&*store);
        assert!(complete(&*store, &lease, expires));
    }
    assert_eq!(store.expired(i64::MIN, 150).unwrap(), ["video_early"]);
    assert_eq!(store.expired(150, 250).unwrap(), ["video_late"]);
    assert!(store.expired(250, 300).unwrap().is_empty());
}

fn pages_follow_the_cursor_both_ways(backend: &Backend) {
    let store = backend.open();
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
    assert_eq!(store.delete("video_2").unwrap().unwrap().id, "video_2");
    assert_eq!(store.delete("video_2").unwrap(), None);
}

/// A worker that comes back after its lease lapsed (a network split, a long pause) can neither report
/// progress, nor complete, fail or re-queue the job, nor put its files in place: the new owner's result stands.
fn a_lapsed_lease_fences_its_worker_out(backend: &Backend) {
    let store = backend.open();
    let short = Duration::from_millis(50);
    store.insert(&job("video_a"), 1, 10).unwrap();
    let (_, stale) = store.claim_next("worker-a", None, short).unwrap().unwrap();
    assert!(store.renew(&stale, short).unwrap(), "a live lease renews");
    lapse(short);
    assert_eq!(store.requeue_lapsed(2).unwrap(), 1);
    let (_, owner) = store.claim_next("worker-b", None, LEASE).unwrap().unwrap();
    assert_ne!(stale.id, owner.id);

    assert!(!store.renew(&stale, LEASE).unwrap());
    assert!(!store.set_progress(&stale, 50).unwrap());
    let mut published = false;
    assert!(!store
        .complete(&stale, 3, 4, None, &mut || {
            published = true;
            Ok(())
        })
        .unwrap());
    assert!(!published, "a stale worker's files are never put in place");
    assert!(!store.fail(&stale, 3, "internal_error", "stale").unwrap());
    assert!(!store.requeue(&stale).unwrap());

    assert!(store.set_progress(&owner, 60).unwrap());
    let result = serde_json::json!({"region": {"unmasked_max_abs": 0.0}});
    assert!(store
        .complete(&owner, 5, 6, Some(&result), &mut || {
            published = true;
            Ok(())
        })
        .unwrap());
    assert!(published);
    let done = store.get("video_a").unwrap().unwrap();
    assert_eq!((done.status, done.progress, done.attempts, done.completed_at), (Status::Completed, 100, 2, Some(5)));
    assert_eq!(done.result, Some(result));
    // After the end no lease holds, the owner's included.
    assert!(!store.set_progress(&owner, 10).unwrap());

    // A failure to put the files in place leaves the job running, for its worker to handle.
    store.insert(&job("video_b"), 1, 10).unwrap();
    let (_, lease) = claim(&*store);
    let full = store.complete(&lease, 7, 8, None, &mut || Err(std::io::Error::from_raw_os_error(28)));
    assert!(full.unwrap_err().is_disk_full());
    assert_eq!(store.get("video_b").unwrap().unwrap().status, Status::InProgress);
    assert!(store.requeue(&lease).unwrap());
    let requeued = store.get("video_b").unwrap().unwrap();
    assert_eq!((requeued.status, requeued.attempts), (Status::Queued, 0));
}

fn workers_take_only_their_models_jobs(backend: &Backend) {
    let store = backend.open();
    store.insert(&job_for("video_t2v", "wan-t2v"), 1, 10).unwrap();
    store.insert(&job_for("video_ti2v", "wan-ti2v"), 1, 10).unwrap();
    let (job, _) = store.claim_next("worker-b", Some("wan-ti2v"), LEASE).unwrap().unwrap();
    assert_eq!(job.id, "video_ti2v");
    assert!(store.claim_next("worker-b", Some("wan-ti2v"), LEASE).unwrap().is_none());
    assert!(store.claim_next("worker-c", Some("other"), LEASE).unwrap().is_none());
    assert_eq!(store.claim_next("worker-a", Some("wan-t2v"), LEASE).unwrap().unwrap().0.id, "video_t2v");
}

fn concurrent_workers_never_share_a_job(backend: &Backend) {
    let store: Arc<dyn JobStore> = Arc::from(backend.open());
    let jobs = 120;
    for i in 0..jobs {
        store.insert(&job(&format!("video_{i:03}")), i, jobs as usize).unwrap();
    }
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut taken = Vec::new();
                while let Some((job, lease)) = store.claim_next(&format!("worker-{w}"), None, LEASE).unwrap() {
                    assert!(store.complete(&lease, 2, 3, None, &mut || Ok(())).unwrap());
                    taken.push(job.id);
                }
                taken
            })
        })
        .collect();
    let taken: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert_eq!(taken.len(), jobs as usize);
    assert_eq!(taken.iter().collect::<HashSet<_>>().len(), jobs as usize, "no job was taken twice");
    assert!(store.queue_depth().unwrap().is_empty());
}

fn each_end_queues_one_event_and_each_event_is_claimed_once(backend: &Backend) {
    let store = backend.open();
    let mut with_target = job("video_a");
    with_target.webhook_url = Some("http://127.0.0.1:9/hook".into());
    store.insert(&with_target, 1, 10).unwrap();
    store.insert(&job("video_b"), 1, 10).unwrap();
    let (_, a) = claim(&*store);
    assert!(complete(&*store, &a, 3));
    let (_, b) = claim(&*store);
    assert!(store.fail(&b, 2, "invalid_request", "no").unwrap());

    let events = store.due_events(10, Duration::from_millis(100)).unwrap();
    let seen: Vec<_> = events.iter().map(|e| (e.video_id.as_str(), e.kind, e.target.as_deref())).collect();
    assert_eq!(
        seen,
        [("video_a", EventKind::Completed, Some("http://127.0.0.1:9/hook")), ("video_b", EventKind::Failed, None)]
    );
    assert!(events.iter().all(|e| e.id.starts_with("evt_") && e.attempts == 0 && e.delivered.is_empty()));
    // Claimed: no other node gets them while the claim holds.
    assert!(store.due_events(10, LEASE).unwrap().is_empty());

    // One target took it; the other is tried again later, the first not again.
    let delivered = vec!["http://127.0.0.1:9/hook".to_string()];
    store.event_attempted(&events[0].id, &delivered, Some(Duration::from_millis(50))).unwrap();
    store.event_attempted(&events[1].id, &[], None).unwrap();
    assert!(store.due_events(10, LEASE).unwrap().is_empty(), "not due yet");
    std::thread::sleep(Duration::from_millis(200));
    let again = store.due_events(10, LEASE).unwrap();
    assert_eq!(again.len(), 1, "the done event is gone; the claim of the other lapsed and it is due");
    assert_eq!((again[0].id.as_str(), again[0].attempts, &again[0].delivered), (events[0].id.as_str(), 1, &delivered));

    store.add_event(EventKind::Completed, "video_c", None, 9).unwrap();
    let added = store.due_events(10, LEASE).unwrap();
    assert_eq!((added.len(), added[0].video_id.as_str(), added[0].created_at), (1, "video_c", 9));
}

fn live_workers_are_those_seen_lately(backend: &Backend) {
    let store = backend.open();
    let worker = |id: &str, model: &str| WorkerInfo { id: id.into(), model: model.into(), device: "cpu".into() };
    store.worker_seen(&worker("w1", "wan-t2v")).unwrap();
    store.worker_seen(&worker("w2", "wan-ti2v")).unwrap();
    store.worker_seen(&worker("w2", "wan-ti2v")).unwrap();
    assert_eq!(store.live_workers(LEASE).unwrap(), [worker("w1", "wan-t2v"), worker("w2", "wan-ti2v")]);
    store.worker_gone("w1").unwrap();
    assert_eq!(store.live_workers(LEASE).unwrap(), [worker("w2", "wan-ti2v")]);
    std::thread::sleep(Duration::from_millis(60));
    assert!(store.live_workers(Duration::from_millis(50)).unwrap().is_empty());
}

/// A database from before schema versions (and before jobs had results) is brought forward: its jobs read
/// with no result, and they can be claimed under leases.
#[test]
fn an_older_sqlite_database_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    let old = "CREATE TABLE videos (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL, status TEXT NOT NULL, progress INTEGER NOT NULL DEFAULT 0, model TEXT NOT NULL,
        seconds TEXT NOT NULL, settings TEXT NOT NULL, remixed_from TEXT, webhook_url TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, completed_at INTEGER, expires_at INTEGER, error_code TEXT,
        error_message TEXT)";
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(old).unwrap();
    let settings = serde_json::to_string(&job("video_old").settings).unwrap();
    db.execute(
        "INSERT INTO videos (id, created_at, status, model, seconds, settings) VALUES ('video_old', 1, 'queued', 'tiny', '1', ?1)",
        [settings],
    )
    .unwrap();
    drop(db);
    let store = open(path.to_str().unwrap()).unwrap();
    assert_eq!(store.get("video_old").unwrap().unwrap().result, None);
    let (_, lease) = claim(&*store);
    let result = serde_json::json!({"region": {"unmasked_max_abs": 0.0}});
    assert!(store.complete(&lease, 3, 4, Some(&result), &mut || Ok(())).unwrap());
    drop(store);
    let store = open(path.to_str().unwrap()).unwrap();
    assert_eq!(store.get("video_old").unwrap().unwrap().to_object()["result"], result);
}

#[test]
fn a_newer_schema_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
    let error = open(path.to_str().unwrap()).err().unwrap();
    assert!(matches!(error, StoreError::NewerSchema { found: 99, .. }), "{error}");
}

#[test]
fn a_store_urls_password_stays_out_of_logs() {
    assert_eq!(redact_location("postgres://kt:secret@db:5432/jobs"), "postgres://kt:***@db:5432/jobs");
    assert_eq!(redact_location("/data/jobs.sqlite"), "/data/jobs.sqlite");
}

/// Over TLS, where the URL asks (`sslmode=require`): the connection is encrypted and the server's certificate
/// checked against `PGSSLROOTCERT`; the same server refuses the store without TLS. Needs
/// `KINETOSCOPE_TEST_POSTGRES_TLS` and `PGSSLROOTCERT` (`POSTGRES_TLS=on scripts/postgres.sh`; `scripts/test.sh`
/// starts one).
#[test]
fn a_store_over_tls_checks_the_servers_certificate() {
    let Some(database) = ThrowawayDatabase::from_env("KINETOSCOPE_TEST_POSTGRES_TLS").unwrap() else { return };
    assert!(database.url.contains("sslmode=require"), "{}", database.url);
    let store = open(&database.url).unwrap();
    store.insert(&job("video_tls"), 1, 10).unwrap();
    let (_, lease) = claim(&*store);
    assert!(complete(&*store, &lease, 3));
    let mut client = database.url.parse::<::postgres::Config>().unwrap().connect(postgres::tls().unwrap()).unwrap();
    let encrypted: bool =
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap().get(0);
    assert!(encrypted);
    drop(client);

    let plain = database.url.replace("sslmode=require", "sslmode=disable");
    let refused = open(&plain).err().expect("the server takes TLS connections only");
    assert!(refused.to_string().contains("no encryption"), "{refused}");
}
