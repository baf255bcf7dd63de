//! What the fuzz targets share: a scratch copy of the tiny test model `models/tiny/wan21-tiny-a`, whose
//! files a target overwrites with fuzzed bytes, because Kinetoscope's loaders read model folders by path.

use std::path::Path;
use std::sync::OnceLock;

use kinetoscope::ModelDir;
use tempfile::TempDir;

/// A model folder that is valid until a target replaces one of its files.
pub struct ScratchModel {
    dir: TempDir,
}

impl ScratchModel {
    /// The process's scratch copy, made on first use. It lives until the process exits (libFuzzer exits
    /// without running destructors), so `scripts/fuzz.sh` points `TMPDIR` into the ignored `target/`.
    pub fn get() -> &'static ScratchModel {
        static SCRATCH: OnceLock<ScratchModel> = OnceLock::new();
        SCRATCH.get_or_init(|| {
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/wan21-tiny-a");
            let dir = tempfile::Builder::new().prefix("kinetoscope-fuzz-").tempdir().expect("a temporary folder");
            copy_tree(&source, dir.path());
            ScratchModel { dir }
        })
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `check` on the folder with `rel` holding `bytes`; afterwards `rel` is as it was (its own file, or
    /// none), so that every input sees the same folder.
    pub fn with_file<R>(&self, rel: &str, bytes: &[u8], check: impl FnOnce(&ModelDir) -> R) -> R {
        let path = self.root().join(rel);
        let original = std::fs::read(&path).ok();
        write(&path, bytes);
        let model = ModelDir::from_path(self.root()).expect("the scratch folder has a model_index.json");
        let result = check(&model);
        match original {
            Some(original) => write(&path, &original),
            None => std::fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display())),
        }
        result
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display())) {
        let entry = entry.expect("a folder entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            std::fs::create_dir_all(&target).expect("a scratch subfolder");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("a scratch copy");
        }
    }
}
