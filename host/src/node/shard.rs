//! Executor shards: threads that each own a share of the buckets (by flock) and run their jobs one
//! at a time.
//!
//! Owning buckets by thread makes jobs on one bucket run one after another with no locks, and
//! lets a shard keep its part of the cache to itself. A job's change set is applied to the cached
//! bucket at once and queued for the committer, so the next job on the bucket sees it; the client
//! is answered only when it is durable (the caller waits for that, not the shard). The number of
//! shards equals the wasm pool's size, so a running job always finds an instance slot; callers
//! that find a shard's queue full get `overloaded`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::cache::{BucketCache, CacheStats, CachedBucket};
use super::clock::Clock;
use super::commit::CommitLog;
use crate::error::{ErrorCode, RemoteError, error};
use crate::storage::Store;
use crate::wasm::{JobInput, LoadedModule, Runtime};

/// A job for a shard.
pub(crate) struct ShardJob {
    pub(crate) bucket: Vec<u8>,
    pub(crate) flock: u32,
    pub(crate) module: Arc<LoadedModule>,
    pub(crate) module_name: String,
    pub(crate) input: Vec<u8>,
    pub(crate) read_only: bool,
    pub(crate) reply: oneshot::Sender<Executed>,
}

/// What a shard did with a job. The caller must wait until `wait_seq` is durable before it
/// answers: the job may have seen (or made) writes that are not on disk yet.
pub(crate) struct Executed {
    pub(crate) result: Result<Finished, RemoteError>,
    pub(crate) wait_seq: u64,
}

/// A job that returned output.
pub(crate) struct Finished {
    pub(crate) output: Vec<u8>,
    pub(crate) bucket_version: u64,
}

pub(crate) enum ShardMsg {
    Job(ShardJob),
    Stop,
}

/// Counters a shard publishes after every job.
#[derive(Default)]
pub(crate) struct ShardStats {
    hits: AtomicU64,
    misses: AtomicU64,
    buckets: AtomicU64,
    bytes: AtomicU64,
}

impl ShardStats {
    fn publish(&self, s: CacheStats) {
        self.hits.store(s.hits, Ordering::Relaxed);
        self.misses.store(s.misses, Ordering::Relaxed);
        self.buckets.store(s.buckets, Ordering::Relaxed);
        self.bytes.store(s.bytes, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            buckets: self.buckets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

pub(crate) struct Shard {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) commits: Arc<CommitLog>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cache: BucketCache,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) last_timestamp_ms: u64,
}

impl Shard {
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<ShardMsg>) {
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                ShardMsg::Job(job) => {
                    let executed = match std::panic::catch_unwind(AssertUnwindSafe(|| self.execute(&job))) {
                        Ok(executed) => executed,
                        Err(_) => self.recover_from_panic(),
                    };
                    let _ = job.reply.send(executed);
                    self.stats.publish(self.cache.stats());
                }
                ShardMsg::Stop => break,
            }
        }
    }

    /// A host bug panicked mid-job: the bucket it held is gone from the cache, and reloading it
    /// from disk is only right once every change set this shard queued is durable. Wait for that,
    /// drop the cache, and keep serving.
    fn recover_from_panic(&mut self) -> Executed {
        tracing::error!("an executor panicked while running a job; reloading its buckets from disk");
        let submitted = self.commits.submitted_seq();
        let wait = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(self.commits.wait_durable(submitted)));
        self.cache.clear();
        let result = match wait {
            Ok(Ok(())) => Err(error(
                ErrorCode::Internal,
                "the node hit an internal error running this job; it may have committed, so read the bucket before retrying",
            )),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(error(ErrorCode::Internal, format!("executor recovery failed: {e}"))),
        };
        Executed { result, wait_seq: 0 }
    }

    fn execute(&mut self, job: &ShardJob) -> Executed {
        if let Some(failure) = self.commits.failure() {
            // The cache may hold writes that never reached disk.
            self.cache.clear();
            return Executed { result: Err(failure), wait_seq: 0 };
        }
        let entry = match self.cache.take(&job.bucket) {
            Some(entry) => entry,
            None => match self.store.load_bucket(&job.bucket) {
                Ok(data) => CachedBucket { data, last_seq: 0 },
                Err(e) => return Executed { result: Err(e.into()), wait_seq: 0 },
            },
        };
        // Timestamps never go backwards for a bucket, whatever the system clock does.
        self.last_timestamp_ms = self.clock.now_ms().max(self.last_timestamp_ms);
        let input = JobInput {
            bucket: &job.bucket,
            flock: job.flock,
            module_name: &job.module_name,
            input: &job.input,
            read_only: job.read_only,
            timestamp_ms: self.last_timestamp_ms,
        };
        let (mut data, outcome) = self.runtime.run(&job.module, entry.data, &input);
        let mut last_seq = entry.last_seq;
        let result = match outcome {
            Ok(run) => {
                if let Some(change) = run.change {
                    data.apply(&change);
                    match self.commits.submit(change) {
                        Ok(seq) => last_seq = seq,
                        Err(e) => {
                            self.cache.clear();
                            return Executed { result: Err(e), wait_seq: 0 };
                        }
                    }
                }
                Ok(Finished { output: run.output, bucket_version: data.version })
            }
            Err(e) => Err(e),
        };
        self.cache.put(job.bucket.clone(), CachedBucket { data, last_seq }, self.commits.durable_seq());
        Executed { result, wait_seq: last_seq }
    }
}
