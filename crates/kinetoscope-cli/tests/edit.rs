//! `generate --input-video` end to end on the small test model: a clip rendered by the binary is fed back
//! at another size, and comes out at that size with the clip's frame count (taken down to 4k+1) and a
//! sidecar recording the source's hash and the strength; a time range is redone, keeping the clip's length;
//! a clip is extended into one MP4 of its frames and the new ones; an image starts a video (Wan 2.2 TI2V);
//! bad sources, strengths, ranges, lengths and images fail clearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn generate(args: &[&str]) -> Output {
    generate_with("wan21-tiny-a", args)
}

fn generate_with(model: &str, args: &[&str]) -> Output {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny").join(model);
    Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--steps", "4", "--seed", "3"])
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A 13-frame 32×48 clip from the binary itself.
fn source_clip(dir: &Path) -> PathBuf {
    let mp4 = dir.join("source.mp4");
    let out = generate(&[
        "--prompt",
        "a red fox in the snow",
        "--height",
        "32",
        "--width",
        "48",
        "--frames",
        "13",
        "--output",
        mp4.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    mp4
}

#[test]
fn an_edit_takes_the_requested_size_and_records_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_clip(dir.path());
    let edited = dir.path().join("owl.mp4");
    let out = generate(&[
        "--prompt",
        "an owl in the snow",
        "--input-video",
        source.to_str().unwrap(),
        "--strength",
        "0.5",
        "--height",
        "48",
        "--width",
        "48",
        "--frames",
        "12",
        "--output",
        edited.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // 12 frames asked, 13 in the clip: the largest 4k+1 at most both is 9.
    let info = kinetoscope_video::probe(&edited).unwrap();
    assert_eq!((info.width, info.height, info.frames), (48, 48, 9));

    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("owl.json")).unwrap()).unwrap();
    let edit = &sidecar["edit"];
    let sha256 = format!("{:x}", Sha256::digest(std::fs::read(&source).unwrap()));
    assert_eq!(edit["kind"], "video_to_video");
    assert_eq!(edit["source_sha256"], sha256.as_str());
    assert_eq!(edit["strength"], 0.5);
    assert_eq!(edit["source_video"], serde_json::json!({ "frames": 13, "width": 48, "height": 32 }));
    assert_eq!(edit["frames_used"], 9);
    assert_eq!(sidecar["request"]["num_frames"], 9);
    assert_eq!(sidecar["request"]["prompt"], "an owl in the snow");

    // A text-to-video render has no edit record.
    let plain: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("source.json")).unwrap()).unwrap();
    assert!(plain.get("edit").is_none());
}

#[test]
fn bad_sources_and_strengths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.mp4");
    let output = output.to_str().unwrap();
    let edit = |video: &str, strength: &str| {
        generate(&["--prompt", "x", "--input-video", video, "--strength", strength, "--output", output])
    };

    let missing = dir.path().join("missing.mp4");
    let out = edit(missing.to_str().unwrap(), "0.5");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot read the input video") && stderr(&out).contains("missing.mp4"),
        "{}",
        stderr(&out)
    );

    let garbage = dir.path().join("garbage.mp4");
    std::fs::write(&garbage, b"not a video").unwrap();
    let out = edit(garbage.to_str().unwrap(), "0.5");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot read the input video") && stderr(&out).contains("garbage.mp4"),
        "{}",
        stderr(&out)
    );

    for bad in ["0", "1.5"] {
        let out = edit(garbage.to_str().unwrap(), bad);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--strength") && stderr(&out).contains("(0, 1]"), "{bad}: {}", stderr(&out));
    }

    // Too low for the steps: no step would run.
    let source = source_clip(dir.path());
    let out = edit(source.to_str().unwrap(), "0.1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("runs no step"), "{}", stderr(&out));

    let out = generate(&["--prompt", "x", "--strength", "0.5", "--output", output]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--input-video"), "{}", stderr(&out));
}

/// `--region` and `--mask` (an image) regenerate a region: the sidecar records the mask and reports that nothing
/// outside it moved; a mask that selects nothing, and a mask video shorter than the clip, are refused.
#[test]
fn a_region_is_regenerated_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_clip(dir.path());
    let source = source.to_str().unwrap();
    let out_path = dir.path().join("region.mp4");
    let sidecar = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("region.json")).unwrap()).unwrap()
    };
    let edit = |extra: &[&str]| {
        let mut args = vec!["--prompt", "an owl", "--input-video", source, "--height", "32", "--width", "48"];
        args.extend(["--output", out_path.to_str().unwrap()]);
        args.extend(extra);
        generate(&args)
    };

    let out = edit(&["--region", "16,8,16,16", "--redo", "2-6"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(kinetoscope_video::probe(&out_path).unwrap().frames, 13);
    let record = &sidecar()["edit"];
    assert_eq!(record["kind"], "region");
    assert_eq!(record["region"], serde_json::json!({ "x": 16, "y": 8, "width": 16, "height": 16 }));
    assert_eq!(record["redo_frames"], serde_json::json!([2, 7]));
    assert_eq!(record["result"]["unmasked_max_abs"], 0.0);
    assert_eq!(record["result"]["masked_pixels"], 5 * 16 * 16);

    // A mask image, white on black, at the clip's size.
    let mask = dir.path().join("mask.png");
    let mut pixels = image::GrayImage::new(48, 32);
    for (x, y, p) in pixels.enumerate_pixels_mut() {
        p.0 = [if (8..24).contains(&x) && (8..16).contains(&y) { 255 } else { 0 }];
    }
    pixels.save(&mask).unwrap();
    let out = edit(&["--mask", mask.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record = &sidecar()["edit"];
    let sha = format!("{:x}", Sha256::digest(std::fs::read(&mask).unwrap()));
    assert_eq!(record["mask"]["sha256"], sha.as_str());
    assert_eq!(record["mask_fit"]["single_image"], true);
    assert_eq!(record["result"]["masked_pixels"], 13 * 16 * 8);

    let black = dir.path().join("black.png");
    image::GrayImage::new(48, 32).save(&black).unwrap();
    let out = edit(&["--mask", black.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("selects no pixel"), "{}", stderr(&out));

    let out = edit(&["--region", "40,8,16,16"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not inside"), "{}", stderr(&out));
}

#[test]
fn a_redo_keeps_the_length_and_records_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_clip(dir.path());
    let source = source.to_str().unwrap();
    let redone = dir.path().join("redone.mp4");
    let redo = |range: &str, extra: &[&str]| {
        let mut args = vec!["--prompt", "an owl", "--input-video", source, "--redo", range];
        args.extend(["--height", "32", "--width", "48", "--output", redone.to_str().unwrap()]);
        args.extend(extra);
        generate(&args)
    };

    // 13 frames at 16 fps: 0.5 s to 0.8 s are frames 8 to 12.
    let out = redo("0.5s-0.8s", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info = kinetoscope_video::probe(&redone).unwrap();
    assert_eq!((info.width, info.height, info.frames), (48, 32, 13));
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("redone.json")).unwrap()).unwrap();
    let edit = &sidecar["edit"];
    assert_eq!(edit["kind"], "redo");
    assert_eq!(edit["redo"], serde_json::json!({ "start_s": 0.5, "end_s": 0.8 }));
    assert_eq!(edit["redo_frames"], serde_json::json!([8, 13]));
    assert!(edit.get("strength").is_none());

    let out = redo("2-4", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("redone.json")).unwrap()).unwrap();
    assert_eq!(sidecar["edit"]["redo_frames"], serde_json::json!([2, 5]));

    let out = redo("0.5s-2s", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("redo") && stderr(&out).contains("0..13"), "{}", stderr(&out));

    let out = redo("2-4", &["--strength", "0.5"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--strength") && stderr(&out).contains("--redo"), "{}", stderr(&out));

    let out = redo("4-2", &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the first frame comes after the last"), "{}", stderr(&out));
}

#[test]
fn an_extension_joins_the_source_and_the_new_frames() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_clip(dir.path());
    let extended = dir.path().join("longer.mp4");
    let extend = |extra: &[&str]| {
        let mut args = vec!["--prompt", "the fox runs away", "--extend-from", source.to_str().unwrap()];
        args.extend(["--output", extended.to_str().unwrap()]);
        args.extend(extra);
        generate(&args)
    };

    // 0.4 s at the source's 16 fps is 6.4 frames, rounded up to 8: 13 + 8 frames at the source's size.
    let out = extend(&["--seconds", "0.4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info = kinetoscope_video::probe(&extended).unwrap();
    assert_eq!((info.width, info.height, info.frames, info.fps), (48, 32, 21, 16.0));

    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("longer.json")).unwrap()).unwrap();
    let edit = &sidecar["edit"];
    let sha256 = format!("{:x}", Sha256::digest(std::fs::read(&source).unwrap()));
    assert_eq!(edit["kind"], "extend");
    assert_eq!(edit["source_sha256"], sha256.as_str());
    assert_eq!(edit["seconds"], 0.4);
    assert_eq!(edit["added_frames"], 8);
    assert_eq!(edit["context_frames"], serde_json::json!([4, 13]));
    assert_eq!(edit["source_frames"], serde_json::json!([0, 9]));
    assert_eq!(edit["generated_frames"], serde_json::json!([9, 21]));
    // The generated clip: the 9 context frames and the 8 new ones.
    assert_eq!(sidecar["request"]["num_frames"], 17);
    assert_eq!(sidecar["video"]["frames"], 21);

    // Without --seconds, --frames is the number of frames to add.
    let out = extend(&["--frames", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(kinetoscope_video::probe(&extended).unwrap().frames, 17);

    let out = extend(&["--frames", "6"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--frames is the number of frames to add") && stderr(&out).contains("multiple of 4"));

    for bad in ["0", "-1", "11"] {
        let out = extend(&[&format!("--seconds={bad}")]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("--seconds") && stderr(&out).contains("(0, 10]"), "{bad}: {}", stderr(&out));
    }

    let out = extend(&["--seconds", "1", "--width", "32"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--width") && stderr(&out).contains("--extend-from"), "{}", stderr(&out));

    let missing = dir.path().join("missing.mp4");
    let out = generate(&["--prompt", "x", "--extend-from", missing.to_str().unwrap(), "--seconds", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot read the input video") && stderr(&out).contains("missing.mp4"));

    // A 5-frame clip is too short to condition on.
    let short = dir.path().join("short.mp4");
    let short_args = ["--height", "32", "--width", "48", "--frames", "5", "--output", short.to_str().unwrap()];
    let out = generate(&[&["--prompt", "x"][..], &short_args].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = generate(&["--prompt", "x", "--extend-from", short.to_str().unwrap(), "--seconds", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has 5 frames") && stderr(&out).contains("at least 9"), "{}", stderr(&out));

    let out = generate(&["--prompt", "x", "--seconds", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--extend-from"), "{}", stderr(&out));
}

/// The still of the TI2V fixtures (96×64), as diffusers' pipeline was given it.
fn fixture_image() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/reference/wan22-ti2v-tiny-a/image.png")
}

#[test]
fn an_image_starts_the_video_at_the_requested_size_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("fox.mp4");
    // 96×64 into 64×64: the image is center-cropped to a square first.
    let out = generate_with(
        "wan22-ti2v-tiny-a",
        &[
            "--prompt",
            "a red fox wakes up",
            "--image",
            fixture_image().to_str().unwrap(),
            "--height",
            "64",
            "--width",
            "64",
            "--frames",
            "9",
            "--output",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let info = kinetoscope_video::probe(&out_path).unwrap();
    assert_eq!((info.width, info.height, info.frames), (64, 64, 9));

    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("fox.json")).unwrap()).unwrap();
    let edit = &sidecar["edit"];
    let sha256 = format!("{:x}", Sha256::digest(std::fs::read(fixture_image()).unwrap()));
    assert_eq!(edit["kind"], "image_to_video");
    assert_eq!(edit["source_sha256"], sha256.as_str());
    assert_eq!(edit["source_image"], serde_json::json!({ "width": 96, "height": 64 }));
}

#[test]
fn images_that_cannot_start_a_video_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixture_image();
    let image = image.to_str().unwrap();
    let out_path = dir.path().join("out.mp4");
    let out_path = out_path.to_str().unwrap();

    // Wan 2.1 T2V has no per-token timesteps to hold an image with.
    let out = generate(&["--prompt", "x", "--image", image, "--height", "32", "--width", "48", "-o", out_path]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("image") && stderr(&out).contains("text only"), "{}", stderr(&out));

    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"not an image").unwrap();
    let out = generate_with("wan22-ti2v-tiny-a", &["--prompt", "x", "--image", not_an_image.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("notes.png") && stderr(&out).contains("PNG, JPEG or WebP"), "{}", stderr(&out));

    let out = generate_with("wan22-ti2v-tiny-a", &["--prompt", "x", "--image", image, "--input-video", image]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--image") && stderr(&out).contains("--input-video"), "{}", stderr(&out));

    // TI2V's grid is 32 pixels (16 in the VAE, 2 in the patch).
    let out =
        generate_with("wan22-ti2v-tiny-a", &["--prompt", "x", "--image", image, "--height", "48", "-o", out_path]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("height") && stderr(&out).contains("32"), "{}", stderr(&out));
}

/// Wan VACE (the tiny VACE model): a control video is followed at its length and a reference image shown, both
/// recorded with their hashes and the scale; a region edit goes through the VACE model and keeps every pixel
/// outside; what VACE can't do, and VACE's inputs on another model, are refused before any weight loads.
#[test]
fn vace_follows_a_control_video_and_reference_images() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_clip(dir.path());
    let source = source.to_str().unwrap();
    let image = fixture_image();
    let image = image.to_str().unwrap();
    let out_path = dir.path().join("vace.mp4");
    let sidecar = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("vace.json")).unwrap()).unwrap()
    };
    let vace = |args: &[&str]| {
        let size = ["--height", "32", "--width", "48", "--frames", "9", "-o", out_path.to_str().unwrap()];
        generate_with("wan21-vace-tiny", &[&["--prompt", "an owl"][..], &size, args].concat())
    };

    let out = vace(&["--control-video", source, "--reference-image", image, "--conditioning-scale", "0.8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info = kinetoscope_video::probe(&out_path).unwrap();
    assert_eq!((info.width, info.height, info.frames), (48, 32, 9));
    let edit = &sidecar()["edit"];
    assert_eq!((edit["kind"].as_str(), edit["control_video"].as_bool()), (Some("vace"), Some(true)));
    assert_eq!(edit["conditioning_scale"], 0.8);
    let sha256 = format!("{:x}", Sha256::digest(std::fs::read(image).unwrap()));
    assert_eq!(edit["reference_images"][0]["sha256"], sha256.as_str());
    assert_eq!(edit["source_video"]["frames"], 13);

    let out = vace(&["--reference-image", image]);
    assert!(out.status.success(), "{}", stderr(&out));
    let edit = &sidecar()["edit"];
    assert_eq!((edit["control_video"].as_bool(), edit["source_sha256"].as_str()), (Some(false), Some(&*sha256)));

    let out = vace(&["--input-video", source, "--region", "16,8,16,16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sidecar()["edit"]["result"]["unmasked_max_abs"], 0.0);
    // A region with a reference image to show in it, and a scale.
    let out = vace(&[
        "--input-video",
        source,
        "--region",
        "16,8,16,16",
        "--reference-image",
        image,
        "--conditioning-scale",
        "0.9",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let edit = &sidecar()["edit"];
    assert_eq!((edit["kind"].as_str(), edit["conditioning_scale"].as_f64()), (Some("region"), Some(0.9)));
    assert_eq!(edit["reference_images"][0]["sha256"], sha256.as_str());
    assert_eq!(edit["result"]["unmasked_max_abs"], 0.0);

    for (args, needle) in [
        (&["--input-video", source][..], "is a Wan VACE model"),
        (&["--conditioning-scale", "2"][..], "--conditioning-scale: a Wan VACE model's"),
        (&["--input-video", source, "--reference-image", image][..], "give the region to regenerate"),
    ] {
        let out = vace(args);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let out = generate(&["--prompt", "x", "--reference-image", image, "-o", out_path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("need a Wan VACE model"), "{}", stderr(&out));
}
