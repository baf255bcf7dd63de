//! `kinetoscope models list` and `kinetoscope models verify` through the binary.

use std::path::PathBuf;
use std::process::{Command, Output};

fn models(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kinetoscope")).arg("models").args(args).output().expect("the binary runs")
}

fn tiny_model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny").join(name).display().to_string()
}

#[test]
fn list_shows_every_registry_entry() {
    let out = models(&["list"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for repo in
        ["Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "Wan-AI/Wan2.2-TI2V-5B-Diffusers"]
    {
        assert!(stdout.contains(repo), "{stdout}");
    }
}

/// The tiny models are of the supported families but no registry entry: `generate` takes the built-in
/// defaults for them.
#[test]
fn verify_passes_the_tiny_models() {
    for (name, family) in [
        ("wan21-tiny-a", "Wan 2.1 text-to-video"),
        ("wan21-tiny-b", "Wan 2.1 text-to-video"),
        ("wan22-ti2v-tiny-a", "Wan 2.2 text- and image-to-video"),
    ] {
        let out = models(&["verify", &tiny_model(name)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let unknown = format!("unknown model of the {family} family");
        assert!(stdout.contains(&unknown) && stdout.contains("transformer"), "{stdout}");
    }
}

#[test]
fn verify_fails_naming_the_missing_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": "WanPipeline"}"#).unwrap();
    let out = models(&["verify", &tmp.path().display().to_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("component scheduler should be"), "{stderr}");
}
