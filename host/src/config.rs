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
            compile_timeout_ms: 30_000,
            compile_memory_bytes_max: 1 << 30,
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
    /// Decoded-bucket cache size.
    pub cache_bytes_max: usize,
    /// Acknowledge a job only after its change set is fsync'd. Off only for tests and benchmarks.
    pub durable: bool,
    /// Job executor threads; each owns a share of the buckets and of the cache.
    pub shards: usize,
    /// Jobs waiting per executor before callers wait (back-pressure).
    pub shard_queue_max: usize,
    /// Change sets waiting for the committer before executors wait.
    pub commit_queue_max: usize,
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
        NodeConfig {
            data_dir: data_dir.into(),
            flock_count: 256,
            cache_bytes_max: 64 << 20,
            durable: true,
            shards: cores,
            shard_queue_max: 1024,
            commit_queue_max: 4096,
            limits: Limits::default(),
            compiler: None,
        }
    }
}
