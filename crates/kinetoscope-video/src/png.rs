//! Still images: one PNG per frame, for looking at individual frames without a video player, and reading
//! an image (the first frame of an image-to-video generation).

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageFormat, ImageReader};

use crate::sniff::{sniff_file, Media};
use crate::staged::Staged;
use crate::{DecodeLimits, Frames, VideoError};

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

/// What [`read_image`] accepts, as refusals say.
const ACCEPTED_IMAGE: &str = "a PNG, JPEG or WebP image";

/// Reads a PNG, JPEG or WebP image (the format told by its bytes, not its name) as one RGB frame
/// within the default [`DecodeLimits`]; alpha is dropped and 16-bit channels are rounded to 8.
pub fn read_image(path: &Path) -> Result<Frames, VideoError> {
    read_image_with_limits(path, &DecodeLimits::default())
}

/// [`read_image`] within `limits.max_pixels`: the size is read from the image's header and
/// refused before any pixel is decoded, and the decoder itself is held to that size and to the
/// memory its largest form (16-bit RGBA) takes, twice over for its working buffers.
pub fn read_image_with_limits(path: &Path, limits: &DecodeLimits) -> Result<Frames, VideoError> {
    let format = match sniff_file(path)? {
        Media::Png => ImageFormat::Png,
        Media::Jpeg => ImageFormat::Jpeg,
        Media::WebP => ImageFormat::WebP,
        other => return Err(VideoError::UnsupportedMedia { found: other.to_string(), expected: ACCEPTED_IMAGE }),
    };
    let read_error = |source| match source {
        // The decoder's own limits (a side or an allocation past the cap) tripped before the header check
        // below could name the size.
        image::ImageError::Limits(error) => {
            VideoError::TooLarge { what: format!("an image ({error})"), limit: format!("{} pixels", limits.max_pixels) }
        }
        source => VideoError::ImageRead { path: path.to_path_buf(), source },
    };
    let reader = || -> Result<_, VideoError> {
        let file =
            File::open(path).map_err(|source| VideoError::Io { action: "open", path: path.to_path_buf(), source })?;
        let mut reader = ImageReader::with_format(BufReader::new(file), format);
        let mut decoder_limits = image::Limits::default();
        decoder_limits.max_image_width = Some(limits.max_side());
        decoder_limits.max_image_height = Some(limits.max_side());
        decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
        reader.limits(decoder_limits);
        Ok(reader)
    };
    // The header alone first; decoding opens the file afresh, as the reader is used up.
    let (width, height) = reader()?.into_dimensions().map_err(read_error)?;
    limits.check_size("an image", width, height)?;
    let rgb = reader()?.decode().map_err(read_error)?.to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    Frames::new(rgb.into_raw(), 1, height, width)
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

    #[test]
    fn an_image_reads_back_as_the_frame_written() -> Result<(), VideoError> {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..4 * 6 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let frames = Frames::new(data.clone(), 1, 4, 6)?;
        let path = dir.path().join("still.png");
        write_png(&path, &frames, 0)?;
        let read = read_image(&path)?;
        assert_eq!((read.num_frames(), read.height(), read.width()), (1, 4, 6));
        assert_eq!(read.as_bytes(), &data[..]);
        Ok(())
    }

    #[test]
    fn a_file_that_is_no_image_is_refused_for_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.png");
        fs::write(&path, b"not an image").unwrap();
        let err = read_image(&path).unwrap_err();
        assert!(matches!(err, VideoError::UnsupportedMedia { .. }) && err.is_refused_media(), "{err}");
        // Told to whoever sent the file, so no path.
        assert_eq!(err.to_string(), "the file holds text, not a PNG, JPEG or WebP image");
    }

    #[test]
    fn a_broken_image_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.png");
        write_png(&path, &Frames::new(vec![7; 4 * 4 * 3], 1, 4, 4).unwrap(), 0).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_image(&path).unwrap_err();
        assert!(matches!(err, VideoError::ImageRead { .. }), "{err}");
        assert!(err.to_string().contains("cut.png"), "{err}");
    }
}
