//! Frames to an H.264 MP4 with libx264, the codec and container every player and browser
//! accepts.

use std::path::Path;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg::{codec, encoder, format, frame, Dictionary, Packet, Rational};

use crate::read::probe_with_limits;
use crate::staged::Staged;
use crate::{DecodeLimits, Frames, VideoError, VideoInfo};

/// x264's constant-rate-factor mode at 18, "visually lossless" in x264's and FFmpeg's H.264
/// guides: a clip takes minutes of GPU time to generate and seconds to encode, and at a few
/// seconds long its file stays small, so spending bits here is the cheap end of the trade.
/// Preset `medium` is x264's default balance; slower presets shrink files, not artifacts.
const X264_OPTIONS: [(&str, &str); 2] = [("crf", "18"), ("preset", "medium")];

/// Writes `frames` to `path` as an H.264 (libx264) yuv420p MP4 at `fps` frames per second,
/// with its index (`moov` atom) before the media data (`+faststart`) so it plays while it
/// downloads. Frame `i` is stamped at exactly `i / fps` seconds.
///
/// The file is encoded under a temporary name in the same directory, read back and checked
/// (codec, pixel format, size, frame count), synced, and only then renamed to `path`. On any
/// error the temporary file is removed and whatever was at `path` before is left as it was.
/// Returns what the check read back.
pub fn write_mp4(path: &Path, frames: &Frames, fps: u32) -> Result<VideoInfo, VideoError> {
    crate::init()?;
    let (width, height) = (frames.width(), frames.height());
    if width % 2 != 0 || height % 2 != 0 {
        // yuv420p stores chroma at half resolution in both directions.
        return Err(VideoError::OddSize { path: path.to_path_buf(), width, height });
    }
    let rate = i32::try_from(fps)
        .ok()
        .filter(|&rate| rate > 0)
        .ok_or_else(|| VideoError::InvalidFps { path: path.to_path_buf(), fps })?;
    let codec =
        encoder::find_by_name("libx264").ok_or_else(|| VideoError::EncoderMissing { path: path.to_path_buf() })?;

    let (staged, file) = Staged::create(path)?;
    // FFmpeg reopens the file by name; our handle only reserved the name.
    drop(file);
    encode(staged.path(), frames, rate, codec).map_err(|(stage, source)| VideoError::Encode {
        path: path.to_path_buf(),
        stage,
        source,
    })?;

    let info = probe_with_limits(staged.path(), &DecodeLimits::UNLIMITED)?;
    let expected = format!("h264 yuv420p {width}x{height}, {} frames", frames.num_frames());
    let found = format!("{} {} {}x{}, {} frames", info.codec, info.pixel_format, info.width, info.height, info.frames);
    if found != expected {
        return Err(VideoError::Verify { path: path.to_path_buf(), expected, found });
    }
    staged.commit()?;
    Ok(info)
}

/// What failed, as "FFmpeg failed {stage}: {error}".
type Failure = (&'static str, ffmpeg::Error);

fn at(stage: &'static str) -> impl FnOnce(ffmpeg::Error) -> Failure {
    move |error| (stage, error)
}

fn encode(temp: &Path, frames: &Frames, rate: i32, codec: ffmpeg::Codec) -> Result<(), Failure> {
    let (width, height) = frames.size_u32();
    // The temporary name has no .mp4 extension to guess the muxer from.
    let mut output = format::output_as(temp, "mp4").map_err(at("to open the output file"))?;
    let global_header = output.format().flags().contains(format::Flags::GLOBAL_HEADER);

    // One tick of the encoder's clock is one frame, so frame i has pts i.
    let time_base = Rational::new(1, rate);
    let mut settings = codec::Context::new_with_codec(codec).encoder().video().map_err(at("to set up the encoder"))?;
    settings.set_width(width);
    settings.set_height(height);
    settings.set_format(Pixel::YUV420P);
    settings.set_time_base(time_base);
    settings.set_frame_rate(Some(Rational::new(rate, 1)));
    // swscale converts RGB to YUV with BT.601 coefficients into limited range; say so, or
    // players assume BT.709 for HD sizes and shift the colors.
    settings.set_colorspace(ffmpeg::color::Space::SMPTE170M);
    settings.set_color_range(ffmpeg::color::Range::MPEG);
    if global_header {
        settings.set_flags(codec::Flags::GLOBAL_HEADER);
    }
    let mut options = Dictionary::new();
    for (key, value) in X264_OPTIONS {
        options.set(key, value);
    }
    let mut encoder = settings.open_as_with(codec, options).map_err(at("to open the libx264 encoder"))?;

    let mut stream = output.add_stream(codec).map_err(at("to add the video stream"))?;
    stream.set_parameters(&encoder);
    stream.set_time_base(time_base);
    stream.set_avg_frame_rate(Rational::new(rate, 1));
    let stream_index = stream.index();

    let mut muxer_options = Dictionary::new();
    muxer_options.set("movflags", "+faststart");
    output.write_header_with(muxer_options).map_err(at("to write the MP4 header"))?;
    // The muxer picks its own time base while writing the header.
    let stream_time_base = output
        .stream(stream_index)
        .ok_or(("to find the video stream it added", ffmpeg::Error::StreamNotFound))?
        .time_base();
    let mut mux = |encoder: &mut encoder::Video| -> Result<(), Failure> {
        let mut packet = Packet::empty();
        loop {
            match encoder.receive_packet(&mut packet) {
                Ok(()) => {}
                Err(error) if crate::drained(error) => return Ok(()),
                Err(error) => return Err(("to encode a frame", error)),
            }
            packet.set_stream(stream_index);
            // Every frame lasts one tick; without it the last frame's duration is a guess.
            packet.set_duration(1);
            packet.rescale_ts(time_base, stream_time_base);
            packet.write_interleaved(&mut output).map_err(at("to write a packet"))?;
        }
    };

    let mut scaler = scaling::Context::get(
        Pixel::RGB24,
        width,
        height,
        Pixel::YUV420P,
        width,
        height,
        scaling::Flags::BICUBIC | scaling::Flags::ACCURATE_RND,
    )
    .map_err(at("to set up RGB to YUV conversion"))?;
    let mut rgb = frame::Video::new(Pixel::RGB24, width, height);
    let row_len = frames.width() * 3;
    for (index, pixels) in frames.iter().enumerate() {
        let stride = rgb.stride(0);
        let plane = rgb.data_mut(0);
        for (row, src) in pixels.chunks_exact(row_len).enumerate() {
            plane[row * stride..row * stride + row_len].copy_from_slice(src);
        }
        // A fresh frame each time: the encoder may still hold a reference to the last one.
        let mut yuv = frame::Video::new(Pixel::YUV420P, width, height);
        scaler.run(&rgb, &mut yuv).map_err(at("to convert RGB to YUV"))?;
        yuv.set_pts(Some(index as i64));
        encoder.send_frame(&yuv).map_err(at("to encode a frame"))?;
        mux(&mut encoder)?;
    }
    encoder.send_eof().map_err(at("to flush the encoder"))?;
    mux(&mut encoder)?;
    output.write_trailer().map_err(at("to finish the MP4 (write its index)"))
}
