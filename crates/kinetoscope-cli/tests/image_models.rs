//! `generate` end to end on the tiny image-to-video and two-expert models (models/tiny/FIXTURES.md): Wan 2.1 I2V
//! from `--image`, Wan 2.1 FLF2V from `--image` and `--last-image` (of another size, each fitted on its own), Wan
//! 2.2 T2V-A14B's two experts with `--guidance-2` and `--experts`, each recorded in the sidecar; and what these
//! models can't do refused before anything loads, naming the flag.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn tiny(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny").join(path)
}

/// `kinetoscope generate --model models/tiny/<model>` at the fixtures' run size (32×48, 9 frames), 2 steps
/// unless `args` say.
fn generate(model: &str, args: &[&str]) -> Output {
    let steps = if args.contains(&"--steps") { &[][..] } else { &["--steps", "2"][..] };
    Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
        .arg("generate")
        .arg("--model")
        .arg(tiny(model))
        .args(["--prompt", "the fox wakes", "--height", "32", "--width", "48", "--frames", "9", "--seed", "3"])
        .args(steps)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_sidecar(mp4: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(mp4.with_extension("json")).unwrap()).unwrap()
}

fn sha256(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

fn assert_mp4(mp4: &Path) {
    let info = kinetoscope_video::probe(mp4).unwrap();
    assert_eq!((info.codec.as_str(), info.width, info.height, info.frames), ("h264", 48, 32, 9));
}

#[test]
fn an_image_starts_a_wan21_i2v_video_and_the_sidecar_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mp4, image) = (dir.path().join("woken.mp4"), tiny("reference/wan21-i2v-tiny/image.png"));
    let out = generate("wan21-i2v-tiny", &["--image", path(&image), "-o", path(&mp4)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_mp4(&mp4);

    let sidecar = read_sidecar(&mp4);
    let edit = &sidecar["edit"];
    assert_eq!(edit["kind"], "image_to_video");
    assert_eq!((edit["source"].as_str(), edit["source_sha256"].as_str()), (Some(path(&image)), Some(&*sha256(&image))));
    assert_eq!(edit["source_image"], json!({ "width": 48, "height": 32 }));
    assert!(edit.get("last_image").is_none(), "{edit}");
    assert_eq!(sidecar["model"]["pipeline_class"], "WanImageToVideoPipeline");
    assert!(sidecar["model"]["config_sha256"]["image_encoder"].is_string(), "the CLIP encoder's config is hashed");
    let request = &sidecar["request"];
    assert_eq!((request["steps"].as_u64(), request["seed"].as_u64()), (Some(2), Some(3)));
    assert!(request["guidance_scale_2"].is_null());
    // One network: no expert placement, no low-noise guidance, no per-step experts.
    assert!(sidecar["resolved"]["experts"].is_null() && sidecar["resolved"]["guidance_scale_2"].is_null());
    assert_eq!(sidecar["timings"]["experts"], json!([]));
    for stage in ["load_s", "text_encoding_s", "denoising_s", "step_s", "vae_decode_s", "encode_s", "total_s"] {
        assert!(sidecar["timings"][stage].as_f64().is_some(), "timings.{stage}");
    }
    assert_eq!(sidecar["video"]["frames"], 9);
}

/// The last image is the TI2V fixtures' 96×64 still: cropped and resized to 48×32 on its own, after the 48×32
/// first image.
#[test]
fn a_first_and_a_last_image_make_a_flf2v_video() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("both.mp4");
    let (image, last) = (tiny("reference/wan21-flf2v-tiny/image.png"), tiny("reference/wan22-ti2v-tiny-a/image.png"));
    let out = generate("wan21-flf2v-tiny", &["--image", path(&image), "--last-image", path(&last), "-o", path(&mp4)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_mp4(&mp4);

    let edit = read_sidecar(&mp4)["edit"].clone();
    assert_eq!(edit["kind"], "image_to_video");
    assert_eq!(edit["source_sha256"], sha256(&image));
    assert_eq!(
        edit["last_image"],
        json!({ "source": path(&last), "source_sha256": sha256(&last), "source_image": { "width": 96, "height": 64 } })
    );

    // The last image decides the end of the video.
    let first_only = dir.path().join("first.mp4");
    let other_last = tiny("reference/wan21-flf2v-tiny/last_image.png");
    let out = generate(
        "wan21-flf2v-tiny",
        &["--image", path(&image), "--last-image", path(&other_last), "-o", path(&first_only)],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(
        kinetoscope_video::read_frames(&mp4).unwrap().into_bytes(),
        kinetoscope_video::read_frames(&first_only).unwrap().into_bytes()
    );
}

/// 6 steps at shift 3 are timesteps 999, 937 (high noise: `transformer`) and 856, 749, 599, 374 (below the
/// boundary 875: `transformer_2`). Swapping the experts changes where they live, not the video.
#[test]
fn a_two_expert_model_records_each_steps_expert_and_its_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let mp4 = dir.path().join(name);
        let mut args = vec!["--steps", "6", "--shift", "3", "--guidance", "4", "--max-sequence-length", "32"];
        args.extend(["-o", path(&mp4)]);
        args.extend(extra);
        let out = generate("wan22-t2v-a14b-tiny", &args);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_mp4(&mp4);
        (read_sidecar(&mp4), kinetoscope_video::read_frames(&mp4).unwrap().into_bytes())
    };
    let (swapped, swapped_frames) = run("swap.mp4", &["--guidance-2", "3", "--experts", "swap"]);
    let expected =
        json!(["transformer", "transformer", "transformer_2", "transformer_2", "transformer_2", "transformer_2"]);
    assert_eq!(swapped["timings"]["experts"], expected);
    assert_eq!(swapped["request"]["guidance_scale"], 4.0);
    assert_eq!(swapped["request"]["guidance_scale_2"], 3.0);
    assert_eq!(swapped["resolved"]["guidance_scale_2"], 3.0);
    assert_eq!(swapped["resolved"]["experts"], "swap");

    let (resident, resident_frames) = run("resident.mp4", &["--guidance-2", "3", "--experts", "resident"]);
    assert_eq!(resident["resolved"]["experts"], "resident");
    assert_eq!(resident["timings"]["experts"], expected);
    assert_eq!(swapped_frames, resident_frames, "where the experts live doesn't change the video");

    // Without --guidance-2 the low-noise expert keeps --guidance; the placement defaults to auto, which keeps
    // both experts on the CPU, and the sidecar records what auto chose.
    let (plain, _) = run("plain.mp4", &[]);
    assert!(plain["request"]["guidance_scale_2"].is_null(), "{}", plain["request"]);
    assert_eq!(
        (plain["resolved"]["guidance_scale_2"].as_f64(), plain["resolved"]["experts"].as_str()),
        (Some(4.0), Some("resident"))
    );
    assert!(plain.get("edit").is_none());
}

#[test]
fn what_a_model_cannot_do_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("out.mp4");
    let image = tiny("reference/wan21-i2v-tiny/image.png");
    let refused = |model: &str, args: &[&str], expected: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["-o", path(&mp4)]);
        let out = generate(model, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "should fail: {args:?}");
        for part in expected {
            assert!(err.contains(part), "expected {part:?} in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    };
    // An image-to-video model given no image, or a video to edit.
    refused("wan21-i2v-tiny", &[], &["generates video from an image", "--image"]);
    refused("wan22-i2v-a14b-tiny", &["--input-video", path(&image)], &["generates video from an image", "--image"]);
    // A last image for a model that can't end on one (Wan 2.1 I2V has no two-image position embedding).
    refused(
        "wan21-i2v-tiny",
        &["--image", path(&image), "--last-image", path(&image)],
        &["--last-image", "last_image", "Wan 2.1 FLF2V"],
    );
    refused("wan21-flf2v-tiny", &["--last-image", path(&image)], &["--image"]);
    // A second guidance scale for a model with one network.
    refused("wan21-i2v-tiny", &["--image", path(&image), "--guidance-2", "3"], &["--guidance-2", "one transformer"]);
    refused("wan22-t2v-a14b-tiny", &["--experts", "both"], &["--experts", "expected auto, resident or swap"]);
    assert!(!mp4.exists(), "a refused run writes nothing");
}

#[test]
fn help_names_the_image_to_video_models_and_the_new_flags() {
    let help = Command::new(env!("CARGO_BIN_EXE_kinetoscope")).args(["generate", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for part in ["--last-image", "--guidance-2", "--experts", "Wan 2.1 I2V and FLF2V", "Wan 2.2 I2V-A14B"] {
        assert!(text.contains(part), "{part} in {text}");
    }
}
