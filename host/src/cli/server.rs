//! `grex serve` and `grex dev`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::Target;
use crate::api::{self, ServeConfig};
use crate::cluster::{Cluster, ClusterConfig, ClusterFile, Replication, Site, identity};
use crate::config::{Limits, NodeConfig};
use crate::node::{Node, Service};
use crate::storage::FaultyStore;

/// Settings shared by `serve` and `dev`.
#[derive(Args, Clone, Debug)]
pub(super) struct NodeArgs {
    /// The node's memory budget in MiB: its caches, consensus log entries, queues and buffers
    /// (running jobs' memory is bounded apart, by --memory-mib per executor). 3/16 go to the
    /// bucket cache, 3/16 to the store's page cache, 1/16 to consensus log entries.
    #[arg(long, default_value_t = crate::config::NODE_MEMORY_BYTES_DEFAULT >> 20)]
    node_memory_mib: usize,
    /// Decoded-bucket cache size in MiB (default: 3/16 of --node-memory-mib; at most half).
    #[arg(long)]
    cache_mib: Option<usize>,
    /// Flocks for a new data directory (a power of two up to 16384; fixed once created).
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
    /// MiB of large requests (over 64 KiB each) the node holds while they arrive, over every
    /// connection and protocol (default: 1/16 of --node-memory-mib); a request that would go
    /// over is refused with `overloaded`, unless it is the only one arriving.
    #[arg(long)]
    request_buffer_mib: Option<usize>,
    /// How long compiling one module may take, in seconds (then `module_too_complex`).
    #[arg(long, default_value_t = Limits::default().compile_timeout_ms / 1000)]
    compile_timeout_secs: u64,
    /// The memory compiling one module may use, in MiB (then `module_too_complex`).
    #[arg(long, default_value_t = Limits::default().compile_memory_bytes_max >> 20)]
    compile_memory_mib: usize,
    /// Log entries each flock keeps before it snapshots its state (a herder further behind
    /// catches up from the snapshot).
    #[arg(long, default_value_t = crate::cluster::SNAPSHOT_LOGS_DEFAULT)]
    snapshot_logs: u64,
    /// How long a member may be unreachable before the cluster removes it and copies its
    /// flocks again from the other herders (`90s`, `10m`, `1h`; never while half the members
    /// or more are down).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    dead_after: Duration,
    /// This node's zone (a rack, a room, a region): each flock's copies spread over zones first.
    #[arg(long, default_value = "")]
    zone: String,
    /// MiB a second of snapshots this node sends to new herders when flocks move (a join, a
    /// drain, a replaced node), over all flocks; 0 for no limit. Lower keeps jobs fast while
    /// flocks move; higher moves them sooner.
    #[arg(long, default_value_t = crate::cluster::SNAPSHOT_BYTES_PER_SEC_DEFAULT >> 20)]
    snapshot_mib_per_sec: u64,
    /// This node's capacity: its share of the flocks' copies is proportional to it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    capacity: u32,
}

/// A duration as `500ms`, `90s`, `10m`, `2h` (a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration such as 90s, 10m or 1h"))?;
    let seconds = match unit {
        "ms" => return Ok(Duration::from_millis(value)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("`{text}`: the unit must be ms, s, m or h")),
    };
    Ok(Duration::from_secs(value.saturating_mul(seconds)))
}

impl NodeArgs {
    /// Refuses settings that cannot work together, before anything is created.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.node_memory_mib << 20 >= crate::config::NODE_MEMORY_BYTES_MIN,
            "--node-memory-mib {} is too small: a node needs at least {} MiB",
            self.node_memory_mib,
            crate::config::NODE_MEMORY_BYTES_MIN >> 20
        );
        if let Some(cache_mib) = self.cache_mib {
            anyhow::ensure!(
                cache_mib * 2 <= self.node_memory_mib,
                "--cache-mib {cache_mib} is more than half of --node-memory-mib {}: raise the budget or lower the \
                 cache",
                self.node_memory_mib
            );
        }
        Ok(())
    }

    /// The node's configuration (the settings passed [`NodeArgs::check`]).
    fn config(&self, data: &Path) -> NodeConfig {
        let mut config = NodeConfig::new(data);
        config.set_memory_budget(self.node_memory_mib << 20);
        if let Some(cache_mib) = self.cache_mib {
            config.cache_bytes_max = cache_mib << 20;
        }
        if let Some(mib) = self.request_buffer_mib {
            config.request_buffer_bytes_max = mib << 20;
        }
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
            compile_timeout_ms: self.compile_timeout_secs * 1000,
            compile_memory_bytes_max: self.compile_memory_mib << 20,
        };
        // Compile in child processes of this very binary, so a module's compile is bounded.
        config.compiler = std::env::current_exe().ok();
        config
    }
}

#[derive(Args)]
pub(super) struct ServeArgs {
    /// Data directory (created if missing; a directory without a cluster becomes a new one-node
    /// cluster unless --join is given).
    #[arg(long)]
    data: PathBuf,
    /// Peer (node-to-node QUIC) listen address.
    #[arg(long, default_value = "127.0.0.1:7072")]
    peer: SocketAddr,
    /// Join the cluster of the node whose peer address this is (first start only; needs
    /// --credentials).
    #[arg(long)]
    join: Option<String>,
    /// Credentials from `grex cluster credentials`, imported on first start.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Replication factor of a new cluster (odd).
    #[arg(long, default_value_t = 3)]
    replication: u32,
    /// HTTP/JSON listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    http: SocketAddr,
    /// QUIC listen address.
    #[arg(long, default_value = "127.0.0.1:7071")]
    quic: SocketAddr,
    /// Redis protocol (RESP2/RESP3) listen address, e.g. 127.0.0.1:6379; off unless given.
    #[arg(long)]
    resp: Option<SocketAddr>,
    /// Serve HTTP over TLS (https://), with the node's certificate, which clients verify with
    /// the cluster's ca.pem as for QUIC.
    #[arg(long)]
    http_tls: bool,
    /// Serve the Redis protocol over TLS (`redis-cli --tls --cacert ca.pem`).
    #[arg(long)]
    resp_tls: bool,
    /// Threads for network I/O (HTTP, QUIC, TLS); jobs run on their own executor threads.
    #[arg(long, default_value_t = 1)]
    io_threads: usize,
    /// For failure tests: SIGUSR1 cuts this node off from its peers, SIGUSR2 reconnects it, and
    /// stdin takes `cut ID...` (partitions) and `disk fail` lines.
    #[arg(long, hide = true)]
    fault_injection: bool,
    #[command(flatten)]
    node: NodeArgs,
}

impl ServeArgs {
    /// Threads the async runtime should have.
    pub(super) fn io_threads(&self) -> usize {
        self.io_threads
    }
}

/// `grex init`
#[derive(Args)]
pub(super) struct InitArgs {
    /// Data directory of the cluster's first node.
    #[arg(long)]
    data: PathBuf,
    /// Flocks (a power of two up to 16384, fixed for the cluster's life).
    #[arg(long, default_value_t = 256)]
    flocks: u32,
    /// Herders per flock (odd).
    #[arg(long, default_value_t = 3)]
    replication: u32,
    /// Extra DNS names or IP addresses for this node's certificate.
    #[arg(long = "name")]
    names: Vec<String>,
}

/// `grex cluster ...`
#[derive(clap::Subcommand)]
pub(super) enum ClusterCommand {
    /// List the members: state, liveness, flocks herded and led.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
    /// Drain a node: its flocks move to the other nodes (each new herder catches up before the
    /// node leaves its group), then it leaves the cluster. Shows progress until it has left.
    Drain {
        /// The node's id, or enough of its start to tell it apart (`grex cluster nodes` lists
        /// them).
        #[arg(value_name = "NODE_ID")]
        id: String,
        /// Return once the drain is recorded instead of following it to the end.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a dead node at once: its flocks are copied again from the other herders, and the
    /// node is refused if it comes back (wipe its data directory to join it again as a new node).
    Remove {
        /// The node's id, or enough of its start to tell it apart.
        #[arg(value_name = "NODE_ID")]
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Issue credentials for a new node (run where `grex init` ran: it needs the CA key).
    Credentials {
        /// Data directory holding the cluster CA key.
        #[arg(long)]
        data: PathBuf,
        /// Where to write the bundle (it holds a private key: keep it secret).
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names or IP addresses for the new node's certificate.
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub(super) struct DevArgs {
    /// Nodes to start, each with its own data directory (DATA/node-I) and ports.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Data directory.
    #[arg(long, default_value = "grex-data-dev")]
    data: PathBuf,
    /// Directory of .wasm jobs to load, each under its file name (counter.wasm → counter).
    #[arg(long, default_value = "target/jobs/wasm32-unknown-unknown/wasm")]
    jobs: PathBuf,
    /// HTTP port of the first node (QUIC and peer listen on the next two; node i adds 10 × i).
    #[arg(long, default_value_t = 7070)]
    port: u16,
    #[command(flatten)]
    node: NodeArgs,
}

/// Creates a cluster's first node.
pub(super) fn init(args: InitArgs) -> anyhow::Result<()> {
    let file = identity::init(&args.data, args.flocks, args.replication, &args.names)?;
    println!(
        "created cluster {} ({} flocks, replication {}) in {}; start it with `grex serve --data {}`",
        file.cluster_id,
        file.flock_count,
        file.replication,
        args.data.display(),
        args.data.display()
    );
    Ok(())
}

/// Cluster administration.
pub(super) async fn cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    let (data, out, names) = match cmd {
        ClusterCommand::Credentials { data, out, names } => (data, out, names),
        ClusterCommand::Nodes { target } => return super::client::nodes(&target).await,
        ClusterCommand::Drain { id, no_wait, target } => return super::client::drain(&id, no_wait, &target).await,
        ClusterCommand::Remove { id, target } => return super::client::remove(&id, &target).await,
    };
    let credentials = identity::issue_credentials(&data, &names)?;
    identity::write_file(&out, &serde_json::to_string_pretty(&credentials)?, true)?;
    println!(
        "wrote credentials for cluster {} to {}; copy it to the new machine and run \
         `grex serve --data DIR --credentials {} --join PEER_ADDR`",
        credentials.cluster.cluster_id,
        out.display(),
        out.display()
    );
    Ok(())
}

/// Makes sure `data` belongs to a cluster: imports credentials, or creates a one-node cluster.
fn prepare_data(
    data: &Path,
    credentials: Option<&Path>,
    joining: bool,
    flocks: u32,
    replication: u32,
) -> anyhow::Result<ClusterFile> {
    if let Some(path) = credentials {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let credentials: identity::Credentials =
            serde_json::from_str(&text).with_context(|| format!("{} is not a credentials bundle", path.display()))?;
        identity::import(data, &credentials)?;
    }
    if let Some(file) = ClusterFile::load(data)? {
        return Ok(file);
    }
    if joining {
        anyhow::bail!(
            "joining a cluster needs its credentials: run `grex cluster credentials --data FIRST_NODE_DIR --out \
             node.creds` on the first node, copy the file here and pass --credentials node.creds"
        );
    }
    identity::init(data, flocks, replication, &[])
}

/// One node: its servers and its cluster side.
struct Running {
    node: Node,
    servers: api::Servers,
    cluster: Cluster,
}

async fn start_node(
    data: &Path,
    node_args: &NodeArgs,
    serve: ServeConfig,
    peer: SocketAddr,
    join: Option<String>,
    disk_fault: Option<Arc<AtomicBool>>,
) -> anyhow::Result<Running> {
    let cluster_config = ClusterConfig {
        join,
        snapshot_logs: node_args.snapshot_logs,
        dead_after: node_args.dead_after,
        site: Site { zone: node_args.zone.clone(), capacity: node_args.capacity },
        snapshot_bytes_per_sec: node_args.snapshot_mib_per_sec << 20,
        ..ClusterConfig::new(peer)
    };
    let file = ClusterFile::load(data)?.context("the data directory holds no cluster")?;
    let mut config = node_args.config(data);
    config.flock_count = file.flock_count;
    crate::cluster::migrate::forward(&data.join(crate::node::DB_FILE))?;
    // The node's executors propose to the consensus side from their start; its engine runs once
    // the node (whose store it drives) is open.
    let replication = Replication::new(file.flock_count);
    let replicator = Some(replication.replicator());
    let node = match disk_fault {
        Some(switch) => Node::open_wrapped(config, replicator, |store| {
            Arc::new(FaultyStore::new(store, u64::MAX).failing_when(switch))
        })?,
        None => Node::open_wrapped(config, replicator, |store| Arc::new(store))?,
    };
    // The cluster side needs the servers' URLs, and the servers must not take a request before
    // the cluster side is running: bound first, opened last.
    let servers = api::bind(&node, &serve).await?;
    let cluster = Cluster::start(node.clone(), file, cluster_config, replication).await?;
    servers.open(Arc::new(cluster.clone()));
    Ok(Running { node, servers, cluster })
}

/// Runs a node until SIGTERM or ctrl-c.
pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Settings first: a bad one must not leave a new data directory behind.
    args.node.check()?;
    prepare_data(&args.data, args.credentials.as_deref(), args.join.is_some(), args.node.flocks, args.replication)?;
    let disk_fault = args.fault_injection.then(|| Arc::new(AtomicBool::new(false)));
    let running = start_node(
        &args.data,
        &args.node,
        ServeConfig {
            http: Some(args.http),
            quic: Some(args.quic),
            resp: args.resp,
            http_tls: args.http_tls,
            resp_tls: args.resp_tls,
        },
        args.peer,
        args.join.clone(),
        disk_fault.clone(),
    )
    .await?;
    announce(&running);
    if Service::users(&running.cluster).is_empty() {
        tracing::warn!(
            "this node knows of no users: until the cluster has one, only clients on its nodes' own machines \
             (loopback) are served, and they may do everything; add an admin with `grex user add NAME --admin`"
        );
    }
    if let Some(disk) = disk_fault {
        inject_faults(running.cluster.clone(), disk)?;
    }
    let commits = running.node.commits().clone();
    let cluster = running.cluster.clone();
    tokio::select! {
        () = wait_for_signal() => {}
        failure = commits.failed() => {
            // The node's memory may hold writes the disk never took, and its log on disk is the
            // truth: stop at once, so the cluster elects other leaders, and start over from disk.
            tracing::error!(error = %failure.message, "the disk failed; stopping (restart the node once the disk works)");
            std::process::exit(DISK_FAILED_EXIT);
        }
        reason = cluster.removed() => {
            tracing::error!("{reason}; stopping");
            shut_down(running).await;
            anyhow::bail!("{reason}");
        }
    }
    shut_down(running).await;
    Ok(())
}

/// The exit status of a node that stopped because a commit to its disk failed.
pub const DISK_FAILED_EXIT: i32 = 3;

/// Fault injection for failure tests (`--fault-injection`): SIGUSR1 isolates the node from its
/// peers (a network partition), SIGUSR2 ends that; lines on stdin:
///
/// - `cut ID...`: drop all traffic with these peers (one side of a partition), restore the rest;
///   `cut` alone restores all;
/// - `disk fail`: every commit from now on fails (the node then stops, as on a real disk error).
fn inject_faults(cluster: Cluster, disk: Arc<AtomicBool>) -> anyhow::Result<()> {
    let reader = cluster.clone();
    std::thread::Builder::new().name("grex-fault-injection".into()).spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["cut", peers @ ..] => match reader.set_cut_off(peers) {
                    Ok(()) => tracing::warn!(?peers, "fault injection: traffic with these peers cut"),
                    Err(e) => tracing::error!(error = %e, "fault injection: bad `cut` line"),
                },
                ["disk", "fail"] => {
                    tracing::warn!("fault injection: the disk fails from now on");
                    disk.store(true, Ordering::SeqCst);
                }
                _ => tracing::error!(%line, "fault injection: unknown command (cut ID... | disk fail)"),
            }
        }
    })?;
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut cut = signal(SignalKind::user_defined1())?;
        let mut heal = signal(SignalKind::user_defined2())?;
        tokio::spawn(async move {
            loop {
                let isolated = tokio::select! {
                    Some(()) = cut.recv() => true,
                    Some(()) = heal.recv() => false,
                    else => return,
                };
                tracing::warn!(isolated, "fault injection: peer traffic {}", if isolated { "cut" } else { "restored" });
                cluster.set_isolated(isolated);
            }
        });
    }
    #[cfg(not(unix))]
    let _ = cluster;
    Ok(())
}

/// Runs a local cluster of `--nodes` nodes with the example jobs loaded.
pub(super) async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        anyhow::bail!("--nodes must be 1 to 9");
    }
    let first = args.data.join("node-0");
    args.node.check()?;
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        let dir = args.data.join(format!("node-{i}"));
        let port = args.port + 10 * i as u16;
        let fresh = ClusterFile::load(&dir)?.is_none();
        if fresh {
            if i == 0 {
                identity::init(&dir, args.node.flocks, 3, &[])?;
            } else {
                identity::import(&dir, &identity::issue_credentials(&first, &[])?)?;
            }
        }
        let serve = ServeConfig {
            http: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            quic: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
            resp: Some(SocketAddr::from(([127, 0, 0, 1], port + 3))),
            ..ServeConfig::default()
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], port + 2));
        let join = (fresh && i > 0).then(|| format!("127.0.0.1:{}", args.port + 2));
        let running = start_node(&dir, &args.node, serve, peer, join, None).await?;
        announce(&running);
        nodes.push(running);
    }
    let first = &nodes[0];
    wait_until_formed(&first.cluster, args.nodes as usize).await?;
    let loaded = load_jobs(&first.cluster, &args.jobs).await?;
    println!("loaded jobs: {}", loaded.join(", "));
    for running in &nodes {
        let http = running.servers.http_addr.map(|a| a.to_string()).unwrap_or_default();
        let resp = running.servers.resp_addr.map(|a| a.to_string()).unwrap_or_default();
        println!("node {} http://{http} redis://{resp}", running.node.id());
    }
    let http = first.servers.http_addr.map(|a| a.to_string()).unwrap_or_default();
    let resp = first.servers.resp_addr.map(|a| a.port()).unwrap_or_default();
    println!(
        "try:  grex job run customer-1 counter --input 5   (or: curl -X POST 'http://{http}/v1/jobs/customer-1?module=counter')"
    );
    println!("      redis-cli -p {resp} FCALL counter 1 customer-1 5   (or: redis-cli -p {resp} HGETALL customer-1)");
    println!("      grex job scan counter --input 0 --reduce sum   (every bucket's count, added up)");
    println!("dashboard: http://{http}/ui");
    if Service::users(&first.cluster).is_empty() {
        println!(
            "users: none, so clients on this machine may do everything (warning: add an admin with \
             `grex user add NAME --admin` before exposing a port; then every client needs a token)"
        );
    }
    wait_for_signal().await;
    for running in nodes {
        shut_down(running).await;
    }
    Ok(())
}

/// Waits until every node is in the flock map and every flock has a leader.
async fn wait_until_formed(cluster: &Cluster, nodes: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let map = cluster.flocks();
        let herders = nodes.min(3);
        if map.nodes.len() == nodes
            && map.flocks.iter().all(|f| f.leader.is_some() && f.settled && f.herders.len() == herders)
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the local cluster did not form within 60 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Uploads the example jobs through the cluster, so that every node has them.
async fn load_jobs(cluster: &Cluster, dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!("no example jobs at {} (build them with scripts/build-jobs.sh, or pass --jobs DIR)", dir.display())
    })?;
    let mut names = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path.file_stem().and_then(|s| s.to_str()).context("job file name is not UTF-8")?.to_owned();
            let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            cluster.put_module(name.clone(), wasm).await.with_context(|| format!("loading {}", path.display()))?;
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn announce(running: &Running) {
    let Running { node, servers, cluster } = running;
    // `https://` and `rediss://` when they speak TLS.
    let http_scheme = if servers.http_tls { "https" } else { "http" };
    let http = servers.http_addr.map(|a| format!("{http_scheme}://{a}")).unwrap_or_default();
    let quic = servers.quic_addr.map(|a| format!("quic://{a}")).unwrap_or_default();
    let resp_scheme = if servers.resp_tls { "rediss" } else { "redis" };
    let resp = servers.resp_addr.map(|a| format!(" resp={resp_scheme}://{a}")).unwrap_or_default();
    // One line, parsed by tests and scripts: keep its shape (new fields go at the end).
    println!(
        "grex node {} listening http={http} quic={quic} peer={} ca={}{resp}",
        node.id(),
        cluster.peer_addr(),
        node.ca_file().display()
    );
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

async fn shut_down(running: Running) {
    tracing::info!("shutting down: finishing requests in flight");
    running.servers.stop().await;
    running.cluster.shutdown().await;
    running.node.shutdown().await;
    tracing::info!("stopped");
}
