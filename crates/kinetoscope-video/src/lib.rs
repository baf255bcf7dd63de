//! Frames in, H.264 MP4 out, through the system FFmpeg (via `ffmpeg-next`), plus PNG frame
//! dumps and reading videos back for checks and for video-to-video input.
//!
//! The pipeline hands over frames as f32 in [0, 1] shaped `[F, H, W, 3]`, the layout of
//! diffusers' `VideoProcessor.postprocess_video(..., output_type="np")`
//! (<https://github.com/huggingface/diffusers/blob/v0.35.2/src/diffusers/video_processor.py>);
//! [`Frames::from_unit_f32`] quantizes them to RGB bytes.
//!
//! Every file is written under a temporary name in its own directory and renamed into place
//! only once it is complete, synced and (for MP4) read back: an interrupted or failed write
//! never leaves a truncated file ("moov atom not found") at the requested path, nor touches a
//! file already there.

extern crate ffmpeg_next as ffmpeg;

mod error;
mod frames;
mod limits;
mod mp4;
mod png;
mod quality;
mod read;
mod sniff;
mod staged;

pub use error::VideoError;
pub use frames::Frames;
pub use limits::DecodeLimits;
pub use mp4::write_mp4;
pub use png::{read_image, read_image_with_limits, write_png, write_png_frames};
pub use quality::QualitySignals;
pub use read::{probe, probe_with_limits, read_frames, read_frames_with_limits, VideoInfo};
pub use sniff::{sniff, Media};

use std::sync::OnceLock;

/// Initializes FFmpeg once per process and quiets its logging to errors only (libx264's
/// per-encode statistics and FFmpeg's informational chatter otherwise go to stderr).
fn init() -> Result<(), VideoError> {
    static INIT: OnceLock<Result<(), ffmpeg::Error>> = OnceLock::new();
    let result = *INIT.get_or_init(|| {
        ffmpeg::init()?;
        ffmpeg::log::set_level(ffmpeg::log::Level::Error);
        Ok(())
    });
    result.map_err(VideoError::Init)
}

/// Whether a codec's "receive" call failed only because it needs more input (EAGAIN) or has
/// nothing more to give (EOF), the two ways a send/receive loop ends normally.
fn drained(error: ffmpeg::Error) -> bool {
    matches!(error, ffmpeg::Error::Eof | ffmpeg::Error::Other { errno: ffmpeg::error::EAGAIN })
}
