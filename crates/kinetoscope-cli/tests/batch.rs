//! `kinetoscope batch` end to end through the binary on the small test model: everything renders, a
//! rerun skips what is done and redoes what is missing or stale, bad manifests fail before any rendering,
//! a failing item doesn't stop the others, concurrent shards render every item exactly once, a run
//! killed midway leaves only complete outputs, resumed by rendering exactly the missing items, and an item
//! with an image starts from it (Wan 2.2 TI2V) and renders again when the image changes, as an item with a
//! first and a last image does (Wan 2.2 I2V-A14B) when either changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use sha2::{Digest, Sha256};

fn tiny_model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny").join(name)
}

/// `kinetoscope batch manifest --out out` with the tiny Wan 2.1 model.
fn batch_command(manifest: &Path, out: &Path) -> Command {
    batch_command_with("wan21-tiny-a", manifest, out)
}

/// `kinetoscope batch manifest --out out --model models/tiny/<model>`, with no scheduler variables from the
/// test's environment.
fn batch_command_with(model: &str, manifest: &Path, out: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinetoscope"));
    command.arg("batch").arg(manifest).arg("--out").arg(out).arg("--model").arg(tiny_model(model));
    for var in [
        "JOB_COMPLETION_INDEX",
        "KINETOSCOPE_SHARDS",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_ARRAY_TASK_COUNT",
    ] {
        command.env_remove(var);
    }
    command
}

fn batch(manifest: &Path, out: &Path) -> Output {
    batch_command(manifest, out).output().expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small, fast item: 32×48, 9 frames, 1 or 2 steps, short text.
fn item(id: &str, extra: &str) -> String {
    format!(
        r#"{{"id": "{id}", "prompt": "clip {id}", "height": 32, "width": 48, "num_frames": 9, "steps": 2, "max_sequence_length": 16{extra}}}"#
    )
}

fn write_manifest(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("manifest.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The lines of a results file, as (id, status, error_code).
fn results(path: &Path) -> Vec<(String, String, Option<String>)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(v["seconds"].as_f64().is_some(), "{line}");
            let text = |key: &str| v[key].as_str().map(str::to_owned);
            (text("id").unwrap(), text("status").unwrap(), text("error_code"))
        })
        .collect()
}

fn statuses(lines: &[(String, String, Option<String>)]) -> BTreeMap<String, String> {
    lines.iter().map(|(id, status, _)| (id.clone(), status.clone())).collect()
}

fn sidecar(out: &Path, id: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join(format!("{id}.json"))).unwrap()).unwrap()
}

fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn renders_everything_then_skips_it_and_redoes_only_what_is_missing_or_stale() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut lines = vec![
        "# six clips".to_string(),
        item("a", ""),
        item("b", r#", "seed": 11, "steps": 1"#),
        String::new(),
        item("c", r#", "guidance_scale": 1.0"#),
        item("d.v2", r#", "scheduler": "euler", "fps": 8"#),
        item("e_1", r#", "negative_prompt": "blur""#),
        item("F-2", r#", "shift": 2.0"#),
    ];
    let ids = ["a", "b", "c", "d.v2", "e_1", "F-2"];
    let manifest = write_manifest(dir.path(), &lines);
    let results_path = out.join("results-0-of-1.jsonl");

    let first = batch(&manifest, &out);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("6 completed, 0 skipped, 0 failed"), "{}", stderr(&first));
    let run1 = results(&results_path);
    assert_eq!(run1.len(), 6);
    assert!(run1.iter().all(|(_, status, _)| status == "completed"), "{run1:?}");
    for id in ids {
        let info = kinetoscope_video::probe(&out.join(format!("{id}.mp4"))).unwrap();
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9), "{id}");
        let sidecar = sidecar(&out, id);
        assert_eq!(sidecar["request"]["prompt"], format!("clip {id}"));
        assert!(sidecar["timings"]["total_s"].as_f64().is_some());
    }
    assert_eq!(sidecar(&out, "b")["request"]["seed"], 11);
    assert_eq!(sidecar(&out, "d.v2")["video"]["fps"], 8.0);
    assert_eq!(sidecar(&out, "d.v2")["resolved"]["scheduler"], "euler");
    // A seedless item's seed comes from its id: recorded, and different between ids.
    let seed_a = sidecar(&out, "a")["request"]["seed"].as_u64().unwrap();
    assert_ne!(seed_a, sidecar(&out, "c")["request"]["seed"].as_u64().unwrap());
    assert!(hidden_files(&out).is_empty(), "{:?}", hidden_files(&out));

    let second = batch(&manifest, &out);
    assert!(second.status.success(), "{}", stderr(&second));
    let run2 = results(&results_path)[6..].to_vec();
    assert_eq!(run2.len(), 6);
    assert!(run2.iter().all(|(_, status, _)| status == "skipped"), "{run2:?}");

    // Missing MP4, corrupt sidecar, a changed request: those three render again, the rest are skipped.
    let frames_a = kinetoscope_video::read_frames(&out.join("a.mp4")).unwrap().into_bytes();
    std::fs::remove_file(out.join("a.mp4")).unwrap();
    std::fs::write(out.join("c.json"), "{\"request\": ").unwrap();
    lines[6] = item("e_1", r#", "negative_prompt": "noise""#);
    let manifest = write_manifest(dir.path(), &lines);
    let third = batch(&manifest, &out);
    assert!(third.status.success(), "{}", stderr(&third));
    let run3 = statuses(&results(&results_path)[12..]);
    let expected: BTreeMap<String, String> = [
        ("a", "completed"),
        ("b", "skipped"),
        ("c", "completed"),
        ("d.v2", "skipped"),
        ("e_1", "completed"),
        ("F-2", "skipped"),
    ]
    .into_iter()
    .map(|(id, status)| (id.to_string(), status.to_string()))
    .collect();
    assert_eq!(run3, expected);
    assert_eq!(sidecar(&out, "a")["request"]["seed"].as_u64().unwrap(), seed_a);
    assert_eq!(kinetoscope_video::read_frames(&out.join("a.mp4")).unwrap().into_bytes(), frames_a);
    assert_eq!(sidecar(&out, "e_1")["request"]["negative_prompt"], "noise");
}

fn assert_rejected(manifest: &Path, out: &Path, expected: &[&str]) {
    let run = batch(manifest, out);
    let err = stderr(&run);
    assert!(!run.status.success(), "should fail: {err}");
    for part in expected {
        assert!(err.contains(part), "expected {part:?} in: {err}");
    }
    assert!(err.contains("nothing was rendered") && !err.contains("panicked"), "{err}");
    let rendered = std::fs::read_dir(out).map(|d| d.count()).unwrap_or(0);
    assert_eq!(rendered, 0, "a rejected manifest renders nothing");
}

#[test]
fn a_bad_manifest_fails_before_rendering_naming_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let manifest = write_manifest(
        dir.path(),
        &[
            item("ok", ""),
            item("typo", r#", "heigth": 48"#),
            item("../escape", ""),
            item("ok", r#", "seed": 3"#),
            item("t", r#", "steps": "two""#),
        ],
    );
    assert_rejected(
        &manifest,
        &out,
        &[
            "4 bad line(s)",
            "line 2: heigth: unknown field",
            "line 3: id: \"../escape\" contains '/'",
            "line 4: id: \"ok\" is already the id of line 1",
            "line 5: steps: invalid type: string \"two\"",
        ],
    );
    // Limits that depend on the model are checked for every line too, before the first render.
    let manifest = write_manifest(dir.path(), &[item("ok", ""), item("tall", r#", "height": 40"#)]);
    assert_rejected(&manifest, &out, &["line 2: height: 40 is not a positive multiple of 16"]);
}

#[test]
fn a_failing_item_is_recorded_with_its_code_and_the_others_complete() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // A folder where the MP4 must go: the render succeeds, the rename into place cannot.
    std::fs::create_dir_all(out.join("blocked.mp4")).unwrap();
    let manifest = write_manifest(dir.path(), &[item("first", ""), item("blocked", ""), item("last", "")]);
    let run = batch(&manifest, &out);
    let err = stderr(&run);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("2 completed, 0 skipped, 1 failed (video_write_failed: 1)"), "{err}");
    let lines = results(&out.join("results-0-of-1.jsonl"));
    let codes: Vec<(&str, &str, Option<&str>)> =
        lines.iter().map(|(id, status, code)| (id.as_str(), status.as_str(), code.as_deref())).collect();
    assert_eq!(
        codes,
        [("first", "completed", None), ("blocked", "failed", Some("video_write_failed")), ("last", "completed", None)]
    );
    assert!(out.join("first.mp4").is_file() && out.join("last.mp4").is_file());
    assert!(hidden_files(&out).is_empty(), "{:?}", hidden_files(&out));
}

#[test]
fn concurrent_shards_render_every_item_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ids: Vec<String> = (0..9).map(|i| format!("clip-{i}")).collect();
    let lines: Vec<String> = ids.iter().map(|id| item(id, r#", "steps": 1, "guidance_scale": 1.0"#)).collect();
    let manifest = write_manifest(dir.path(), &lines);
    let workers: Vec<_> = (0..3)
        .map(|index| {
            batch_command(&manifest, &out)
                .env("JOB_COMPLETION_INDEX", index.to_string())
                .env("KINETOSCOPE_SHARDS", "3")
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for worker in workers {
        let run = worker.wait_with_output().unwrap();
        assert!(run.status.success(), "{}", stderr(&run));
    }

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut busy_shards = 0;
    for index in 0..3 {
        let lines = results(&out.join(format!("results-{index}-of-3.jsonl")));
        busy_shards += usize::from(!lines.is_empty());
        for (id, status, _) in lines {
            assert_eq!(status, "completed", "{id}");
            *seen.entry(id).or_default() += 1;
        }
    }
    let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(seen, expected, "every item rendered exactly once");
    assert!(busy_shards >= 2, "the items should spread over the shards");
    for id in &ids {
        assert!(out.join(format!("{id}.mp4")).is_file() && out.join(format!("{id}.json")).is_file(), "{id}");
    }
}

#[test]
fn presets_step_cache_and_candidates_are_recorded_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let lines = [
        item("drafty", r#", "preset": "draft", "steps": 4"#),
        item("cached", r#", "step_cache": 1000.0, "steps": 4, "seed": 40"#),
    ];
    let manifest = write_manifest(dir.path(), &lines);
    let run = |candidates: &str| {
        let output =
            batch_command(&manifest, &out).args(["--candidates", candidates, "--keep", "all"]).output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        output
    };
    run("2");
    let drafty = sidecar(&out, "drafty");
    assert_eq!(drafty["preset"], "draft");
    assert_eq!((drafty["request"]["steps"].as_u64(), drafty["request"]["step_cache"].as_f64()), (Some(4), Some(0.1)));
    let cached = sidecar(&out, "cached");
    assert!(cached["preset"].is_null());
    // Four steps: only the third may reuse, and a threshold this large always does.
    assert_eq!(cached["timings"]["cached_steps"], 1);
    let ranked = cached["candidates"]["ranked"].as_array().unwrap();
    let mut seeds: Vec<u64> = ranked.iter().map(|c| c["seed"].as_u64().unwrap()).collect();
    seeds.sort();
    assert_eq!(seeds, [40, 41]);
    let other = ranked[1]["seed"].as_u64().unwrap();
    assert!(
        out.join(format!("cached+seed{other}.mp4")).is_file() && out.join(format!("cached+seed{other}.json")).is_file()
    );
    assert!(hidden_files(&out).is_empty(), "{:?}", hidden_files(&out));

    // The same candidates again: nothing to do, whichever seed won. More candidates: everything renders.
    let second = run("2");
    assert!(stderr(&second).contains("0 completed, 2 skipped, 0 failed"), "{}", stderr(&second));
    let third = run("3");
    assert!(stderr(&third).contains("2 completed, 0 skipped, 0 failed"), "{}", stderr(&third));
    assert_eq!(sidecar(&out, "cached")["candidates"]["ranked"].as_array().unwrap().len(), 3);
}

#[cfg(unix)]
/// The identity and last change of a file: equal before and after a rerun only if it was left alone.
fn stamp(path: &Path) -> (u64, SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.ino(), meta.modified().unwrap())
}

#[cfg(unix)]
#[test]
fn a_killed_run_leaves_only_whole_outputs_and_the_rerun_renders_exactly_the_missing_items() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ids: Vec<String> = (0..6).map(|i| format!("kill-{i}")).collect();
    // More steps than elsewhere, so that the kill lands while items are left.
    let lines: Vec<String> = ids.iter().map(|id| item(id, r#", "steps": 6"#)).collect();
    let manifest = write_manifest(dir.path(), &lines);
    let sidecars = || ids.iter().filter(|id| out.join(format!("{id}.json")).is_file()).count();

    let mut run = batch_command(&manifest, &out).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    // An item is done once its sidecar exists: it is written after the MP4.
    while sidecars() == 0 {
        assert!(run.try_wait().unwrap().is_none(), "the batch ended before it could be killed");
        assert!(Instant::now() < deadline, "no item finished within 2 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    run.kill().unwrap(); // SIGKILL: no destructor, no cleanup.
    run.wait().unwrap();

    let done: Vec<&String> = ids.iter().filter(|id| out.join(format!("{id}.json")).is_file()).collect();
    assert!(!done.is_empty() && done.len() < ids.len(), "killed with {} of {} items done", done.len(), ids.len());
    // Whatever is under a final name is whole: an MP4 without its sidecar is possible, half of one is not.
    for id in &ids {
        let mp4 = out.join(format!("{id}.mp4"));
        if mp4.exists() {
            let info = kinetoscope_video::probe(&mp4).unwrap_or_else(|e| panic!("{id}.mp4 after the kill: {e}"));
            assert_eq!((info.width, info.height, info.frames), (48, 32, 9), "{id}");
        }
    }
    let before: BTreeMap<String, _> = done
        .iter()
        .flat_map(|id| [format!("{id}.mp4"), format!("{id}.json")])
        .map(|name| (name.clone(), stamp(&out.join(name))))
        .collect();
    let results_path = out.join("results-0-of-1.jsonl");
    let killed_lines = std::fs::read_to_string(&results_path).map(|t| t.lines().count()).unwrap_or(0);

    let rerun = batch(&manifest, &out);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    let after = statuses(&results(&results_path)[killed_lines..]);
    let expected: BTreeMap<String, String> = ids
        .iter()
        .map(|id| (id.clone(), if done.contains(&id) { "skipped" } else { "completed" }.to_string()))
        .collect();
    assert_eq!(after, expected, "the rerun's results");
    for (name, stamp_before) in &before {
        assert_eq!(&stamp(&out.join(name)), stamp_before, "{name} was written again");
    }
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    let mut wanted: Vec<String> = ids.iter().flat_map(|id| [format!("{id}.json"), format!("{id}.mp4")]).collect();
    wanted.push("results-0-of-1.jsonl".into());
    wanted.sort();
    assert_eq!(files, wanted, "each item's outputs once, and no temporary file");
    for id in &ids {
        let info = kinetoscope_video::probe(&out.join(format!("{id}.mp4"))).unwrap();
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9), "{id}");
    }
}

#[test]
fn a_rerun_removes_the_temporary_files_of_its_own_items_that_a_killed_run_left() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // "left" is in shard 0 of 2, "right" in shard 1.
    let manifest = write_manifest(dir.path(), &[item("left", ""), item("right", "")]);
    let leftovers = |id: &str| {
        [format!(".{id}.mp4.tmp-4242-0"), format!(".{id}.json.tmp-4242"), format!(".{id}+seed3.mp4.tmp-4242-1")]
    };
    let others = [".notes".to_string(), ".unlisted.mp4.tmp-4242-0".to_string()];
    for name in leftovers("left").iter().chain(&leftovers("right")).chain(&others) {
        std::fs::write(out.join(name), b"half a file").unwrap();
    }

    let run = batch_command(&manifest, &out).args(["--shard", "0/2"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("removed 3 temporary file(s) left by an interrupted run"), "{}", stderr(&run));
    assert_eq!(statuses(&results(&out.join("results-0-of-2.jsonl"))).keys().collect::<Vec<_>>(), ["left"]);
    // Another shard's items and files of no item are not this run's to remove.
    let mut kept = hidden_files(&out);
    kept.sort();
    let mut expected: Vec<String> = leftovers("right").into_iter().chain(others).collect();
    expected.sort();
    assert_eq!(kept, expected);
}

/// The still of the TI2V fixtures (96×64).
fn fixture_image() -> PathBuf {
    tiny_model("reference/wan22-ti2v-tiny-a/image.png")
}

/// A small, fast item for the TI2V model, whose sizes are multiples of 32: 32×32, 5 frames, 1 step.
fn ti2v_item(id: &str, extra: &str) -> String {
    format!(
        r#"{{"id": "{id}", "prompt": "the fox wakes", "height": 32, "width": 32, "num_frames": 5, "steps": 1, "max_sequence_length": 16{extra}}}"#
    )
}

/// A TI2V item starting from `image`.
fn image_item(id: &str, image: &str) -> String {
    ti2v_item(id, &format!(r#", "image": {}"#, serde_json::json!(image)))
}

#[test]
fn an_image_item_starts_from_its_image_and_renders_again_only_when_the_image_changes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Beside the manifest, named relative to it; the binary runs in another folder.
    let still = dir.path().join("still.png");
    std::fs::copy(fixture_image(), &still).unwrap();
    let manifest = write_manifest(dir.path(), &[image_item("woken", "still.png"), ti2v_item("plain", "")]);
    let run = || {
        let output = batch_command_with("wan22-ti2v-tiny-a", &manifest, &out).output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output)
    };
    let sha256 = |path: &Path| format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));

    let first = run();
    assert!(first.contains("2 completed, 0 skipped, 0 failed"), "{first}");
    let info = kinetoscope_video::probe(&out.join("woken.mp4")).unwrap();
    assert_eq!((info.width, info.height, info.frames), (32, 32, 5));
    let woken = sidecar(&out, "woken");
    assert_eq!(woken["edit"]["kind"], "image_to_video");
    assert_eq!(woken["edit"]["source"], still.to_str().unwrap());
    assert_eq!(woken["edit"]["source_sha256"], sha256(&still));
    assert_eq!(woken["edit"]["source_image"], serde_json::json!({ "width": 96, "height": 64 }));
    assert!(sidecar(&out, "plain").get("edit").is_none());
    // The tiny model is no registry entry: the built-in defaults filled what the items left out.
    assert_eq!(woken["resolved"]["defaults_from"], "built-in");
    assert_eq!((woken["request"]["fps"].as_u64(), woken["request"]["guidance_scale"].as_f64()), (Some(16), Some(5.0)));

    let second = run();
    assert!(second.contains("0 completed, 2 skipped, 0 failed"), "{second}");

    // Same path, other pixels: only that item renders again.
    let image = kinetoscope_video::read_image(&still).unwrap();
    let inverted: Vec<u8> = image.as_bytes().iter().map(|b| 255 - b).collect();
    let inverted = kinetoscope_video::Frames::new(inverted, 1, image.height(), image.width()).unwrap();
    kinetoscope_video::write_png(&still, &inverted, 0).unwrap();
    let third = run();
    assert!(third.contains("1 completed, 1 skipped, 0 failed"), "{third}");
    assert_eq!(sidecar(&out, "woken")["edit"]["source_sha256"], sha256(&still));
}

#[test]
fn an_image_that_is_missing_or_for_a_text_only_model_is_refused_before_rendering() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let image = fixture_image();
    let manifest = write_manifest(
        dir.path(),
        &[image_item("missing", "stills/absent.png"), image_item("found", image.to_str().unwrap())],
    );
    let missing = format!("line 1: image: {} is not a file", dir.path().join("stills/absent.png").display());
    assert_rejected(&manifest, &out, &["1 bad line(s)", &missing]);

    let manifest = write_manifest(dir.path(), &[item("text", ""), image_item("found", image.to_str().unwrap())]);
    let text_only =
        format!("line 2: image: the model {} generates from text only", tiny_model("wan21-tiny-a").display());
    assert_rejected(&manifest, &out, &["1 bad line(s)", &text_only, "Wan 2.2 TI2V"]);
}

/// `manifest` refused by `model` before anything renders, its problems naming `expected`.
fn assert_rejected_by(model: &str, manifest: &Path, out: &Path, expected: &[&str]) {
    let run = batch_command_with(model, manifest, out).output().unwrap();
    let err = stderr(&run);
    assert!(!run.status.success(), "should fail: {err}");
    for part in expected {
        assert!(err.contains(part), "expected {part:?} in: {err}");
    }
    assert!(err.contains("nothing was rendered") && !err.contains("panicked"), "{err}");
    assert!(!out.exists() || std::fs::read_dir(out).unwrap().count() == 0, "a rejected manifest renders nothing");
}

/// An item for the tiny image-to-video models at their run size (32×48, 9 frames), 2 steps.
fn i2v_item(id: &str, extra: &str) -> String {
    format!(
        r#"{{"id": "{id}", "prompt": "the fox wakes", "height": 32, "width": 48, "num_frames": 9, "steps": 2, "max_sequence_length": 16{extra}}}"#
    )
}

#[test]
fn an_item_with_a_first_and_a_last_image_renders_on_a_two_expert_image_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(dir.path().join("stills")).unwrap();
    let (first, last) = (dir.path().join("first.png"), dir.path().join("stills/last.png"));
    std::fs::copy(tiny_model("reference/wan22-i2v-a14b-tiny/image.png"), &first).unwrap();
    std::fs::copy(tiny_model("reference/wan22-i2v-a14b-tiny/last_image.png"), &last).unwrap();
    let both =
        r#", "image": "first.png", "last_image": "stills/last.png", "guidance_scale": 3.5, "guidance_scale_2": 2.0"#;
    let manifest =
        write_manifest(dir.path(), &[i2v_item("both", both), i2v_item("first", r#", "image": "first.png""#)]);
    let run = || {
        let output = batch_command_with("wan22-i2v-a14b-tiny", &manifest, &out).output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output)
    };
    let sha256 = |path: &Path| format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));

    let first_run = run();
    assert!(first_run.contains("2 completed, 0 skipped, 0 failed"), "{first_run}");
    for id in ["both", "first"] {
        let info = kinetoscope_video::probe(&out.join(format!("{id}.mp4"))).unwrap();
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9), "{id}");
    }
    let record = sidecar(&out, "both");
    assert_eq!(record["edit"]["kind"], "image_to_video");
    assert_eq!(record["edit"]["source_sha256"], sha256(&first));
    assert_eq!(record["edit"]["last_image"]["source"], last.to_str().unwrap());
    assert_eq!(record["edit"]["last_image"]["source_sha256"], sha256(&last));
    assert_eq!(
        (record["request"]["guidance_scale"].as_f64(), record["request"]["guidance_scale_2"].as_f64()),
        (Some(3.5), Some(2.0))
    );
    assert_eq!(record["resolved"]["guidance_scale_2"], 2.0);
    // 2 steps at shift 3: timesteps 999 (≥ the boundary 900: high noise) and 749.
    assert_eq!(record["timings"]["experts"], serde_json::json!(["transformer", "transformer_2"]));
    let plain = sidecar(&out, "first");
    assert!(plain["edit"].get("last_image").is_none() && plain["request"]["guidance_scale_2"].is_null(), "{plain}");

    let second = run();
    assert!(second.contains("0 completed, 2 skipped, 0 failed"), "{second}");
    // Other pixels at the last image's path: only the item that ends on it renders again.
    let image = kinetoscope_video::read_image(&last).unwrap();
    let inverted: Vec<u8> = image.as_bytes().iter().map(|b| 255 - b).collect();
    kinetoscope_video::write_png(&last, &kinetoscope_video::Frames::new(inverted, 1, 32, 48).unwrap(), 0).unwrap();
    let third = run();
    assert!(third.contains("1 completed, 1 skipped, 0 failed"), "{third}");
    assert_eq!(sidecar(&out, "both")["edit"]["last_image"]["source_sha256"], sha256(&last));
}

#[test]
fn image_items_an_image_model_cannot_take_are_refused_before_rendering() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let image = tiny_model("reference/wan21-i2v-tiny/image.png");
    let image = serde_json::json!(image.to_str().unwrap());
    let with_image = format!(r#", "image": {image}"#);

    // No image for a model that generates only from one; a last image with no first.
    let manifest = write_manifest(
        dir.path(),
        &[i2v_item("text", ""), i2v_item("ok", &with_image), i2v_item("end", &format!(r#", "last_image": {image}"#))],
    );
    assert_rejected_by("wan21-i2v-tiny", &manifest, &out, &["line 3: last_image: needs an image"]);
    let manifest = write_manifest(dir.path(), &[i2v_item("text", ""), i2v_item("ok", &with_image)]);
    let missing = format!(
        "line 1: image: missing: the model {} generates video from an image",
        tiny_model("wan21-i2v-tiny").display()
    );
    assert_rejected_by("wan21-i2v-tiny", &manifest, &out, &["1 bad line(s)", &missing]);

    // A last image for Wan 2.1 I2V, which can't end on one; a second guidance scale for its one network.
    let manifest = write_manifest(
        dir.path(),
        &[
            i2v_item("end", &format!(r#"{with_image}, "last_image": {image}"#)),
            i2v_item("guided", &format!(r#"{with_image}, "guidance_scale_2": 3.0"#)),
        ],
    );
    assert_rejected_by(
        "wan21-i2v-tiny",
        &manifest,
        &out,
        &["2 bad line(s)", "line 1: last_image: the model", "can't end on a given frame", "line 2: guidance_scale_2:"],
    );
}

/// An item with a run-time adapter renders again when the adapter file's contents change, and is skipped while
/// they don't; the sidecar records the file's sha256.
#[test]
fn an_item_renders_again_when_its_adapters_contents_change() {
    let dir = tempfile::tempdir().unwrap();
    let loras = tiny_model("loras");
    let adapter = dir.path().join("style.safetensors");
    std::fs::copy(loras.join("wan21-peft.safetensors"), &adapter).unwrap();
    let manifest =
        write_manifest(dir.path(), &[item("a", r#", "loras": [{"path": "style.safetensors", "scale": 0.5}]"#)]);
    let out = dir.path().join("out");
    let first = batch(&manifest, &out);
    assert!(first.status.success(), "{}", stderr(&first));
    let sidecar: Value = serde_json::from_str(&std::fs::read_to_string(out.join("a.json")).unwrap()).unwrap();
    let sha = format!("{:x}", Sha256::digest(std::fs::read(&adapter).unwrap()));
    assert_eq!(sidecar["resolved"]["request_loras"][0]["sha256"], sha.as_str());

    let again = batch(&manifest, &out);
    assert!(stderr(&again).contains("0 completed, 1 skipped"), "{}", stderr(&again));
    std::fs::copy(loras.join("wan21-official.safetensors"), &adapter).unwrap();
    let changed = batch(&manifest, &out);
    assert!(stderr(&changed).contains("1 completed, 0 skipped"), "{}", stderr(&changed));
}

/// Wan VACE items (the tiny VACE model): reference images render, record each image's hash and the scale, and
/// render again only when an image changes; a plain line on the VACE model generates from its prompt; VACE's
/// fields on another model, or a scale without them, are refused before rendering.
#[test]
fn vace_items_follow_their_references_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let still = dir.path().join("still.png");
    std::fs::copy(fixture_image(), &still).unwrap();
    let refs = r#", "reference_images": ["still.png"], "conditioning_scale": 0.5"#;
    let manifest = write_manifest(dir.path(), &[item("styled", refs), item("plain", "")]);
    let run = || {
        let output = batch_command_with("wan21-vace-tiny", &manifest, &out).output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        stderr(&output)
    };
    let first = run();
    assert!(first.contains("2 completed, 0 skipped, 0 failed"), "{first}");
    let styled = sidecar(&out, "styled");
    let sha256 = |path: &Path| format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()));
    assert_eq!(
        (styled["edit"]["kind"].as_str(), styled["edit"]["conditioning_scale"].as_f64()),
        (Some("vace"), Some(0.5))
    );
    assert_eq!(styled["edit"]["reference_images"][0]["sha256"], sha256(&still));
    let info = kinetoscope_video::probe(&out.join("styled.mp4")).unwrap();
    assert_eq!((info.width, info.height, info.frames), (48, 32, 9));
    assert!(run().contains("0 completed, 2 skipped, 0 failed"));

    let image = kinetoscope_video::read_image(&still).unwrap();
    let inverted: Vec<u8> = image.as_bytes().iter().map(|b| 255 - b).collect();
    let inverted = kinetoscope_video::Frames::new(inverted, 1, image.height(), image.width()).unwrap();
    kinetoscope_video::write_png(&still, &inverted, 0).unwrap();
    assert!(run().contains("1 completed, 1 skipped, 0 failed"));

    let out = dir.path().join("rejected");
    let manifest = write_manifest(dir.path(), &[item("styled", refs)]);
    assert_rejected(&manifest, &out, &["line 1: reference_images:", "has no VACE blocks"]);
    let manifest = write_manifest(dir.path(), &[item("scaled", r#", "conditioning_scale": 2"#)]);
    assert_rejected(&manifest, &out, &["line 1: conditioning_scale: scales a control_video or reference_images"]);
}
