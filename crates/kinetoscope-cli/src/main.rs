//! `kinetoscope`: generate videos from prompts on this machine, one at a time or in batches.

mod batch;
mod generate;
mod manifest;
mod output;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kinetoscope", version, about = "Self-hosted text-to-video (Wan 2.1), offline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one video from a prompt and write it as MP4, with a JSON sidecar of every setting.
    Generate(generate::Args),
    /// Render every item of a JSON Lines manifest into a folder: resumable, and sharded across
    /// processes (--shard I/N, or a Kubernetes Indexed Job's or Slurm array's index).
    Batch(batch::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KINETOSCOPE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
