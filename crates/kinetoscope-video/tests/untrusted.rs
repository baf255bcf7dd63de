//! Files from untrusted hands: what FFmpeg would follow to other files (playlists, concat scripts,
//! image patterns) is refused for what it holds, whatever its name; real MP4, WebM and MKV clips
//! read; and sizes past the limits are refused from the headers, before anything is decoded.
//! The small clips under tests/data/ were made with the `ffmpeg` CLI (`testsrc`, 32x32, 8 fps,
//! 5 frames): clip.webm as VP9, clip.mkv as H.264 with an Opus and a subtitle track beside it,
//! png-coded.mkv as PNG frames, subtitles.mkv a subtitle track alone.

use std::fs;
use std::path::{Path, PathBuf};

use kinetoscope_video::{
    probe, probe_with_limits, read_frames, read_frames_with_limits, read_image, read_image_with_limits, sniff,
    write_mp4, write_png, DecodeLimits, Frames, Media, VideoError,
};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// A 64x64 H.264 MP4 of `frames` frames at `path`.
fn mp4(path: &Path, frames: usize) {
    let pixels = (0..frames * 64 * 64 * 3).map(|i| (i % 251) as u8).collect();
    write_mp4(path, &Frames::new(pixels, frames, 64, 64).unwrap(), 8).unwrap();
}

/// Asserts that `err` refuses the file as `found`, and that its message names no path in `dir`.
fn assert_refused(err: VideoError, found: &str, dir: &Path) {
    assert!(err.is_refused_media(), "{err:?}");
    let VideoError::UnsupportedMedia { found: actual, .. } = &err else { panic!("not UnsupportedMedia: {err:?}") };
    assert_eq!(actual, found);
    let message = err.to_string();
    assert!(message.contains(found), "{message}");
    assert!(!message.contains(&*dir.to_string_lossy()), "the message shows a path: {message}");
}

fn assert_too_large(err: VideoError, what: &str) {
    assert!(err.is_refused_media(), "{err:?}");
    assert!(matches!(err, VideoError::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains(what), "{err}");
}

/// A video-reading refusal for both readers.
fn assert_video_refused(path: &Path, found: &str, dir: &Path) {
    assert_refused(probe(path).unwrap_err(), found, dir);
    assert_refused(read_frames(path).unwrap_err(), found, dir);
}

#[test]
fn a_playlist_naming_a_local_video_is_refused_whatever_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("private.mp4");
    mp4(&target, 2);
    let playlist = format!("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{}\n#EXT-X-ENDLIST\n", target.display());
    for name in ["upload.m3u8", "upload.mp4"] {
        let path = dir.path().join(name);
        fs::write(&path, &playlist).unwrap();
        assert_video_refused(&path, "an HLS playlist (#EXTM3U)", dir.path());
        let message = probe(&path).unwrap_err().to_string();
        assert!(message.contains("an MP4/MOV or Matroska/WebM video"), "{message}");
    }
}

#[test]
fn a_concat_script_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("private.mp4");
    mp4(&target, 2);
    let path = dir.path().join("upload.mp4");
    fs::write(&path, format!("ffconcat version 1.0\nfile '{}'\n", target.display())).unwrap();
    assert_video_refused(&path, "an FFmpeg concat script", dir.path());
}

#[test]
fn an_image_pattern_name_is_a_file_name_not_a_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let frame = Frames::new(vec![90; 8 * 8 * 3], 1, 8, 8).unwrap();
    // The frames FFmpeg's image2 demuxer would read for the pattern.
    write_png(&dir.path().join("img001.png"), &frame, 0).unwrap();
    write_png(&dir.path().join("img002.png"), &frame, 0).unwrap();
    let pattern = dir.path().join("img%03d.png");
    write_png(&pattern, &frame, 0).unwrap();
    assert_video_refused(&pattern, "a PNG image", dir.path());

    // A real clip under a name with a pattern and a protocol-like prefix reads as that one file.
    let clip = dir.path().join("concat:clip%03d.mp4");
    mp4(&clip, 3);
    assert_eq!(probe(&clip).unwrap().frames, 3);
}

#[test]
fn subtitles_and_other_non_videos_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srt = dir.path().join("upload.mp4");
    fs::write(&srt, "1\n00:00:00,000 --> 00:00:01,000\nhello\n").unwrap();
    assert_video_refused(&srt, "an SRT subtitle file", dir.path());

    let text = dir.path().join("notes.mkv");
    fs::write(&text, "just some words\n").unwrap();
    assert_video_refused(&text, "text", dir.path());

    let empty = dir.path().join("empty.mp4");
    fs::write(&empty, b"").unwrap();
    assert_video_refused(&empty, "nothing (the file is empty)", dir.path());

    let noise = dir.path().join("noise.webm");
    fs::write(&noise, [0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5]).unwrap();
    assert_video_refused(&noise, "unknown bytes 0xdeadbeef00010203", dir.path());

    // A Matroska file whose only stream is subtitles has nothing to decode.
    let err = probe(&data("subtitles.mkv")).unwrap_err();
    assert!(matches!(err, VideoError::NoVideoStream { .. }), "{err}");
    // A video stream of a codec off the list is refused before its decoder runs.
    let err = read_frames(&data("png-coded.mkv")).unwrap_err();
    assert!(matches!(&err, VideoError::UnsupportedMedia { found, .. } if found == "a video coded as png"), "{err}");
}

#[test]
fn mp4_webm_and_mkv_clips_read() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    mp4(&clip, 4);
    let info = probe(&clip).unwrap();
    assert_eq!((info.codec.as_str(), info.width, info.height, info.frames), ("h264", 64, 64, 4));

    for (name, codec) in [("clip.webm", "vp9"), ("clip.mkv", "h264")] {
        let path = data(name);
        let info = probe(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((info.codec.as_str(), info.width, info.height, info.frames), (codec, 32, 32, 5), "{name}");
        assert_eq!(info.fps, 8.0, "{name}");
        let frames = read_frames(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((frames.num_frames(), frames.height(), frames.width()), (5, 32, 32), "{name}");
        assert_eq!(sniff(&fs::read(&path).unwrap()), Media::Matroska, "{name}");
    }
    assert_eq!(sniff(&fs::read(&clip).unwrap()), Media::Mp4);
}

#[test]
fn a_video_past_the_limits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    mp4(&path, 5);
    let small = DecodeLimits { max_pixels: 32 * 32, ..DecodeLimits::default() };
    assert_too_large(probe_with_limits(&path, &small).unwrap_err(), "64x64 pixels");
    assert_too_large(read_frames_with_limits(&path, &small).unwrap_err(), "64x64 pixels");

    let few = DecodeLimits { max_frames: 4, ..DecodeLimits::default() };
    assert_too_large(probe_with_limits(&path, &few).unwrap_err(), "more than 4 frames");
    let bytes = DecodeLimits { max_rgb_bytes: 3 * 64 * 64 * 3, ..DecodeLimits::default() };
    assert_too_large(read_frames_with_limits(&path, &bytes).unwrap_err(), "at frame 4");

    let exact = DecodeLimits { max_pixels: 64 * 64, max_frames: 5, max_rgb_bytes: 5 * 64 * 64 * 3 };
    assert_eq!(read_frames_with_limits(&path, &exact).unwrap().num_frames(), 5);
}

/// CRC-32 (ISO-HDLC), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &byte| {
        (0..8).fold(crc ^ u32::from(byte), |crc, _| if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 })
    })
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

#[test]
fn a_huge_image_is_refused_from_its_header() {
    // An 11000x11000 RGB PNG header; its pixel data is a stub, so decoding it would fail as a
    // broken image rather than be refused for its size.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&11000u32.to_be_bytes());
    header.extend_from_slice(&11000u32.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &header);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c]);
    chunk(&mut png, b"IEND", &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.png");
    fs::write(&path, &png).unwrap();
    let err = read_image(&path).unwrap_err();
    assert_too_large(err, "an image of 11000x11000 pixels");

    let small = dir.path().join("small.png");
    write_png(&small, &Frames::new(vec![10; 64 * 64 * 3], 1, 64, 64).unwrap(), 0).unwrap();
    assert_eq!(read_image(&small).unwrap().width(), 64);
    let tiny = DecodeLimits { max_pixels: 32 * 32, ..DecodeLimits::default() };
    assert_too_large(read_image_with_limits(&small, &tiny).unwrap_err(), "an image of 64x64 pixels");
}

#[test]
fn images_other_than_png_jpeg_and_webp_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "a.gif",
            b"GIF89a\x01\0\x01\0\x80\0\0\0\0\0\xff\xff\xff!\xf9\x04\x01\0\0\0\0,\0\0\0\0\x01\0\x01\0\0\x02\x02D\x01\0;",
            "a GIF image",
        ),
        ("a.png", b"II*\0\x08\0\0\0", "a TIFF image"),
        ("a.webp", b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>", "an XML/HTML/SVG document"),
        ("a.jpg", b"#EXTM3U\n", "an HLS playlist (#EXTM3U)"),
    ];
    for (name, bytes, found) in cases {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let err = read_image(&path).unwrap_err();
        assert_refused(err, found, dir.path());
    }
    // A video is not an image either.
    let clip = dir.path().join("clip.png");
    mp4(&clip, 1);
    let err = read_image(&clip).unwrap_err();
    assert_eq!(err.to_string(), "the file holds an MP4/MOV video, not a PNG, JPEG or WebP image");
}
