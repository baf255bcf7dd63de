//! `kinetoscope`: generate videos from a prompt on this machine.

mod generate;

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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KINETOSCOPE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
