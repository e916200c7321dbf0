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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::cache::{BucketCache, CacheStats, CachedBucket, CommitSeqs};
use super::clock::Clock;
use super::commit::CommitLog;
use super::{Replicator, Ticket};
use crate::data::{BucketData, Builtin, JobView, builtin};
use crate::error::{ErrorCode, RemoteError, error};
use crate::storage::Store;
use crate::wasm::{JobInput, JobRun, LoadedModule, Runtime};

/// What a job runs: a compiled module, or a built-in operation.
#[derive(Clone)]
pub(crate) enum Program {
    Wasm(Arc<LoadedModule>),
    Builtin(Builtin),
}

/// A job for a shard.
pub(crate) struct ShardJob {
    pub(crate) bucket: Vec<u8>,
    pub(crate) flock: u32,
    pub(crate) program: Program,
    pub(crate) module_name: String,
    pub(crate) input: Vec<u8>,
    pub(crate) read_only: bool,
    pub(crate) reply: oneshot::Sender<(Executed, Timing)>,
}

/// A scan's job on one bucket as a view of the store held it (or a reduce job, on an empty
/// bucket): read-only, run against `data`, not the cache.
pub(crate) struct ScanJob {
    pub(crate) bucket: Vec<u8>,
    pub(crate) data: BucketData,
    pub(crate) flock: u32,
    pub(crate) module: Arc<LoadedModule>,
    pub(crate) module_name: Arc<str>,
    pub(crate) input: Arc<[u8]>,
    pub(crate) reply: oneshot::Sender<Result<Vec<u8>, RemoteError>>,
}

/// When an executor took a job up, and how long running it took.
pub(crate) struct Timing {
    pub(crate) began: Instant,
    pub(crate) ran: Duration,
}

/// What a shard did with a job. The caller must wait for `wait` before it answers: the job may
/// have seen (or made) writes that are not durable yet.
pub(crate) struct Executed {
    pub(crate) result: Result<Finished, RemoteError>,
    pub(crate) wait: WaitFor,
}

/// What a job's answer waits for.
pub(crate) enum WaitFor {
    /// Nothing: the job saw only committed state.
    Nothing,
    /// A standalone node's commit sequence.
    Seq(u64),
    /// The job's change set, proposed to its flock's log. Its commit in this leader's term shows
    /// that no other leader took over before the job ran.
    Ticket(Ticket),
    /// A job that changed nothing, run on its flock's leader: the last change set of its bucket
    /// it saw (if any), then a confirmation that this node still leads the flock
    /// ([`super::Replicator::confirm_lead`]), so it did not read a deposed leader's state.
    Read { term: u64, seen: Option<Ticket> },
}

/// A job that returned output.
pub(crate) struct Finished {
    pub(crate) output: Vec<u8>,
    pub(crate) bucket_version: u64,
}

pub(crate) enum ShardMsg {
    Job(ShardJob),
    Scan(ScanJob),
    /// Buckets a follower applied wait in [`AppliedBuckets`] (taken before every message).
    Applied,
    /// A flock's state was replaced (a snapshot was installed): drop its cached buckets.
    DropFlock(u32),
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

/// The most buckets applied that wait for their executor; past it, the executor drops every
/// follower's copy it caches instead of checking them one by one (while a long job holds it, say).
const APPLIED_WAITING_MAX: usize = 16_384;

/// Buckets (and versions) a follower applied, waiting for their executor: a cached follower's
/// copy of one of them older than that version is stale.
#[derive(Default)]
pub(crate) struct AppliedBuckets {
    waiting: Mutex<AppliedWaiting>,
}

#[derive(Default)]
struct AppliedWaiting {
    buckets: Vec<(Vec<u8>, u64)>,
    /// More came than [`APPLIED_WAITING_MAX`]: every follower's copy is stale.
    overflowed: bool,
    /// The committer write of the last of them.
    seq: u64,
}

impl AppliedBuckets {
    /// Adds buckets that committer write `seq` applies; true if none waited before, so the
    /// executor needs a message to wake it.
    pub(crate) fn add(&self, buckets: Vec<(Vec<u8>, u64)>, seq: u64) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.seq = waiting.seq.max(seq);
        let idle = waiting.buckets.is_empty() && !waiting.overflowed;
        if waiting.overflowed || waiting.buckets.len() + buckets.len() > APPLIED_WAITING_MAX {
            waiting.overflowed = true;
            waiting.buckets = Vec::new();
        } else if idle {
            waiting.buckets = buckets;
        } else {
            waiting.buckets.extend(buckets);
        }
        idle
    }

    fn take(&self) -> AppliedWaiting {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(crate) struct Shard {
    pub(crate) applied: Arc<AppliedBuckets>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) commits: Arc<CommitLog>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cache: BucketCache,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) last_timestamp_ms: u64,
    pub(crate) replicator: Option<Arc<dyn Replicator>>,
    pub(crate) flock_count: u32,
    /// The committer write of the last follower's apply seen: the store holds the buckets it
    /// made stale once that is written.
    pub(crate) applied_seq: u64,
}

impl Shard {
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<ShardMsg>) {
        while let Some(msg) = rx.blocking_recv() {
            self.drop_applied();
            match msg {
                ShardMsg::Job(job) => {
                    let began = Instant::now();
                    let executed = match std::panic::catch_unwind(AssertUnwindSafe(|| self.execute(&job))) {
                        Ok(executed) => executed,
                        Err(_) => self.recover_from_panic(),
                    };
                    let _ = job.reply.send((executed, Timing { began, ran: began.elapsed() }));
                    self.stats.publish(self.cache.stats());
                }
                ShardMsg::Scan(job) => {
                    let ScanJob { bucket, data, flock, module, module_name, input, reply } = job;
                    let run = AssertUnwindSafe(|| {
                        self.last_timestamp_ms = self.clock.now_ms().max(self.last_timestamp_ms);
                        let job = JobInput {
                            bucket: &bucket,
                            flock,
                            module_name: &module_name,
                            input: &input,
                            read_only: true,
                            timestamp_ms: self.last_timestamp_ms,
                        };
                        self.runtime.run(&module, data, &job).1.map(|run| run.output)
                    });
                    let result = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                        tracing::error!("an executor panicked while running a scan's job");
                        Err(error(ErrorCode::Internal, "the node hit an internal error running this job"))
                    });
                    let _ = reply.send(result);
                }
                ShardMsg::Applied => {}
                ShardMsg::DropFlock(flock) => {
                    let flocks = self.flock_count;
                    self.cache.retain(|b, _| crate::data::flock_of(b, flocks) != flock);
                }
                ShardMsg::Stop => break,
            }
        }
    }

    /// Drops the cached copies that buckets applied since the last message made stale. A
    /// follower's copies are built under term 0; a leader's, under its term, are not touched
    /// (it applies nothing it did not propose, and a node that leads again reloads).
    fn drop_applied(&mut self) {
        let AppliedWaiting { buckets, overflowed, seq } = self.applied.take();
        self.applied_seq = self.applied_seq.max(seq);
        if overflowed {
            self.cache.retain(|_, entry| entry.term != 0);
        }
        for (bucket, version) in buckets {
            self.cache.remove_if(&bucket, |entry| entry.data.version < version);
        }
    }

    /// A host bug panicked mid-job: the bucket it held is gone from the cache, and reloading it
    /// from disk is only right once every change set this shard queued is durable. Wait for that,
    /// drop the cache, and keep serving.
    fn recover_from_panic(&mut self) -> Executed {
        tracing::error!("an executor panicked while running a job; reloading its buckets from disk");
        let wait = self.commits.block_until_written(self.commits.submitted_seq());
        self.cache.clear();
        let result = match wait {
            Ok(()) => Err(error(
                ErrorCode::Internal,
                "the node hit an internal error running this job; it may have committed, so read the bucket before retrying",
            )),
            Err(e) => Err(e),
        };
        Executed { result, wait: WaitFor::Nothing }
    }

    /// Runs a built-in against the bucket through a view, as a job would.
    fn run_builtin(&self, op: Builtin, data: BucketData, job: &ShardJob) -> (BucketData, Result<JobRun, RemoteError>) {
        if job.read_only && !op.read_only() {
            let e = error(ErrorCode::BadRequest, "this operation changes data, so it cannot run read-only");
            return (data, Err(e));
        }
        let args = match builtin::decode_args(&job.input) {
            Ok(args) => args,
            Err(e) => return (data, Err(e)),
        };
        let limits = &self.runtime.limits;
        let mut view = JobView::new(data, limits.item_bytes_max, limits.change_set_bytes_max);
        let reply = op.run(&mut view, &args);
        let (data, change) = view.finish(&job.bucket, job.flock);
        let run = reply.map(|reply| JobRun {
            output: grex_client::proto::encode_frame(&reply).expect("replies always encode"),
            change,
        });
        (data, run)
    }

    fn execute(&mut self, job: &ShardJob) -> Executed {
        let fail = |result| Executed { result: Err(result), wait: WaitFor::Nothing };
        if let Some(failure) = self.commits.failure() {
            // The cache may hold writes that never reached disk.
            self.cache.clear();
            return fail(failure);
        }
        let replicator = self.replicator.clone();
        // In a cluster, a mutating job runs only on the flock's ready leader, against state built
        // under its current term; a read-only job may run on a follower's committed copy (term 0).
        let term = match &replicator {
            None => 0,
            Some(r) => match r.leader_term(job.flock) {
                Some(term) => term,
                None if job.read_only => 0,
                None => {
                    return fail(error(
                        ErrorCode::Unavailable,
                        "this node no longer leads the bucket's flock; retry (the cluster routes it to the new leader)",
                    ));
                }
            },
        };
        let entry = match self.cache.take(&job.bucket) {
            Some(entry) if entry.term == term && !entry.failed() => entry,
            stale => {
                // A committed change set's effects may still be on their way to the store: the
                // leader's own (its entry knows which write), or, for a follower's copy, whatever
                // it applied last.
                let leader_seq = stale.and_then(|e| e.written_seq(self.commits.submitted_seq()));
                let follower_seq = (term == 0).then_some(self.applied_seq);
                if let Some(seq) = leader_seq.max(follower_seq)
                    && let Err(e) = self.commits.block_until_written(seq)
                {
                    return fail(e);
                }
                match self.store.load_bucket(&job.bucket) {
                    Ok(data) => CachedBucket::loaded(data, term),
                    Err(e) => return fail(e.into()),
                }
            }
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
        let CachedBucket { data, mut last_seq, mut pending, .. } = entry;
        let (mut data, outcome) = match &job.program {
            Program::Wasm(module) => self.runtime.run(module, data, &input),
            Program::Builtin(op) => self.run_builtin(*op, data, job),
        };
        let mut proposed = false;
        let result = match outcome {
            Ok(run) => {
                if let Some(change) = run.change {
                    proposed = replicator.is_some();
                    let submitted = match &replicator {
                        None => {
                            data.apply(&change);
                            self.commits.submit(change).map(|seq| last_seq = seq)
                        }
                        // Encoded by the proposal: its items move into the cached copy.
                        Some(r) => r.propose(job.flock, &change).map(|ticket| {
                            pending = Some(ticket);
                            data.apply_owned(change);
                        }),
                    };
                    if let Err(e) = submitted {
                        self.cache.remove_if(&job.bucket, |_| true);
                        return fail(e);
                    }
                }
                Ok(Finished { output: run.output, bucket_version: data.version })
            }
            Err(e) => Err(e),
        };
        let wait = match (&replicator, term) {
            (None, _) => WaitFor::Seq(last_seq),
            // A follower's read-only job: its committed copy, as documented.
            (Some(_), 0) => WaitFor::Nothing,
            (Some(_), _) if proposed => WaitFor::Ticket(pending.clone().expect("proposed above")),
            (Some(_), _) => WaitFor::Read { term, seen: pending.clone() },
        };
        let entry = CachedBucket { data, last_seq, term, pending, failed_at: Default::default() };
        let seqs = CommitSeqs { durable: self.commits.durable_seq(), submitted: self.commits.submitted_seq() };
        self.cache.put(job.bucket.clone(), entry, seqs);
        Executed { result, wait }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_buckets_ask_for_one_wake_up_until_taken_and_past_the_bound_stand_for_every_copy() {
        let applied = AppliedBuckets::default();
        assert!(applied.add(vec![(b"a".to_vec(), 1)], 7), "the first wakes the executor");
        assert!(!applied.add(vec![(b"b".to_vec(), 2)], 9), "the rest wait with it");
        let taken = applied.take();
        assert_eq!(taken.buckets, vec![(b"a".to_vec(), 1), (b"b".to_vec(), 2)]);
        assert_eq!(taken.seq, 9, "the last write's sequence");
        assert!(!taken.overflowed);
        assert!(applied.add(vec![(b"c".to_vec(), 3)], 10), "taken: the next wakes it again");
        let many = (0..APPLIED_WAITING_MAX as u64).map(|i| (i.to_be_bytes().to_vec(), i)).collect();
        assert!(!applied.add(many, 11));
        let taken = applied.take();
        assert!(taken.overflowed && taken.buckets.is_empty(), "past the bound, no list is kept");
        assert_eq!(taken.seq, 11, "past the bound, the sequence is kept");
        assert!(applied.add(Vec::new(), 12) && !applied.take().overflowed);
    }
}
