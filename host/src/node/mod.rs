//! The node: the library API that runs jobs against buckets and keeps them durable.
//!
//! A [`Node`] owns the store, the wasm runtime, the group committer and the executor shards. It
//! needs no network: an application can embed one and call [`Node::run_job`] directly. The
//! servers in [`api`](crate::api) are thin layers over a node and a [`Service`]: the node itself
//! when it runs alone, its cluster when it is a member (which routes jobs to their flock's leader
//! and runs them there with `Node::run_job`).
//!
//! The path of a job: [`Node::run_job`] checks the request, resolves the module (compiling it on
//! first use, off the async threads) and hands the job to the shard that owns the bucket's flock
//! (`shard`). The shard takes the bucket from its cache (loading it from the store on a
//! miss), runs the job, applies the change set to the cached bucket and queues it for the
//! committer (`commit`). `run_job` then waits until that change set is durable and
//! answers.
//!
//! Guarantees: jobs on one bucket run one at a time against the latest state (the shard owns the
//! bucket); a job is answered only after every write it made or saw is durable; a job that fails
//! commits nothing.

mod cache;
mod clock;
mod commit;
mod recent;
mod scan;
mod shard;

pub use cache::CacheStats;
pub use clock::{Clock, FixedClock, SystemClock};
pub use commit::{CommitLog, Durable, Write, WriteDone};
pub use scan::{SCAN_PAGE_BUCKETS, SCAN_PAGE_BYTES, SCAN_SESSION_IDLE, SCAN_SESSIONS_MAX, ScanPage, ScanSpec};

/// The failed jobs a node's load names, newest first (of those its recent-jobs ring keeps).
pub const STATS_FAILED_JOBS: usize = 8;

/// What the servers (`api`) ask of a node for anything a cluster must route: jobs to the
/// flock's leader, module uploads to every node, canaries, the flock map. A [`Node`] on its own
/// answers everything itself; a cluster node's is the `Cluster`. The servers are handed one when
/// they open, before they accept a request, and hold it; the node itself knows nothing of it.
pub trait Service: Send + Sync + 'static {
    /// Runs a job wherever it should run.
    fn run_job(
        &self,
        bucket: Vec<u8>,
        module: String,
        input: Vec<u8>,
        read_only: bool,
    ) -> futures::future::BoxFuture<'static, Result<JobOutput>>;
    /// Stores a module on every node.
    fn put_module(&self, name: String, wasm: Vec<u8>) -> futures::future::BoxFuture<'static, Result<ModuleInfo>>;
    /// Deletes a module name on every node; answers what it pointed to.
    fn delete_module(&self, name: String) -> futures::future::BoxFuture<'static, Result<ModuleInfo>>;
    /// The best node for a bucket.
    fn canary(&self, bucket: Vec<u8>, read_only: bool) -> futures::future::BoxFuture<'static, Result<Canary>>;
    /// The flock map.
    fn flocks(&self) -> FlockMapInfo;
    /// The member nodes that serve the Redis protocol (none outside a cluster).
    fn resp_nodes(&self) -> Vec<RespNode>;
    /// The cluster's nodes (an error outside a cluster).
    fn nodes(&self) -> Result<NodesInfo>;
    /// Every member's load, each asked by this node (this node alone outside a cluster).
    fn cluster_stats(&self) -> futures::future::BoxFuture<'static, ClusterStats>;
    /// Runs a read-only job on every bucket with the request's prefix ([`crate::scan`]); its
    /// events arrive on the receiver, the last one `done` or `failed`.
    fn scan(&self, request: ScanRequest) -> mpsc::Receiver<ScanEvent>;
    /// Drains or removes a member; answers the nodes once the cluster has recorded the change.
    fn change_node(&self, node: String, change: NodeChange) -> futures::future::BoxFuture<'static, Result<NodesInfo>>;
    /// Whether `caller` may do `action` (see [`access`](crate::access)). By default there are no
    /// users: callers on loopback may do everything, others nothing.
    fn authorize(&self, caller: &Caller, action: Action<'_>) -> Result<()> {
        crate::access::authorize(&Users::new(), caller, action)
    }
    /// The user a token belongs to.
    fn authenticate(&self, token: &str) -> Result<Identity> {
        crate::access::authenticate(&Users::new(), token)
    }
    /// Every user.
    fn users(&self) -> Vec<UserInfo> {
        Vec::new()
    }
    /// Adds, changes or deletes a user; answers once this node checks requests with the change.
    fn change_user(&self, _change: UserChange) -> futures::future::BoxFuture<'static, Result<()>> {
        async { Err(not_a_cluster()) }.boxed()
    }
}

/// A change of a cluster's membership that an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NodeChange {
    /// The node hands its flocks to the others, then leaves.
    Drain,
    /// The node (dead) leaves at once; its flocks are copied again from the other herders.
    Remove,
}

fn not_a_cluster() -> RemoteError {
    error(
        ErrorCode::BadRequest,
        "this node runs on its own, not in a cluster: it has no other nodes to list, drain or remove, and no users",
    )
}

/// A node on its own serves itself.
impl Service for Node {
    fn run_job(
        &self,
        bucket: Vec<u8>,
        module: String,
        input: Vec<u8>,
        read_only: bool,
    ) -> futures::future::BoxFuture<'static, Result<JobOutput>> {
        let node = self.clone();
        async move { node.run_job(&bucket, &module, input, read_only).await }.boxed()
    }

    fn put_module(&self, name: String, wasm: Vec<u8>) -> futures::future::BoxFuture<'static, Result<ModuleInfo>> {
        let node = self.clone();
        async move { node.put_module(&name, wasm).await }.boxed()
    }

    fn delete_module(&self, name: String) -> futures::future::BoxFuture<'static, Result<ModuleInfo>> {
        let node = self.clone();
        async move { node.delete_module(&name).await }.boxed()
    }

    fn canary(&self, bucket: Vec<u8>, _read_only: bool) -> futures::future::BoxFuture<'static, Result<Canary>> {
        let node = self.clone();
        async move { node.canary(&bucket).await }.boxed()
    }

    fn flocks(&self) -> FlockMapInfo {
        Node::flocks(self)
    }

    fn resp_nodes(&self) -> Vec<RespNode> {
        Vec::new()
    }

    fn nodes(&self) -> Result<NodesInfo> {
        Err(not_a_cluster())
    }

    fn change_node(
        &self,
        _node: String,
        _change: NodeChange,
    ) -> futures::future::BoxFuture<'static, Result<NodesInfo>> {
        async { Err(not_a_cluster()) }.boxed()
    }

    fn cluster_stats(&self) -> futures::future::BoxFuture<'static, ClusterStats> {
        let stats = self.stats();
        let member = MemberStats {
            id: self.id().to_owned(),
            http: self.urls().http.unwrap_or_default(),
            alive: true,
            stats: Some(stats),
            error: None,
        };
        let gathered = ClusterStats { node: self.id().to_owned(), at_ms: SystemClock.now_ms(), members: vec![member] };
        async move { gathered }.boxed()
    }

    fn scan(&self, request: ScanRequest) -> mpsc::Receiver<ScanEvent> {
        crate::scan::start(Arc::new(self.clone()), request)
    }
}

/// A member node as Redis Cluster clients see it (`CLUSTER SLOTS` and its kin).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RespNode {
    /// The node's id.
    pub id: String,
    /// Its Redis protocol address, `HOST:PORT`.
    pub resp: String,
    /// Its peer address, `HOST:PORT` (empty when unknown); its port is shown where Redis shows
    /// its cluster bus port.
    pub peer: String,
}

/// Counts a job as running while it lives.
struct Running<'a>(&'a AtomicU64);

impl<'a> Running<'a> {
    fn count(counter: &'a AtomicU64) -> Running<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Running(counter)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once a change set proposed to a flock's log is committed and applied (or failed), to
/// the commit-log sequence of the write that puts its effects in the store. That write may still
/// be queued: the log entry is what makes the change durable.
pub type Ticket = futures::future::Shared<futures::future::BoxFuture<'static, Result<u64, RemoteError>>>;

/// Where a clustered node's change sets go: the replicated log of the bucket's flock. A node
/// without one (standalone, embedded) commits through its own group committer.
pub trait Replicator: Send + Sync + 'static {
    /// The term in which this node leads `flock` and has applied everything committed before it
    /// (so its store is the latest committed state); `None` when it is not such a leader.
    fn leader_term(&self, flock: u32) -> Option<u64>;
    /// Proposes a change set to the flock's log, in call order. The change set is encoded before
    /// this returns, so the caller keeps it (and may move its items into its cached copy).
    fn propose(&self, flock: u32, change: &crate::data::ChangeSet) -> Result<Ticket>;
    /// Resolves once a majority of the flock's herders has confirmed, after this call, that this
    /// node still leads `flock` in `term` (Raft's read index). A job that changed nothing proves nothing by
    /// committing, so before its answer goes out this shows that no other leader could have
    /// committed a change the job did not see; an error means the job must not be answered.
    fn confirm_lead(&self, flock: u32, term: u64) -> futures::future::BoxFuture<'static, Result<()>>;
    /// The flock's applied log index as `view` holds it: the version a scan of it reads.
    fn applied_in(&self, view: &dyn crate::storage::FlockView) -> Result<u64>;
}

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::FutureExt;
use grex_client::proto::{
    self, Canary, ClusterStats, FlockMapInfo, JobOutput, MemberStats, ModuleInfo, NodeStats, NodesInfo, ScanEvent,
    ScanRequest, Status, UserInfo,
};
use tokio::sync::{mpsc, oneshot};

use crate::access::{Action, Caller, Identity, UserChange, Users};
use crate::config::NodeConfig;
use crate::data::Builtin;
use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::metrics::{Metrics, Phase};
use crate::storage::{ModuleId, RedbStore, Store};
use crate::wasm::{LoadedModule, Runtime, module_id_text, parse_module_id};
use shard::{AppliedBuckets, Program, Shard, ShardJob, ShardMsg, ShardStats, WaitFor};

/// The longest module name.
pub const MODULE_NAME_BYTES_MAX: usize = 128;
/// The most keys one list request returns.
pub const LIST_PAGE_MAX: u32 = 1000;
/// Directory in the data directory where compiled modules are kept.
pub const CODE_DIR: &str = "code";
/// The name of the redb file in the data directory.
pub const DB_FILE: &str = "grex.redb";

/// URLs at which the node's servers answer, for status and canaries.
#[derive(Clone, Debug, Default)]
pub struct NodeUrls {
    /// `http://HOST:PORT`.
    pub http: Option<String>,
    /// `quic://HOST:PORT`.
    pub quic: Option<String>,
    /// `HOST:PORT` of the Redis protocol listener.
    pub resp: Option<String>,
}

/// A running node. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    config: NodeConfig,
    store: Arc<dyn Store>,
    runtime: Arc<Runtime>,
    commits: Arc<CommitLog>,
    shards: Vec<mpsc::Sender<ShardMsg>>,
    /// Per executor: buckets a follower applied, for it to drop older cached copies of.
    applied: Vec<Arc<AppliedBuckets>>,
    shard_stats: Vec<Arc<ShardStats>>,
    shard_threads: Mutex<Vec<JoinHandle<()>>>,
    /// A cluster member's consensus side (`None`: a lone node).
    replicator: Option<Arc<dyn Replicator>>,
    /// Module name → (id, size of the uploaded bytes), mirrored from the store.
    names: RwLock<HashMap<String, (ModuleId, u64)>>,
    /// Modules being loaded (read and compiled), one load each: the jobs that need one meanwhile
    /// wait for that load and take its result from the cache.
    module_loads: Mutex<HashMap<ModuleId, Arc<tokio::sync::Mutex<()>>>>,
    jobs_ok: AtomicU64,
    jobs_failed: AtomicU64,
    jobs_forwarded: AtomicU64,
    /// Jobs past loading their module and not answered yet.
    jobs_running: AtomicU64,
    started: Instant,
    urls: RwLock<NodeUrls>,
    metrics: Arc<Metrics>,
    recent: recent::Recent,
    /// Flock scans between pages.
    scans: scan::Sessions,
    /// Scan pages running at once (one per executor at most).
    scan_permits: tokio::sync::Semaphore,
    /// Reduce jobs started, to spread them over the executors.
    folds: AtomicU64,
}

impl Node {
    /// Opens (or creates) the node's data directory and starts it: a lone node, which commits
    /// its jobs' change sets itself.
    pub fn open(config: NodeConfig) -> anyhow::Result<Node> {
        Node::open_wrapped(config, None, |store| Arc::new(store))
    }

    /// [`open`](Self::open), for a cluster member when `replicator` is given (its change sets go
    /// there), with the store passed through `wrap` first (fault injection wraps it in a store
    /// whose disk can be made to fail).
    pub fn open_wrapped(
        config: NodeConfig,
        replicator: Option<Arc<dyn Replicator>>,
        wrap: impl FnOnce(RedbStore) -> Arc<dyn Store>,
    ) -> anyhow::Result<Node> {
        proto::check_flock_count(config.flock_count).map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", config.data_dir.display()))?;
        let path = config.data_dir.join(DB_FILE);
        let store = RedbStore::open_with_cache(&path, config.flock_count, config.durable, config.store_cache_bytes)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        Node::build(config, wrap(store), Arc::new(SystemClock), replicator)
    }

    /// Starts a lone node over any store, with a chosen clock (tests use these seams).
    pub fn with_store(config: NodeConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> anyhow::Result<Node> {
        Node::build(config, store, clock, None)
    }

    fn build(
        config: NodeConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        replicator: Option<Arc<dyn Replicator>>,
    ) -> anyhow::Result<Node> {
        let shard_count = config.shards.max(1);
        let mut runtime = Runtime::new(config.limits.clone(), shard_count as u32 + 1)
            .map_err(|e| anyhow::anyhow!("cannot start the wasm runtime: {e}"))?;
        if let Some(program) = &config.compiler {
            runtime = runtime.with_compiler(program.clone());
        }
        let code_dir = config.data_dir.join(CODE_DIR);
        let runtime = Arc::new(
            runtime
                .with_code_dir(code_dir.clone())
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", code_dir.display()))?,
        );
        let metrics = Arc::new(Metrics::new());
        let commits = Arc::new(CommitLog::start(store.clone(), config.commit_queue_max, config.commit_queue_bytes_max));
        let mut shards = Vec::new();
        let flock_count = store.meta().flock_count;
        let mut shard_stats = Vec::new();
        let mut applied = Vec::new();
        let mut threads = Vec::new();
        for i in 0..shard_count {
            let (tx, rx) = mpsc::channel(config.shard_queue_max.max(1));
            let stats = Arc::new(ShardStats::default());
            applied.push(Arc::new(AppliedBuckets::default()));
            let shard = Shard {
                applied: applied[i].clone(),
                store: store.clone(),
                runtime: runtime.clone(),
                commits: commits.clone(),
                clock: clock.clone(),
                cache: cache::BucketCache::new(config.cache_bytes_max / shard_count),
                stats: stats.clone(),
                last_timestamp_ms: 0,
                replicator: replicator.clone(),
                flock_count,
                applied_seq: 0,
            };
            threads.push(std::thread::Builder::new().name(format!("grex-shard-{i}")).spawn(move || shard.run(rx))?);
            shards.push(tx);
            shard_stats.push(stats);
        }
        let names = load_module_names(store.as_ref()).map_err(|e| anyhow::anyhow!("cannot read module names: {e}"))?;
        let node = Node {
            inner: Arc::new(Inner {
                config,
                store,
                runtime,
                commits,
                shards,
                applied,
                shard_stats,
                shard_threads: Mutex::new(threads),
                replicator,
                names: RwLock::new(names),
                module_loads: Mutex::default(),
                jobs_ok: AtomicU64::new(0),
                jobs_failed: AtomicU64::new(0),
                jobs_forwarded: AtomicU64::new(0),
                jobs_running: AtomicU64::new(0),
                started: Instant::now(),
                urls: RwLock::new(NodeUrls::default()),
                metrics,
                recent: recent::Recent::new(),
                scans: scan::Sessions::default(),
                scan_permits: tokio::sync::Semaphore::new(shard_count),
                folds: AtomicU64::new(0),
            }),
        };
        let weak = Arc::downgrade(&node.inner);
        node.inner.metrics.add_source(Box::new(move |samples| {
            if let Some(inner) = weak.upgrade() {
                Node { inner }.sample(samples);
            }
        }));
        Ok(node)
    }

    /// The node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The node's id.
    pub fn id(&self) -> &str {
        &self.inner.store.meta().node_id
    }

    /// Flocks in the cluster.
    pub fn flock_count(&self) -> u32 {
        self.inner.store.meta().flock_count
    }

    /// The CA file clients use to trust this node's QUIC certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.inner.config.data_dir.join(crate::api::CA_FILE)
    }

    /// Records where the servers answer (for status and canaries).
    pub fn set_urls(&self, urls: NodeUrls) {
        *self.inner.urls.write().unwrap_or_else(|p| p.into_inner()) = urls;
    }

    fn urls(&self) -> NodeUrls {
        self.inner.urls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stores a module under its SHA-256 and points `name` at it. The module is compiled first, so
    /// one that would not run is refused here.
    pub async fn put_module(&self, name: &str, wasm: Vec<u8>) -> Result<ModuleInfo> {
        let (id, wasm) = self.check_module(name, wasm).await?;
        let node = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            node.inner.store.put_module(&id, &name, &wasm)?;
            node.module_replicated(&name, id, wasm.len() as u64);
            tracing::info!(%name, id = %module_id_text(&id), bytes = wasm.len(), "module stored");
            Ok(ModuleInfo { name, id: module_id_text(&id), size: wasm.len() as u64 })
        })
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("module upload task failed: {e}")))?
    }

    /// Deletes a module name; the module's bytes and compiled code go too once no name points
    /// to them (a job running it finishes). Returns what the name pointed to.
    pub async fn delete_module(&self, name: &str) -> Result<ModuleInfo> {
        let info = self.module_named(name)?;
        let node = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let batch = crate::storage::Batch {
                log: vec![crate::storage::LogOp::DeleteModule { name: name.clone() }],
                changes: Vec::new(),
                sync: crate::storage::SyncTo::All,
            };
            node.inner.store.write(&batch)?;
            node.module_removed(&name);
            Ok(info)
        })
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("module delete task failed: {e}")))?
    }

    /// What `name` points to, or `module_not_found`.
    pub fn module_named(&self, name: &str) -> Result<ModuleInfo> {
        let names = self.inner.names.read().unwrap_or_else(|p| p.into_inner());
        let (id, size) = names.get(name).ok_or_else(|| {
            error(ErrorCode::ModuleNotFound, format!("no module named `{name}`; `grex module ls` lists them"))
        })?;
        Ok(ModuleInfo { name: name.to_owned(), id: module_id_text(id), size: *size })
    }

    /// Every module name and the id it points at.
    pub fn modules(&self) -> Vec<ModuleInfo> {
        let names = self.inner.names.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<ModuleInfo> = names
            .iter()
            .map(|(name, (id, size))| ModuleInfo { name: name.clone(), id: module_id_text(id), size: *size })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    async fn module(&self, name: &str) -> Result<Arc<LoadedModule>> {
        let id = match parse_module_id(name) {
            Some(id) => id,
            None => {
                self.inner.names.read().unwrap_or_else(|p| p.into_inner()).get(name).map(|(id, _)| *id).ok_or_else(
                    || {
                        error(
                            ErrorCode::ModuleNotFound,
                            format!("no module named `{name}`; upload it with `grex module put FILE --name {name}`"),
                        )
                    },
                )?
            }
        };
        if let Some(module) = self.inner.runtime.modules.cached(&id) {
            return Ok(module);
        }
        // One load at a time per module. A burst of jobs on a module not loaded yet (the first
        // ones after a start or an upload elsewhere) would otherwise each compile it: hundreds of
        // compiles queued for the compiler while the jobs, and the peers that forwarded them, time out.
        let gate = self.inner.module_loads.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone();
        let _turn = gate.lock().await;
        if let Some(module) = self.inner.runtime.modules.cached(&id) {
            return Ok(module);
        }
        let loaded = self.load_module(id, name).await;
        // Those still waiting find it in the cache; after a failure, each tries in turn.
        self.inner.module_loads.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        loaded
    }

    /// Reads module `id` (named `name`) from the store and compiles it, off the async executor.
    async fn load_module(&self, id: ModuleId, name: &str) -> Result<Arc<LoadedModule>> {
        let node = self.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let wasm = node.inner.store.module_bytes(&id)?.ok_or_else(|| {
                error(
                    ErrorCode::ModuleNotFound,
                    format!("module `{name}` ({}) is not stored here", module_id_text(&id)),
                )
            })?;
            let began = Instant::now();
            let loaded = node.inner.runtime.modules.compile(&wasm);
            node.inner.metrics.module_loaded(began.elapsed());
            loaded
        })
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("module load task failed: {e}")))?
    }

    /// Runs the module `module` (a name or `sha256:HEX`) against `bucket` on this node. Mutating
    /// jobs commit their writes (through the flock's log, on a cluster node) before this returns;
    /// read-only jobs may not write. Where a job should run is the [`Service`]'s business.
    pub async fn run_job(&self, bucket: &[u8], module: &str, input: Vec<u8>, read_only: bool) -> Result<JobOutput> {
        let arrived = Instant::now();
        let mut phases = Vec::with_capacity(4);
        let flock = proto::flock_of(bucket, self.flock_count());
        let result = self.run_job_inner(bucket, flock, module, input, read_only, &mut phases).await;
        let counter = if result.is_ok() { &self.inner.jobs_ok } else { &self.inner.jobs_failed };
        counter.fetch_add(1, Ordering::Relaxed);
        phases.push((Phase::Total, arrived.elapsed()));
        // A job refused before its module was found is labelled `other`: its name may be one no
        // module has, and clients must not fill the labels.
        let label = match &result {
            Err(e)
                if matches!(
                    e.code,
                    ErrorCode::ModuleNotFound
                        | ErrorCode::BadRequest
                        | ErrorCode::InvalidBucketKey
                        | ErrorCode::InputTooLarge
                ) =>
            {
                "other"
            }
            _ => module,
        };
        let outcome = result.as_ref().map(drop).map_err(|e| e.code);
        self.inner.metrics.job(label, outcome, &phases);
        self.inner.recent.record(module, bucket, flock, outcome, &phases);
        result
    }

    /// Counts a job passed on to another node (shown in the status).
    pub fn count_forwarded(&self) {
        self.inner.jobs_forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// The node's slowest and failed recent jobs.
    pub fn recent_jobs(&self) -> grex_client::RecentJobs {
        self.inner.recent.snapshot(self.id())
    }

    /// The node's load, without what a cluster adds (the flocks it leads).
    pub fn stats(&self) -> NodeStats {
        let mut failed = self.inner.recent.snapshot(self.id()).failed;
        failed.truncate(STATS_FAILED_JOBS);
        NodeStats {
            status: self.status(),
            latency: self.inner.metrics.latency_counts(),
            leads: Vec::new(),
            apply_lag: 0,
            failed,
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The node's state for a scrape of its metrics.
    fn sample(&self, samples: &mut crate::metrics::Samples) {
        let cache = self.cache_stats();
        samples.counter("cache_hits", "Bucket cache hits", &[], cache.hits as f64);
        samples.counter(
            "cache_misses",
            "Bucket cache misses (the bucket was read from the store)",
            &[],
            cache.misses as f64,
        );
        samples.gauge("cache_buckets", "Decoded buckets in the cache", &[], cache.buckets as f64);
        samples.gauge("cache_bytes", "Bytes of decoded buckets in the cache", &[], cache.bytes as f64);
        samples.gauge(
            "cache_bytes_max",
            "The bucket cache's limit (--cache-mib)",
            &[],
            self.inner.config.cache_bytes_max as f64,
        );
        samples.gauge(
            "jobs_running",
            "Jobs past loading their module and not answered yet (queued, running or committing)",
            &[],
            self.inner.jobs_running.load(Ordering::Relaxed) as f64,
        );
        samples.gauge("modules", "Module names this node holds", &[], self.modules().len() as f64);
        samples.gauge(
            "scan_sessions",
            "Flock scans open on this node between pages",
            &[],
            self.inner.scans.count() as f64,
        );
        let pool = self.inner.runtime.pool_usage();
        samples.gauge(
            "instance_pool_slots",
            "Jobs the wasm instance pool has room for at once (one per executor, and one more)",
            &[],
            pool.slots as f64,
        );
        samples.gauge(
            "instance_pool_instances",
            "Instances of the pool in use (running jobs)",
            &[],
            pool.instances as f64,
        );
        samples.gauge("instance_pool_memories", "Linear memories of the pool in use", &[], pool.memories as f64);
        samples.counter(
            "jobs_forwarded",
            "Jobs this node passed on to the node that serves their bucket",
            &[],
            self.inner.jobs_forwarded.load(Ordering::Relaxed) as f64,
        );
        let commits = &self.inner.commits.stats;
        samples.counter(
            "store_commits",
            "Synced writes of the group committer (an fsync each on a durable node)",
            &[],
            commits.commits.load(Ordering::Relaxed) as f64,
        );
        samples.counter(
            "store_change_sets",
            "Change sets (log entries on a cluster node) in those writes: divided by store_commits, the entries per fsync",
            &[],
            commits.change_sets.load(Ordering::Relaxed) as f64,
        );
        samples.gauge(
            "uptime_seconds",
            "Seconds since the node started",
            &[],
            self.inner.started.elapsed().as_secs_f64(),
        );
    }

    /// Runs a job; `phases` gets how long it waited for its executor, ran and waited for its
    /// commit, as far as it got.
    async fn run_job_inner(
        &self,
        bucket: &[u8],
        flock: u32,
        module: &str,
        input: Vec<u8>,
        read_only: bool,
        phases: &mut Vec<(Phase, Duration)>,
    ) -> Result<JobOutput> {
        proto::check_bucket_key(bucket)?;
        self.check_input(&input, "the job input")?;
        let program = match Builtin::from_module(module) {
            Some(op) => Program::Builtin(op),
            None => Program::Wasm(self.module(module).await?),
        };
        let _running = Running::count(&self.inner.jobs_running);
        let (reply, answer) = oneshot::channel();
        let job = ShardJob {
            bucket: bucket.to_vec(),
            flock,
            program,
            module_name: module.to_owned(),
            input,
            read_only,
            reply,
        };
        let shard = &self.inner.shards[flock as usize % self.inner.shards.len()];
        shard.try_send(ShardMsg::Job(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => error(
                ErrorCode::Overloaded,
                format!(
                    "the node has {} jobs queued for this bucket's executor; retry with back-off or use another node",
                    self.inner.config.shard_queue_max
                ),
            ),
            mpsc::error::TrySendError::Closed(_) => shutting_down(),
        })?;
        let queued = Instant::now();
        let (executed, timing) = answer.await.map_err(|_| shutting_down())?;
        phases.push((Phase::Queue, timing.began.saturating_duration_since(queued)));
        phases.push((Phase::Run, timing.ran));
        let ran = Instant::now();
        match executed.wait {
            WaitFor::Nothing => {}
            WaitFor::Seq(seq) => self.inner.commits.wait_durable(seq).await?,
            WaitFor::Ticket(ticket) => ticket.await.map(drop)?,
            WaitFor::Read { term, seen } => {
                if let Some(ticket) = seen {
                    ticket.await?;
                }
                let replicator =
                    self.inner.replicator.as_ref().ok_or_else(|| error(ErrorCode::Internal, "no replicator"))?;
                replicator.confirm_lead(flock, term).await?;
            }
        }
        phases.push((Phase::Commit, ran.elapsed()));
        let finished = executed.result?;
        Ok(JobOutput {
            output: finished.output,
            bucket_version: finished.bucket_version,
            flock,
            node: self.id().to_owned(),
        })
    }

    /// Refuses `input` (`what` names it) over `--input-bytes-max`.
    fn check_input(&self, input: &[u8], what: &str) -> Result<()> {
        let max = self.inner.config.limits.input_bytes_max;
        if input.len() > max {
            return Err(error(
                ErrorCode::InputTooLarge,
                format!("{what} is {} bytes, over the {max}-byte limit (raise --input-bytes-max)", input.len()),
            ));
        }
        Ok(())
    }

    /// One committed item (as this node has applied it).
    pub async fn get_item(&self, bucket: &[u8], item: &str) -> Result<Vec<u8>> {
        proto::check_bucket_key(bucket)?;
        proto::check_item_key(item)?;
        // What this node applied so far may still be on its way to the store.
        self.inner.commits.settle().await;
        self.inner.store.get_item(bucket, item)?.ok_or_else(|| {
            error(ErrorCode::ItemNotFound, format!("bucket `{}` has no item `{item}`", String::from_utf8_lossy(bucket)))
        })
    }

    /// Committed item keys of a bucket with `prefix`, strictly after `start_after`, at most
    /// `limit` (capped at [`LIST_PAGE_MAX`]).
    pub async fn list_items(
        &self,
        bucket: &[u8],
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        proto::check_bucket_key(bucket)?;
        self.inner.commits.settle().await;
        Ok(self.inner.store.list_items(bucket, prefix, start_after, limit.min(LIST_PAGE_MAX) as usize)?)
    }

    /// How many buckets this node stores (those of every flock it herds), its acknowledged
    /// writes included.
    pub async fn bucket_count(&self) -> Result<u64> {
        self.inner.commits.settle().await;
        Ok(self.inner.store.bucket_count()?)
    }

    /// Up to `limit` (at most [`LIST_PAGE_MAX`]) of the buckets this node stores, with their
    /// flocks, in (flock, key) order after `after`: its committed state, read a page at a time.
    pub async fn bucket_keys(&self, after: Option<(u32, &[u8])>, limit: usize) -> Result<Vec<(u32, Vec<u8>)>> {
        self.inner.commits.settle().await;
        Ok(self.inner.store.bucket_keys(after, limit.min(LIST_PAGE_MAX as usize))?)
    }

    /// The best node for `bucket`: this one, on a node on its own.
    pub async fn canary(&self, bucket: &[u8]) -> Result<Canary> {
        proto::check_bucket_key(bucket)?;
        // Its bucket version is read from the store.
        self.inner.commits.settle().await;
        let urls = self.urls();
        Ok(Canary {
            url: urls.http.unwrap_or_default(),
            quic: urls.quic,
            node: self.id().to_owned(),
            flock: proto::flock_of(bucket, self.flock_count()),
            role: "leader".into(),
            bucket_version: self.inner.store.bucket_version(bucket)?,
        })
    }

    /// The flock map: on a single node, every flock is herded and led here.
    pub fn flocks(&self) -> FlockMapInfo {
        let me = self.id().to_owned();
        FlockMapInfo {
            version: 0,
            nodes: vec![(me.clone(), self.urls().http.unwrap_or_default())],
            flocks: (0..self.flock_count())
                .map(|flock| proto::FlockInfo {
                    flock,
                    herders: vec![me.clone()],
                    leader: Some(me.clone()),
                    settled: true,
                    log_purged: 0,
                })
                .collect(),
            meta_log_purged: 0,
        }
    }

    /// Jobs queued or running on this node's executors.
    pub fn load(&self) -> u64 {
        self.inner.shards.iter().map(|s| (s.max_capacity() - s.capacity()) as u64).sum()
    }

    /// The URLs the servers answer at.
    pub fn node_urls(&self) -> NodeUrls {
        self.urls()
    }

    /// Counters and settings.
    pub fn status(&self) -> Status {
        let cache = self.cache_stats();
        let stats = &self.inner.commits.stats;
        let urls = self.urls();
        Status {
            node: self.id().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            http_url: urls.http,
            quic_url: urls.quic,
            uptime_s: self.inner.started.elapsed().as_secs(),
            flock_count: self.flock_count(),
            jobs_ok: self.inner.jobs_ok.load(Ordering::Relaxed),
            jobs_failed: self.inner.jobs_failed.load(Ordering::Relaxed),
            jobs_forwarded: self.inner.jobs_forwarded.load(Ordering::Relaxed),
            jobs_running: self.inner.jobs_running.load(Ordering::Relaxed),
            modules: self.inner.names.read().unwrap_or_else(|p| p.into_inner()).len() as u64,
            cache_buckets: cache.buckets,
            cache_bytes: cache.bytes,
            cache_bytes_max: self.inner.config.cache_bytes_max as u64,
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            commits: stats.commits.load(Ordering::Relaxed),
            change_sets: stats.change_sets.load(Ordering::Relaxed),
        }
    }

    /// The cache counters, summed over shards.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.shard_stats.iter().map(|s| s.read()).fold(CacheStats::default(), |a, b| CacheStats {
            hits: a.hits + b.hits,
            misses: a.misses + b.misses,
            buckets: a.buckets + b.buckets,
            bytes: a.bytes + b.bytes,
        })
    }

    /// Finishes queued jobs, commits what they wrote and stops the executor and committer threads.
    /// Jobs submitted afterwards fail with `shutting_down`.
    pub async fn shutdown(&self) {
        for shard in &self.inner.shards {
            let _ = shard.send(ShardMsg::Stop).await;
        }
        let node = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let threads: Vec<_> =
                node.inner.shard_threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
            for thread in threads {
                let _ = thread.join();
            }
            node.inner.commits.stop();
        })
        .await;
    }

    /// The store (the cluster's replicated logs and state machines write through it).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The group committer.
    pub fn commits(&self) -> &Arc<CommitLog> {
        &self.inner.commits
    }

    /// A follower applied these versions of buckets of `flock`, queued as committer write
    /// `seq`: older cached copies are stale. The executor drops them before it takes its next
    /// message, and loads no bucket from the store for a follower's job before `seq` is written
    /// there. One message wakes it for every bucket that gathers until it does (a follower
    /// applies a committer transaction's worth at once).
    pub fn applied(&self, flock: u32, buckets: Vec<(Vec<u8>, u64)>, seq: u64) {
        let i = flock as usize % self.inner.shards.len();
        if self.inner.applied[i].add(buckets, seq) {
            // A full queue needs no wake-up: the executor has messages to take.
            let _ = self.inner.shards[i].try_send(ShardMsg::Applied);
        }
    }

    /// A flock's state was replaced: drop every cached bucket of it.
    pub async fn drop_flock(&self, flock: u32) {
        let shard = &self.inner.shards[flock as usize % self.inner.shards.len()];
        let _ = shard.send(ShardMsg::DropFlock(flock)).await;
    }

    /// A module arrived through replication (already in the store): make its name resolve, and
    /// drop the code of the module it pointed to before if no name points to that any more.
    pub fn module_replicated(&self, name: &str, id: ModuleId, size: u64) {
        let old = self.inner.names.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), (id, size));
        if let Some((old, _)) = old.filter(|(old, _)| *old != id) {
            self.collect_code(&old);
        }
    }

    /// A module name was deleted (in the store already): it resolves no more, and the module's
    /// code goes if no name points to it.
    pub fn module_removed(&self, name: &str) {
        let old = self.inner.names.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Some((old, _)) = old {
            tracing::info!(%name, id = %module_id_text(&old), "module name deleted");
            self.collect_code(&old);
        }
    }

    fn collect_code(&self, id: &ModuleId) {
        let named = self.inner.names.read().unwrap_or_else(|p| p.into_inner()).values().any(|(n, _)| n == id);
        if !named {
            self.inner.runtime.modules.forget(id);
        }
    }

    /// Checks and compiles a module without storing it; returns its id. A cluster stores it by
    /// replicating the bytes.
    pub async fn check_module(&self, name: &str, wasm: Vec<u8>) -> Result<(ModuleId, Vec<u8>)> {
        check_module_name(name)?;
        let max = self.inner.config.limits.module_bytes_max;
        if wasm.len() > max {
            return Err(error(
                ErrorCode::ModuleTooLarge,
                format!("the module is {} bytes, over the {max}-byte limit (raise --module-bytes-max)", wasm.len()),
            ));
        }
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let module = node.inner.runtime.modules.compile(&wasm)?;
            Ok((module.id, wasm))
        })
        .await
        .map_err(|e| error(ErrorCode::Internal, format!("module check task failed: {e}")))?
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.config.data_dir
    }
}

/// Every module name with its id and size (read once at start).
fn load_module_names(store: &dyn Store) -> Result<HashMap<String, (ModuleId, u64)>, crate::error::StoreError> {
    let mut names = HashMap::new();
    for (name, id) in store.module_names()? {
        let size = store.module_size(&id)?.unwrap_or(0);
        names.insert(name, (id, size));
    }
    Ok(names)
}

fn shutting_down() -> RemoteError {
    error(ErrorCode::ShuttingDown, "the node is shutting down; retry on another node")
}

fn check_module_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MODULE_NAME_BYTES_MAX
        && !name.starts_with("sha256:")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(error(
            ErrorCode::BadRequest,
            format!(
                "module name `{name}` must be 1 to {MODULE_NAME_BYTES_MAX} characters of A-Z, a-z, 0-9, `-`, `_`, `.`"
            ),
        ))
    }
}
