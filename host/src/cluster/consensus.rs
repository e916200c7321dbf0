//! The consensus engine's driver: the one task that owns the node's [`Engine`] and connects it
//! to the world. Time (a 100 ms tick), peers' frames, proposals and the failure detector come in
//! on one channel; each round it takes the engine's output and
//!
//! - sends each peer one frame with every group's messages (a lane per peer, so a frame under
//!   way batches the next round's messages behind it); a snapshot goes in chunks beside them,
//!   its data read from the store;
//! - hands the round's durable write (every group's entries and hard state) to the node's group
//!   committer, one fsync for all groups, and tells the engine when it is on disk;
//! - applies committed entries: a flock's change sets go to the store (without an fsync: the log
//!   holds them), the meta group's commands to the meta state; proposals waiting on them are
//!   answered;
//! - publishes each group's leadership: a flock's lead is handed to the node's executors
//!   ([`LeaderTerms`]) once the leader has applied everything before its term and the store
//!   holds it.
//!
//! Disk layout of a group (log file): entries by index ([`WireEntry`]), `hard_state`, `base` (the
//! index and term the log starts after); state file: `applied` (the [`AppliedPoint`]: index,
//! term and configuration the state holds) and, for the meta group, `meta_state`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::prelude::{ConfChangeV2, Entry, EntryType, MessageType};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, watch};

use super::engine::{
    Committed, Engine, EngineConfig, EntrySource, Envelope, GroupLog, Lead, Output, Proposal, Refusal, StateRole,
    Write as EngineWrite,
};
use super::messages::{PeerRequest, PeerResponse};
use super::meta::MetaState;
use super::peer::{Lane, Peers};
use super::placement::FlockMap;
use super::snapshot::{self, SnapshotFile};
use super::wire::{self, AppliedPoint, RaftMessage, WireConf, WireEntry, WireHardState};
use super::{NodeId, PeerInfo};
use crate::data::{Change, ChangeSet};
use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::node::{Node, Write};
use crate::storage::{GroupId, LogOp, LogRead, META_GROUP, ModuleId, Store, SyncTo};

/// The engine's tick.
pub const TICK: Duration = Duration::from_millis(100);
/// Log entries a group keeps before it purges the applied ones (keeping a fifth of them for
/// followers that lag a little).
pub const SNAPSHOT_LOGS_DEFAULT: u64 = 5000;
/// Inputs waiting for the driver.
const INPUTS_MAX: usize = 8192;
/// A replay at start reads the log in pieces of this size: bounded, whatever its entries weigh.
const REPLAY_READ: LogRead = LogRead::within(1024, 16 << 20);
/// Ticks between republishing every group's view (each is also published in any round that
/// stepped or changed it; this catches what moves without either).
const VIEWS_REFRESH_TICKS: u64 = 10;
/// Bytes of peer messages a node holds that its driver has not stepped yet, over all peers: a
/// peer's lane waits to hand over its next frame while they would go past it (one frame larger
/// than it goes alone). Without it the driver's input queue, bounded by count, held frames of up to
/// [`FRAME_BYTES`] each from peers faster than the driver.
const INCOMING_BYTES: usize = 2 * FRAME_BYTES;
/// How many times `--snapshot-logs` entries a leader's log may hold for herders that lag, before
/// it purges them anyway ([`Driver::maybe_purge`]).
const LAGGING_LOGS_FACTOR: u64 = 4;
/// Snapshots a node writes and sends at once. Each takes a file the size of its flock and a turn
/// of the snapshot pace, so a node that joins a busy cluster (every flock sends it one) does not
/// have them all written at once.
const SNAPSHOTS_SENT_AT_ONCE: usize = 2;
/// Bytes of snapshot data in one peer frame.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Bytes of entries in one frame of consensus messages.
const FRAME_BYTES: usize = 8 << 20;
/// Messages waiting in the lane to one peer.
const LANE_MESSAGES_MAX: usize = 16_384;
/// Bytes of messages one lane holds, queued or being written: a frame's worth
/// ([`Driver::send`]). A node holds at most this much per peer beyond its log's memory.
const LANE_QUEUE_BYTES: usize = FRAME_BYTES;
/// How long a peer frame of consensus messages may take.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proposal is remembered for its answer (its caller gives up after 10 s).
const PROPOSAL_KEPT: Duration = Duration::from_secs(60);
/// How long a read-index round may take before its reads are refused.
const READ_PATIENCE: Duration = Duration::from_secs(5);

pub(super) const HARD_STATE_KEY: &str = "hard_state";
pub(super) const BASE_KEY: &str = "base";
pub(super) const APPLIED_KEY: &str = "applied";
pub(super) const META_STATE_KEY: &str = "meta_state";
/// Set on a flock this node has released (its copy deleted): its log may still need dropping.
const RELEASED_KEY: &str = "released";

/// The first byte of a [`Command::Change`]'s encoding (its variant's index); the change set's own
/// encoding follows it.
const CHANGE_TAG: u8 = 0;

/// The payload of a flock entry, encoded from a borrowed change set: the same bytes as
/// `Command::Change(change.clone())` without the clone.
pub fn encode_change(change: &ChangeSet) -> Vec<u8> {
    #[derive(Serialize)]
    enum Borrowed<'a> {
        Change(&'a ChangeSet),
    }
    let bytes = 32 + change.bucket.len() + change.bytes() + 8 * change.writes.len();
    wire::encode_sized(&Borrowed::Change(change), bytes)
}

/// A log entry's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// A flock group's entry: one job's change set.
    Change(ChangeSet),
    /// Meta group: a node joined (or has new addresses).
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
    /// Meta group: a module name is deleted (the module too once no name points to it).
    DeleteModule {
        /// The name.
        name: String,
    },
    /// Meta group: a member is to hand its flocks to the others, then leave.
    DrainNode {
        /// Its id.
        id: NodeId,
    },
    /// Meta group: a member leaves for good (drained, or dead); it may not come back.
    RemoveNode {
        /// Its id.
        id: NodeId,
    },
    /// Meta group: a user is added, changed or deleted.
    ChangeUser(crate::access::UserChange),
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

    fn set(&self, flock: u32, term: u64) -> u64 {
        self.0.get(flock as usize).map_or(0, |t| t.swap(term, Ordering::AcqRel))
    }
}

/// The engine's log memory as last published by the driver (for metrics).
#[derive(Debug, Default)]
struct LogMemory {
    /// Bytes of log entries in memory, over every group.
    held: AtomicU64,
    /// Appends from leaders dropped because their entries did not fit, since the node started.
    appends_dropped: AtomicU64,
}

/// A group as the rest of the node sees it, published by the driver.
#[derive(Clone, Debug)]
pub struct GroupView {
    /// Leadership.
    pub lead: Lead,
    /// Voters (both halves of a joint configuration).
    pub voters: BTreeSet<NodeId>,
    /// The voters are changing: the configuration at the last applied entry is joint, and both
    /// its halves must each reach a quorum.
    pub joint: bool,
    /// Learners.
    pub learners: BTreeSet<NodeId>,
    /// First log index.
    pub first: u64,
    /// Last log index.
    pub last: u64,
    /// Committed index, as this node knows it.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// On the leader: each member's matched index.
    pub matched: BTreeMap<NodeId, u64>,
}

/// What enters the driver.
enum Input {
    /// Peer messages, and the bytes they hold of [`INCOMING_BYTES`] until the driver steps them.
    Frame {
        messages: Vec<RaftMessage>,
        snapshot: Option<Vec<u8>>,
        held: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    Propose {
        group: GroupId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<u64>>,
    },
    ConfChange {
        group: GroupId,
        change: ConfChangeV2,
        reply: oneshot::Sender<Result<u64>>,
    },
    ReadIndex {
        group: GroupId,
        term: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Transfer(GroupId, NodeId),
    PeerDown(NodeId),
    Unreachable(NodeId),
    SnapshotSent {
        group: GroupId,
        to: NodeId,
        installed: bool,
    },
    Persisted {
        id: u64,
        result: std::result::Result<(), String>,
    },
    Release {
        group: GroupId,
        reply: oneshot::Sender<Result<()>>,
    },
    Released(GroupId),
    StoreHolds {
        group: GroupId,
        term: u64,
    },
    Stop,
}

/// The handle to the driver. Cheap to clone.
#[derive(Clone)]
pub struct Consensus {
    tx: mpsc::Sender<Input>,
    /// Bytes of peer messages waiting for the driver ([`INCOMING_BYTES`]).
    incoming: Arc<tokio::sync::Semaphore>,
    /// Inputs from threads that must not block (the committer's callbacks).
    events: mpsc::UnboundedSender<Input>,
    views: Arc<RwLock<BTreeMap<GroupId, GroupView>>>,
    meta: watch::Receiver<MetaState>,
    /// Per flock, the term in which this node is its ready leader (set by the driver).
    terms: Arc<LeaderTerms>,
    log_memory: Arc<LogMemory>,
}

fn stopped() -> RemoteError {
    error(ErrorCode::ShuttingDown, "the node's consensus engine stopped")
}

/// The driver's side of the channels a [`Consensus`] handle sends into, until it starts.
pub struct Inbox {
    rx: mpsc::Receiver<Input>,
    events: mpsc::UnboundedReceiver<Input>,
    meta: watch::Sender<MetaState>,
}

impl Consensus {
    /// A handle whose driver is not running yet: what it is asked queues until
    /// [`Consensus::start`] takes the inbox (so the node's executors can hold the handle before
    /// the driver, which needs the node, exists).
    pub fn new(flocks: u32) -> (Consensus, Inbox) {
        let (tx, rx) = mpsc::channel(INPUTS_MAX);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (meta_tx, meta) = watch::channel(MetaState::default());
        let views = Arc::new(RwLock::new(BTreeMap::new()));
        let terms = Arc::new(LeaderTerms::new(flocks));
        let incoming = Arc::new(tokio::sync::Semaphore::new(INCOMING_BYTES));
        let log_memory = Arc::default();
        (
            Consensus { tx, incoming, events, views, meta, terms, log_memory },
            Inbox { rx, events: events_rx, meta: meta_tx },
        )
    }

    /// Starts the driver of this handle over the node's store. `bootstrap`: this node founds a
    /// new cluster (every group starts with it as the only voter).
    pub async fn start(
        &self,
        inbox: Inbox,
        me: NodeId,
        node: Node,
        peers: Arc<Peers>,
        snapshot_logs: u64,
        bootstrap: bool,
    ) -> anyhow::Result<()> {
        let store = node.store().clone();
        let source: Arc<dyn EntrySource> = Arc::new(StoreEntries { store: store.clone() });
        let mut engine = Engine::new(
            me,
            EngineConfig {
                seed: me ^ rand::random::<u64>(),
                max_mem_bytes: node.config().consensus_memory_bytes as u64,
                ..EngineConfig::default()
            },
        );
        let flocks = node.flock_count();
        let mut applied_conf = BTreeMap::new();
        let (meta_state, meta_replayed) = meta_state_at_start(store.as_ref())?;
        if bootstrap {
            let conf = WireConf { voters: vec![me], ..WireConf::default() };
            let mut log = Vec::new();
            for group in std::iter::once(META_GROUP).chain(0..flocks) {
                let index = super::engine::BOOTSTRAP_INDEX;
                let point = AppliedPoint { index, term: index, conf: conf.clone() };
                let hard = WireHardState { term: index, vote: 0, commit: index };
                log.push(LogOp::PutLogState { group, key: HARD_STATE_KEY, value: wire::encode(&hard) });
                log.push(LogOp::PutLogState { group, key: BASE_KEY, value: wire::encode(&(index, index)) });
                log.push(LogOp::PutState { group, key: APPLIED_KEY, value: wire::encode(&point) });
            }
            node.commits()
                .submit_write(Write { log, changes: Vec::new(), sync: SyncTo::All, done: None })
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            node.commits().settle().await;
        }
        // A release cut short by a crash: its state is gone, its log may not be.
        let released = released_flocks(store.as_ref(), flocks)?;
        if !released.is_empty() {
            let log = released.iter().map(|&group| LogOp::DropGroupLog { group }).collect();
            node.commits()
                .submit_write(Write { log, changes: Vec::new(), sync: SyncTo::Log, done: None })
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        }
        for group in std::iter::once(META_GROUP).chain(0..flocks) {
            if released.contains(&group) {
                continue;
            }
            if let Some((log, conf)) = open_group(store.as_ref(), group, &source)? {
                applied_conf.insert(group, conf);
                engine.add_group(group, log)?;
            } else if group == META_GROUP {
                // A joining node: the meta leader's snapshot brings the meta group.
                engine.add_group(group, GroupLog::empty(group, source.clone()))?;
            }
        }
        // Every node serves what the meta group holds (modules, the map): its followers hear of
        // each commit at once.
        engine.set_eager_commit(META_GROUP, true);
        let Inbox { rx, events: events_rx, meta: meta_tx } = inbox;
        meta_tx.send_replace(meta_state.clone());
        let mut driver = Driver {
            engine,
            node,
            peers,
            terms: self.terms.clone(),
            handle: self.clone(),
            source,
            views: self.views.clone(),
            meta_tx,
            meta_state,
            meta_replayed,
            applied_conf,
            snapshot_logs,
            proposals: BTreeMap::new(),
            conf_changes: BTreeMap::new(),
            reads_waiting: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read: 1,
            lanes: BTreeMap::new(),
            snapshots_sending: BTreeSet::new(),
            snapshot_files: BTreeMap::new(),
            snapshot_turns: Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_SENT_AT_ONCE)),
            written: BTreeMap::new(),
            purges: BTreeMap::new(),
            stepped: BTreeSet::new(),
            releasing: BTreeSet::new(),
            ticks: 0,
            failed: false,
        };
        // A group this node is the only voter of (a new cluster, a one-node cluster after a
        // restart) is led by it at once, not after an election timeout.
        for group in driver.engine.group_ids().collect::<Vec<_>>() {
            let alone =
                driver.engine.members(group).is_some_and(|(voters, _)| voters.len() == 1 && voters.contains(&me));
            if alone {
                let _ = driver.engine.campaign(group);
            }
        }
        let all = driver.engine.group_ids().collect();
        driver.publish_views(all);
        driver.drain();
        tokio::spawn(driver.run(rx, events_rx));
        Ok(())
    }

    /// Stops taking part in flock `group` and deletes this node's copy of it (this node must
    /// not lead it; the caller knows the flock's group no longer counts this node).
    pub async fn release(&self, group: GroupId) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Input::Release { group, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Hands a frame of peer messages to the engine; waits while the driver is busy, and while
    /// the frames waiting for it hold [`INCOMING_BYTES`] (so a peer's lane reads its next frame
    /// only then).
    pub async fn deliver(&self, messages: Vec<RaftMessage>, snapshot: Option<Vec<u8>>) -> Result<()> {
        let bytes =
            messages.iter().map(RaftMessage::encoded_bytes).sum::<usize>() + snapshot.as_ref().map_or(0, Vec::len);
        let permits = bytes.min(INCOMING_BYTES) as u32;
        let held = self.incoming.clone().acquire_many_owned(permits).await.map_err(|_| stopped())?;
        self.tx.send(Input::Frame { messages, snapshot, held: Some(held) }).await.map_err(|_| stopped())
    }

    /// Proposes an entry to `group`; resolves once it is applied here (with the committer
    /// sequence of the write that holds its effects), or with an error if it was refused or
    /// replaced by another leader's entry.
    pub fn propose(&self, group: GroupId, data: Vec<u8>) -> Result<oneshot::Receiver<Result<u64>>> {
        let (reply, rx) = oneshot::channel();
        // From a synchronous caller (the executors): the channel is bounded, so this waits only
        // while the driver is far behind.
        self.tx.try_send(Input::Propose { group, data, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                error(ErrorCode::Overloaded, "the consensus engine has too many requests queued; retry shortly")
            }
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })?;
        Ok(rx)
    }

    /// Proposes a command to `group` and waits until it is applied here.
    pub async fn write(&self, group: GroupId, command: &Command) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        let data = wire::encode(command);
        self.tx.send(Input::Propose { group, data, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Proposes a configuration change; resolves with its index once it is applied here.
    pub async fn change_conf(&self, group: GroupId, change: ConfChangeV2) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::ConfChange { group, change, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Resolves once a majority confirmed, after this call, that this node leads `group` in `term`.
    pub async fn confirm_lead(&self, group: GroupId, term: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Input::ReadIndex { group, term, reply }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Hands the lead of `group` to `to`.
    pub async fn transfer(&self, group: GroupId, to: NodeId) {
        let _ = self.tx.send(Input::Transfer(group, to)).await;
    }

    /// The failure detector lost `node` (or saw it restart).
    pub async fn peer_down(&self, node: NodeId) {
        let _ = self.tx.send(Input::PeerDown(node)).await;
    }

    /// Stops the driver.
    pub async fn stop(&self) {
        let _ = self.tx.send(Input::Stop).await;
    }

    /// A group as last published.
    pub fn view(&self, group: GroupId) -> Option<GroupView> {
        self.views.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }

    /// Every group's view, as last published.
    pub fn views(&self) -> BTreeMap<GroupId, GroupView> {
        self.views.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bytes of log entries the engine holds in memory, and how many appends it has dropped for
    /// want of room, as last published.
    pub fn log_memory(&self) -> (u64, u64) {
        let memory = &self.log_memory;
        (memory.held.load(Ordering::Relaxed), memory.appends_dropped.load(Ordering::Relaxed))
    }

    /// A group's leadership and applied index, without copying the rest of its view.
    pub fn lead_and_applied(&self, group: GroupId) -> Option<(Lead, u64)> {
        self.views.read().unwrap_or_else(|p| p.into_inner()).get(&group).map(|v| (v.lead, v.applied))
    }

    /// The meta state as applied here.
    pub fn meta(&self) -> watch::Receiver<MetaState> {
        self.meta.clone()
    }

    /// Per flock, the term in which this node is its ready leader.
    pub fn terms(&self) -> &Arc<LeaderTerms> {
        &self.terms
    }
}

/// Reads a group's named value.
fn read_state<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    group: GroupId,
    key: &str,
) -> anyhow::Result<Option<T>> {
    match store.log_state(group, key)? {
        Some(bytes) => wire::decode(&bytes).map(Some).map_err(|e| anyhow::anyhow!("group {group}'s {key}: {e}")),
        None => Ok(None),
    }
}

/// A module name's change: what it points to now (id, size), or `None` once deleted.
type ModuleChange = (String, Option<(ModuleId, u64)>);

/// Where a proposal's answer goes, and the answer: an index, or `None` for the sequence of the
/// write that applies it.
type Answer = (oneshot::Sender<Result<u64>>, Result<Option<u64>>);

/// One round's applies, every group's, gathered into one committer write: a write per group
/// woke the committer once per group, though it only holds applies back to share a transaction.
#[derive(Default)]
struct Applies {
    log: Vec<LogOp>,
    changes: Vec<Change>,
    /// What to do once the write is in the store, per group that needs anything (the meta
    /// group's effects: a write with one is written at once, not held to share a transaction).
    done: Vec<crate::node::WriteDone>,
    /// The buckets a follower applied, per flock: its older cached copies are stale.
    touched: Vec<(GroupId, Vec<BucketVersion>)>,
    /// Proposals answered with the write's sequence once it is queued.
    answers: Vec<Answer>,
    /// Each group and the last index applied.
    groups: Vec<(GroupId, u64)>,
}

/// A bucket's key and a version of it.
type BucketVersion = (Vec<u8>, u64);

/// Makes the node's module names follow changes its store now holds, in order.
fn publish_modules(node: &Node, changes: Vec<ModuleChange>) {
    for (name, module) in changes {
        match module {
            Some((id, size)) => node.module_replicated(&name, id, size),
            None => node.module_removed(&name),
        }
    }
}

/// The meta state as the store holds it, as of its applied point (`None` on a new node).
fn stored_meta_state(store: &dyn Store) -> anyhow::Result<Option<MetaState>> {
    match store.log_state(META_GROUP, META_STATE_KEY)? {
        Some(bytes) => MetaState::decode(&bytes).map(Some).map_err(|e| anyhow::anyhow!("the stored meta state: {e}")),
        None => Ok(None),
    }
}

/// The meta state as the store holds it (empty on a new node), with the entries this node knew
/// to be committed applied on it. The state is written without a sync after each apply, so after a
/// crash it can be older than the log, whose entries the engine applies again soon after start;
/// until then, the node would check requests against users it had already seen deleted or added.
/// Returns the state and the last index applied on it, which the engine's own apply then skips
/// (for the meta state; it still applies their module commands).
fn meta_state_at_start(store: &dyn Store) -> anyhow::Result<(MetaState, u64)> {
    let Some(mut state) = stored_meta_state(store)? else { return Ok((MetaState::default(), 0)) };
    let applied: AppliedPoint = read_state(store, META_GROUP, APPLIED_KEY)?.unwrap_or_default();
    let Some(hard) = read_state::<WireHardState>(store, META_GROUP, HARD_STATE_KEY)? else {
        return Ok((state, applied.index));
    };
    let mut from = applied.index + 1;
    let mut replayed = applied.index;
    while from <= hard.commit {
        let chunk = store.log_entries(META_GROUP, from, hard.commit + 1, REPLAY_READ)?;
        let Some(&(last, _)) = chunk.last() else { break };
        for (index, bytes) in chunk {
            let entry: WireEntry = wire::decode(&bytes).map_err(|e| anyhow::anyhow!("meta entry {index}: {e}"))?;
            if entry.kind != EntryType::EntryNormal as i32 || entry.data.is_empty() {
                continue;
            }
            match wire::decode::<Command>(&entry.data) {
                Ok(Command::Change(_) | Command::PutModule { .. } | Command::DeleteModule { .. }) => {}
                Ok(command) => state.apply(command),
                Err(e) => anyhow::bail!("meta entry {index} could not be decoded: {e}"),
            }
        }
        replayed = last;
        from = last + 1;
    }
    Ok((state, replayed))
}

/// The flocks this node released (deleted its copy of); their logs may still need dropping.
fn released_flocks(store: &dyn Store, flocks: u32) -> anyhow::Result<BTreeSet<GroupId>> {
    let mut released = BTreeSet::new();
    for group in 0..flocks {
        if store.log_state(group, RELEASED_KEY)?.is_some() {
            released.insert(group);
        }
    }
    Ok(released)
}

/// Opens a group from the store: `None` if this node holds nothing of it.
fn open_group(
    store: &dyn Store,
    group: GroupId,
    source: &Arc<dyn EntrySource>,
) -> anyhow::Result<Option<(GroupLog, WireConf)>> {
    let hard: Option<WireHardState> = read_state(store, group, HARD_STATE_KEY)?;
    let applied: Option<AppliedPoint> = read_state(store, group, APPLIED_KEY)?;
    if hard.is_none() && applied.is_none() {
        return Ok(None);
    }
    let applied = applied.unwrap_or_default();
    let mut base: (u64, u64) = read_state(store, group, BASE_KEY)?.unwrap_or((0, 0));
    let mut terms: Vec<(u64, u64)> = Vec::new();
    let mut last = base.0;
    let mut from = base.0 + 1;
    loop {
        let chunk = store.log_entries(group, from, u64::MAX, REPLAY_READ)?;
        let Some(&(end, _)) = chunk.last() else { break };
        for (index, bytes) in &chunk {
            let entry: WireEntry =
                wire::decode(bytes).map_err(|e| anyhow::anyhow!("group {group} entry {index}: {e}"))?;
            if terms.last().is_none_or(|&(_, t)| t != entry.term) {
                terms.push((entry.index, entry.term));
            }
            last = entry.index;
        }
        from = end + 1;
    }
    let term_at = |index: u64| -> Option<u64> {
        if index == base.0 {
            return Some(base.1);
        }
        let run = terms.partition_point(|&(first, _)| first <= index);
        (index > base.0 && index <= last && run > 0).then(|| terms[run - 1].1)
    };
    if applied.index > base.0 && term_at(applied.index) != Some(applied.term) {
        // A snapshot's state was written but not the log it replaced (the two are separate
        // transactions): the log starts after the snapshot.
        tracing::warn!(group, applied = applied.index, "the log does not reach the applied state; starting after it");
        base = (applied.index, applied.term);
        terms.clear();
        last = applied.index;
    }
    let state =
        raft::RaftState { hard_state: hard.unwrap_or_default().into(), conf_state: applied.conf.clone().into() };
    let log = GroupLog::restore(group, state, base, last, terms, applied.metadata(), source.clone());
    Ok(Some((log, applied.conf)))
}

/// Entries that left the engine's memory, read back from the store's log.
struct StoreEntries {
    store: Arc<dyn Store>,
}

impl EntrySource for StoreEntries {
    fn entries(&self, group: GroupId, low: u64, high: u64, max_bytes: u64) -> anyhow::Result<Vec<Entry>> {
        if low >= high {
            return Ok(Vec::new());
        }
        // The store stops at the message's size before it reads (its index knows each entry's
        // length), so a follower far behind on 1 MiB entries costs one read per entry sent.
        let read = self.store.log_entries(group, low, high, LogRead::within(usize::MAX, max_bytes))?;
        if read.is_empty() {
            anyhow::bail!("group {group}: log entry {low} is missing from the store");
        }
        let mut out = Vec::with_capacity(read.len());
        let mut bytes = 0u64;
        for (index, encoded) in read {
            let entry: Entry = wire::decode::<WireEntry>(&encoded)
                .and_then(Entry::try_from)
                .map_err(|e| anyhow::anyhow!("group {group} entry {index}: {e}"))?;
            // raft-rs's measure, which counts a little more per entry than the encoded length.
            bytes += super::engine::entry_bytes(&entry);
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }
}

struct Waiter {
    term: u64,
    since: Instant,
    reply: oneshot::Sender<Result<u64>>,
}

/// A read waiting for its lead to be confirmed in its term.
type ReadWaiter = (u64, oneshot::Sender<Result<()>>);

struct ReadRound {
    group: GroupId,
    started: Instant,
    waiting: Vec<ReadWaiter>,
    /// The commit index the leader confirmed, once it has.
    index: Option<u64>,
}

struct Driver {
    engine: Engine,
    node: Node,
    peers: Arc<Peers>,
    terms: Arc<LeaderTerms>,
    handle: Consensus,
    source: Arc<dyn EntrySource>,
    views: Arc<RwLock<BTreeMap<GroupId, GroupView>>>,
    meta_tx: watch::Sender<MetaState>,
    meta_state: MetaState,
    /// The meta entries applied on `meta_state` when it was read at start (`meta_state_at_start`):
    /// the meta state skips them when the engine applies them. Until the engine's apply passes
    /// this index, the state written with an applied point may hold entries after it. Applying
    /// those again (after another crash, or on a snapshot's receiver) gives the same state: the
    /// last command on a user, a member or the map decides it, and adding a user only fills a
    /// free name.
    meta_replayed: u64,
    /// Per group, the configuration at the last applied entry.
    applied_conf: BTreeMap<GroupId, WireConf>,
    snapshot_logs: u64,
    /// Proposals waiting to be applied, by group and index.
    proposals: BTreeMap<(GroupId, u64), Waiter>,
    conf_changes: BTreeMap<(GroupId, u64), Waiter>,
    /// Reads waiting for the next read-index round of their group.
    reads_waiting: BTreeMap<GroupId, Vec<ReadWaiter>>,
    /// Rounds under way, by context.
    reads: BTreeMap<u64, ReadRound>,
    next_read: u64,
    lanes: BTreeMap<NodeId, LaneQueue>,
    /// Snapshots waiting for their turn or under way, by group and peer ([`Driver::send_snapshot`]).
    snapshots_sending: BTreeSet<(GroupId, NodeId)>,
    /// The file of the snapshot each group took and has yet to write ([`Driver::snapshot_arrived`]).
    snapshot_files: BTreeMap<GroupId, PathBuf>,
    /// Turns to build and send a snapshot.
    snapshot_turns: Arc<tokio::sync::Semaphore>,
    /// Per flock, the committer sequence of its last applied write.
    written: BTreeMap<GroupId, u64>,
    /// Purges planned, by group: the last index to purge, and the committer sequence a
    /// checkpoint must cover first (the write of the state applied past it).
    purges: BTreeMap<GroupId, (u64, u64)>,
    /// Groups that took a peer's message this round (their view is republished after it).
    stepped: BTreeSet<GroupId>,
    /// Flocks whose release is being written: not adopted again until it is.
    releasing: BTreeSet<GroupId>,
    ticks: u64,
    failed: bool,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, mut events: mpsc::UnboundedReceiver<Input>) {
        let mut next_tick = tokio::time::Instant::now() + TICK;
        loop {
            let input = tokio::select! {
                biased;
                Some(event) = events.recv() => Some(event),
                Some(input) = rx.recv() => Some(input),
                _ = tokio::time::sleep_until(next_tick) => None,
                else => return,
            };
            if let Some(input) = input {
                if !self.handle_input(input) {
                    break;
                }
                // Everything that queued meanwhile joins this round.
                while let Ok(event) = events.try_recv() {
                    self.handle_input(event);
                }
                for _ in 0..256 {
                    let Ok(input) = rx.try_recv() else { break };
                    if !self.handle_input(input) {
                        return self.stop();
                    }
                }
            }
            // Time goes on under load too: a busy loop must not starve elections and heartbeats.
            let now = tokio::time::Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.engine.tick();
                self.ticks += 1;
                self.expire_reads();
                self.expire_proposals();
                self.purge_checkpointed();
                if self.ticks.is_multiple_of(VIEWS_REFRESH_TICKS) {
                    let all = self.engine.group_ids().collect();
                    self.publish_views(all);
                }
            }
            self.drain();
        }
        self.stop();
    }

    /// Forgets proposals long past their callers' patience (a group this node left, say, whose
    /// entries it will never apply).
    fn expire_proposals(&mut self) {
        let stale = |w: &Waiter| w.since.elapsed() > PROPOSAL_KEPT;
        self.proposals.retain(|_, w| !stale(w));
        self.conf_changes.retain(|_, w| !stale(w));
    }

    fn stop(&mut self) {
        for (_, waiter) in std::mem::take(&mut self.proposals) {
            let _ = waiter.reply.send(Err(stopped()));
        }
        for flock in 0..self.node.flock_count() {
            self.terms.set(flock, 0);
        }
    }

    /// Takes one input; false to stop.
    fn handle_input(&mut self, input: Input) -> bool {
        match input {
            // What the frame held is released once its messages are stepped (at the arm's end).
            Input::Frame { messages, snapshot, held: _held } => {
                let mut data = snapshot;
                // The file a snapshot's chunks were gathered in, and its group.
                let mut file = None;
                let envelopes: Vec<Envelope> = messages
                    .into_iter()
                    .filter_map(|m| {
                        let snap = if m.is_snapshot() { data.take() } else { None };
                        if let Some(path) = &snap {
                            file = Some((m.group, snapshot::path_from_data(path)));
                        }
                        match m.into_message(snap) {
                            Ok((group, message)) => Some(Envelope { group, message }),
                            Err(e) => {
                                tracing::warn!("a peer sent a malformed consensus message: {e}");
                                None
                            }
                        }
                    })
                    .collect();
                self.stepped.extend(envelopes.iter().map(|e| e.group));
                for stray in self.engine.step(envelopes) {
                    self.adopt(stray);
                }
                if let Some((group, path)) = file {
                    self.snapshot_arrived(group, path);
                }
            }
            Input::Propose { group, data, reply } => match self.engine.propose(group, data) {
                Ok(Proposal { index, term }) => {
                    self.proposals.insert((group, index), Waiter { term, since: Instant::now(), reply });
                }
                Err(refusal) => {
                    let _ = reply.send(Err(refused(group, refusal)));
                }
            },
            Input::ConfChange { group, change, reply } => match self.engine.propose_conf_change(group, change) {
                Ok(Proposal { index, term }) => {
                    self.conf_changes.insert((group, index), Waiter { term, since: Instant::now(), reply });
                }
                Err(refusal) => {
                    let _ = reply.send(Err(refused(group, refusal)));
                }
            },
            Input::ReadIndex { group, term, reply } => {
                self.reads_waiting.entry(group).or_default().push((term, reply));
            }
            Input::Transfer(group, to) => {
                let _ = self.engine.transfer_leader(group, to);
            }
            Input::PeerDown(node) => self.engine.peer_down(node),
            Input::Unreachable(node) => self.engine.report_unreachable(node),
            Input::SnapshotSent { group, to, installed } => {
                self.snapshots_sending.remove(&(group, to));
                self.engine.report_snapshot(group, to, installed)
            }
            Input::Persisted { id, result } => match result {
                Ok(()) => self.engine.persisted(id),
                Err(e) => {
                    // Fail-stop: the committer refuses every later write too.
                    tracing::error!(error = %e, "the consensus log could not be written; this node stops taking part");
                    self.failed = true;
                }
            },
            Input::StoreHolds { group, term } => {
                let lead = self.engine.lead(group);
                if lead.is_some_and(|l| l.ready && l.term == term) && group != META_GROUP {
                    self.terms.set(group, term);
                }
            }
            Input::Release { group, reply } => {
                let _ = reply.send(self.release(group));
            }
            Input::Released(group) => {
                self.releasing.remove(&group);
            }
            Input::Stop => return false,
        }
        true
    }

    /// A message for a group this node does not run: a leader's first message to a new herder
    /// starts the group (empty; the leader sends a snapshot). Others are stale and dropped.
    fn adopt(&mut self, envelope: Envelope) {
        let from_leader = matches!(
            envelope.message.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        );
        let group = envelope.group;
        let known = group == META_GROUP || group < self.node.flock_count();
        if !from_leader || !known || self.releasing.contains(&group) {
            tracing::debug!(group, from = envelope.message.from, kind = ?envelope.message.get_msg_type(), "a message for a group this node does not run was dropped");
            return;
        }
        if self.engine.has_group(group) {
            // Adopted for an earlier message of the same round.
            self.engine.step([envelope]);
            return;
        }
        tracing::info!(group, from = envelope.message.from, "joining a group its leader added this node to");
        if group != META_GROUP {
            // A flock released earlier: its mark goes before the new log is written (and for good:
            // a crash must not then drop the new log as the rest of the old release).
            let forget =
                Write { log: vec![LogOp::ForgetGroup { group }], changes: Vec::new(), sync: SyncTo::All, done: None };
            if let Err(e) = self.node.commits().submit_write(forget) {
                tracing::error!(error = %e.message, "the consensus log could not be written; this node stops taking part");
                self.failed = true;
                return;
            }
        }
        if let Err(e) = self.engine.add_group(group, GroupLog::empty(group, self.source.clone())) {
            tracing::warn!(group, "could not start the group: {e}");
            return;
        }
        self.engine.step([envelope]);
    }

    /// Stops taking part in a flock this node no longer herds and deletes its copy: the state
    /// machine (applied point, every bucket) and a mark in one transaction, then the log. A
    /// restart after the first part finishes the second (`Consensus::start`); the flock is never
    /// opened again unless its leader adds this node anew.
    fn release(&mut self, group: GroupId) -> Result<()> {
        if group == META_GROUP || group >= self.node.flock_count() {
            return Err(error(ErrorCode::BadRequest, format!("group {group} is not a flock")));
        }
        if self.releasing.contains(&group) || !self.engine.has_group(group) {
            return Ok(());
        }
        if self.engine.lead(group).is_some_and(|l| l.role == StateRole::Leader) {
            return Err(error(ErrorCode::Conflict, format!("this node leads flock {group}")));
        }
        self.engine.remove_group(group);
        let gone = || error(ErrorCode::Unavailable, "this node no longer herds the flock; retry");
        // A proposal still waiting may yet commit under the flock's next leader: not known.
        let unknown = || {
            error(
                ErrorCode::OutcomeUnknown,
                "this node left the flock before its write committed; the write may still take effect, so \
                 read before retrying",
            )
        };
        for waiters in [&mut self.proposals, &mut self.conf_changes] {
            let keys: Vec<(GroupId, u64)> = waiters.range((group, 0)..=(group, u64::MAX)).map(|(k, _)| *k).collect();
            for key in keys {
                let _ = waiters.remove(&key).expect("listed").reply.send(Err(unknown()));
            }
        }
        for (_, reply) in self.reads_waiting.remove(&group).unwrap_or_default() {
            let _ = reply.send(Err(gone()));
        }
        let rounds: Vec<u64> = self.reads.iter().filter(|(_, r)| r.group == group).map(|(ctx, _)| *ctx).collect();
        for ctx in rounds {
            for (_, reply) in self.reads.remove(&ctx).expect("listed").waiting {
                let _ = reply.send(Err(gone()));
            }
        }
        self.written.remove(&group);
        self.purges.remove(&group);
        self.applied_conf.remove(&group);
        self.terms.set(group, 0);
        self.views.write().unwrap_or_else(|p| p.into_inner()).remove(&group);
        self.releasing.insert(group);
        let events = self.handle.events.clone();
        let node = self.node.clone();
        let rt = tokio::runtime::Handle::current();
        let done = Box::new(move |result: std::result::Result<(), String>| {
            match &result {
                Ok(()) => tracing::info!(flock = group, "deleted this node's copy of a flock it no longer herds"),
                Err(e) => tracing::error!(flock = group, error = %e, "deleting a flock's copy failed"),
            }
            rt.spawn(async move { node.drop_flock(group).await });
            let _ = events.send(Input::Released(group));
        });
        let log = vec![
            LogOp::ForgetGroup { group },
            LogOp::ClearFlock { flock: group },
            LogOp::PutState { group, key: RELEASED_KEY, value: Vec::new() },
            LogOp::DropGroupLog { group },
        ];
        self.node
            .commits()
            .submit_write(Write { log, changes: Vec::new(), sync: SyncTo::All, done: Some(done) })
            .map(|_| ())
            .inspect_err(|_| self.failed = true)
    }

    /// Takes every output the engine has, until it has none.
    fn drain(&mut self) {
        if self.failed {
            return;
        }
        self.start_reads();
        // Groups this round touched (a follower's answer moves its leader's view without output):
        // their views are published now, every view now and then.
        let mut touched = std::mem::take(&mut self.stepped);
        for _ in 0..64 {
            let out = self.engine.output();
            if out.is_empty() {
                break;
            }
            touched.extend(out.changed.iter().copied());
            touched.extend(out.committed.iter().map(|c| c.group));
            touched.extend(out.write.iter().flat_map(|w| w.groups.iter().map(|g| g.group)));
            self.handle_output(out);
        }
        self.publish_views(touched);
    }

    fn handle_output(&mut self, out: Output) {
        for (to, envelopes) in out.messages {
            for envelope in envelopes {
                let message = RaftMessage::of(envelope.group, &envelope.message);
                if message.is_snapshot() {
                    self.send_snapshot(to, message);
                } else {
                    self.send(to, message);
                }
            }
        }
        if let Some(write) = out.write {
            self.persist(write);
        }
        if !out.committed.is_empty() {
            let mut applies = Applies::default();
            for committed in out.committed {
                self.apply(committed, &mut applies);
            }
            self.submit_applies(applies);
        }
        for (group, read) in out.reads {
            let ctx = read.request_ctx.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if let Some(round) = self.reads.get_mut(&ctx).filter(|r| r.group == group) {
                round.index = Some(read.index);
            }
        }
        self.finish_reads();
        for group in out.changed {
            self.lead_changed(group);
        }
    }

    /// Queues a message on the lane to its peer. A lane that cannot keep up loses messages, as
    /// a network would, once it holds [`LANE_QUEUE_BYTES`]: its entries may be ones the log no
    /// longer holds (committed by the other herders and applied), which the lane alone would
    /// keep in memory. The peer is reported unreachable on the first loss, so its leaders probe
    /// it with one append at a time until it answers, and raft sends the rest again.
    fn send(&mut self, to: NodeId, message: RaftMessage) {
        let lane =
            self.lanes.entry(to).or_insert_with(|| spawn_lane(to, self.peers.clone(), self.handle.events.clone()));
        if lane.try_send(message) {
            lane.losing = false;
            return;
        }
        tracing::debug!(to = %format!("{to:016x}"), "the lane to a peer is full; a consensus message is dropped");
        if !std::mem::replace(&mut lane.losing, true) {
            self.engine.report_unreachable(to);
        }
    }

    /// Keeps the file of a snapshot that `group` took, to be installed from in the write that
    /// hands it out; a snapshot raft refused (or one a later snapshot replaced before it was
    /// written) has its file deleted now.
    fn snapshot_arrived(&mut self, group: GroupId, path: PathBuf) {
        let taken = self.engine.snapshot_taken(group) == Some(snapshot::path_as_data(&path));
        if !taken {
            remove_soon(path);
        } else if let Some(replaced) = self.snapshot_files.insert(group, path) {
            remove_soon(replaced);
        }
    }

    /// Turns the engine's write into one committer write.
    fn persist(&mut self, write: EngineWrite) {
        let id = write.id;
        let mut log = Vec::new();
        let mut sync = SyncTo::Log;
        let mut installed = Vec::new();
        for gw in write.groups {
            let group = gw.group;
            if let Some(snapshot) = gw.snapshot {
                let point = AppliedPoint::of(snapshot.get_metadata());
                log.push(LogOp::TruncateFrom { group, from: 0 });
                log.push(LogOp::PutLogState { group, key: BASE_KEY, value: wire::encode(&(point.index, point.term)) });
                // The file its chunks were gathered in (`Cluster::snapshot_chunk`).
                let file = snapshot::path_from_data(&snapshot.data);
                let read = self.install(group, &file, &mut log);
                // The install holds the file open (or read it whole): its name can go now.
                if self.snapshot_files.get(&group) == Some(&file) {
                    self.snapshot_files.remove(&group);
                }
                remove_soon(file);
                match read {
                    Ok(meta) => installed.push((group, point.index, meta)),
                    Err(e) => {
                        // It was read through when it arrived; writing its point without its
                        // state would lose that state for good.
                        tracing::error!(
                            group,
                            "a snapshot raft took could not be read ({e}); this node stops taking part"
                        );
                        self.failed = true;
                        return;
                    }
                }
                log.push(LogOp::PutState { group, key: APPLIED_KEY, value: wire::encode(&point) });
                self.applied_conf.insert(group, point.conf.clone());
                sync = SyncTo::All;
            }
            if !gw.entries.is_empty() {
                let entries = gw.entries.iter().map(|e| (e.index, wire::log_entry(e))).collect();
                log.push(LogOp::Append { group, entries });
            }
            if let Some(hs) = gw.hard_state {
                log.push(LogOp::PutLogState {
                    group,
                    key: HARD_STATE_KEY,
                    value: wire::encode(&WireHardState::from(&hs)),
                });
            }
        }
        let events = self.handle.events.clone();
        let node = self.node.clone();
        let meta_tx = self.meta_tx.clone();
        // The committer calls back on its own thread, outside the runtime.
        let rt = tokio::runtime::Handle::current();
        let done = Box::new(move |result: std::result::Result<(), String>| {
            if result.is_ok() {
                for (group, index, meta) in installed {
                    tracing::info!(group, index, "installed a snapshot");
                    node.metrics().snapshot_installed();
                    match meta {
                        Some((state, modules)) => {
                            publish_modules(&node, modules);
                            meta_tx.send_replace(state);
                        }
                        None => {
                            let node = node.clone();
                            rt.spawn(async move { node.drop_flock(group).await });
                        }
                    }
                }
            }
            let _ = events.send(Input::Persisted { id, result });
        });
        if let Err(e) = self.node.commits().submit_write(Write { log, changes: Vec::new(), sync, done: Some(done) }) {
            tracing::error!(error = %e.message, "the consensus log could not be written; this node stops taking part");
            self.failed = true;
        }
    }

    /// Adds the writes that install the snapshot in `file`; for the meta group, returns its state
    /// and its modules, and the names this node held that it deleted (`None`), published once
    /// written. A flock's buckets are read from the file as the store writes them.
    fn install(
        &mut self,
        group: GroupId,
        file: &Path,
        log: &mut Vec<LogOp>,
    ) -> std::result::Result<Option<(MetaState, Vec<ModuleChange>)>, String> {
        if group == META_GROUP {
            let data = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let snap: MetaSnapshot = wire::decode(&data)?;
            let mut modules: Vec<ModuleChange> =
                snap.modules.iter().map(|(name, id, wasm)| (name.clone(), Some((*id, wasm.len() as u64)))).collect();
            // Names deleted while this node was away.
            let held = self.node.store().module_names().map_err(|e| e.to_string())?;
            for (name, _) in held {
                if !snap.modules.iter().any(|(kept, _, _)| *kept == name) {
                    log.push(LogOp::DeleteModule { name: name.clone() });
                    modules.push((name, None));
                }
            }
            for (name, id, wasm) in snap.modules {
                log.push(LogOp::PutModule { id, name, wasm: wasm.into_vec() });
            }
            log.push(LogOp::PutState { group, key: META_STATE_KEY, value: wire::encode(&snap.state) });
            self.meta_state = snap.state.clone();
            // Entries after the snapshot apply on it, whatever was replayed at start.
            self.meta_replayed = 0;
            return Ok(Some((snap.state, modules)));
        }
        log.push(LogOp::InstallFlock { flock: group, buckets: snapshot::buckets(file, group)? });
        self.terms.set(group, 0);
        Ok(None)
    }

    /// Adds the writes that apply a group's committed entries to `applies`, and the answers to
    /// the proposals among them.
    fn apply(&mut self, committed: Committed, applies: &mut Applies) {
        let group = committed.group;
        let Some(last) = committed.entries.last() else { return };
        let (last_index, last_term) = (last.index, last.term);
        let mut changes = Vec::new();
        let mut log = Vec::new();
        // Module names' changes, in log order (a name may be put and deleted in one batch).
        let mut modules: Vec<ModuleChange> = Vec::new();
        let mut meta_changed = false;
        for entry in &committed.entries {
            if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                continue;
            }
            if group != META_GROUP && entry.data.first() == Some(&CHANGE_TAG) {
                // Read in place by the store: never decoded into owned keys and values here.
                match Change::encoded(entry.data.slice(1..)) {
                    Ok(change) => changes.push(change),
                    Err(e) => tracing::error!(group, index = entry.index, "a change set could not be decoded: {e}"),
                }
                continue;
            }
            match wire::decode::<Command>(&entry.data) {
                Ok(Command::Change(_)) => {
                    tracing::error!(index = entry.index, "the meta log holds a change set; ignored")
                }
                Ok(_) if group != META_GROUP => {
                    tracing::error!(group, index = entry.index, "a flock log holds a meta command; ignored")
                }
                Ok(command) => {
                    meta_changed = true;
                    match command {
                        Command::PutModule { name, id, wasm } => {
                            modules.push((name.clone(), Some((id, wasm.len() as u64))));
                            log.push(LogOp::PutModule { id, name, wasm });
                        }
                        Command::DeleteModule { name } => {
                            modules.push((name.clone(), None));
                            log.push(LogOp::DeleteModule { name });
                        }
                        Command::Change(_) => unreachable!("matched above"),
                        _ if entry.index <= self.meta_replayed => {}
                        member => self.meta_state.apply(member),
                    }
                }
                Err(e) => tracing::error!(group, index = entry.index, "an entry could not be decoded: {e}"),
            }
        }
        if let Some((_, conf)) = committed.conf_states.last() {
            self.applied_conf.insert(group, WireConf::from(conf));
        }
        let conf = self.applied_conf.get(&group).cloned().unwrap_or_default();
        let point = AppliedPoint { index: last_index, term: last_term, conf };
        log.push(LogOp::PutState { group, key: APPLIED_KEY, value: wire::encode(&point) });
        if meta_changed {
            log.push(LogOp::PutState { group, key: META_STATE_KEY, value: wire::encode(&self.meta_state) });
        }
        let leading = group != META_GROUP && self.terms.get(group).is_some();
        // A ready leader's cache holds what it proposed (and keeps each bucket until this write
        // is in the store): nothing waits on the write. A follower's cached copies are stale: they
        // go as soon as the write is queued, and a reload waits for it (`Node::applied`). The meta
        // state is published once written.
        if !leading && !changes.is_empty() {
            let touched = changes.iter().map(Change::head).map(|(bucket, version)| (bucket.to_vec(), version));
            applies.touched.push((group, touched.collect()));
        }
        let node = self.node.clone();
        let meta = meta_changed.then(|| (self.meta_tx.clone(), self.meta_state.clone()));
        // The proposals among these entries: answered with the write's sequence once it is
        // queued; the meta group's once it is written (its readers read the store).
        let mut answers = Vec::new();
        for entry in &committed.entries {
            for waiters in [&mut self.proposals, &mut self.conf_changes] {
                if let Some(waiter) = waiters.remove(&(group, entry.index)) {
                    let outcome = if waiter.term != entry.term {
                        // Another entry holds its index: it can never commit.
                        Err(error(
                            ErrorCode::Unavailable,
                            "the flock's leader changed before the write committed, and the new leader's log \
                             replaced it: it did not take effect; retry",
                        ))
                    } else if entry.get_entry_type() == EntryType::EntryNormal {
                        Ok(None)
                    } else {
                        Ok(Some(entry.index))
                    };
                    answers.push((waiter.reply, outcome));
                }
            }
        }
        let after_write = if group == META_GROUP { std::mem::take(&mut answers) } else { Vec::new() };
        let quiet = meta.is_none() && modules.is_empty() && after_write.is_empty();
        if !quiet {
            applies.done.push(Box::new(move |result: std::result::Result<(), String>| {
                if let Err(e) = &result {
                    for (reply, _) in after_write {
                        let _ = reply.send(Err(error(ErrorCode::StorageFailed, format!("applying failed: {e}"))));
                    }
                    return;
                }
                publish_modules(&node, modules);
                if let Some((tx, state)) = meta {
                    tx.send_if_modified(|old| {
                        let changed = *old != state;
                        *old = state;
                        changed
                    });
                }
                for (reply, outcome) in after_write {
                    let _ = reply.send(outcome.map(|index| index.unwrap_or(0)));
                }
            }));
        }
        applies.log.extend(log);
        applies.changes.extend(changes);
        applies.answers.extend(answers);
        applies.groups.push((group, last_index));
    }

    /// Queues one round's applies as one committer write (state only, unsynced: the committer
    /// holds it to share a transaction), then answers their proposals with its sequence.
    fn submit_applies(&mut self, applies: Applies) {
        let Applies { log, changes, done, touched, answers, groups } = applies;
        if groups.is_empty() {
            return;
        }
        let done: Option<crate::node::WriteDone> = match done.len() {
            0 => None,
            1 => done.into_iter().next(),
            _ => Some(Box::new(move |result: std::result::Result<(), String>| {
                for done in done {
                    done(result.clone());
                }
            })),
        };
        let seq = match self.node.commits().submit_write(Write { log, changes, sync: SyncTo::Nothing, done }) {
            Ok(seq) => seq,
            Err(e) => {
                tracing::error!(error = %e.message, "applying committed entries failed; this node stops taking part");
                self.failed = true;
                return;
            }
        };
        for (reply, outcome) in answers {
            let _ = reply.send(outcome.map(|index| index.unwrap_or(seq)));
        }
        for (flock, buckets) in touched {
            self.node.applied(flock, buckets, seq);
        }
        for (group, last_index) in groups {
            self.written.insert(group, seq);
            self.engine.applied(group, last_index);
            self.maybe_purge(group, last_index);
        }
    }

    /// Plans to purge a group's applied log once it holds more than `snapshot_logs` entries. The
    /// purge waits for the committer's next regular checkpoint to hold the applied state
    /// durably ([`Driver::purge_checkpointed`]): forcing a checkpoint per purge made one each time
    /// a group crossed the mark, several a second under load.
    ///
    /// A leader keeps the entries its live herders have yet to take (one that is down does not
    /// hold the log back) while its log holds fewer than
    /// [`LAGGING_LOGS_FACTOR`] times `snapshot_logs`: a herder the log no longer covers gets a
    /// snapshot of the whole flock, written, sent and installed whole, where a short lag needs only
    /// the entries it missed (TiKV's raft log GC keeps the entries its followers lack the same way,
    /// up to a count and size limit).
    fn maybe_purge(&mut self, group: GroupId, applied: u64) {
        let Some((first, ..)) = self.engine.log_state(group) else { return };
        if applied < first + self.snapshot_logs || self.purges.contains_key(&group) {
            return;
        }
        let mut upto = applied - self.snapshot_logs / 5;
        if applied < first + LAGGING_LOGS_FACTOR * self.snapshot_logs
            && let Some(lagging) =
                self.engine.matched(group).into_iter().filter(|(id, _)| self.peers.alive(*id)).map(|(_, m)| m).min()
        {
            upto = upto.min(lagging);
        }
        if upto < first {
            return;
        }
        let written = self.written.get(&group).copied().unwrap_or(0);
        self.purges.insert(group, (upto, written));
    }

    /// Purges each planned log whose applied state a checkpoint now holds. A group whose log
    /// moved past the point meanwhile (a snapshot installed) is left as it is.
    fn purge_checkpointed(&mut self) {
        if self.purges.is_empty() {
            return;
        }
        let checkpointed = self.node.commits().checkpointed_seq();
        let due: Vec<(GroupId, u64)> = self
            .purges
            .iter()
            .filter(|(_, (_, seq))| *seq <= checkpointed)
            .map(|(&group, &(upto, _))| (group, upto))
            .collect();
        for (group, upto) in due {
            self.purges.remove(&group);
            let Some((first, _, _, applied)) = self.engine.log_state(group) else { continue };
            if upto < first || upto > applied {
                continue;
            }
            let Ok(term) = self.source_term(group, upto) else { continue };
            self.engine.purge(group, upto);
            let log = vec![
                LogOp::PurgeUpto { group, upto },
                LogOp::PutLogState { group, key: BASE_KEY, value: wire::encode(&(upto, term)) },
            ];
            let _ = self.node.commits().submit_write(Write { log, changes: Vec::new(), sync: SyncTo::Log, done: None });
            // What was applied while this purge waited may call for the next one (the group may
            // apply nothing more for a while).
            self.maybe_purge(group, applied);
        }
    }

    fn source_term(&self, group: GroupId, index: u64) -> anyhow::Result<u64> {
        let entries = self.source.entries(group, index, index + 1, u64::MAX)?;
        entries.first().map(|e| e.term).ok_or_else(|| anyhow::anyhow!("no entry {index}"))
    }

    fn lead_changed(&mut self, group: GroupId) {
        let Some(lead) = self.engine.lead(group) else { return };
        if group == META_GROUP {
            return;
        }
        if lead.ready {
            // Ready once the store holds everything applied before the term (a job loads its
            // bucket from there).
            let seq = self.written.get(&group).copied().unwrap_or(0);
            let commits = self.node.commits().clone();
            let events = self.handle.events.clone();
            tokio::spawn(async move {
                let _ = commits.wait_written(seq).await;
                let _ = events.send(Input::StoreHolds { group, term: lead.term });
            });
        } else if self.terms.set(group, 0) != 0 {
            // Lost the lead: cached writes of that term may never commit.
            let node = self.node.clone();
            tokio::spawn(async move { node.drop_flock(group).await });
        }
    }

    fn publish_views(&mut self, groups: BTreeSet<GroupId>) {
        let mut views = self.views.write().unwrap_or_else(|p| p.into_inner());
        for group in groups {
            let (Some(lead), Some((voters, learners)), Some((first, last, commit, applied))) =
                (self.engine.lead(group), self.engine.members(group), self.engine.log_state(group))
            else {
                continue;
            };
            let matched = if lead.role == StateRole::Leader { self.engine.matched(group) } else { BTreeMap::new() };
            let joint = self.applied_conf.get(&group).is_some_and(|c| !c.voters_outgoing.is_empty());
            let view = GroupView { lead, voters, joint, learners, first, last, commit, applied, matched };
            if let Some(old) = views.insert(group, view)
                && old.lead.leader != lead.leader
                && lead.leader.is_some()
            {
                self.node.metrics().leader_changed();
            }
        }
        let memory = &self.handle.log_memory;
        memory.held.store(self.engine.mem_bytes(), Ordering::Relaxed);
        memory.appends_dropped.store(self.engine.appends_dropped(), Ordering::Relaxed);
    }

    /// Starts a read-index round for every group with reads waiting and none under way.
    fn start_reads(&mut self) {
        let busy: BTreeSet<GroupId> = self.reads.values().map(|r| r.group).collect();
        let groups: Vec<GroupId> = self.reads_waiting.keys().copied().filter(|g| !busy.contains(g)).collect();
        for group in groups {
            let waiting = self.reads_waiting.remove(&group).unwrap_or_default();
            let ctx = self.next_read;
            self.next_read += 1;
            if let Err(refusal) = self.engine.read_index(group, ctx.to_be_bytes().to_vec()) {
                for (_, reply) in waiting {
                    let _ = reply.send(Err(refused(group, refusal)));
                }
                continue;
            }
            self.reads.insert(ctx, ReadRound { group, started: Instant::now(), waiting, index: None });
        }
    }

    /// Answers the rounds whose index is applied.
    fn finish_reads(&mut self) {
        let done: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| {
                r.index.is_some_and(|i| self.engine.log_state(r.group).is_some_and(|(_, _, _, applied)| applied >= i))
            })
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in done {
            let round = self.reads.remove(&ctx).expect("listed");
            let lead = self.engine.lead(round.group);
            for (term, reply) in round.waiting {
                let answer = match lead {
                    Some(l) if l.role == StateRole::Leader && l.term == term => Ok(()),
                    _ => Err(not_confirmed(round.group, "the lead moved to another term")),
                };
                let _ = reply.send(answer);
            }
        }
    }

    fn expire_reads(&mut self) {
        let late: Vec<u64> =
            self.reads.iter().filter(|(_, r)| r.started.elapsed() > READ_PATIENCE).map(|(c, _)| *c).collect();
        for ctx in late {
            let round = self.reads.remove(&ctx).expect("listed");
            for (_, reply) in round.waiting {
                let _ = reply.send(Err(not_confirmed(round.group, "a majority did not answer in time")));
            }
        }
        self.finish_reads();
    }

    /// Sends a snapshot of `message.group` to `to`: its state and applied point as of one moment
    /// of the store, written to a file a page at a time (`snapshot`) and sent from it in chunks.
    /// At most [`SNAPSHOTS_SENT_AT_ONCE`] are written and sent at a time; the rest wait their
    /// turn, and one already waiting or under way for the same group and peer is not sent twice
    /// (raft asks again when a snapshot outlasts its patience).
    fn send_snapshot(&mut self, to: NodeId, mut message: RaftMessage) {
        let group = message.group;
        if !self.snapshots_sending.insert((group, to)) {
            tracing::debug!(group, to = %format!("{to:016x}"), "a snapshot for this peer is already on its way");
            return;
        }
        let node = self.node.clone();
        let peers = self.peers.clone();
        let events = self.handle.events.clone();
        let turn = self.snapshot_turns.clone();
        tokio::spawn(async move {
            let _turn = turn.acquire_owned().await;
            node.commits().settle().await;
            let store = node.store().clone();
            let path = snapshot::outgoing_path(node.data_dir(), group, to);
            let written = tokio::task::spawn_blocking(move || write_snapshot(store.as_ref(), group, &path)).await;
            let installed = match written {
                Ok(Ok((point, file))) => {
                    message.snapshot = Some(point);
                    let sent = send_chunks(&peers, to, message, &file).await;
                    remove_soon(file.path);
                    sent
                }
                Ok(Err(e)) => {
                    tracing::warn!(group, "could not write a snapshot: {e}");
                    false
                }
                Err(e) => {
                    tracing::warn!(group, "writing a snapshot failed: {e}");
                    false
                }
            };
            if installed {
                node.metrics().snapshot_sent();
            }
            let _ = events.send(Input::SnapshotSent { group, to, installed });
        });
    }
}

/// Reads the meta group's snapshot in `file` through, as its install will.
pub(super) fn check_meta_snapshot(file: &Path) -> std::result::Result<(), String> {
    let data = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    wire::decode_whole::<MetaSnapshot>(&data).map(drop)
}

/// Writes a group's snapshot to a file at `path`: its applied point and state as of one moment
/// of the store.
fn write_snapshot(store: &dyn Store, group: GroupId, path: &Path) -> anyhow::Result<(AppliedPoint, SnapshotFile)> {
    let no_state = || anyhow::anyhow!("group {group} has no applied state");
    if group == META_GROUP {
        let point: AppliedPoint = read_state(store, group, APPLIED_KEY)?.ok_or_else(no_state)?;
        let state = stored_meta_state(store)?.unwrap_or_default();
        let mut modules = Vec::new();
        for (name, id) in store.module_names()? {
            if let Some(wasm) = store.module_bytes(&id)? {
                modules.push((name, id, ByteBuf::from(wasm)));
            }
        }
        return Ok((point, snapshot::write_whole(&wire::encode(&MetaSnapshot { state, modules }), path)?));
    }
    let view = store.flock_view(group)?;
    let point = view.state(APPLIED_KEY)?.ok_or_else(no_state)?;
    let point: AppliedPoint =
        wire::decode(&point).map_err(|e| anyhow::anyhow!("group {group}'s applied point: {e}"))?;
    Ok((point, snapshot::write_flock(view.as_ref(), path)?))
}

/// Sends a snapshot's file in chunks, the message with the last; true once the peer took it.
async fn send_chunks(peers: &Arc<Peers>, to: NodeId, message: RaftMessage, file: &SnapshotFile) -> bool {
    use std::os::unix::fs::FileExt;
    let group = message.group;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        tracing::info!(group, to = %format!("{to:016x}"), error = %e, "sending a snapshot failed: {what}");
        false
    };
    let source = match std::fs::File::open(&file.path) {
        Ok(source) => Arc::new(source),
        Err(e) => return failed("its file could not be opened", &e),
    };
    let mut offset = 0;
    let mut message = Some(message);
    loop {
        let end = (offset + SNAPSHOT_CHUNK_BYTES as u64).min(file.len);
        let last = end == file.len;
        let (source_, at) = (source.clone(), file.start + offset);
        let read = tokio::task::spawn_blocking(move || {
            let mut data = vec![0; (end - offset) as usize];
            source_.read_exact_at(&mut data, at).map(|()| data)
        })
        .await;
        let data = match read {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => return failed("its file could not be read", &e),
            Err(e) => return failed("its file could not be read", &e),
        };
        peers.pace_snapshot(data.len()).await;
        let bytes = data.len();
        let request =
            PeerRequest::SnapshotChunk { group, offset, data, message: if last { message.take() } else { None } };
        match peers.call(to, request, Duration::from_secs(60)).await {
            Ok(PeerResponse::Ack) => peers.count_snapshot_bytes(bytes),
            Ok(other) => {
                tracing::info!(group, to = %format!("{to:016x}"), answer = ?other, "a snapshot chunk was refused");
                return false;
            }
            Err(e) => return failed("a chunk did not reach the peer", &e),
        }
        if last {
            return true;
        }
        offset = end;
    }
}

/// Deletes a snapshot's file off the runtime's threads (freeing a large file's blocks takes a
/// while); one that stays is logged, and goes when the node next starts.
fn remove_soon(path: PathBuf) {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), "a snapshot's file stays: {e}");
        }
    });
}

/// The driver's end of a lane ([`spawn_lane`]).
struct LaneQueue {
    tx: mpsc::Sender<RaftMessage>,
    /// Bytes of the messages queued or in the frame being written ([`RaftMessage::encoded_bytes`]).
    held: Arc<AtomicUsize>,
    /// The last message offered was dropped.
    losing: bool,
}

impl LaneQueue {
    /// Queues `message` unless the lane holds too much (at least one message always fits);
    /// `false` if it was dropped.
    fn try_send(&self, message: RaftMessage) -> bool {
        let size = message.encoded_bytes();
        let held = self.held.load(Ordering::Relaxed);
        if held > 0 && held + size > LANE_QUEUE_BYTES {
            return false;
        }
        self.held.fetch_add(size, Ordering::Relaxed);
        if self.tx.try_send(message).is_err() {
            self.held.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// The lane to one peer: sends queued messages as one frame at a time, each frame at most
/// [`FRAME_BYTES`] of entries (a larger message goes alone); messages that queue while a frame
/// is written go in the next one.
fn spawn_lane(to: NodeId, peers: Arc<Peers>, events: mpsc::UnboundedSender<Input>) -> LaneQueue {
    let (tx, mut rx) = mpsc::channel::<RaftMessage>(LANE_MESSAGES_MAX);
    let held = Arc::new(AtomicUsize::new(0));
    let queue = LaneQueue { tx, held: held.clone(), losing: false };
    tokio::spawn(async move {
        let mut lane = Lane::new(to);
        let mut next: Option<RaftMessage> = None;
        loop {
            let first = match next.take() {
                Some(message) => message,
                None => match rx.recv().await {
                    Some(message) => message,
                    None => return,
                },
            };
            let mut bytes = first.encoded_bytes();
            let mut messages = vec![first];
            while let Ok(more) = rx.try_recv() {
                let size = more.encoded_bytes();
                if bytes + size > FRAME_BYTES {
                    next = Some(more);
                    break;
                }
                bytes += size;
                messages.push(more);
            }
            let sent = lane.send(&peers, messages, bytes, FRAME_TIMEOUT).await;
            held.fetch_sub(bytes, Ordering::Relaxed);
            if let Err(e) = sent {
                tracing::debug!(to = %format!("{to:016x}"), error = %e, "consensus messages did not reach a peer");
                let _ = events.send(Input::Unreachable(to));
            }
        }
    });
    queue
}

fn refused(group: GroupId, refusal: Refusal) -> RemoteError {
    match refusal {
        Refusal::NoGroup => error(ErrorCode::Unavailable, format!("this node does not take part in group {group}")),
        Refusal::NotLeader { .. } => error(
            ErrorCode::Unavailable,
            format!("this node no longer leads group {group}; the write was not taken, retry"),
        ),
        Refusal::Busy => error(
            ErrorCode::Overloaded,
            format!("group {group} has too much uncommitted (or a membership change under way); retry shortly"),
        ),
        Refusal::Memory { held } => error(
            ErrorCode::Overloaded,
            format!(
                "this node holds {} MiB of log entries not yet committed and applied, its share of \
                 --node-memory-mib; retry shortly",
                held >> 20
            ),
        ),
    }
}

fn not_confirmed(group: GroupId, why: &str) -> RemoteError {
    error(
        ErrorCode::Unavailable,
        format!(
            "this node could not confirm that it still leads flock {group} ({why}); the job changed nothing, so \
             retry (another node may lead it now)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ItemWrite;
    use crate::storage::{Batch, RedbStore};

    #[test]
    fn a_meta_snapshot_is_read_through_before_it_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let snap = MetaSnapshot {
            state: MetaState::default(),
            modules: vec![("m".into(), [7; 32], ByteBuf::from(vec![1, 2, 3]))],
        };
        let whole = wire::encode(&snap);
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(check_meta_snapshot(&path), Ok(()));
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        assert!(check_meta_snapshot(&path).is_err(), "a short one is refused");
        std::fs::write(&path, [whole.as_slice(), b"x"].concat()).unwrap();
        assert!(check_meta_snapshot(&path).unwrap_err().contains("left over"));
    }

    #[test]
    fn a_borrowed_change_set_encodes_as_the_command_that_decodes_it() {
        let change = ChangeSet {
            bucket: b"customer-1".to_vec(),
            flock: 3,
            version: 7,
            writes: vec![
                ItemWrite { item: "a".into(), value: Some(b"1".to_vec()) },
                ItemWrite { item: "b".into(), value: None },
            ],
        };
        let encoded = encode_change(&change);
        assert_eq!(encoded, wire::encode(&Command::Change(change.clone())));
        assert!(matches!(wire::decode(&encoded), Ok(Command::Change(c)) if c == change));
        // What the driver hands the store: the bytes after the tag, read in place.
        assert_eq!(encoded[0], CHANGE_TAG);
        let read = Change::encoded(bytes::Bytes::from(encoded).slice(1..)).unwrap();
        assert_eq!(read.view(), change.view());
    }

    #[test]
    fn a_release_cut_short_after_its_state_part_is_finished_on_start_and_nothing_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grex.redb");
        let flock = 2;
        let bucket = (0..).map(|i| format!("b{i}")).find(|b| crate::data::flock_of(b.as_bytes(), 4) == flock).unwrap();
        {
            let store = RedbStore::open(&path, 4, false).unwrap();
            let entry =
                |index| (index, wire::encode(&WireEntry { kind: 0, term: 1, index, data: bytes::Bytes::new() }).into());
            let point =
                AppliedPoint { index: 2, term: 1, conf: WireConf { voters: vec![1, 2, 3], ..WireConf::default() } };
            let hard = WireHardState { term: 1, vote: 1, commit: 2 };
            let change = ChangeSet {
                bucket: bucket.clone().into_bytes(),
                flock,
                version: 1,
                writes: vec![ItemWrite { item: "count".into(), value: Some(b"5".to_vec()) }],
            };
            let log = vec![
                LogOp::Append { group: flock, entries: vec![entry(1), entry(2)] },
                LogOp::PutLogState { group: flock, key: HARD_STATE_KEY, value: wire::encode(&hard) },
                LogOp::PutState { group: flock, key: APPLIED_KEY, value: wire::encode(&point) },
            ];
            store.write(&Batch { log, changes: vec![change.into()], sync: SyncTo::All }).unwrap();
            // The release's state part, and then the crash (its log part never ran).
            let log = vec![
                LogOp::ForgetGroup { group: flock },
                LogOp::ClearFlock { flock },
                LogOp::PutState { group: flock, key: RELEASED_KEY, value: Vec::new() },
            ];
            store.write(&Batch { log, changes: Vec::new(), sync: SyncTo::All }).unwrap();
        }
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&path, 4, false).unwrap());
        let source: Arc<dyn EntrySource> = Arc::new(StoreEntries { store: store.clone() });
        assert_eq!(released_flocks(store.as_ref(), 4).unwrap(), BTreeSet::from([flock]));
        assert!(store.flock_buckets(flock).unwrap().is_empty(), "the copy is gone");
        // The log alone would open the group again (a voter with no state): the mark stops that,
        // and the start drops the log.
        assert!(open_group(store.as_ref(), flock, &source).unwrap().is_some());
        let log = vec![LogOp::DropGroupLog { group: flock }];
        store.write(&Batch { log, changes: Vec::new(), sync: SyncTo::Log }).unwrap();
        drop((store, source));
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&path, 4, false).unwrap());
        let source: Arc<dyn EntrySource> = Arc::new(StoreEntries { store: store.clone() });
        assert!(open_group(store.as_ref(), flock, &source).unwrap().is_none());
        assert_eq!(store.log_last(flock).unwrap(), None);
        assert_eq!(store.get_item(bucket.as_bytes(), "count").unwrap(), None);
    }
}
