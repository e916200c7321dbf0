//! The `grex` command line: `serve` and `dev` run nodes; `module`, `job`, `item`, `canary`,
//! `status` and `top` are clients of a running node (`--node URL` or `GREX_NODE`).
//!
//! Client commands print results on stdout (a job's output bytes exactly as the job returned
//! them) and errors on stderr, exiting non-zero, so they compose in scripts.

mod bench;
mod client;
mod new;
mod server;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The node URL client commands use when neither `--node` nor `GREX_NODE` is given.
pub const DEFAULT_NODE_URL: &str = "http://127.0.0.1:7070";

#[derive(Parser)]
#[command(name = "grex", version, about = "Buckets of items on disk, with sandboxed wasm jobs next to the data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve(server::ServeArgs),
    /// Run a local cluster on loopback with the example jobs loaded.
    Dev(server::DevArgs),
    /// Create a cluster: its id, flock count, CA and this node's identity.
    Init(server::InitArgs),
    /// Cluster administration.
    #[command(subcommand)]
    Cluster(server::ClusterCommand),
    /// Show the flock map.
    #[command(subcommand)]
    Flock(client::FlockCommand),
    /// Make a new job project that builds without editing.
    New(new::NewArgs),
    /// Upload and list modules.
    #[command(subcommand)]
    Module(client::ModuleCommand),
    /// Run jobs.
    #[command(subcommand)]
    Job(client::JobCommand),
    /// See recent jobs: the slowest and the failed.
    #[command(subcommand)]
    Jobs(client::JobsCommand),
    /// Read items.
    #[command(subcommand)]
    Item(client::ItemCommand),
    /// Manage who may use the cluster.
    #[command(subcommand)]
    User(client::UserCommand),
    /// Print the URL of the best node for a bucket.
    Canary {
        /// Bucket key.
        bucket: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print a node's status as JSON.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Load a node with concurrent jobs and print throughput and latency.
    Bench(bench::BenchArgs),
    /// Watch the cluster: per node jobs/s, latency, flocks led and lag, refreshed.
    Top(top::TopArgs),
    /// Compile one module (component bytes on stdin, code on stdout): what a node runs in a
    /// child process to bound a compile's time and memory.
    #[command(hide = true)]
    CompileModule {
        /// Cap on this process's heap.
        #[arg(long)]
        memory_bytes_max: usize,
        /// Compile fuel metering in.
        #[arg(long)]
        fuel: bool,
    },
}

/// Which node a client command talks to.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Node URL: http://HOST:PORT, https://HOST:PORT or quic://HOST:PORT.
    #[arg(long = "node", env = "GREX_NODE", default_value = DEFAULT_NODE_URL, global = true)]
    pub node: String,
    /// CA certificate that signs the node's certificate (ca.pem in its data directory);
    /// needed for quic:// and https:// URLs.
    #[arg(long = "ca", env = "GREX_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// A user's token (from `grex user add`), for a cluster that has users.
    #[arg(long = "token", env = "GREX_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

impl Target {
    /// How the client connects: the CA file and the token.
    pub fn options(&self) -> grex_client::ConnectOptions {
        grex_client::ConnectOptions { ca_file: self.ca.clone(), token: self.token.clone() }
    }
}

/// Runs the command line; returns the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CompileModule { memory_bytes_max, fuel } = cli.command {
        return crate::wasm::compile::child_main(memory_bytes_max, crate::wasm::compile::CodeSettings { fuel });
    }
    let server = matches!(cli.command, Command::Serve(_) | Command::Dev(_));
    init_logging(if server { "info" } else { "warn" });
    let io_threads = match &cli.command {
        Command::Serve(args) => args.io_threads(),
        // Several nodes share one process.
        Command::Dev(_) => 2,
        _ => 1,
    };
    let mut builder = if io_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(io_threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => server::serve(args).await,
            Command::Dev(args) => server::dev(args).await,
            Command::Init(args) => server::init(args),
            Command::Cluster(cmd) => server::cluster(cmd).await,
            Command::Flock(cmd) => client::flock(cmd).await,
            Command::New(args) => new::new(args),
            Command::Module(cmd) => client::module(cmd).await,
            Command::Job(cmd) => client::job(cmd).await,
            Command::Jobs(cmd) => client::jobs(cmd).await,
            Command::Item(cmd) => client::item(cmd).await,
            Command::User(cmd) => client::user(cmd).await,
            Command::Canary { bucket, target } => client::canary(&bucket, &target).await,
            Command::Status { target } => client::status(&target).await,
            Command::Bench(args) => bench::bench(args).await,
            Command::Top(args) => top::top(args).await,
            Command::CompileModule { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`grex flock ls | head`): nothing more to say, as with other tools.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs to stderr, filtered by `GREX_LOG` (tracing's `EnvFilter` syntax: `debug`,
/// `info,grex::cluster=debug`, or one job module's lines with `grex::job[job{module=NAME}]=debug`).
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GREX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: a log file or a collector gets plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
