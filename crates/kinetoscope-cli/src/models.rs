//! `kinetoscope models`: the supported models (the registry), and a pre-flight check of a model folder that
//! reads configs and safetensors headers only, so a broken download fails in seconds rather than mid-job.

use anyhow::Result;
use kinetoscope::{ModelDir, ModelManifest};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List the supported models with their recommended settings.
    List,
    /// Check that a model folder (or a Hugging Face repository id in the local cache) has every file, config
    /// and tensor the code needs, with the right shapes, without loading the weights.
    Verify {
        /// A diffusers-layout model folder, or a Hugging Face repository id found in the local cache.
        model: String,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::List => print!("{}", table(kinetoscope::models())),
        Command::Verify { model } => print!("{}", kinetoscope::verify(&ModelDir::open(&model)?)?),
    }
    Ok(())
}

fn table(models: &[ModelManifest]) -> String {
    let header = ["ID", "REPOSITORY", "SIZE", "FRAMES", "FPS", "STEPS", "GUIDANCE", "SHIFT"].map(String::from);
    let rows: Vec<[String; 8]> = models
        .iter()
        .map(|m| {
            let d = &m.defaults;
            [
                m.id.clone(),
                m.repo_id.clone(),
                format!("{}x{}", d.width, d.height),
                d.num_frames.to_string(),
                d.fps.to_string(),
                d.steps.to_string(),
                d.guidance_scale.to_string(),
                d.shift.to_string(),
            ]
        })
        .collect();
    let widths: Vec<usize> =
        (0..header.len()).map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0)).collect();
    [&header]
        .into_iter()
        .chain(&rows)
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_header_and_one_aligned_row_per_model() {
        let text = table(kinetoscope::models());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + kinetoscope::models().len());
        let repo_column = lines[0].find("REPOSITORY").unwrap();
        for (line, m) in lines[1..].iter().zip(kinetoscope::models()) {
            assert_eq!(line.find(&m.repo_id), Some(repo_column), "{text}");
            let size = format!("{}x{}", m.defaults.width, m.defaults.height);
            assert!(line.contains(&size), "{text}");
        }
    }
}
