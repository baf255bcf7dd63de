use crate::VideoError;

/// A clip of RGB frames, 8 bits per channel, in one contiguous buffer shaped `[F, H, W, 3]`
/// (frame, row, column, channel): the layout the pipeline produces, so no reshuffling is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frames {
    data: Vec<u8>,
    frames: usize,
    height: usize,
    width: usize,
}

impl Frames {
    /// Wraps RGB bytes shaped `[frames, height, width, 3]`.
    pub fn new(data: Vec<u8>, frames: usize, height: usize, width: usize) -> Result<Self, VideoError> {
        check_shape(data.len(), frames, height, width)?;
        Ok(Self { data, frames, height, width })
    }

    /// Quantizes frames in [0, 1] shaped `[frames, height, width, 3]` to bytes the way
    /// diffusers' `numpy_to_pil` does: `(x * 255).round()`, after the clamp to [0, 1] that
    /// `VaeImageProcessor.denormalize` applies, with NumPy's round-half-to-even.
    ///
    /// diffusers' `export_to_video` instead truncates (`(frame * 255).astype(np.uint8)`) when
    /// handed the pipeline's default NumPy output, which darkens every pixel by half a step on
    /// average; Kinetoscope rounds, matching the `output_type="pil"` frames bit for bit.
    ///
    /// A NaN or infinity is an error: it means the decode went wrong, and clamping would turn
    /// it into a black or white frame that looks like a result.
    pub fn from_unit_f32(data: &[f32], frames: usize, height: usize, width: usize) -> Result<Self, VideoError> {
        check_shape(data.len(), frames, height, width)?;
        let frame_len = height * width * 3;
        if let Some(index) = data.iter().position(|x| !x.is_finite()) {
            return Err(VideoError::NonFinite { frame: index / frame_len, value: data[index] });
        }
        let bytes = data.iter().map(|&x| (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
        Ok(Self { data: bytes, frames, height, width })
    }

    /// Number of frames (at least 1).
    pub fn num_frames(&self) -> usize {
        self.frames
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes of one frame, `height * width * 3`.
    pub fn frame_len(&self) -> usize {
        self.height * self.width * 3
    }

    /// Frame `index` as `[H, W, 3]` bytes, or `None` past the end.
    pub fn frame(&self, index: usize) -> Option<&[u8]> {
        self.data.chunks_exact(self.frame_len()).nth(index)
    }

    /// The frames in order, each `[H, W, 3]` bytes.
    pub fn iter(&self) -> std::slice::ChunksExact<'_, u8> {
        self.data.chunks_exact(self.frame_len())
    }

    /// All frames as `[F, H, W, 3]` bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Width and height as FFmpeg and `image` want them; `check_shape` guarantees they fit.
    pub(crate) fn size_u32(&self) -> (u32, u32) {
        (self.width as u32, self.height as u32)
    }
}

fn check_shape(len: usize, frames: usize, height: usize, width: usize) -> Result<(), VideoError> {
    let too_big = |n: usize| u32::try_from(n).is_err();
    if frames == 0 || height == 0 || width == 0 || too_big(height) || too_big(width) {
        return Err(VideoError::InvalidShape { frames, height, width });
    }
    let expected = frames.checked_mul(height).and_then(|n| n.checked_mul(width)).and_then(|n| n.checked_mul(3));
    if expected != Some(len) {
        return Err(VideoError::DataLength {
            expected: expected.unwrap_or(usize::MAX),
            actual: len,
            frames,
            height,
            width,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizes_like_numpy() {
        // In f32, 0.5 * 255 = 127.5 and 0.3 * 255 = 76.5 exactly; NumPy rounds both to even.
        let data = [0.0, 1.0, -0.2, 1.7, 0.5, 0.3_f32];
        let frames = Frames::from_unit_f32(&data, 1, 1, 2).unwrap();
        assert_eq!(frames.as_bytes(), &[0, 255, 0, 255, 128, 76]);
    }

    #[test]
    fn rejects_non_finite_values_naming_the_frame() {
        let mut data = vec![0.5_f32; 2 * 2 * 2 * 3];
        data[13] = f32::NAN;
        let err = Frames::from_unit_f32(&data, 2, 2, 2).unwrap_err();
        assert!(matches!(err, VideoError::NonFinite { frame: 1, .. }), "{err}");
    }

    #[test]
    fn rejects_wrong_length_and_empty_shapes() {
        let err = Frames::new(vec![0; 10], 1, 2, 2).unwrap_err();
        assert!(matches!(err, VideoError::DataLength { expected: 12, actual: 10, .. }), "{err}");
        let err = Frames::new(Vec::new(), 0, 2, 2).unwrap_err();
        assert!(matches!(err, VideoError::InvalidShape { .. }), "{err}");
        assert!(err.to_string().contains("0 frames of 2x2"), "{err}");
    }

    #[test]
    fn iterates_frames_in_order() {
        let frames = Frames::new((0..24).collect(), 2, 2, 2).unwrap();
        assert_eq!(frames.num_frames(), 2);
        assert_eq!(frames.frame(1).unwrap()[0], 12);
        assert!(frames.frame(2).is_none());
        assert_eq!(frames.iter().count(), 2);
    }
}
