//! The `vpcd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

/// vpcd: a userspace VPC data plane.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a topology file and print a summary, or every error (exit status 1).
    Check {
        /// The topology file.
        file: PathBuf,
    },
    /// Run one host's data plane: a TUN device per local instance, the underlay, the workers.
    Run {
        /// The topology file (every host reads the same one).
        #[arg(long, short)]
        topology: PathBuf,
        /// This host's name in the topology.
        #[arg(long)]
        host: String,
        /// Worker threads (default: one per core, at most 4).
        #[arg(long)]
        workers: Option<usize>,
        /// Statistics file, rewritten every second (default /run/vpcd/HOST.stats).
        #[arg(long)]
        stats: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match args.command {
        Command::Check { file } => cli::check(&file),
        Command::Run {
            topology,
            host,
            workers,
            stats,
        } => {
            let opts = vpcd::daemon::Options {
                topology,
                host,
                workers: workers.unwrap_or_else(vpcd::daemon::default_workers),
                stats,
            };
            match vpcd::daemon::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vpcd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
