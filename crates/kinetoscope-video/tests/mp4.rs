//! Writes small synthetic clips and checks them with this crate's reader and with the
//! `ffprobe` binary (installed by the project's setup script; its checks are skipped, with a
//! note, where it is missing).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kinetoscope_video::{probe, read_frames, write_mp4, Frames, VideoError};

const FPS: u32 = 16;

/// A smooth gradient whose ripple drifts right and which brightens over time.
fn gradient(frames: usize, height: usize, width: usize) -> Frames {
    let mut data = Vec::with_capacity(frames * height * width * 3);
    for t in 0..frames {
        let phase = t as f32 * 0.3;
        for y in 0..height {
            for x in 0..width {
                let u = x as f32 / (width - 1) as f32;
                let v = y as f32 / (height - 1) as f32;
                let ripple = (std::f32::consts::TAU * u - phase).sin();
                data.extend_from_slice(&[0.5 + 0.4 * ripple, 0.1 + 0.8 * v, 0.25 + 0.5 * t as f32 / frames as f32]);
            }
        }
    }
    Frames::from_unit_f32(&data, frames, height, width).unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// `key=value` lines from `ffprobe`, or `None` if the binary is not installed.
fn ffprobe(path: &Path, args: &[&str]) -> Option<String> {
    let output = match Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(args)
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("note: ffprobe not found; skipping its checks (install the `ffmpeg` package)");
            return None;
        }
        Err(error) => panic!("cannot run ffprobe: {error}"),
    };
    assert!(output.status.success(), "ffprobe failed: {}", String::from_utf8_lossy(&output.stderr));
    Some(String::from_utf8(output.stdout).unwrap())
}

/// The four-letter types of the top-level MP4 boxes, in file order.
fn top_level_boxes(path: &Path) -> Vec<String> {
    let bytes = fs::read(path).unwrap();
    let mut boxes = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let size = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        boxes.push(String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned());
        let size =
            if size == 1 { u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap()) as usize } else { size };
        assert!(size >= 8, "bad box size {size} at {at}");
        at += size;
    }
    boxes
}

#[test]
fn writes_a_streamable_h264_clip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let frames = gradient(9, 32, 48);
    let info = write_mp4(&path, &frames, FPS).unwrap();

    assert_eq!(info.codec, "h264");
    assert_eq!(info.pixel_format, "yuv420p");
    assert_eq!((info.width, info.height), (48, 32));
    assert_eq!(info.frames, 9);
    assert_eq!(info.fps, 16.0);
    assert_eq!(info.duration, Some(Duration::from_micros(562_500)));
    assert_eq!(probe(&path).unwrap(), info);
    assert_eq!(names_in(dir.path()), ["clip.mp4"], "temporary file left behind");

    let boxes = top_level_boxes(&path);
    let moov = boxes.iter().position(|b| b == "moov").expect("no moov box");
    let mdat = boxes.iter().position(|b| b == "mdat").expect("no mdat box");
    assert!(moov < mdat, "moov after mdat (no faststart): {boxes:?}");

    let stream = [
        "-count_frames",
        "-show_entries",
        "stream=codec_name,pix_fmt,width,height,nb_read_frames,avg_frame_rate,color_space,color_range",
    ];
    if let Some(out) = ffprobe(&path, &stream) {
        for line in [
            "codec_name=h264",
            "pix_fmt=yuv420p",
            "width=48",
            "height=32",
            "nb_read_frames=9",
            "avg_frame_rate=16/1",
            // The matrix and range swscale converted with, so players don't guess.
            "color_space=smpte170m",
            "color_range=tv",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line} in\n{out}");
        }
    }
    if let Some(out) = ffprobe(&path, &["-show_entries", "frame=pts_time"]) {
        let mut times: Vec<f64> =
            out.lines().filter_map(|l| l.strip_prefix("pts_time=")).map(|t| t.parse().unwrap()).collect();
        times.sort_by(f64::total_cmp);
        let expected: Vec<f64> = (0..9).map(|i| f64::from(i) / f64::from(FPS)).collect();
        assert_eq!(times, expected);
    }
}

#[test]
fn decodes_back_close_to_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let frames = gradient(9, 32, 48);
    write_mp4(&path, &frames, FPS).unwrap();

    let decoded = read_frames(&path).unwrap();
    assert_eq!((decoded.num_frames(), decoded.height(), decoded.width()), (9, 32, 48));
    for (index, (a, b)) in frames.iter().zip(decoded.iter()).enumerate() {
        let mean_abs_error = a.iter().zip(b).map(|(&x, &y)| f64::from(x.abs_diff(y))).sum::<f64>() / a.len() as f64;
        assert!(mean_abs_error < 3.0, "frame {index}: mean abs error {mean_abs_error:.2}");
    }
}

#[test]
fn replaces_an_existing_file_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    fs::write(&path, b"an older render").unwrap();
    write_mp4(&path, &gradient(3, 16, 16), FPS).unwrap();
    assert_eq!(probe(&path).unwrap().frames, 3);
    assert_eq!(names_in(dir.path()), ["clip.mp4"]);
}

#[test]
fn odd_size_is_refused_naming_the_size_and_leaves_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    fs::write(&path, b"an older render").unwrap();
    let err = write_mp4(&path, &gradient(2, 32, 47), FPS).unwrap_err();
    assert!(matches!(err, VideoError::OddSize { width: 47, height: 32, .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("47x32") && message.contains("clip.mp4"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), b"an older render");
    assert_eq!(names_in(dir.path()), ["clip.mp4"]);
}

#[test]
fn zero_fps_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_mp4(&dir.path().join("clip.mp4"), &gradient(2, 16, 16), 0).unwrap_err();
    assert!(matches!(err, VideoError::InvalidFps { fps: 0, .. }), "{err}");
    assert!(names_in(dir.path()).is_empty());
}

#[test]
fn unwritable_directory_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let frames = gradient(2, 16, 16);

    // A "directory" that is a regular file: unwritable for everyone, root included.
    let file = dir.path().join("not-a-dir");
    fs::write(&file, b"").unwrap();
    let err = write_mp4(&file.join("clip.mp4"), &frames, FPS).unwrap_err();
    assert!(matches!(err, VideoError::Io { .. }), "{err}");
    assert!(err.to_string().contains("not-a-dir/.clip.mp4.tmp-"), "{err}");

    let missing = dir.path().join("missing");
    let err = write_mp4(&missing.join("clip.mp4"), &frames, FPS).unwrap_err();
    assert!(err.to_string().contains("missing/.clip.mp4.tmp-"), "{err}");
    assert_eq!(names_in(dir.path()), ["not-a-dir"]);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let read_only = dir.path().join("read-only");
        fs::create_dir(&read_only).unwrap();
        fs::set_permissions(&read_only, fs::Permissions::from_mode(0o555)).unwrap();
        if fs::write(read_only.join("probe"), b"").is_ok() {
            eprintln!("note: running with permission to write anywhere (root?); skipping the read-only directory case");
        } else {
            let err = write_mp4(&read_only.join("clip.mp4"), &frames, FPS).unwrap_err();
            assert!(err.to_string().contains("Permission denied"), "{err}");
            assert!(names_in(&read_only).is_empty());
        }
        fs::set_permissions(&read_only, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn failure_after_encoding_removes_the_temp_file_and_keeps_what_was_there() {
    // The target is a non-empty directory: the clip encodes and verifies, then the final
    // rename fails. Nothing at the target may change, and the temporary file must go.
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("clip.mp4");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), b"precious").unwrap();

    let err = write_mp4(&target, &gradient(3, 16, 16), FPS).unwrap_err();
    assert!(matches!(err, VideoError::Io { .. }), "{err}");
    assert!(err.to_string().contains("clip.mp4"), "{err}");
    assert_eq!(names_in(dir.path()), ["clip.mp4"]);
    assert_eq!(fs::read(target.join("keep")).unwrap(), b"precious");
}

#[test]
fn reading_a_broken_or_missing_video_names_it() {
    let dir = tempfile::tempdir().unwrap();
    // The start of an MP4 (a file type box) and nothing else: no index (`moov`) to read.
    let path = dir.path().join("cut.mp4");
    fs::write(&path, b"\0\0\0\x10ftypisom\0\0\x02\0").unwrap();
    let err = probe(&path).unwrap_err();
    assert!(matches!(err, VideoError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("cut.mp4"), "{err}");

    let err = read_frames(&dir.path().join("absent.mp4")).unwrap_err();
    assert!(err.to_string().contains("absent.mp4"), "{err}");
}
