//! Consensus for each flock and for the meta group, with openraft 0.9: the type configuration,
//! the log store and state machine over the node's store, and the network adapter over the
//! peer transport.
//!
//! - [`LogStore`]: a group's log lives in the store's log file (`storage`), read by index. An
//!   append is handed to the node's group committer, so appends of every flock that arrive
//!   together share one fsync. The log's tail stays in memory (`RecentLog`) until it is written and applied, so
//!   appending, replicating and applying an entry never read it back from redb.
//! - [`StateMachine`]: applying a flock's entries writes their change sets to the items tables
//!   (without an fsync: the log is already durable, and a crash replays from the applied point of
//!   the last checkpoint, see `storage`); applying meta entries updates membership, the flock map
//!   and modules. The state machine *is* the store, so a snapshot is built from it on demand.
//! - [`Network`]: consensus messages go to peers through the node's [`Outbox`], batched per peer.

// openraft's storage traits fix `StorageError` as the error type, large as it is.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftNetwork, RaftNetworkFactory,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::{oneshot, watch};

use super::leadership::Refusals;
use super::messages::{PeerResponse, RaftRpc};
use super::outbox::Outbox;
use super::peer::PeerError;
use super::placement::FlockMap;
use crate::data::{ChangeSet, ItemWrite};
use crate::node::{Node, Write};
use crate::storage::{GroupId, LogOp, META_GROUP, ModuleId, Store, SyncTo};

/// A node's id in the cluster.
pub type NodeId = u64;

/// Where a node answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer (QUIC, mutual TLS) address, `HOST:PORT`.
    pub peer: String,
    /// HTTP URL for clients.
    pub http: String,
    /// QUIC URL for clients.
    pub quic: String,
    /// Redis protocol address, `HOST:PORT` (empty when the node serves none).
    pub resp: String,
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} http={} quic={} resp={}", self.peer, self.http, self.quic, self.resp)
    }
}

/// A log entry's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// A flock group's entry: one job's change set.
    Change(ChangeSet),
    /// Meta group: a node joined.
    AddNode {
        /// Its id.
        id: NodeId,
        /// Its addresses.
        info: PeerInfo,
    },
    /// Meta group: a new flock map.
    SetFlockMap(FlockMap),
    /// Meta group: a module, stored on every node.
    PutModule {
        /// Name to point at it.
        name: String,
        /// SHA-256 of the bytes.
        id: ModuleId,
        /// The bytes as uploaded.
        #[serde(with = "serde_bytes")]
        wasm: Vec<u8>,
    },
}

/// What applying an entry returns: jobs already have their output, so only the commit-log
/// sequence of the write that puts the entry's effects in the store (see [`crate::node::Ticket`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    /// Once the committer has written this sequence, the store holds the entry's effects (0:
    /// they were in the store before the entry was answered).
    pub written: u64,
}

openraft::declare_raft_types!(
    /// Grex's openraft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = PeerInfo,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A group's raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// The membership and node list the meta group agrees on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Every member and its addresses.
    pub nodes: BTreeMap<NodeId, PeerInfo>,
    /// Flock → herders.
    pub map: FlockMap,
}

const APPLIED_KEY: &str = "applied";
const VOTE_KEY: &str = "vote";
const PURGED_KEY: &str = "purged";
const COMMITTED_KEY: &str = "committed";
const META_STATE_KEY: &str = "meta_state";

fn codec() -> impl bincode::config::Config {
    bincode::config::standard()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, codec()).expect("in-memory encoding cannot fail")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    bincode::serde::decode_from_slice(bytes, codec()).map(|(v, _)| v).map_err(|e| e.to_string())
}

fn io_read(e: impl fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read(AnyError::error(e)).into()
}

fn io_write(e: impl fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write(AnyError::error(e)).into()
}

/// Where a group's storage writes go.
#[derive(Clone)]
struct GroupStore {
    group: GroupId,
    store: Arc<dyn Store>,
    node: Node,
}

impl GroupStore {
    /// Writes through the group committer and waits until it is done.
    async fn write(&self, log: Vec<LogOp>, changes: Vec<ChangeSet>, sync: SyncTo) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let done = Box::new(move |r: Result<(), String>| {
            let _ = tx.send(r);
        });
        self.node.commits().submit_write(Write { log, changes, sync, done: Some(done) }).map_err(|e| e.message)?;
        rx.await.map_err(|_| "the committer stopped".to_string())?
    }

    /// Queues a write on the group committer without waiting; returns its sequence.
    fn submit(&self, log: Vec<LogOp>, changes: Vec<ChangeSet>, sync: SyncTo) -> Result<u64, String> {
        let write = Write { log, changes, sync, done: None };
        self.node.commits().submit_write(write).map_err(|e| e.message)
    }

    fn state<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError<NodeId>> {
        match self.store.log_state(self.group, key).map_err(io_read)? {
            Some(bytes) => decode(&bytes).map(Some).map_err(io_read),
            None => Ok(None),
        }
    }
}

/// One group's log.
#[derive(Clone)]
pub struct LogStore {
    inner: GroupStore,
    recent: Arc<Mutex<RecentLog>>,
}

impl LogStore {
    fn recent(&self) -> std::sync::MutexGuard<'_, RecentLog> {
        lock(&self.recent)
    }
}

fn lock(recent: &Mutex<RecentLog>) -> std::sync::MutexGuard<'_, RecentLog> {
    recent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Encoded bytes of written log entries a group keeps in memory beyond the unapplied ones.
const RECENT_BYTES_MAX: usize = 256 * 1024;

/// The tail of a group's log in memory, so that neither applying nor replicating an entry reads
/// it back from redb. An entry stays until it is written and applied; written, unapplied entries
/// beyond [`RECENT_BYTES_MAX`] are dropped oldest first (they are read from redb if needed).
/// Entries the committer has not written yet always stay: openraft requires appended entries to
/// be readable at once.
#[derive(Default)]
struct RecentLog {
    entries: BTreeMap<u64, RecentEntry>,
    bytes: usize,
    /// The highest index the state machine has applied.
    applied: u64,
}

struct RecentEntry {
    entry: Entry<TypeConfig>,
    size: usize,
    written: bool,
}

impl RecentLog {
    fn insert(&mut self, entry: Entry<TypeConfig>, size: usize) {
        self.bytes += size;
        let index = entry.log_id.index;
        if let Some(old) = self.entries.insert(index, RecentEntry { entry, size, written: false }) {
            self.bytes -= old.size;
        }
    }

    fn written(&mut self, log_ids: &[LogId<NodeId>]) {
        for log_id in log_ids {
            if let Some(e) = self.entries.get_mut(&log_id.index).filter(|e| e.entry.log_id == *log_id) {
                e.written = true;
            }
        }
        self.trim();
    }

    fn applied(&mut self, index: u64) {
        self.applied = self.applied.max(index);
        self.trim();
    }

    /// Drops written entries that are applied, then the oldest written ones over the budget.
    fn trim(&mut self) {
        while let Some(first) = self.entries.first_entry() {
            let e = first.get();
            if !e.written || (e.entry.log_id.index > self.applied && self.bytes <= RECENT_BYTES_MAX) {
                break;
            }
            self.bytes -= e.size;
            first.remove();
        }
    }

    fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let bytes = &mut self.bytes;
        self.entries.retain(|index, e| {
            let kept = keep(*index);
            if !kept {
                *bytes -= e.size;
            }
            kept
        });
    }

    /// Every entry in `from..to` if memory holds them all.
    fn range(&self, from: u64, to: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let last = self.entries.last_key_value()?.0;
        let to = to.min(last + 1);
        let entries: Vec<_> = self.entries.range(from..to).map(|(_, e)| e.entry.clone()).collect();
        let complete =
            to <= from || entries.first().is_some_and(|e| e.log_id.index == from) && entries.len() as u64 == to - from;
        complete.then_some(entries)
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i + 1,
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (from, to) = bounds(&range);
        if let Some(entries) = self.recent().range(from, to) {
            return Ok(entries);
        }
        let mut entries = BTreeMap::new();
        for (index, bytes) in self.inner.store.log_entries(self.inner.group, from, to, usize::MAX).map_err(io_read)? {
            entries.insert(index, decode::<Entry<TypeConfig>>(&bytes).map_err(io_read)?);
        }
        for (index, e) in self.recent().entries.range(from..to) {
            entries.insert(*index, e.entry.clone());
        }
        Ok(entries.into_values().collect())
    }

    /// What replication sends next: from `start`, entries up to [`APPEND_BYTES_MAX`] of payload
    /// (at least one). Read in runs sized by the mean entry so far, so a follower far behind costs
    /// the leader about one append's worth of reads and memory, whatever the entries' sizes.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut from = start;
        let mut run = 1;
        while from < end {
            let to = end.min(from + run);
            let read = self.try_get_log_entries(from..to).await?;
            if read.is_empty() {
                break;
            }
            for entry in read {
                bytes += entry_bytes(&entry);
                if bytes > APPEND_BYTES_MAX && !entries.is_empty() {
                    return Ok(entries);
                }
                entries.push(entry);
            }
            from = to;
            let mean = (bytes / entries.len() as u64).max(1);
            run = (APPEND_BYTES_MAX.saturating_sub(bytes) / mean).clamp(1, 1024);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let purged: Option<LogId<NodeId>> = self.inner.state(PURGED_KEY)?;
        let stored = match self.inner.store.log_last(self.inner.group).map_err(io_read)? {
            Some((_, bytes)) => Some(decode::<Entry<TypeConfig>>(&bytes).map_err(io_read)?.log_id),
            None => None,
        };
        let recent = self.recent().entries.values().next_back().map(|e| e.entry.log_id);
        let last = recent.max(stored).or(purged);
        Ok(LogState { last_purged_log_id: purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let op = LogOp::PutLogState { group: self.inner.group, key: VOTE_KEY, value: encode(vote) };
        self.inner.write(vec![op], Vec::new(), SyncTo::Log).await.map_err(io_write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.inner.state(VOTE_KEY)
    }

    /// Queued with the log's part of the next write, not waited for, and synced with the next
    /// append: a restarted node re-applies its log up to the last one that reached the disk at
    /// once (`read_committed`), instead of serving its last checkpoint's state until a leader
    /// tells it what is committed. The entries it names were submitted before it, so a write that
    /// holds it follows the writes that hold them.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        let op = LogOp::PutLogState { group: self.inner.group, key: COMMITTED_KEY, value: encode(&committed) };
        self.inner.submit(vec![op], Vec::new(), SyncTo::Nothing).map_err(io_write)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let committed: Option<LogId<NodeId>> = self.inner.state::<Option<LogId<NodeId>>>(COMMITTED_KEY)?.flatten();
        let last = self.get_log_state().await?.last_log_id;
        // Never past the log (it cannot be, by the order above; a damaged file should not stop the
        // node from starting, it only re-applies less at once).
        Ok(committed.filter(|c| Some(*c) <= last))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let mut written = Vec::new();
        {
            let mut recent = self.recent();
            for entry in entries {
                let bytes = encode(&entry);
                let size = bytes.len();
                written.push(entry.log_id);
                encoded.push((entry.log_id.index, bytes));
                recent.insert(entry, size);
            }
        }
        let recent = self.recent.clone();
        let done = Box::new(move |result: Result<(), String>| {
            if result.is_ok() {
                lock(&recent).written(&written);
            }
            callback.log_io_completed(result.map_err(std::io::Error::other));
        });
        let op = LogOp::Append { group: self.inner.group, entries: encoded };
        // On failure `done` has already reported the error to openraft.
        let _ = self.inner.node.commits().submit_write(Write {
            log: vec![op],
            changes: Vec::new(),
            sync: SyncTo::Log,
            done: Some(done),
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.recent().retain(|index| index < log_id.index);
        let op = LogOp::TruncateFrom { group: self.inner.group, from: log_id.index };
        self.inner.write(vec![op], Vec::new(), SyncTo::Log).await.map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.recent().retain(|index| index > log_id.index);
        let group = self.inner.group;
        let ops = vec![
            LogOp::PutLogState { group, key: PURGED_KEY, value: encode(&Some(log_id)) },
            LogOp::PurgeUpto { group, upto: log_id.index },
        ];
        // A checkpoint first: the entries go only once the state they built is on disk (they
        // are applied, since openraft purges only up to a snapshot, and so queued before this).
        self.inner.write(ops, Vec::new(), SyncTo::All).await.map_err(io_write)
    }
}

/// One bucket in a snapshot: key, version, items.
type SnapshotBucket = (ByteBuf, u64, Vec<(String, ByteBuf)>);

/// The parts of a flock snapshot: every bucket with its version and items.
#[derive(Serialize, Deserialize)]
struct FlockSnapshot {
    buckets: Vec<SnapshotBucket>,
}

/// The meta group's snapshot: its state and every named module.
#[derive(Serialize, Deserialize)]
struct MetaSnapshot {
    state: MetaState,
    modules: Vec<(String, ModuleId, ByteBuf)>,
}

/// Per-flock leadership as the node's executors see it: the term in which this node leads the
/// flock and has applied everything before it, or 0.
pub struct LeaderTerms(Vec<AtomicU64>);

impl LeaderTerms {
    /// All zero.
    pub fn new(flocks: u32) -> Self {
        LeaderTerms((0..flocks).map(|_| AtomicU64::new(0)).collect())
    }

    /// The ready leader term of `flock`, if any.
    pub fn get(&self, flock: u32) -> Option<u64> {
        match self.0.get(flock as usize)?.load(Ordering::Acquire) {
            0 => None,
            term => Some(term),
        }
    }

    /// Sets (or with 0 clears) the ready term of `flock`; returns the previous value.
    pub fn set(&self, flock: u32, term: u64) -> u64 {
        self.0[flock as usize].swap(term, Ordering::AcqRel)
    }
}

/// One group's state machine.
#[derive(Clone)]
pub struct StateMachine {
    inner: GroupStore,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, PeerInfo>,
    terms: Arc<LeaderTerms>,
    /// Meta group only: the state, published to the cluster.
    meta: Option<watch::Sender<MetaState>>,
    /// The log's in-memory tail, trimmed as entries are applied.
    recent: Arc<Mutex<RecentLog>>,
}

impl StateMachine {
    fn is_meta(&self) -> bool {
        self.inner.group == META_GROUP
    }

    fn applied_op(&self) -> LogOp {
        LogOp::PutState { group: self.inner.group, key: APPLIED_KEY, value: encode(&(&self.applied, &self.membership)) }
    }

    async fn build(&self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Applied entries' effects may still be queued for the store.
        self.inner.node.commits().settle().await;
        let data = if let Some(meta) = &self.meta {
            let state = meta.borrow().clone();
            let mut modules = Vec::new();
            for (name, id) in self.inner.store.module_names().map_err(io_read)? {
                if let Some(wasm) = self.inner.store.module_bytes(&id).map_err(io_read)? {
                    modules.push((name, id, ByteBuf::from(wasm)));
                }
            }
            encode(&MetaSnapshot { state, modules })
        } else {
            let buckets = self
                .inner
                .store
                .flock_buckets(self.inner.group)
                .map_err(io_read)?
                .into_iter()
                .map(|(bucket, data)| {
                    let version = data.version;
                    let items = data.into_items().into_iter().map(|(k, v)| (k, ByteBuf::from(v))).collect();
                    (ByteBuf::from(bucket), version, items)
                })
                .collect();
            encode(&FlockSnapshot { buckets })
        };
        let index = self.applied.map_or(0, |l| l.index);
        let term = self.applied.map_or(0, |l| l.leader_id.term);
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{}-{term}-{index}", self.inner.group),
        };
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        self.build().await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, PeerInfo>), StorageError<NodeId>> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = 0;
        let mut changes = Vec::new();
        let mut log = Vec::new();
        let mut meta = self.meta.as_ref().map(|m| m.borrow().clone());
        let mut modules = Vec::new();
        for entry in entries {
            self.applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => self.membership = StoredMembership::new(Some(entry.log_id), m),
                EntryPayload::Normal(Command::Change(change)) => changes.push(change),
                EntryPayload::Normal(command) => {
                    let Some(state) = meta.as_mut() else {
                        tracing::error!(group = self.inner.group, "a flock log holds a meta command; ignored");
                        replies += 1;
                        continue;
                    };
                    match command {
                        Command::AddNode { id, info } => {
                            state.nodes.insert(id, info);
                        }
                        Command::SetFlockMap(map) if map.version > state.map.version => state.map = map,
                        Command::SetFlockMap(_) => {}
                        Command::PutModule { name, id, wasm } => {
                            modules.push((name.clone(), id, wasm.len() as u64));
                            log.push(LogOp::PutModule { id, name, wasm });
                        }
                        Command::Change(_) => unreachable!("matched above"),
                    }
                }
            }
            replies += 1;
        }
        if let Some(state) = &meta {
            log.push(LogOp::PutState { group: self.inner.group, key: META_STATE_KEY, value: encode(state) });
        }
        log.push(self.applied_op());
        // A ready leader's cache already holds what it proposed, and keeps each bucket until this
        // write is in the store (nothing reloads it from there before): it need not wait. A
        // follower's cached copies are stale and go once the store has the new state; the meta
        // group's readers read the store.
        let leading = !self.is_meta() && self.terms.get(self.inner.group).is_some();
        let written = if leading {
            self.inner.submit(log, changes, SyncTo::Nothing).map_err(io_write)?
        } else {
            let touched: Vec<(u32, Vec<u8>, u64)> =
                changes.iter().map(|c| (c.flock, c.bucket.clone(), c.version)).collect();
            self.inner.write(log, changes, SyncTo::Nothing).await.map_err(io_write)?;
            if !self.is_meta() {
                for (flock, bucket, version) in touched {
                    self.inner.node.applied(flock, bucket, version).await;
                }
            }
            0
        };
        if let Some(applied) = self.applied {
            lock(&self.recent).applied(applied.index);
        }
        for (name, id, size) in modules {
            self.inner.node.module_replicated(&name, id, size);
        }
        if let (Some(state), Some(sender)) = (meta, &self.meta) {
            sender.send_if_modified(|old| {
                let changed = *old != state;
                *old = state;
                changed
            });
        }
        Ok(vec![Applied { written }; replies])
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, PeerInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        if let Some(applied) = self.applied {
            lock(&self.recent).applied(applied.index);
        }
        let group = self.inner.group;
        if let Some(sender) = &self.meta {
            let snap: MetaSnapshot = decode(&bytes).map_err(io_read)?;
            let mut log: Vec<LogOp> = snap
                .modules
                .iter()
                .map(|(name, id, wasm)| LogOp::PutModule { id: *id, name: name.clone(), wasm: wasm.to_vec() })
                .collect();
            log.push(LogOp::PutState { group, key: META_STATE_KEY, value: encode(&snap.state) });
            log.push(self.applied_op());
            self.inner.write(log, Vec::new(), SyncTo::All).await.map_err(io_write)?;
            for (name, id, wasm) in &snap.modules {
                self.inner.node.module_replicated(name, *id, wasm.len() as u64);
            }
            sender.send_replace(snap.state);
        } else {
            let snap: FlockSnapshot = decode(&bytes).map_err(io_read)?;
            let changes = snap
                .buckets
                .into_iter()
                .map(|(bucket, version, items)| ChangeSet {
                    bucket: bucket.into_vec(),
                    flock: group,
                    version,
                    writes: items
                        .into_iter()
                        .map(|(item, value)| ItemWrite { item, value: Some(value.into_vec()) })
                        .collect(),
                })
                .collect();
            let log = vec![LogOp::ClearFlock { flock: group }, self.applied_op()];
            self.inner.write(log, changes, SyncTo::All).await.map_err(io_write)?;
            self.inner.node.drop_flock(group).await;
        }
        tracing::info!(group, last = ?meta.last_log_id, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        if self.applied.is_none() {
            return Ok(None);
        }
        self.build().await.map(Some)
    }
}

/// Opens a group's log store and state machine over the node's store.
pub fn open_group(
    group: GroupId,
    node: &Node,
    terms: Arc<LeaderTerms>,
    meta: Option<watch::Sender<MetaState>>,
) -> Result<(LogStore, StateMachine), StorageError<NodeId>> {
    let inner = GroupStore { group, store: node.store().clone(), node: node.clone() };
    let (applied, membership): (Option<LogId<NodeId>>, StoredMembership<NodeId, PeerInfo>) =
        inner.state(APPLIED_KEY)?.unwrap_or_default();
    if let Some(sender) = &meta
        && let Some(state) = inner.state::<MetaState>(META_STATE_KEY)?
    {
        sender.send_replace(state);
    }
    let recent = Arc::new(Mutex::new(RecentLog::default()));
    let log = LogStore { inner: inner.clone(), recent: recent.clone() };
    let sm = StateMachine { inner, applied, membership, terms, meta, recent };
    Ok((log, sm))
}

/// The least time a consensus message may take.
const RAFT_RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// An append carries at most this many bytes of entries (a single larger entry goes alone).
pub const APPEND_BYTES_MAX: u64 = 1 << 20;

/// About how many bytes an entry takes on the wire: its change set's keys and values.
fn entry_bytes(entry: &Entry<TypeConfig>) -> u64 {
    let payload = match &entry.payload {
        EntryPayload::Normal(Command::Change(change)) => {
            change.bucket.len()
                + change.writes.iter().map(|w| w.item.len() + w.value.as_ref().map_or(0, Vec::len)).sum::<usize>()
        }
        EntryPayload::Normal(Command::PutModule { wasm, .. }) => wasm.len(),
        _ => 0,
    };
    64 + payload as u64
}

/// Makes raft clients for one group.
pub struct Network {
    /// The group.
    pub group: GroupId,
    /// The node's consensus messages, batched per peer.
    pub outbox: Arc<Outbox>,
    /// Where refused votes are noted.
    pub outranked: Arc<Refusals>,
}

/// A raft client for one group and one target node.
pub struct GroupLink {
    group: GroupId,
    target: NodeId,
    outbox: Arc<Outbox>,
    outranked: Arc<Refusals>,
    /// The append of entries under way, if openraft gave up waiting for it.
    in_flight: Option<InFlightAppend>,
}

/// An append of entries that outlives openraft's wait for it.
///
/// openraft waits for an append only one heartbeat interval (450 ms) and then sends it again.
/// An append of a megabyte to a busy follower can take longer, and would then be cancelled and
/// resent forever. So the append runs as its own task, and the next call that sends the same
/// entries (or more after them, from the same point, in the same term) waits for that task
/// instead of starting over. An answer is handed out once; an append with no entries (a
/// heartbeat, which confirms the lead for reads) is never shared.
struct InFlightAppend {
    vote: Vote<NodeId>,
    prev: Option<LogId<NodeId>>,
    last: LogId<NodeId>,
    task: tokio::task::JoinHandle<Result<PeerResponse, PeerError>>,
}

impl Drop for InFlightAppend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = GroupLink;

    async fn new_client(&mut self, target: NodeId, node: &PeerInfo) -> GroupLink {
        self.outbox.peers().learn(target, node);
        GroupLink {
            group: self.group,
            target,
            outbox: self.outbox.clone(),
            outranked: self.outranked.clone(),
            in_flight: None,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, PeerInfo, RaftError<NodeId, E>>>;

/// How long a consensus message may take before this node gives up on it: a busy or catching-up
/// peer gets at least [`RAFT_RPC_TIMEOUT`], and a second more per MiB sent. The failure detector,
/// not this timeout, decides when a peer is down.
fn rpc_timeout(rpc: &RaftRpc, option: &RPCOption) -> std::time::Duration {
    let bytes = match rpc {
        RaftRpc::Append(append) => append.entries.iter().map(entry_bytes).sum(),
        RaftRpc::Snapshot(chunk) => chunk.data.len() as u64,
        RaftRpc::Vote(_) => 0,
    };
    option.hard_ttl().max(RAFT_RPC_TIMEOUT) + std::time::Duration::from_secs(bytes >> 20)
}

/// A peer's answer as openraft takes it.
fn answer<E: std::error::Error>(answer: Result<PeerResponse, PeerError>) -> RpcResult<PeerResponse, E> {
    match answer {
        Ok(PeerResponse::Error(e)) => Err(RPCError::Network(NetworkError::new(&e))),
        Ok(answer) => Ok(answer),
        Err(e @ PeerError::Unreachable(..)) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
    }
}

impl GroupLink {
    async fn send<E: std::error::Error>(&self, rpc: RaftRpc, option: &RPCOption) -> RpcResult<PeerResponse, E> {
        let timeout = rpc_timeout(&rpc, option);
        answer(self.outbox.send(self.target, self.group, rpc, timeout).await)
    }

    /// Sends an append of entries ending at `last`, or waits for the one under way that sends
    /// the same entries or fewer of them (see [`InFlightAppend`]). Returns the answer and the
    /// last entry that append sent.
    async fn send_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        last: LogId<NodeId>,
        option: &RPCOption,
    ) -> (RpcResult<PeerResponse>, LogId<NodeId>) {
        let joins =
            self.in_flight.as_ref().is_some_and(|f| f.vote == rpc.vote && f.prev == rpc.prev_log_id && f.last <= last);
        if !joins {
            let (vote, prev) = (rpc.vote, rpc.prev_log_id);
            let rpc = RaftRpc::Append(rpc);
            let timeout = rpc_timeout(&rpc, option);
            let (outbox, target, group) = (self.outbox.clone(), self.target, self.group);
            let task = tokio::spawn(async move { outbox.send(target, group, rpc, timeout).await });
            // Replacing an append under way cancels it.
            self.in_flight = Some(InFlightAppend { vote, prev, last, task });
        }
        let flight = self.in_flight.as_mut().expect("set above");
        let result = (&mut flight.task).await;
        let sent = flight.last;
        self.in_flight = None;
        let result = result.unwrap_or_else(|e| Err(PeerError::Lost(self.target, format!("the append failed: {e}"))));
        (answer(result), sent)
    }
}

fn unexpected<E: std::error::Error>(answer: PeerResponse) -> RPCError<NodeId, PeerInfo, RaftError<NodeId, E>> {
    let e = AnyError::error(format!("unexpected answer to a raft message: {answer:?}"));
    RPCError::Network(NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for GroupLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        // At most APPEND_BYTES_MAX of entries: the log reader reads no more per append
        // (`limited_get_log_entries`).
        let entries = rpc.entries.len() as u64;
        let answer = match rpc.entries.last().map(|e| e.log_id) {
            Some(last) => match self.send_entries(rpc, last, &option).await {
                // The append under way sent fewer entries than this call asked for.
                (Ok(PeerResponse::Append(AppendEntriesResponse::Success)), sent) if sent < last => {
                    Ok(PeerResponse::Append(AppendEntriesResponse::PartialSuccess(Some(sent))))
                }
                (answer, _) => answer,
            },
            None => self.send(RaftRpc::Append(rpc), &option).await,
        };
        match answer {
            Ok(PeerResponse::Append(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(RPCError::Network(e)) if e.to_string().contains("limit") && entries > 1 => {
                Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)))
            }
            Err(e) => Err(e),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.send(RaftRpc::Snapshot(rpc), &option).await {
            Ok(PeerResponse::Snapshot(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let mine = rpc.last_log_id;
        match self.send(RaftRpc::Vote(rpc), &option).await {
            Ok(PeerResponse::Vote(r)) => {
                if !r.vote_granted && r.last_log_id > mine {
                    self.outranked.note(self.group, self.target);
                }
                Ok(r)
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        }
    }
}

/// Log entries a group keeps before it snapshots; a herder further behind gets the snapshot.
pub const SNAPSHOT_LOGS_DEFAULT: u64 = 5000;

/// The raft settings every group uses. No group runs timers of its own: heartbeats and
/// elections are driven by the node-pair failure detector (`supervisor`). The election timeout
/// still sets the leader lease: a follower refuses to vote for `election_timeout_max` after it
/// last heard from a leader.
pub fn config(snapshot_logs: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "grex".into(),
        heartbeat_interval: 450,
        election_timeout_min: 500,
        election_timeout_max: super::decide::VOTE_LEASE.as_millis() as u64,
        enable_tick: false,
        enable_heartbeat: false,
        enable_elect: false,
        max_payload_entries: 256,
        // openraft gives each snapshot chunk this long (and drops the whole transfer when one
        // takes longer): a loaded follower writing a chunk must not restart the transfer.
        install_snapshot_timeout: 10_000,
        snapshot_max_chunk_size: 1 << 20,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs.max(1)),
        max_in_snapshot_log_to_keep: snapshot_logs / 5,
        ..Default::default()
    }
}
