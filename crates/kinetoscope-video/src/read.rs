//! Reading a video back: what it is (for checks after writing) and its frames as RGB (for
//! video-to-video input).
//!
//! Videos may come from anyone, so they are opened as FFmpeg would open a trusted file only after
//! their first bytes show an MP4/MOV or Matroska/WebM file, and then with that one demuxer, the
//! `file` protocol alone and only the decoders of [`VIDEO_CODECS`]: no playlist, script or image
//! pattern gets to name other files or URLs for FFmpeg to open.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;
use std::time::Duration;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg::{codec, decoder, ffi, format, frame, media, Dictionary, Packet};

use crate::limits::Budget;
use crate::sniff::{sniff_file, Media};
use crate::{DecodeLimits, Frames, VideoError};

/// What an untrusted video must be, as refusals say.
const ACCEPTED_VIDEO: &str = "an MP4/MOV or Matroska/WebM video";

/// The codecs whose decoders may run on an untrusted video: what phones, cameras, browsers and
/// encoders write today. Every other decoder (subtitles, data, images, legacy video) stays off.
const VIDEO_CODECS: [codec::Id; 6] =
    [codec::Id::H264, codec::Id::HEVC, codec::Id::VP8, codec::Id::VP9, codec::Id::AV1, codec::Id::MPEG4];

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

/// Describes the best video stream of `path` within the default [`DecodeLimits`], decoding every
/// frame to count them (which also proves the file decodes to the end).
pub fn probe(path: &Path) -> Result<VideoInfo, VideoError> {
    probe_with_limits(path, &DecodeLimits::default())
}

/// [`probe`] within `limits`: a clip that [`read_frames_with_limits`] would refuse for its size
/// is refused here too.
pub fn probe_with_limits(path: &Path, limits: &DecodeLimits) -> Result<VideoInfo, VideoError> {
    decode(path, limits, |_| Ok(()))
}

/// Decodes every frame of the best video stream of `path` to RGB, 8 bits per channel, within
/// the default [`DecodeLimits`].
pub fn read_frames(path: &Path) -> Result<Frames, VideoError> {
    read_frames_with_limits(path, &DecodeLimits::default())
}

/// [`read_frames`] within `limits`, checked from the stream's parameters before decoding and
/// again for every frame decoded.
pub fn read_frames_with_limits(path: &Path, limits: &DecodeLimits) -> Result<Frames, VideoError> {
    let mut scaler: Option<scaling::Context> = None;
    let mut rgb = frame::Video::empty();
    let mut data = Vec::new();
    let info = decode(path, limits, |yuv| {
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
    limits: &DecodeLimits,
    mut on_frame: impl FnMut(&frame::Video) -> Result<(), VideoError>,
) -> Result<VideoInfo, VideoError> {
    crate::init()?;
    let fail = |stage| move |source| decode_error(path, stage, source);
    let mut input = open(path, limits)?;
    let stream = input
        .streams()
        .best(media::Type::Video)
        .ok_or_else(|| VideoError::NoVideoStream { path: path.to_path_buf() })?;
    let parameters = stream.parameters();
    let id = parameters.id();
    if !VIDEO_CODECS.contains(&id) {
        return Err(VideoError::UnsupportedMedia {
            found: format!("a video coded as {}", id.name()),
            expected: "a video coded as H.264, HEVC, VP8, VP9, AV1 or MPEG-4",
        });
    }
    // Again after probing: the decoders' view of the bitstream may differ from the header's.
    let (width, height) = coded_size(&parameters);
    limits.check_size("a video frame", width, height)?;
    let index = stream.index();
    let fps = f64::from(stream.avg_frame_rate());
    let duration = if stream.duration() > 0 {
        seconds(stream.duration() as f64 * f64::from(stream.time_base()))
    } else {
        seconds(input.duration() as f64 / f64::from(ffi::AV_TIME_BASE))
    };
    let codec = decoder::find(id).ok_or(ffmpeg::Error::DecoderNotFound).map_err(fail("to find a decoder"))?;
    let mut decoder = codec::Context::from_parameters(parameters)
        .and_then(|context| context.decoder().open_as_with(codec, max_pixels(limits)))
        .and_then(|opened| opened.video())
        .map_err(fail("to open the decoder"))?;

    let mut budget = Budget::new(limits);
    let mut decoded = frame::Video::empty();
    let mut drain = |decoder: &mut decoder::Video| -> Result<(), VideoError> {
        loop {
            match decoder.receive_frame(&mut decoded) {
                Ok(()) => {
                    budget.take(decoded.width(), decoded.height())?;
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
        frames: budget.frames(),
        fps,
        duration,
    })
}

/// Opens `path` for reading if its bytes show a container this crate accepts, with the one
/// demuxer for it, and reads its stream parameters within `limits`.
fn open(path: &Path, limits: &DecodeLimits) -> Result<format::context::Input, VideoError> {
    let demuxer = match sniff_file(path)? {
        Media::Mp4 => c"mov",
        Media::Matroska => c"matroska",
        other => return Err(VideoError::UnsupportedMedia { found: other.to_string(), expected: ACCEPTED_VIDEO }),
    };
    let fail = |stage| move |source| decode_error(path, stage, source);
    let mut input = open_as(path, demuxer).map_err(fail("to open the file"))?;
    // Refuse an oversized video from its headers alone, before any decoder allocates a frame.
    for stream in input.streams() {
        let (width, height) = coded_size(&stream.parameters());
        limits.check_size("a video frame", width, height)?;
    }
    find_stream_info(&mut input, limits).map_err(fail("to read the stream parameters"))?;
    Ok(input)
}

/// `avformat_open_input` on `path` with exactly the demuxer named `demuxer`, never one FFmpeg
/// would guess, and options that keep it to this one local file.
fn open_as(path: &Path, demuxer: &CStr) -> Result<format::context::Input, ffmpeg::Error> {
    // "file:" so that a name such as `http:x` or `concat:a|b` is a local file name, not a protocol.
    let mut url = b"file:".to_vec();
    url.extend_from_slice(path.as_os_str().as_encoded_bytes());
    let url = CString::new(url).map_err(|_| ffmpeg::Error::Other { errno: ffmpeg::error::EINVAL })?;
    let mut options = Dictionary::new();
    options.set("protocol_whitelist", "file");
    options.set("format_whitelist", demuxer.to_str().expect("demuxer names are ASCII"));
    // External data references (MOV `dref` boxes naming other files): FFmpeg's default is off, but
    // opening other files is what this guards against, so say so.
    options.set("enable_drefs", "0");
    // What avformat_find_stream_info may decode: only the decoders this crate would use itself.
    options.set("codec_whitelist", &decoder_names());
    // SAFETY: every pointer passed is valid for the call; on failure avformat_open_input frees the
    // context it allocated, and on success `Input` owns it (closing it when dropped). The options it
    // did not consume are handed back and freed by `Dictionary::own`.
    unsafe {
        let format = ffi::av_find_input_format(demuxer.as_ptr());
        if format.is_null() {
            return Err(ffmpeg::Error::DemuxerNotFound);
        }
        let mut context = ptr::null_mut();
        let mut options = options.disown();
        let opened = ffi::avformat_open_input(&mut context, url.as_ptr(), format, &mut options);
        drop(Dictionary::own(options));
        if opened < 0 {
            return Err(ffmpeg::Error::from(opened));
        }
        let input = format::context::Input::wrap(context);
        // FFmpeg uses the format given; checked all the same, as everything rests on it.
        if (*context).iformat != format {
            return Err(ffmpeg::Error::InvalidData);
        }
        Ok(input)
    }
}

/// `avformat_find_stream_info` with every stream's probing decoder held to the pixel cap (the
/// helper in `ffmpeg-next` passes no options).
fn find_stream_info(input: &mut format::context::Input, limits: &DecodeLimits) -> Result<(), ffmpeg::Error> {
    // SAFETY: `input` is an open context; the option array has one dictionary per stream, as
    // avformat_find_stream_info reads it, and each is freed afterwards by `Dictionary::own`.
    unsafe {
        let context = input.as_mut_ptr();
        let mut options: Vec<_> = (0..(*context).nb_streams).map(|_| max_pixels(limits).disown()).collect();
        let found = ffi::avformat_find_stream_info(context, options.as_mut_ptr());
        for dictionary in options {
            drop(Dictionary::own(dictionary));
        }
        if found < 0 {
            return Err(ffmpeg::Error::from(found));
        }
    }
    Ok(())
}

/// A stream's frame size as its parameters state it (0x0 for a stream without pictures).
fn coded_size(parameters: &codec::Parameters) -> (u32, u32) {
    // SAFETY: `parameters` wraps a live AVCodecParameters; ffmpeg-next has no getter for its size.
    let (width, height) = unsafe { ((*parameters.as_ptr()).width, (*parameters.as_ptr()).height) };
    (width.max(0) as u32, height.max(0) as u32)
}

/// Decoder options that make it refuse, before allocating, a frame over the pixel cap. FFmpeg
/// takes at most `INT_MAX` (its default, "no cap" for this crate's purposes).
fn max_pixels(limits: &DecodeLimits) -> Dictionary<'static> {
    let mut options = Dictionary::new();
    options.set("max_pixels", &limits.max_pixels.min(i32::MAX as u64).to_string());
    options
}

/// The names of the decoders FFmpeg picks for [`VIDEO_CODECS`], as `codec_whitelist` takes them.
fn decoder_names() -> String {
    VIDEO_CODECS
        .iter()
        .filter_map(|&id| decoder::find(id))
        .map(|codec| codec.name().to_owned())
        .collect::<Vec<_>>()
        .join(",")
}

fn seconds(value: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(value).ok().filter(|d| !d.is_zero())
}

fn pixel_format_name(format: Pixel) -> String {
    format.descriptor().map_or_else(|| format!("{format:?}"), |d| d.name().to_owned())
}
