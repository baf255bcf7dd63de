//! The batch manifest: JSON Lines, one video per line: an `id` (which names the output files), the fields
//! of a generate request, optionally a `preset` that the line's own fields override, and optionally an `image`
//! to start the video from (and a `last_image` to end it on), or a VACE model's `control_video`,
//! `reference_images` and `conditioning_scale`. Blank lines and lines starting with `#` are skipped.
//!
//! Each field is read on its own, so that every problem names its line and its field (serde's own
//! errors for a mistyped value don't say which field), and a field this reader doesn't know is an
//! error: a typo such as `heigth` must not silently render at the default size.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kinetoscope::scheduler::Schedule;
use kinetoscope::{GenerateRequest, LoraSpec, Preset};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The fields a line may have. No `latents`: the noise is the seed's, and the only files a line names are its
/// images and a VACE control video.
const FIELDS: [&str; 25] = [
    "id",
    "preset",
    "image",
    "last_image",
    "control_video",
    "reference_images",
    "conditioning_scale",
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "num_frames",
    "steps",
    "guidance_scale",
    "guidance_scale_2",
    "shift",
    "scheduler",
    "timesteps",
    "sigmas",
    "dmd",
    "seed",
    "max_sequence_length",
    "fps",
    "step_cache",
    "loras",
];

/// Longest id: with `.json` added it stays far below every file system's 255-byte name limit.
const MAX_ID_LEN: usize = 128;

/// One video to render.
#[derive(Debug)]
pub struct Item {
    /// 1-based line number in the manifest.
    pub line: usize,
    pub id: String,
    /// The preset the request started from.
    pub preset: Option<Preset>,
    /// Every default filled in, the seed included.
    pub request: GenerateRequest,
    /// The image the video starts from, as `generate --image`: the line's path, resolved against the
    /// manifest's folder; checked to exist.
    pub image: Option<PathBuf>,
    /// The image the video ends on, as `generate --last-image`; found and checked as `image`, which it needs.
    pub last_image: Option<PathBuf>,
    /// Wan VACE's inputs, as `generate --control-video`, `--reference-image` and `--conditioning-scale`; found and
    /// checked as `image`.
    pub control_video: Option<PathBuf>,
    pub reference_images: Vec<PathBuf>,
    pub conditioning_scale: f64,
}

impl Item {
    /// Whether the line asks for Wan VACE's conditioning.
    pub fn vace(&self) -> bool {
        self.control_video.is_some() || !self.reference_images.is_empty()
    }
}

/// What is wrong with a manifest line.
#[derive(Debug)]
pub struct LineError {
    pub line: usize,
    /// The field at fault, when one is.
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "line {}: {field}: {}", self.line, self.reason),
            None => write!(f, "line {}: {}", self.line, self.reason),
        }
    }
}

/// Parses every line of a manifest found in `folder`, filling what a line leaves out from `defaults` (the
/// model's); on any problem, returns all of them (one per line at most).
pub fn parse(text: &str, folder: &Path, defaults: &GenerateRequest) -> Result<Vec<Item>, Vec<LineError>> {
    let mut items = Vec::new();
    let mut errors = Vec::new();
    // Lowercased id → line: outputs of ids that differ only in case collide on case-insensitive
    // file systems (macOS, SMB shares).
    let mut seen: HashMap<String, (usize, String)> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let item = match parse_line(line, trimmed, folder, defaults) {
            Ok(item) => item,
            Err((field, reason)) => {
                errors.push(LineError { line, field, reason });
                continue;
            }
        };
        let id = &item.id;
        if let Some((first, first_id)) = seen.get(&id.to_ascii_lowercase()) {
            let reason = if first_id == id {
                format!("{id:?} is already the id of line {first}")
            } else {
                format!("{id:?} differs only in letter case from {first_id:?} of line {first}, and some file systems don't tell them apart")
            };
            errors.push(LineError { line, field: Some("id".into()), reason });
            continue;
        }
        seen.insert(id.to_ascii_lowercase(), (line, id.clone()));
        items.push(item);
    }
    if errors.is_empty() {
        Ok(items)
    } else {
        Err(errors)
    }
}

type FieldError = (Option<String>, String);

fn parse_line(line: usize, text: &str, folder: &Path, defaults: &GenerateRequest) -> Result<Item, FieldError> {
    let value: Value = serde_json::from_str(text).map_err(|e| (None, format!("not JSON: {}", without_position(&e))))?;
    let Value::Object(mut fields) = value else {
        return Err((None, "expected a JSON object".into()));
    };
    if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err((Some(unknown.clone()), format!("unknown field; expected one of {}", FIELDS.join(", "))));
    }
    let id: String = take(&mut fields, "id")?.ok_or((Some("id".into()), "missing".into()))?;
    validate_id(&id).map_err(|reason| (Some("id".into()), reason))?;
    let prompt = take(&mut fields, "prompt")?.ok_or((Some("prompt".into()), "missing".into()))?;
    // The model's defaults as `kinetoscope generate` takes them, then the preset's, then the line's own fields.
    let preset: Option<Preset> = take(&mut fields, "preset")?;
    let mut d = defaults.clone();
    if let Some(preset) = preset {
        preset.apply(&mut d);
    }
    let given = [
        take::<Vec<f64>>(&mut fields, "timesteps")?.map(Schedule::Timesteps),
        take::<Vec<f64>>(&mut fields, "sigmas")?.map(Schedule::Sigmas),
        take::<Vec<f64>>(&mut fields, "dmd")?.map(Schedule::Dmd),
    ];
    let schedule = match given.into_iter().flatten().collect::<Vec<_>>()[..] {
        [] => d.schedule.clone(),
        [ref one] => Some(one.clone()),
        _ => return Err((Some("sigmas".into()), "give one of timesteps, sigmas and dmd".into())),
    };
    let request = GenerateRequest {
        prompt,
        negative_prompt: take(&mut fields, "negative_prompt")?.unwrap_or(d.negative_prompt),
        height: take(&mut fields, "height")?.unwrap_or(d.height),
        width: take(&mut fields, "width")?.unwrap_or(d.width),
        num_frames: take(&mut fields, "num_frames")?.unwrap_or(d.num_frames),
        // An explicit schedule's length is the steps, unless the line says otherwise (and the model refuses it).
        steps: take(&mut fields, "steps")?.or(schedule.as_ref().map(Schedule::len)).unwrap_or(d.steps),
        guidance_scale: take(&mut fields, "guidance_scale")?.unwrap_or(d.guidance_scale),
        guidance_scale_2: take(&mut fields, "guidance_scale_2")?.or(d.guidance_scale_2),
        shift: take(&mut fields, "shift")?.or(d.shift),
        scheduler: take(&mut fields, "scheduler")?,
        schedule,
        // Without a seed, one from the id: a rerun renders the same video.
        seed: take(&mut fields, "seed")?.unwrap_or_else(|| seed_for(&id)),
        latents: None,
        max_sequence_length: take(&mut fields, "max_sequence_length")?.unwrap_or(d.max_sequence_length),
        fps: take(&mut fields, "fps")?.unwrap_or(d.fps),
        step_cache: take(&mut fields, "step_cache")?.or(d.step_cache),
        loras: loras_field(&mut fields, folder)?,
        distilled: d.distilled,
    };
    // The pipeline checks every other field against the model; the frame rate only matters to the MP4,
    // which would otherwise fail after the whole render.
    if request.fps == 0 {
        return Err((Some("fps".into()), "0 is not a frame rate; expected at least 1".into()));
    }
    // Relative to the manifest, so that a manifest and its images move together; checked now rather than when
    // the item's turn comes.
    let image = image_field(&mut fields, "image", folder)?;
    let last_image = image_field(&mut fields, "last_image", folder)?;
    if last_image.is_some() && image.is_none() {
        return Err((Some("last_image".into()), "needs an image to start from (the field image)".into()));
    }
    let control_video = image_field(&mut fields, "control_video", folder)?;
    let reference_images: Vec<PathBuf> = take::<Vec<PathBuf>>(&mut fields, "reference_images")?
        .unwrap_or_default()
        .into_iter()
        .map(|path| folder.join(path))
        .collect();
    if let Some(path) = reference_images.iter().find(|path| !path.is_file()) {
        return Err((Some("reference_images".into()), format!("{} is not a file", path.display())));
    }
    let vace = control_video.is_some() || !reference_images.is_empty();
    if vace && image.is_some() {
        return Err((Some("image".into()), "a VACE model's control_video and reference_images take no image".into()));
    }
    let conditioning_scale = match take::<f64>(&mut fields, "conditioning_scale")? {
        Some(_) if !vace => {
            let reason = "scales a control_video or reference_images, and the line has neither";
            return Err((Some("conditioning_scale".into()), reason.into()));
        }
        Some(scale) if !scale.is_finite() => {
            return Err((Some("conditioning_scale".into()), format!("{scale} must be a finite number")))
        }
        scale => scale.unwrap_or(1.0),
    };
    Ok(Item { line, id, preset, request, image, last_image, control_video, reference_images, conditioning_scale })
}

/// An item's run-time LoRA adapters, `[{"path": "style.safetensors", "scale": 0.8, "low_noise": false}]`, each path
/// resolved against the manifest's `folder` and checked to be a file; applied to that item only, over the model
/// loaded once (and any `--lora` merged into it).
fn loras_field(fields: &mut Map<String, Value>, folder: &Path) -> Result<Vec<LoraSpec>, FieldError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        path: PathBuf,
        #[serde(default = "one")]
        scale: f64,
        #[serde(default)]
        low_noise: bool,
    }
    fn one() -> f64 {
        1.0
    }
    let field = || Some("loras".to_string());
    let items: Vec<Item> = take(fields, "loras")?.unwrap_or_default();
    items
        .into_iter()
        .map(|item| {
            let path = folder.join(&item.path);
            if !path.is_file() {
                return Err((field(), format!("{} is not a file", path.display())));
            }
            if !item.scale.is_finite() {
                return Err((field(), format!("{}: the scale must be a finite number", path.display())));
            }
            let component = if item.low_noise { "transformer_2" } else { "transformer" };
            Ok(LoraSpec { path, scale: item.scale, component })
        })
        .collect()
}

/// The image file `name` names, resolved against the manifest's `folder` and checked to be a file.
fn image_field(fields: &mut Map<String, Value>, name: &str, folder: &Path) -> Result<Option<PathBuf>, FieldError> {
    let image = take::<PathBuf>(fields, name)?.map(|path| folder.join(path));
    if let Some(path) = image.as_ref().filter(|path| !path.is_file()) {
        return Err((Some(name.into()), format!("{} is not a file", path.display())));
    }
    Ok(image)
}

/// Removes `name` from the line and reads it as a `T`; absent and `null` are `None`.
fn take<T: DeserializeOwned>(fields: &mut Map<String, Value>, name: &str) -> Result<Option<T>, FieldError> {
    match fields.remove(name) {
        None => Ok(None),
        Some(value) => serde_json::from_value(value).map_err(|e| (Some(name.into()), without_position(&e))),
    }
}

/// serde_json's message without its " at line 1 column N", which counts within the line alone.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    message.strip_suffix(&position).map(str::to_owned).unwrap_or(message)
}

/// An id becomes a file name (`<id>.mp4`), so it is kept to a character set that is safe on every file
/// system and can't name a folder or a hidden file.
fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters long (is {})", id.len()));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{id:?} contains {c:?}; ids may only use A-Z, a-z, 0-9, '.', '_' and '-'"));
    }
    if id.starts_with('.') {
        return Err(format!("{id:?} starts with '.', which would make its outputs hidden files"));
    }
    Ok(())
}

/// The first 8 bytes of SHA-256 over `parts`, big-endian: stable across builds, platforms and versions,
/// unlike std's `DefaultHasher`.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// The seed of an item that names none. Its own domain prefix keeps it independent of the shard
/// assignment, which hashes the bare id; below 2^53 like `generate`'s random seeds, so JSON readers in
/// every language keep it exact.
fn seed_for(id: &str) -> u64 {
    stable_hash(&[b"kinetoscope seed\0", id.as_bytes()]) >> 11
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` parsed with the built-in defaults, as a manifest in the working folder.
    fn parse_plain(text: &str) -> Result<Vec<Item>, Vec<LineError>> {
        parse(text, Path::new("."), &GenerateRequest::default())
    }

    fn errors(text: &str) -> Vec<String> {
        parse_plain(text).unwrap_err().iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn a_minimal_line_gets_generate_defaults_and_a_seed_from_its_id() {
        let items = parse_plain("# comment\n\n{\"id\": \"a-1\", \"prompt\": \"fox\"}\r\n{\"id\": \"b\", \"prompt\": \"owl\", \"seed\": 7, \"scheduler\": \"euler\", \"shift\": null}\n").unwrap();
        assert_eq!((items[0].line, items[0].id.as_str(), items[1].line), (3, "a-1", 4));
        let (r, d) = (&items[0].request, GenerateRequest::default());
        assert_eq!((r.prompt.as_str(), r.height, r.width, r.num_frames, r.steps), ("fox", d.height, d.width, 81, 50));
        assert_eq!((r.guidance_scale, r.fps, r.max_sequence_length, r.shift, r.scheduler), (5.0, 16, 512, None, None));
        assert_eq!(r.seed, seed_for("a-1"));
        assert!(r.seed < 1 << 53);
        assert_ne!(seed_for("a-1"), seed_for("a-2"));
        assert_eq!(items[1].request.seed, 7);
        assert_eq!(items[1].request.scheduler, Some(kinetoscope::scheduler::SchedulerKind::Euler));
    }

    #[test]
    fn every_bad_line_is_reported_with_its_field() {
        let text = [
            r#"{"id": "ok", "prompt": "x"}"#,
            r#"{"id": "a", "prompt": "x", "heigth": 48}"#,
            r#"{"id": "../etc", "prompt": "x"}"#,
            r#"{"id": "b", "prompt": "x", "steps": -1}"#,
            r#"{"id": "c", "prompt": "x", "scheduler": "ddim"}"#,
            r#"{"id": "ok", "prompt": "y"}"#,
            r#"{"id": "OK", "prompt": "y"}"#,
            r#"{"prompt": "x"}"#,
            r#"{"id": "d", "prompt": "x""#,
            r#"["id"]"#,
            r#"{"id": ".hidden", "prompt": "x"}"#,
            r#"{"id": "e", "prompt": "x", "fps": 0}"#,
            r#"{"id": "f", "prompt": 3}"#,
        ]
        .join("\n");
        let errors = errors(&text);
        let expected = [
            "line 2: heigth: unknown field",
            "line 3: id: \"../etc\" contains '/'",
            "line 4: steps: invalid value: integer `-1`, expected usize",
            "line 5: scheduler: unknown variant `ddim`",
            "line 6: id: \"ok\" is already the id of line 1",
            "line 7: id: \"OK\" differs only in letter case from \"ok\" of line 1",
            "line 8: id: missing",
            "line 9: not JSON: EOF while parsing an object",
            "line 10: expected a JSON object",
            "line 11: id: \".hidden\" starts with '.'",
            "line 12: fps: 0 is not a frame rate",
            "line 13: prompt: invalid type: integer `3`, expected a string",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, expected) in errors.iter().zip(expected) {
            assert!(error.starts_with(expected), "{error:?} should start with {expected:?}");
        }
        assert!(!errors[7].contains("column"), "{}", errors[7]);
    }

    /// Turbo's schedule, shift and guidance reach the request (the model then checks it is distilled).
    #[test]
    fn the_turbo_preset_carries_its_schedule() {
        let items = parse_plain(r#"{"id": "a", "prompt": "x", "preset": "turbo"}"#).unwrap();
        let r = &items[0].request;
        assert_eq!((r.steps, r.guidance_scale, r.shift, r.distilled), (4, 1.0, Some(5.0), true));
        assert_eq!(r.schedule, Some(Schedule::Sigmas(vec![1.0, 0.75, 0.5, 0.25])));
    }

    #[test]
    fn a_preset_fills_steps_size_and_cache_and_the_line_overrides_it() {
        let items = parse_plain(concat!(
            r#"{"id": "a", "prompt": "x", "preset": "draft"}"#,
            "\n",
            r#"{"id": "b", "prompt": "x", "preset": "draft", "steps": 4, "height": 32, "step_cache": 0.3}"#,
            "\n",
            r#"{"id": "c", "prompt": "x", "step_cache": 0.02}"#,
        ))
        .unwrap();
        let fields = |r: &GenerateRequest| (r.steps, r.width, r.height, r.step_cache);
        assert_eq!((items[0].preset, fields(&items[0].request)), (Some(Preset::Draft), (20, 416, 240, Some(0.1))));
        assert_eq!(fields(&items[1].request), (4, 416, 32, Some(0.3)));
        assert_eq!((items[2].preset, fields(&items[2].request)), (None, (50, 832, 480, Some(0.02))));

        let errors = errors(r#"{"id": "a", "prompt": "x", "preset": "fast"}"#);
        assert!(errors[0].starts_with("line 1: preset: unknown variant `fast`"), "{errors:?}");
        assert!(errors[0].contains("draft") && errors[0].contains("quality"), "{errors:?}");
    }

    #[test]
    fn ids_are_safe_file_names() {
        for good in ["a", "clip_001.v2", "A-b.c_d", &"x".repeat(MAX_ID_LEN)] {
            assert!(validate_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "a\\b", "..", "a b", "é", "a\0", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn comments_and_blank_lines_are_not_items() {
        assert!(parse_plain("# nothing\n\n   \n  # indented\n").unwrap().is_empty());
    }

    #[test]
    fn what_a_line_leaves_out_is_the_models_default() {
        let defaults = GenerateRequest {
            height: 704,
            width: 1280,
            num_frames: 121,
            fps: 24,
            shift: Some(5.0),
            ..GenerateRequest::default()
        };
        let text = concat!(
            r#"{"id": "a", "prompt": "x"}"#,
            "\n",
            r#"{"id": "b", "prompt": "x", "preset": "draft", "num_frames": 9, "shift": null}"#,
        );
        let items = parse(text, Path::new("."), &defaults).unwrap();
        let fields = |r: &GenerateRequest| (r.width, r.height, r.num_frames, r.fps, r.steps, r.shift);
        assert_eq!(fields(&items[0].request), (1280, 704, 121, 24, 50, Some(5.0)));
        // The preset's size and steps over the model's; a null field is left out.
        assert_eq!(fields(&items[1].request), (416, 240, 9, 24, 20, Some(5.0)));
    }

    #[test]
    fn adapters_are_found_beside_the_manifest_with_their_scales() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("style.safetensors"), b"").unwrap();
        let text = r#"{"id": "a", "prompt": "x", "loras": [{"path": "style.safetensors", "scale": 0.5}, {"path": "style.safetensors", "low_noise": true}]}"#;
        let items = parse(text, folder.path(), &GenerateRequest::default()).unwrap();
        let loras: Vec<(&Path, f64, &str)> =
            items[0].request.loras.iter().map(|l| (l.path.as_path(), l.scale, l.component)).collect();
        let path = folder.path().join("style.safetensors");
        assert_eq!(loras, [(path.as_path(), 0.5, "transformer"), (path.as_path(), 1.0, "transformer_2")]);

        let text = concat!(
            r#"{"id": "a", "prompt": "x", "loras": [{"path": "gone.safetensors"}]}"#,
            "\n",
            r#"{"id": "b", "prompt": "x", "loras": [{"path": "style.safetensors", "weight": 1}]}"#,
        );
        let errors: Vec<String> = parse(text, folder.path(), &GenerateRequest::default())
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors[0].starts_with("line 1: loras: ") && errors[0].ends_with("gone.safetensors is not a file"),
            "{errors:?}"
        );
        assert!(errors[1].starts_with("line 2: loras: ") && errors[1].contains("weight"), "{errors:?}");
    }

    #[test]
    fn an_image_is_found_beside_the_manifest_or_named_missing() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::create_dir(folder.path().join("stills")).unwrap();
        std::fs::write(folder.path().join("stills/fox.png"), b"").unwrap();
        let absolute = folder.path().join("stills/fox.png");
        let text = format!(
            "{}\n{}\n",
            r#"{"id": "a", "prompt": "x", "image": "stills/fox.png"}"#,
            serde_json::json!({ "id": "b", "prompt": "x", "image": absolute }),
        );
        let items = parse(&text, folder.path(), &GenerateRequest::default()).unwrap();
        assert_eq!(items[0].image.as_deref(), Some(absolute.as_path()));
        assert_eq!(items[1].image.as_deref(), Some(absolute.as_path()));

        let text = concat!(
            r#"{"id": "a", "prompt": "x", "image": "fox.png"}"#,
            "\n",
            r#"{"id": "b", "prompt": "x", "image": "stills"}"#,
            "\n",
            r#"{"id": "c", "prompt": "x", "image": 3}"#,
        );
        let errors: Vec<String> = parse(text, folder.path(), &GenerateRequest::default())
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        let missing = format!("line 1: image: {} is not a file", folder.path().join("fox.png").display());
        assert_eq!(errors[0], missing);
        assert!(errors[1].starts_with("line 2: image: ") && errors[1].ends_with("stills is not a file"), "{errors:?}");
        assert!(errors[2].starts_with("line 3: image: invalid type: integer `3`"), "{errors:?}");
    }

    #[test]
    fn a_last_image_is_found_as_the_image_is_and_needs_one() {
        let folder = tempfile::tempdir().unwrap();
        for name in ["first.png", "last.png"] {
            std::fs::write(folder.path().join(name), b"").unwrap();
        }
        let text = concat!(
            r#"{"id": "a", "prompt": "x", "image": "first.png", "last_image": "last.png", "guidance_scale_2": 2}"#,
            "\n",
            r#"{"id": "b", "prompt": "x", "image": "first.png"}"#,
        );
        let items = parse(text, folder.path(), &GenerateRequest::default()).unwrap();
        assert_eq!(items[0].last_image.as_deref(), Some(folder.path().join("last.png").as_path()));
        assert_eq!((items[0].request.guidance_scale_2, items[1].request.guidance_scale_2), (Some(2.0), None));
        assert_eq!(items[1].last_image, None);
        // A model's default second scale fills a line that gives none.
        let defaults = GenerateRequest { guidance_scale_2: Some(3.0), ..GenerateRequest::default() };
        assert_eq!(parse(text, folder.path(), &defaults).unwrap()[1].request.guidance_scale_2, Some(3.0));

        let text = concat!(
            r#"{"id": "a", "prompt": "x", "image": "first.png", "last_image": "absent.png"}"#,
            "\n",
            r#"{"id": "b", "prompt": "x", "last_image": "last.png"}"#,
            "\n",
            r#"{"id": "c", "prompt": "x", "guidance_scale_2": "high"}"#,
        );
        let errors: Vec<String> = parse(text, folder.path(), &GenerateRequest::default())
            .unwrap_err()
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            errors[0],
            format!("line 1: last_image: {} is not a file", folder.path().join("absent.png").display())
        );
        assert_eq!(errors[1], "line 2: last_image: needs an image to start from (the field image)");
        assert!(errors[2].starts_with("line 3: guidance_scale_2: invalid type"), "{errors:?}");
    }
}
