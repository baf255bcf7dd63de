//! One PNG per frame, for looking at individual frames without a video player.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};

use crate::staged::Staged;
use crate::{Frames, VideoError};

/// Writes frame `i` to `dir/frame_{i:05}.png` (`frame_00000.png`, `frame_00001.png`, ...),
/// creating `dir` if needed, and returns the paths in frame order. Each file is written under
/// a temporary name and renamed into place when complete; on an error the frames written so
/// far stay and the failed one leaves nothing behind.
pub fn write_png_frames(dir: &Path, frames: &Frames) -> Result<Vec<PathBuf>, VideoError> {
    fs::create_dir_all(dir).map_err(|source| VideoError::Io {
        action: "create the directory",
        path: dir.to_path_buf(),
        source,
    })?;
    (0..frames.num_frames())
        .map(|index| {
            let path = dir.join(format!("frame_{index:05}.png"));
            write_png(&path, frames, index)?;
            Ok(path)
        })
        .collect()
}

/// Writes frame `index` of `frames` as one PNG at `path` (a thumbnail, a poster frame), under a
/// temporary name renamed into place when complete.
pub fn write_png(path: &Path, frames: &Frames, index: usize) -> Result<(), VideoError> {
    let pixels = frames.frame(index).ok_or(VideoError::NoSuchFrame { index, frames: frames.num_frames() })?;
    let (width, height) = frames.size_u32();
    let (staged, file) = Staged::create(path)?;
    let mut writer = BufWriter::new(file);
    PngEncoder::new(&mut writer)
        .write_image(pixels, width, height, ExtendedColorType::Rgb8)
        .map_err(|source| VideoError::Png { path: path.to_path_buf(), source })?;
    writer.flush().map_err(|source| VideoError::Io { action: "write", path: staged.path().to_path_buf(), source })?;
    drop(writer);
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_numbered_frames_that_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pngs");
        let frames = Frames::new((0..2 * 3 * 4 * 3).map(|v| v as u8).collect(), 2, 3, 4).unwrap();
        let paths = write_png_frames(&out, &frames).unwrap();
        assert_eq!(paths, [out.join("frame_00000.png"), out.join("frame_00001.png")]);
        let mut names: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["frame_00000.png", "frame_00001.png"]);
        for (path, expected) in paths.iter().zip(frames.iter()) {
            let image = image::open(path).unwrap().into_rgb8();
            assert_eq!((image.width(), image.height()), (4, 3));
            assert_eq!(image.as_raw().as_slice(), expected);
        }
    }

    #[test]
    fn unusable_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let frames = Frames::new(vec![0; 12], 1, 2, 2).unwrap();
        let err = write_png_frames(&file.join("pngs"), &frames).unwrap_err();
        assert!(matches!(err, VideoError::Io { .. }), "{err}");
        assert!(err.to_string().contains("not-a-dir/pngs"), "{err}");
    }
}
