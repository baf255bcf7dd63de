//! `generate --input-video`: video-to-video (`--strength`), regenerating a time range (`--redo`) or a region
//! (`--mask`, `--region`, over a `--redo` range or every frame); `generate
//! --extend-from`: extending a clip (`--seconds`); `generate --image` (and `--last-image`): image-to-video;
//! `--control-video` and `--reference-image`: a Wan VACE model's conditioning. Reads
//! the source clip or image(s), fits it to a size and frame count the model takes, runs the library's edit, and
//! says what the sidecar records of it (the source's hash, the edit).

use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kinetoscope::{
    EditKind, ExtendLayout, ExtendRequest, GenerateRequest, InputVideo, MaskFit, Pipeline, Progress, RegionMask,
    RegionReport, RegionRequest, TimeRange, VaceRequest, Video, MAX_EXTEND_SECONDS,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::generate::Model;

/// The flags of an edit.
#[derive(clap::Args)]
pub struct EditArgs {
    /// Regenerate this video with the prompt (video-to-video) instead of starting from noise. Its frames are
    /// center-cropped to the aspect ratio of --width x --height and resized to that size (bilinear, averaging
    /// when shrinking), and cut to the largest frame count of the form 4k+1 that is at most both --frames
    /// and the clip's own; the output has that many frames.
    #[arg(long, value_name = "VIDEO")]
    input_video: Option<PathBuf>,
    /// How much of --input-video to regenerate, in (0, 1]: only the last ⌊steps·S⌋ steps run, starting from
    /// the input noised to that step's level; 1 keeps nothing of the input but its length.
    #[arg(long, value_name = "S", requires = "input_video", default_value_t = 0.8, value_parser = parse_strength)]
    strength: f64,
    /// Regenerate only this time range of --input-video, keeping the rest (up to the VAE's round trip; the
    /// latent frame on each side of the range is blended): seconds of the input, START s-END s (e.g.
    /// 2.0s-3.5s, frames shown from START up to before END), or frame indices FIRST-LAST (e.g. 32-55, both
    /// included). All steps run; --strength doesn't apply.
    #[arg(long, value_name = "RANGE", requires = "input_video", conflicts_with = "strength")]
    redo: Option<TimeRange>,
    /// Regenerate only the region of --input-video this mask shows white (black elsewhere): an image (PNG,
    /// JPEG, WebP) for every frame, or a video with a mask frame for each frame. It is cropped and resized as the
    /// video is, and thresholded at half. With --redo, only within that time range. Every pixel outside the mask
    /// stays the video's exactly; the region blends in over a few pixels inside its edge.
    #[arg(long, value_name = "IMAGE_OR_VIDEO", requires = "input_video", conflicts_with_all = ["strength", "region"])]
    mask: Option<PathBuf>,
    /// Regenerate only this rectangle of --input-video, X,Y,WIDTH,HEIGHT in the video's own pixels (as --mask
    /// with a white rectangle); with --redo, only within that time range.
    #[arg(long, value_name = "X,Y,W,H", requires = "input_video", conflicts_with = "strength", value_parser = parse_region)]
    region: Option<[usize; 4]>,
    /// Extend this video: generate what follows it with the prompt, conditioned on its last 9 frames, and
    /// write the video and the new frames as one MP4 at the video's size (rounded down to multiples of 16)
    /// and frame rate. The output's frames are the video's but its last 4, then 4 seam frames generated
    /// in their place (easing from the video into the new content), then the new frames: as many as the
    /// video had plus --seconds (or --frames, a multiple of 4).
    #[arg(long, value_name = "VIDEO", conflicts_with_all = ["input_video", "height", "width", "fps"])]
    extend_from: Option<PathBuf>,
    /// How long a part --extend-from adds, in (0, 10] seconds; rounded up to a multiple of 4 frames.
    #[arg(long, requires = "extend_from", value_parser = parse_seconds)]
    seconds: Option<f64>,
    /// Start the video from this image (PNG, JPEG or WebP) as its first frame: with Wan 2.2 TI2V (optional), and
    /// with the image-to-video models, which need it (Wan 2.1 I2V and FLF2V, Wan 2.2 I2V-A14B). The image is
    /// center-cropped to the aspect ratio of --width x --height and resized to that size (bilinear, averaging
    /// when shrinking); the video has --frames frames.
    #[arg(long, value_name = "IMAGE", conflicts_with_all = ["input_video", "extend_from"])]
    image: Option<PathBuf>,
    /// End the video on this image (first-and-last-frame generation: Wan 2.1 FLF2V, Wan 2.2 I2V-A14B); read,
    /// cropped and resized as --image, on its own.
    #[arg(long, value_name = "IMAGE", requires = "image")]
    last_image: Option<PathBuf>,
    /// Wan VACE: follow this video everywhere (a depth, pose or edge video, or any clip whose motion and layout
    /// to keep), with the prompt for what it shows. Its frames are fitted as --input-video's; the output has as
    /// many.
    #[arg(long, value_name = "VIDEO", conflicts_with_all = ["input_video", "extend_from", "image"])]
    control_video: Option<PathBuf>,
    /// Wan VACE: an image of a subject or a style for the video to show (PNG, JPEG or WebP); repeat for several.
    /// Letterboxed on white to the video's size. Alone, with --control-video, or in the region --mask or --region
    /// regenerates.
    #[arg(long = "reference-image", value_name = "IMAGE", conflicts_with_all = ["extend_from", "image"])]
    reference_images: Vec<PathBuf>,
    /// Wan VACE: how strongly --control-video, --reference-image or the clip around a --mask or --region steer the
    /// video (diffusers' `conditioning_scale`).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    conditioning_scale: f64,
}

/// What to do with the source.
enum Mode {
    VideoToVideo {
        strength: f64,
    },
    Redo {
        range: TimeRange,
        frames: Range<usize>,
    },
    Region(Box<Region>),
    Extend {
        seconds: Option<f64>,
        fps: u32,
        extension: Option<Extension>,
    },
    ImageToVideo {
        last: Option<LastImage>,
    },
    /// Wan VACE: a control video (the edit's input) to follow, reference images, or both.
    Vace {
        control: bool,
        references: Vec<Reference>,
        scale: f64,
    },
}

/// A VACE reference image as read.
struct Reference {
    input: InputVideo,
    source: PathBuf,
    sha256: String,
}

impl Reference {
    /// Reads and hashes each of `paths`.
    fn read_all(paths: &[PathBuf]) -> Result<Vec<Self>> {
        paths
            .iter()
            .map(|path| {
                let ImageFile { input, sha256 } = ImageFile::read(path)?;
                Ok(Reference { input, source: path.clone(), sha256 })
            })
            .collect()
    }

    /// What the sidecar records of each.
    fn records(references: &[Self]) -> Value {
        references
            .iter()
            .map(|r| {
                let size = json!({ "width": r.input.width, "height": r.input.height });
                json!({ "source": r.source, "sha256": r.sha256, "source_image": size })
            })
            .collect()
    }
}

/// A region to regenerate: the mask as read (a picture of it, or a rectangle drawn at the clip's size), and once
/// [`Edit::fit`] has run, fitted to the clip.
struct Region {
    /// `--mask FILE` and its sha256, or `None` for `--region`.
    file: Option<(PathBuf, String)>,
    rectangle: Option<[usize; 4]>,
    /// The time range it is limited to (`--redo`), and its frames.
    range: Option<(TimeRange, Range<usize>)>,
    picture: InputVideo,
    fitted: Option<(RegionMask, MaskFit)>,
    /// The last render's report, for the sidecar.
    report: std::sync::Mutex<Option<RegionReport>>,
    /// On a Wan VACE model: `--reference-image`s, and `--conditioning-scale`.
    references: Vec<Reference>,
    scale: f64,
}

/// The image a first-and-last-frame generation ends on.
struct LastImage {
    /// Its pixels as read, then as [`Edit::fit`] fits them (and puts them after the first image's in the edit's
    /// input).
    input: InputVideo,
    source: PathBuf,
    sha256: String,
    /// Width and height as read.
    source_shape: (usize, usize),
}

/// An image as read from its file, not yet fitted to a request.
struct ImageFile {
    input: InputVideo,
    sha256: String,
}

impl ImageFile {
    /// Reads and hashes the image at `path` (`--image`, `--last-image`, a batch item's `image` and `last_image`).
    fn read(path: &Path) -> Result<Self> {
        let cannot_read = || format!("cannot read the image {}", path.display());
        let sha256 = file_sha256(path).with_context(cannot_read)?;
        // A refusal for what the file holds names no path (a server shows it to clients); the context does.
        let image = kinetoscope_video::read_image(path).with_context(cannot_read)?;
        let input = InputVideo::from_rgb8(image.as_bytes(), 1, image.height(), image.width())?;
        Ok(ImageFile { input, sha256 })
    }
}

/// An extension's length and where its frames come from: known once [`Edit::fit`] has run.
#[derive(Clone, Copy)]
struct Extension {
    frames: usize,
    layout: ExtendLayout,
}

/// The source of an edit: as read, then [`Edit::fit`] to the request (for a first and a last image, both
/// images as its two frames).
pub struct Edit {
    pub input: InputVideo,
    mode: Mode,
    source: PathBuf,
    sha256: String,
    /// The clip or image as read: frames, width, height.
    source_shape: (usize, usize, usize),
}

impl EditArgs {
    /// Refuses what `model` can't do with these flags, before any file is read or weights loaded: an
    /// image-to-video model without `--image`, or `--last-image` for a model that can't end on one.
    pub fn check(&self, model: &Model) -> Result<()> {
        let shape = model.shape()?;
        if shape.needs_image && self.image.is_none() {
            bail!(
                "{} generates video from an image (image-to-video): give the first frame with --image; it doesn't \
                 generate from text alone or edit a video",
                model.name()
            );
        }
        if (self.control_video.is_some() || !self.reference_images.is_empty()) && !shape.vace {
            bail!(
                "--control-video and --reference-image need a Wan VACE model (Wan-AI/Wan2.1-VACE-1.3B-diffusers or \
                 -14B-diffusers); {} has no VACE blocks",
                model.name()
            );
        }
        let masked = self.mask.is_some() || self.region.is_some();
        if !self.reference_images.is_empty() && self.input_video.is_some() && !masked {
            bail!("--reference-image with --input-video: give the region to regenerate (--mask or --region)");
        }
        if shape.vace && (self.extend_from.is_some() || self.image.is_some() || (self.input_video.is_some() && !masked))
        {
            bail!(
                "{} is a Wan VACE model: it edits a region of --input-video (--mask, --region), follows \
                 --control-video, shows --reference-image, or generates from the prompt; video-to-video, a time-range \
                 redo without a region, extending and image-to-video need a Wan text- or image-to-video model",
                model.name()
            );
        }
        let steered = self.control_video.is_some() || !self.reference_images.is_empty() || masked;
        if self.conditioning_scale != 1.0 && !(shape.vace && steered) {
            bail!(
                "--conditioning-scale: a Wan VACE model's, with --control-video, --reference-image, --mask or --region \
                 for it to scale"
            );
        }
        if !self.conditioning_scale.is_finite() {
            bail!("--conditioning-scale: {} must be a finite number", self.conditioning_scale);
        }
        if self.last_image.is_some() && !shape.takes_last_image {
            bail!(
                "--last-image: {} can't end on a given frame (last_image); first-and-last-frame generation needs \
                 Wan 2.1 FLF2V or Wan 2.2 I2V-A14B",
                model.name()
            );
        }
        Ok(())
    }

    /// Reads and hashes `--input-video`, `--extend-from` or `--image` (and `--last-image`), if given: before the
    /// model loads, so a bad file fails fast.
    pub fn read(&self) -> Result<Option<Edit>> {
        if let Some(path) = &self.image {
            return Edit::read_image(path, self.last_image.as_deref()).map(Some);
        }
        if self.input_video.is_none() && (self.control_video.is_some() || !self.reference_images.is_empty()) {
            let (control, references) = (self.control_video.as_deref(), &self.reference_images);
            return Edit::read_vace(control, references, self.conditioning_scale).map(Some);
        }
        let (path, extend) = match (&self.input_video, &self.extend_from) {
            (Some(path), _) => (path, false),
            (None, Some(path)) => (path, true),
            (None, None) => return Ok(None),
        };
        let (input, sha256, source_shape) = read_video(path, "input video")?;
        let cannot_read = || format!("cannot read the input video {}", path.display());
        let range = |range: TimeRange| -> Result<(TimeRange, Range<usize>)> {
            // Only a range in seconds needs the clip's frame rate.
            let fps = match range {
                TimeRange::Seconds(..) => kinetoscope_video::probe(path).with_context(cannot_read)?.fps,
                TimeRange::Frames(..) => 0.0,
            };
            Ok((range, range.frames(fps)))
        };
        let region = match (&self.mask, self.region) {
            (Some(mask), _) => Some(Region::read_mask(mask, &input)?),
            (None, Some(rectangle)) => Some(Region::rectangle(rectangle, &input)?),
            (None, None) => None,
        };
        let mode = match self.redo {
            _ if region.is_some() => {
                let mut region = region.expect("matched");
                region.range = self.redo.map(range).transpose()?;
                (region.references, region.scale) =
                    (Reference::read_all(&self.reference_images)?, self.conditioning_scale);
                Mode::Region(Box::new(region))
            }
            _ if extend => {
                let fps = kinetoscope_video::probe(path).with_context(cannot_read)?.fps.round();
                if !(fps >= 1.0 && fps <= f64::from(u32::MAX)) {
                    anyhow::bail!("the input video {} states no usable frame rate ({fps} fps)", path.display());
                }
                Mode::Extend { seconds: self.seconds, fps: fps as u32, extension: None }
            }
            None => Mode::VideoToVideo { strength: self.strength },
            Some(redo) => {
                let (range, frames) = range(redo)?;
                Mode::Redo { range, frames }
            }
        };
        Ok(Some(Edit { input, mode, source: path.clone(), sha256, source_shape }))
    }
}

/// A video's frames as read, its sha256, and its (frames, width, height); `what` names it in errors.
fn read_video(path: &Path, what: &str) -> Result<(InputVideo, String, (usize, usize, usize))> {
    let cannot_read = || format!("cannot read the {what} {}", path.display());
    let sha256 = file_sha256(path).with_context(cannot_read)?;
    let frames = kinetoscope_video::read_frames(path).with_context(cannot_read)?;
    let source_shape = (frames.num_frames(), frames.width(), frames.height());
    let input = InputVideo::from_rgb8(frames.as_bytes(), frames.num_frames(), frames.height(), frames.width())?;
    Ok((input, sha256, source_shape))
}

impl Edit {
    /// Reads and hashes a VACE generation's control video and reference images (`--control-video`,
    /// `--reference-image`, a batch item's `control_video` and `reference_images`): at least one of them. Without
    /// a control video the first reference image stands as the edit's source.
    pub fn read_vace(control: Option<&Path>, references: &[PathBuf], scale: f64) -> Result<Self> {
        let references = Reference::read_all(references)?;
        let (input, source, sha256, source_shape) = match (control, references.first()) {
            (Some(path), _) => {
                let (input, sha256, shape) = read_video(path, "control video")?;
                (input, path.to_path_buf(), sha256, shape)
            }
            (None, Some(first)) => {
                let empty = InputVideo { frames: Vec::new(), num_frames: 0, height: 0, width: 0 };
                (empty, first.source.clone(), first.sha256.clone(), (1, first.input.width, first.input.height))
            }
            (None, None) => bail!("a VACE generation needs a control video or a reference image"),
        };
        let mode = Mode::Vace { control: control.is_some(), references, scale };
        Ok(Edit { input, mode, source, sha256, source_shape })
    }

    /// Reads and hashes an image to start a video from (`--image`, a batch item's `image`) and, optionally, one
    /// to end it on (`--last-image`, `last_image`).
    pub fn read_image(path: &Path, last_image: Option<&Path>) -> Result<Self> {
        let ImageFile { input, sha256 } = ImageFile::read(path)?;
        let last = last_image
            .map(|path| {
                let image = ImageFile::read(path)?;
                let source_shape = (image.input.width, image.input.height);
                Ok::<_, anyhow::Error>(LastImage {
                    input: image.input,
                    source: path.to_path_buf(),
                    sha256: image.sha256,
                    source_shape,
                })
            })
            .transpose()?;
        let source_shape = (1, input.width, input.height);
        Ok(Edit { input, mode: Mode::ImageToVideo { last }, source: path.to_path_buf(), sha256, source_shape })
    }

    /// The clip at a size and frame count the model takes. To edit: at `request`'s size, cut to at most its
    /// frame count and down to the form `k·frame_multiple + 1`. To extend: at its own size rounded down to
    /// multiples of the model's, every frame kept; `request.num_frames` is the frames to add unless
    /// `--seconds` says. Images: each at `request`'s size on its own (they may differ in size), the last
    /// after the first.
    pub fn fit(mut self, request: &GenerateRequest, pipeline: &Pipeline) -> Result<Self> {
        if let Mode::ImageToVideo { last: Some(last) } = &mut self.mode {
            let one = EditKind::ImageToVideo { last_image: false };
            let first = pipeline.fit_input(self.input, &one, request)?;
            let read = InputVideo { frames: std::mem::take(&mut last.input.frames), ..last.input };
            last.input = pipeline.fit_input(read, &one, request)?;
            let input = first.then(&last.input)?;
            return Ok(Edit { input, ..self });
        }
        if let Mode::Vace { control: false, .. } = self.mode {
            return Ok(self);
        }
        let Mode::Extend { seconds, fps, .. } = self.mode else {
            let kind = self.kind();
            let input = pipeline.fit_input(self.input, &kind, request)?;
            if let Mode::Region(region) = &mut self.mode {
                region.fit(&input)?;
            }
            return Ok(Edit { input, ..self });
        };
        let frames = match seconds {
            Some(seconds) => pipeline.shape().extension_frames(seconds, fps)?,
            None => request.num_frames,
        };
        let input = pipeline.fit_input(self.input, &EditKind::Extend { frames }, request)?;
        let base = GenerateRequest { fps, ..request.clone() };
        let layout = pipeline.shape().extend_layout(&ExtendRequest { base, input: &input, frames });
        let layout = match seconds {
            Some(_) => layout?,
            None => layout.context("without --seconds, --frames is the number of frames to add")?,
        };
        let extension = Some(Extension { frames, layout });
        Ok(Edit { input, mode: Mode::Extend { seconds, fps, extension }, ..self })
    }

    /// The library's description of the edit.
    fn kind(&self) -> EditKind {
        match &self.mode {
            Mode::VideoToVideo { strength } => EditKind::VideoToVideo { strength: *strength },
            Mode::Redo { frames, .. } => EditKind::Redo { start: frames.start, end: frames.end },
            Mode::Region(region) => {
                let (start, end) = region.range.as_ref().map_or((0, self.input.num_frames), |(_, f)| (f.start, f.end));
                EditKind::Region { start, end, rectangle: region.rectangle }
            }
            Mode::Extend { extension, .. } => EditKind::Extend { frames: extension.map_or(0, |e| e.frames) },
            Mode::ImageToVideo { last } => EditKind::ImageToVideo { last_image: last.is_some() },
            Mode::Vace { control, references, scale } => {
                EditKind::Vace { control: *control, references: references.len(), conditioning_scale: *scale }
            }
        }
    }

    /// Sets what the edit decides of `request`: the frame count it generates, and to extend, size and frame rate.
    /// An image decides nothing: the video has the request's frames.
    pub fn shape(&self, request: &mut GenerateRequest) {
        match &self.mode {
            Mode::Extend { fps, extension: Some(extension), .. } => {
                request.num_frames = extension.layout.generated;
                (request.height, request.width, request.fps) = (self.input.height, self.input.width, *fps);
            }
            Mode::ImageToVideo { .. } | Mode::Vace { control: false, .. } => {}
            _ => request.num_frames = self.input.num_frames,
        }
    }

    /// Denoising steps the edit runs of `steps`.
    pub fn steps(&self, steps: usize) -> Result<usize> {
        Ok(kinetoscope::edit_steps(&self.kind(), steps)?)
    }

    /// Runs the edit with `base` (one candidate's settings) on this source.
    pub fn render(
        &self,
        pipeline: &Pipeline,
        base: &GenerateRequest,
        on_step: &mut dyn FnMut(Progress) -> ControlFlow<()>,
    ) -> kinetoscope::Result<Video> {
        if let Mode::Region(region) = &self.mode {
            let (mask, _) = region.fitted.as_ref().expect("fitted before rendering");
            let reference_images: Vec<InputVideo> = region.references.iter().map(|r| r.input.clone()).collect();
            let request = RegionRequest {
                base: base.clone(),
                input: &self.input,
                mask,
                reference_images: &reference_images,
                conditioning_scale: region.scale,
            };
            let (video, report) = pipeline.redo_region_with_progress(&request, on_step)?;
            *region.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
            return Ok(video);
        }
        if let Mode::Vace { control, references, scale } = &self.mode {
            let reference_images: Vec<InputVideo> = references.iter().map(|r| r.input.clone()).collect();
            let request = VaceRequest {
                base: base.clone(),
                video: control.then_some(&self.input),
                mask: None,
                reference_images: &reference_images,
                conditioning_scale: *scale,
            };
            return pipeline.vace_with_progress(&request, on_step);
        }
        pipeline.run_edit(&self.kind(), base, &self.input, on_step)
    }

    /// What the sidecar records under `edit`.
    pub fn record(&self) -> Value {
        let (frames, width, height) = self.source_shape;
        let mut record = json!({ "source": self.source, "source_sha256": self.sha256 });
        if !matches!(self.mode, Mode::ImageToVideo { .. } | Mode::Vace { control: false, .. }) {
            record["source_video"] = json!({ "frames": frames, "width": width, "height": height });
            record["frames_used"] = json!(self.input.num_frames);
        }
        match &self.mode {
            Mode::VideoToVideo { strength } => {
                record["kind"] = json!("video_to_video");
                record["strength"] = json!(strength);
            }
            Mode::Redo { range, frames } => {
                record["kind"] = json!("redo");
                record["redo"] = range_record(range);
                record["redo_frames"] = json!([frames.start, frames.end]);
            }
            Mode::Region(region) => {
                record["kind"] = json!("region");
                if let Some((path, sha256)) = &region.file {
                    record["mask"] = json!({ "source": path, "sha256": sha256 });
                }
                if let Some([x, y, w, h]) = region.rectangle {
                    record["region"] = json!({ "x": x, "y": y, "width": w, "height": h });
                }
                if let Some((range, frames)) = &region.range {
                    record["redo"] = range_record(range);
                    record["redo_frames"] = json!([frames.start, frames.end]);
                }
                if let Some((_, fit)) = &region.fitted {
                    record["mask_fit"] = json!(fit);
                }
                // Latent cells regenerated and blended, the largest change outside the mask (0 after compositing)
                // and the seam's mean gradient.
                record["result"] = json!(*region.report.lock().unwrap_or_else(|p| p.into_inner()));
                if !region.references.is_empty() || region.scale != 1.0 {
                    record["conditioning_scale"] = json!(region.scale);
                    record["reference_images"] = Reference::records(&region.references);
                }
            }
            Mode::Extend { seconds, extension, .. } => {
                record["kind"] = json!("extend");
                record["seconds"] = json!(seconds);
                if let Some(Extension { frames, layout }) = extension {
                    let (used, end) = (self.input.num_frames, layout.kept + layout.generated - layout.generated_from);
                    record["added_frames"] = json!(frames);
                    record["context_frames"] = json!([used - layout.context, used]);
                    record["source_frames"] = json!([0, layout.kept]);
                    record["generated_frames"] = json!([layout.kept, end]);
                }
            }
            Mode::Vace { control, references, scale } => {
                record["kind"] = json!("vace");
                record["control_video"] = json!(control);
                record["conditioning_scale"] = json!(scale);
                record["reference_images"] = Reference::records(references);
            }
            Mode::ImageToVideo { last } => {
                record["kind"] = json!("image_to_video");
                record["source_image"] = json!({ "width": width, "height": height });
                if let Some(last) = last {
                    let (width, height) = last.source_shape;
                    record["last_image"] = json!({
                        "source": last.source,
                        "source_sha256": last.sha256,
                        "source_image": { "width": width, "height": height },
                    });
                }
            }
        }
        record
    }
}

fn range_record(range: &TimeRange) -> Value {
    match *range {
        TimeRange::Seconds(start, end) => json!({ "start_s": start, "end_s": end }),
        TimeRange::Frames(first, last) => json!({ "first_frame": first, "last_frame": last }),
    }
}

impl Region {
    /// A mask file: an image, or else a video.
    fn read_mask(path: &Path, input: &InputVideo) -> Result<Self> {
        let cannot_read = || format!("cannot read the mask {}", path.display());
        let sha256 = file_sha256(path).with_context(cannot_read)?;
        let picture = match kinetoscope_video::read_image(path) {
            Ok(image) => InputVideo::from_rgb8(image.as_bytes(), 1, image.height(), image.width())?,
            Err(_) => {
                let frames = kinetoscope_video::read_frames(path).with_context(cannot_read)?;
                InputVideo::from_rgb8(frames.as_bytes(), frames.num_frames(), frames.height(), frames.width())?
            }
        };
        if (picture.height, picture.width) != (input.height, input.width) {
            eprintln!(
                "note: the mask {} is {}x{} and the video {}x{}: it is cropped and resized as the video is",
                path.display(),
                picture.width,
                picture.height,
                input.width,
                input.height
            );
        }
        Ok(Region::new(Some((path.to_path_buf(), sha256)), None, picture))
    }

    /// A white rectangle on black at the clip's own size.
    fn rectangle(rectangle: [usize; 4], input: &InputVideo) -> Result<Self> {
        let picture = RegionMask::rectangle_picture(input.height, input.width, rectangle)?;
        Ok(Region::new(None, Some(rectangle), picture))
    }

    fn new(file: Option<(PathBuf, String)>, rectangle: Option<[usize; 4]>, picture: InputVideo) -> Self {
        let report = Default::default();
        Region { file, rectangle, range: None, picture, fitted: None, report, references: Vec::new(), scale: 1.0 }
    }

    /// The mask fitted to the clip as it was fitted, limited to the time range.
    fn fit(&mut self, input: &InputVideo) -> Result<()> {
        let frames = self.range.as_ref().map_or(0..input.num_frames, |(_, frames)| frames.clone());
        let (mask, fit) = RegionMask::for_clip(&self.picture, input, frames)?;
        if fit.thresholded {
            eprintln!("note: the mask has grey pixels: thresholded at half (white above)");
        }
        self.fitted = Some((mask, fit));
        Ok(())
    }
}

fn parse_region(s: &str) -> Result<[usize; 4], String> {
    let values: Vec<usize> = s
        .split(',')
        .map(|v| v.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?} is not a region: expected X,Y,WIDTH,HEIGHT in pixels, e.g. 100,40,200,120"))?;
    match values[..] {
        [x, y, w, h] if w > 0 && h > 0 => Ok([x, y, w, h]),
        _ => Err(format!("{s:?} is not a region: expected X,Y,WIDTH,HEIGHT with a positive width and height")),
    }
}

fn parse_strength(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?} is not a strength: expected a number in (0, 1], e.g. 0.6")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= MAX_EXTEND_SECONDS => Ok(v),
        _ => Err(format!("{s:?} is not a length: expected seconds in (0, {MAX_EXTEND_SECONDS}], e.g. 2.5")),
    }
}

pub(crate) fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_in_zero_to_the_cap() {
        assert_eq!(parse_seconds("2.5"), Ok(2.5));
        assert_eq!(parse_seconds("10"), Ok(10.0));
        for bad in ["0", "-1", "10.5", "NaN", "two"] {
            let err = parse_seconds(bad).unwrap_err();
            assert!(err.contains("(0, 10]"), "{bad}: {err}");
        }
    }

    #[test]
    fn strengths_are_in_zero_to_one() {
        assert_eq!(parse_strength("1"), Ok(1.0));
        assert_eq!(parse_strength("0.25"), Ok(0.25));
        for bad in ["0", "1.5", "-0.2", "NaN", "half"] {
            let err = parse_strength(bad).unwrap_err();
            assert!(err.contains("(0, 1]"), "{bad}: {err}");
        }
    }
}
