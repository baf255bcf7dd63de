//! `kinetoscope`: generate videos from prompts on this machine, one at a time or in batches.

mod batch;
mod edit;
mod generate;
mod manifest;
mod models;
mod output;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kinetoscope",
    version,
    about = "Self-hosted text- and image-to-video (Wan 2.1 T2V, I2V and FLF2V; Wan 2.2 TI2V, T2V-A14B and I2V-A14B), \
             offline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value per process, parsed once from the command line: the variants' sizes don't matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Generate one video from a prompt (and an image, for image-to-video) and write it as MP4, with a JSON sidecar
    /// of every setting.
    Generate(generate::Args),
    /// Render every item of a JSON Lines manifest into a folder: resumable, and sharded across
    /// processes (--shard I/N, or a Kubernetes Indexed Job's or Slurm array's index).
    Batch(batch::Args),
    /// Serve the OpenAI Videos API over HTTP: durable jobs, progress events and signed webhooks.
    Serve(serve::Args),
    /// Render jobs from a job store shared with `serve --no-worker` API nodes (PostgreSQL): one of any number of
    /// workers on any number of machines.
    Worker(serve::WorkerArgs),
    /// List the supported models, or check a model folder before a long job.
    Models(models::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A server's log is how its operator sees it working; a command's only speaks up on errors.
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Worker(_)) { "info" } else { "error" };
    let filter = tracing_subscriber::EnvFilter::builder()
        .with_env_var("KINETOSCOPE_LOG")
        .with_default_directive(default_level.parse().expect("a valid level"))
        .from_env_lossy();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => serve::run_worker(args),
        Command::Models(args) => models::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
