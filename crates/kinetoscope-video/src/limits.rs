//! Bounds on what decoding an untrusted file may cost. A few hundred KB of PNG or H.264 can
//! describe gigabytes of pixels, so sizes are checked from headers before anything is decoded,
//! and again as frames come out.

use crate::VideoError;

/// How much a file may decode to. [`Default`] suits the inputs of a video model: frames and
/// images up to 4096x4096 (16.8 million pixels, past any model's working size), at most 7,200
/// frames (5 minutes at 24 fps; bounds decoding time when frames are tiny), and clips whose RGB
/// frames take at most 1 GiB (about 170 frames at 1080p, 390 at 720p, 890 at Wan's 832x480).
/// Callers turn the RGB into f32 (4 GiB at the cap), so that total, not the file's size, is what
/// the byte cap bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most pixels (width × height) of one image or video frame. Also caps either side alone,
    /// since the other is at least 1.
    pub max_pixels: u64,
    /// Most frames a video may have; bounds decoding time for tiny frames too.
    pub max_frames: usize,
    /// Most bytes a video's frames may take as 8-bit RGB, summed over all frames
    /// (`frames × width × height × 3`). `probe` holds clips to it as well, so what it accepts
    /// `read_frames` can load.
    pub max_rgb_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_pixels: 4096 * 4096, max_frames: 7200, max_rgb_bytes: 1 << 30 }
    }
}

impl DecodeLimits {
    /// No bounds, for reading back what this crate wrote itself from frames already in memory.
    pub(crate) const UNLIMITED: Self = Self { max_pixels: u64::MAX, max_frames: usize::MAX, max_rgb_bytes: u64::MAX };

    /// Refuses a `width`×`height` frame (of `what`, "an image" or "a video frame") over the
    /// pixel cap.
    pub(crate) fn check_size(&self, what: &str, width: u32, height: u32) -> Result<(), VideoError> {
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            return Err(VideoError::TooLarge {
                what: format!("{what} of {width}x{height} pixels"),
                limit: format!("{} pixels", self.max_pixels),
            });
        }
        Ok(())
    }

    /// The longest side a frame within the pixel cap can have, as `image`'s limits take it.
    pub(crate) fn max_side(&self) -> u32 {
        u32::try_from(self.max_pixels).unwrap_or(u32::MAX)
    }
}

/// Counts decoded frames against [`DecodeLimits::max_frames`] and `max_rgb_bytes`.
pub(crate) struct Budget {
    limits: DecodeLimits,
    frames: usize,
    rgb_bytes: u64,
}

impl Budget {
    pub(crate) fn new(limits: &DecodeLimits) -> Self {
        Self { limits: *limits, frames: 0, rgb_bytes: 0 }
    }

    /// Takes one more `width`×`height` frame out of the budget, or refuses it.
    pub(crate) fn take(&mut self, width: u32, height: u32) -> Result<(), VideoError> {
        self.limits.check_size("a video frame", width, height)?;
        self.frames += 1;
        if self.frames > self.limits.max_frames {
            return Err(VideoError::TooLarge {
                what: format!("a video of more than {} frames", self.limits.max_frames),
                limit: format!("{} frames", self.limits.max_frames),
            });
        }
        self.rgb_bytes = self.rgb_bytes.saturating_add(u64::from(width) * u64::from(height) * 3);
        if self.rgb_bytes > self.limits.max_rgb_bytes {
            return Err(VideoError::TooLarge {
                what: format!(
                    "a video of more than {} bytes as RGB (at frame {})",
                    self.limits.max_rgb_bytes, self.frames
                ),
                limit: format!("{} bytes of RGB frames", self.limits.max_rgb_bytes),
            });
        }
        Ok(())
    }

    pub(crate) fn frames(&self) -> usize {
        self.frames
    }
}
