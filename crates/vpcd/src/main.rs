//! The `vpcd` command line.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[macro_use]
mod cli;
mod ctl;
mod storecmd;

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
    /// Validate a topology file as `vpcd check` does and write it, with the provider's
    /// allocations, to the store in one transaction: the region's new desired state.
    Apply {
        /// The topology file (its lock file, if any, seeds a first apply's allocations).
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Print what would change, item by item, and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the store's desired state as a topology file (the allocations as comments).
    Get {
        #[command(flatten)]
        store: StoreArgs,
        /// Answer in JSON (revision, topology, allocations).
        #[arg(long)]
        json: bool,
        /// Write the topology to FILE and the allocations to its lock file instead.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print each host's convergence instead: the revision its daemon applied and the
        /// newest change to its share.
        #[arg(long, conflicts_with = "out")]
        hosts: bool,
    },
    /// Run one host's data plane: a TUN device per local instance, the underlay, the workers.
    Run(RunArgs),
    /// Ask a running daemon (its control socket): status, reload, stats, clear-counters,
    /// flows, trace, capture.
    Ctl {
        /// The daemon's host name (its socket is /run/vpcd/HOST.sock).
        #[arg(long, conflicts_with = "control")]
        host: Option<String>,
        /// The daemon's control socket.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Answer in JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Follow a packet through every host's decision (empty tables: a first packet), and
    /// say where it ends and which stage and rule decided.
    Trace {
        /// The topology file.
        file: PathBuf,
        #[command(flatten)]
        what: TraceOpts,
        /// Answer in JSON.
        #[arg(long)]
        json: bool,
    },
    /// A whole region on this machine, in network namespaces.
    Lab {
        #[command(subcommand)]
        command: cli::LabCommand,
    },
}

/// The store and its credentials (never from the topology).
#[derive(clap::Args, Debug, Clone)]
struct StoreArgs {
    /// The store: http://ADDR:2379, or https://ADDR:2379 (default: $VPCD_STORE).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Log in as this user (default: $VPCD_STORE_USER); the password is $VPCD_STORE_PASSWORD.
    #[arg(long, value_name = "NAME")]
    store_user: Option<String>,
    /// https: the CA certificate (PEM) the store's certificate is checked against.
    #[arg(long, value_name = "FILE")]
    store_ca: Option<PathBuf>,
    /// https: this client's certificate (PEM), with --store-key.
    #[arg(long, value_name = "FILE")]
    store_cert: Option<PathBuf>,
    /// https: this client's private key (PEM).
    #[arg(long, value_name = "FILE")]
    store_key: Option<PathBuf>,
}

impl StoreArgs {
    /// The store's options; `None` when no store is named (flag or $VPCD_STORE).
    fn opts(self) -> Option<vpcd::desired::StoreOpts> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let url = self.store.or_else(|| env("VPCD_STORE"))?;
        Some(vpcd::desired::StoreOpts {
            url,
            user: self.store_user.or_else(|| env("VPCD_STORE_USER")),
            password: env("VPCD_STORE_PASSWORD"),
            ca: self.store_ca,
            cert: self.store_cert,
            key: self.store_key,
        })
    }
}

/// `vpcd run`'s options.
#[derive(clap::Args)]
struct RunArgs {
    /// The topology file (every host reads the same one).
    #[arg(long, short, conflicts_with = "store")]
    topology: Option<PathBuf>,
    /// Follow the region's desired state in the store instead of a file.
    #[command(flatten)]
    store: StoreArgs,
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
    /// The control socket `vpcd ctl` talks to (default /run/vpcd/HOST.sock, or
    /// /run/vpcd/NETNS.sock with --netns).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

/// The packet to trace.
#[derive(clap::Args, Debug, Clone)]
struct TraceOpts {
    /// The sender: an instance's name, or `internet`.
    #[arg(long)]
    from: String,
    /// The destination: an instance's name or an IPv4 address.
    #[arg(long)]
    to: String,
    /// tcp, udp or icmp.
    #[arg(long, value_parser = ["tcp", "udp", "icmp"])]
    protocol: String,
    /// The destination port (tcp, udp).
    #[arg(long)]
    port: Option<u16>,
}

impl TraceOpts {
    fn args(self) -> vpcd::trace::TraceArgs {
        vpcd::trace::TraceArgs {
            from: self.from,
            to: self.to,
            protocol: self.protocol,
            port: self.port,
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
enum CtlCommand {
    /// The generation in force, the topology's hash, uptime, workers, the last reload, the
    /// capture running.
    Status,
    /// Re-read the topology; its errors come back here.
    Reload,
    /// The counters.
    Stats {
        /// In the Prometheus text format.
        #[arg(long)]
        prometheus: bool,
    },
    /// Zero every counter.
    ClearCounters,
    /// The load balancers' backends: healthy or not, which host checks them, the last probe
    /// error, this host's open sessions to each.
    Health,
    /// Trace a packet: this host with its live tables (connections, flow cache), the hosts
    /// after it with empty ones.
    Trace {
        #[command(flatten)]
        what: TraceOpts,
    },
    /// Write what a port sends and receives to a pcapng file (raw IPv4); with `drops`, every
    /// dropped packet, its reason and rule as the packet's comment. Answers when it is over.
    Capture {
        /// An instance of the daemon's host, `underlay`, `internet` (on the internet
        /// gateway) or `drops`.
        point: String,
        /// The pcapng file (written by the daemon, replaced if it exists).
        #[arg(short = 'w', long = "write", value_name = "FILE")]
        file: PathBuf,
        /// Stop after N packets.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after S seconds (default 10, at most 3600), whichever comes first.
        #[arg(long, value_name = "S")]
        seconds: Option<u64>,
    },
    /// The tracked connections: network, 5-tuple, state, age, time left, packets and bytes
    /// each way, cached verdict; or (`--flush`) remove them, as `conntrack -F` does.
    Flows {
        /// Only this instance's connections.
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
        /// Remove them (and the cached decisions that relied on them).
        #[arg(long)]
        flush: bool,
    },
}

impl CtlCommand {
    /// The request; a capture's file made absolute (the daemon's working directory is not
    /// this one).
    fn request(self) -> std::io::Result<vpcd::control::Request> {
        use vpcd::control::Request;
        Ok(match self {
            CtlCommand::Status => Request::Status {},
            CtlCommand::Reload => Request::Reload {},
            CtlCommand::Stats { prometheus } => Request::Stats { prometheus },
            CtlCommand::ClearCounters => Request::ClearCounters {},
            CtlCommand::Health => Request::Health {},
            CtlCommand::Flows { instance, flush } => Request::Flows { instance, flush },
            CtlCommand::Trace { what } => Request::Trace(what.args()),
            CtlCommand::Capture {
                point,
                file,
                count,
                seconds,
            } => Request::Capture {
                point,
                file: std::path::absolute(&file)?,
                count,
                seconds,
            },
        })
    }
}

/// `vpcd ctl`: the daemon's socket from `--control`, or from `--host`.
fn ctl_command(
    host: Option<String>,
    control: Option<PathBuf>,
    json: bool,
    command: CtlCommand,
) -> ExitCode {
    let path = match (control, host) {
        (Some(p), _) => p,
        (None, Some(h)) => vpcd::control::default_path(&h),
        (None, None) => {
            errln!("vpcd ctl: say which daemon: --host NAME or --control PATH");
            return ExitCode::from(2);
        }
    };
    send(&path, command, json)
}

/// `command` to the daemon at `path` (`vpcd ctl`, `vpcd lab ctl`).
fn send(path: &std::path::Path, command: CtlCommand, json: bool) -> ExitCode {
    match command.request() {
        Ok(request) => ctl::ctl(path, request, json),
        Err(e) => {
            errln!("vpcd ctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Before anything is opened, so that every descriptor above stderr is an inherited one.
    let closed = match &args.command {
        Command::Run(_) => match vpcd::daemon::close_inherited_descriptors() {
            Ok(n) => n,
            Err(e) => {
                errln!("vpcd: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => 0,
    };
    init_logging();
    match args.command {
        Command::Check { file, locked, full } => cli::check(&file, locked, full),
        Command::Apply {
            file,
            store,
            dry_run,
        } => storecmd::apply(&file, store.opts(), dry_run),
        Command::Get {
            store,
            json,
            hosts: true,
            ..
        } => storecmd::hosts(store.opts(), json),
        Command::Get {
            store, json, out, ..
        } => storecmd::get(store.opts(), json, out.as_deref()),
        Command::Lab { command } => cli::lab(command),
        Command::Trace { file, what, json } => cli::trace(&file, what.args(), json),
        Command::Ctl {
            host,
            control,
            json,
            command,
        } => ctl_command(host, control, json, command),
        Command::Run(args) => run(closed, args),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
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
}

/// `vpcd run`: one host's data plane until SIGINT or SIGTERM; `closed` inherited descriptors
/// were closed first.
fn run(closed: usize, args: RunArgs) -> ExitCode {
    // The process's name (/proc/PID/comm, what ps and pidof show): `vpcd`, also when it was
    // started as /proc/self/exe (the lab), which would make it `exe`.
    if let Err(e) = nix::sys::prctl::set_name(c"vpcd") {
        tracing::warn!(error = %e, "cannot name the process");
    }
    if closed > 0 {
        tracing::info!(closed, "closed inherited file descriptors");
    }
    let source = match (args.topology, args.store.opts()) {
        (Some(file), _) => vpcd::daemon::Source::File(file),
        (None, Some(store)) => vpcd::daemon::Source::Store(store),
        (None, None) => {
            errln!("vpcd run: say where the topology is: --topology FILE or --store URL");
            return ExitCode::from(2);
        }
    };
    #[cfg(not(feature = "store"))]
    if matches!(source, vpcd::daemon::Source::Store(_)) {
        errln!("vpcd run --store: {}", storecmd::NO_STORE);
        return ExitCode::from(2);
    }
    let netns = args.netns;
    let opts = vpcd::daemon::Options {
        source,
        host: args.host,
        workers: args.workers.unwrap_or_else(vpcd::daemon::default_workers),
        control: args
            .control
            .or_else(|| netns.as_ref().map(|ns| vpcd::control::default_path(ns))),
        stats: args.stats,
        netns,
        metrics: args.metrics,
    };
    match vpcd::daemon::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            errln!("vpcd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
