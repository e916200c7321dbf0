//! The group committer: one thread that turns a stream of change sets into as few durable
//! transactions as it can.
//!
//! Executors hand change sets to [`CommitLog::submit`], which numbers them (a sequence that grows
//! by one per change set, in submission order) and queues them. The committer thread takes
//! everything queued, commits it in one transaction (one fsync), and publishes the highest
//! sequence now durable. While it waits on the disk, the next batch queues up, so under load one
//! fsync covers many jobs without any timer. Callers wait for `durable >= seq` before they answer.
//!
//! If a commit fails, the log turns [`Durable::Failed`] for good: the cache may hold writes that
//! never reached disk, so the node refuses writes until it is restarted (fail-stop).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::data::ChangeSet;
use crate::error::{ErrorCode, RemoteError, error};
use crate::storage::Store;

/// The most change sets in one transaction; bounds a commit's memory and latency.
pub const BATCH_CHANGE_SETS_MAX: usize = 4096;

/// How far the log has reached disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Durable {
    /// Every change set with a sequence up to this one is durable.
    Upto(u64),
    /// A commit failed; nothing after `durable` will ever be.
    Failed {
        /// The last sequence that did become durable.
        durable: u64,
        /// What failed.
        reason: String,
    },
}

impl Durable {
    /// The highest sequence that is durable (the last good one after a failure).
    pub fn seq(&self) -> u64 {
        match self {
            Durable::Upto(seq) | Durable::Failed { durable: seq, .. } => *seq,
        }
    }
}

enum CommitMsg {
    Change(u64, ChangeSet),
    Stop,
}

/// Commit counters.
#[derive(Default)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Change sets committed.
    pub change_sets: AtomicU64,
}

/// The sending side of the group committer.
pub struct CommitLog {
    /// Next sequence to hand out, and the queue; one lock keeps queue order equal to sequence order.
    queue: Mutex<(u64, SyncSender<CommitMsg>)>,
    durable: watch::Sender<Durable>,
    pub(crate) stats: Arc<CommitStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CommitLog {
    /// Starts the committer thread over `store`, with room for `queue_max` waiting change sets.
    pub fn start(store: Arc<dyn Store>, queue_max: usize) -> Self {
        let (tx, rx) = sync_channel(queue_max);
        let (durable, _) = watch::channel(Durable::Upto(0));
        let stats = Arc::new(CommitStats::default());
        let thread = {
            let durable = durable.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("grex-commit".into())
                .spawn(move || run_committer(store.as_ref(), rx, &durable, &stats))
                .expect("spawn the committer")
        };
        CommitLog { queue: Mutex::new((1, tx)), durable, stats, thread: Mutex::new(Some(thread)) }
    }

    /// Queues a change set (blocking while the queue is full); returns its sequence.
    pub fn submit(&self, change: ChangeSet) -> Result<u64, RemoteError> {
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        // A failure published after this check is still seen by the job's `wait_durable`.
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = queue.0;
        queue.1.send(CommitMsg::Change(seq, change)).map_err(|_| self.closed_error())?;
        queue.0 += 1;
        Ok(seq)
    }

    fn closed_error(&self) -> RemoteError {
        self.failure()
            .unwrap_or_else(|| error(ErrorCode::ShuttingDown, "the node is shutting down; retry on another node"))
    }

    /// The sequence of the last change set queued so far (0 if none).
    pub fn submitted_seq(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).0 - 1
    }

    /// The highest durable sequence, or the failure.
    pub fn durable(&self) -> Durable {
        self.durable.borrow().clone()
    }

    /// The highest durable sequence (the last good one after a failure).
    pub fn durable_seq(&self) -> u64 {
        self.durable.borrow().seq()
    }

    /// The error every write gets once a commit has failed; `None` while the log is healthy.
    pub fn failure(&self) -> Option<RemoteError> {
        match &*self.durable.borrow() {
            Durable::Failed { reason, .. } => Some(storage_failed(reason)),
            Durable::Upto(_) => None,
        }
    }

    /// Waits until change set `seq` is durable (returns at once for 0).
    pub async fn wait_durable(&self, seq: u64) -> Result<(), RemoteError> {
        let mut rx = self.durable.subscribe();
        let reached = rx
            .wait_for(|d| match d {
                Durable::Upto(upto) => *upto >= seq,
                Durable::Failed { .. } => true,
            })
            .await
            .map_err(|_| error(ErrorCode::ShuttingDown, "the node stopped before the job was durable"))?;
        match &*reached {
            Durable::Upto(_) => Ok(()),
            Durable::Failed { durable, .. } if *durable >= seq => Ok(()),
            Durable::Failed { reason, .. } => Err(storage_failed(reason)),
        }
    }

    /// Commits everything queued, then stops the committer thread.
    pub fn stop(&self) {
        {
            let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let _ = queue.1.send(CommitMsg::Stop);
        }
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

fn storage_failed(reason: &str) -> RemoteError {
    error(
        ErrorCode::StorageFailed,
        format!("a commit to disk failed ({reason}); the node refuses writes until it is restarted"),
    )
}

fn run_committer(store: &dyn Store, rx: Receiver<CommitMsg>, durable: &watch::Sender<Durable>, stats: &CommitStats) {
    let mut batch: Vec<ChangeSet> = Vec::new();
    let mut stopping = false;
    while !stopping {
        let Ok(first) = rx.recv() else { break };
        let mut last_seq = 0;
        for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match msg {
                CommitMsg::Change(seq, change) => {
                    last_seq = seq;
                    batch.push(change);
                    if batch.len() == BATCH_CHANGE_SETS_MAX {
                        break;
                    }
                }
                CommitMsg::Stop => {
                    stopping = true;
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = store.commit(&batch) {
            tracing::error!(error = %e, change_sets = batch.len(), "commit failed; refusing writes until restart");
            let upto = durable.borrow().seq();
            durable.send_replace(Durable::Failed { durable: upto, reason: e.to_string() });
            return;
        }
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.change_sets.fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch.clear();
        durable.send_replace(Durable::Upto(last_seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ItemWrite;
    use crate::storage::{FaultyStore, MemoryStore};

    fn change(bucket: &[u8], version: u64) -> ChangeSet {
        ChangeSet {
            bucket: bucket.to_vec(),
            flock: 0,
            version,
            writes: vec![ItemWrite { item: "count".into(), value: Some(version.to_string().into_bytes()) }],
        }
    }

    #[tokio::test]
    async fn submitted_change_sets_become_durable_in_order() {
        let store = Arc::new(MemoryStore::new(16));
        let log = CommitLog::start(store.clone(), 16);
        let mut last = 0;
        for v in 1..=100 {
            last = log.submit(change(b"k", v)).unwrap();
        }
        log.wait_durable(last).await.unwrap();
        assert_eq!(store.bucket_version(b"k").unwrap(), 100);
        assert!(log.stats.commits.load(Ordering::Relaxed) <= 100);
        assert_eq!(log.stats.change_sets.load(Ordering::Relaxed), 100);
        log.stop();
    }

    #[tokio::test]
    async fn a_failed_commit_fails_its_waiters_and_every_later_submit() {
        let store = Arc::new(FaultyStore::new(MemoryStore::new(16), 1));
        let log = CommitLog::start(store, 16);
        let first = log.submit(change(b"k", 1)).unwrap();
        log.wait_durable(first).await.unwrap();
        let second = log.submit(change(b"k", 2)).unwrap();
        let err = log.wait_durable(second).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::StorageFailed);
        assert!(matches!(log.durable(), Durable::Failed { durable: 1, .. }));
        // The first change set stays acknowledged.
        log.wait_durable(first).await.unwrap();
        let err = log.submit(change(b"k", 3)).unwrap_err();
        assert_eq!(err.code, ErrorCode::StorageFailed);
        log.stop();
    }
}
