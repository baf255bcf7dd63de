//! The clip (or image, a clip of one frame) a generation starts from, as RGB frames, and how it is cut and
//! resized to the size a request asks for.

use crate::error::{Error, Result};

/// RGB frames in [0, 1], `[num_frames, height, width, 3]` row-major: the clip an edit starts from.
#[derive(Debug, Clone)]
pub struct InputVideo {
    pub frames: Vec<f32>,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
}

impl InputVideo {
    /// Frames from 8-bit RGB bytes shaped `[num_frames, height, width, 3]` (what a video decoder gives).
    pub fn from_rgb8(bytes: &[u8], num_frames: usize, height: usize, width: usize) -> Result<Self> {
        let expected = num_frames * height * width * 3;
        if bytes.len() != expected || expected == 0 {
            return Err(Error::InvalidRequest {
                field: "input",
                reason: format!(
                    "{} bytes of RGB can't be {num_frames} frames of {width}×{height} (expected {expected}, non-zero)",
                    bytes.len()
                ),
            });
        }
        let frames = bytes.iter().map(|&b| f32::from(b) / 255.0).collect();
        Ok(InputVideo { frames, num_frames, height, width })
    }

    /// The first `num_frames` frames (all of them when there are fewer).
    pub fn take_frames(mut self, num_frames: usize) -> Self {
        self.num_frames = self.num_frames.min(num_frames);
        self.frames.truncate(self.num_frames * self.height * self.width * 3);
        self
    }

    /// Frame `index` alone, copied (the last frame when there are fewer).
    pub fn take_frame(&self, index: usize) -> Self {
        let index = index.min(self.num_frames.saturating_sub(1));
        let pixels = self.height * self.width * 3;
        InputVideo { frames: self.frames[index * pixels..(index + 1) * pixels].to_vec(), num_frames: 1, ..*self }
    }

    /// This clip followed by `next`'s frames, which must be of the same size (two images fitted to one video's
    /// size, for a first-and-last-frame generation).
    pub fn then(mut self, next: &InputVideo) -> Result<Self> {
        if (next.height, next.width) != (self.height, self.width) {
            return Err(Error::InvalidRequest {
                field: "last_image",
                reason: format!(
                    "frames of {}x{} can't follow frames of {}x{}: fit both to the video's size first",
                    next.width, next.height, self.width, self.height
                ),
            });
        }
        self.frames.extend_from_slice(&next.frames);
        self.num_frames += next.num_frames;
        Ok(self)
    }

    /// The last `num_frames` frames (all of them when there are fewer), copied.
    pub fn last_frames(&self, num_frames: usize) -> Self {
        let num_frames = self.num_frames.min(num_frames);
        let start = (self.num_frames - num_frames) * self.height * self.width * 3;
        InputVideo { frames: self.frames[start..].to_vec(), num_frames, ..*self }
    }

    /// The clip at `height`×`width`: center-cropped to that aspect ratio (the overhang split evenly between
    /// both sides), then resampled with a triangle (bilinear) filter widened by the scale factor when
    /// shrinking, so that downscaling averages every source pixel instead of skipping some.
    pub fn fit(&self, height: usize, width: usize) -> Self {
        if (height, width) == (self.height, self.width) {
            return self.clone();
        }
        // The largest crop of the source with the target's aspect ratio.
        let (crop_h, crop_w) = if self.width * height > self.height * width {
            (self.height as f64, (self.height * width) as f64 / height as f64)
        } else {
            (self.width as f64 * height as f64 / width as f64, self.width as f64)
        };
        let rows = resampling_weights((self.height as f64 - crop_h) / 2.0, crop_h, height);
        let cols = resampling_weights((self.width as f64 - crop_w) / 2.0, crop_w, width);
        let mut frames = Vec::with_capacity(self.num_frames * height * width * 3);
        let mut row_buffer = vec![0f32; self.width * 3];
        for frame in self.frames.chunks_exact(self.height * self.width * 3) {
            for row_taps in &rows {
                row_buffer.fill(0.0);
                for &(y, wy) in row_taps {
                    let source = &frame[y * self.width * 3..(y + 1) * self.width * 3];
                    row_buffer.iter_mut().zip(source).for_each(|(acc, &v)| *acc += wy * v);
                }
                for col_taps in &cols {
                    let mut pixel = [0f32; 3];
                    for &(x, wx) in col_taps {
                        pixel.iter_mut().zip(&row_buffer[x * 3..x * 3 + 3]).for_each(|(acc, &v)| *acc += wx * v);
                    }
                    frames.extend(pixel.map(|v| v.clamp(0.0, 1.0)));
                }
            }
        }
        InputVideo { frames, num_frames: self.num_frames, height, width }
    }
}

/// For each of `out_len` output pixels covering source pixels `[start, start + len)` evenly, the source
/// pixels it reads and their weights (summing to 1), by a triangle filter of radius max(1, scale). Pixels
/// outside the window never contribute: what the crop cut off stays cut off.
fn resampling_weights(start: f64, len: f64, out_len: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = len / out_len as f64;
    let radius = scale.max(1.0);
    (0..out_len)
        .map(|i| {
            let center = start + (i as f64 + 0.5) * scale;
            let first = (center - radius).floor().max(start.floor()) as usize;
            let last = (center + radius).ceil().min((start + len).ceil()) as usize;
            let taps: Vec<(usize, f64)> = (first..last)
                .map(|x| (x, (1.0 - ((x as f64 + 0.5 - center) / radius).abs()).max(0.0)))
                .filter(|&(_, w)| w > 0.0)
                .collect();
            let total: f64 = taps.iter().map(|(_, w)| w).sum();
            taps.into_iter().map(|(x, w)| (x, (w / total) as f32)).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_crops_to_the_center_and_keeps_flat_color() {
        // 2 frames of 4×8 (h×w): left quarter black, middle white, right quarter black.
        let mut bytes = Vec::new();
        for _ in 0..2 * 4 {
            for x in 0..8 {
                bytes.extend([if (2..6).contains(&x) { 255 } else { 0 }; 3]);
            }
        }
        let input = InputVideo::from_rgb8(&bytes, 2, 4, 8).unwrap();
        // A square target crops the middle 4×4, which is all white.
        let fitted = input.fit(2, 2);
        assert_eq!((fitted.num_frames, fitted.height, fitted.width, fitted.frames.len()), (2, 2, 2, 2 * 2 * 2 * 3));
        assert!(fitted.frames.iter().all(|&v| (v - 1.0).abs() < 1e-6), "{:?}", fitted.frames);
        // Same size is the identity; upscaling a flat region stays flat.
        assert_eq!(input.fit(4, 8).frames, input.frames);
        let up = input.take_frames(1).fit(8, 8);
        assert_eq!(up.num_frames, 1);
        assert!(up.frames.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn last_frames_are_the_tail() {
        let input = InputVideo::from_rgb8(&[0, 0, 0, 1, 1, 1, 2, 2, 2], 3, 1, 1).unwrap();
        let tail = input.last_frames(2);
        assert_eq!((tail.num_frames, tail.frames.len()), (2, 6));
        assert_eq!(tail.frames[0], 1.0 / 255.0);
        assert_eq!(input.last_frames(5).num_frames, 3);
    }

    #[test]
    fn rgb8_length_is_checked() {
        let err = InputVideo::from_rgb8(&[0; 10], 1, 2, 2).unwrap_err().to_string();
        assert!(err.contains("input") && err.contains("expected 12"), "{err}");
    }
}
