//! The batch manifest (JSON Lines) of `kinetoscope batch`. Its parser lives in the binary crate, so it is
//! compiled in here by path.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kinetoscope-cli/src/manifest.rs"]
mod manifest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // An `image` is resolved against the manifest's folder and must name a file: a folder with none.
    let folder = std::env::temp_dir().join("kinetoscope-fuzz-manifest");
    match manifest::parse(text, &folder, &kinetoscope::GenerateRequest::default()) {
        Ok(items) => {
            for item in items {
                // Ids become file names.
                assert!(!item.id.is_empty() && !item.id.starts_with('.'), "{:?}", item.id);
                assert!(!item.id.contains(['/', '\\', '\0']), "{:?}", item.id);
                assert!(item.line >= 1 && item.request.fps > 0, "line {}", item.line);
                // A VACE line takes no image; its scale is a number; a last image needs a first.
                assert!(!(item.vace() && item.image.is_some()), "line {}", item.line);
                assert!(item.conditioning_scale.is_finite(), "line {}", item.line);
                assert!(item.last_image.is_none() || item.image.is_some(), "line {}", item.line);
                std::hint::black_box((item.preset, item.image, item.control_video, item.reference_images));
            }
        }
        Err(errors) => {
            for error in errors {
                std::hint::black_box((error.to_string(), error.field));
            }
        }
    }
});
