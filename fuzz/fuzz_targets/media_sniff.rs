//! Any bytes as an uploaded video or image, under any name: the first bytes are sniffed, then the file is
//! probed as a video and read as an image, as the server and `generate --input-video/--image` read them,
//! within small limits so that every input stays quick.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kinetoscope_video::{probe_with_limits, read_image_with_limits, sniff, DecodeLimits, Media, VideoError};
use libfuzzer_sys::fuzz_target;

const LIMITS: DecodeLimits = DecodeLimits { max_pixels: 256 * 256, max_frames: 64, max_rgb_bytes: 64 * 256 * 256 * 3 };

/// The file each input is written to. Its folder lives until the process exits (libFuzzer exits without
/// running destructors), so `scripts/fuzz.sh` points `TMPDIR` into the ignored `target/`.
fn upload() -> &'static PathBuf {
    static UPLOAD: OnceLock<PathBuf> = OnceLock::new();
    UPLOAD.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("kinetoscope-fuzz-").tempdir().expect("a temporary folder");
        dir.keep().join("upload")
    })
}

/// A refusal for what the file holds is shown to whoever sent it: it must not show where it was stored.
fn check_refusal(error: &VideoError) {
    if error.is_refused_media() {
        let message = error.to_string();
        assert!(!message.contains("kinetoscope-fuzz-"), "a refusal shows the path: {message}");
    }
}

fuzz_target!(|data: &[u8]| {
    let media = sniff(data);
    let path = upload();
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));

    match probe_with_limits(path, &LIMITS) {
        Ok(info) => {
            assert!(matches!(media, Media::Mp4 | Media::Matroska), "{media:?} probed as a video");
            assert!(u64::from(info.width) * u64::from(info.height) <= LIMITS.max_pixels, "{info:?}");
            assert!(info.frames <= LIMITS.max_frames, "{info:?}");
        }
        Err(error) => {
            if !matches!(media, Media::Mp4 | Media::Matroska) {
                assert!(matches!(error, VideoError::UnsupportedMedia { .. }), "{media:?}: {error:?}");
            }
            check_refusal(&error);
        }
    }
    match read_image_with_limits(path, &LIMITS) {
        Ok(image) => {
            assert!(matches!(media, Media::Png | Media::Jpeg | Media::WebP), "{media:?} read as an image");
            assert!((image.width() * image.height()) as u64 <= LIMITS.max_pixels);
        }
        Err(error) => {
            if !matches!(media, Media::Png | Media::Jpeg | Media::WebP) {
                assert!(matches!(error, VideoError::UnsupportedMedia { .. }), "{media:?}: {error:?}");
            }
            check_refusal(&error);
        }
    }
});
