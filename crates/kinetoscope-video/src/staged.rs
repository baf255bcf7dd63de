//! Write-then-rename: a file is built under a hidden temporary name beside its destination
//! (same directory, so the rename is atomic on one file system) and appears under its real
//! name only when complete. Dropping a `Staged` without committing removes the temporary file.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::VideoError;

pub(crate) struct Staged {
    temp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    /// Creates `.{name}.tmp-{pid}-{n}` next to `target`; `create_new` guarantees the name is
    /// ours alone, even with several writers in one directory.
    pub(crate) fn create(target: &Path) -> Result<(Self, File), VideoError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().ok_or_else(|| VideoError::NotAFile { path: target.to_path_buf() })?;
        let temp = target.with_file_name(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new().write(true).create_new(true).open(&temp).map_err(|source| VideoError::Io {
            action: "create the temporary file",
            path: temp.clone(),
            source,
        })?;
        let staged = Self { temp, target: target.to_path_buf(), committed: false };
        Ok((staged, file))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.temp
    }

    /// Syncs the finished file to disk, then renames it over the target: after a crash the
    /// target is either the old file or the complete new one.
    pub(crate) fn commit(mut self) -> Result<(), VideoError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| VideoError::Io { action, path, source }
        };
        File::open(&self.temp).and_then(|file| file.sync_all()).map_err(io("sync", &self.temp))?;
        fs::rename(&self.temp, &self.target).map_err(io("move the finished file to", &self.target))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error being returned matters more than a leftover temp file.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn dropped_without_commit_leaves_target_untouched_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.mp4");
        fs::write(&target, b"old").unwrap();
        {
            let (staged, mut file) = Staged::create(&target).unwrap();
            file.write_all(b"half a video").unwrap();
            assert!(staged.path().exists());
            assert!(staged.path().file_name().unwrap().to_string_lossy().starts_with(".out.mp4.tmp-"));
        }
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(entries(dir.path()), ["out.mp4"]);
    }

    #[test]
    fn commit_replaces_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.mp4");
        fs::write(&target, b"old").unwrap();
        let (staged, mut file) = Staged::create(&target).unwrap();
        file.write_all(b"new").unwrap();
        drop(file);
        staged.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(entries(dir.path()), ["out.mp4"]);
    }

    #[test]
    fn two_writers_get_distinct_temp_names() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.mp4");
        let (a, _) = Staged::create(&target).unwrap();
        let (b, _) = Staged::create(&target).unwrap();
        assert_ne!(a.path(), b.path());
    }
}
