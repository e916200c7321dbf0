//! The cluster: identical peer nodes that replicate each flock among its herders and route every
//! request to the node that should serve it.
//!
//! A job's path through the cluster, and where each step lives:
//! 1. `routing`: the node a client reached finds the flock's leader (its own view if it herds
//!    the flock, else the leaders' claims, else the last redirect) and runs the job there: here,
//!    or one hop over the peer link (`peer`, QUIC with mutual TLS), relayed through a third
//!    herder when only the link to the leader is cut.
//! 2. The leader runs the job (`node`) and proposes its change set to the flock's group.
//! 3. `consensus`: the node's one engine driver. Its `engine` (raft-rs, sans-IO) drives every
//!    group the node takes part in: each round one durable write for all groups, one frame per
//!    peer with all groups' messages (`wire`), committed entries applied to the store.
//! 4. The job is answered once its change set is committed and applied.
//!
//! Around it: `membership` (bootstrap, joins, the meta group's commands, making each group's
//! voters the flock map's herders), `supervision` (the failure detector feeding elections,
//! leader balancing, claims), `placement` (the pure flock map), `decide` (pure routing rules),
//! `identity` (the cluster CA and credentials), `messages` (what peers say).
//!
//! Invariants: a node runs a mutating job for a flock only while it leads the flock in a term in
//! which it has applied everything committed before and its store holds it (`LeaderTerms`), and
//! only while it can reach a majority of the flock's herders; the client hears back only after
//! the change set is committed (durable on a majority) and applied here.

mod consensus;
pub mod decide;
pub mod engine;
pub mod identity;
mod lifecycle;
mod membership;
pub mod messages;
mod meta;
pub mod migrate;
mod observe;
mod peer;
pub mod placement;
mod routing;
mod scan;
mod snapshot;
mod supervision;
pub mod wire;

pub use consensus::SNAPSHOT_LOGS_DEFAULT;
pub use engine::NodeId;
pub use identity::{ClusterFile, Credentials};
pub use lifecycle::REMOVE_DEAD_AFTER_DEFAULT;
pub use messages::{PEER_ALPN, PeerInfo};
pub use peer::{DEAD_AFTER, PING_INTERVAL, peer_client_config, peer_client_config_offering};
pub use placement::Site;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::data::ChangeSet;
use crate::error::{ErrorCode, Result, error};
use crate::node::{Node, Replicator, Ticket};
use crate::storage::{GroupId, META_GROUP};
use consensus::{Consensus, LeaderTerms};
use messages::{PeerRequest, PeerResponse};
use meta::MetaState;
use peer::{Bound, Handler, Peers};
use snapshot::Incoming;

/// How long a proposed change set may take to commit before its job is answered with an error.
const COMMIT_PATIENCE: Duration = Duration::from_secs(10);

/// How to start a node's cluster side.
pub struct ClusterConfig {
    /// Where the peer endpoint listens.
    pub peer_addr: SocketAddr,
    /// A running node's peer address, to join through (first start of a new node only).
    pub join: Option<String>,
    /// Log entries a group keeps before it purges the applied ones.
    pub snapshot_logs: u64,
    /// How long a member may be unreachable before the cluster removes it and copies its
    /// flocks again.
    pub dead_after: Duration,
    /// This node's zone and capacity, for placement.
    pub site: Site,
    /// Bytes of snapshots a second this node sends to new herders, over all flocks (0: no limit).
    pub snapshot_bytes_per_sec: u64,
}

impl ClusterConfig {
    /// Default settings for a node whose peer endpoint listens on `peer_addr`.
    pub fn new(peer_addr: SocketAddr) -> Self {
        ClusterConfig {
            peer_addr,
            join: None,
            snapshot_logs: SNAPSHOT_LOGS_DEFAULT,
            dead_after: REMOVE_DEAD_AFTER_DEFAULT,
            site: Site::default(),
            snapshot_bytes_per_sec: SNAPSHOT_BYTES_PER_SEC_DEFAULT,
        }
    }
}

/// A running cluster member. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    file: ClusterFile,
    node: Node,
    peers: Arc<Peers>,
    consensus: Consensus,
    meta_state: watch::Receiver<MetaState>,
    terms: Arc<LeaderTerms>,
    info: PeerInfo,
    /// Last leader this node heard of per flock (it may not herd the flock).
    hints: Vec<AtomicU64>,
    /// Per flock, the peer that claims to lead it in the latest term (from their pings).
    claims: Mutex<Vec<Option<Claim>>>,
    /// Flocks whose membership change is under way here.
    reconfiguring: Vec<AtomicBool>,
    meta_reconfiguring: AtomicBool,
    /// Flock membership changes this node may lead at once ([`MOVES_AT_ONCE`]).
    moves: Arc<tokio::sync::Semaphore>,
    /// See [`ClusterConfig::dead_after`].
    dead_after: Duration,
    /// Snapshots arriving in chunks, by sender and group.
    snapshots_in: Mutex<HashMap<(NodeId, GroupId), Incoming>>,
    /// A dead member is kept because too few members are up (logged once until that ends).
    dead_held: AtomicBool,
}

/// A peer's claim to lead a flock.
#[derive(Clone, Copy, Debug)]
struct Claim {
    node: NodeId,
    term: u64,
    settled: bool,
    /// The flock map version `settled` was judged against.
    map_version: u64,
}

/// A node id as text (how the API shows it).
pub fn node_id_text(id: NodeId) -> String {
    format!("{id:016x}")
}

fn parse_node_id(text: &str) -> anyhow::Result<NodeId> {
    u64::from_str_radix(text, 16).map_err(|e| anyhow::anyhow!("node id `{text}` is not 16 hex digits: {e}"))
}

/// Snapshot bytes a second a node sends by default (`--snapshot-mib-per-sec`): moves copy data in
/// the background without crowding out jobs, as CockroachDB's rebalance snapshot rate does.
pub const SNAPSHOT_BYTES_PER_SEC_DEFAULT: u64 = 16 << 20;

/// Flock membership changes (moves to new herders, each with its snapshot) one node leads at once.
const MOVES_AT_ONCE: usize = 2;

/// Bytes of snapshot data a node accepts from one sender for one group (a flock's whole state),
/// gathered on disk: a bound against a sender that never stops, not a memory bound.
const SNAPSHOT_BYTES_MAX: u64 = 64 << 30;

/// The peer handler: a peer's request is answered by the cluster while it exists.
fn answerer(cluster: Weak<Inner>) -> Handler {
    Arc::new(move |from, request| {
        let cluster = cluster.upgrade().map(|inner| Cluster { inner });
        async move {
            match cluster {
                Some(cluster) => cluster.answer(from, request).await,
                None => PeerResponse::Error(error(ErrorCode::Unavailable, "the node is stopping")),
            }
        }
        .boxed()
    })
}

impl Cluster {
    /// Starts the peer endpoint and the consensus engine, joins or bootstraps, and routes the
    /// node's requests through the cluster from now on. The node's servers must already know
    /// their URLs.
    pub async fn start(
        node: Node,
        file: ClusterFile,
        config: ClusterConfig,
        replication: Replication,
    ) -> anyhow::Result<Cluster> {
        let me = parse_node_id(node.id())?;
        if node.flock_count() != file.flock_count {
            anyhow::bail!(
                "the data file has {} flocks but the cluster has {}; use a fresh --data directory",
                node.flock_count(),
                file.flock_count
            );
        }
        let bound = Bound::bind(config.peer_addr, node.data_dir())?;
        snapshot::clear_dir(node.data_dir())
            .map_err(|e| anyhow::anyhow!("cannot empty {}/snapshots: {e}", node.data_dir().display()))?;
        let urls = node.node_urls();
        let info = PeerInfo {
            peer: bound.local_addr().to_string(),
            http: urls.http.unwrap_or_default(),
            quic: urls.quic.unwrap_or_default(),
            resp: urls.resp.unwrap_or_default(),
            zone: config.site.zone.clone(),
            capacity: config.site.capacity,
        };
        let member = node.store().log_state(META_GROUP, "applied")?.is_some();
        let bootstrap = !member && config.join.is_none();
        if bootstrap && !node.data_dir().join(identity::CA_KEY_FILE).exists() {
            anyhow::bail!(
                "this node has the credentials of a cluster it has not finished joining; start it with \
                 --join PEER_ADDR (any member's peer address)"
            );
        }
        let Replication { consensus, inbox } = replication;
        let load = Arc::new(AtomicU64::new(0));
        let flock_count = file.flock_count as usize;
        // The peer handler holds the cluster weakly (the cluster holds the peers); it is wired
        // before the endpoint accepts, and what peers send before the engine runs waits in the
        // engine's inbox.
        let inner = Arc::new_cyclic(|cluster: &Weak<Inner>| Inner {
            me,
            peers: Peers::new(me, file.cluster_id.clone(), bound, answerer(cluster.clone()), load.clone()),
            file,
            node: node.clone(),
            meta_state: consensus.meta(),
            terms: consensus.terms().clone(),
            consensus,
            info: info.clone(),
            hints: (0..flock_count).map(|_| AtomicU64::new(0)).collect(),
            claims: Mutex::new(vec![None; flock_count]),
            reconfiguring: (0..flock_count).map(|_| AtomicBool::new(false)).collect(),
            meta_reconfiguring: AtomicBool::new(false),
            moves: Arc::new(tokio::sync::Semaphore::new(MOVES_AT_ONCE)),
            dead_after: config.dead_after,
            snapshots_in: Mutex::new(HashMap::new()),
            dead_held: AtomicBool::new(false),
        });
        let cluster = Cluster { inner };
        observe::observe(&cluster);
        let peers = cluster.inner.peers.clone();
        peers.set_snapshot_rate(config.snapshot_bytes_per_sec);
        cluster.inner.consensus.start(inbox, me, node.clone(), peers.clone(), config.snapshot_logs, bootstrap).await?;
        peers.accept();
        tokio::spawn(cluster.clone().follow_members());
        tokio::spawn(cluster.clone().follow_claims());

        if member {
            // A restarted node greets every member it knows of at once: its peers must hear of
            // the restart now, not when their link to the old process times out.
            peers.set_members(&cluster.meta_state().nodes);
            if config.join.is_some() {
                tracing::info!("already a member; --join is ignored");
            }
        } else if bootstrap {
            cluster.found().await?;
        } else if let Some(addr) = &config.join {
            let members = peers.hail(addr, info).await?;
            peers.set_members(&members.into_iter().collect());
            tracing::info!(via = %addr, "joined the cluster");
        }
        tokio::spawn(cluster.clone().supervise(load));
        if member {
            tokio::spawn(cluster.clone().advertise());
        }
        Ok(cluster)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.me
    }

    /// The cluster file.
    pub fn file(&self) -> &ClusterFile {
        &self.inner.file
    }

    /// Where the peer endpoint listens.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peers.local_addr()
    }

    /// Drops (or restores) this node's peer traffic, as a network partition would.
    pub fn set_isolated(&self, isolated: bool) {
        self.inner.peers.set_isolated(isolated);
    }

    /// Drops all peer traffic with `peers` (ids as [`node_id_text`] writes them) and restores
    /// it with every other peer: this node's side of a network partition.
    pub fn set_cut_off(&self, peers: &[&str]) -> anyhow::Result<()> {
        let ids = peers.iter().map(|p| parse_node_id(p)).collect::<anyhow::Result<BTreeSet<NodeId>>>()?;
        self.inner.peers.set_cut_off(ids);
        Ok(())
    }

    /// Resolves, with the reason, once this node learns it was removed from the cluster (it
    /// should then stop: its peers refuse it).
    pub async fn removed(&self) -> String {
        let mut evicted = self.inner.peers.evicted();
        match evicted.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops the consensus engine and the peer endpoint.
    pub async fn shutdown(&self) {
        self.inner.consensus.stop().await;
        self.inner.peers.stop();
    }

    fn meta_state(&self) -> MetaState {
        self.inner.meta_state.borrow().clone()
    }

    /// The leader of a group as this node knows it: from the group itself if this node herds it
    /// (a leader the group's voters leave out does not count), else from peers' claims, else the
    /// last leader a redirect named.
    fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        if (group == META_GROUP || self.herds(group))
            && let Some(view) = self.inner.consensus.view(group)
            && let Some(leader) = view.lead.leader.filter(|l| view.voters.contains(l))
        {
            return Some(leader);
        }
        if group == META_GROUP {
            return None;
        }
        self.live_claim(group).map(|c| c.node).or_else(|| {
            let hint = self.inner.hints.get(group as usize)?.load(Ordering::Relaxed);
            (hint != 0).then_some(hint)
        })
    }

    /// The claim of the latest term to lead `flock`, if its claimant is alive.
    fn live_claim(&self, flock: u32) -> Option<Claim> {
        let claim = (*self.inner.claims.lock().unwrap_or_else(|p| p.into_inner()).get(flock as usize)?)?;
        self.inner.peers.alive(claim.node).then_some(claim)
    }

    /// True if this node herds `flock`: the flock map names it (or names nobody yet: a new
    /// cluster's first map) and it votes in its group.
    fn herds(&self, flock: u32) -> bool {
        let me = self.inner.me;
        let named = (self.inner.meta_state.borrow().map.herders.get(flock as usize))
            .is_none_or(|h| h.is_empty() || h.contains(&me));
        named && self.voters(flock).contains(&me)
    }

    fn herders(&self, flock: u32) -> Vec<NodeId> {
        self.inner.meta_state.borrow().map.herders.get(flock as usize).cloned().unwrap_or_default()
    }

    /// The voters of a group as this node's engine has them (empty if it does not take part).
    fn voters(&self, group: GroupId) -> BTreeSet<NodeId> {
        self.inner.consensus.view(group).map(|v| v.voters).unwrap_or_default()
    }

    /// Answers a request from a peer.
    async fn answer(&self, from: NodeId, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::Raft { messages } => match self.inner.consensus.deliver(messages, None).await {
                Ok(()) => PeerResponse::Ack,
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::SnapshotChunk { group, offset, data, message } => {
                self.snapshot_chunk(from, group, offset, data, message).await
            }
            PeerRequest::Job { bucket, module, input, read_only, relay } => {
                self.answer_job(bucket, module, input, read_only, relay).await
            }
            PeerRequest::Hail { id, info } => self.admit(id, info).await,
            PeerRequest::PutModule { name, wasm } => PeerResponse::Module(self.store_module(name, wasm).await),
            PeerRequest::DeleteModule { name } => PeerResponse::Module(self.remove_module(name).await),
            PeerRequest::ChangeNode { id, change } => match self.change_node_here(id, change).await {
                Ok(()) => PeerResponse::Ack,
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::ChangeUser(change) => match self.change_user_here(change).await {
                Ok(()) => PeerResponse::Ack,
                Err(e) => PeerResponse::Error(e),
            },
            PeerRequest::Stats => {
                PeerResponse::Stats { json: serde_json::to_vec(&self.local_stats()).expect("stats encode as JSON") }
            }
            PeerRequest::ScanPage { scan, flock, open } => self.answer_scan_page(scan, flock, open).await,
            PeerRequest::Hello { .. }
            | PeerRequest::HelloWithVersion { .. }
            | PeerRequest::Ping { .. }
            | PeerRequest::RaftLane => PeerResponse::Error(error(ErrorCode::BadRequest, "handled by the transport")),
        }
    }

    /// Gathers a snapshot's chunks in a file; the last one hands the snapshot to the engine once
    /// the file reads through (a flock's: its buckets are read from it as they are installed).
    async fn snapshot_chunk(
        &self,
        from: NodeId,
        group: GroupId,
        offset: u64,
        data: Vec<u8>,
        message: Option<wire::RaftMessage>,
    ) -> PeerResponse {
        let partial = self.inner.snapshots_in.lock().unwrap_or_else(|p| p.into_inner()).remove(&(from, group));
        let data_dir = self.inner.node.data_dir().to_owned();
        let last = message.is_some();
        let gathered = tokio::task::spawn_blocking(move || {
            let mut incoming = match partial {
                Some(incoming) if offset > 0 && incoming.len() == offset => incoming,
                partial => {
                    if let Some(partial) = partial {
                        partial.discard();
                    }
                    if offset > 0 {
                        return Err(format!("snapshot chunk at {offset} does not follow the chunks received"));
                    }
                    Incoming::create(&data_dir, group, from)?
                }
            };
            let added = if incoming.len() + data.len() as u64 > SNAPSHOT_BYTES_MAX {
                Err(format!("the snapshot is over the limit of {} GiB", SNAPSHOT_BYTES_MAX >> 30))
            } else if let Err(e) = incoming.append(&data) {
                Err(e)
            } else if last {
                let read = match group {
                    META_GROUP => consensus::check_meta_snapshot(incoming.path()),
                    flock => snapshot::check(incoming.path(), flock).map(drop),
                };
                read.map_err(|e| format!("the snapshot is damaged: {e}"))
            } else {
                Ok(())
            };
            match added {
                Ok(()) => Ok(incoming),
                Err(e) => {
                    incoming.discard();
                    Err(e)
                }
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let incoming = match gathered {
            Ok(incoming) => incoming,
            Err(why) => return PeerResponse::Error(error(ErrorCode::BadRequest, why)),
        };
        let Some(message) = message else {
            self.inner.snapshots_in.lock().unwrap_or_else(|p| p.into_inner()).insert((from, group), incoming);
            return PeerResponse::Ack;
        };
        let path = incoming.into_path();
        match self.inner.consensus.deliver(vec![message], Some(snapshot::path_as_data(&path).to_vec())).await {
            Ok(()) => PeerResponse::Ack,
            Err(e) => PeerResponse::Error(e),
        }
    }
}

/// A cluster member's consensus side before it runs. The node is opened with its
/// [`Replication::replicator`], so the node's executors hold it from their start (no part of the
/// node is installed later), and [`Cluster::start`] then runs its engine over the node.
pub struct Replication {
    consensus: Consensus,
    inbox: consensus::Inbox,
}

impl Replication {
    /// The consensus side of a cluster of `flock_count` flocks, not running yet (what the node
    /// asks of it meanwhile waits for [`Cluster::start`]).
    pub fn new(flock_count: u32) -> Replication {
        let (consensus, inbox) = Consensus::new(flock_count);
        Replication { consensus, inbox }
    }

    /// What the node's executors propose change sets to and learn leadership from.
    pub fn replicator(&self) -> Arc<dyn Replicator> {
        Arc::new(Proposer(self.consensus.clone()))
    }
}

/// The node's [`Replicator`]: change sets become entries of their flock's log.
struct Proposer(Consensus);

impl Replicator for Proposer {
    fn leader_term(&self, flock: u32) -> Option<u64> {
        self.0.terms().get(flock)
    }

    fn propose(&self, flock: u32, change: &ChangeSet) -> Result<Ticket> {
        let receiver = self.0.propose(flock, consensus::encode_change(change))?;
        let ticket = async move {
            match tokio::time::timeout(COMMIT_PATIENCE, receiver).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(error(
                    ErrorCode::OutcomeUnknown,
                    "the node's consensus engine stopped before the write committed; read before retrying",
                )),
                Err(_) => {
                    tracing::warn!(flock, "a write was not committed in time");
                    Err(error(
                        ErrorCode::OutcomeUnknown,
                        format!(
                            "the write was not committed within {} s (the flock cannot reach a majority); it may \
                             still take effect, so read before retrying",
                            COMMIT_PATIENCE.as_secs()
                        ),
                    ))
                }
            }
        };
        Ok(ticket.boxed().shared())
    }

    fn confirm_lead(&self, flock: u32, term: u64) -> BoxFuture<'static, Result<()>> {
        let consensus = self.0.clone();
        async move { consensus.confirm_lead(flock, term).await }.boxed()
    }

    fn applied_in(&self, view: &dyn crate::storage::FlockView) -> Result<u64> {
        let Some(bytes) = view.state(consensus::APPLIED_KEY)? else { return Ok(0) };
        let point: wire::AppliedPoint = wire::decode(&bytes)
            .map_err(|e| error(ErrorCode::Internal, format!("the flock's applied point does not decode: {e}")))?;
        Ok(point.index)
    }
}
