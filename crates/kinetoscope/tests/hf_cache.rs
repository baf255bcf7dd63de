//! A model found in a Hugging Face hub cache by repository id, laid out as the hub writes it: snapshot
//! files are symbolic links into `blobs/`, and `refs/main` names the snapshot.

mod common;

use std::path::Path;

use common::{reference_request, tiny};
use kinetoscope::{LoadOptions, ModelDir, Pipeline};

fn link_tree(from: &Path, snapshot: &Path, blobs: &Path, rel: &Path) {
    for entry in std::fs::read_dir(from.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let rel = rel.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(snapshot.join(&rel)).unwrap();
            link_tree(from, snapshot, blobs, &rel);
        } else {
            let blob = blobs.join(rel.to_string_lossy().replace('/', "_"));
            std::fs::copy(entry.path(), &blob).unwrap();
            std::os::unix::fs::symlink(&blob, snapshot.join(&rel)).unwrap();
        }
    }
}

#[test]
fn loads_a_model_from_the_hub_cache_by_repo_id() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--Wan-AI--Wan2.1-T2V-tiny-Diffusers");
    let (snapshot, blobs) = (repo.join("snapshots/0123abcd"), repo.join("blobs"));
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    link_tree(&tiny().join("wan21-tiny-b"), &snapshot, &blobs, Path::new(""));

    let dir = ModelDir::from_hf_cache("Wan-AI/Wan2.1-T2V-tiny-Diffusers", cache.path()).unwrap();
    let pipeline = Pipeline::load(&dir, &LoadOptions::default()).unwrap();
    let identity = pipeline.identity();
    assert_eq!(identity.repo_id.as_deref(), Some("Wan-AI/Wan2.1-T2V-tiny-Diffusers"));
    assert_eq!(identity.revision.as_deref(), Some("0123abcd"));
    let video =
        pipeline.generate(&kinetoscope::GenerateRequest { steps: 1, ..reference_request("wan21-tiny-b") }).unwrap();
    assert_eq!((video.num_frames, video.height, video.width), (13, 48, 32));
}
