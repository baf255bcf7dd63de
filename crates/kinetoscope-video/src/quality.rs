//! Cheap quality signals of a clip, read from its frames alone, to rank several renderings of one prompt
//! (seeds) against each other. They catch the common failures of video diffusion: flicker, a still
//! picture, blown-out or crushed exposure. They don't judge content or prompt adherence; they are only
//! meaningful between candidates of the same prompt and size.
//!
//! All work on luminance `Y = 0.2126 R + 0.7152 G + 0.0722 B` (Rec. 709 weights) in [0, 1]:
//!
//! - **flicker**: how far each frame's mean luminance sits from the straight line between its two
//!   neighbours' (`|m_t − (m_{t−1} + m_{t+1}) / 2|`), averaged over the inner frames. A steady scene or a
//!   steady fade scores 0; brightness that jumps up and down from frame to frame scores high.
//! - **motion**: the mean absolute change of each pixel's luminance between consecutive frames, after
//!   removing the change of the frame's mean, so a global brightness change (flicker, a fade) doesn't count
//!   as motion.
//! - **clipping**: the fraction of channel values pinned at 0 or 255: blown highlights, crushed shadows
//!   and saturated colours that have lost their detail.
//!
//! [`QualitySignals::score`] combines them into one number in [0, 1], higher better:
//!
//! `score = 0.5 · steadiness + 0.3 · exposure + 0.2 · liveliness`, with
//! `steadiness = 1 − min(flicker / 0.02, 1)`, `exposure = 1 − clipping` and
//! `liveliness = min(motion / 0.02, 1)`.
//!
//! 0.02 of luminance is about 5 of 255 levels: a mean-brightness jitter that large is plainly visible, and
//! a per-pixel change that large between frames is clear motion. Flicker weighs most because it is the
//! failure viewers notice first; motion least and capped, because more motion is not better beyond
//! "not a still picture".

use crate::Frames;

/// Flicker or motion of this much luminance (about 5 of 255 levels) counts in full in the score.
const FULL_SCALE: f64 = 0.02;
const FLICKER_WEIGHT: f64 = 0.5;
const CLIPPING_WEIGHT: f64 = 0.3;
const MOTION_WEIGHT: f64 = 0.2;

/// The signals of one clip (see the module documentation for their definitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualitySignals {
    /// Mean jump of the frame's mean luminance beyond the line through its neighbours, in [0, 1].
    pub flicker: f64,
    /// Mean per-pixel luminance change between consecutive frames beyond the global change, in [0, 1].
    pub motion: f64,
    /// Fraction of channel values at 0 or 255, in [0, 1].
    pub clipping: f64,
}

impl QualitySignals {
    /// Measures `frames` in one pass over the pixels. A single frame has no flicker and no motion; two
    /// frames have no flicker.
    pub fn measure(frames: &Frames) -> Self {
        let pixels = (frames.height() * frames.width()) as f64;
        let mut means = Vec::with_capacity(frames.num_frames());
        let mut clipped = 0usize;
        let mut motion_sum = 0.0;
        let mut previous: Option<(Vec<f64>, f64)> = None;
        for frame in frames.iter() {
            let luma: Vec<f64> = frame.chunks_exact(3).map(luminance).collect();
            clipped += frame.iter().filter(|&&v| v == 0 || v == u8::MAX).count();
            let mean = luma.iter().sum::<f64>() / pixels;
            if let Some((prev, prev_mean)) = &previous {
                let shift = mean - prev_mean;
                motion_sum += luma.iter().zip(prev).map(|(y, p)| (y - p - shift).abs()).sum::<f64>() / pixels;
            }
            means.push(mean);
            previous = Some((luma, mean));
        }
        let flicker = if means.len() < 3 {
            0.0
        } else {
            let jumps: f64 = means.windows(3).map(|m| (m[1] - (m[0] + m[2]) / 2.0).abs()).sum();
            jumps / (means.len() - 2) as f64
        };
        let motion = if means.len() < 2 { 0.0 } else { motion_sum / (means.len() - 1) as f64 };
        QualitySignals { flicker, motion, clipping: clipped as f64 / frames.as_bytes().len() as f64 }
    }

    /// The combined score in [0, 1], higher better (weights in the module documentation).
    pub fn score(&self) -> f64 {
        let steadiness = 1.0 - (self.flicker / FULL_SCALE).min(1.0);
        let exposure = 1.0 - self.clipping;
        let liveliness = (self.motion / FULL_SCALE).min(1.0);
        FLICKER_WEIGHT * steadiness + CLIPPING_WEIGHT * exposure + MOTION_WEIGHT * liveliness
    }
}

/// Rec. 709 luminance of one RGB pixel, in [0, 1].
fn luminance(rgb: &[u8]) -> f64 {
    (0.2126 * f64::from(rgb[0]) + 0.7152 * f64::from(rgb[1]) + 0.0722 * f64::from(rgb[2])) / 255.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: usize = 9;
    const H: usize = 16;
    const W: usize = 16;

    /// A mid-grey diagonal gradient, moved `speed` pixels right per frame, brightened by `offset(frame)`
    /// levels, its values clamped to 10..=245 unless `clip` lets them reach 0 and 255.
    fn clip(speed: usize, offset: impl Fn(usize) -> i32, clip: bool) -> Frames {
        let mut data = Vec::with_capacity(F * H * W * 3);
        for f in 0..F {
            for y in 0..H {
                for x in 0..W {
                    let base = 80 + 6 * ((x + y + speed * f) % W) as i32 + offset(f);
                    let (low, high) = if clip { (0, 255) } else { (10, 245) };
                    let v = base.clamp(low, high) as u8;
                    data.extend([v, v, v]);
                }
            }
        }
        Frames::new(data, F, H, W).unwrap()
    }

    #[test]
    fn a_flickering_clip_ranks_below_a_steady_one() {
        let steady = QualitySignals::measure(&clip(1, |_| 0, false));
        let flickering = QualitySignals::measure(&clip(1, |f| if f % 2 == 0 { 8 } else { -8 }, false));
        assert!(steady.flicker < 1e-9, "{steady:?}");
        assert!(flickering.flicker > 0.05, "{flickering:?}");
        // The brightness jumps are not motion.
        assert!((flickering.motion - steady.motion).abs() < 1e-9, "{steady:?} {flickering:?}");
        assert!(flickering.score() < steady.score(), "{flickering:?} vs {steady:?}");
    }

    #[test]
    fn a_steady_fade_is_not_flicker() {
        let fade = QualitySignals::measure(&clip(1, |f| 4 * f as i32, false));
        assert!(fade.flicker < 1e-9, "{fade:?}");
    }

    #[test]
    fn clipping_is_counted_and_costs_score() {
        let clean = QualitySignals::measure(&clip(1, |_| 0, false));
        let blown = QualitySignals::measure(&clip(1, |_| 120, true));
        assert_eq!(clean.clipping, 0.0);
        assert!(blown.clipping > 0.3, "{blown:?}");
        assert!(blown.score() < clean.score(), "{blown:?} vs {clean:?}");
    }

    #[test]
    fn a_moving_clip_ranks_above_a_still_picture() {
        let still = QualitySignals::measure(&clip(0, |_| 0, false));
        let moving = QualitySignals::measure(&clip(1, |_| 0, false));
        assert_eq!((still.motion, still.flicker), (0.0, 0.0));
        assert!(moving.motion > 0.01, "{moving:?}");
        assert!(moving.score() > still.score(), "{moving:?} vs {still:?}");
    }

    #[test]
    fn one_frame_has_no_flicker_or_motion_and_scores_stay_in_range() {
        let one = QualitySignals::measure(&Frames::new(vec![0, 128, 255], 1, 1, 1).unwrap());
        assert_eq!((one.flicker, one.motion), (0.0, 0.0));
        assert!((one.clipping - 2.0 / 3.0).abs() < 1e-12);
        for signals in [one, QualitySignals { flicker: 1.0, motion: 1.0, clipping: 1.0 }] {
            assert!((0.0..=1.0).contains(&signals.score()), "{signals:?}");
        }
    }
}
