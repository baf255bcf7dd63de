//! One worker per device: it loads the model once, then takes jobs for its model from the store in order,
//! under a lease the process renews while it renders, and writes each MP4 and thumbnail to a staging folder;
//! they are put in place by rename in the same transaction as the completion, only while the lease holds, so
//! a download never sees half a file, nor a file of a worker that lost the job.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kinetoscope::{EditKind, GenerateRequest, InputVideo, LoadOptions, LoraSpec, ModelDir, Pipeline};
use kinetoscope_video::{Frames, VideoError};

use crate::bucket;
use crate::error::job_error_code;
use crate::metrics::{DeviceLabel, Outcome};
use crate::store::{Job, Lease, Settings, StoreError, WorkerInfo};
use crate::{unix_now, Shared};

/// How long a worker waits before it looks at a short or full disk again.
const DISK_RETRY: Duration = Duration::from_secs(5);

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stop {
    None = 0,
    /// Deleted by its owner: its row is gone, its files must go too.
    Deleted = 1,
    /// The server is shutting down: the job goes back to the queue.
    Shutdown = 2,
    /// The lease could not be renewed (the store was out of reach past its length): the job is someone
    /// else's now, or will be.
    Lost = 3,
}

/// A running job's stop flag, set by the API or the shutdown and read by the worker after each step.
#[derive(Debug, Default)]
pub struct StopFlag(AtomicU8);

impl StopFlag {
    pub fn set(&self, stop: Stop) {
        self.0.store(stop as u8, Ordering::SeqCst);
    }

    fn get(&self) -> Stop {
        match self.0.load(Ordering::SeqCst) {
            1 => Stop::Deleted,
            2 => Stop::Shutdown,
            3 => Stop::Lost,
            _ => Stop::None,
        }
    }
}

/// A job this process renders now: its lease, renewed by the heartbeat, and its stop flag.
pub struct Running {
    pub lease: Lease,
    pub stop: Arc<StopFlag>,
}

/// Wakes idle workers when a job is queued (they also look every second, so a missed wake costs
/// at most that).
#[derive(Default)]
pub struct Wake {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.changed.notify_all();
    }

    fn wait(&self, timeout: Duration) {
        let guard = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let seen = *guard;
        let _ = self.changed.wait_timeout_while(guard, timeout, |g| *g == seen);
    }
}

/// Where a job's files live: named by the job id the server made, never by anything a client sent.
pub fn video_path(shared: &Shared, id: &str) -> PathBuf {
    shared.config.data_dir.join("videos").join(format!("{id}.mp4"))
}

pub fn thumbnail_path(shared: &Shared, id: &str) -> PathBuf {
    shared.config.data_dir.join("videos").join(format!("{id}.png"))
}

/// Where a worker writes a job's files before they are put in place: beside them (putting them in place is a
/// rename, whatever volume holds `videos/`), hidden, and named by the lease too, so that two workers that both
/// held the job at some point never write the same file.
fn staging_path(shared: &Shared, lease: &Lease, extension: &str) -> PathBuf {
    shared.config.data_dir.join("videos").join(format!(".{}.{}.{extension}", lease.job, lease.id))
}

/// Where jobs' sources are kept, and uploads spooled until they are (the same filesystem: keeping is a rename).
pub fn inputs_dir(shared: &Shared) -> PathBuf {
    shared.config.data_dir.join("inputs")
}

/// The source video of an edit, copied or uploaded when the job was accepted.
pub fn input_path(shared: &Shared, id: &str) -> PathBuf {
    inputs_dir(shared).join(format!("{id}.mp4"))
}

/// The image an image-to-video job starts from, as uploaded (PNG, JPEG or WebP, told by its bytes).
pub fn image_path(shared: &Shared, id: &str) -> PathBuf {
    inputs_dir(shared).join(format!("{id}.image"))
}

/// The image a first-and-last-frame job ends on, as uploaded.
pub fn last_image_path(shared: &Shared, id: &str) -> PathBuf {
    inputs_dir(shared).join(format!("{id}.last_image"))
}

/// The mask of a region edit, as uploaded (an image, or a video).
pub fn mask_path(shared: &Shared, id: &str) -> PathBuf {
    inputs_dir(shared).join(format!("{id}.mask"))
}

/// Where the sources of a job with `edit` are kept: its video (and a region edit's mask), or its image(s).
pub fn source_paths(shared: &Shared, id: &str, edit: &EditKind) -> Vec<PathBuf> {
    match edit {
        EditKind::ImageToVideo { last_image: false } => vec![image_path(shared, id)],
        EditKind::ImageToVideo { last_image: true } => vec![image_path(shared, id), last_image_path(shared, id)],
        EditKind::Region { rectangle: None, .. } => vec![input_path(shared, id), mask_path(shared, id)],
        EditKind::Vace { control, references, .. } => {
            let control = control.then(|| input_path(shared, id));
            control.into_iter().chain((*references > 0).then(|| image_path(shared, id))).collect()
        }
        _ => vec![input_path(shared, id)],
    }
}

/// Removes a job's files (its video, thumbnail and sources), here and in the bucket; from a thread that may
/// block.
pub fn remove_files(shared: &Shared, id: &str) {
    let inputs = [input_path(shared, id), image_path(shared, id), last_image_path(shared, id), mask_path(shared, id)];
    if let Some(bucket) = &shared.bucket {
        let names = OUTPUTS.map(|extension| bucket::video_name(id, extension)).into_iter();
        let names: Vec<_> = names.chain(inputs.iter().map(|path| input_object(path))).collect();
        if let Err(e) = bucket.wait(bucket.delete(&names)) {
            tracing::warn!(id, "cannot delete the job's objects: {e}");
        }
    }
    for path in [video_path(shared, id), thumbnail_path(shared, id)].into_iter().chain(inputs) {
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "cannot remove: {e}");
            }
        }
    }
}

/// The object a source kept at `path` (in `inputs/`) is in the bucket.
pub fn input_object(path: &Path) -> String {
    bucket::input_name(&path.file_name().unwrap_or_default().to_string_lossy())
}

/// Sends a new job's sources, kept in `inputs/` here, to the bucket (where there is one: the worker that renders
/// the job may be on another machine), and removes the copies here.
pub fn send_sources(shared: &Shared, id: &str, edit: &EditKind) -> Result<(), bucket::BucketError> {
    let Some(bucket) = &shared.bucket else { return Ok(()) };
    let paths = source_paths(shared, id, edit);
    for path in &paths {
        bucket.wait(bucket.upload(path, &input_object(path)))?;
    }
    paths.iter().for_each(|path| drop(std::fs::remove_file(path)));
    Ok(())
}

/// Brings a job's sources from the bucket (where there is one) into `inputs/` here, to render it.
fn fetch_sources(shared: &Shared, id: &str, edit: &EditKind) -> Result<(), bucket::BucketError> {
    let Some(bucket) = &shared.bucket else { return Ok(()) };
    for path in source_paths(shared, id, edit) {
        bucket.wait(bucket.download(&input_object(&path), &path))?;
    }
    Ok(())
}

/// The worker's loop; returns when the server stops or the model can't be loaded.
pub fn run(shared: Arc<Shared>, device: String) {
    let pipeline = match load(&shared, &device) {
        Ok(pipeline) => Arc::new(pipeline),
        Err(e) => {
            tracing::error!(device, "cannot load the model: {e}");
            let failure = (job_error_code(&e), format!("{device}: {e}"));
            shared.load_failures.lock().unwrap_or_else(|p| p.into_inner()).push(failure);
            return;
        }
    };
    let _ = shared.pipeline.set(pipeline.clone());
    let worker = WorkerInfo {
        id: format!("{}/{device}", shared.node),
        model: shared.config.model_name.clone(),
        device: device.clone(),
    };
    if let Err(e) = shared.store.worker_seen(&worker) {
        tracing::warn!(device, "cannot record this worker in the store: {e}");
    }
    shared.workers.lock().unwrap_or_else(|p| p.into_inner()).push(worker.clone());
    shared.metrics.workers_ready.inc();
    tracing::info!(device, worker = worker.id, "model loaded; taking jobs");
    // A store shared by several deployments' workers routes jobs by model; one of this process's own holds
    // only this model's.
    let model = shared.store.is_shared().then_some(worker.model.as_str());
    let mut disk_was_short = false;
    while !shared.is_stopping() {
        // Queued jobs wait while the disk is short rather than fail for a condition that will pass.
        let short = crate::disk::short(&shared);
        if short.is_some() != disk_was_short {
            match short {
                Some(free) => tracing::warn!(free, min = shared.config.min_free_disk, "disk short: jobs wait"),
                None => tracing::info!("disk space is back: taking jobs"),
            }
            disk_was_short = short.is_some();
        }
        if short.is_some() {
            shared.wake.wait(DISK_RETRY);
            continue;
        }
        match shared.store.claim_next(&worker.id, model, shared.config.lease) {
            Ok(Some((job, lease))) => render(&shared, &pipeline, &device, job, lease),
            Ok(None) => shared.wake.wait(Duration::from_secs(1)),
            Err(e) => {
                tracing::error!("cannot take a job: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    shared.metrics.workers_ready.dec();
    shared.workers.lock().unwrap_or_else(|p| p.into_inner()).retain(|w| w.id != worker.id);
    if let Err(e) = shared.store.worker_gone(&worker.id) {
        tracing::warn!(device, "cannot remove this worker from the store: {e}");
    }
}

fn load(shared: &Shared, device: &str) -> kinetoscope::Result<Pipeline> {
    let dir = ModelDir::open(&shared.config.model)?;
    let options = LoadOptions { device: kinetoscope::open_device(device)?, ..shared.config.load.clone() };
    Pipeline::load(&dir, &options)
}

/// The library's request for a job's settings; adapters by name are files in `lora_dir`.
pub fn to_request(settings: &Settings, lora_dir: Option<&Path>) -> GenerateRequest {
    let loras = settings
        .loras
        .iter()
        .filter_map(|lora| {
            let component = if lora.low_noise { "transformer_2" } else { "transformer" };
            Some(LoraSpec { path: lora_dir?.join(&lora.name), scale: lora.scale, component })
        })
        .collect();
    GenerateRequest {
        loras,
        prompt: settings.prompt.clone(),
        negative_prompt: settings.negative_prompt.clone(),
        height: settings.height,
        width: settings.width,
        num_frames: settings.num_frames,
        steps: settings.steps,
        guidance_scale: settings.guidance_scale,
        guidance_scale_2: settings.guidance_scale_2,
        shift: settings.shift,
        schedule: settings.schedule.clone(),
        seed: settings.seed,
        fps: settings.fps,
        step_cache: settings.step_cache,
        // The turbo preset's settings rely on distillation: refused on a model without it.
        distilled: settings.preset.as_deref() == Some(kinetoscope::Preset::Turbo.name()),
        ..GenerateRequest::default()
    }
}

fn render(shared: &Shared, pipeline: &Pipeline, device: &str, job: Job, lease: Lease) {
    let id = job.id.clone();
    let stop = Arc::new(StopFlag::default());
    let running = Running { lease: lease.clone(), stop: stop.clone() };
    shared.running.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), running);
    shared.publish(&id);
    tracing::info!(id, attempt = job.attempts, "rendering");

    let started = Instant::now();
    let deadline = started + shared.config.job_timeout;
    let mut timed_out = false;
    let mut last_step = Instant::now();
    let request = to_request(&job.settings, shared.config.lora_dir.as_deref());
    let mut on_step = |progress: kinetoscope::Progress| {
        shared.metrics.step_seconds.observe(last_step.elapsed().as_secs_f64());
        last_step = Instant::now();
        if let Some(bytes) = kinetoscope::gpu_memory_used(pipeline.device()) {
            shared
                .metrics
                .gpu_memory_bytes
                .get_or_create(&DeviceLabel { device: device.to_string() })
                .set(bytes as i64);
        }
        // Denoising is most of the work; 100 is kept for when the files are written.
        let percent = (progress.step * 99 / progress.steps.max(1)) as i64;
        match shared.store.set_progress(&lease, percent) {
            Ok(true) => shared.publish(&id),
            // Deleted, or the lease lost: either way the job is not this worker's anymore.
            Ok(false) => return ControlFlow::Break(()),
            Err(e) => tracing::warn!(id, "cannot record progress: {e}"),
        }
        timed_out = Instant::now() > deadline;
        if timed_out || stop.get() != Stop::None {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    // Deleted meanwhile (its sources went with it), or the bucket out of reach: the job can't run now.
    let fetched = match &job.settings.edit {
        Some(edit) => fetch_sources(shared, &id, edit).map_err(|e| {
            // The details name the bucket and this machine's paths: the log has them, the client a summary.
            tracing::error!(id, "cannot fetch the job's source: {e}");
            "the job's source could not be read from the server's object storage".to_string()
        }),
        None => Ok(()),
    };
    let result = fetched.map(|()| match &job.settings.edit {
        None => pipeline.generate_with_progress(&request, &mut on_step).map(|video| (video, None)),
        Some(edit @ EditKind::Region { .. }) => region_edit(shared, pipeline, &id, edit, &request, &mut on_step)
            .map(|(video, report)| (video, Some(serde_json::json!({ "region": report })))),
        Some(edit @ EditKind::Vace { .. }) => {
            vace_job(shared, pipeline, &id, edit, &request, &mut on_step).map(|video| (video, None))
        }
        Some(edit) => fitted_input(shared, pipeline, &id, edit, &request)
            .and_then(|input| pipeline.run_edit(edit, &request, &input, &mut on_step))
            .map(|video| (video, None)),
    });
    shared.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    // With a bucket, the sources here were working copies.
    if let (Some(_), Some(edit)) = (&shared.bucket, &job.settings.edit) {
        source_paths(shared, &id, edit).iter().for_each(|path| drop(std::fs::remove_file(path)));
    }

    let now = unix_now();
    let outcome = match result {
        Err(reason) => fail(shared, &lease, now, "source_unavailable", &reason),
        Ok(Ok((video, report))) => match write_files(shared, &lease, &video) {
            Ok(()) => {
                let expires = now + shared.config.retention.as_secs() as i64;
                let outcome = complete(shared, &lease, now, expires, report.as_ref());
                remove_staged(shared, &lease);
                match outcome {
                    Ok(true) => Some("completed".to_string()),
                    // Deleted while it was being written, or someone else's job now: nothing of this render stays.
                    Ok(false) => {
                        tracing::info!(id, "not this worker's job anymore (deleted or its lease lapsed): dropped");
                        None
                    }
                    // The job stays running under this lease: it lapses and the job runs again.
                    Err(e) => {
                        tracing::error!(id, "cannot record the completion: {e}");
                        None
                    }
                }
            }
            // A full disk is transient: the job goes back to the queue, and waits there until space is freed.
            Err(e) if e.is_disk_full() => {
                tracing::warn!(id, "the disk is full: queued again");
                if let Err(e) = shared.store.requeue(&lease) {
                    tracing::error!(id, "cannot re-queue: {e}");
                }
                shared.wake.wait(DISK_RETRY);
                None
            }
            Err(e) => fail(shared, &lease, now, "output_write_failed", &e.to_string()),
        },
        Ok(Err(kinetoscope::Error::Cancelled { .. })) if !timed_out => match stop.get() {
            Stop::Shutdown => {
                tracing::info!(id, "stopped by the shutdown; queued again");
                if let Err(e) = shared.store.requeue(&lease) {
                    tracing::error!(id, "cannot re-queue: {e}");
                }
                None
            }
            // Deleted (here or through another API node: the row is gone), or the lease lost (the row is
            // someone else's): only a deleted job's files go.
            Stop::Deleted | Stop::Lost | Stop::None => {
                match shared.store.get(&id) {
                    Ok(None) => remove_files(shared, &id),
                    Ok(Some(_)) => tracing::warn!(id, "the lease lapsed while rendering: left to its new owner"),
                    Err(e) => tracing::error!(id, "cannot tell whether the job was deleted: {e}"),
                }
                None
            }
        },
        Ok(Err(kinetoscope::Error::Cancelled { step, steps })) => {
            let limit = shared.config.job_timeout.as_secs();
            fail(
                shared,
                &lease,
                now,
                "timed_out",
                &format!("stopped at step {step} of {steps}: the job limit is {limit} s"),
            )
        }
        Ok(Err(e)) => fail(shared, &lease, now, job_error_code(&e), &e.to_string()),
    };
    if let Some(outcome) = outcome {
        shared.metrics.job_seconds.observe(started.elapsed().as_secs_f64());
        shared.metrics.jobs.get_or_create(&Outcome { outcome: outcome.clone() }).inc();
        // Its webhook event was queued with the outcome; the outbox sends it.
        shared.outbox.notify_one();
        tracing::info!(id, outcome, seconds = started.elapsed().as_secs_f64(), "finished");
    }
    shared.publish(&id);
}

/// The job's source as `pipeline.run_edit` takes it for `edit`: its video, or its image, fitted to `request`; a
/// first and a last image are fitted each on its own (they may differ in size), the last after the first.
fn fitted_input(
    shared: &Shared,
    pipeline: &Pipeline,
    id: &str,
    edit: &EditKind,
    request: &GenerateRequest,
) -> kinetoscope::Result<InputVideo> {
    let image = |path: PathBuf, field: &'static str| {
        pipeline.fit_input(read_image(shared, &path, field)?, &EditKind::ImageToVideo { last_image: false }, request)
    };
    match edit {
        EditKind::ImageToVideo { last_image } => {
            let first = image(image_path(shared, id), "input_reference")?;
            match last_image {
                true => first.then(&image(last_image_path(shared, id), "last_image")?),
                false => Ok(first),
            }
        }
        _ => pipeline.fit_input(read_video(shared, &input_path(shared, id), "video", "source video")?, edit, request),
    }
}

/// The image at `path`, decoded within the limits; unreadable, it is the request's `field` that is wrong.
fn read_image(shared: &Shared, path: &Path, field: &'static str) -> kinetoscope::Result<InputVideo> {
    let frames = kinetoscope_video::read_image_with_limits(path, &shared.config.limits.decode())
        .map_err(|e| kinetoscope::Error::InvalidRequest { field, reason: format!("unreadable image: {e}") })?;
    InputVideo::from_rgb8(frames.as_bytes(), 1, frames.height(), frames.width())
}

/// The video at `path`, decoded within the limits; unreadable, it is the request's `field` that is wrong.
fn read_video(shared: &Shared, path: &Path, field: &'static str, what: &str) -> kinetoscope::Result<InputVideo> {
    let frames = kinetoscope_video::read_frames_with_limits(path, &shared.config.limits.decode())
        .map_err(|e| kinetoscope::Error::InvalidRequest { field, reason: format!("unreadable {what}: {e}") })?;
    InputVideo::from_rgb8(frames.as_bytes(), frames.num_frames(), frames.height(), frames.width())
}

/// A region edit (see `kinetoscope::RegionRequest`): the source fitted as a redo's, its mask (the uploaded picture, or
/// the rectangle in the source's pixels) fitted the same way and limited to the edit's frames.
fn region_edit(
    shared: &Shared,
    pipeline: &Pipeline,
    id: &str,
    edit: &EditKind,
    request: &GenerateRequest,
    on_step: &mut dyn FnMut(kinetoscope::Progress) -> ControlFlow<()>,
) -> kinetoscope::Result<(kinetoscope::Video, kinetoscope::RegionReport)> {
    let EditKind::Region { start, end, rectangle } = *edit else { unreachable!("called for region edits") };
    let source = read_video(shared, &input_path(shared, id), "video", "source video")?;
    let picture = match rectangle {
        Some(rectangle) => kinetoscope::RegionMask::rectangle_picture(source.height, source.width, rectangle)?,
        None => {
            let path = mask_path(shared, id);
            match kinetoscope_video::read_image_with_limits(&path, &shared.config.limits.decode()) {
                Ok(image) => InputVideo::from_rgb8(image.as_bytes(), 1, image.height(), image.width())?,
                Err(_) => read_video(shared, &path, "mask", "mask")?,
            }
        }
    };
    let input = pipeline.fit_input(source, edit, request)?;
    let (mask, _) = kinetoscope::RegionMask::for_clip(&picture, &input, start..end)?;
    let region = kinetoscope::RegionRequest {
        base: request.clone(),
        input: &input,
        mask: &mask,
        reference_images: &[],
        conditioning_scale: 1.0,
    };
    pipeline.redo_region_with_progress(&region, on_step)
}

/// A Wan VACE job: its control video fitted as a video-to-video source is, and its reference image as uploaded.
fn vace_job(
    shared: &Shared,
    pipeline: &Pipeline,
    id: &str,
    edit: &EditKind,
    request: &GenerateRequest,
    on_step: &mut dyn FnMut(kinetoscope::Progress) -> ControlFlow<()>,
) -> kinetoscope::Result<kinetoscope::Video> {
    let EditKind::Vace { control, references, conditioning_scale } = *edit else {
        unreachable!("called for VACE jobs")
    };
    let video = match control {
        true => Some(pipeline.fit_input(
            read_video(shared, &input_path(shared, id), "video", "control video")?,
            edit,
            request,
        )?),
        false => None,
    };
    let reference_images = match references {
        0 => Vec::new(),
        _ => vec![read_image(shared, &image_path(shared, id), "input_reference")?],
    };
    let vace = kinetoscope::VaceRequest {
        base: request.clone(),
        video: video.as_ref(),
        mask: None,
        reference_images: &reference_images,
        conditioning_scale,
    };
    pipeline.vace_with_progress(&vace, on_step)
}

/// `message` with the server's paths replaced by what they are: the job's own source, the model's folder,
/// the data folder.
pub fn redact(shared: &Shared, id: &str, message: &str) -> String {
    let config = &shared.config;
    let mut named = vec![
        (input_path(shared, id), "the source video".to_string()),
        (image_path(shared, id), "the image".to_string()),
        (last_image_path(shared, id), "the last image".to_string()),
        (mask_path(shared, id), "the mask".to_string()),
        (config.data_dir.clone(), "<data>".to_string()),
        (std::path::PathBuf::from(&config.model), format!("<model {}>", config.model_name)),
    ];
    // The same places as the filesystem spells them, where a library reports a resolved path.
    let canonical: Vec<_> =
        named.iter().filter_map(|(path, name)| Some((std::fs::canonicalize(path).ok()?, name.clone()))).collect();
    named.extend(canonical);
    named.iter().fold(message.to_string(), |text, (path, name)| {
        let shown = path.display().to_string();
        if shown.is_empty() {
            text
        } else {
            text.replace(&shown, name)
        }
    })
}

/// Records a failure; returns the outcome to count, or `None` if the job was deleted or lost meanwhile.
fn fail(shared: &Shared, lease: &Lease, now: i64, code: &str, message: &str) -> Option<String> {
    let id = &lease.job;
    tracing::warn!(id, code, "failed: {message}");
    // Clients see the message: the server's paths are not theirs to know.
    let message = redact(shared, id, message);
    match shared.store.fail(lease, now, code, &message) {
        Ok(true) => Some(code.to_string()),
        Ok(false) => None,
        Err(e) => {
            tracing::error!(id, "cannot record the failure: {e}");
            None
        }
    }
}

/// Writes the job's MP4 and thumbnail to the staging folder, under the lease's name, and stages them in the
/// bucket too where there is one.
fn write_files(shared: &Shared, lease: &Lease, video: &kinetoscope::Video) -> Result<(), VideoError> {
    let frames = Frames::from_unit_f32(&video.frames, video.num_frames, video.height, video.width)?;
    let written = kinetoscope_video::write_mp4(&staging_path(shared, lease, "mp4"), &frames, video.fps)
        .and_then(|_| kinetoscope_video::write_png(&staging_path(shared, lease, "png"), &frames, video.num_frames / 2))
        .and_then(|_| {
            let Some(bucket) = &shared.bucket else { return Ok(()) };
            for extension in OUTPUTS {
                let (path, name) = (staging_path(shared, lease, extension), staged_object(lease, extension));
                let upload = bucket.wait(bucket.upload(&path, &name));
                upload.map_err(|e| VideoError::Io { action: "upload", path, source: std::io::Error::other(e) })?;
            }
            Ok(())
        });
    written.inspect_err(|_| remove_staged(shared, lease))
}

/// What a job leaves: its video and its thumbnail.
const OUTPUTS: [&str; 2] = ["mp4", "png"];

fn staged_object(lease: &Lease, extension: &str) -> String {
    bucket::staging_name(&lease.job, &lease.id, extension)
}

fn remove_staged(shared: &Shared, lease: &Lease) {
    for extension in OUTPUTS {
        let _ = std::fs::remove_file(staging_path(shared, lease, extension));
    }
    if let Some(bucket) = &shared.bucket {
        let names = OUTPUTS.map(|extension| staged_object(lease, extension));
        if let Err(e) = bucket.wait(bucket.delete(&names)) {
            tracing::warn!(id = lease.job, "cannot delete the staged objects (the sweep will): {e}");
        }
    }
}

/// Records a completion, putting the staged files in place, while the lease holds; waits out a full disk (the
/// files are written; only the row is missing) unless the server stops meanwhile.
fn complete(
    shared: &Shared,
    lease: &Lease,
    now: i64,
    expires: i64,
    result: Option<&serde_json::Value>,
) -> Result<bool, StoreError> {
    let mut publish = || match &shared.bucket {
        // A copy inside the bucket; the staged objects are deleted after, with the files here.
        Some(bucket) => OUTPUTS.iter().try_for_each(|extension| {
            let (staged, name) = (staged_object(lease, extension), bucket::video_name(&lease.job, extension));
            bucket.wait(bucket.copy(&staged, &name)).map_err(std::io::Error::other)
        }),
        None => {
            std::fs::rename(staging_path(shared, lease, "mp4"), video_path(shared, &lease.job))?;
            std::fs::rename(staging_path(shared, lease, "png"), thumbnail_path(shared, &lease.job))
        }
    };
    loop {
        match shared.store.complete(lease, now, expires, result, &mut publish) {
            Err(e) if e.is_disk_full() && !shared.is_stopping() => {
                tracing::warn!(id = lease.job, "the disk is full: cannot record the completion yet");
                shared.wake.wait(DISK_RETRY);
            }
            other => return other,
        }
    }
}
