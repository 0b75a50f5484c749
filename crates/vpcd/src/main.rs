//! The `vpcd` command line.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[macro_use]
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
    /// Validate a topology file and print a summary, or every error (exit status 1). New
    /// provider allocations (basic-network addresses) are recorded in FILE's lock file.
    Check {
        /// The topology file.
        file: PathBuf,
        /// Fail instead of writing the lock file when it is out of date.
        #[arg(long)]
        locked: bool,
        /// List every host, VPC, subnet, instance and expectation (the summary shows the
        /// first few of each).
        #[arg(long)]
        full: bool,
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
        /// Enter this network namespace first.
        #[arg(long)]
        netns: Option<String>,
    },
    /// A whole region on this machine, in network namespaces.
    Lab {
        #[command(subcommand)]
        command: cli::LabCommand,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before anything is opened, so that every descriptor above stderr is an inherited one.
    let closed = match &args.command {
        Command::Run { .. } => match vpcd::daemon::close_inherited_descriptors() {
            Ok(n) => n,
            Err(e) => {
                errln!("vpcd: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => 0,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, none in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        // A log whose reader has gone is not worth a message about it (on that same stderr).
        .log_internal_errors(false)
        .init();
    match args.command {
        Command::Check { file, locked, full } => cli::check(&file, locked, full),
        Command::Lab { command } => cli::lab(command),
        Command::Run {
            topology,
            host,
            workers,
            stats,
            netns,
        } => {
            // The process's name (/proc/PID/comm, what ps and pidof show): `vpcd`, also when
            // it was started as /proc/self/exe (the lab), which would make it `exe`.
            if let Err(e) = nix::sys::prctl::set_name(c"vpcd") {
                tracing::warn!(error = %e, "cannot name the process");
            }
            if closed > 0 {
                tracing::info!(closed, "closed inherited file descriptors");
            }
            let opts = vpcd::daemon::Options {
                topology,
                host,
                workers: workers.unwrap_or_else(vpcd::daemon::default_workers),
                stats,
                netns,
            };
            match vpcd::daemon::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    errln!("vpcd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
