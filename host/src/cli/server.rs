//! `grex serve` and `grex dev`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use crate::api::{self, ServeConfig};
use crate::config::{Limits, NodeConfig};
use crate::node::Node;

/// Settings shared by `serve` and `dev`.
#[derive(Args, Clone, Debug)]
pub(super) struct NodeArgs {
    /// Decoded-bucket cache size in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Flocks for a new data directory (a power of two; fixed once created).
    #[arg(long, default_value_t = 256)]
    flocks: u32,
    /// Job executor threads (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Acknowledge jobs before their writes are fsync'd (faster, loses recent jobs on a crash).
    #[arg(long)]
    no_fsync: bool,
    /// Job deadline in milliseconds.
    #[arg(long, default_value_t = Limits::default().timeout_ms)]
    timeout_ms: u64,
    /// Fuel per job (off unless set).
    #[arg(long)]
    fuel: Option<u64>,
    /// Job memory limit in MiB.
    #[arg(long, default_value_t = Limits::default().memory_bytes_max >> 20)]
    memory_mib: usize,
    /// Largest job input.
    #[arg(long, default_value_t = Limits::default().input_bytes_max)]
    input_bytes_max: usize,
    /// Largest job output.
    #[arg(long, default_value_t = Limits::default().output_bytes_max)]
    output_bytes_max: usize,
    /// Largest item value.
    #[arg(long, default_value_t = Limits::default().item_bytes_max)]
    item_bytes_max: usize,
    /// Largest change set (keys + values one job writes).
    #[arg(long, default_value_t = Limits::default().change_set_bytes_max)]
    change_set_bytes_max: usize,
    /// Largest module upload.
    #[arg(long, default_value_t = Limits::default().module_bytes_max)]
    module_bytes_max: usize,
}

impl NodeArgs {
    fn config(&self, data: &Path) -> NodeConfig {
        let mut config = NodeConfig::new(data);
        config.cache_bytes_max = self.cache_mib << 20;
        config.flock_count = self.flocks;
        if let Some(shards) = self.shards {
            config.shards = shards;
        }
        config.durable = !self.no_fsync;
        config.limits = Limits {
            timeout_ms: self.timeout_ms,
            fuel: self.fuel,
            memory_bytes_max: self.memory_mib << 20,
            input_bytes_max: self.input_bytes_max,
            output_bytes_max: self.output_bytes_max,
            item_bytes_max: self.item_bytes_max,
            change_set_bytes_max: self.change_set_bytes_max,
            module_bytes_max: self.module_bytes_max,
            log_lines_max: Limits::default().log_lines_max,
        };
        config
    }
}

#[derive(Args)]
pub(super) struct ServeArgs {
    /// Data directory (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// HTTP/JSON listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    http: SocketAddr,
    /// QUIC listen address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    quic: SocketAddr,
    /// Threads for network I/O (HTTP, QUIC, TLS); jobs run on their own executor threads.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    #[command(flatten)]
    node: NodeArgs,
}

impl ServeArgs {
    /// Threads the async runtime should have.
    pub(super) fn io_threads(&self) -> usize {
        self.io_threads
    }
}

#[derive(Args)]
pub(super) struct DevArgs {
    /// Nodes to start (one until clustering lands).
    #[arg(long, default_value_t = 1)]
    nodes: u32,
    /// Data directory.
    #[arg(long, default_value = "grex-data-dev")]
    data: PathBuf,
    /// Directory of .wasm jobs to load, each under its file name (counter.wasm → counter).
    #[arg(long, default_value = "target/jobs/wasm32-unknown-unknown/wasm")]
    jobs: PathBuf,
    /// HTTP port of the node (QUIC listens on the next one).
    #[arg(long, default_value_t = 7070)]
    port: u16,
    #[command(flatten)]
    node: NodeArgs,
}

/// Runs a node until SIGTERM or ctrl-c.
pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let node = Node::open(args.node.config(&args.data))?;
    let servers = api::start(&node, &ServeConfig { http: Some(args.http), quic: Some(args.quic) }).await?;
    announce(&node, &servers);
    wait_for_signal().await;
    shut_down(node, servers).await;
    Ok(())
}

/// Runs a local node with the example jobs loaded.
pub(super) async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes != 1 {
        anyhow::bail!("this build runs single-node Grex only; use --nodes 1");
    }
    let node = Node::open(args.node.config(&args.data))?;
    let loaded = load_jobs(&node, &args.jobs).await?;
    let http = SocketAddr::from(([127, 0, 0, 1], args.port));
    let quic = SocketAddr::from(([127, 0, 0, 1], args.port.wrapping_add(1)));
    let servers = api::start(&node, &ServeConfig { http: Some(http), quic: Some(quic) }).await?;
    announce(&node, &servers);
    println!("loaded jobs: {}", loaded.join(", "));
    println!(
        "try:  grex job run customer-1 counter --input 5   (or: curl -X POST 'http://{http}/v1/jobs/customer-1?module=counter')"
    );
    wait_for_signal().await;
    shut_down(node, servers).await;
    Ok(())
}

async fn load_jobs(node: &Node, dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!("no example jobs at {} (build them with scripts/build-jobs.sh, or pass --jobs DIR)", dir.display())
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path.file_stem().and_then(|s| s.to_str()).context("job file name is not UTF-8")?.to_owned();
            let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            node.put_module(&name, wasm).await.with_context(|| format!("loading {}", path.display()))?;
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn announce(node: &Node, servers: &api::Servers) {
    let http = servers.http_addr.map(|a| format!("http://{a}")).unwrap_or_default();
    let quic = servers.quic_addr.map(|a| format!("quic://{a}")).unwrap_or_default();
    // One line, parsed by tests and scripts: keep its shape.
    println!("grex node {} listening http={http} quic={quic} ca={}", node.id(), node.ca_file().display());
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn shut_down(node: Node, servers: api::Servers) {
    tracing::info!("shutting down: finishing requests in flight");
    servers.stop().await;
    node.shutdown().await;
    tracing::info!("stopped");
}
