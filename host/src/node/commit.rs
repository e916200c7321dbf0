//! The group committer: one thread that turns a stream of change sets into as few durable
//! transactions as it can.
//!
//! Executors hand change sets to [`CommitLog::submit`], which numbers them (a sequence that grows
//! by one per change set, in submission order) and queues them. The committer thread takes
//! everything queued, commits it together (one fsync of what the writes' [`SyncTo`] asks for), and
//! publishes the highest sequence now written. While it waits on the disk, the next batch queues
//! up, so under load one fsync covers many jobs without any timer. Callers wait for
//! `durable >= seq` before they answer. State written without a sync (a cluster node applying its
//! log) is synced by a checkpoint within [`CHECKPOINT_EVERY`].
//!
//! A cluster node's applies (state only, unsynced: the log holds what they write) do not each
//! make their own transaction: each is written into one the store keeps open ([`Store::stage`]),
//! committed after up to [`APPLY_WRITE_EVERY`], before anything that must follow them (a write of
//! other state, a checkpoint), or when a reader asks. The durable sequence never passes an apply
//! not yet committed.
//!
//! If a commit fails, the log turns [`Durable::Failed`] for good: the cache may hold writes that
//! never reached disk, so the node refuses writes until it is restarted (fail-stop).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::data::{Change, ChangeSet};
use crate::error::{ErrorCode, RemoteError, StoreError, error};
use crate::storage::{Batch, LogOp, Store, SyncTo};

/// The most change sets in one transaction; bounds a commit's memory and latency.
pub const BATCH_CHANGE_SETS_MAX: usize = 4096;

/// The longest state writes stay unsynced (a cluster node applies without fsync): after this the
/// committer makes its next write a checkpoint, or writes one when idle. Bounds what a crash
/// makes the node replay from its logs, and the memory the store keeps for unsynced pages.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

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

/// Called by the committer thread once a write is durable (or failed).
pub type WriteDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// One submission: log operations and change sets that go to disk together.
pub struct Write {
    /// Replicated-log operations.
    pub log: Vec<LogOp>,
    /// Change sets.
    pub changes: Vec<Change>,
    /// What must be on disk before it counts as done.
    pub sync: SyncTo,
    /// Called from the committer thread when the write is done. A write with one is written in
    /// the committer's next round, never held to share a transaction with later applies.
    pub done: Option<WriteDone>,
}

impl Write {
    /// Bytes of data the write holds while it waits (what the queue's byte bound counts).
    pub fn bytes(&self) -> usize {
        self.log.iter().map(LogOp::bytes).sum::<usize>() + self.changes.iter().map(Change::bytes).sum::<usize>()
    }
}

enum CommitMsg {
    /// A write, its sequence and its [`Write::bytes`].
    Write(u64, Write, usize),
    /// Nothing came before a checkpoint or deferred applies were due (the committer's own).
    Due,
    /// A reader waits for the state: write deferred applies now.
    Flush,
    Stop,
}

/// Commit counters.
#[derive(Default)]
pub struct CommitStats {
    /// Durable transactions (fsyncs).
    pub commits: AtomicU64,
    /// Change sets (or, in a cluster, log entries) those transactions made durable.
    pub change_sets: AtomicU64,
    /// Every write up to this sequence is in the state as last synced (by a checkpoint, or a
    /// write that synced everything).
    pub checkpointed: AtomicU64,
}

/// Bytes of writes submitted and not yet written (or failed), under a bound: a submitter waits
/// while the writes ahead of it hold the bound. A write larger than the bound goes alone, once
/// nothing else waits, so none waits for ever.
struct Room {
    held: Mutex<RoomState>,
    freed: Condvar,
    max: usize,
}

#[derive(Default)]
struct RoomState {
    bytes: usize,
    /// The committer is gone: nobody frees room any more, so nobody waits for it.
    closed: bool,
}

impl Room {
    fn new(max: usize) -> Room {
        Room { held: Mutex::new(RoomState::default()), freed: Condvar::new(), max }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RoomState> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `bytes` fit, then holds them.
    fn take(&self, bytes: usize) {
        let mut state = self.lock();
        while !state.closed && state.bytes > 0 && state.bytes + bytes > self.max {
            state = self.freed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.bytes += bytes;
    }

    fn free(&self, bytes: usize) {
        if bytes > 0 {
            let mut state = self.lock();
            state.bytes = state.bytes.saturating_sub(bytes);
            self.freed.notify_all();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }

    /// Bytes held now.
    fn held(&self) -> usize {
        self.lock().bytes
    }
}

/// Closes the room when dropped.
struct Closing(Arc<Room>);

impl Drop for Closing {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The sending side of the group committer.
pub struct CommitLog {
    /// Next sequence to hand out, and the queue; one lock keeps queue order equal to sequence order.
    queue: Mutex<(u64, SyncSender<CommitMsg>)>,
    room: Arc<Room>,
    durable: watch::Sender<Durable>,
    pub(crate) stats: Arc<CommitStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl CommitLog {
    /// Starts the committer thread over `store`, with room for `queue_max` writes holding
    /// `queue_bytes_max` bytes of data ([`Write::bytes`]) submitted and not yet written.
    pub fn start(store: Arc<dyn Store>, queue_max: usize, queue_bytes_max: usize) -> Self {
        Self::start_with(store, queue_max, queue_bytes_max, APPLY_WRITE_EVERY)
    }

    /// [`start`](Self::start) with applies waiting up to `apply_every` (see [`Deferred`]).
    fn start_with(store: Arc<dyn Store>, queue_max: usize, queue_bytes_max: usize, apply_every: Duration) -> Self {
        let (tx, rx) = sync_channel(queue_max);
        let (durable, _) = watch::channel(Durable::Upto(0));
        let stats = Arc::new(CommitStats::default());
        let room = Arc::new(Room::new(queue_bytes_max));
        let thread = {
            let durable = durable.clone();
            let stats = stats.clone();
            let room = room.clone();
            std::thread::Builder::new()
                .name("grex-commit".into())
                .spawn(move || {
                    // However the committer ends (a panic too), nobody is left waiting for room.
                    let _closing = Closing(room.clone());
                    run_committer(store.as_ref(), rx, &durable, &stats, &room, apply_every);
                })
                .expect("spawn the committer")
        };
        CommitLog { queue: Mutex::new((1, tx)), room, durable, stats, thread: Mutex::new(Some(thread)) }
    }

    /// Every write up to this sequence is in the store's state as last synced: what a log purge
    /// may rely on.
    pub fn checkpointed_seq(&self) -> u64 {
        self.stats.checkpointed.load(Ordering::Acquire)
    }

    /// Bytes of writes submitted and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.room.held()
    }

    /// Queues a change set (blocking while the queue is full); returns its sequence.
    pub fn submit(&self, change: ChangeSet) -> Result<u64, RemoteError> {
        self.submit_write(Write { log: Vec::new(), changes: vec![change.into()], sync: SyncTo::All, done: None })
    }

    /// Queues a write (blocking while the queue is full, by count or by bytes); returns its
    /// sequence. On failure the write's `done` is called with the error before this returns.
    pub fn submit_write(&self, write: Write) -> Result<u64, RemoteError> {
        if let Some(failure) = self.failure() {
            if let Some(done) = write.done {
                done(Err(failure.message.clone()));
            }
            return Err(failure);
        }
        // A failure published after this check is still seen by the job's `wait_durable`.
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = queue.0;
        let bytes = write.bytes();
        // Waiting under the queue's lock keeps sequence order: no later write slips past one
        // that waits for room.
        self.room.take(bytes);
        if let Err(std::sync::mpsc::SendError(msg)) = queue.1.send(CommitMsg::Write(seq, write, bytes)) {
            self.room.free(bytes);
            let error = self.closed_error();
            if let CommitMsg::Write(_, Write { done: Some(done), .. }, _) = msg {
                done(Err(error.message.clone()));
            }
            return Err(error);
        }
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

    /// Resolves once a commit has failed, with the failure (never, while the disk works).
    pub async fn failed(&self) -> RemoteError {
        let mut rx = self.durable.subscribe();
        match rx.wait_for(|d| matches!(d, Durable::Failed { .. })).await {
            Ok(failed) => match &*failed {
                Durable::Failed { reason, .. } => storage_failed(reason),
                Durable::Upto(_) => unreachable!("waited for a failure"),
            },
            // The sender lives as long as `self`.
            Err(_) => std::future::pending().await,
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

    /// Waits until every write queued before the call has reached the store (durable or not), or
    /// will never reach it (a commit failed, the node stops): after it, the store holds everything
    /// it will hold of them, so a reader sees every write that was acknowledged.
    pub async fn settle(&self) {
        let _ = self.wait_written(self.submitted_seq()).await;
    }

    /// Waits until write `seq` is in the store, as [`wait_durable`](Self::wait_durable) does, for
    /// a reader of the state: applies waiting to share a transaction are written at once instead
    /// of after up to `APPLY_WRITE_EVERY`.
    pub async fn wait_written(&self, seq: u64) -> Result<(), RemoteError> {
        self.ask_flush(seq);
        self.wait_durable(seq).await
    }

    /// [`wait_written`](Self::wait_written) for a thread outside any async runtime.
    pub fn block_until_written(&self, seq: u64) -> Result<(), RemoteError> {
        if self.durable_seq() >= seq {
            return Ok(());
        }
        self.ask_flush(seq);
        // The wait is on a watch channel alone: no runtime (and its epoll instance and timers) is
        // built for it.
        futures::executor::block_on(self.wait_durable(seq))
    }

    /// Asks the committer to write its deferred applies, if `seq` is not written yet. Queued
    /// behind every write before it, so the flush covers them. Not if the queue is full: the
    /// committer is busy then, and its deferred applies are written within
    /// [`APPLY_WRITE_EVERY`] anyway.
    fn ask_flush(&self, seq: u64) {
        if self.durable_seq() < seq {
            let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let _ = queue.1.try_send(CommitMsg::Flush);
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

/// Applies of a cluster node's log not yet committed: state only and unsynced (a crash replays
/// them from the log), so they share one transaction for up to [`APPLY_WRITE_EVERY`] instead of
/// one per committer round. They are written into the store's open transaction
/// ([`Store::stage`]) a few rounds' worth at a time (at least [`STAGE_OPS`], or after
/// [`STAGE_EVERY`]), so the transaction's work is spread over the rounds and the commit that ends
/// it is short.
#[derive(Default)]
struct Deferred {
    /// Applies not yet staged, and when the first of them came.
    pending: Batch,
    pending_since: Option<Instant>,
    /// How many change sets and state operations the open transaction holds, or will.
    ops: usize,
    /// The first deferred write's sequence and when it came.
    first: Option<(u64, Instant)>,
    /// Their [`Write::bytes`].
    bytes: usize,
}

impl Deferred {
    /// Whether `write` may wait: it writes only state, asks for no sync, and nobody waits for
    /// it to be done (the meta group's applies: users, modules and the flock map are published,
    /// and meta proposals answered, once they are in the store).
    fn takes(write: &Write) -> bool {
        write.sync == SyncTo::Nothing && write.done.is_none() && write.log.iter().all(|op| !op.on_log())
    }

    fn add(&mut self, seq: u64, write: Write, bytes: usize) {
        self.first.get_or_insert((seq, Instant::now()));
        self.pending_since.get_or_insert_with(Instant::now);
        self.bytes += bytes;
        self.ops += write.log.len() + write.changes.len();
        self.pending.log.extend(write.log);
        self.pending.changes.extend(write.changes);
    }

    /// Writes the pending applies into the store's open transaction if there are
    /// [`STAGE_OPS`] of them, they are [`STAGE_EVERY`] old, or `now`.
    fn stage(&mut self, store: &dyn Store, now: bool) -> Result<(), StoreError> {
        let pending = self.pending.log.len() + self.pending.changes.len();
        let due = self.stage_due().is_some_and(|at| at <= Instant::now());
        if pending == 0 || !(now || due || pending >= STAGE_OPS) {
            return Ok(());
        }
        self.pending_since = None;
        store.stage(&std::mem::take(&mut self.pending))
    }

    /// Whether they fill a transaction, or half the room for writes in memory (`bytes_max`):
    /// waiting longer would hold up submitters.
    fn full(&self, bytes_max: usize) -> bool {
        self.ops >= BATCH_CHANGE_SETS_MAX || self.bytes >= bytes_max / 2
    }

    /// How far every write is in the store, `received` being the last taken from the queue:
    /// not as far as the first write still waiting here.
    fn written_upto(&self, received: u64) -> u64 {
        self.first.map_or(received, |(first, _)| received.min(first - 1))
    }

    /// When the deferred writes are due to be committed, if they wait `every`.
    fn due(&self, every: Duration) -> Option<Instant> {
        self.first.map(|(_, since)| since + every)
    }

    /// When the pending applies are due to be staged.
    fn stage_due(&self) -> Option<Instant> {
        self.pending_since.map(|since| since + STAGE_EVERY)
    }
}

/// Applies staged together at least (see [`Deferred`]): each staging opens the store's tables.
const STAGE_OPS: usize = 64;
/// The longest an apply waits to be staged (see [`Deferred`]).
const STAGE_EVERY: Duration = Duration::from_millis(10);

/// Whether log operations and change sets write state (and not only the log).
fn writes_state(log: &[LogOp], changes: &[Change]) -> bool {
    !changes.is_empty() || log.iter().any(|op| !op.on_log())
}

/// Whether a batch holds as much as one transaction may.
fn full(batch: &Batch) -> bool {
    batch.changes.len() >= BATCH_CHANGE_SETS_MAX || batch.log.len() >= BATCH_CHANGE_SETS_MAX
}

/// The longest applies share one transaction before it is committed (see [`Deferred`]). Applies
/// to random buckets cost less the more share a transaction (`cargo bench -p grex --bench
/// store`: about 15 µs each in sixteens, 10 in sixty-fours, 6–7 in thousands, as more of them land
/// in a leaf the transaction already copied). A reader of the state does not wait for this: it
/// asks for the applies at once ([`CommitLog::wait_written`]). Against one transaction per 10 ms,
/// the committers spent about a fifth less CPU per job; a whole second (the checkpoint's period)
/// saved no more (docs/benchmarks.md, "Applies share a transaction for 200 ms").
pub const APPLY_WRITE_EVERY: Duration = Duration::from_millis(200);

fn run_committer(
    store: &dyn Store,
    rx: Receiver<CommitMsg>,
    durable: &watch::Sender<Durable>,
    stats: &CommitStats,
    room: &Room,
    apply_every: Duration,
) {
    let mut stopping = false;
    // A message that could not join the last batch (it must not be reordered with it).
    let mut held: Option<CommitMsg> = None;
    // State written since the last checkpoint, and when that was.
    let mut unsynced = false;
    let mut checkpointed = Instant::now();
    let mut deferred = Deferred::default();
    // The last write taken from the queue: each one up to it is written or deferred.
    let mut received = 0;
    while !stopping {
        // A reader asked for the deferred applies this round.
        let mut flush_asked = false;
        let checkpoint_due = unsynced.then(|| checkpointed + CHECKPOINT_EVERY);
        let wake = [checkpoint_due, deferred.due(apply_every), deferred.stage_due()].into_iter().flatten().min();
        let first = match held.take() {
            Some(msg) => msg,
            None => match wake {
                // Every sender gone: as a stop, so what waits is written.
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(msg) => msg,
                    Err(RecvTimeoutError::Timeout) => CommitMsg::Due,
                    Err(RecvTimeoutError::Disconnected) => CommitMsg::Stop,
                },
                None => rx.recv().unwrap_or(CommitMsg::Stop),
            },
        };
        let mut batch = Batch::default();
        // Whether the batch writes state, kept as writes join it.
        let mut batch_writes_state = false;
        let mut done: Vec<WriteDone> = Vec::new();
        // The batch's bytes, freed once it is written.
        let mut bytes = 0;
        let mut last_seq = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                CommitMsg::Write(seq, write, size) => {
                    received = seq;
                    // An apply waits, unless state written before it in this round is in the batch.
                    if Deferred::takes(&write) && !batch_writes_state {
                        deferred.add(seq, write, size);
                        if deferred.full(room.max) {
                            break;
                        }
                        next = rx.try_recv().ok();
                        continue;
                    }
                    // The store applies log operations before change sets; a flock clear must not
                    // overtake change sets queued before it.
                    let clears =
                        write.log.iter().any(|op| matches!(op, LogOp::ClearFlock { .. } | LogOp::InstallFlock { .. }));
                    if clears && !batch.changes.is_empty() {
                        received = seq - 1;
                        held = Some(CommitMsg::Write(seq, write, size));
                        break;
                    }
                    last_seq = Some(seq);
                    bytes += size;
                    batch_writes_state |= writes_state(&write.log, &write.changes);
                    batch.log.extend(write.log);
                    batch.changes.extend(write.changes);
                    batch.sync = batch.sync.max(write.sync);
                    done.extend(write.done);
                    if full(&batch) {
                        break;
                    }
                }
                CommitMsg::Due => {
                    if checkpoint_due.is_some_and(|at| at <= Instant::now()) {
                        batch.sync = SyncTo::All;
                    }
                }
                CommitMsg::Flush => flush_asked = true,
                CommitMsg::Stop => {
                    stopping = true;
                    batch.sync = SyncTo::All;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        let writes_state = batch_writes_state;
        let deferred_due = deferred.due(apply_every).is_some_and(|at| at <= Instant::now());
        // Deferred applies are written now if they are due, if a reader waits for them, or if this
        // write must follow them (it writes state, or syncs it).
        let flush = deferred.first.is_some()
            && (deferred_due || flush_asked || deferred.full(room.max) || writes_state || batch.sync == SyncTo::All);
        if batch.sync < SyncTo::All && (writes_state || unsynced || flush) && checkpointed.elapsed() >= CHECKPOINT_EVERY
        {
            batch.sync = SyncTo::All;
        }
        // A batch that writes or syncs state must follow the deferred applies into the store. One
        // that only appends to the log (a file of its own) goes first, so the appends, and the
        // answers waiting on them, do not wait behind the applies' transaction.
        let applies_first = writes_state || batch.sync == SyncTo::All || last_seq.is_none();
        let mut flushed = 0;
        if applies_first {
            match write_deferred(&mut deferred, store, flush) {
                Ok(bytes) => flushed = bytes,
                Err(e) => return fail(&e, durable, done, held, &rx),
            }
            unsynced |= flush;
        }
        if last_seq.is_none() && !(batch.sync == SyncTo::All && unsynced) {
            room.free(flushed);
            publish(durable, received, &deferred);
            continue;
        }
        if let Err(e) = store.write(&batch) {
            return fail(&e, durable, done, held, &rx);
        }
        if batch.sync == SyncTo::All {
            unsynced = false;
            checkpointed = Instant::now();
            // Applies still deferred are not in what was synced.
            stats.checkpointed.store(deferred.written_upto(received), Ordering::Release);
        } else {
            unsynced |= writes_state;
        }
        if batch.sync > SyncTo::Nothing {
            // A cluster node's change sets become durable as log entries; applying them later
            // needs no fsync of its own.
            let entries: usize =
                batch.log.iter().map(|op| if let LogOp::Append { entries, .. } = op { entries.len() } else { 0 }).sum();
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.change_sets.fetch_add((batch.changes.len() + entries) as u64, Ordering::Relaxed);
        }
        if !applies_first {
            // The sequence stops short of the first apply still deferred, as ever.
            room.free(bytes);
            publish(durable, received, &deferred);
            for done in done {
                done(Ok(()));
            }
            match write_deferred(&mut deferred, store, flush) {
                Ok(bytes) => flushed = bytes,
                Err(e) => return fail(&e, durable, Vec::new(), held, &rx),
            }
            unsynced |= flush;
            room.free(flushed);
            publish(durable, received, &deferred);
            continue;
        }
        room.free(flushed + bytes);
        publish(durable, received, &deferred);
        for done in done {
            done(Ok(()));
        }
    }
}

/// Writes the deferred applies that are due into the store's open transaction and, if `flush`,
/// commits it; returns the bytes of the applies committed.
fn write_deferred(deferred: &mut Deferred, store: &dyn Store, flush: bool) -> Result<usize, StoreError> {
    deferred.stage(store, flush)?;
    if !flush {
        return Ok(0);
    }
    let Deferred { bytes, .. } = std::mem::take(deferred);
    store.commit_staged()?;
    Ok(bytes)
}

/// Publishes how far the store holds every write: up to `received`, the last write taken from
/// the queue, but not as far as the first apply still deferred.
fn publish(durable: &watch::Sender<Durable>, received: u64, deferred: &Deferred) {
    let reached = deferred.written_upto(received);
    durable.send_if_modified(|d| match d {
        Durable::Upto(upto) if reached > *upto => {
            *upto = reached;
            true
        }
        _ => false,
    });
}

/// A write failed: the log turns failed for good, and every waiter hears so.
fn fail(
    e: &StoreError,
    durable: &watch::Sender<Durable>,
    done: impl IntoIterator<Item = WriteDone>,
    held: Option<CommitMsg>,
    rx: &Receiver<CommitMsg>,
) {
    tracing::error!(error = %e, "commit failed; refusing writes until restart");
    let upto = durable.borrow().seq();
    durable.send_replace(Durable::Failed { durable: upto, reason: e.to_string() });
    for done in done {
        done(Err(e.to_string()));
    }
    // Fail whatever else is queued, so no caller waits for ever.
    for msg in held.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
        if let CommitMsg::Write(_, Write { done: Some(done), .. }, _) = msg {
            done(Err(e.to_string()));
        }
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
        let log = CommitLog::start(store.clone(), 16, usize::MAX);
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

    /// A store whose write number `stuck` (from 0) waits, once `entered` has heard of it, until
    /// `release` sends (as a committer waits on a slow fsync).
    fn stuck_in_write(
        stuck: u64,
    ) -> (FaultyStore<MemoryStore>, std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let store = FaultyStore::new(MemoryStore::new(16), u64::MAX).before_each_write(move |n| {
            if n == stuck {
                entered_tx.send(()).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
            }
        });
        (store, entered, release)
    }

    #[tokio::test]
    async fn writes_queued_during_a_commit_go_to_disk_together_in_the_next_one() {
        let (store, entered, release) = stuck_in_write(0);
        let log = CommitLog::start(Arc::new(store), 256, usize::MAX);
        log.submit(change(b"first", 1)).unwrap();
        entered.recv().unwrap();
        // The committer is inside the first commit (its fsync, on a real disk): 100 jobs queue.
        let mut last = 0;
        for v in 1..=100 {
            last = log.submit(change(format!("k{v}").as_bytes(), v)).unwrap();
        }
        release.send(()).unwrap();
        log.wait_durable(last).await.unwrap();
        assert_eq!(log.stats.commits.load(Ordering::Relaxed), 2, "one commit for the first, one for the rest");
        assert_eq!(log.stats.change_sets.load(Ordering::Relaxed), 101);
        log.stop();
    }

    #[tokio::test]
    async fn submitters_wait_while_queued_writes_hold_the_byte_bound_and_go_on_once_they_are_written() {
        let (store, entered, release) = stuck_in_write(0);
        let write = |bucket: &[u8]| Write {
            log: Vec::new(),
            changes: vec![change(bucket, 1).into()],
            sync: SyncTo::All,
            done: None,
        };
        let size = write(b"a").bytes();
        let log = Arc::new(CommitLog::start(Arc::new(store), 256, size * 3 / 2));
        log.submit_write(write(b"a")).unwrap();
        entered.recv().unwrap();
        assert_eq!(log.queued_bytes(), size, "held until written");
        // The committer is stuck in its first write: a second write does not fit beside it.
        let (submitted_tx, submitted) = std::sync::mpsc::channel();
        let waiting = {
            let log = log.clone();
            std::thread::spawn(move || submitted_tx.send(log.submit_write(write(b"b")).unwrap()).unwrap())
        };
        assert!(submitted.recv_timeout(Duration::from_millis(200)).is_err(), "the second write waits for room");
        release.send(()).unwrap();
        let seq = submitted.recv().expect("the second write goes in once the first is written");
        log.wait_durable(seq).await.unwrap();
        waiting.join().unwrap();
        assert_eq!(log.queued_bytes(), 0);
        // A write larger than the bound goes alone.
        let big = Write { log: Vec::new(), changes: vec![change(&[7; 100], 2).into()], sync: SyncTo::All, done: None };
        assert!(big.bytes() > size * 3 / 2);
        let seq = log.submit_write(big).unwrap();
        log.wait_durable(seq).await.unwrap();
        assert_eq!(log.queued_bytes(), 0);
        log.stop();
    }

    #[tokio::test]
    async fn unsynced_state_is_readable_at_once_and_checkpointed_when_the_committer_goes_idle() {
        let store = Arc::new(MemoryStore::new(16));
        let log = CommitLog::start(store.clone(), 16, usize::MAX);
        let write = Write { log: Vec::new(), changes: vec![change(b"k", 1).into()], sync: SyncTo::Nothing, done: None };
        let seq = log.submit_write(write).unwrap();
        log.wait_durable(seq).await.unwrap();
        assert_eq!(store.bucket_version(b"k").unwrap(), 1);
        assert_eq!(log.stats.commits.load(Ordering::Relaxed), 0, "applying alone syncs nothing");
        assert!(log.checkpointed_seq() < seq, "no checkpoint holds it yet");
        let mut synced = log.durable.subscribe();
        tokio::time::timeout(CHECKPOINT_EVERY * 10, async {
            while log.stats.commits.load(Ordering::Relaxed) == 0 {
                let _ = tokio::time::timeout(CHECKPOINT_EVERY / 10, synced.changed()).await;
            }
        })
        .await
        .expect("an idle committer checkpoints unsynced state");
        assert_eq!(log.stats.commits.load(Ordering::Relaxed), 1, "one checkpoint, then nothing is left to sync");
        assert_eq!(log.checkpointed_seq(), seq, "the checkpoint holds it");
        log.stop();
    }

    fn apply(bucket: &[u8], version: u64) -> Write {
        Write { log: Vec::new(), changes: vec![change(bucket, version).into()], sync: SyncTo::Nothing, done: None }
    }

    #[tokio::test]
    async fn an_apply_waits_to_share_a_transaction_and_nothing_counts_as_written_past_it() {
        let store = Arc::new(MemoryStore::new(16));
        let log = CommitLog::start(store.clone(), 16, usize::MAX);
        let mut waited = 0;
        for version in 1..=200 {
            let applied = log.submit_write(apply(b"k", version)).unwrap();
            // A log append behind it is written at once; the apply may wait for company.
            let (tx, appended) = tokio::sync::oneshot::channel();
            let append = LogOp::Append { group: 0, entries: vec![(version, b"entry".to_vec().into())] };
            let done: WriteDone = Box::new(move |result| tx.send(result).unwrap());
            log.submit_write(Write { log: vec![append], changes: Vec::new(), sync: SyncTo::Log, done: Some(done) })
                .unwrap();
            appended.await.unwrap().unwrap();
            // Read the sequence first: whatever it counts as written must be in the store.
            let durable = log.durable_seq();
            let stored = store.bucket_version(b"k").unwrap();
            if durable >= applied {
                assert_eq!(stored, version, "apply {applied} counted as written ({durable}) but not in the store");
            } else {
                waited += 1;
            }
        }
        log.wait_durable(log.submitted_seq()).await.unwrap();
        assert_eq!(store.bucket_version(b"k").unwrap(), 200);
        assert!(waited > 0, "no apply ever waited behind a log append");
        assert_eq!(log.queued_bytes(), 0, "written applies hold no room");
        log.stop();
    }

    #[tokio::test]
    async fn a_reader_waiting_for_the_state_has_deferred_applies_written_at_once() {
        // Applies would wait an hour for company, and nothing else is written to flush them.
        let start =
            |store: &Arc<MemoryStore>| CommitLog::start_with(store.clone(), 16, usize::MAX, Duration::from_secs(3600));
        let store = Arc::new(MemoryStore::new(16));
        let log = start(&store);
        let seq = log.submit_write(apply(b"k", 1)).unwrap();
        tokio::time::timeout(Duration::from_secs(10), log.settle())
            .await
            .expect("a reader waited for the deferred apply's timer");
        assert!(log.durable_seq() >= seq);
        assert_eq!(store.bucket_version(b"k").unwrap(), 1);
        log.stop();
        // An executor thread, outside the runtime, waits the same way.
        let store = Arc::new(MemoryStore::new(16));
        let log = Arc::new(start(&store));
        let seq = log.submit_write(apply(b"k", 2)).unwrap();
        let (tx, written) = std::sync::mpsc::channel();
        let waiter = {
            let log = log.clone();
            std::thread::spawn(move || tx.send(log.block_until_written(seq)).unwrap())
        };
        written
            .recv_timeout(Duration::from_secs(10))
            .expect("an executor waited for the deferred apply's timer")
            .unwrap();
        waiter.join().unwrap();
        assert_eq!(store.bucket_version(b"k").unwrap(), 2);
        log.stop();
    }

    #[tokio::test]
    async fn a_log_append_does_not_wait_behind_the_applies_written_in_its_round() {
        // The store's first write holds the committer while an apply, a reader's call for it and
        // a log append queue; they then share a round. The store's third write hangs until
        // released: it must be the apply's staging, with the append already done.
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let store = FaultyStore::new(MemoryStore::new(16), u64::MAX).before_each_write(move |n| {
            if n == 0 || n == 2 {
                entered_tx.send(n).unwrap();
                release_rx.lock().unwrap().recv().unwrap();
            }
        });
        let log = Arc::new(CommitLog::start_with(Arc::new(store), 16, usize::MAX, Duration::from_secs(3600)));
        let append = |index: u64| LogOp::Append { group: 0, entries: vec![(index, b"entry".to_vec().into())] };
        log.submit_write(Write { log: vec![append(1)], changes: Vec::new(), sync: SyncTo::Log, done: None }).unwrap();
        assert_eq!(entered.recv().unwrap(), 0);
        let applied = log.submit_write(apply(b"k", 1)).unwrap();
        // A reader asks for the apply (as `wait_written` does).
        log.ask_flush(applied);
        let (tx, appended) = std::sync::mpsc::channel();
        let done: WriteDone = Box::new(move |result| tx.send(result).unwrap());
        log.submit_write(Write { log: vec![append(2)], changes: Vec::new(), sync: SyncTo::Log, done: Some(done) })
            .unwrap();
        release.send(()).unwrap();
        assert_eq!(entered.recv_timeout(Duration::from_secs(10)).unwrap(), 2, "the apply's staging");
        appended
            .recv_timeout(Duration::from_secs(10))
            .expect("the log append waited behind the apply's transaction")
            .unwrap();
        assert!(log.durable_seq() < applied, "the apply is not counted as written before it is");
        release.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), log.wait_written(applied)).await.unwrap().unwrap();
        log.stop();
    }

    #[tokio::test]
    async fn an_apply_someone_waits_for_is_written_at_once_with_those_before_it() {
        // Applies would wait an hour for company; one with a `done` (a meta apply, whose users,
        // modules and proposals wait for it) must not, and takes those deferred before it along.
        let store = Arc::new(MemoryStore::new(16));
        let log = CommitLog::start_with(store.clone(), 16, usize::MAX, Duration::from_secs(3600));
        let before = log.submit_write(apply(b"a", 1)).unwrap();
        let (tx, done) = std::sync::mpsc::channel();
        let waited = Write { done: Some(Box::new(move |result| tx.send(result).unwrap())), ..apply(b"b", 1) };
        let seq = log.submit_write(waited).unwrap();
        done.recv_timeout(Duration::from_secs(10)).expect("the apply waited for the deferred timer").unwrap();
        assert!(log.durable_seq() >= seq && seq > before);
        assert_eq!((store.bucket_version(b"a").unwrap(), store.bucket_version(b"b").unwrap()), (1, 1));
        log.stop();
    }

    #[tokio::test]
    async fn a_checkpoint_taken_while_an_apply_waits_does_not_count_it_as_synced() {
        // The store's second write (a log append) waits until released.
        let (store, entered, release) = stuck_in_write(1);
        let log = CommitLog::start(Arc::new(store), 16, usize::MAX);
        let append = |index| Write {
            log: vec![LogOp::Append { group: 0, entries: vec![(index, b"entry".to_vec().into())] }],
            changes: Vec::new(),
            sync: SyncTo::Log,
            done: None,
        };
        // Unsynced state, then a log write the disk holds up past the checkpoint's time.
        let first = log.submit_write(apply(b"k", 1)).unwrap();
        log.wait_durable(first).await.unwrap();
        log.submit_write(append(1)).unwrap();
        entered.recv().unwrap();
        let overdue = Instant::now() + CHECKPOINT_EVERY;
        while Instant::now() < overdue {
            std::thread::sleep(CHECKPOINT_EVERY / 10);
        }
        // Queued behind it: an apply (it waits for company) and a log write, which the overdue
        // checkpoint joins.
        let waiting = log.submit_write(apply(b"k", 2)).unwrap();
        let last = log.submit_write(append(2)).unwrap();
        release.send(()).unwrap();
        log.wait_durable(last).await.unwrap();
        assert!(log.stats.commits.load(Ordering::Relaxed) >= 1, "a checkpoint was taken");
        assert!(
            log.checkpointed_seq() < waiting,
            "the apply that waited ({waiting}) counted as synced ({})",
            log.checkpointed_seq()
        );
        log.stop();
    }

    #[tokio::test]
    async fn a_flock_installed_after_waiting_applies_is_written_after_them() {
        let store = Arc::new(MemoryStore::new(16));
        let log = CommitLog::start(store.clone(), 16, usize::MAX);
        // Two buckets of one flock, each applied once.
        let flock = crate::data::flock_of(b"k", 16);
        let other = (0..).map(|i| format!("b{i}")).find(|b| crate::data::flock_of(b.as_bytes(), 16) == flock).unwrap();
        let in_flock = |bucket: &[u8], version| ChangeSet { flock, ..change(bucket, version) };
        for bucket in [&b"k"[..], other.as_bytes()] {
            let write = Write { changes: vec![in_flock(bucket, 1).into()], ..apply(bucket, 1) };
            log.submit_write(write).unwrap();
        }
        // A snapshot's install: clear the flock, then its buckets; it must not be overtaken.
        let install = Write {
            log: vec![LogOp::ClearFlock { flock }],
            changes: vec![in_flock(b"k", 5).into()],
            sync: SyncTo::All,
            done: None,
        };
        let seq = log.submit_write(install).unwrap();
        log.wait_durable(seq).await.unwrap();
        assert_eq!(store.bucket_version(b"k").unwrap(), 5);
        assert_eq!(
            store.bucket_version(other.as_bytes()).unwrap(),
            0,
            "the install cleared what was applied before it"
        );
        log.stop();
    }

    #[tokio::test]
    async fn a_failed_commit_fails_its_waiters_and_every_later_submit() {
        let store = Arc::new(FaultyStore::new(MemoryStore::new(16), 1));
        let log = CommitLog::start(store, 16, usize::MAX);
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
