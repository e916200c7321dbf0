//! The cluster: identical peer nodes that replicate each flock among its herders and route every
//! request to the node that should serve it.
//!
//! Concepts, and where they live:
//! - `identity`: the cluster file, the cluster CA and node credentials (`grex init`, joining).
//! - `peer`: the QUIC peer transport with mutual TLS, one connection per node pair, and the
//!   per-pair heartbeat that is the cluster's only failure detector.
//! - `messages`: what peers say to each other.
//! - `raft`: openraft 0.9 glue. Each flock is a consensus group among its herders; a job's change
//!   set is a log entry. One more group, the meta group (every node a member), holds the node list,
//!   the flock map and module names.
//! - `placement`: the pure function that computes a balanced flock map.
//! - this file: [`Cluster`], which starts the groups, routes jobs (one hop to the flock's leader),
//!   answers canaries and runs the supervisor: elections driven by the failure detector, leader
//!   balancing, and membership changes that follow the flock map.
//!
//! Who leads a flock, as a node sees it: a herder (named by the flock map and a voter in its view
//! of the group) asks its group. Any other node cannot: its view of a group it was moved out of
//! stopped when it left. It goes by the claims leaders send with their pings (`peer`), then by
//! the last redirect it followed, then asks any live herder.
//!
//! Invariants: a node runs a mutating job for a flock only while it leads the flock in a term in
//! which it has applied everything committed before (the `LeaderTerms` gate), and only while it can
//! reach a majority of the flock's herders; the client hears back only after the change set is
//! committed (durable on a majority) and applied here.

pub mod decide;
pub mod engine;
pub mod identity;
pub mod leadership;
pub mod messages;
mod outbox;
mod peer;
pub mod placement;
mod raft;
mod read_index;

pub use identity::{ClusterFile, Credentials};
pub use messages::PEER_ALPN;
pub use peer::{DEAD_AFTER, PING_INTERVAL, peer_client_config};
pub use raft::{NodeId, PeerInfo, SNAPSHOT_LOGS_DEFAULT};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use grex_client::proto::{self, Canary, FlockInfo, FlockMapInfo, JobOutput, ModuleInfo};
use openraft::ServerState;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use tokio::sync::watch;

use crate::data::ChangeSet;
use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::node::{Front, Node, Replicator, RespNode, Ticket};
use crate::storage::{GroupId, META_GROUP};
use decide::{ElectionTimer, GroupSight, SUPERVISE_EVERY, Verdict};
use leadership::{LeadStart, LeadView, Refusals};
use messages::{Lead, PeerRequest, PeerResponse, RaftRpc};
use peer::{Handler, Peers};
use placement::{FlockMap, place};
use raft::{Command, LeaderTerms, MetaState, Network, Raft};
use read_index::ReadRounds;

/// How long a routed job keeps looking for its flock's leader (an election takes about 1 s).
const ROUTE_PATIENCE: Duration = Duration::from_secs(4);
/// How often membership is checked against the flock map when the map has not changed (a change
/// is acted on at the next tick).
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How long a proposed change set may take to commit before its job is answered with an error.
const COMMIT_PATIENCE: Duration = Duration::from_secs(10);
/// Meta voters at most; further nodes follow the meta group as learners.
const META_VOTERS_MAX: usize = 5;

/// How to start a node's cluster side.
pub struct ClusterConfig {
    /// Where the peer endpoint listens.
    pub peer_addr: SocketAddr,
    /// A running node's peer address, to join through (first start of a new node only).
    pub join: Option<String>,
    /// Log entries a group keeps before it snapshots its state and purges them.
    pub snapshot_logs: u64,
}

impl ClusterConfig {
    /// Default settings for a node whose peer endpoint listens on `peer_addr`.
    pub fn new(peer_addr: SocketAddr) -> Self {
        ClusterConfig { peer_addr, join: None, snapshot_logs: raft::SNAPSHOT_LOGS_DEFAULT }
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
    meta: Raft,
    flocks: Vec<Raft>,
    meta_state: watch::Receiver<MetaState>,
    terms: Arc<LeaderTerms>,
    /// Lead confirmations for jobs that changed nothing.
    reads: Arc<ReadRounds>,
    /// Per group, a voter whose longer log refused this node's vote: it should win instead.
    outranked: Arc<Refusals>,
    /// Per group, a candidate this node refused because its own log is longer: it must run.
    outranks: Refusals,
    info: PeerInfo,
    /// Last leader this node heard of per flock (it may not herd the flock).
    hints: Vec<AtomicU64>,
    /// Per flock, the peer that claims to lead it in the latest term (from their pings).
    claims: Mutex<Vec<Option<Claim>>>,
    /// Flocks whose membership change is under way here.
    reconfiguring: Vec<AtomicBool>,
    meta_reconfiguring: AtomicBool,
    /// When each group last applied something here (for idle rebalancing).
    last_activity: Mutex<Vec<(u64, Instant)>>,
}

/// A peer's claim to lead a flock.
#[derive(Clone, Copy, Debug)]
struct Claim {
    node: NodeId,
    term: u64,
    settled: bool,
}

/// What came of forwarding a job to a peer.
enum Forwarded {
    /// The job's outcome, for the client.
    Answer(Result<JobOutput>),
    /// The peer does not lead the flock; it named its best guess of who does, if any.
    Redirect(Option<NodeId>),
    /// The job did not run and may be tried again.
    Failed(RemoteError),
}

/// True if `id` votes in the group whose metrics these are (in either half of a joint membership).
fn votes(metrics: &openraft::RaftMetrics<NodeId, PeerInfo>, id: NodeId) -> bool {
    metrics.membership_config.membership().voter_ids().any(|v| v == id)
}

/// A node id as text (how the API shows it).
pub fn node_id_text(id: NodeId) -> String {
    format!("{id:016x}")
}

fn parse_node_id(text: &str) -> anyhow::Result<NodeId> {
    u64::from_str_radix(text, 16).map_err(|e| anyhow::anyhow!("node id `{text}` is not 16 hex digits: {e}"))
}

impl Cluster {
    /// Starts the peer endpoint and every group, joins or bootstraps, and routes the node's
    /// requests through the cluster from now on. The node's servers must already know their URLs.
    pub async fn start(node: Node, file: ClusterFile, config: ClusterConfig) -> anyhow::Result<Cluster> {
        let me = parse_node_id(node.id())?;
        if node.flock_count() != file.flock_count {
            anyhow::bail!(
                "the data file has {} flocks but the cluster has {}; use a fresh --data directory",
                node.flock_count(),
                file.flock_count
            );
        }
        let slot: Arc<OnceLock<Cluster>> = Arc::new(OnceLock::new());
        let handler: Handler = {
            let slot = slot.clone();
            Arc::new(move |_from, request| {
                let slot = slot.clone();
                async move {
                    match slot.get() {
                        Some(cluster) => cluster.answer(request).await,
                        None => PeerResponse::Error(error(ErrorCode::Unavailable, "the node is starting")),
                    }
                }
                .boxed()
            })
        };
        let load = Arc::new(AtomicU64::new(0));
        let peers =
            Peers::start(me, file.cluster_id.clone(), config.peer_addr, node.data_dir(), handler, load.clone())?;
        let urls = node.node_urls();
        let info = PeerInfo {
            peer: peers.local_addr().to_string(),
            http: urls.http.unwrap_or_default(),
            quic: urls.quic.unwrap_or_default(),
            resp: urls.resp.unwrap_or_default(),
        };
        let terms = Arc::new(LeaderTerms::new(file.flock_count));
        let (meta_tx, meta_state) = watch::channel(MetaState::default());
        let raft_config = Arc::new(raft::config(config.snapshot_logs).validate()?);
        let (log, sm) = raft::open_group(META_GROUP, &node, terms.clone(), Some(meta_tx))?;
        let outbox = outbox::Outbox::new(peers.clone());
        let outranked = Arc::new(Refusals::default());
        let net = Network { group: META_GROUP, outbox: outbox.clone(), outranked: outranked.clone() };
        let meta = Raft::new(me, raft_config.clone(), net, log, sm).await?;
        let mut flocks = Vec::new();
        for flock in 0..file.flock_count {
            let (log, sm) = raft::open_group(flock, &node, terms.clone(), None)?;
            let net = Network { group: flock, outbox: outbox.clone(), outranked: outranked.clone() };
            flocks.push(Raft::new(me, raft_config.clone(), net, log, sm).await?);
        }
        let flock_count = file.flock_count as usize;
        let cluster = Cluster {
            inner: Arc::new(Inner {
                me,
                file,
                node: node.clone(),
                peers: peers.clone(),
                meta,
                flocks,
                meta_state,
                terms,
                reads: Arc::new(ReadRounds::new(flock_count as u32)),
                outranked,
                outranks: Refusals::default(),
                info: info.clone(),
                hints: (0..flock_count).map(|_| AtomicU64::new(0)).collect(),
                claims: Mutex::new(vec![None; flock_count]),
                reconfiguring: (0..flock_count).map(|_| AtomicBool::new(false)).collect(),
                meta_reconfiguring: AtomicBool::new(false),
                last_activity: Mutex::new(vec![(0, Instant::now()); flock_count]),
            }),
        };
        let _ = slot.set(cluster.clone());
        node.set_replicator(Arc::new(cluster.clone()));
        node.set_front(Arc::new(cluster.clone()));
        for flock in 0..flock_count {
            tokio::spawn(cluster.clone().watch_leadership(flock as u32));
        }
        tokio::spawn(cluster.clone().follow_members());
        tokio::spawn(cluster.clone().follow_claims());

        let initialized = cluster.inner.meta.is_initialized().await?;
        if initialized {
            // A restarted node greets every member its log names, at once: the member list it
            // had applied may be older (applied state is synced about once a second), and its
            // peers must hear of the restart now, not when their link to the old process times out.
            let logged: BTreeMap<NodeId, PeerInfo> = (cluster.inner.meta.metrics().borrow().membership_config)
                .membership()
                .nodes()
                .map(|(id, info)| (*id, info.clone()))
                .collect();
            peers.set_members(&logged);
            if config.join.is_some() {
                tracing::info!("already a member; --join is ignored");
            }
        } else {
            match &config.join {
                None if !node.data_dir().join(identity::CA_KEY_FILE).exists() => anyhow::bail!(
                    "this node has the credentials of a cluster it has not finished joining; start it with \
                     --join PEER_ADDR (any member's peer address)"
                ),
                None => cluster.bootstrap().await?,
                Some(addr) => {
                    let members = peers.hail(addr, info).await?;
                    peers.set_members(&members.into_iter().collect());
                    tracing::info!(via = %addr, "joined the cluster");
                }
            }
        }
        tokio::spawn(cluster.clone().supervise(load));
        if initialized {
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

    /// Stops every group and the peer endpoint.
    pub async fn shutdown(&self) {
        for raft in std::iter::once(&self.inner.meta).chain(self.inner.flocks.iter()) {
            let _ = raft.shutdown().await;
        }
        self.inner.peers.stop();
    }

    /// A one-node cluster: this node is every group's only voter.
    async fn bootstrap(&self) -> anyhow::Result<()> {
        let me = self.inner.me;
        let voters = BTreeMap::from([(me, self.inner.info.clone())]);
        self.inner.meta.initialize(voters.clone()).await?;
        for raft in &self.inner.flocks {
            raft.initialize(voters.clone()).await?;
        }
        self.wait_meta_leader().await?;
        self.meta_write(Command::AddNode { id: me, info: self.inner.info.clone() }).await?;
        tracing::info!(node = %node_id_text(me), "bootstrapped a new cluster");
        Ok(())
    }

    async fn wait_meta_leader(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.inner.meta.metrics().borrow().current_leader.is_none() {
            if Instant::now() > deadline {
                anyhow::bail!("the meta group elected no leader within 10 s");
            }
            let _ = self.inner.meta.trigger().elect().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn group(&self, group: GroupId) -> Option<&Raft> {
        if group == META_GROUP { Some(&self.inner.meta) } else { self.inner.flocks.get(group as usize) }
    }

    fn meta_state(&self) -> MetaState {
        self.inner.meta_state.borrow().clone()
    }

    /// Proposes a meta command here (this node must lead the meta group).
    async fn meta_write(&self, command: Command) -> Result<()> {
        self.inner
            .meta
            .client_write(command)
            .await
            .map(|_| ())
            .map_err(|e| error(ErrorCode::Unavailable, format!("the cluster could not record the change: {e}")))
    }

    /// The leader of a group as this node knows it: from the group itself if this node herds it
    /// (a leader the group's membership leaves out does not count), else from peers' claims, else
    /// the last leader a redirect named.
    fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        let raft = self.group(group)?;
        if group == META_GROUP || self.herds(group) {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if let Some(leader) = m.current_leader.filter(|l| votes(&m, *l)) {
                return Some(leader);
            }
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
    /// cluster's first map) and it votes in its view of the group. A node the map moved the flock
    /// away from keeps a stale view of the group (nobody talks to it any more), so the map decides
    /// first.
    fn herds(&self, flock: u32) -> bool {
        let me = self.inner.me;
        let named = (self.inner.meta_state.borrow().map.herders.get(flock as usize))
            .is_none_or(|h| h.is_empty() || h.contains(&me));
        named && self.group(flock).is_some_and(|raft| votes(&raft.metrics().borrow(), me))
    }

    /// Where to send a job for `flock` this node does not run itself: its leader if known, else
    /// any live herder (which knows the leader or redirects). `None` while this node itself is
    /// about to lead (elected, not caught up yet).
    fn route_target(&self, flock: u32) -> Option<NodeId> {
        decide::route(self.inner.me, self.leader_of(flock), &self.herders(flock), &|n| self.inner.peers.alive(n))
    }

    fn herders(&self, flock: u32) -> Vec<NodeId> {
        self.inner.meta_state.borrow().map.herders.get(flock as usize).cloned().unwrap_or_default()
    }

    /// The voters of a group in this node's view of its membership.
    fn voters(&self, group: GroupId) -> Vec<NodeId> {
        self.group(group)
            .map(|raft| raft.metrics().borrow().membership_config.membership().voter_ids().collect())
            .unwrap_or_default()
    }

    /// The voters of a group (itself included; for a flock this node does not herd, the herders
    /// in the flock map), and whether this node can reach a majority of them.
    fn quorum_view(&self, group: GroupId) -> (Vec<NodeId>, bool) {
        let voters = if group == META_GROUP || self.herds(group) { self.voters(group) } else { self.herders(group) };
        let alive = voters.iter().filter(|v| self.inner.peers.alive(**v)).count();
        let majority = alive * 2 > voters.len();
        (voters, majority)
    }

    fn has_quorum(&self, group: GroupId) -> bool {
        self.quorum_view(group).1
    }

    fn no_quorum(&self, flock: u32) -> RemoteError {
        let (voters, _) = self.quorum_view(flock);
        let view: Vec<String> = voters
            .iter()
            .map(|v| format!("{} {}", node_id_text(*v), if self.inner.peers.alive(*v) { "up" } else { "unreachable" }))
            .collect();
        error(
            ErrorCode::NoQuorum,
            format!(
                "this node cannot reach a majority of flock {flock}'s herders ({}), so it refuses writes; \
                 retry on another node",
                view.join(", ")
            ),
        )
    }

    /// Runs a job where it belongs: here if this node leads the flock (or, read-only, herds it),
    /// else one hop to the leader, following redirects until [`ROUTE_PATIENCE`] runs out.
    async fn route_job(&self, bucket: Vec<u8>, module: String, input: Vec<u8>, read_only: bool) -> Result<JobOutput> {
        proto::check_bucket_key(&bucket)?;
        let flock = proto::flock_of(&bucket, self.inner.file.flock_count);
        let deadline = Instant::now() + ROUTE_PATIENCE;
        let mut last_error = None;
        if !read_only && !self.has_quorum(flock) {
            return Err(self.no_quorum(flock));
        }
        // The leader the last redirect named, and how many redirects were followed: only the
        // first goes at once, so nodes with stale views cannot bounce a job at network speed.
        let (mut redirect, mut redirects) = (None::<NodeId>, 0);
        loop {
            if let Some(local) = self.try_here(flock, &bucket, &module, &input, read_only).await {
                match local {
                    Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => last_error = Some(e),
                    other => return other,
                }
            } else if let Some(target) = redirect.take().or_else(|| self.route_target(flock)) {
                // A leader this node cannot reach may still lead the others (a cut between two
                // nodes): a herder that reaches it passes the job on. (The herders are looked up
                // only then: this runs for every forwarded job.)
                let alive = |n| self.inner.peers.alive(n);
                let via = (!alive(target)).then(|| decide::relay(self.inner.me, target, &self.herders(flock), &alive));
                let via = via.flatten();
                let relay = via.is_some();
                match self.forward_job(via.unwrap_or(target), &bucket, &module, &input, read_only, relay).await {
                    Forwarded::Answer(result) => return result,
                    Forwarded::Redirect(hint) => {
                        redirect = hint;
                        redirects += 1;
                        if redirects == 1 && hint.is_some() {
                            continue;
                        }
                    }
                    Forwarded::Failed(e) => last_error = Some(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(last_error.unwrap_or_else(|| {
                    error(
                        ErrorCode::Unavailable,
                        format!("flock {flock} has no reachable leader (an election may be under way); retry shortly"),
                    )
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a job to `target`, which should lead its flock (or, with `relay`, pass it on to the
    /// leader, which this node cannot reach).
    async fn forward_job(
        &self,
        target: NodeId,
        bucket: &[u8],
        module: &str,
        input: &[u8],
        read_only: bool,
        relay: bool,
    ) -> Forwarded {
        let flock = proto::flock_of(bucket, self.inner.file.flock_count);
        if !self.inner.peers.alive(target) {
            // The failure detector has it down: wait for the election instead.
            return Forwarded::Failed(error(
                ErrorCode::Unavailable,
                format!("flock {flock}'s leader {target:016x} is down and a new one is being elected; retry shortly"),
            ));
        }
        let request = PeerRequest::Job {
            bucket: bucket.to_vec(),
            module: module.to_owned(),
            input: input.to_vec(),
            read_only,
            relay,
        };
        let timeout = self.inner.node.config().limits.timeout() + Duration::from_secs(10);
        self.inner.node.count_forwarded();
        let answer = tokio::select! {
            answer = self.inner.peers.call(target, request, timeout) => answer,
            () = self.until_down(target) => return Forwarded::Answer(Err(error(
                ErrorCode::OutcomeUnknown,
                "the node running the job went down before answering; the job may have committed, so read before retrying",
            ))),
        };
        let hint = &self.inner.hints[flock as usize];
        match answer {
            Ok(PeerResponse::Job(result)) => {
                if !relay {
                    hint.store(target, Ordering::Relaxed);
                }
                Forwarded::Answer(result)
            }
            Ok(PeerResponse::NotLeader { leader }) => {
                let leader = leader.filter(|l| *l != self.inner.me && *l != target);
                hint.store(leader.unwrap_or(0), Ordering::Relaxed);
                Forwarded::Redirect(leader)
            }
            Ok(PeerResponse::Error(e)) => Forwarded::Answer(Err(e)),
            Ok(other) => {
                Forwarded::Answer(Err(error(ErrorCode::Internal, format!("unexpected peer answer {other:?}"))))
            }
            Err(e) if !read_only && e.may_have_arrived() => Forwarded::Answer(Err(error(
                ErrorCode::OutcomeUnknown,
                format!("{e}; the job may have committed, so read before retrying"),
            ))),
            Err(e) => Forwarded::Failed(e.into()),
        }
    }

    /// Resolves once the failure detector considers `peer` down.
    async fn until_down(&self, peer: NodeId) {
        while self.inner.peers.alive(peer) {
            tokio::time::sleep(peer::PING_INTERVAL).await;
        }
    }

    /// Runs the job here if this node should; `None` if it belongs elsewhere.
    async fn try_here(
        &self,
        flock: u32,
        bucket: &[u8],
        module: &str,
        input: &[u8],
        read_only: bool,
    ) -> Option<Result<JobOutput>> {
        let leads = self.inner.terms.get(flock).is_some();
        let herds = read_only && self.herds(flock);
        if !leads && !herds {
            return None;
        }
        if leads && !read_only && !self.has_quorum(flock) {
            return Some(Err(self.no_quorum(flock)));
        }
        Some(self.inner.node.run_job_here(bucket, module, input.to_vec(), read_only).await)
    }

    /// Hands one consensus message to its group.
    async fn answer_raft(&self, group: GroupId, rpc: RaftRpc) -> PeerResponse {
        let Some(raft) = self.group(group) else {
            return PeerResponse::Error(error(ErrorCode::BadRequest, format!("no group {group}")));
        };
        let failed = |e: String| PeerResponse::Error(error(ErrorCode::Unavailable, e));
        match rpc {
            RaftRpc::Append(req) => {
                raft.append_entries(req).await.map_or_else(|e| failed(e.to_string()), PeerResponse::Append)
            }
            RaftRpc::Vote(req) => {
                let (candidate, theirs) = (req.vote.leader_id().voted_for(), req.last_log_id);
                let answer = raft.vote(req).await;
                if let (Ok(answer), Some(candidate)) = (&answer, candidate)
                    && !answer.vote_granted
                    && answer.last_log_id > theirs
                {
                    self.inner.outranks.note(group, candidate);
                }
                answer.map_or_else(|e| failed(e.to_string()), PeerResponse::Vote)
            }
            RaftRpc::Snapshot(req) => {
                raft.install_snapshot(req).await.map_or_else(|e| failed(e.to_string()), PeerResponse::Snapshot)
            }
        }
    }

    /// Answers a request from a peer.
    async fn answer(&self, request: PeerRequest) -> PeerResponse {
        match request {
            PeerRequest::Raft { group, rpc } => self.answer_raft(group, rpc).await,
            PeerRequest::RaftBatch { items } => {
                // Together, so that the batch's appends share one commit.
                let answers = items.into_iter().map(|(group, bytes)| async move {
                    let rpc = match outbox::decode_item(&bytes) {
                        Ok(rpc) => rpc,
                        Err(answer) => return answer,
                    };
                    match tokio::time::timeout(outbox::BATCH_ITEM_PATIENCE, self.answer_raft(group, rpc)).await {
                        Ok(answer) => answer,
                        Err(_) => PeerResponse::Error(error(
                            ErrorCode::Unavailable,
                            format!(
                                "group {group} did not handle the message within {:?}",
                                outbox::BATCH_ITEM_PATIENCE
                            ),
                        )),
                    }
                });
                PeerResponse::RaftBatch(futures::future::join_all(answers).await)
            }
            PeerRequest::Job { bucket, module, input, read_only, relay } => {
                if bucket.len() > proto::BUCKET_KEY_BYTES_MAX {
                    return PeerResponse::Job(proto::check_bucket_key(&bucket).map(|_| unreachable!()));
                }
                let flock = proto::flock_of(&bucket, self.inner.file.flock_count);
                if let Some(result) = self.try_here(flock, &bucket, &module, &input, read_only).await {
                    return PeerResponse::Job(result);
                }
                let leader = self.leader_of(flock).filter(|l| *l != self.inner.me);
                match leader {
                    // Passed on once, never relayed again: a job travels at most two hops.
                    Some(target) if relay && self.inner.peers.alive(target) => {
                        match self.forward_job(target, &bucket, &module, &input, read_only, false).await {
                            Forwarded::Answer(result) => PeerResponse::Job(result),
                            Forwarded::Redirect(hint) => PeerResponse::NotLeader { leader: hint },
                            Forwarded::Failed(_) => PeerResponse::NotLeader { leader },
                        }
                    }
                    leader => PeerResponse::NotLeader { leader },
                }
            }
            PeerRequest::Hail { id, info } => self.admit(id, info).await,
            PeerRequest::PutModule { name, wasm } => PeerResponse::Module(self.store_module(name, wasm).await),
            PeerRequest::Hello { .. } | PeerRequest::Ping { .. } => {
                PeerResponse::Error(error(ErrorCode::BadRequest, "handled by the transport"))
            }
        }
    }

    /// A node hails, to join or to have its new addresses recorded: the meta leader adds it (as a
    /// learner, then a voter while there are fewer than [`META_VOTERS_MAX`]; a member stays what
    /// it is) and records its addresses; any other node passes the hail on to the meta leader.
    async fn admit(&self, id: NodeId, info: PeerInfo) -> PeerResponse {
        let Some(leader) = self.leader_of(META_GROUP) else {
            return PeerResponse::Error(error(ErrorCode::Unavailable, "the cluster has no meta leader; retry shortly"));
        };
        if leader != self.inner.me {
            return self
                .inner
                .peers
                .call(leader, PeerRequest::Hail { id, info }, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| PeerResponse::Error(e.into()));
        }
        let recorded = self.inner.meta_state.borrow().nodes.get(&id).cloned();
        match recorded {
            Some(was) => {
                tracing::info!(node = %node_id_text(id), %was, now = %info, "a member hails again (a join not answered before, or new addresses)")
            }
            None => tracing::info!(node = %node_id_text(id), peer = %info.peer, "a node asks to join"),
        }
        self.inner.peers.learn(id, &info);
        // The joiner holds the log up to its own admission before it hears it has joined: a node
        // that restarts with an empty log is not a member in its own eyes.
        if let Err(e) = add_caught_up_learner(&self.inner.meta, id, info.clone(), ROUTE_PATIENCE * 3).await {
            return PeerResponse::Error(error(
                ErrorCode::Unavailable,
                format!("adding the node failed: {e}; start it again with the same --join"),
            ));
        }
        if let Err(e) = self.meta_write(Command::AddNode { id, info }).await {
            return PeerResponse::Error(e);
        }
        PeerResponse::Joined { members: self.meta_state().nodes.into_iter().collect() }
    }

    async fn store_module(&self, name: String, wasm: Vec<u8>) -> Result<ModuleInfo> {
        let (id, wasm) = self.inner.node.check_module(&name, wasm).await?;
        let size = wasm.len() as u64;
        let info = ModuleInfo { name: name.clone(), id: crate::wasm::module_id_text(&id), size };
        match self.leader_of(META_GROUP) {
            Some(leader) if leader == self.inner.me => {
                self.meta_write(Command::PutModule { name, id, wasm }).await?;
                Ok(info)
            }
            Some(leader) => {
                match self
                    .inner
                    .peers
                    .call(leader, PeerRequest::PutModule { name, wasm }, Duration::from_secs(60))
                    .await
                {
                    Ok(PeerResponse::Module(result)) => result,
                    Ok(PeerResponse::Error(e)) => Err(e),
                    Ok(other) => Err(error(ErrorCode::Internal, format!("unexpected peer answer {other:?}"))),
                    Err(e) => Err(e.into()),
                }
            }
            None => Err(error(ErrorCode::Unavailable, "the cluster has no meta leader; retry shortly")),
        }
    }

    /// Publishes this node's readiness to lead each flock to the executors.
    async fn watch_leadership(self, flock: u32) {
        let mut metrics = self.inner.flocks[flock as usize].metrics();
        let mut lead = LeadStart::default();
        loop {
            let ready = {
                let m = metrics.borrow_and_update();
                if let Ok(mut activity) = self.inner.last_activity.lock() {
                    let applied = m.last_applied.map_or(0, |l| l.index);
                    if activity[flock as usize].0 != applied {
                        activity[flock as usize] = (applied, Instant::now());
                    }
                }
                lead.ready_term(&LeadView::of(&m, self.inner.me))
            };
            let before = self.inner.terms.set(flock, ready);
            if before != 0 && ready == 0 {
                // Lost the lead: cached writes of that term may never commit.
                self.inner.node.drop_flock(flock).await;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// A restarted member whose addresses changed (another `--http`, `--quic`, `--resp` or
    /// `--peer` than it last ran with) has the meta leader record the new ones, as for a join, so
    /// canaries, `CLUSTER` replies and its peers find it where it listens now.
    async fn advertise(self) {
        let (me, info) = (self.inner.me, self.inner.info.clone());
        let mut state = self.inner.meta_state.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let recorded = state.borrow_and_update().nodes.get(&me).cloned();
            if recorded.as_ref() == Some(&info) {
                return;
            }
            if recorded.is_none() {
                // Its applied meta state does not list it yet.
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            // As a hail to this node: admitted here if it leads the meta group, else passed on.
            match self.admit(me, info.clone()).await {
                PeerResponse::Joined { .. } => {
                    tracing::info!(was = %recorded.unwrap_or_default(), now = %info, "recorded this node's new addresses");
                    return;
                }
                other => tracing::debug!(answer = ?other, "recording this node's new addresses failed; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Keeps the transport's member list in step with the meta group.
    async fn follow_members(self) {
        let mut state = self.inner.meta_state.clone();
        loop {
            let nodes = state.borrow_and_update().nodes.clone();
            self.inner.peers.set_members(&nodes);
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// The supervisor: elections from the failure detector, leader balancing, and membership
    /// changes that follow the flock map. One task per node, ticking every [`SUPERVISE_EVERY`].
    async fn supervise(self, load: Arc<AtomicU64>) {
        let groups: Vec<GroupId> = std::iter::once(META_GROUP).chain(0..self.inner.file.flock_count).collect();
        let mut timers = vec![ElectionTimer::default(); groups.len()];
        let origin = Instant::now();
        let mut alive: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut ticker = tokio::time::interval(SUPERVISE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut meta_changes = self.inner.meta_state.clone();
        let mut last_reconcile = Instant::now();
        loop {
            ticker.tick().await;
            load.store(self.inner.node.load(), Ordering::Relaxed);
            let peers_changed = self.greet_revived(&mut alive).await;
            // Membership follows the flock map: checked when the meta state changed, and now
            // and then in case a change failed or this node just took a lead.
            let reconcile = meta_changes.has_changed().unwrap_or(false) || last_reconcile.elapsed() >= RECONCILE_EVERY;
            if reconcile {
                meta_changes.mark_unchanged();
                last_reconcile = Instant::now();
            }
            // Leaders only die or come back when the failure detector's view changes: between
            // such changes (and elections under way) an idle node looks at its groups only at
            // the pace of reconciliation.
            let sweep = reconcile || peers_changed || timers.iter().any(ElectionTimer::leaderless);
            for (i, &group) in groups.iter().enumerate() {
                if sweep || group == META_GROUP {
                    self.supervise_group(group, &mut timers[i], origin.elapsed(), reconcile).await;
                }
            }
            if reconcile && self.inner.meta.metrics().borrow().state == ServerState::Leader {
                self.reconcile_meta().await;
            }
            self.publish_leads();
        }
    }

    /// Tells peers (with the next pings) which flocks this node leads.
    fn publish_leads(&self) {
        let leads = (0..self.inner.file.flock_count)
            .filter_map(|flock| {
                let term = self.inner.terms.get(flock)?;
                Some(Lead { flock, term, settled: self.herders_wanted(flock).is_none() })
            })
            .collect();
        self.inner.peers.set_leads(leads);
    }

    /// Keeps the claims board in step with what peers say they lead: per flock, the claim of the
    /// latest term.
    async fn follow_claims(self) {
        let mut heard = self.inner.peers.leads_heard();
        loop {
            heard.borrow_and_update();
            let mut board: Vec<Option<Claim>> = vec![None; self.inner.file.flock_count as usize];
            for (node, leads) in self.inner.peers.peer_leads() {
                for lead in leads.iter() {
                    if let Some(slot) = board.get_mut(lead.flock as usize)
                        && slot.is_none_or(|c| lead.term > c.term)
                    {
                        *slot = Some(Claim { node, term: lead.term, settled: lead.settled });
                    }
                }
            }
            *self.inner.claims.lock().unwrap_or_else(|p| p.into_inner()) = board;
            if heard.changed().await.is_err() {
                return;
            }
        }
    }

    /// When a peer comes back (restart, healed partition), every group this node leads sends it
    /// a heartbeat at once: it learns the current leaders, terms and commit indexes, and catches
    /// up, without waiting for the next write. A peer that restarted faster than the failure
    /// detector notices counts as back too (its connection carries a new incarnation): a
    /// restarted node re-applies its committed log only once a leader tells it what is
    /// committed. No group sends periodic heartbeats. True if the set of live peers changed.
    async fn greet_revived(&self, alive: &mut BTreeMap<NodeId, u64>) -> bool {
        let now: BTreeMap<NodeId, u64> = {
            let state = self.inner.meta_state.borrow();
            state
                .nodes
                .keys()
                .copied()
                .filter(|n| *n != self.inner.me && self.inner.peers.alive(*n))
                // Between connections a live peer keeps the incarnation it had.
                .map(|n| (n, self.inner.peers.incarnation_of(n).or(alive.get(&n).copied()).unwrap_or(0)))
                .collect()
        };
        if now == *alive {
            return false;
        }
        let revived = now.iter().any(|(n, incarnation)| alive.get(n) != Some(incarnation));
        *alive = now;
        if !revived {
            return true;
        }
        for raft in std::iter::once(&self.inner.meta).chain(self.inner.flocks.iter()) {
            if raft.metrics().borrow().state == ServerState::Leader {
                let _ = raft.trigger().heartbeat().await;
            }
        }
        true
    }

    async fn supervise_group(&self, group: GroupId, timer: &mut ElectionTimer, now: Duration, reconcile: bool) {
        let me = self.inner.me;
        let Some(raft) = self.group(group) else { return };
        let (leader, state, votes, leader_votes, voters) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            (m.current_leader, m.state, votes(&m, me), m.current_leader.is_some_and(|l| votes(&m, l)), voters)
        };
        if !votes {
            return;
        }
        if reconcile && state == ServerState::Leader && group != META_GROUP {
            self.reconcile_flock(group);
        }
        let preferred = if group == META_GROUP { Vec::new() } else { self.herders(group) };
        // Flock leaders claim their flocks in their pings (the meta group has no claims).
        let unclaimed_by =
            leader.filter(|l| *l != me && group != META_GROUP && self.live_claim(group).is_none_or(|c| c.node != *l));
        let sight = GroupSight {
            me,
            group,
            leader,
            leader_votes,
            leader_unclaimed: timer.unclaimed(now, unclaimed_by),
            voters: &voters,
            preferred: &preferred,
            outranked_by: self.inner.outranked.recent(group),
            outranks: self.inner.outranks.recent(group).is_some(),
        };
        let alive = |n| self.inner.peers.alive(n);
        let verdict = decide::verdict(&sight, &alive);
        let leading = state == ServerState::Leader;
        let elect = match verdict {
            Verdict::Led => {
                self.inner.outranked.clear(group);
                self.inner.outranks.clear(group);
                // Hand an idle flock's lead to its preferred, live herder (checked at the pace
                // of reconciliation: it is never urgent).
                // (The meta group has no activity record: `get` finds none and it is never handed.)
                let idle_for = (self.inner.last_activity.lock().ok())
                    .and_then(|a| a.get(group as usize).map(|(_, at)| at.elapsed()))
                    .unwrap_or(Duration::ZERO);
                reconcile
                    && group != META_GROUP
                    && timer.take_back_now(
                        now,
                        idle_for,
                        leader == Some(me),
                        decide::election_rank(me, group, &voters, &preferred, &alive) == Some(0),
                    )
            }
            verdict => timer.elect_now(verdict, now, leading, rand::random_range(1.0..2.0)),
        };
        if elect {
            if sight.outranks && !preferred.is_empty() && !preferred.contains(&me) {
                tracing::info!(
                    group,
                    "calling an election for a flock the map moved away: a herder deferred to this node's longer log"
                );
            }
            let _ = raft.trigger().elect().await;
        }
    }

    /// On the meta leader: every member is in the flock map and the meta group's voters.
    async fn reconcile_meta(&self) {
        let state = self.meta_state();
        if state.nodes.is_empty() {
            return;
        }
        let nodes: BTreeSet<NodeId> = state.nodes.keys().copied().collect();
        let map = place(&state.map, &nodes, self.inner.file.flock_count, self.inner.file.replication);
        if map != state.map {
            tracing::info!(version = map.version, nodes = nodes.len(), "publishing a new flock map");
            if let Err(e) = self.meta_write(Command::SetFlockMap(map)).await {
                tracing::warn!(error = %e.message, "could not publish the flock map");
            }
        }
        let want: BTreeSet<NodeId> = nodes.iter().copied().take(META_VOTERS_MAX).collect();
        let have: BTreeSet<NodeId> = self.voters(META_GROUP).into_iter().collect();
        if want != have && !self.inner.meta_reconfiguring.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                for id in want.difference(&have) {
                    if let Some(info) = this.meta_state().nodes.get(id).cloned() {
                        let _ = add_caught_up_learner(&this.inner.meta, *id, info, ROUTE_PATIENCE * 3).await;
                    }
                }
                match tokio::time::timeout(ROUTE_PATIENCE * 3, this.inner.meta.change_membership(want, false)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "meta membership change failed"),
                    Err(_) => tracing::warn!("a meta membership change did not commit in time; will retry"),
                }
                this.inner.meta_reconfiguring.store(false, Ordering::Release);
            });
        }
    }

    /// On a flock's leader: make the flock's voters the map's herders (learner, catch up, promote).
    fn reconcile_flock(&self, flock: u32) {
        if self.herders_wanted(flock).is_none() || self.inner.reconfiguring[flock as usize].swap(true, Ordering::AcqRel)
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            // The map may change again while a change is under way (nodes joining one after
            // another): go on until the group matches the latest map, or a step fails (the
            // supervisor tries again later).
            while this.change_herders(flock).await {}
            this.inner.reconfiguring[flock as usize].store(false, Ordering::Release);
        });
    }

    /// The flock map's herders for `flock` when its group's voters differ from them (`None`
    /// when they match, or the map names none yet).
    fn herders_wanted(&self, flock: u32) -> Option<BTreeSet<NodeId>> {
        let want: BTreeSet<NodeId> = self.herders(flock).into_iter().collect();
        let have: BTreeSet<NodeId> = self.voters(flock).into_iter().collect();
        (!want.is_empty() && want != have).then_some(want)
    }

    /// One step of [`Cluster::reconcile_flock`]: makes the flock's voters the map's herders.
    /// True if it changed them and should look again.
    async fn change_herders(&self, flock: u32) -> bool {
        let raft = &self.inner.flocks[flock as usize];
        let Some(want) = self.herders_wanted(flock) else { return false };
        let have: BTreeSet<NodeId> = self.voters(flock).into_iter().collect();
        if !have.contains(&self.inner.me) {
            // The last change left this node out; the group's next leader goes on from here.
            return false;
        }
        let nodes = self.meta_state().nodes;
        for id in want.difference(&have) {
            let Some(info) = nodes.get(id).cloned() else { return false };
            if let Err(e) = add_caught_up_learner(raft, *id, info, ROUTE_PATIENCE * 3).await {
                tracing::info!(flock, error = %e, "adding a herder failed; will retry");
                return false;
            }
        }
        let stays = want.contains(&self.inner.me);
        // Bounded, so that a change that cannot commit (its leader cut off) does not hold the
        // flock's reconfiguration flag for ever: the supervisor tries again later (openraft
        // refuses a second change while the first is still under way).
        let Ok(changed) = tokio::time::timeout(ROUTE_PATIENCE * 3, raft.change_membership(want, false)).await else {
            tracing::warn!(flock, group = %*raft.metrics().borrow(), "a flock membership change did not commit in time; will retry");
            return false;
        };
        match changed {
            Ok(_) => {
                tracing::debug!(flock, "flock herders changed");
                // A leader that left the group must not change it again (openraft would panic):
                // the group's next leader goes on from here.
                stays
            }
            Err(e) => {
                tracing::debug!(flock, error = %e, "flock membership change failed; will retry");
                false
            }
        }
    }
}

/// Adds `id` to `raft`'s group as a learner and waits until its log holds the entry that added it
/// (and so everything before it), within `patience`. openraft's own blocking `add_learner` counts
/// a learner as caught up while it lags by less than `replication_lag_threshold` entries, which an
/// empty log does in any group younger than that; promoting such a learner would leave a voter
/// that still has everything to fetch. A membership change already under way (another learner
/// being promoted) is waited out.
async fn add_caught_up_learner(
    raft: &Raft,
    id: NodeId,
    info: PeerInfo,
    patience: Duration,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + patience;
    let added =
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(answer) = tokio::time::timeout(left, raft.add_learner(id, info.clone(), false)).await else {
                return Err("the entry adding the learner did not commit in time".into());
            };
            match answer {
                Ok(added) => break added.log_id,
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e.to_string()),
            }
        };
    let holds_it = |m: &openraft::RaftMetrics<NodeId, PeerInfo>| {
        m.replication.as_ref().and_then(|r| r.get(&id)).is_some_and(|matched| *matched >= Some(added))
    };
    raft.wait(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100))))
        .metrics(holds_it, "the learner holds the entry that added it")
        .await
        .map(|_| ())
        .map_err(|e| format!("the learner did not receive the log in time ({e})"))
}

impl Replicator for Cluster {
    fn leader_term(&self, flock: u32) -> Option<u64> {
        self.inner.terms.get(flock)
    }

    fn propose(&self, flock: u32, change: ChangeSet) -> Result<Ticket> {
        let raft = self.inner.flocks.get(flock as usize).ok_or_else(|| error(ErrorCode::Internal, "no such flock"))?;
        // `client_write_ff` only queues the entry on the group's channel, so polling it once here
        // keeps proposals in call order.
        let receiver = futures::executor::block_on(raft.client_write_ff(Command::Change(change)))
            .map_err(|e| error(ErrorCode::Unavailable, format!("flock {flock} stopped: {e}")))?;
        let metrics = raft.metrics();
        let ticket = async move {
            let Ok(answer) = tokio::time::timeout(COMMIT_PATIENCE, receiver).await else {
                tracing::warn!(flock, group = %*metrics.borrow(), "a write was not committed in time");
                return Err(error(
                    ErrorCode::OutcomeUnknown,
                    format!(
                        "the write was not committed within {} s (the flock cannot reach a majority); it may still take effect, so read before retrying",
                        COMMIT_PATIENCE.as_secs()
                    ),
                ));
            };
            match answer {
                Ok(Ok(response)) => Ok(response.data.written),
                // Refused before it was appended: it never will be.
                Ok(Err(e @ ClientWriteError::ForwardToLeader(_))) => Err(error(
                    ErrorCode::Unavailable,
                    format!("the write was not taken ({e}); this node no longer leads flock {flock}, retry"),
                )),
                Ok(Err(e)) => Err(error(
                    ErrorCode::OutcomeUnknown,
                    format!(
                        "the write was not committed ({e}); it may or may not have taken effect, so read before retrying"
                    ),
                )),
                Err(_) => Err(error(
                    ErrorCode::OutcomeUnknown,
                    "the flock's leader stepped down before the write committed; read before retrying",
                )),
            }
        };
        Ok(ticket.boxed().shared())
    }

    fn confirm_lead(&self, flock: u32, term: u64) -> BoxFuture<'static, Result<()>> {
        match self.inner.flocks.get(flock as usize) {
            Some(raft) => self.inner.reads.confirm(raft, flock, term),
            None => futures::future::ready(Err(error(ErrorCode::Internal, "no such flock"))).boxed(),
        }
    }
}

impl Front for Cluster {
    fn run_job(
        &self,
        bucket: Vec<u8>,
        module: String,
        input: Vec<u8>,
        read_only: bool,
    ) -> BoxFuture<'static, Result<JobOutput>> {
        let this = self.clone();
        async move { this.route_job(bucket, module, input, read_only).await }.boxed()
    }

    fn put_module(&self, name: String, wasm: Vec<u8>) -> BoxFuture<'static, Result<ModuleInfo>> {
        let this = self.clone();
        async move { this.store_module(name, wasm).await }.boxed()
    }

    fn canary(&self, bucket: &[u8], read_only: bool) -> Result<Canary> {
        let flock = proto::flock_of(bucket, self.inner.file.flock_count);
        let leader = self.leader_of(flock);
        let (node, role) = if read_only {
            // The warm leader unless a live herder carries clearly less load.
            let herders = self.herders(flock);
            let pick = herders.iter().copied().filter(|h| self.inner.peers.alive(*h)).min_by_key(|h| {
                (
                    self.inner.peers.load_of(*h).saturating_sub(if Some(*h) == leader { 4 } else { 0 }),
                    Some(*h) != leader,
                )
            });
            match pick {
                Some(h) => (h, if Some(h) == leader { "leader" } else { "follower" }),
                None => (leader.unwrap_or(self.inner.me), "leader"),
            }
        } else {
            let leader = leader.ok_or_else(|| {
                error(
                    ErrorCode::Unavailable,
                    format!("flock {flock} has no leader right now (an election is under way); retry shortly"),
                )
            })?;
            (leader, "leader")
        };
        let info = self.inner.meta_state.borrow().nodes.get(&node).cloned().unwrap_or_default();
        Ok(Canary {
            url: info.http,
            quic: Some(info.quic).filter(|q| !q.is_empty()),
            node: node_id_text(node),
            flock,
            role: role.into(),
            bucket_version: self.inner.node.store().bucket_version(bucket).map_err(RemoteError::from)?,
        })
    }

    fn flocks(&self) -> FlockMapInfo {
        let state = self.meta_state();
        FlockMapInfo {
            version: state.map.version,
            nodes: state.nodes.iter().map(|(id, info)| (node_id_text(*id), info.http.clone())).collect(),
            flocks: state
                .map
                .herders
                .iter()
                .enumerate()
                .map(|(flock, herders)| FlockInfo {
                    flock: flock as u32,
                    herders: herders.iter().map(|h| node_id_text(*h)).collect(),
                    leader: self.leader_of(flock as u32).map(node_id_text),
                    // Only herders see the group; others go by its leader's claim.
                    settled: if self.herds(flock as u32) {
                        self.herders_wanted(flock as u32).is_none()
                    } else {
                        self.live_claim(flock as u32).is_some_and(|c| c.settled)
                    },
                    log_purged: self
                        .group(flock as u32)
                        .and_then(|raft| raft.metrics().borrow().purged.map(|l| l.index))
                        .unwrap_or(0),
                })
                .collect(),
        }
    }

    fn resp_nodes(&self) -> Vec<RespNode> {
        self.meta_state()
            .nodes
            .iter()
            .filter(|(_, info)| !info.resp.is_empty())
            .map(|(id, info)| RespNode { id: node_id_text(*id), resp: info.resp.clone(), peer: info.peer.clone() })
            .collect()
    }
}

/// The flock map type, for tests and tools.
pub type Map = FlockMap;
