//! Node configuration and job limits, with their defaults (`grex serve --help` lists them).

use std::path::PathBuf;
use std::time::Duration;

/// Limits on one job. Each breach ends the job with its own error code and commits nothing.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock deadline (`job_timeout`).
    pub timeout_ms: u64,
    /// Fuel (roughly, wasm instructions) per job; `None` turns metering off (`job_fuel_exhausted`).
    pub fuel: Option<u64>,
    /// Linear memory of the job's instance (`job_memory_limit`).
    pub memory_bytes_max: usize,
    /// Input bytes (`input_too_large`).
    pub input_bytes_max: usize,
    /// Output bytes (`output_too_large`).
    pub output_bytes_max: usize,
    /// One item's value (`item_too_large`).
    pub item_bytes_max: usize,
    /// Keys plus values written by one job (`change_set_too_large`).
    pub change_set_bytes_max: usize,
    /// An uploaded module (`module_too_large`).
    pub module_bytes_max: usize,
    /// Log lines one job may write; more are counted and dropped.
    pub log_lines_max: u32,
    /// How long compiling one module may take (`module_too_complex`; only when compiling out of
    /// process, see [`NodeConfig::compiler`]).
    pub compile_timeout_ms: u64,
    /// The heap compiling one module may use (`module_too_complex`; likewise).
    pub compile_memory_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: 2_000,
            fuel: None,
            memory_bytes_max: 64 << 20,
            input_bytes_max: 1 << 20,
            output_bytes_max: 1 << 20,
            item_bytes_max: 16 << 20,
            change_set_bytes_max: 32 << 20,
            module_bytes_max: 32 << 20,
            log_lines_max: 64,
            compile_timeout_ms: 120_000,
            compile_memory_bytes_max: 2 << 30,
        }
    }
}

impl Limits {
    /// The deadline as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Directory of the node's redb file, certificates and identity.
    pub data_dir: PathBuf,
    /// Flock count for a new data directory (a power of two); an existing one keeps its own.
    pub flock_count: u32,
    /// Decoded-bucket cache size (a share of the memory budget: [`NodeConfig::set_memory_budget`]).
    pub cache_bytes_max: usize,
    /// The state file's page cache (redb's, reads and unsynced writes together).
    pub store_cache_bytes: usize,
    /// Log entries the consensus engine holds in memory, over all flocks: uncommitted ones,
    /// and a recent tail for followers that lag a little.
    pub consensus_memory_bytes: usize,
    /// Acknowledge a job only after its change set is fsync'd. Off only for tests and benchmarks.
    pub durable: bool,
    /// Job executor threads; each owns a share of the buckets and of the cache.
    pub shards: usize,
    /// Jobs waiting per executor before callers wait (back-pressure).
    pub shard_queue_max: usize,
    /// Change sets waiting for the committer before executors wait.
    pub commit_queue_max: usize,
    /// Bytes of data in writes waiting for the committer (or deferred by it) before submitters
    /// wait; a write larger than this goes alone.
    pub commit_queue_bytes_max: usize,
    /// Request bytes of pipelined Redis commands waiting or running, over every connection; a
    /// connection whose next command does not fit waits for its own to be answered.
    pub pipelined_bytes_max: usize,
    /// Bytes of jobs (bucket key, module name, input) and module uploads in flight through the
    /// node's front ends, queued, forwarded or running; one that does not fit is refused with
    /// `overloaded`, unless it is alone.
    pub jobs_bytes_max: usize,
    /// Bytes of large requests received in part (what each holds beyond 64 KiB), over every
    /// HTTP, QUIC and Redis connection; one that would go over is refused with `overloaded`,
    /// unless it is alone.
    pub request_buffer_bytes_max: usize,
    /// Limits on each job.
    pub limits: Limits,
    /// A `grex` binary to compile modules in, one child process per compile, under
    /// [`Limits::compile_timeout_ms`] and [`Limits::compile_memory_bytes_max`]. `None` compiles in
    /// this process, with no bound on time or memory (for embedding, where no `grex` binary is
    /// at hand); `grex serve` and `grex dev` set it to themselves.
    pub compiler: Option<PathBuf>,
}

impl NodeConfig {
    /// Defaults for a node keeping its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut config = NodeConfig {
            data_dir: data_dir.into(),
            flock_count: 256,
            cache_bytes_max: 0,
            store_cache_bytes: 0,
            consensus_memory_bytes: 0,
            durable: true,
            shards: cores,
            shard_queue_max: 1024,
            commit_queue_max: 4096,
            commit_queue_bytes_max: 0,
            pipelined_bytes_max: 0,
            jobs_bytes_max: 0,
            request_buffer_bytes_max: 0,
            limits: Limits::default(),
            compiler: None,
        };
        config.set_memory_budget(NODE_MEMORY_BYTES_DEFAULT);
        config
    }

    /// Shares `bytes` of memory among the node's caches and buffers: 3/16 each for the
    /// decoded-bucket cache and the state file's page cache, 1/16 each for consensus log entries,
    /// writes waiting for the committer, pipelined Redis commands, jobs in flight and large
    /// requests arriving, and the rest (5/16) for what is sized by use within its own limits:
    /// the log's index (12 bytes per entry kept, up to `--snapshot-logs` per flock), connections
    /// and their frames, the wasm runtime, and the allocator's slack (docs/benchmarks.md,
    /// "Memory", measures them). Running jobs' linear memory is bounded apart, by
    /// [`Limits::memory_bytes_max`] per executor, and up to 32 MiB of it per executor stays
    /// resident between jobs (`wasm::engine`).
    pub fn set_memory_budget(&mut self, bytes: usize) {
        self.cache_bytes_max = bytes / 16 * 3;
        self.store_cache_bytes = bytes / 16 * 3;
        self.consensus_memory_bytes = bytes / 16;
        self.commit_queue_bytes_max = bytes / 16;
        self.pipelined_bytes_max = bytes / 16;
        self.jobs_bytes_max = bytes / 16;
        self.request_buffer_bytes_max = bytes / 16;
    }
}

/// A node's memory budget unless set (`--node-memory-mib`).
pub const NODE_MEMORY_BYTES_DEFAULT: usize = 256 << 20;
/// The smallest budget a node runs with.
pub const NODE_MEMORY_BYTES_MIN: usize = 32 << 20;
