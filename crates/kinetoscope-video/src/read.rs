//! Reading a video back: what it is (for checks after writing) and its frames as RGB (for
//! video-to-video input).

use std::path::Path;
use std::time::Duration;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg::{codec, format, frame, media, Packet};

use crate::{Frames, VideoError};

/// What a video file holds, as FFmpeg reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    /// Codec name, e.g. `h264`.
    pub codec: String,
    /// Pixel format name, e.g. `yuv420p`.
    pub pixel_format: String,
    pub width: u32,
    pub height: u32,
    /// Frames actually decoded, not the count the container claims.
    pub frames: usize,
    /// Average frame rate the container states.
    pub fps: f64,
    /// Duration of the video stream (or, if the stream states none, of the container).
    pub duration: Option<Duration>,
}

/// Describes the first video stream of `path`, decoding every frame to count them (which also
/// proves the file decodes to the end).
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    decode(path, |_| Ok(()))
}

/// Decodes every frame of the first video stream of `path` to RGB, 8 bits per channel.
pub fn read_frames(path: &Path) -> Result<Frames, VideoError> {
    let mut scaler: Option<scaling::Context> = None;
    let mut rgb = frame::Video::empty();
    let mut data = Vec::new();
    let info = decode(path, |yuv| {
        let scaler = match &mut scaler {
            Some(scaler) => scaler,
            None => scaler.insert(
                scaling::Context::get(
                    yuv.format(),
                    yuv.width(),
                    yuv.height(),
                    Pixel::RGB24,
                    yuv.width(),
                    yuv.height(),
                    scaling::Flags::BICUBIC | scaling::Flags::ACCURATE_RND | scaling::Flags::FULL_CHR_H_INT,
                )
                .map_err(|source| decode_error(path, "to set up YUV to RGB conversion", source))?,
            ),
        };
        // Fails with InputChanged if a later frame differs in size or format from the first.
        scaler.run(yuv, &mut rgb).map_err(|source| decode_error(path, "to convert a frame to RGB", source))?;
        let row_len = rgb.width() as usize * 3;
        let stride = rgb.stride(0);
        for row in rgb.data(0).chunks(stride).take(rgb.height() as usize) {
            data.extend_from_slice(&row[..row_len]);
        }
        Ok(())
    })?;
    if info.frames == 0 {
        return Err(VideoError::NoFrames { path: path.to_path_buf() });
    }
    Frames::new(data, info.frames, info.height as usize, info.width as usize)
}

fn decode_error(path: &Path, stage: &'static str, source: ffmpeg::Error) -> VideoError {
    VideoError::Decode { path: path.to_path_buf(), stage, source }
}

/// Demuxes and decodes the best video stream of `path`, handing each frame to `on_frame`.
fn decode(
    path: &Path,
    mut on_frame: impl FnMut(&frame::Video) -> Result<(), VideoError>,
) -> Result<VideoInfo, VideoError> {
    crate::init()?;
    let fail = |stage| move |source| decode_error(path, stage, source);
    let mut input = format::input(path).map_err(fail("to open the file"))?;
    let stream = input
        .streams()
        .best(media::Type::Video)
        .ok_or_else(|| VideoError::NoVideoStream { path: path.to_path_buf() })?;
    let index = stream.index();
    let fps = f64::from(stream.avg_frame_rate());
    let duration = if stream.duration() > 0 {
        seconds(stream.duration() as f64 * f64::from(stream.time_base()))
    } else {
        seconds(input.duration() as f64 / f64::from(ffmpeg::ffi::AV_TIME_BASE))
    };
    let mut decoder = codec::Context::from_parameters(stream.parameters())
        .and_then(|context| context.decoder().video())
        .map_err(fail("to open the decoder"))?;

    let mut frames = 0;
    let mut decoded = frame::Video::empty();
    let mut drain = |decoder: &mut ffmpeg::decoder::Video| -> Result<(), VideoError> {
        loop {
            match decoder.receive_frame(&mut decoded) {
                Ok(()) => {
                    frames += 1;
                    on_frame(&decoded)?;
                }
                Err(error) if crate::drained(error) => return Ok(()),
                Err(error) => return Err(fail("to decode a frame")(error)),
            }
        }
    };
    loop {
        // A fresh packet per read: av_read_frame overwrites the packet without releasing the buffer it
        // held, so reusing one leaks every packet but the last (a few KB per video, found by
        // benches/server_soak.rs); dropping a Packet releases its buffer.
        let mut packet = Packet::empty();
        match packet.read(&mut input) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => break,
            Err(error) => return Err(fail("to read a packet")(error)),
        }
        if packet.stream() == index {
            decoder.send_packet(&packet).map_err(fail("to decode a packet"))?;
            drain(&mut decoder)?;
        }
    }
    decoder.send_eof().map_err(fail("to flush the decoder"))?;
    drain(&mut decoder)?;

    Ok(VideoInfo {
        codec: decoder.id().name().to_owned(),
        pixel_format: pixel_format_name(decoder.format()),
        width: decoder.width(),
        height: decoder.height(),
        frames,
        fps,
        duration,
    })
}

fn seconds(value: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(value).ok().filter(|d| !d.is_zero())
}

fn pixel_format_name(format: Pixel) -> String {
    format.descriptor().map_or_else(|| format!("{format:?}"), |d| d.name().to_owned())
}
