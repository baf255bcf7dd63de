//! Free space on the data folder's disk: new work is refused, and queued work waits, while it is below
//! `Config::min_free_disk`, so a full disk fails no job that was fine and every delete can still free space.

use std::path::Path;

use crate::error::ApiError;
use crate::Shared;

/// Bytes an unprivileged process may still write on the filesystem holding `path` (`f_bavail`, not the
/// blocks reserved for root).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(path)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// The free bytes, when they are below the threshold (`None`: enough, or unknown, which is logged).
pub fn short(shared: &Shared) -> Option<u64> {
    match free_bytes(&shared.config.data_dir) {
        Ok(free) => (free < shared.config.min_free_disk).then_some(free),
        Err(e) => {
            tracing::warn!("cannot read the data folder's free space: {e}");
            None
        }
    }
}

/// Refuses new work with 507 while the disk is short.
pub fn check(shared: &Shared) -> Result<(), ApiError> {
    match short(shared) {
        Some(free) => Err(ApiError::insufficient_storage(format!(
            "the server's disk has {free} bytes free, below its threshold of {} (--min-free-disk); \
             no new video is taken until space is freed: retry later",
            shared.config.min_free_disk
        ))),
        None => Ok(()),
    }
}
