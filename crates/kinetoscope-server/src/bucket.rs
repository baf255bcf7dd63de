//! Object storage (S3 or any S3-compatible server) for a deployment's files, in place of a shared data folder:
//! finished videos and thumbnails (`videos/<id>.mp4`, `.png`), the sources of edits (`inputs/<id>.<kind>`), and
//! what workers stage before a completion puts it in place (`staging/<id>.<lease>.<ext>`), all under the URL's
//! prefix. Each machine's data folder keeps only local copies of what it works on.
//!
//! Putting a video in place is a copy inside the bucket, made inside the completing transaction while the lease
//! holds, as the rename is for a shared folder: a worker that lost its job never publishes.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore};
use tokio::io::AsyncWriteExt;

use crate::unix_now;

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("object storage {url}: expected s3://BUCKET or s3://BUCKET/PREFIX (the endpoint, region and keys come from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")]
    InvalidUrl { url: String },
    #[error("object storage {url}: {source}")]
    Store { url: String, source: object_store::Error },
    #[error("object storage {url}: {key}: {source}")]
    Object { url: String, key: String, source: object_store::Error },
    #[error("object storage {url}: {key}: local file {path}: {source}")]
    Local { url: String, key: String, path: String, source: std::io::Error },
    #[error("object storage {url}: {key}: cannot write: {source}")]
    Write { url: String, key: String, source: std::io::Error },
    #[error("object storage {url}: the task was lost: {reason}")]
    Task { url: String, reason: String },
}

impl BucketError {
    /// The object asked for does not exist (deleted, expired, never written).
    pub fn is_not_found(&self) -> bool {
        matches!(self, BucketError::Object { source: object_store::Error::NotFound { .. }, .. })
    }
}

/// A bucket and the prefix this deployment's objects live under.
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// The URL as given (it holds no secret: keys come from the environment), for messages.
    url: String,
    /// The bucket's own threads: its calls come from the async API, from worker threads and from inside store
    /// transactions, whatever runtime (if any) the caller runs on. Shut down without waiting when dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Bucket {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The part of a video a download asks for (a `Range` header), checked against its size.
pub struct Download {
    pub meta: ObjectMeta,
    pub range: Range<u64>,
    pub body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, object_store::Error>> + Send>>,
}

impl Bucket {
    /// Opens `url` (`s3://BUCKET/PREFIX`) with the credentials, region and endpoint of the `AWS_*` environment
    /// variables, and checks that it answers and that the keys are accepted.
    pub fn open(url: &str) -> Result<Bucket, BucketError> {
        let invalid = || BucketError::InvalidUrl { url: url.to_string() };
        let parsed = url::Url::parse(url).map_err(|_| invalid())?;
        if parsed.scheme() != "s3" || parsed.host_str().is_none_or(str::is_empty) {
            return Err(invalid());
        }
        let prefix = Key::parse(parsed.path().trim_matches('/')).map_err(|_| invalid())?;
        let store = AmazonS3Builder::from_env()
            .with_url(url)
            .build()
            .map_err(|source| BucketError::Store { url: url.to_string(), source })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bucket")
            .enable_all()
            .build()
            .map_err(|e| BucketError::Task { url: url.to_string(), reason: e.to_string() })?;
        let bucket = Bucket { store: Arc::new(store), prefix, url: url.to_string(), runtime: Some(runtime) };
        // A key that is never written: "not found" is the answer of a bucket that is there and lets us in.
        match bucket.wait(bucket.head(".kinetoscope-probe")) {
            Ok(_) => Ok(bucket),
            Err(e) if e.is_not_found() => Ok(bucket),
            Err(e) => Err(e),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, name: &str) -> Key {
        self.prefix.parts().chain(Key::from(name).parts()).collect()
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until the bucket is dropped")
    }

    /// Runs `call` on the bucket's threads and waits for it, from a thread that may block (never an async task).
    pub fn wait<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, BucketError>> + Send + 'static,
    ) -> Result<T, BucketError> {
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        self.runtime().spawn(async move {
            let _ = send.send(call.await);
        });
        receive.recv().map_err(|e| BucketError::Task { url: self.url.clone(), reason: e.to_string() })?
    }

    /// Runs `call` on the bucket's threads, from an async task.
    pub async fn run<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, BucketError>> + Send + 'static,
    ) -> Result<T, BucketError> {
        let task = self.runtime().spawn(call);
        task.await.map_err(|e| BucketError::Task { url: self.url.clone(), reason: e.to_string() })?
    }

    /// The object `name`'s size, tag and time.
    pub fn head(&self, name: &str) -> impl std::future::Future<Output = Result<ObjectMeta, BucketError>> + 'static {
        let (store, key, error) = (self.store.clone(), self.key(name), self.owned_error(name));
        async move { store.head(&key).await.map_err(error) }
    }

    fn owned_error(&self, name: &str) -> impl Fn(object_store::Error) -> BucketError + Send + 'static {
        let (url, key) = (self.url.clone(), name.to_string());
        move |source| BucketError::Object { url: url.clone(), key: key.clone(), source }
    }

    /// Writes the local file `path` as the object `name` (in parts, for a large one).
    pub fn upload(&self, path: &Path, name: &str) -> impl std::future::Future<Output = Result<(), BucketError>> {
        let (store, key) = (self.store.clone(), self.key(name));
        let (path, url, name) = (path.to_path_buf(), self.url.clone(), name.to_string());
        async move {
            let local = local_error(&url, &name, &path);
            let mut file = tokio::fs::File::open(&path).await.map_err(&local)?;
            let mut writer = object_store::buffered::BufWriter::new(store, key);
            if let Err(e) = tokio::io::copy(&mut file, &mut writer).await {
                let _ = writer.abort().await;
                return Err(local(e));
            }
            // The object exists once the writer is shut down (a single put, or the multipart upload completed).
            writer.shutdown().await.map_err(|source| BucketError::Write { url: url.clone(), key: name.clone(), source })
        }
    }

    /// Writes the object `name` to the local file `path` (through a temporary name beside it, renamed when whole).
    pub fn download(&self, name: &str, path: &Path) -> impl std::future::Future<Output = Result<(), BucketError>> {
        let (store, key, error) = (self.store.clone(), self.key(name), self.owned_error(name));
        let (path, url, name) = (path.to_path_buf(), self.url.clone(), name.to_string());
        async move {
            let local = local_error(&url, &name, &path);
            let mut stream = store.get(&key).await.map_err(&error)?.into_stream();
            let dir = path.parent().unwrap_or(Path::new("."));
            let temporary = tempfile::Builder::new().prefix(".download.tmp-").tempfile_in(dir).map_err(&local)?;
            let (file, temporary) = temporary.into_parts();
            let mut file = tokio::fs::File::from_std(file);
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk.map_err(&error)?).await.map_err(&local)?;
            }
            file.flush().await.map_err(&local)?;
            temporary.persist(&path).map_err(|e| local(e.error))
        }
    }

    /// Copies the object `from` to `to`, inside the bucket.
    pub fn copy(&self, from: &str, to: &str) -> impl std::future::Future<Output = Result<(), BucketError>> {
        let (store, source, target, error) = (self.store.clone(), self.key(from), self.key(to), self.owned_error(from));
        async move { store.copy(&source, &target).await.map_err(error) }
    }

    /// Deletes the objects `names`; one that is not there is not an error.
    pub fn delete(&self, names: &[String]) -> impl std::future::Future<Output = Result<(), BucketError>> {
        let keys: Vec<_> = names.iter().map(|name| (self.key(name), self.owned_error(name))).collect();
        let store = self.store.clone();
        async move {
            for (key, error) in keys {
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(error(e)),
                }
            }
            Ok(())
        }
    }

    /// The bytes of the object `name` a `Range` header asks for (`None`: all of them); `Ok(Err(size))` for a
    /// range that is not inside the object.
    pub async fn get(&self, name: &str, range: Option<&str>) -> Result<Result<Download, u64>, BucketError> {
        let (store, key, error) = (self.store.clone(), self.key(name), self.owned_error(name));
        let range = range.map(str::to_string);
        self.run(async move {
            let meta = store.head(&key).await.map_err(&error)?;
            let wanted = match range.as_deref().map(http_range_header::parse_range_header) {
                // A header that doesn't parse is ignored (RFC 9110, 14.2): the whole object.
                None | Some(Err(_)) => 0..meta.size,
                Some(Ok(ranges)) => match ranges.validate(meta.size) {
                    // One range is served; several would need a multipart body: the whole object instead.
                    Ok(ranges) if ranges.len() == 1 => *ranges[0].start()..ranges[0].end() + 1,
                    Ok(_) => 0..meta.size,
                    Err(_) => return Ok(Err(meta.size)),
                },
            };
            // The object read is the one measured: a replaced object fails the read instead of mixing two.
            let options = GetOptions {
                range: (wanted != (0..meta.size)).then(|| GetRange::Bounded(wanted.clone())),
                if_match: meta.e_tag.clone(),
                ..GetOptions::default()
            };
            let result = store.get_opts(&key, options).await.map_err(&error)?;
            let range = result.range.clone();
            Ok(Ok(Download { meta, range, body: result.into_stream().boxed() }))
        })
        .await
    }

    /// The names of the objects under `prefix` last written more than `older_than` ago.
    pub fn list_older(
        &self,
        prefix: &str,
        older_than: Duration,
    ) -> impl std::future::Future<Output = Result<Vec<String>, BucketError>> {
        let (store, key, error, base) =
            (self.store.clone(), self.key(prefix), self.owned_error(prefix), self.prefix.clone());
        async move {
            let keys = written_before(store.as_ref(), &key, older_than).await.map_err(error)?;
            let names = keys.iter().filter_map(|key| Some(key.prefix_match(&base)?.collect::<Key>().to_string()));
            Ok(names.collect())
        }
    }

    /// Deletes what workers staged under `prefix` (`staging/`) and never put in place (they died, or lost their
    /// job), once older than `older_than`; returns how many.
    pub fn sweep(
        &self,
        prefix: &str,
        older_than: Duration,
    ) -> impl std::future::Future<Output = Result<usize, BucketError>> {
        let (store, key, error) = (self.store.clone(), self.key(prefix), self.owned_error(prefix));
        async move {
            let stale = written_before(store.as_ref(), &key, older_than).await.map_err(&error)?;
            for key in &stale {
                match store.delete(key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(error(e)),
                }
            }
            Ok(stale.len())
        }
    }
}

/// The keys under `prefix` last written more than `older_than` ago.
async fn written_before(store: &dyn ObjectStore, prefix: &Key, older_than: Duration) -> object_store::Result<Vec<Key>> {
    let before = unix_now() - older_than.as_secs() as i64;
    store
        .list(Some(prefix))
        .try_filter(|meta| std::future::ready(meta.last_modified.timestamp() <= before))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
}

/// A failure of the local file `path` while moving the object `name`.
fn local_error(url: &str, name: &str, path: &Path) -> impl Fn(std::io::Error) -> BucketError {
    let (url, key, path) = (url.to_string(), name.to_string(), path.display().to_string());
    move |source| BucketError::Local { url: url.clone(), key: key.clone(), path: path.clone(), source }
}

/// The object names of a job's files.
pub fn video_name(id: &str, extension: &str) -> String {
    format!("videos/{id}.{extension}")
}

/// What a worker stages for a job under its lease, before the completion copies it in place.
pub fn staging_name(id: &str, lease: &str, extension: &str) -> String {
    format!("staging/{id}.{lease}.{extension}")
}

/// A job's source, by the file name it has in a data folder's `inputs/`.
pub fn input_name(file_name: &str) -> String {
    format!("inputs/{file_name}")
}

/// For tests: a fresh prefix (`s3://BUCKET/PREFIX/<random>`) in the bucket `KINETOSCOPE_TEST_BUCKET` names, on the
/// server the `AWS_*` variables name (`scripts/s3.sh` starts one). `None` when the variable is not set (the test
/// says so and passes), unless `KINETOSCOPE_REQUIRE_S3` is set, as CI sets it: then it is an error.
pub fn throwaway_location() -> Result<Option<String>, String> {
    match std::env::var("KINETOSCOPE_TEST_BUCKET") {
        Ok(url) => Ok(Some(format!("{}/{:016x}", url.trim_end_matches('/'), rand::random::<u64>()))),
        Err(_) if std::env::var_os("KINETOSCOPE_REQUIRE_S3").is_some() => {
            Err("KINETOSCOPE_REQUIRE_S3 is set but KINETOSCOPE_TEST_BUCKET is not: start scripts/s3.sh".into())
        }
        Err(_) => {
            eprintln!("KINETOSCOPE_TEST_BUCKET is not set: what needs object storage there is skipped");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ranges_copy_delete_and_sweep() {
        let Some(url) = throwaway_location().unwrap() else { return };
        let bucket = Bucket::open(&url).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("video.mp4");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&local, &bytes).unwrap();
        bucket.wait(bucket.upload(&local, "staging/a.lease_1.mp4")).unwrap();
        bucket.wait(bucket.copy("staging/a.lease_1.mp4", "videos/a.mp4")).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let read = |range: Option<&str>| {
            runtime.block_on(async {
                match bucket.get("videos/a.mp4", range).await.unwrap() {
                    Ok(download) => {
                        let chunks: Vec<Bytes> = download.body.try_collect().await.unwrap();
                        Ok((download.range, chunks.concat()))
                    }
                    Err(size) => Err(size),
                }
            })
        };
        assert_eq!(read(None).unwrap(), (0..100_000, bytes.clone()));
        assert_eq!(read(Some("bytes=10-19")).unwrap(), (10..20, bytes[10..20].to_vec()));
        assert_eq!(read(Some("bytes=-5")).unwrap(), (99_995..100_000, bytes[99_995..].to_vec()));
        assert_eq!(read(Some("bytes=200000-")), Err(100_000));
        let back = dir.path().join("back.mp4");
        bucket.wait(bucket.download("videos/a.mp4", &back)).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), bytes);
        assert_eq!(bucket.wait(bucket.sweep("staging", Duration::from_secs(3600))).unwrap(), 0);
        assert_eq!(bucket.wait(bucket.sweep("staging", Duration::ZERO)).unwrap(), 1);
        bucket.wait(bucket.delete(&["videos/a.mp4".into(), "videos/never.mp4".into()])).unwrap();
        assert!(bucket.wait(bucket.head("videos/a.mp4")).unwrap_err().is_not_found());
    }
}
