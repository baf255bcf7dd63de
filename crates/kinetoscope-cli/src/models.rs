//! `kinetoscope models`: the supported models (the registry), and a pre-flight check of a model folder that
//! reads configs and safetensors headers only, so a broken download fails in seconds rather than mid-job.

use anyhow::Result;
use kinetoscope::{LoadOptions, ModelDir, ModelManifest};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List the supported models with their recommended settings and their transformer's size as released (bf16)
    /// and in each compact format (FP8 and GGUF files, or --quantize).
    List {
        /// Only the models that fit a GPU of this much memory (24GiB, 48GiB), with the formats that fit and what
        /// each needs at the model's defaults with --text-encoder cpu: the weights, and the working memory as
        /// --memory-limit estimates it (activations counted in f32, an upper bound for bf16).
        #[arg(long, value_name = "SIZE", value_parser = crate::generate::parse_memory_limit)]
        gpu_memory: Option<u64>,
    },
    /// The single-file transformers people download for each model (ComfyUI's FP8 and half-precision files,
    /// city96's GGUFs), for --transformer, with their approximate size.
    Downloads {
        /// Only the files whose model then fits a GPU of this much memory (as `list --gpu-memory`).
        #[arg(long, value_name = "SIZE", value_parser = crate::generate::parse_memory_limit)]
        gpu_memory: Option<u64>,
    },
    /// Check that a model folder (or a Hugging Face repository id in the local cache) has every file, config
    /// and tensor the code needs, with the right shapes, without loading the weights.
    Verify {
        /// A diffusers-layout model folder, or a Hugging Face repository id found in the local cache.
        model: String,
        /// A single-file transformer to check in place of the folder's (as generate's --transformer).
        #[arg(long, value_name = "FILE")]
        transformer: Option<std::path::PathBuf>,
        /// The same for a two-expert model's low-noise expert.
        #[arg(long = "transformer-2", value_name = "FILE")]
        transformer_2: Option<std::path::PathBuf>,
        /// A text encoder file to check in place of the folder's (as generate's --text-encoder-weights).
        #[arg(long, value_name = "FILE")]
        text_encoder_weights: Option<std::path::PathBuf>,
        /// A VAE file to check in place of the folder's (as generate's --vae).
        #[arg(long, value_name = "FILE")]
        vae: Option<std::path::PathBuf>,
    },
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::List { gpu_memory } => print!("{}", table(kinetoscope::models(), gpu_memory)?),
        Command::Downloads { gpu_memory } => print!("{}", downloads(kinetoscope::models(), gpu_memory)?),
        Command::Verify { model, transformer, transformer_2, text_encoder_weights, vae } => {
            let options =
                LoadOptions { transformer, transformer_2, text_encoder_weights, vae, ..LoadOptions::default() };
            print!("{}", kinetoscope::verify_with(&ModelDir::open(&model)?, &options)?)
        }
    }
    Ok(())
}

/// One line per known download: the model, the format, its size (and with `gpu_memory`, what the model then
/// needs on the GPU, only the files that fit), and where it is.
fn downloads(models: &[ModelManifest], gpu_memory: Option<u64>) -> Result<String> {
    let mut header = vec!["ID".to_string(), "FORMAT".into(), "≈GiB".into()];
    if gpu_memory.is_some() {
        header.push("GPU GiB".into());
    }
    header.push("REPOSITORY / FILE".into());
    let mut rows = Vec::new();
    for m in models {
        // Beside the transformer: the VAE and the working memory at the defaults, as `list` counts them.
        let bf16 = &m.footprints()?[0];
        let rest = bf16.gpu_bytes - bf16.transformer_bytes;
        for d in &m.downloads {
            let Some(bits) = d.bits_per_weight() else { continue };
            let bytes = m.transformer_bytes_at(bits)?;
            let mut row = vec![m.id.clone(), d.format.clone(), gib(bytes)];
            if let Some(limit) = gpu_memory {
                if bytes + rest > limit {
                    continue;
                }
                row.push(gib(bytes + rest));
            }
            row.push(format!("{}/{}", d.repo_id, d.file));
            rows.push(row);
        }
    }
    Ok(aligned(&header, &rows))
}

/// `rows` under `header`, each column as wide as its widest cell.
fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].chars().count()]).max().unwrap_or(0))
        .collect();
    [header]
        .into_iter()
        .chain(rows.iter().map(Vec::as_slice))
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect()
}

/// `bytes` in GiB, one decimal.
fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

fn table(models: &[ModelManifest], gpu_memory: Option<u64>) -> Result<String> {
    let mut header: Vec<String> =
        ["ID", "REPOSITORY", "SIZE", "FRAMES", "FPS", "STEPS", "GUIDANCE", "SHIFT"].map(String::from).to_vec();
    header.push("TRANSFORMER GiB (BF16/Q8_0/Q4_K/FP8)".into());
    if let Some(bytes) = gpu_memory {
        header
            .push(format!("FITS {} GiB (GPU GiB at the defaults, --text-encoder cpu, f32 working memory)", gib(bytes)));
    }
    let mut rows: Vec<Vec<String>> = Vec::new();
    for m in models {
        let d = &m.defaults;
        let footprints = m.footprints()?;
        let mut row = vec![
            m.id.clone(),
            m.repo_id.clone(),
            format!("{}x{}", d.width, d.height),
            d.num_frames.to_string(),
            d.fps.to_string(),
            d.steps.to_string(),
            d.guidance_scale.to_string(),
            d.shift.to_string(),
            footprints.iter().map(|f| gib(f.transformer_bytes)).collect::<Vec<_>>().join("/"),
        ];
        if let Some(bytes) = gpu_memory {
            let fits: Vec<String> = footprints
                .iter()
                .filter(|f| f.gpu_bytes <= bytes)
                .map(|f| format!("{} ({})", f.format, gib(f.gpu_bytes)))
                .collect();
            if fits.is_empty() {
                continue;
            }
            row.push(fits.join(", "));
        }
        rows.push(row);
    }
    Ok(aligned(&header, &rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compact formats shrink the transformer (Q4_K to under a third of bf16) and a smaller card lists fewer models.
    #[test]
    fn sizes_per_format_and_the_gpu_memory_filter() {
        let fourteen = kinetoscope::models().iter().find(|m| m.id == "wan2.1-t2v-14b").unwrap();
        let sizes: Vec<(&str, u64)> =
            fourteen.footprints().unwrap().iter().map(|f| (f.format, f.transformer_bytes)).collect();
        assert_eq!(sizes.iter().map(|s| s.0).collect::<Vec<_>>(), ["bf16", "q8_0", "q4_k", "fp8"]);
        let bf16 = sizes[0].1 as f64;
        assert!((28.0e9..29.0e9).contains(&bf16), "14B in bf16: {bf16}");
        assert!((sizes[2].1 as f64) < bf16 * 0.3, "{sizes:?}");
        let small = table(kinetoscope::models(), Some(24 << 30)).unwrap();
        let large = table(kinetoscope::models(), Some(80 << 30)).unwrap();
        assert!(small.lines().count() < large.lines().count(), "{small}\n{large}");
        assert!(small.contains("wan2.1-t2v-1.3b") && small.contains("q4_k ("), "{small}");
    }

    /// Every listed download has a format whose size is known, and a smaller card lists fewer.
    #[test]
    fn downloads_have_sizes_and_the_filter_applies() {
        for m in kinetoscope::models() {
            for d in &m.downloads {
                assert!(d.bits_per_weight().is_some(), "{}: {}", m.id, d.format);
            }
        }
        let all = downloads(kinetoscope::models(), None).unwrap();
        assert!(all.contains("city96/Wan2.1-T2V-14B-gguf/wan2.1-t2v-14b-Q4_K_M.gguf"), "{all}");
        let q4 = all.lines().find(|l| l.contains("wan2.1-t2v-14b-Q4_K_M")).unwrap();
        assert!(q4.contains("7.5"), "{q4}");
        let some = downloads(kinetoscope::models(), Some(40 << 30)).unwrap();
        assert!(some.lines().count() < all.lines().count() && some.contains("Q4_K_M"), "{some}");
    }

    #[test]
    fn the_table_has_a_header_and_one_aligned_row_per_model() {
        let text = table(kinetoscope::models(), None).unwrap();
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
