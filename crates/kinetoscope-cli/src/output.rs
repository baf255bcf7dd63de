//! What a rendered video leaves on disk, the same for `generate` and `batch`: the MP4, its JSON sidecar
//! beside it (every setting, the model's identity, the time of each stage) and optionally PNG frames.
//! Every file is written under a temporary name and renamed into place once complete.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use kinetoscope::{DType, GenerateRequest, Pipeline, Video};
use kinetoscope_video::{Frames, VideoInfo};
use serde_json::json;

/// How the pipeline that made a video was set up.
pub struct Setup<'a> {
    pub pipeline: &'a Pipeline,
    /// The device as the user named it (`cpu`, `cuda:1`).
    pub device: &'a str,
    pub dtype: DType,
    /// Seconds the process spent loading the model (shared by every video of a batch).
    pub load_s: f64,
}

/// The sidecar of `mp4`: the same name with the extension `.json`.
pub fn sidecar_path(mp4: &Path) -> PathBuf {
    mp4.with_extension("json")
}

/// Encodes `video` to `output` (and PNG frames into `save_frames`), then writes the sidecar. `started` is
/// when the work for this video began, for the sidecar's `total_s`. Returns what the MP4 check read back.
pub fn write_video(
    setup: &Setup,
    request: &GenerateRequest,
    video: &Video,
    output: &Path,
    save_frames: Option<&Path>,
    started: Instant,
) -> Result<VideoInfo> {
    let encode_start = Instant::now();
    let frames = Frames::from_unit_f32(&video.frames, video.num_frames, video.height, video.width)?;
    let info = kinetoscope_video::write_mp4(output, &frames, video.fps)?;
    if let Some(dir) = save_frames {
        kinetoscope_video::write_png_frames(dir, &frames)?;
    }
    let encode_s = encode_start.elapsed().as_secs_f64();

    let scheduler_config = setup.pipeline.scheduler_config();
    let record = json!({
        "kinetoscope_version": env!("CARGO_PKG_VERSION"),
        "created_unix_s": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "output": output,
        "request": request,
        "resolved": {
            "scheduler": request.scheduler.or(scheduler_config.kind()),
            "shift": request.shift.unwrap_or_else(|| scheduler_config.configured_shift()),
            "guidance": request.guidance_scale > 1.0,
            "device": setup.device,
            "dtype": setup.dtype.as_str(),
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
        "timings": {
            "load_s": setup.load_s,
            "text_encoding_s": video.timings.text_encoding_s,
            "denoising_s": video.timings.denoising_s,
            "step_s": video.timings.step_s,
            "vae_decode_s": video.timings.vae_decode_s,
            "encode_s": encode_s,
            "total_s": started.elapsed().as_secs_f64(),
        },
    });
    write_atomically(&sidecar_path(output), serde_json::to_string_pretty(&record)?.as_bytes())?;
    Ok(info)
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
