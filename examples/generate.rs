//! Generating a video from Rust through the library:
//!
//! ```sh
//! cargo run --release --example generate -- models/tiny/wan21-tiny-a "a lighthouse at dusk" out.mp4
//! ```

use std::path::Path;

use kinetoscope::{GenerateRequest, LoadOptions, ModelDir, Pipeline};
use kinetoscope_video::Frames;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "models/tiny/wan21-tiny-a".into());
    let prompt = args.next().unwrap_or_else(|| "a lighthouse at dusk, waves rolling in".into());
    let output = args.next().unwrap_or_else(|| "out.mp4".into());

    let pipeline = Pipeline::load(&ModelDir::open(&model)?, &LoadOptions::default())?;
    let request =
        GenerateRequest { prompt, height: 64, width: 96, num_frames: 17, steps: 8, seed: 7, ..Default::default() };
    let video = pipeline.generate(&request)?;

    let frames = Frames::from_unit_f32(&video.frames, video.num_frames, video.height, video.width)?;
    kinetoscope_video::write_mp4(Path::new(&output), &frames, video.fps)?;
    println!("wrote {output}: {} frames of {}×{}", video.num_frames, video.width, video.height);
    Ok(())
}
