//! Telling what a file is from its first bytes, before any decoder sees it. FFmpeg's own probing
//! would accept whatever any of its demuxers claims (an HLS playlist, a concat script, an image
//! sequence), and some of those open other files or URLs; deciding here, from a few magic numbers,
//! keeps the choice of demuxer out of the file's hands.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::VideoError;

/// How many leading bytes [`sniff_file`] reads: enough for every signature below and for a
/// fair look at whether the start of the file is text.
pub(crate) const SNIFF_BYTES: usize = 512;

/// What a file's first bytes say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Media {
    /// An ISO base media file (MP4, MOV, 3GP, ...): a leading box such as `ftyp` or `moov`.
    Mp4,
    /// A Matroska or WebM file: the EBML magic `1A 45 DF A3`.
    Matroska,
    Png,
    Jpeg,
    /// A RIFF container of type `WEBP`.
    WebP,
    /// Anything else, described for an error message: "an HLS playlist (#EXTM3U)", "text",
    /// "unknown bytes 0x...". Describes the content only, never the file's name.
    Other(String),
}

impl fmt::Display for Media {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Media::Mp4 => "an MP4/MOV video",
            Media::Matroska => "a Matroska/WebM video",
            Media::Png => "a PNG image",
            Media::Jpeg => "a JPEG image",
            Media::WebP => "a WebP image",
            Media::Other(description) => description,
        })
    }
}

/// Top-level box types an ISO base media file may start with. QuickTime writers put `wide`,
/// `free`, `skip` or even `mdat` before `moov`; `pnot` is a QuickTime preview.
const LEADING_BOXES: [&[u8; 4]; 7] = [b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"];

/// Binary signatures of formats that are refused, with how the refusal names them. Only formats
/// someone might plausibly upload are listed; anything else is "unknown bytes".
const OTHER_SIGNATURES: [(&[u8], &str); 13] = [
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\0", "a TIFF image"),
    (b"MM\0*", "a TIFF image"),
    (b"\0\0\x01\0", "an ICO image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"OggS", "an Ogg file"),
    (b"FLV", "an FLV video"),
    (b"ID3", "an MP3 audio file"),
    (b"fLaC", "a FLAC audio file"),
    (b"\0\0\x01\xba", "an MPEG program stream"),
    (b"\0\0\0\x01", "a raw video bitstream without a container"),
];

/// Says what `bytes`, the start of a file, are. Pure and total: any input gets an answer.
pub fn sniff(bytes: &[u8]) -> Media {
    if bytes.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        return Media::Matroska;
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Media::Png;
    }
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        return Media::Jpeg;
    }
    if bytes.len() >= 12 && bytes.starts_with(b"RIFF") {
        return match &bytes[8..12] {
            b"WEBP" => Media::WebP,
            b"AVI " => Media::Other("an AVI video".into()),
            b"WAVE" => Media::Other("a WAV audio file".into()),
            _ => Media::Other("a RIFF file".into()),
        };
    }
    if is_iso_box(bytes) {
        return Media::Mp4;
    }
    if let Some((_, name)) = OTHER_SIGNATURES.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return Media::Other((*name).into());
    }
    // An MPEG transport stream: a sync byte every 188 bytes.
    if bytes.len() > 188 && bytes[0] == 0x47 && bytes[188] == 0x47 {
        return Media::Other("an MPEG-TS stream".into());
    }
    if bytes.is_empty() {
        return Media::Other("nothing (the file is empty)".into());
    }
    match text(bytes) {
        Some(text) => Media::Other(describe_text(text).into()),
        None => Media::Other(format!("unknown bytes 0x{}", hex(&bytes[..bytes.len().min(8)]))),
    }
}

/// Reads the first [`SNIFF_BYTES`] of `path` and sniffs them.
pub(crate) fn sniff_file(path: &Path) -> Result<Media, VideoError> {
    let io_error = |action| move |source| VideoError::Io { action, path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io_error("open"))?;
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    file.take(SNIFF_BYTES as u64).read_to_end(&mut head).map_err(io_error("read"))?;
    Ok(sniff(&head))
}

/// Whether `bytes` start with a plausible top-level ISO box: a known type and a size that is
/// 0 (to the end of the file), 1 (a 64-bit size follows) or at least the 8 header bytes.
fn is_iso_box(bytes: &[u8]) -> bool {
    let Some((size, kind)) = bytes.get(..4).zip(bytes.get(4..8)) else { return false };
    let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]);
    if !(size == 0 || size == 1 || size >= 8) || !LEADING_BOXES.iter().any(|known| &known[..] == kind) {
        return false;
    }
    // A file type box names its major brand in printable ASCII (isom, mp42, qt, 3gp5, ...).
    kind != b"ftyp" || bytes.get(8..12).is_some_and(|brand| brand.iter().all(|b| (0x20..0x7f).contains(b)))
}

/// `bytes` as text if they look like it: valid UTF-8 (allowing a character cut at the end of
/// the window) without control characters other than whitespace.
fn text(bytes: &[u8]) -> Option<&str> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        // A multi-byte character cut off by the end of the sniffed window.
        Err(error) if error.error_len().is_none() => std::str::from_utf8(&bytes[..error.valid_up_to()]).ok()?,
        Err(_) => return None,
    };
    text.chars().all(|c| !c.is_control() || c.is_whitespace()).then_some(text)
}

/// Names the kinds of text that FFmpeg would treat as media (playlists, scripts, subtitles)
/// and those a user might mistake for one.
fn describe_text(text: &str) -> &'static str {
    let start = text.trim_start_matches('\u{feff}').trim_start();
    let head = |prefix: &str| start.get(..prefix.len()).is_some_and(|s| s.eq_ignore_ascii_case(prefix));
    if head("#EXTM3U") {
        "an HLS playlist (#EXTM3U)"
    } else if head("ffconcat version") {
        "an FFmpeg concat script"
    } else if head("WEBVTT") {
        "a WebVTT subtitle file"
    } else if head("[Script Info]") {
        "an ASS/SSA subtitle file"
    } else if text.contains("-->") {
        "an SRT subtitle file"
    } else if head("<?xml") || head("<svg") || head("<!DOCTYPE") || head("<html") {
        "an XML/HTML/SVG document"
    } else {
        "text"
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(bytes: &[u8]) -> String {
        match sniff(bytes) {
            Media::Other(description) => description,
            media => panic!("{bytes:?} sniffed as {media:?}"),
        }
    }

    #[test]
    fn recognizes_the_accepted_formats() {
        assert_eq!(sniff(b"\0\0\0\x20ftypisom\0\0\x02\0"), Media::Mp4);
        assert_eq!(sniff(b"\0\0\0\x08wide\0\0\0\x10mdat"), Media::Mp4);
        assert_eq!(sniff(&[0x1a, 0x45, 0xdf, 0xa3, 0x9f]), Media::Matroska);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"), Media::Png);
        assert_eq!(sniff(&[0xff, 0xd8, 0xff, 0xe0]), Media::Jpeg);
        assert_eq!(sniff(b"RIFF\x10\0\0\0WEBPVP8 "), Media::WebP);
    }

    #[test]
    fn names_what_it_refuses() {
        assert_eq!(other(b"#EXTM3U\n#EXT-X-ENDLIST\n"), "an HLS playlist (#EXTM3U)");
        assert_eq!(other(b"\xef\xbb\xbf #extm3u\n"), "an HLS playlist (#EXTM3U)");
        assert_eq!(other(b"ffconcat version 1.0\nfile 'a.mp4'\n"), "an FFmpeg concat script");
        assert_eq!(other(b"1\n00:00:01,000 --> 00:00:02,000\nhi\n"), "an SRT subtitle file");
        assert_eq!(other(b"GIF89a\x01\0\x01\0"), "a GIF image");
        assert_eq!(other(b"plain words"), "text");
        assert_eq!(other(b""), "nothing (the file is empty)");
        assert_eq!(other(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]), "unknown bytes 0x0001020304050607");
        // The right box type with an impossible size, or an unprintable brand, is no MP4.
        assert!(matches!(sniff(b"\0\0\0\x04ftypisom"), Media::Other(_)));
        assert!(matches!(sniff(b"\0\0\0\x20ftyp\x01\x02\x03\x04"), Media::Other(_)));
        // Text cut in the middle of a character is still text.
        assert_eq!(other("caf\u{e9}".as_bytes().split_last().unwrap().1), "text");
    }
}
