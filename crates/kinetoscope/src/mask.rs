//! Which pixels of a clip a region edit regenerates: a mask over every frame, from a rectangle or a picture of it,
//! taken down to the latent grid and softened into the blending weights of the composite.

use std::ops::Range;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::input_video::InputVideo;

/// Which pixels of a clip to regenerate: one value per pixel of every frame, `[frames, height, width]`, 1 inside the
/// region and 0 outside.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionMask {
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    pub values: Vec<f32>,
}

/// What was done to a mask to fit the clip, for the sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MaskFit {
    /// It was another size than the clip and was center cropped and resized as the clip was.
    pub resized: bool,
    /// It held values other than black and white, thresholded at half.
    pub thresholded: bool,
    /// One mask image applies to every frame.
    pub single_image: bool,
}

impl RegionMask {
    /// A rectangle of `width × height` pixels at (`x`, `y`) on the frames `frames` (end excluded) of a clip of
    /// `num_frames` frames of `clip_height × clip_width`.
    pub fn rectangle(
        (num_frames, clip_height, clip_width): (usize, usize, usize),
        (x, y, width, height): (usize, usize, usize, usize),
        frames: Range<usize>,
    ) -> Result<Self> {
        let invalid = |reason: String| Err(Error::InvalidRequest { field: "region", reason });
        if width == 0 || height == 0 || x + width > clip_width || y + height > clip_height {
            return invalid(format!(
                "the region {x},{y},{width},{height} (x, y, width, height) is empty or not inside the \
                 {clip_width}x{clip_height} clip"
            ));
        }
        if frames.start >= frames.end || frames.end > num_frames {
            return invalid(format!(
                "the frames {}..{} (end excluded) are empty or outside the clip's 0..{num_frames}",
                frames.start, frames.end
            ));
        }
        let mut values = vec![0f32; num_frames * clip_height * clip_width];
        for f in frames {
            for row in y..y + height {
                let start = (f * clip_height + row) * clip_width + x;
                values[start..start + width].fill(1.0);
            }
        }
        Ok(Self { num_frames, height: clip_height, width: clip_width, values })
    }

    /// A mask from a picture of it, black outside and white inside (an image: one frame for every frame of the
    /// clip; a video: a frame each, at least as many as the clip's): each pixel's channels averaged and
    /// thresholded at half, center cropped and resized as the clip was fitted to `num_frames × height × width`.
    pub fn from_picture(mask: &InputVideo, num_frames: usize, height: usize, width: usize) -> Result<(Self, MaskFit)> {
        let single_image = mask.num_frames == 1;
        if !single_image && mask.num_frames < num_frames {
            return Err(Error::InvalidRequest {
                field: "mask",
                reason: format!(
                    "the mask video has {} frames and the clip {num_frames}: give a frame of the mask for every frame \
                     (or one image for all)",
                    mask.num_frames
                ),
            });
        }
        let resized = (mask.height, mask.width) != (height, width);
        let fitted = if resized { mask.fit(height, width) } else { mask.clone() };
        let plane = height * width;
        let mut thresholded = false;
        let mut values = Vec::with_capacity(num_frames * plane);
        for f in 0..num_frames {
            let frame = if single_image { 0 } else { f };
            for pixel in fitted.frames[frame * plane * 3..(frame + 1) * plane * 3].chunks_exact(3) {
                let mean = (pixel[0] + pixel[1] + pixel[2]) / 3.0;
                // 8-bit black and white, and what resizing left within a step of them, are not "thresholded".
                thresholded |= (0.01..=0.99).contains(&mean) && !resized;
                values.push(if mean >= 0.5 { 1.0 } else { 0.0 });
            }
        }
        Ok((Self { num_frames, height, width, values }, MaskFit { resized, thresholded, single_image }))
    }

    /// A picture of the rectangle `[x, y, width, height]`, white on black, at `height × width`: fitted as a mask file
    /// is ([`Self::for_clip`]), so that a rectangle in the source's own pixels lands where it shows.
    pub fn rectangle_picture(height: usize, width: usize, [x, y, w, h]: [usize; 4]) -> Result<InputVideo> {
        let mask = Self::rectangle((1, height, width), (x, y, w, h), 0..1)?;
        let frames = mask.values.iter().flat_map(|v| [*v; 3]).collect();
        Ok(InputVideo { frames, num_frames: 1, height, width })
    }

    /// `picture` fitted to `input` (a clip already fitted to the model: [`Self::from_picture`]) and limited to its
    /// frames `frames`; refused when it selects no pixel.
    pub fn for_clip(picture: &InputVideo, input: &InputVideo, frames: Range<usize>) -> Result<(Self, MaskFit)> {
        let (mut mask, fit) = Self::from_picture(picture, input.num_frames, input.height, input.width)?;
        let plane = input.height * input.width;
        for (f, frame) in mask.values.chunks_exact_mut(plane).enumerate() {
            if !frames.contains(&f) {
                frame.fill(0.0);
            }
        }
        if mask.area() == 0 {
            return Err(Error::InvalidRequest {
                field: "mask",
                reason: format!(
                    "the mask selects no pixel of the frames regenerated ({}..{} of the clip's {}): nothing to do",
                    frames.start,
                    frames.end.min(input.num_frames),
                    input.num_frames
                ),
            });
        }
        Ok((mask, fit))
    }

    pub(crate) fn at(&self, f: usize, y: usize, x: usize) -> f32 {
        self.values[(f * self.height + y) * self.width + x]
    }

    /// Pixels inside.
    pub fn area(&self) -> usize {
        self.values.iter().filter(|v| **v > 0.0).count()
    }

    /// The mask on the latent grid, `[T, h, w]` for `m` pixel frames per latent frame and `s × s` pixels per
    /// latent cell: 1 for a cell any of whose pixels is inside, ½ for a cell beside one (in time or space), else 0.
    pub fn latent(&self, m: usize, s: usize) -> (Vec<f32>, [usize; 3]) {
        let (t_len, h_len, w_len) = ((self.num_frames - 1) / m + 1, self.height / s, self.width / s);
        let frames = |t: usize| if t == 0 { 0..1 } else { (t - 1) * m + 1..t * m + 1 };
        let mut core = vec![false; t_len * h_len * w_len];
        for t in 0..t_len {
            for i in 0..h_len {
                for j in 0..w_len {
                    core[(t * h_len + i) * w_len + j] = frames(t)
                        .any(|f| (s * i..s * i + s).any(|y| (s * j..s * j + s).any(|x| self.at(f, y, x) > 0.0)));
                }
            }
        }
        let near = |t: usize, i: usize, j: usize| {
            let span = |c: usize, len: usize| c.saturating_sub(1)..(c + 2).min(len);
            span(t, t_len).any(|a| span(i, h_len).any(|b| span(j, w_len).any(|c| core[(a * h_len + b) * w_len + c])))
        };
        let mut latent = Vec::with_capacity(core.len());
        for t in 0..t_len {
            for i in 0..h_len {
                for j in 0..w_len {
                    latent.push(if core[(t * h_len + i) * w_len + j] {
                        1.0
                    } else if near(t, i, j) {
                        0.5
                    } else {
                        0.0
                    });
                }
            }
        }
        (latent, [t_len, h_len, w_len])
    }

    /// The blending weight of the generated pixels, `[frames, height, width]`: `min(mask, box blur of the mask)`
    /// with a window of `2r + 1` pixels, `r = max(1, min(height, width) / 64)` (the mean over the window's pixels
    /// inside the frame): 0 everywhere outside, rising to 1 within `r` pixels of the edge inside.
    pub fn alpha(&self) -> Vec<f32> {
        let (h, w) = (self.height, self.width);
        let r = (h.min(w) / 64).max(1);
        let mut alpha = Vec::with_capacity(self.values.len());
        // Per frame, the sum of the mask above and left of each corner (a summed-area table, in f64: exact for a
        // mask of 0 and 1): each window's sum in four lookups, whatever r (at 480p r is 7, a 15 × 15 window).
        let mut table = vec![0f64; (h + 1) * (w + 1)];
        for f in 0..self.num_frames {
            for y in 0..h {
                let mut row = 0.0;
                for x in 0..w {
                    row += f64::from(self.at(f, y, x));
                    table[(y + 1) * (w + 1) + x + 1] = table[y * (w + 1) + x + 1] + row;
                }
            }
            let at = |y: usize, x: usize| table[y * (w + 1) + x];
            for y in 0..h {
                for x in 0..w {
                    let m = self.at(f, y, x);
                    if m == 0.0 {
                        alpha.push(0.0);
                        continue;
                    }
                    let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(h));
                    let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(w));
                    let sum = at(y1, x1) + at(y0, x0) - at(y0, x1) - at(y1, x0);
                    let count = (y1 - y0) * (x1 - x0);
                    alpha.push(m.min(sum as f32 / count as f32));
                }
            }
        }
        alpha
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One latent frame per 4 pixel frames (after the first), 8 × 8 pixels per cell: the core where the rectangle is,
    /// halves around it, in time and space.
    #[test]
    fn the_latent_mask_covers_the_region_and_softens_its_edges() {
        let mask = RegionMask::rectangle((9, 32, 48), (16, 8, 16, 16), 2..7).unwrap();
        let (latent, dims) = mask.latent(4, 8);
        assert_eq!(dims, [3, 4, 6]);
        let at = |t: usize, i: usize, j: usize| latent[(t * 4 + i) * 6 + j];
        // Frames 2..7 are latent frames 1 (1..=4) and 2 (5..=8); rows 8..24 cells 1, 2; columns 16..32 cells 2, 3.
        for t in 1..3 {
            assert_eq!((at(t, 1, 2), at(t, 2, 3)), (1.0, 1.0));
            assert_eq!((at(t, 0, 1), at(t, 3, 4), at(t, 1, 5)), (0.5, 0.5, 0.0));
        }
        assert_eq!((at(0, 1, 2), at(0, 0, 0)), (0.5, 0.0), "frame 0 borders latent frame 1 in time");
    }

    /// Alpha is 0 outside, 1 deep inside, and in between within r pixels of the edge inside.
    #[test]
    fn alpha_is_zero_outside_and_soft_inside_the_edge() {
        let mask = RegionMask::rectangle((1, 32, 48), (16, 8, 16, 16), 0..1).unwrap();
        let alpha = mask.alpha();
        let at = |y: usize, x: usize| alpha[y * 48 + x];
        assert_eq!((at(0, 0), at(7, 20), at(8, 15)), (0.0, 0.0, 0.0));
        assert_eq!(at(16, 24), 1.0);
        assert!((at(8, 16) - 4.0 / 9.0).abs() < 1e-6, "a corner sees 4 of its 9 window pixels inside");
        assert!((at(12, 16) - 6.0 / 9.0).abs() < 1e-6);
    }

    #[test]
    fn pictures_are_thresholded_fitted_and_checked() {
        let grey = InputVideo { frames: vec![0.6; 16 * 16 * 3], num_frames: 1, height: 16, width: 16 };
        let (mask, fit) = RegionMask::from_picture(&grey, 5, 16, 16).unwrap();
        assert_eq!((mask.area(), fit), (5 * 256, MaskFit { resized: false, thresholded: true, single_image: true }));
        let (_, fit) = RegionMask::from_picture(&grey, 5, 8, 8).unwrap();
        assert!(fit.resized);
        let short = InputVideo { frames: vec![1.0; 2 * 16 * 16 * 3], num_frames: 2, height: 16, width: 16 };
        let err = RegionMask::from_picture(&short, 5, 16, 16).unwrap_err();
        assert!(err.to_string().contains("2 frames and the clip 5"), "{err}");
        let err = RegionMask::rectangle((5, 16, 16), (8, 8, 16, 4), 0..5).unwrap_err();
        assert!(err.to_string().contains("not inside"), "{err}");
    }
}
