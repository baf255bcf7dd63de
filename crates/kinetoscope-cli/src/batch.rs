//! `kinetoscope batch`: every item of a manifest → `DIR/<id>.mp4` + `DIR/<id>.json`, the model loaded once.
//!
//! - Strict: every line is parsed and checked against the model before anything renders; one bad line
//!   fails the run with every problem listed, so a typo never costs a half-rendered batch.
//! - Resumable: an item whose MP4 and sidecar exist and verify is skipped; anything else is rendered
//!   again. Files appear only complete (temporary name, then rename); the temporary files of a killed run
//!   are removed by the next.
//! - Sharded on the scheduler's own index (Kubernetes Indexed Job, Slurm array): an item belongs to
//!   shard `hash(id) mod N`, so shards never share an item, and each appends to its own results file.
//! - An item that fails is recorded with a stable error code and the run goes on; the exit status is
//!   non-zero if any item failed.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kinetoscope::{Error, GenerateRequest, Pipeline};
use kinetoscope_video::VideoError;
use serde_json::{json, Value};

use crate::edit::{self, Edit};
use crate::generate::{Model, ModelArgs};
use crate::manifest::{self, Item, LineError};
use crate::output::{self, Candidates, Job, Setup};

#[derive(clap::Args)]
pub struct Args {
    /// JSON Lines: one object per line with an `id` ([A-Za-z0-9._-], naming the outputs) and the fields of
    /// a request (prompt, negative_prompt, height, width, num_frames, steps, guidance_scale, shift,
    /// scheduler, seed, max_sequence_length, fps, step_cache; defaults the model's, as `generate`'s),
    /// optionally a `preset` (draft, balanced, quality, turbo) that the line's fields override, an `image` to start
    /// from as `generate --image` and a `last_image` to end on as `--last-image` (paths relative to the
    /// manifest's folder), `guidance_scale_2` as `--guidance-2`, and for a Wan VACE model `control_video`,
    /// `reference_images` (a list) and `conditioning_scale` as `--control-video`, `--reference-image` and
    /// `--conditioning-scale`. `#` lines are comments.
    manifest: PathBuf,
    /// Folder for `<id>.mp4`, `<id>.json` and `results-<I>-of-<N>.jsonl` (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// This process's share of the items, I/N with 0 ≤ I < N [default: from JOB_COMPLETION_INDEX or
    /// SLURM_ARRAY_TASK_ID, else 0/1].
    #[arg(long, conflicts_with = "shards")]
    shard: Option<Shard>,
    /// Number of shards, with the index from JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID
    /// [default: KINETOSCOPE_SHARDS, or SLURM_ARRAY_TASK_COUNT].
    #[arg(long)]
    shards: Option<u64>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    candidates: Candidates,
}

pub fn run(args: Args) -> Result<()> {
    let shard = Shard::resolve(args.shard, args.shards, &|name| std::env::var(name).ok())?;
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("cannot read the manifest {}", args.manifest.display()))?;
    // The model's configs alone tell its defaults, which the lines need; its weights load once they pass.
    let model = args.model.open()?;
    let folder = args.manifest.parent().unwrap_or(Path::new(""));
    let items =
        manifest::parse(&text, folder, &model.defaults()).map_err(|errors| bad_manifest(&args.manifest, &errors))?;
    if items.is_empty() {
        bail!("the manifest {} has no items", args.manifest.display());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    output::check_writable(&args.out.join("probe"))?;

    let (pipeline, load_s) = args.model.load(&model)?;
    // Every line, not only this shard's: all shards of one manifest agree on whether it is valid.
    let invalid: Vec<LineError> =
        items.iter().filter_map(|item| check(item, &model, &pipeline, args.candidates)).collect();
    if !invalid.is_empty() {
        return Err(bad_manifest(&args.manifest, &invalid));
    }
    let setup = args.model.setup(&pipeline, &model, load_s);

    let results_path = args.out.join(format!("results-{}-of-{}.jsonl", shard.index, shard.count));
    let mut results = Results::open(&results_path)?;
    let mine: Vec<&Item> = items.iter().filter(|item| shard.owns(&item.id)).collect();
    remove_leftovers(&args.out, &mine)?;
    // Skips first, so that the bar's rate and time left count only the items that render.
    let mut to_render = Vec::new();
    for item in &mine {
        let started = Instant::now();
        if verified(&mp4_path(&args.out, item), item, args.candidates) {
            results.record(item, &Outcome::Skipped, started)?;
        } else {
            to_render.push(*item);
        }
    }

    let bar = ProgressBar::new(to_render.len() as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} items [{elapsed} < {eta}] {msg}").expect("static template"),
    );
    let mut rendered_s = Vec::new();
    for item in to_render {
        let started = Instant::now();
        let status = results.status();
        let image = match &item.image {
            _ if item.vace() => {
                Some(Edit::read_vace(item.control_video.as_deref(), &item.reference_images, item.conditioning_scale))
            }
            Some(image) => Some(Edit::read_image(image, item.last_image.as_deref())),
            None => None,
        };
        let rendered = match image.transpose() {
            Ok(image) => render(&setup, item, image, &mp4_path(&args.out, item), args.candidates, &bar, &status)
                .map_err(|e| (failure_code(&e), e)),
            // Changed or unreadable since the check.
            Err(e) => Err(("invalid_image", e)),
        };
        let outcome = match rendered {
            Ok(()) => Outcome::Completed,
            Err((code, e)) => Outcome::Failed { code, message: message(&e) },
        };
        if let Outcome::Failed { code, message } = &outcome {
            bar.suspend(|| eprintln!("{}: failed ({code}): {message}", item.id));
        } else {
            rendered_s.push(started.elapsed().as_secs_f64());
        }
        results.record(item, &outcome, started)?;
        bar.inc(1);
    }
    bar.finish_and_clear();

    let median = median(&mut rendered_s).map(|s| format!("; median {s:.2} s per rendered item")).unwrap_or_default();
    eprintln!(
        "shard {shard} of {}: {} of {} items: {}{median}; results in {}",
        args.manifest.display(),
        mine.len(),
        items.len(),
        results.summary(),
        results_path.display()
    );
    if results.failed() > 0 {
        bail!("{} of {} items failed", results.failed(), mine.len());
    }
    Ok(())
}

fn mp4_path(out: &Path, item: &Item) -> PathBuf {
    // The id is validated to be a plain file name; nothing else from the line reaches a path.
    out.join(format!("{}.mp4", item.id))
}

/// Removes the temporary files that a run killed while writing these items left behind (it had no chance
/// to); only these items', since another shard may be writing its own in the same folder.
fn remove_leftovers(out: &Path, items: &[&Item]) -> Result<()> {
    let ids: HashSet<&str> = items.iter().map(|item| item.id.as_str()).collect();
    let entries = std::fs::read_dir(out).with_context(|| format!("cannot list the output folder {}", out.display()))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list the output folder {}", out.display()))?;
        let name = entry.file_name();
        if name.to_str().and_then(leftover_of).is_some_and(|id| ids.contains(id)) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove the leftover temporary file {}", entry.path().display()))?;
            removed += 1;
        }
    }
    if removed > 0 {
        eprintln!("removed {removed} temporary file(s) left by an interrupted run in {}", out.display());
    }
    Ok(())
}

/// The item whose output a temporary file was to become. An output is `<id>.mp4`, `<id>.json` or a kept
/// candidate's `<id>+seed<S>.mp4|json` (`+` can't appear in an id); its temporary file is `.<output>.tmp-`
/// followed by the writer's process id and a counter (kinetoscope-video's and the sidecar's writers).
fn leftover_of(name: &str) -> Option<&str> {
    let (output, suffix) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return None;
    }
    let stem = output.strip_suffix(".mp4").or_else(|| output.strip_suffix(".json"))?;
    match stem.rsplit_once("+seed") {
        Some((id, seed)) if !seed.is_empty() && seed.bytes().all(|b| b.is_ascii_digit()) => Some(id),
        _ => Some(stem),
    }
}

/// What keeps `item` from rendering with this model, if anything: the pipeline's checks of its request, room
/// for its candidates' seeds, an image only for a model that takes one and always for one that needs one, and
/// a last image only for a model that can end on one.
fn check(item: &Item, model: &Model, pipeline: &Pipeline, candidates: Candidates) -> Option<LineError> {
    let on = |field: &str, reason: String| Some(LineError { line: item.line, field: Some(field.into()), reason });
    if let Err(e) = pipeline.validate(&item.request) {
        return Some(invalid_line(item, e));
    }
    if let Err(e) = candidates.seeds(item.request.seed) {
        return on("seed", e.to_string());
    }
    let shape = pipeline.shape();
    if item.image.is_some() && !shape.takes_image {
        let reason = "generates from text only; an image needs a model that starts from one (Wan 2.2 TI2V, Wan 2.1 \
                      I2V or FLF2V, Wan 2.2 I2V-A14B)";
        return on("image", format!("{} {reason}", model.name()));
    }
    if item.image.is_none() && shape.needs_image {
        return on("image", format!("missing: {} generates video from an image (image-to-video)", model.name()));
    }
    if item.vace() != shape.vace && (item.vace() || item.image.is_some() || shape.needs_image) {
        let reason = if item.vace() {
            "has no VACE blocks: control_video and reference_images need a Wan VACE model"
        } else {
            "is a Wan VACE model: it takes a control_video and reference_images, not an image"
        };
        let field = if item.control_video.is_some() { "control_video" } else { "reference_images" };
        return on(if item.vace() { field } else { "image" }, format!("{} {reason}", model.name()));
    }
    if item.last_image.is_some() && !shape.takes_last_image {
        let reason = "can't end on a given frame; a last_image needs Wan 2.1 FLF2V or Wan 2.2 I2V-A14B";
        return on("last_image", format!("{} {reason}", model.name()));
    }
    None
}

/// Renders `item`, from `image` when it has one (read, not yet fitted to the request).
fn render(
    setup: &Setup,
    item: &Item,
    image: Option<Edit>,
    mp4: &Path,
    candidates: Candidates,
    bar: &ProgressBar,
    status: &str,
) -> Result<()> {
    // An image decides nothing of the request (`Edit::shape`): the item's request is the one recorded.
    let edit = image.map(|image| image.fit(&item.request, setup.pipeline)).transpose()?;
    let job = Job {
        request: &item.request,
        preset: item.preset,
        output: mp4,
        save_frames: None,
        started: Instant::now(),
        edit: edit.as_ref(),
    };
    bar.set_message(format!("{status} · {}", item.id));
    output::render(setup, &job, candidates, &mut |k, p| {
        let candidate =
            if candidates.count > 1 { format!(" candidate {}/{}", k + 1, candidates.count) } else { String::new() };
        bar.set_message(format!("{status} · {}{candidate} step {}/{}", item.id, p.step, p.steps));
    })?;
    Ok(())
}

/// Whether `mp4` and its sidecar are a finished rendering of `item` with these candidates: the kept one
/// is any of the candidates' seeds, and its images and run-time adapters (if any) had the same content as the
/// item's now.
fn verified(mp4: &Path, item: &Item, candidates: Candidates) -> bool {
    let request = &item.request;
    let Some(sidecar) = std::fs::read_to_string(output::sidecar_path(mp4))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
    else {
        return false;
    };
    let same_image = match item.image.as_ref().or(item.control_video.as_ref()).or(item.reference_images.first()) {
        Some(path) => edit::file_sha256(path).is_ok_and(|sha256| sidecar["edit"]["source_sha256"] == sha256),
        None => sidecar.get("edit").is_none(),
    };
    let recorded_references = sidecar["edit"]["reference_images"].as_array().map_or(&[][..], Vec::as_slice);
    let same_references = recorded_references.len() == item.reference_images.len()
        && item
            .reference_images
            .iter()
            .zip(recorded_references)
            .all(|(path, recorded)| edit::file_sha256(path).is_ok_and(|sha256| recorded["sha256"] == sha256))
        && (!item.vace() || sidecar["edit"]["conditioning_scale"] == item.conditioning_scale);
    let same_last_image = match &item.last_image {
        Some(path) => {
            edit::file_sha256(path).is_ok_and(|sha256| sidecar["edit"]["last_image"]["source_sha256"] == sha256)
        }
        None => sidecar["edit"].get("last_image").is_none(),
    };
    // Run-time adapters: the same files with the same contents (a sidecar from before they were hashed had none).
    let recorded = sidecar["resolved"].get("request_loras").cloned().unwrap_or(Value::Array(Vec::new()));
    let same_loras = recorded == output::request_lora_hashes(request);
    if !(same_image && same_last_image && same_references && same_loras) {
        return false;
    }
    let Some(kept) = sidecar["request"]["seed"]
        .as_u64()
        .filter(|seed| candidates.seeds(request.seed).is_ok_and(|seeds| seeds.contains(seed)))
        .map(|seed| GenerateRequest { seed, ..request.clone() })
    else {
        return false;
    };
    // Through the same text round trip as the sidecar, so that floats compare exactly.
    let expected = serde_json::to_string(&kept).ok().and_then(|text| serde_json::from_str::<Value>(&text).ok());
    if expected.is_none()
        || sidecar.get("request") != expected.as_ref()
        || !candidates.recorded_in(&sidecar, request.seed)
    {
        return false;
    }
    mp4.is_file()
        && kinetoscope_video::probe(mp4).is_ok_and(|info| {
            (info.frames, info.height as usize, info.width as usize)
                == (request.num_frames, request.height, request.width)
        })
}

fn invalid_line(item: &Item, error: Error) -> LineError {
    match error {
        Error::InvalidRequest { field, reason } => LineError { line: item.line, field: Some(field.into()), reason },
        other => LineError { line: item.line, field: None, reason: other.to_string() },
    }
}

fn bad_manifest(path: &Path, errors: &[LineError]) -> anyhow::Error {
    let lines: Vec<String> = errors.iter().map(|e| format!("  {e}")).collect();
    let (n, path) = (errors.len(), path.display());
    anyhow::anyhow!("the manifest {path} has {n} bad line(s); nothing was rendered:\n{}", lines.join("\n"))
}

/// The error and its causes, each said once: the library's errors already include their source in
/// their own message.
fn message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain().map(|c| c.to_string()) {
        if !message.contains(&cause) {
            if !message.is_empty() {
                message += ": ";
            }
            message += &cause;
        }
    }
    message
}

/// The code of an item's failure: the library's, `video_write_failed` for the MP4, else the sidecar's
/// write (`io_error`), the only other step that can fail.
fn failure_code(error: &anyhow::Error) -> &'static str {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<Error>() {
            return e.code();
        }
        if cause.is::<VideoError>() {
            return "video_write_failed";
        }
    }
    "io_error"
}

enum Outcome {
    Completed,
    Skipped,
    Failed { code: &'static str, message: String },
}

/// This shard's results file (appended to, one JSON line per item, across reruns) and its counts.
struct Results {
    file: File,
    path: PathBuf,
    completed: usize,
    skipped: usize,
    /// Failures by code, in the order the codes first appeared.
    failed: Vec<(&'static str, usize)>,
}

impl Results {
    fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the results file {}", path.display()))?;
        Ok(Results { file, path: path.to_path_buf(), completed: 0, skipped: 0, failed: Vec::new() })
    }

    fn record(&mut self, item: &Item, outcome: &Outcome, started: Instant) -> Result<()> {
        let seconds = started.elapsed().as_secs_f64();
        let line = match outcome {
            Outcome::Completed => {
                self.completed += 1;
                json!({ "id": item.id, "status": "completed", "seconds": seconds })
            }
            Outcome::Skipped => {
                self.skipped += 1;
                json!({ "id": item.id, "status": "skipped", "seconds": seconds })
            }
            Outcome::Failed { code, message } => {
                match self.failed.iter_mut().find(|(c, _)| c == code) {
                    Some((_, n)) => *n += 1,
                    None => self.failed.push((code, 1)),
                }
                json!({ "id": item.id, "status": "failed", "error_code": code, "message": message, "seconds": seconds })
            }
        };
        // One write per line: a reader tailing the file never sees half of one.
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("cannot append to the results file {}", self.path.display()))
    }

    fn failed(&self) -> usize {
        self.failed.iter().map(|(_, n)| n).sum()
    }

    /// Counts for the progress bar.
    fn status(&self) -> String {
        format!("{} done, {} failed, {} skipped", self.completed, self.failed(), self.skipped)
    }

    fn summary(&self) -> String {
        let mut summary = format!("{} completed, {} skipped, {} failed", self.completed, self.skipped, self.failed());
        if !self.failed.is_empty() {
            let codes: Vec<String> = self.failed.iter().map(|(code, n)| format!("{code}: {n}")).collect();
            summary += &format!(" ({})", codes.join(", "));
        }
        summary
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
    }
}

/// Which share of a manifest this process renders: the items with `hash(id) mod count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u64,
    count: u64,
}

impl Shard {
    fn new(index: u64, count: u64) -> Result<Self, String> {
        if count == 0 {
            return Err("the number of shards must be at least 1".into());
        }
        if index >= count {
            return Err(format!("shard index {index} is out of range for {count} shards (0 to {})", count - 1));
        }
        Ok(Shard { index, count })
    }

    /// The shard from `--shard`, else from the scheduler's environment: a Kubernetes Indexed Job's
    /// `JOB_COMPLETION_INDEX` (the count from `--shards` or `KINETOSCOPE_SHARDS`, since the pod isn't
    /// told its Job's completions), or a Slurm array's task id relative to its first and step (the count
    /// from `--shards`, `KINETOSCOPE_SHARDS` or `SLURM_ARRAY_TASK_COUNT`); neither: the whole manifest.
    fn resolve(shard: Option<Shard>, shards: Option<u64>, env: &dyn Fn(&str) -> Option<String>) -> Result<Shard> {
        if let Some(shard) = shard {
            return Ok(shard);
        }
        let number = |name: &str| -> Result<Option<u64>> {
            env(name)
                .map(|v| v.trim().parse::<u64>().with_context(|| format!("{name}={v:?} is not a whole number ≥ 0")))
                .transpose()
        };
        let count = |fallback: Option<&str>| -> Result<Option<u64>> {
            match (shards, number("KINETOSCOPE_SHARDS")?) {
                (Some(n), _) | (None, Some(n)) => Ok(Some(n)),
                (None, None) => fallback.map_or(Ok(None), number),
            }
        };
        let (index, count, source) = if let Some(index) = number("JOB_COMPLETION_INDEX")? {
            let count = count(None)?.with_context(|| {
                format!("JOB_COMPLETION_INDEX is {index} but the number of shards is not set: pass --shards N or set KINETOSCOPE_SHARDS to the Job's completions")
            })?;
            (index, count, "JOB_COMPLETION_INDEX")
        } else if let Some(task) = number("SLURM_ARRAY_TASK_ID")? {
            let first = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            if task < first || (task - first) % step != 0 {
                bail!("SLURM_ARRAY_TASK_ID {task} is not in the array {first}, {}, ... (SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_STEP); use --array=0-(N-1)", first + step);
            }
            let count = count(Some("SLURM_ARRAY_TASK_COUNT"))?.with_context(|| {
                format!("SLURM_ARRAY_TASK_ID is {task} but the number of shards is not set: pass --shards N or set KINETOSCOPE_SHARDS")
            })?;
            ((task - first) / step, count, "SLURM_ARRAY_TASK_ID")
        } else {
            if let Some(n) = count(None)? {
                bail!("{n} shards were asked for but no shard index is set: pass --shard I/{n}, or run under a Kubernetes Indexed Job (JOB_COMPLETION_INDEX) or a Slurm array (SLURM_ARRAY_TASK_ID)");
            }
            return Ok(Shard { index: 0, count: 1 });
        };
        Shard::new(index, count).map_err(|e| anyhow::anyhow!("{e} (index from {source})"))
    }

    fn owns(&self, id: &str) -> bool {
        manifest::stable_hash(&[id.as_bytes()]) % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        let (index, count) = parsed.ok_or_else(|| format!("{s:?} is not I/N (e.g. 0/4)"))?;
        Shard::new(index, count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Vars<'a> = &'a [(&'a str, &'a str)];

    fn resolve(shard: Option<&str>, shards: Option<u64>, vars: Vars) -> Result<Shard> {
        let env = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        Shard::resolve(shard.map(|s| s.parse().unwrap()), shards, &env)
    }

    fn shard(index: u64, count: u64) -> Shard {
        Shard { index, count }
    }

    #[test]
    fn every_id_belongs_to_exactly_one_shard_and_always_the_same() {
        let ids: Vec<String> = (0..400).map(|i| format!("clip-{i:04}")).collect();
        for count in [1, 2, 3, 7] {
            let mut sizes = vec![0; count as usize];
            for id in &ids {
                let owners: Vec<u64> = (0..count).filter(|&i| shard(i, count).owns(id)).collect();
                assert_eq!(owners.len(), 1, "{id} in {count} shards: {owners:?}");
                sizes[owners[0] as usize] += 1;
            }
            // Every shard gets work, and roughly its share.
            let fair = ids.len() / count as usize;
            assert!(sizes.iter().all(|&n| n > fair / 2 && n < fair * 2), "{count} shards: {sizes:?}");
        }
        // Pinned (SHA-256 of "a" and "b"): the assignment must not change between builds or versions, or
        // a resumed batch would render some items twice and others never.
        assert_eq!(manifest::stable_hash(&[b"a"]), 0xca978112ca1bbdca);
        assert_eq!(manifest::stable_hash(&[b"b"]), 0x3e23e8160039594a);
    }

    #[test]
    fn the_shard_comes_from_the_flag_or_the_scheduler() {
        assert_eq!(resolve(None, None, &[]).unwrap(), shard(0, 1));
        assert_eq!(resolve(Some("2/5"), None, &[("JOB_COMPLETION_INDEX", "0")]).unwrap(), shard(2, 5));
        let k8s = [("JOB_COMPLETION_INDEX", "3"), ("KINETOSCOPE_SHARDS", "4")];
        assert_eq!(resolve(None, None, &k8s).unwrap(), shard(3, 4));
        assert_eq!(resolve(None, Some(8), &k8s).unwrap(), shard(3, 8));
        let slurm = [("SLURM_ARRAY_TASK_ID", "7"), ("SLURM_ARRAY_TASK_MIN", "5"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert_eq!(resolve(None, None, &slurm).unwrap(), shard(2, 4));
        let stepped = [("SLURM_ARRAY_TASK_ID", "20"), ("SLURM_ARRAY_TASK_STEP", "10"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert_eq!(resolve(None, None, &stepped).unwrap(), shard(2, 3));
        assert_eq!(
            resolve(None, None, &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "2")]).unwrap(),
            shard(1, 2)
        );
    }

    #[test]
    fn bad_shards_are_clear_errors() {
        for (text, expected) in [("4/4", "out of range for 4 shards"), ("0/0", "at least 1"), ("1-4", "not I/N")] {
            let error = text.parse::<Shard>().unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let cases: [(Vars, Option<u64>, &str); 6] = [
            (&[("JOB_COMPLETION_INDEX", "1")], None, "KINETOSCOPE_SHARDS"),
            (&[("JOB_COMPLETION_INDEX", "4"), ("KINETOSCOPE_SHARDS", "4")], None, "out of range for 4 shards"),
            (&[("JOB_COMPLETION_INDEX", "x"), ("KINETOSCOPE_SHARDS", "4")], None, "JOB_COMPLETION_INDEX=\"x\""),
            (&[("JOB_COMPLETION_INDEX", "0"), ("KINETOSCOPE_SHARDS", "0")], None, "at least 1"),
            (&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "4")], None, "not in the array"),
            (&[], Some(3), "no shard index"),
        ];
        for (vars, shards, expected) in cases {
            let error = format!("{:#}", resolve(None, shards, vars).unwrap_err());
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
    }

    #[test]
    fn leftovers_are_known_by_their_output_and_writer() {
        for (name, id) in [
            (".fox-01.mp4.tmp-4242-0", "fox-01"),
            (".fox-01.json.tmp-4242", "fox-01"),
            (".fox-01+seed8.mp4.tmp-17-3", "fox-01"),
            (".a.b.json.tmp-1", "a.b"),
            // An id may itself look like a temporary name.
            (".x.mp4.tmp-1.mp4.tmp-9-0", "x.mp4.tmp-1"),
        ] {
            assert_eq!(leftover_of(name), Some(id), "{name}");
        }
        for name in [
            "fox-01.mp4",
            ".fox-01.mp4",
            ".fox-01.mp4.tmp-",
            ".fox-01.mp4.tmp-12x",
            ".fox-01.png.tmp-12",
            ".kinetoscope-probe1a2b",
            "results-0-of-1.jsonl",
        ] {
            assert_eq!(leftover_of(name), None, "{name}");
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
