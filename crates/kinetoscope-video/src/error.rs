use std::path::PathBuf;

/// Everything that can go wrong turning frames into files or reading a video back. Each
/// message names the file and what was expected, so the user knows what to change; except
/// [`VideoError::UnsupportedMedia`] and [`VideoError::TooLarge`], which refuse an untrusted file
/// for what it holds and name no path, so that a server can show them to whoever sent the file.
#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("frame data holds {actual} values, but {frames} frames of {width}x{height} RGB need {expected}")]
    DataLength { expected: usize, actual: usize, frames: usize, height: usize, width: usize },

    #[error(
        "cannot hold {frames} frames of {width}x{height} pixels: \
         every dimension must be at least 1, and width and height at most {}",
        u32::MAX
    )]
    InvalidShape { frames: usize, height: usize, width: usize },

    #[error(
        "frame {frame} holds a non-finite value ({value}); \
         refusing to turn NaN/Inf into a video (was the VAE run in reduced precision?)"
    )]
    NonFinite { frame: usize, value: f32 },

    #[error(
        "cannot write {}: H.264 yuv420p needs an even width and height, got {width}x{height}",
        .path.display()
    )]
    OddSize { path: PathBuf, width: usize, height: usize },

    #[error(
        "cannot write {}: the frame rate must be between 1 and {}, got {fps}",
        .path.display(), i32::MAX
    )]
    InvalidFps { path: PathBuf, fps: u32 },

    #[error(
        "cannot write {}: the linked FFmpeg has no libx264 encoder; \
         install an FFmpeg built with libx264 (Debian: libavcodec59)",
        .path.display()
    )]
    EncoderMissing { path: PathBuf },

    #[error("{} does not name a file", .path.display())]
    NotAFile { path: PathBuf },

    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {}: FFmpeg failed {stage}: {source}", .path.display())]
    Encode {
        path: PathBuf,
        stage: &'static str,
        #[source]
        source: ffmpeg::Error,
    },

    #[error("cannot read {}: FFmpeg failed {stage}: {source}", .path.display())]
    Decode {
        path: PathBuf,
        stage: &'static str,
        #[source]
        source: ffmpeg::Error,
    },

    /// A frame index past the end of the clip.
    #[error("frame {index} asked for, but the clip has {frames} frames")]
    NoSuchFrame { index: usize, frames: usize },

    #[error("{} has no video stream", .path.display())]
    NoVideoStream { path: PathBuf },

    #[error("{} holds no decodable video frames", .path.display())]
    NoFrames { path: PathBuf },

    #[error(
        "the video written for {} does not read back as written: expected {expected}, found {found}",
        .path.display()
    )]
    Verify { path: PathBuf, expected: String, found: String },

    #[error("cannot encode PNG {}: {source}", .path.display())]
    Png {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    #[error("cannot read the image {}: {source} (expected a PNG, JPEG or WebP file)", .path.display())]
    ImageRead {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// A file that is not a kind this crate decodes, told by its bytes (never its name).
    #[error("the file holds {found}, not {expected}")]
    UnsupportedMedia { found: String, expected: &'static str },

    /// A file whose frames would exceed the [`DecodeLimits`](crate::DecodeLimits), found out
    /// before they are decoded (from the headers) or as they are.
    #[error("the file is too large to decode: {what} (the limit is {limit})")]
    TooLarge { what: String, limit: String },

    #[error("FFmpeg failed to initialize: {0}")]
    Init(#[source] ffmpeg::Error),
}

impl VideoError {
    /// Whether the error refuses the file for what it holds (an unsupported kind of file, or one
    /// too large to decode) rather than failing to read it: the message names no path and is
    /// safe to show to whoever sent the file.
    pub fn is_refused_media(&self) -> bool {
        matches!(self, VideoError::UnsupportedMedia { .. } | VideoError::TooLarge { .. })
    }

    /// Whether writing failed for want of space (ENOSPC; or a quota, as std reports it), which passes once space is
    /// freed: a server keeps the job rather than failing it.
    pub fn is_disk_full(&self) -> bool {
        match self {
            VideoError::Io { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
            }
            VideoError::Encode { source: ffmpeg::Error::Other { errno }, .. } => *errno == ffmpeg::error::ENOSPC,
            _ => false,
        }
    }
}
