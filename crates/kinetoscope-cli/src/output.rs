//! What a rendered video leaves on disk, the same for `generate` and `batch`: the MP4, its JSON sidecar
//! beside it (every setting, the model's identity, the time of each stage, quality signals) and optionally
//! PNG frames; with several candidates (seeds) per request, the best of them, or all of them ranked.
//! Every file is written under a temporary name and renamed into place once complete.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use kinetoscope::scheduler::{Schedule, SchedulerKind};
use kinetoscope::{DType, GenerateRequest, Pipeline, Preset, Progress, Timings};
use kinetoscope_video::{Frames, QualitySignals, VideoInfo};
use serde::Serialize;
use serde_json::{json, Value};

use crate::edit::Edit;

/// How the pipeline that made a video was set up.
pub struct Setup<'a> {
    pub pipeline: &'a Pipeline,
    /// The device as the user named it (`cpu`, `cuda:1`).
    pub device: &'a str,
    pub dtype: DType,
    /// Seconds the process spent loading the model (shared by every video of a batch).
    pub load_s: f64,
    /// Where the settings a request left out came from: `registry:<id>` or `built-in`.
    pub defaults_from: String,
}

/// The sidecar of `mp4`: the same name with the extension `.json`.
pub fn sidecar_path(mp4: &Path) -> PathBuf {
    mp4.with_extension("json")
}

/// One video to make and where it goes.
pub struct Job<'a> {
    /// The first candidate's request; candidate `k` has the seed `seed + k`.
    pub request: &'a GenerateRequest,
    /// The preset the request started from, recorded in the sidecar.
    pub preset: Option<Preset>,
    pub output: &'a Path,
    /// Also write the kept video's frames as PNG here.
    pub save_frames: Option<&'a Path>,
    /// When the work for this video began, for the sidecar's `total_s`.
    pub started: Instant,
    /// Video-to-video from this source instead of text-to-video from noise; recorded in the sidecar.
    pub edit: Option<&'a Edit>,
}

/// Most candidates per request: each is a whole render.
const MAX_CANDIDATES: usize = 16;

/// How many seeds to render for one request, and which of them stay on disk.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Candidates {
    /// Render K seeds (seed, seed+1, ...) and rank them by quality signals of their frames (flicker,
    /// motion, clipping), recorded in the sidecar; 1 to 16.
    #[arg(long = "candidates", value_name = "K", default_value_t = 1, value_parser = parse_count)]
    pub count: usize,
    /// Which candidates stay: best (only the top-ranked one, at the output path) or all (the others too,
    /// as NAME+seedS.mp4 with their sidecars).
    #[arg(long, value_enum, default_value_t = Keep::Best)]
    pub keep: Keep,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    Best,
    All,
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(k) if (1..=MAX_CANDIDATES).contains(&k) => Ok(k),
        _ => Err(format!("{s:?} is not a number of candidates: expected a whole number from 1 to {MAX_CANDIDATES}")),
    }
}

impl Candidates {
    /// The candidates' seeds, from `first` on.
    pub fn seeds(&self, first: u64) -> Result<Vec<u64>> {
        (0..self.count as u64).map(|k| first.checked_add(k)).collect::<Option<_>>().with_context(|| {
            format!("seed {first} leaves no room for {} candidates (seed + {})", self.count, self.count - 1)
        })
    }

    /// Whether `sidecar` records a run of these candidates from the seed `first`: how many, which seeds,
    /// which were kept.
    pub fn recorded_in(&self, sidecar: &Value, first: u64) -> bool {
        if self.count == 1 {
            return sidecar.get("candidates").is_none();
        }
        let record = &sidecar["candidates"];
        let seeds: Option<Vec<u64>> =
            record["ranked"].as_array().map(|ranked| ranked.iter().filter_map(|c| c["seed"].as_u64()).collect());
        match (seeds, self.seeds(first)) {
            (Some(mut seeds), Ok(expected)) => {
                seeds.sort_unstable();
                record["keep"] == json!(self.keep) && seeds == expected
            }
            _ => false,
        }
    }
}

/// The file of the candidate with `seed` when it isn't the kept one: `NAME+seedS.mp4` beside `output`. `+`
/// can't appear in a batch id, so it never names another item's output.
fn candidate_path(output: &Path, seed: u64) -> PathBuf {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    let name = match output.extension() {
        Some(ext) => format!("{stem}+seed{seed}.{}", ext.to_string_lossy()),
        None => format!("{stem}+seed{seed}"),
    };
    output.with_file_name(name)
}

/// One rendered candidate.
struct Candidate {
    request: GenerateRequest,
    timings: Timings,
    signals: QualitySignals,
    /// Its MP4 on disk once written: the path, what the check read back, and the seconds encoding took.
    written: Option<(PathBuf, VideoInfo, f64)>,
}

/// Renders every candidate of `job`, ranks them by [`QualitySignals::score`] (ties to the lower seed) and
/// leaves the kept ones on disk, each file written under a temporary name and renamed when complete:
/// the best at `job.output`, with its sidecar listing every candidate's seed and signals, and with
/// `Keep::All` the others at their [`candidate_path`]. With `Keep::Best` the others are never written. With
/// one candidate, the output and sidecar are those of a plain render. `on_step` hears each step of
/// candidate `k` (0-based).
pub fn render(
    setup: &Setup,
    job: &Job,
    candidates: Candidates,
    on_step: &mut dyn FnMut(usize, Progress),
) -> Result<VideoInfo> {
    let keep_all = candidates.keep == Keep::All && candidates.count > 1;
    let mut rendered: Vec<Candidate> = Vec::with_capacity(candidates.count);
    // The best candidate so far and its frames: only those are written (with `Keep::Best`) or kept in memory.
    let mut best: Option<(usize, Frames)> = None;
    for (k, seed) in candidates.seeds(job.request.seed)?.into_iter().enumerate() {
        let request = GenerateRequest { seed, ..job.request.clone() };
        let mut report = |p| {
            on_step(k, p);
            ControlFlow::Continue(())
        };
        let video = match job.edit {
            Some(edit) => edit.render(setup.pipeline, &request, &mut report),
            None => setup.pipeline.generate_with_progress(&request, &mut report),
        }?;
        let frames = Frames::from_unit_f32(&video.frames, video.num_frames, video.height, video.width)?;
        let signals = QualitySignals::measure(&frames);
        let written =
            if keep_all { Some(encode(&candidate_path(job.output, seed), &frames, video.fps)?) } else { None };
        if best.as_ref().is_none_or(|(b, _)| signals.score() > rendered[*b].signals.score()) {
            best = Some((k, frames));
        }
        rendered.push(Candidate { request, timings: video.timings, signals, written });
    }
    let (best, frames) = best.expect("at least one candidate");

    let mut ranked: Vec<usize> = (0..rendered.len()).collect();
    ranked.sort_by(|&a, &b| rendered[b].signals.score().total_cmp(&rendered[a].signals.score()));
    let final_path = |k: usize| {
        if k == best {
            Some(job.output.to_path_buf())
        } else {
            rendered[k].written.as_ref().map(|w| w.0.clone())
        }
    };
    let record = (candidates.count > 1).then(|| {
        let ranked: Vec<Value> = ranked
            .iter()
            .map(|&k| {
                let c = &rendered[k];
                json!({ "seed": c.request.seed, "quality": quality(&c.signals), "output": final_path(k) })
            })
            .collect();
        json!({ "keep": candidates.keep, "best_seed": rendered[best].request.seed, "ranked": ranked })
    });

    let best_written = rendered[best].written.take();
    // The others' sidecars first: once the best's sidecar exists, the whole set is complete.
    for candidate in &rendered {
        if let Some((path, info, encode_s)) = &candidate.written {
            write_sidecar(setup, job, candidate, path, info, *encode_s, record.as_ref())?;
        }
    }
    let (info, encode_s) = match best_written {
        Some((path, info, encode_s)) => {
            std::fs::rename(&path, job.output)
                .with_context(|| format!("cannot rename {} to {}", path.display(), job.output.display()))?;
            (info, encode_s)
        }
        None => {
            let (_, info, encode_s) = encode(job.output, &frames, job.request.fps)?;
            (info, encode_s)
        }
    };
    if let Some(dir) = job.save_frames {
        kinetoscope_video::write_png_frames(dir, &frames)?;
    }
    write_sidecar(setup, job, &rendered[best], job.output, &info, encode_s, record.as_ref())?;
    Ok(info)
}

/// Writes the MP4; returns its path, what the check read back and the seconds it took.
fn encode(path: &Path, frames: &Frames, fps: u32) -> Result<(PathBuf, VideoInfo, f64)> {
    let start = Instant::now();
    let info = kinetoscope_video::write_mp4(path, frames, fps)?;
    Ok((path.to_path_buf(), info, start.elapsed().as_secs_f64()))
}

fn quality(signals: &QualitySignals) -> Value {
    json!({
        "score": signals.score(),
        "flicker": signals.flicker,
        "motion": signals.motion,
        "clipping": signals.clipping,
    })
}

/// The sidecar of `mp4`: every setting, the model's identity, the time of each stage, the quality signals,
/// and with several candidates all of theirs (`candidates`).
fn write_sidecar(
    setup: &Setup,
    job: &Job,
    candidate: &Candidate,
    mp4: &Path,
    info: &VideoInfo,
    encode_s: f64,
    candidates: Option<&Value>,
) -> Result<()> {
    let (request, timings) = (&candidate.request, &candidate.timings);
    let ran = setup.pipeline.distilled_request(request);
    let scheduler_config = setup.pipeline.scheduler_config();
    let two_experts = setup.pipeline.shape().two_experts;
    let mut record = json!({
        "kinetoscope_version": env!("CARGO_PKG_VERSION"),
        "created_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "output": mp4,
        "request": request,
        "preset": job.preset,
        "resolved": {
            "defaults_from": setup.defaults_from,
            // An explicit schedule runs with flow-match Euler, DMD timesteps with FastVideo's sampler.
            "scheduler": match &ran.schedule {
                Some(Schedule::Dmd(_)) => json!("dmd"),
                Some(_) => json!(SchedulerKind::Euler),
                None => json!(ran.scheduler.or(scheduler_config.kind())),
            },
            // The steps run: the request's, or the recipe of the distilled weights a turbo request ran with.
            "schedule": ran.schedule,
            "shift": ran.shift.unwrap_or_else(|| scheduler_config.configured_shift()),
            // Whether the unconditional pass ran: at guidance 1 or less it is skipped, half the work a step.
            "guidance": request.guidance_scale > 1.0,
            // A two-expert model's low-noise guidance scale and where its experts lived; null for one network.
            "guidance_scale_2": two_experts.then(|| request.guidance_scale_2.unwrap_or(request.guidance_scale)),
            "experts": setup.pipeline.expert_placement(),
            // The LoRA adapters merged into the weights: file, sha256, scale, transformer, key layout.
            "loras": setup.pipeline.loras(),
            // The request's run-time adapters (`request.loras`) with each file's sha256, so that a rerun or a
            // reader knows which contents they had.
            "request_loras": request_lora_hashes(request),
            // Each transformer's weights: the folder's, or a single file (its sha256 and tensor formats), and the
            // format --quantize held them in; and a --text-encoder-weights file's.
            "weights": setup.pipeline.weights()?,
            "device": setup.device,
            "dtype": setup.dtype.as_str(),
            "text_encoder": setup.pipeline.text_encoder_placement(),
            // The tiles the VAE decoded in (pixels), null when it decoded whole.
            "vae_tiling": timings.vae_tiling,
        },
        "memory": {
            // The most the pipeline's tensors held on the GPU at once, weights included; null on the CPU.
            "peak_gpu_bytes": timings.peak_gpu_memory_bytes,
        },
        "model": setup.pipeline.identity(),
        "video": {
            "codec": info.codec,
            "pixel_format": info.pixel_format,
            "width": info.width,
            "height": info.height,
            "frames": info.frames,
            "fps": info.fps,
            "duration_s": info.duration.map(|d| d.as_secs_f64()),
        },
        "quality": quality(&candidate.signals),
        "timings": {
            "load_s": setup.load_s,
            "text_encoding_s": timings.text_encoding_s,
            "denoising_s": timings.denoising_s,
            "step_s": timings.step_s,
            "cached_steps": timings.cached_steps,
            // The expert of each step (two-expert models; empty for one network).
            "experts": timings.experts,
            "vae_decode_s": timings.vae_decode_s,
            "encode_s": encode_s,
            // Every candidate's work included.
            "total_s": job.started.elapsed().as_secs_f64(),
        },
    });
    if let Some(candidates) = candidates {
        record["candidates"] = candidates.clone();
    }
    if let Some(edit) = job.edit {
        record["edit"] = edit.record();
    }
    write_atomically(&sidecar_path(mp4), serde_json::to_string_pretty(&record)?.as_bytes())
}

/// Checks that a file can be created where `path` points, without touching `path` itself.
pub fn check_writable(path: &Path) -> Result<()> {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!("cannot write {}: the folder {} does not exist", path.display(), dir.display());
    }
    tempfile::Builder::new()
        .prefix(".kinetoscope-probe")
        .tempfile_in(dir)
        .map(drop)
        .with_context(|| format!("cannot write {}: the folder {} is not writable", path.display(), dir.display()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes through a temporary file in the same folder, renamed into place once complete, so a reader
/// never sees half a file and an interrupted run leaves the old one intact.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = parent_dir(path).join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Each of `request`'s run-time adapters: file, sha256 (null if it can't be read now), scale, transformer.
pub(crate) fn request_lora_hashes(request: &GenerateRequest) -> Value {
    let hashes: Vec<Value> = request
        .loras
        .iter()
        .map(|lora| {
            json!({
                "path": lora.path,
                "sha256": crate::edit::file_sha256(&lora.path).ok(),
                "scale": lora.scale,
                "component": lora.component,
            })
        })
        .collect();
    Value::Array(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_candidates_are_named_by_seed_beside_the_output() {
        assert_eq!(candidate_path(Path::new("out/fox.mp4"), 7), Path::new("out/fox+seed7.mp4"));
        assert_eq!(candidate_path(Path::new("clip"), 12), Path::new("clip+seed12"));
    }

    #[test]
    fn candidate_counts_are_1_to_16() {
        assert_eq!(parse_count("1"), Ok(1));
        assert_eq!(parse_count("16"), Ok(16));
        for bad in ["0", "17", "-1", "two"] {
            let err = parse_count(bad).unwrap_err();
            assert!(err.contains("from 1 to 16"), "{bad}: {err}");
        }
        let four = Candidates { count: 4, keep: Keep::Best };
        assert_eq!(four.seeds(7).unwrap(), [7, 8, 9, 10]);
        let err = four.seeds(u64::MAX - 1).unwrap_err().to_string();
        assert!(err.contains("no room for 4 candidates"), "{err}");
    }

    #[test]
    fn a_sidecar_records_which_candidates_made_it() {
        let two = Candidates { count: 2, keep: Keep::All };
        let ranked = json!([{ "seed": 6 }, { "seed": 5 }]);
        let sidecar = json!({ "candidates": { "keep": "all", "best_seed": 6, "ranked": ranked } });
        assert!(two.recorded_in(&sidecar, 5));
        assert!(!two.recorded_in(&sidecar, 6), "other seeds");
        assert!(!Candidates { keep: Keep::Best, ..two }.recorded_in(&sidecar, 5), "other keep");
        assert!(!Candidates { count: 3, ..two }.recorded_in(&sidecar, 5), "more candidates");
        assert!(!Candidates { count: 1, ..two }.recorded_in(&sidecar, 5), "a single render has no list");
        assert!(Candidates { count: 1, ..two }.recorded_in(&json!({ "request": {} }), 5));
    }
}
