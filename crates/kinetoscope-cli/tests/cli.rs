//! End to end through the `kinetoscope` binary on the small test model: a playable MP4 with the right
//! frames, size and codec, a complete sidecar, PNG frames; and bad input failing with a clear message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan21-tiny-a")
}

fn generate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
        .arg("generate")
        .arg("--model")
        .arg(tiny_model())
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn generates_an_mp4_with_a_sidecar_and_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("fox.mp4");
    let frames_dir = dir.path().join("frames");
    let out = generate(&[
        "--prompt",
        "a red fox in the snow",
        "--negative-prompt",
        "blurry",
        "--height",
        "48",
        "--width",
        "64",
        "--frames",
        "13",
        "--steps",
        "3",
        "--seed",
        "5",
        "--fps",
        "12",
        "--output",
        mp4.to_str().unwrap(),
        "--save-frames",
        frames_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let info = kinetoscope_video::probe(&mp4).unwrap();
    assert_eq!((info.codec.as_str(), info.pixel_format.as_str()), ("h264", "yuv420p"));
    assert_eq!((info.width, info.height, info.frames), (64, 48, 13));
    assert_eq!(info.fps, 12.0);

    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("fox.json")).unwrap()).unwrap();
    let request = &sidecar["request"];
    assert_eq!(request["prompt"], "a red fox in the snow");
    assert_eq!(request["negative_prompt"], "blurry");
    for (key, value) in [
        ("height", 48),
        ("width", 64),
        ("num_frames", 13),
        ("steps", 3),
        ("seed", 5),
        ("fps", 12),
        ("max_sequence_length", 512),
    ] {
        assert_eq!(request[key], value, "request.{key}");
    }
    assert_eq!(request["guidance_scale"], 5.0);
    assert_eq!(sidecar["resolved"]["scheduler"], "unipc");
    assert_eq!(sidecar["resolved"]["shift"], 3.0);
    // The tiny model is no registry entry: what wasn't given came from the built-in (Wan 2.1) defaults.
    assert_eq!(sidecar["resolved"]["defaults_from"], "built-in");
    // Where the memory went: the text encoder offloaded by default, the VAE whole at this size, no GPU.
    assert_eq!(sidecar["resolved"]["text_encoder"], "offload");
    assert!(sidecar["resolved"]["vae_tiling"].is_null());
    assert!(sidecar["memory"]["peak_gpu_bytes"].is_null());
    assert_eq!(sidecar["model"]["pipeline_class"], "WanPipeline");
    assert_eq!(sidecar["model"]["config_sha256"].as_object().unwrap().len(), 4);
    assert_eq!(sidecar["video"]["frames"], 13);
    for stage in ["load_s", "text_encoding_s", "denoising_s", "step_s", "vae_decode_s", "encode_s", "total_s"] {
        assert!(sidecar["timings"][stage].as_f64().is_some(), "timings.{stage}");
    }

    let pngs: Vec<_> = std::fs::read_dir(&frames_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(pngs.len(), 13);
    assert!(frames_dir.join("frame_00000.png").is_file() && frames_dir.join("frame_00012.png").is_file());
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn the_same_latents_give_the_same_video() {
    let dir = tempfile::tempdir().unwrap();
    let reference =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/reference/wan21-tiny-a/pipeline.safetensors");
    let noise = dir.path().join("noise.safetensors");
    let latents =
        candle_core::safetensors::load(&reference, &candle_core::Device::Cpu).unwrap().remove("latents").unwrap();
    candle_core::safetensors::save(&[("latents", latents)].into_iter().collect(), &noise).unwrap();
    let run = |name: &str, seed: &str| {
        let path = dir.path().join(name);
        let out = generate(&[
            "--prompt",
            "a lighthouse",
            "--height",
            "32",
            "--width",
            "48",
            "--frames",
            "9",
            "--steps",
            "2",
            "--seed",
            seed,
            "--latents",
            noise.to_str().unwrap(),
            "--output",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        kinetoscope_video::read_frames(&path).unwrap().into_bytes()
    };
    // The latents file decides the noise; the seed does not enter.
    assert_eq!(run("a.mp4", "1"), run("b.mp4", "2"));
}

fn assert_fails(args: &[&str], expected: &[&str]) {
    let out = generate(args);
    assert!(!out.status.success(), "should fail: {args:?}");
    let err = stderr(&out);
    for part in expected {
        assert!(err.contains(part), "expected {part:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.mp4");
    let out = out.to_str().unwrap();
    fn request<'a>(height: &'a str, frames: &'a str, output: &'a str) -> Vec<&'a str> {
        vec![
            "--prompt", "x", "--steps", "1", "--width", "48", "--height", height, "--frames", frames, "--output",
            output,
        ]
    }
    assert_fails(&request("40", "9", out), &["height", "40", "multiple of 16"]);
    assert_fails(&request("32", "10", out), &["num_frames", "10", "4k+1"]);
    assert_fails(&request("32", "9", "/nonexistent-dir/out.mp4"), &["/nonexistent-dir", "does not exist"]);
    let mut bad_device = request("32", "9", out);
    bad_device.extend(["--device", "tpu"]);
    assert_fails(&bad_device, &["device tpu", "expected cpu, cuda or cuda:N"]);
    for (flag, value, expected) in
        [("--vae-tiling", "sometimes", "expected auto, off or on"), ("--text-encoder", "gpu", "expected resident")]
    {
        let mut bad = request("32", "9", out);
        bad.extend([flag, value]);
        assert_fails(&bad, &[flag, value, expected]);
    }
    let mut bad_latents = request("32", "9", out);
    bad_latents.extend(["--latents", "/nonexistent/noise.safetensors"]);
    assert_fails(&bad_latents, &["/nonexistent/noise.safetensors"]);
    assert!(!Path::new(out).exists(), "a failed run writes no output");

    let missing = Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
        .args(["generate", "--model", "/nonexistent/model", "--prompt", "x", "--output", out])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = stderr(&missing);
    assert!(err.contains("/nonexistent/model"), "{err}");
    assert!(err.contains("without network, see SECURITY.md, \"Air-gapped deployment\""), "{err}");
}

/// Settings left out come from the model: for the tiny TI2V model, no registry entry, the built-in (Wan 2.1)
/// ones, with the scheduler config's shift. (A registry entry's, 1280×704×121, would be slow even on it; unit
/// tests feed those through the same code.)
#[test]
fn what_is_not_given_takes_the_models_defaults_and_the_sidecar_says_whence() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("still.mp4");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/wan22-ti2v-tiny-a");
    let out = Command::new(env!("CARGO_BIN_EXE_kinetoscope"))
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "a kite", "--steps", "1"])
        .args(["--height", "32", "--width", "32", "--max-sequence-length", "16", "-o", mp4.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar = read_sidecar(&dir.path().join("still.json"));
    let request = &sidecar["request"];
    assert_eq!((request["num_frames"].as_u64(), request["fps"].as_u64()), (Some(81), Some(16)));
    assert_eq!((request["guidance_scale"].as_f64(), request["shift"].as_f64()), (Some(5.0), None));
    assert_eq!(sidecar["resolved"]["defaults_from"], "built-in");
    assert_eq!(sidecar["resolved"]["shift"], 5.0, "the TI2V fixture's scheduler config");
    let info = kinetoscope_video::probe(&mp4).unwrap();
    assert_eq!((info.frames, info.fps), (81, 16.0));
}

#[test]
fn help_names_the_supported_model_families() {
    let help = Command::new(env!("CARGO_BIN_EXE_kinetoscope")).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Wan 2.1 T2V") && text.contains("Wan 2.2 TI2V"), "{text}");
}

fn read_sidecar(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A small request (32×48, 9 frames, short text) writing to `output`, with `extra` flags.
fn small(output: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--prompt", "a kite", "--height", "32", "--width", "48", "--frames", "9"];
    args.extend(["--max-sequence-length", "16", "--output", output.to_str().unwrap()]);
    args.extend(extra);
    generate(&args)
}

/// Tiles asked for and the encoder on the CPU: recorded, and a frame within one tile decodes whole.
#[test]
fn memory_settings_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("kite.mp4");
    let out = small(&mp4, &["--steps", "1", "--vae-tiling", "on", "--text-encoder", "cpu"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar = read_sidecar(&dir.path().join("kite.json"));
    assert_eq!(sidecar["resolved"]["text_encoder"], "cpu");
    assert!(sidecar["resolved"]["vae_tiling"].is_null(), "32×48 fits in one 256-pixel tile");
}

#[test]
fn a_preset_sets_steps_and_step_cache_and_explicit_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let draft = dir.path().join("draft.mp4");
    let out = small(&draft, &["--preset", "draft", "--seed", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar = read_sidecar(&dir.path().join("draft.json"));
    assert_eq!(sidecar["preset"], "draft");
    let request = &sidecar["request"];
    // The preset's steps and cache; the size given on the command line.
    assert_eq!((request["steps"].as_u64(), request["step_cache"].as_f64()), (Some(20), Some(0.1)));
    assert_eq!((request["height"].as_u64(), request["width"].as_u64()), (Some(32), Some(48)));
    let cached = sidecar["timings"]["cached_steps"].as_u64().unwrap();
    assert!(cached <= 17, "at most every step but the first two and the last: {cached}");

    let quality = dir.path().join("quality.mp4");
    let out = small(&quality, &["--preset", "quality", "--steps", "2", "--step-cache", "0.5"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar = read_sidecar(&dir.path().join("quality.json"));
    assert_eq!(sidecar["preset"], "quality");
    assert_eq!((sidecar["request"]["steps"].as_u64(), sidecar["request"]["step_cache"].as_f64()), (Some(2), Some(0.5)));
    assert_eq!(sidecar["timings"]["cached_steps"], 0, "two steps: both always computed");

    let plain = dir.path().join("plain.mp4");
    let out = small(&plain, &["--steps", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar = read_sidecar(&dir.path().join("plain.json"));
    assert!(sidecar["preset"].is_null() && sidecar["request"]["step_cache"].is_null(), "{sidecar}");
    assert!(sidecar.get("candidates").is_none());
    assert!(sidecar["quality"]["score"].as_f64().is_some());
}

/// The few-step recipe of distilled models: explicit timesteps with flow-match Euler, and guidance 1, which
/// skips the unconditional pass; the sidecar records both. A schedule that doesn't decrease, or beside
/// `--scheduler unipc`, is refused by name.
#[test]
fn explicit_timesteps_run_few_steps_without_guidance() {
    let dir = tempfile::tempdir().unwrap();
    let mp4 = dir.path().join("fast.mp4");
    let out = small(&mp4, &["--timesteps", "1000,750,500,250", "--shift", "5", "--guidance", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let sidecar = read_sidecar(&dir.path().join("fast.json"));
    assert_eq!(sidecar["request"]["schedule"], serde_json::json!({"timesteps": [1000.0, 750.0, 500.0, 250.0]}));
    assert_eq!(sidecar["request"]["steps"], 4);
    assert_eq!(
        (sidecar["resolved"]["scheduler"].as_str(), sidecar["resolved"]["guidance"].as_bool()),
        (Some("euler"), Some(false))
    );

    let refused = small(&dir.path().join("no.mp4"), &["--timesteps", "250,500"]);
    assert!(!refused.status.success() && stderr(&refused).contains("timesteps"), "{}", stderr(&refused));
    let refused = small(&dir.path().join("no.mp4"), &["--sigmas", "1,0.5", "--scheduler", "unipc"]);
    assert!(!refused.status.success() && stderr(&refused).contains("--scheduler"), "{}", stderr(&refused));
}

/// LoRA adapters merged at load: two at once, each recorded in the sidecar with its sha256, scale and layout;
/// an adapter with a key the model lacks fails before any work, naming the key, unless unmatched keys are
/// allowed; a low-noise adapter needs a two-expert model.
#[test]
fn lora_adapters_are_merged_recorded_and_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let lora = |name: &str| tiny_model().join("../loras").join(name).display().to_string();
    let (peft, official) = (format!("{}:0.7", lora("wan21-peft.safetensors")), lora("wan21-official.safetensors"));
    let out = small(&dir.path().join("styled.mp4"), &["--steps", "1", "--lora", &peft, "--lora", &official]);
    assert!(out.status.success(), "{}", stderr(&out));
    let loras = read_sidecar(&dir.path().join("styled.json"))["resolved"]["loras"].clone();
    assert_eq!(loras.as_array().map(Vec::len), Some(2), "{loras}");
    assert_eq!((loras[0]["scale"].as_f64(), loras[1]["scale"].as_f64()), (Some(0.7), Some(1.0)));
    assert_eq!(
        (loras[0]["component"].as_str(), loras[0]["sha256"].as_str().map(str::len)),
        (Some("transformer"), Some(64))
    );

    let unmatched = lora("wan21-unmatched.safetensors");
    let out = small(&dir.path().join("no.mp4"), &["--steps", "1", "--lora", &unmatched]);
    assert!(!out.status.success() && stderr(&out).contains("to_qkv"), "{}", stderr(&out));
    let out = small(&dir.path().join("yes.mp4"), &["--steps", "1", "--lora", &unmatched, "--lora-allow-unmatched"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        read_sidecar(&dir.path().join("yes.json"))["resolved"]["loras"][0]["unmatched"].as_array().map(Vec::len),
        Some(2)
    );
    let out = small(&dir.path().join("no.mp4"), &["--steps", "1", "--lora-2", &lora("wan21-peft.safetensors")]);
    assert!(!out.status.success() && stderr(&out).contains("two-expert"), "{}", stderr(&out));
}

/// The sidecar's candidate list: seeds in rank order, scores non-increasing, the best first and kept.
fn ranked_seeds(sidecar: &serde_json::Value) -> Vec<u64> {
    let record = &sidecar["candidates"];
    let ranked = record["ranked"].as_array().unwrap();
    let scores: Vec<f64> = ranked.iter().map(|c| c["quality"]["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(record["best_seed"], ranked[0]["seed"]);
    ranked.iter().map(|c| c["seed"].as_u64().unwrap()).collect()
}

#[test]
fn candidates_keep_the_best_or_all_of_them_ranked() {
    let dir = tempfile::tempdir().unwrap();
    let best_dir = dir.path().join("best");
    std::fs::create_dir(&best_dir).unwrap();
    let out = small(&best_dir.join("kite.mp4"), &["--steps", "2", "--seed", "5", "--candidates", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(file_names(&best_dir), ["kite.json", "kite.mp4"], "only the best stays, nothing half-written");
    let sidecar = read_sidecar(&best_dir.join("kite.json"));
    let seeds = ranked_seeds(&sidecar);
    let mut sorted = seeds.clone();
    sorted.sort();
    assert_eq!(sorted, [5, 6, 7]);
    assert_eq!(sidecar["request"]["seed"], seeds[0]);
    assert_eq!(sidecar["candidates"]["keep"], "best");
    assert_eq!(sidecar["quality"], sidecar["candidates"]["ranked"][0]["quality"]);
    assert!(sidecar["candidates"]["ranked"][1]["output"].is_null());

    let all_dir = dir.path().join("all");
    std::fs::create_dir(&all_dir).unwrap();
    let args = ["--steps", "2", "--seed", "5", "--candidates", "3", "--keep", "all"];
    let out = small(&all_dir.join("kite.mp4"), &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let best = read_sidecar(&all_dir.join("kite.json"));
    let seeds = ranked_seeds(&best);
    // Same seeds, same videos, same ranking as with --keep best.
    assert_eq!(seeds, ranked_seeds(&sidecar));
    let mut expected = vec!["kite.json".to_string(), "kite.mp4".to_string()];
    for seed in &seeds[1..] {
        expected.extend([format!("kite+seed{seed}.json"), format!("kite+seed{seed}.mp4")]);
    }
    expected.sort();
    assert_eq!(file_names(&all_dir), expected);
    for seed in &seeds[1..] {
        let other = read_sidecar(&all_dir.join(format!("kite+seed{seed}.json")));
        assert_eq!(other["request"]["seed"], *seed);
        assert_eq!(other["candidates"], best["candidates"]);
        let info = kinetoscope_video::probe(&all_dir.join(format!("kite+seed{seed}.mp4"))).unwrap();
        assert_eq!((info.width, info.height, info.frames), (48, 32, 9));
    }
    assert_eq!(
        kinetoscope_video::read_frames(&all_dir.join("kite.mp4")).unwrap(),
        kinetoscope_video::read_frames(&best_dir.join("kite.mp4")).unwrap()
    );
}

#[test]
fn bad_presets_caches_and_candidate_counts_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.mp4");
    let out = out.to_str().unwrap();
    let args = |extra: &'static [&'static str]| {
        let mut args = vec!["--prompt", "x", "--steps", "1", "--height", "32", "--width", "48", "--frames", "9"];
        args.extend(["--output", out]);
        args.extend(extra);
        args
    };
    assert_fails(&args(&["--preset", "fast"]), &["unknown preset \"fast\"", "draft, balanced, quality"]);
    assert_fails(&args(&["--step-cache=-1"]), &["step_cache", "finite number ≥ 0"]);
    assert_fails(&args(&["--candidates", "17"]), &["from 1 to 16"]);
    assert_fails(&args(&["--candidates", "2", "--seed", "18446744073709551615"]), &["no room for 2 candidates"]);
    assert!(!Path::new(out).exists(), "a failed run writes no output");
}
