//! The peer transport: QUIC (quinn) with mutual TLS under the cluster CA, ALPN `grex-peer/N`
//! (`messages::PEER_ALPN` for this release's version).
//!
//! Versions: both sides offer every version's ALPN, newest first, and the handshake settles on
//! the highest both know. A node speaks its own version and the one before
//! (`messages::PEER_PROTOCOL_OLDEST`), so nodes of two consecutive releases work together while a
//! cluster is upgraded one node at a time; each connection remembers its version, and a request
//! newer than it is not sent on it (`PeerRequest::since`). A peer further apart is told which
//! versions differ (`messages::version_mismatch`) before the connection is closed.
//!
//! Each pair of nodes keeps one long-lived connection. Either side dials when it has none; if
//! both dial at once, both keep the connection dialed by the lower node id, so a pair converges
//! on one connection, which both sides use and serve. The other is closed a minute later
//! ([`DUPLICATE_GRACE`]), not at once: until both sides settled, either may have sent a request
//! on it, and closing it would lose the answer (a forwarded job would end with an unknown
//! outcome). A connection from a restarted peer (its hello carries a new incarnation) replaces
//! the old one at once, whoever dialed that: the old one is dead, though QUIC would take its idle
//! timeout to notice. A request is one bidirectional stream carrying one frame each way
//! (`messages`), so a slow request never blocks another. Consensus messages are the exception:
//! each node sends its peer a frame per engine round on a stream that stays open ([`Lane`]).
//!
//! Liveness is per node pair, shared by every flock: a heartbeat task per peer pings it every
//! [`PING_INTERVAL`] (redialing with back-off when the connection is gone), and a peer not heard
//! from within [`DEAD_AFTER`] counts as down. The supervisor (`supervision`) tells the consensus
//! engine, which elects at once in the groups the lost peer led.
//!
//! Pings also carry what a node tells every peer about itself: its load, and the flocks it leads
//! ([`Lead`]). The list travels only when it changed since the peer last confirmed it (pongs say
//! which version they hold), so an idle cluster's pings stay a few bytes.
//!
//! A peer whose certificate is not from the cluster CA fails the TLS handshake; the refusal is
//! logged with its address. A malformed or oversized frame gets an error answer and costs the
//! node nothing but the stream.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use grex_client::proto::{FrameError, decode_frame, encode_frame, encode_frame_sized};
use grex_client::quic::send_frame;
use tokio::sync::{Semaphore, watch};

use super::engine::NodeId;
use super::identity::{NodeIdentity, PEER_SERVER_NAME};
use super::messages::PeerInfo;
use super::messages::{GREX_VERSION, Lead, PeerFrame, PeerRequest, PeerResponse, peer_alpns, spoken, version_mismatch};
use super::wire::RaftMessage;
use crate::api::quic::{read_end, read_frame, read_next_frame, read_next_peer_frame, send_answer};
use crate::error::{ErrorCode, RemoteError, error};

/// How often each node pings each peer.
pub const PING_INTERVAL: Duration = Duration::from_millis(150);
/// A peer not heard from for this long is down.
pub const DEAD_AFTER: Duration = Duration::from_millis(600);
/// Connections from peers at once (a cluster has far fewer nodes).
pub const PEER_CONNECTIONS_MAX: usize = 256;
/// Requests in flight on one peer connection.
pub const PEER_STREAMS_MAX: u32 = 1024;
/// How long a request may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection that lost to a duplicate stays open for the requests already on it (a
/// forwarded job's answer waits up to its time limit and 10 s more).
const DUPLICATE_GRACE: Duration = Duration::from_secs(60);

/// Answers peer requests: `(sender, request) → response`.
pub type Handler = Arc<dyn Fn(NodeId, PeerRequest) -> BoxFuture<'static, PeerResponse> + Send + Sync>;

/// Why a peer call failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PeerError {
    /// No connection to the peer could be made, or it broke.
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The request or its answer broke the protocol (too large, malformed).
    #[error("peer protocol error: {0}")]
    Protocol(String),
    /// The peer did not answer in time.
    #[error("peer {0} did not answer within {1:?}")]
    Timeout(NodeId, Duration),
    /// The request was (at least partly) sent, then the stream broke or the wait ran out, so
    /// the peer may have acted on it.
    #[error("peer {0} did not answer after the request was sent: {1}")]
    Lost(NodeId, String),
}

impl PeerError {
    /// True if the peer may have received and acted on the request, so a request that changes
    /// data must not be sent again blindly.
    pub fn may_have_arrived(&self) -> bool {
        matches!(self, PeerError::Lost(..))
    }
}

impl From<PeerError> for RemoteError {
    fn from(e: PeerError) -> Self {
        error(ErrorCode::Unavailable, format!("{e}; retry shortly"))
    }
}

struct Link {
    connection: quinn::Connection,
    /// Which side dialed it (the lower id's connection wins a duplicate).
    dialed_by: NodeId,
    /// The peer process's incarnation on the other end.
    incarnation: u64,
    /// The peer protocol version the connection speaks.
    protocol: u32,
}

/// What a peer's hello, or its answer to this node's, told of the peer process.
struct Greeting {
    incarnation: u64,
    /// The protocol version of the connection it came on.
    protocol: u32,
    /// Its grex version (protocol 10 on).
    version: Option<String>,
}

#[derive(Default)]
struct PeerState {
    info: Option<PeerInfo>,
    link: Option<Link>,
    last_seen: Option<Instant>,
    load: u64,
    /// Bytes of snapshots the peer has sent (from its pings).
    snapshot_bytes_sent: u64,
    /// The flocks the peer told this node it leads, and that list's version.
    leads: Arc<Vec<Lead>>,
    leads_version: u64,
    /// The version of this node's list the peer confirmed holding.
    leads_acked: u64,
    /// The peer process the lists above belong to.
    incarnation: u64,
    /// Its grex version, as its hello or welcome said (peers of protocol 9 do not say).
    version: Option<String>,
    heartbeat: bool,
    /// Held while dialing, so concurrent callers share one new connection.
    dialing: Arc<tokio::sync::Mutex<()>>,
}

/// This node's side of every peer connection.
pub struct Peers {
    me: NodeId,
    /// Drawn at start; told to every peer in hellos.
    incarnation: u64,
    cluster_id: String,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    state: Mutex<HashMap<NodeId, PeerState>>,
    /// Wakes callers waiting for a connection to a peer.
    linked: watch::Sender<u64>,
    handler: Handler,
    load: Arc<AtomicU64>,
    /// The flocks this node leads and that list's version (from 1, so a restarted node's first
    /// list, even an empty one, replaces what its peers heard from its previous process).
    leads: Mutex<(u64, Arc<Vec<Lead>>)>,
    /// Counts lists heard from peers.
    leads_heard: watch::Sender<u64>,
    stopped: AtomicBool,
    /// When set, all peer traffic is dropped (the partition test's in-process firewall).
    isolated: AtomicBool,
    /// Peers whose traffic is dropped (fault injection: one side of a partition).
    cut_off: Mutex<BTreeSet<NodeId>>,
    /// Bytes of snapshots this node has sent to its peers.
    snapshot_bytes_sent: AtomicU64,
    /// Paces snapshot data sent to peers (bytes per second; 0: unpaced), and when the next
    /// byte may go.
    snapshot_rate: AtomicU64,
    snapshot_next: Mutex<Instant>,
    /// Former members: every request of theirs is answered [`PeerResponse::Removed`].
    removed: Mutex<BTreeSet<NodeId>>,
    /// Set when a peer answers that this node was removed from the cluster.
    evicted: watch::Sender<Option<String>>,
}

/// The peer endpoint, bound but not accepting yet: its address is known, so the node can tell
/// peers where it is before the service that answers them exists (the cluster holds its `Peers`,
/// and `Peers` holds the cluster's handler).
pub struct Bound {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
}

impl Bound {
    /// Binds the peer endpoint on `addr` with the identity in `dir`.
    pub fn bind(addr: SocketAddr, dir: &Path) -> anyhow::Result<Bound> {
        let (server, client_config) = tls_configs(dir, peer_alpns())?;
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|e| anyhow::anyhow!("cannot listen for peers on {addr}: {e}"))?;
        Ok(Bound { endpoint, client_config })
    }

    /// Where the endpoint listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound endpoint")
    }
}

impl Peers {
    /// This node's side of its peer connections over `bound`, answering peers' requests with
    /// `handler`. It dials when called; it accepts once [`Peers::accept`] is called.
    pub fn new(me: NodeId, cluster_id: String, bound: Bound, handler: Handler, load: Arc<AtomicU64>) -> Arc<Peers> {
        let (linked, _) = watch::channel(0);
        Arc::new(Peers {
            me,
            incarnation: rand::random(),
            cluster_id,
            endpoint: bound.endpoint,
            client_config: bound.client_config,
            state: Mutex::new(HashMap::new()),
            linked,
            handler,
            load,
            leads: Mutex::new((1, Arc::new(Vec::new()))),
            leads_heard: watch::channel(0).0,
            stopped: AtomicBool::new(false),
            isolated: AtomicBool::new(false),
            cut_off: Mutex::new(BTreeSet::new()),
            snapshot_bytes_sent: AtomicU64::new(0),
            snapshot_rate: AtomicU64::new(0),
            snapshot_next: Mutex::new(Instant::now()),
            removed: Mutex::new(BTreeSet::new()),
            evicted: watch::channel(None).0,
        })
    }

    /// Starts accepting peers' connections (until [`Peers::stop`]).
    pub fn accept(self: &Arc<Self>) {
        tokio::spawn(accept_loop(self.clone()));
    }

    /// Where the endpoint listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound endpoint")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, PeerState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns the cluster's members: a heartbeat task starts for each new one, and stops for
    /// each that left.
    pub fn set_members(self: &Arc<Self>, members: &BTreeMap<NodeId, PeerInfo>) {
        let mut start = Vec::new();
        {
            let mut state = self.state();
            for (id, peer) in state.iter_mut() {
                if !members.contains_key(id) {
                    peer.heartbeat = false;
                }
            }
            for (id, info) in members {
                if *id == self.me {
                    continue;
                }
                let peer = state.entry(*id).or_default();
                peer.info = Some(info.clone());
                if !peer.heartbeat {
                    peer.heartbeat = true;
                    start.push(*id);
                }
            }
        }
        for id in start {
            tokio::spawn(heartbeat(self.clone(), id));
        }
    }

    /// Former members, whose requests are refused from now on.
    pub fn set_removed(&self, removed: &BTreeSet<NodeId>) {
        *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = removed.clone();
    }

    fn is_removed(&self, id: NodeId) -> bool {
        self.removed.lock().unwrap_or_else(|p| p.into_inner()).contains(&id)
    }

    /// Says why this node is no longer a member, once a peer (or the meta state) has told it.
    pub fn evicted(&self) -> watch::Receiver<Option<String>> {
        self.evicted.subscribe()
    }

    /// Records that this node was removed from the cluster (`by` says who said so).
    pub fn set_evicted(&self, by: &str) {
        self.evicted.send_if_modified(|told| {
            told.is_none().then(|| {
                *told = Some(format!(
                    "this node ({}) was removed from the cluster ({by}); it cannot rejoin with this data directory: \
                     wipe it, then start the node with --credentials and --join to join as a new node",
                    super::node_id_text(self.me)
                ))
            })
            .is_some()
        });
    }

    /// Remembers where a peer listens (raft learns addresses before the member list does).
    pub fn learn(&self, id: NodeId, info: &PeerInfo) {
        if id != self.me {
            self.state().entry(id).or_default().info.get_or_insert_with(|| info.clone());
        }
    }

    /// True if the peer answered within [`DEAD_AFTER`] (this node itself is always alive).
    pub fn alive(&self, id: NodeId) -> bool {
        if id == self.me {
            return true;
        }
        if self.is_cut(id) {
            return false;
        }
        self.state().get(&id).and_then(|p| p.last_seen).is_some_and(|t| t.elapsed() < DEAD_AFTER)
    }

    /// The peer protocol version of the live connection to `id`, and the grex version it said it
    /// runs (peers of protocol 9 do not say), if there is such a connection.
    pub fn version_of(&self, id: NodeId) -> Option<(u32, Option<String>)> {
        let state = self.state();
        let peer = state.get(&id)?;
        let link = peer.link.as_ref().filter(|l| l.connection.close_reason().is_none())?;
        Some((link.protocol, peer.version.clone()))
    }

    /// Every peer this node knows: whether it is alive (see [`alive`](Self::alive)) and the
    /// round-trip time QUIC estimates on its open connection, if there is one.
    pub fn reachability(&self) -> Vec<(NodeId, bool, Option<Duration>)> {
        let ids: Vec<(NodeId, Option<Duration>)> = self
            .state()
            .iter()
            .map(|(&id, peer)| {
                let link = peer.link.as_ref().filter(|l| l.connection.close_reason().is_none());
                (id, link.map(|l| l.connection.rtt()))
            })
            .collect();
        ids.into_iter().map(|(id, rtt)| (id, self.alive(id), rtt)).collect()
    }

    /// The incarnation (drawn at each start) of the peer process at the other end of the current
    /// connection, if there is one: it changes when the peer restarted, even too fast for
    /// [`alive`](Self::alive) to have noticed.
    pub fn incarnation_of(&self, id: NodeId) -> Option<u64> {
        self.state().get(&id).and_then(|p| p.link.as_ref()).map(|l| l.incarnation)
    }

    /// The load a peer reported last (jobs running or queued).
    pub fn load_of(&self, id: NodeId) -> u64 {
        if id == self.me {
            return self.load.load(Ordering::Relaxed);
        }
        self.state().get(&id).map_or(u64::MAX, |p| p.load)
    }

    /// Sends at most `bytes_per_sec` of snapshot data a second, over all peers (0: no limit).
    pub fn set_snapshot_rate(&self, bytes_per_sec: u64) {
        self.snapshot_rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Waits until `bytes` more of snapshot data may be sent: each send takes its share of the
    /// rate in turn, so snapshots of every group and peer together stay within it.
    pub async fn pace_snapshot(&self, bytes: usize) {
        let rate = self.snapshot_rate.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let start = {
            let mut next = self.snapshot_next.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    /// Counts bytes of snapshot data a peer took from this node.
    pub fn count_snapshot_bytes(&self, bytes: usize) {
        self.snapshot_bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes of snapshots node `id` has sent since it started, as its last ping said (this
    /// node's own count for itself).
    pub fn snapshot_bytes_sent_by(&self, id: NodeId) -> u64 {
        if id == self.me {
            return self.snapshot_bytes_sent.load(Ordering::Relaxed);
        }
        self.state().get(&id).map_or(0, |p| p.snapshot_bytes_sent)
    }

    /// Sets the flocks this node leads; peers hear of a change with their next ping.
    pub fn set_leads(&self, leads: Vec<Lead>) {
        let mut current = self.leads.lock().unwrap_or_else(|p| p.into_inner());
        if *current.1 != leads {
            *current = (current.0 + 1, Arc::new(leads));
        }
    }

    /// What each peer last told this node it leads (peers that are down included).
    pub fn peer_leads(&self) -> Vec<(NodeId, Arc<Vec<Lead>>)> {
        self.state().iter().map(|(id, p)| (*id, p.leads.clone())).collect()
    }

    /// Changes whenever a peer tells a new list of led flocks.
    pub fn leads_heard(&self) -> watch::Receiver<u64> {
        self.leads_heard.subscribe()
    }

    /// Drops (or restores) all peer traffic of this node, as a network partition would.
    pub fn set_isolated(&self, isolated: bool) {
        self.isolated.store(isolated, Ordering::Relaxed);
        if isolated {
            for peer in self.state().values_mut() {
                if let Some(link) = peer.link.take() {
                    link.connection.close(3u32.into(), b"isolated");
                }
            }
        }
    }

    /// Drops (or, for peers not in `peers`, restores) all traffic with the given peers, as one
    /// side of a network partition would. Both sides of a partition are told.
    pub fn set_cut_off(&self, peers: BTreeSet<NodeId>) {
        let mut state = self.state();
        for id in &peers {
            if let Some(link) = state.get_mut(id).and_then(|p| p.link.take()) {
                link.connection.close(3u32.into(), b"cut off");
            }
        }
        *self.cut_off.lock().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    /// Whether traffic with `peer` is dropped.
    fn is_cut(&self, peer: NodeId) -> bool {
        self.isolated.load(Ordering::Relaxed) || self.cut_off.lock().unwrap_or_else(|p| p.into_inner()).contains(&peer)
    }

    /// Sends one request to a peer and waits for the answer.
    pub async fn call(
        self: &Arc<Self>,
        to: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let (frame_since, request_name) = (request.since(), request.name());
        let frame = PeerFrame { cluster_id: self.cluster_id.clone(), from: self.me, request };
        let bytes = encode_frame(&frame).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let sending = AtomicBool::new(false);
        let work = async {
            let (connection, protocol) = self.connection(to).await?;
            if frame_since > protocol {
                return Err(PeerError::Protocol(format!(
                    "node {} speaks the peer protocol grex-peer/{protocol}, which has no {} (grex-peer/{frame_since}); \
                     upgrade it to this node's grex version",
                    super::node_id_text(to),
                    request_name,
                )));
            }
            let (send, recv) = connection.open_bi().await.map_err(|e| PeerError::Unreachable(to, e.to_string()))?;
            sending.store(true, Ordering::Relaxed);
            exchange_on(send, recv, &bytes).await.map_err(|e| PeerError::Lost(to, e))
        };
        let answer = tokio::time::timeout(timeout, work).await;
        match answer {
            Ok(answer) => answer,
            Err(_) if sending.load(Ordering::Relaxed) => {
                Err(PeerError::Lost(to, format!("no answer within {timeout:?}")))
            }
            Err(_) => Err(PeerError::Timeout(to, timeout)),
        }
    }

    /// The live connection to `to` and its protocol version, if there is one.
    fn link(&self, to: NodeId) -> Option<(quinn::Connection, u32)> {
        let state = self.state();
        let link = state.get(&to)?.link.as_ref()?;
        link.connection.close_reason().is_none().then(|| (link.connection.clone(), link.protocol))
    }

    /// The connection to `to`, dialing if there is none. Concurrent callers wait for one dial.
    /// The dial runs as its own task, so a caller that gives up (a ping's short timeout on a
    /// loaded machine) does not cancel it: the next caller finds the connection made.
    async fn connection(self: &Arc<Self>, to: NodeId) -> Result<(quinn::Connection, u32), PeerError> {
        if self.is_cut(to) {
            return Err(PeerError::Unreachable(to, "the peer is cut off from this node".into()));
        }
        if let Some(connection) = self.link(to) {
            return Ok(connection);
        }
        let dialing = self.state().entry(to).or_default().dialing.clone();
        let guard = dialing.lock_owned().await;
        if let Some(connection) = self.link(to) {
            return Ok(connection);
        }
        let this = self.clone();
        let dial = tokio::spawn(async move {
            let _dialing = guard;
            match tokio::time::timeout(DIAL_TIMEOUT * 2, this.dial_and_greet(to)).await {
                Ok(result) => result,
                Err(_) => Err(PeerError::Unreachable(to, "no answer to hello".into())),
            }
        });
        dial.await.map_err(|e| PeerError::Unreachable(to, format!("dial task failed: {e}")))?
    }

    /// Dials `to` and says hello; the new connection becomes the pair's link.
    async fn dial_and_greet(self: &Arc<Self>, to: NodeId) -> Result<(quinn::Connection, u32), PeerError> {
        let info = self.state().get(&to).and_then(|p| p.info.clone());
        let info = info.ok_or_else(|| PeerError::Unreachable(to, "its address is not known yet".into()))?;
        let (connection, protocol) =
            self.dial(&info.peer).await.map_err(|e| PeerError::Unreachable(to, e.to_string()))?;
        // The peer sends its own requests on whichever connection the pair keeps, so this side
        // serves the connection it dialed just as one it accepted.
        tokio::spawn(serve_connection(self.clone(), connection.clone(), protocol));
        let request = if protocol >= 10 {
            PeerRequest::HelloWithVersion { incarnation: self.incarnation, version: GREX_VERSION.to_owned() }
        } else {
            PeerRequest::Hello { incarnation: self.incarnation }
        };
        let hello = PeerFrame { cluster_id: self.cluster_id.clone(), from: self.me, request };
        let bytes = encode_frame(&hello).map_err(|e| PeerError::Protocol(e.to_string()))?;
        let greeting = match exchange(&connection, &bytes).await {
            Ok(PeerResponse::Welcome { incarnation }) => Greeting { incarnation, protocol, version: None },
            Ok(PeerResponse::WelcomeWithVersion { incarnation, version }) => {
                Greeting { incarnation, protocol, version: Some(version) }
            }
            Ok(PeerResponse::Removed) => {
                self.set_evicted(&format!("node {} refused it", super::node_id_text(to)));
                return Err(PeerError::Unreachable(to, "this node was removed from the cluster".into()));
            }
            Ok(other) => return Err(PeerError::Protocol(format!("unexpected answer to hello: {other:?}"))),
            Err(e) => return Err(PeerError::Unreachable(to, e)),
        };
        Ok(self.register(to, connection, self.me, greeting))
    }

    /// Dials a peer; returns the connection and the protocol version it speaks.
    async fn dial(&self, addr: &str) -> anyhow::Result<(quinn::Connection, u32)> {
        let addr: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .with_context(|| format!("resolving {addr}"))?
            .next()
            .with_context(|| format!("{addr} resolves to no address"))?;
        let connecting = self.endpoint.connect_with(self.client_config.clone(), addr, PEER_SERVER_NAME)?;
        let connection = tokio::time::timeout(DIAL_TIMEOUT, connecting).await.context("dial timed out")??;
        match protocol(&connection) {
            Ok(version) => Ok((connection, version)),
            Err(theirs) => {
                let message = version_mismatch(&theirs, &format!("the peer at {addr}"));
                tracing::warn!("{message}");
                connection.close(4u32.into(), b"peer protocol version");
                anyhow::bail!("{message}");
            }
        }
    }

    /// Keeps one connection per peer: a duplicate to the same peer process loses to the one the
    /// lower id dialed; a connection to a restarted peer (another incarnation) wins. Returns the
    /// connection kept and its protocol version.
    fn register(
        self: &Arc<Self>,
        peer: NodeId,
        connection: quinn::Connection,
        dialed_by: NodeId,
        greeting: Greeting,
    ) -> (quinn::Connection, u32) {
        let Greeting { incarnation, protocol, version } = greeting;
        let winner = {
            let mut state = self.state();
            let entry = state.entry(peer).or_default();
            entry.last_seen = Some(Instant::now());
            entry.version = version;
            if entry.incarnation != incarnation {
                // Another process: what the old one led and confirmed means nothing now.
                entry.incarnation = incarnation;
                entry.leads = Arc::default();
                (entry.leads_version, entry.leads_acked) = (0, 0);
                self.leads_heard.send_modify(|n| *n += 1);
            }
            let live_old = entry.link.as_ref().filter(|old| old.connection.close_reason().is_none());
            let restarted = live_old.is_some_and(|old| old.incarnation != incarnation);
            let keep_old = live_old.is_some_and(|old| !restarted && old.dialed_by < dialed_by);
            if keep_old {
                retire(connection);
                let kept = entry.link.as_ref().expect("checked");
                (kept.connection.clone(), kept.protocol)
            } else {
                let link = Link { connection: connection.clone(), dialed_by, incarnation, protocol };
                if let Some(old) = entry.link.replace(link) {
                    if restarted {
                        tracing::info!(peer = %super::node_id_text(peer), "a restarted peer reconnected; its old connection is closed");
                        old.connection.close(2u32.into(), b"peer restarted");
                    } else {
                        retire(old.connection);
                    }
                }
                let this = self.clone();
                let watched = connection.clone();
                tokio::spawn(async move {
                    watched.closed().await;
                    let mut state = this.state();
                    if let Some(p) = state.get_mut(&peer)
                        && p.link.as_ref().is_some_and(|l| l.connection.stable_id() == watched.stable_id())
                    {
                        p.link = None;
                    }
                });
                (connection, protocol)
            }
        };
        self.linked.send_modify(|n| *n += 1);
        winner
    }

    /// Asks the node at `addr` to let this node join; returns the cluster's members.
    pub async fn hail(self: &Arc<Self>, addr: &str, info: PeerInfo) -> anyhow::Result<Vec<(NodeId, PeerInfo)>> {
        let (connection, _) = self.dial(addr).await.with_context(|| format!("cannot reach {addr}"))?;
        let frame = PeerFrame {
            cluster_id: self.cluster_id.clone(),
            from: self.me,
            request: PeerRequest::Hail { id: self.me, info },
        };
        let answer = exchange(&connection, &encode_frame(&frame)?).await.map_err(|e| anyhow::anyhow!(e));
        connection.close(0u32.into(), b"hailed");
        match answer? {
            PeerResponse::Joined { members } => Ok(members),
            PeerResponse::Error(e) => anyhow::bail!("{addr} refused the join: {}", e.message),
            other => anyhow::bail!("unexpected answer to a hail: {other:?}"),
        }
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.endpoint.close(0u32.into(), b"node stopping");
    }

    /// The ping for `peer`: the led flocks go along unless it confirmed holding this version.
    fn ping_for(&self, peer: NodeId) -> PeerRequest {
        let (version, leads) = self.leads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let acked = self.state().get(&peer).map_or(0, |p| p.leads_acked);
        PeerRequest::Ping {
            load: self.load.load(Ordering::Relaxed),
            snapshot_bytes_sent: self.snapshot_bytes_sent.load(Ordering::Relaxed),
            leads_version: version,
            leads: (acked != version).then(|| leads.to_vec()),
        }
    }

    /// Takes a peer's list of led flocks; returns the version held for it now.
    fn heard(&self, peer: NodeId, version: u64, leads: Option<Vec<Lead>>) -> u64 {
        let mut state = self.state();
        let entry = state.entry(peer).or_default();
        if let Some(leads) = leads {
            (entry.leads, entry.leads_version) = (Arc::new(leads), version);
            self.leads_heard.send_modify(|n| *n += 1);
        }
        entry.leads_version
    }

    fn saw(&self, peer: NodeId, load: Option<u64>) {
        let mut state = self.state();
        let entry = state.entry(peer).or_default();
        entry.last_seen = Some(Instant::now());
        if let Some(load) = load {
            entry.load = load;
        }
    }
}

/// Closes a connection that lost to a duplicate once the requests already sent on it have had
/// time to be answered: until both sides have settled on the winner, either may have sent a
/// request (a forwarded job, say) on the loser, and closing it at once would lose the answer.
fn retire(connection: quinn::Connection) {
    tokio::spawn(async move {
        tokio::time::sleep(DUPLICATE_GRACE).await;
        connection.close(2u32.into(), b"duplicate connection");
    });
}

/// One request-response exchange on a fresh stream.
async fn exchange(connection: &quinn::Connection, frame: &[u8]) -> Result<PeerResponse, String> {
    let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    exchange_on(send, recv, frame).await
}

/// Sends one request frame on an opened stream and reads the answer.
async fn exchange_on(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    frame: &[u8],
) -> Result<PeerResponse, String> {
    send_frame(send, frame).await.map_err(|e| e.to_string())?;
    let answer = read_frame(&mut recv).await?;
    decode_frame(&answer).map_err(|e| format!("malformed answer: {e}"))
}

async fn heartbeat(peers: Arc<Peers>, id: NodeId) {
    let mut backoff = PING_INTERVAL;
    let mut ticker = tokio::time::interval(PING_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !peers.stopped.load(Ordering::Relaxed) {
        ticker.tick().await;
        if !peers.state().get(&id).is_some_and(|p| p.heartbeat) {
            // No longer a member.
            return;
        }
        if peers.is_cut(id) {
            continue;
        }
        let ping = peers.ping_for(id);
        match peers.call(id, ping, DEAD_AFTER).await {
            Ok(PeerResponse::Pong { load, leads_held }) => {
                peers.saw(id, Some(load));
                if let Some(peer) = peers.state().get_mut(&id) {
                    peer.leads_acked = leads_held;
                }
                backoff = PING_INTERVAL;
            }
            Ok(PeerResponse::Removed) => {
                peers.set_evicted(&format!("node {} refused its ping", super::node_id_text(id)));
            }
            Ok(other) => tracing::warn!(peer = id, answer = ?other, "unexpected answer to a ping"),
            Err(e) => {
                tracing::debug!(peer = id, error = %e, "ping failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

async fn accept_loop(peers: Arc<Peers>) {
    let connections = Arc::new(Semaphore::new(PEER_CONNECTIONS_MAX));
    while let Some(incoming) = peers.endpoint.accept().await {
        let remote = incoming.remote_address();
        if peers.isolated.load(Ordering::Relaxed) {
            incoming.ignore();
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "refusing a peer connection: at the peer connection limit");
            incoming.refuse();
            continue;
        };
        let peers = peers.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => match protocol(&connection) {
                    Ok(version) => serve_connection(peers, connection, version).await,
                    Err(theirs) => refuse_version(connection, &theirs).await,
                },
                Err(e) if is_tls_failure(&e) => {
                    tracing::warn!(%remote, error = %e, "refused a peer connection: the TLS handshake failed (both sides' certificates must come from this cluster's CA)")
                }
                Err(e) => tracing::warn!(%remote, error = %e, "a peer connection failed before it was set up"),
            }
            drop(permit);
        });
    }
}

/// Whether a handshake failed in TLS, on either side (QUIC's crypto error codes carry a TLS
/// alert), not by a timeout or the other side going away.
fn is_tls_failure(e: &quinn::ConnectionError) -> bool {
    let crypto = |code: quinn::TransportErrorCode| u64::from(code) & !0xff == 0x100;
    match e {
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(close) => crypto(close.error_code),
        _ => false,
    }
}

/// Answers the first request of a peer whose protocol version this node does not speak with both
/// versions (the error frame is one every version reads), then closes the connection.
async fn refuse_version(connection: quinn::Connection, theirs: &[u8]) {
    let message = version_mismatch(theirs, &format!("the peer at {}", connection.remote_address()));
    tracing::warn!("{message}");
    if let Ok((send, mut recv)) = connection.accept_bi().await {
        let _ = tokio::time::timeout(READ_TIMEOUT, read_frame(&mut recv)).await;
        let refusal = PeerResponse::Error(error(ErrorCode::BadRequest, message));
        let _ = send_answer(send, &refusal, |e| PeerResponse::Error(error(ErrorCode::Internal, e))).await;
    }
    connection.close(4u32.into(), b"peer protocol version");
}

/// Serves the requests a peer sends on `connection`, which speaks peer protocol `protocol`.
async fn serve_connection(peers: Arc<Peers>, connection: quinn::Connection, protocol: u32) {
    let remote = connection.remote_address();
    while let Ok((send, recv)) = connection.accept_bi().await {
        if peers.isolated.load(Ordering::Relaxed) {
            connection.close(3u32.into(), b"isolated");
            return;
        }
        let peers = peers.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(peers, connection, protocol, send, recv).await {
                tracing::debug!(%remote, error = %e, "peer stream failed");
            }
        });
    }
}

async fn serve_stream(
    peers: Arc<Peers>,
    connection: quinn::Connection,
    protocol: u32,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let remote = connection.remote_address();
    let response = match tokio::time::timeout(READ_TIMEOUT, read_opening(&mut recv)).await {
        Err(_) => PeerResponse::Error(error(ErrorCode::BadRequest, "the peer request did not arrive in time")),
        Ok(Err(e)) => {
            tracing::warn!(%remote, error = %e, "bad peer frame");
            PeerResponse::Error(error(ErrorCode::BadRequest, e))
        }
        Ok(Ok(decoded)) => match decoded {
            Err(e) => {
                tracing::warn!(%remote, error = %e, "malformed peer frame");
                PeerResponse::Error(error(ErrorCode::BadRequest, e.to_string()))
            }
            Ok(frame) if peers.is_cut(frame.from) => {
                // Dropped, as a partition would: the peer sees its connection go.
                connection.close(3u32.into(), b"cut off");
                return Ok(());
            }
            Ok(frame) if frame.cluster_id != peers.cluster_id => {
                tracing::warn!(%remote, cluster = %frame.cluster_id, "refused a peer of another cluster");
                PeerResponse::Error(error(ErrorCode::BadRequest, "this node belongs to another cluster"))
            }
            Ok(frame) if peers.is_removed(frame.from) => {
                tracing::warn!(%remote, node = %super::node_id_text(frame.from), "refused a node removed from the cluster");
                PeerResponse::Removed
            }
            Ok(PeerFrame { from, request, .. }) if request.since() > protocol => {
                let message = format!(
                    "a {} (grex-peer/{}) on a connection that speaks grex-peer/{protocol}",
                    request.name(),
                    request.since()
                );
                tracing::warn!(%remote, node = %super::node_id_text(from), "refused {message}");
                PeerResponse::Error(error(ErrorCode::BadRequest, format!("this node refuses {message}")))
            }
            Ok(PeerFrame { from, request: PeerRequest::Hello { incarnation }, .. }) => {
                peers.register(from, connection.clone(), from, Greeting { incarnation, protocol, version: None });
                PeerResponse::Welcome { incarnation: peers.incarnation }
            }
            Ok(PeerFrame { from, request: PeerRequest::HelloWithVersion { incarnation, version }, .. }) => {
                let greeting = Greeting { incarnation, protocol, version: Some(version) };
                peers.register(from, connection.clone(), from, greeting);
                PeerResponse::WelcomeWithVersion { incarnation: peers.incarnation, version: GREX_VERSION.to_owned() }
            }
            Ok(PeerFrame {
                from,
                request: PeerRequest::Ping { load, snapshot_bytes_sent, leads_version, leads },
                ..
            }) => {
                peers.saw(from, Some(load));
                if let Some(peer) = peers.state().get_mut(&from) {
                    peer.snapshot_bytes_sent = snapshot_bytes_sent;
                }
                PeerResponse::Pong {
                    load: peers.load.load(Ordering::Relaxed),
                    leads_held: peers.heard(from, leads_version, leads),
                }
            }
            Ok(PeerFrame { from, request: PeerRequest::RaftLane, .. }) => {
                peers.saw(from, None);
                return serve_lane(&peers, &connection, from, &mut recv).await;
            }
            Ok(PeerFrame { from, request, .. }) => {
                peers.saw(from, None);
                (peers.handler)(from, request).await
            }
        },
    };
    send_answer(send, &response, |e| PeerResponse::Error(error(ErrorCode::Internal, e))).await
}

/// A stream's first frame, decoded if it is whole. A request's stream must end after it; a
/// consensus lane's goes on.
async fn read_opening(recv: &mut quinn::RecvStream) -> Result<Result<PeerFrame, FrameError>, String> {
    let frame = read_next_frame(recv).await?.ok_or("the stream ended before its frame")?;
    let decoded = decode_frame::<PeerFrame>(&frame);
    if !matches!(decoded, Ok(PeerFrame { request: PeerRequest::RaftLane, .. })) {
        read_end(recv, frame.len() - 4).await.map_err(|e| e.message)?;
    }
    Ok(decoded)
}

/// Hands the frames of a peer's consensus lane ([`PeerRequest::RaftLane`]) to the engine, in
/// order, until the peer finishes the stream. Traffic from a peer cut off (or removed) since
/// the lane opened is dropped as on any other stream.
async fn serve_lane(
    peers: &Peers,
    connection: &quinn::Connection,
    from: NodeId,
    recv: &mut quinn::RecvStream,
) -> anyhow::Result<()> {
    // One buffer for the lane's frames (up to `consensus::FRAME_BYTES` of entries each), kept
    // while they are large and freed once they are small again.
    let mut frame = Vec::new();
    while read_next_peer_frame(recv, &mut frame).await.map_err(anyhow::Error::msg)? {
        if peers.is_cut(from) {
            connection.close(3u32.into(), b"cut off");
            return Ok(());
        }
        if peers.is_removed(from) {
            anyhow::bail!("node {} was removed from the cluster", super::node_id_text(from));
        }
        let messages: Vec<RaftMessage> = decode_frame(&frame).context("a malformed consensus lane frame")?;
        if frame.len() < frame.capacity() / 4 {
            frame = Vec::new();
        }
        peers.saw(from, None);
        match (peers.handler)(from, PeerRequest::Raft { messages }).await {
            PeerResponse::Ack => {}
            answer => anyhow::bail!("consensus messages were not taken: {answer:?}"),
        }
    }
    Ok(())
}

/// This node's consensus messages to one peer. On a connection of protocol 12 or later they go
/// on one stream that stays open ([`PeerRequest::RaftLane`]), a frame per [`Lane::send`] with
/// no answer to wait for, so rounds follow each other without a round trip between them; on an
/// older connection each is a `Raft` request, answered `Ack`.
pub struct Lane {
    to: NodeId,
    open: Option<OpenLane>,
}

/// A lane's stream and the connection it is on.
struct OpenLane {
    connection: usize,
    send: quinn::SendStream,
    /// Kept so the peer's half is not stopped; nothing comes on it.
    _recv: quinn::RecvStream,
}

impl Lane {
    /// A lane to `to`, opened by its first send.
    pub fn new(to: NodeId) -> Lane {
        Lane { to, open: None }
    }

    /// Sends one round's messages, about `bytes` encoded ([`RaftMessage::encoded_bytes`]); done
    /// once they are in the connection's send buffer (or, on an older connection, once the peer
    /// answered). After an error the next send opens a new stream, dialing again if the
    /// connection is gone.
    pub async fn send(
        &mut self,
        peers: &Arc<Peers>,
        messages: Vec<RaftMessage>,
        bytes: usize,
        timeout: Duration,
    ) -> Result<(), PeerError> {
        let to = self.to;
        let (connection, protocol) = tokio::time::timeout(timeout, peers.connection(to))
            .await
            .map_err(|_| PeerError::Timeout(to, timeout))??;
        if protocol < PeerRequest::RaftLane.since() {
            self.open = None;
            return match peers.call(to, PeerRequest::Raft { messages }, timeout).await? {
                PeerResponse::Ack => Ok(()),
                answer => Err(PeerError::Protocol(format!("consensus messages were answered {answer:?}"))),
            };
        }
        let frame = encode_frame_sized(&messages, bytes).map_err(|e| PeerError::Protocol(e.to_string()))?;
        match tokio::time::timeout(timeout, self.write(peers, &connection, &frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.reset();
                Err(e)
            }
            Err(_) => {
                // Part of the frame may be in the stream: it cannot carry another.
                self.reset();
                Err(PeerError::Lost(to, format!("the peer took no consensus messages for {timeout:?}")))
            }
        }
    }

    async fn write(&mut self, peers: &Peers, connection: &quinn::Connection, frame: &[u8]) -> Result<(), PeerError> {
        let to = self.to;
        if self.open.as_ref().is_none_or(|open| open.connection != connection.stable_id()) {
            // The connection was replaced (a duplicate settled, the peer restarted): the old
            // lane ends, and the peer reads it to its end first.
            if let Some(mut old) = self.open.take() {
                let _ = old.send.finish();
            }
            let (mut send, recv) = connection.open_bi().await.map_err(|e| PeerError::Unreachable(to, e.to_string()))?;
            let opening =
                PeerFrame { cluster_id: peers.cluster_id.clone(), from: peers.me, request: PeerRequest::RaftLane };
            let opening = encode_frame(&opening).map_err(|e| PeerError::Protocol(e.to_string()))?;
            send.write_all(&opening).await.map_err(|e| PeerError::Lost(to, e.to_string()))?;
            self.open = Some(OpenLane { connection: connection.stable_id(), send, _recv: recv });
        }
        let open = self.open.as_mut().expect("opened above");
        open.send.write_all(frame).await.map_err(|e| PeerError::Lost(to, e.to_string()))
    }

    fn reset(&mut self) {
        if let Some(mut open) = self.open.take() {
            let _ = open.send.reset(0u32.into());
        }
    }
}

/// The peer protocol version the connection's handshake chose, or, when this node does not
/// speak it, the ALPN the handshake chose.
fn protocol(connection: &quinn::Connection) -> Result<u32, Vec<u8>> {
    let chosen = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .unwrap_or_default();
    spoken(&chosen).ok_or(chosen)
}

/// The TLS client settings a node dials its peers with, from the identity in `dir` (for tools
/// and tests that speak the peer protocol).
pub fn peer_client_config(dir: &Path) -> anyhow::Result<quinn::ClientConfig> {
    Ok(tls_configs(dir, peer_alpns())?.1)
}

/// As [`peer_client_config`], offering only `protocols` (a node of another version, for tests).
pub fn peer_client_config_offering(dir: &Path, protocols: &[&[u8]]) -> anyhow::Result<quinn::ClientConfig> {
    Ok(tls_configs(dir, protocols.iter().map(|p| p.to_vec()).collect())?.1)
}

/// Server and client TLS for peers: both present the node certificate and trust only the CA.
fn tls_configs(dir: &Path, offered: Vec<Vec<u8>>) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let NodeIdentity { chain, key, ca } = NodeIdentity::load(dir)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots.add(cert)?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = peer_alpns();
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server)?));
    server.transport_config(Arc::new(transport()?));

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = offered;
    let mut client = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client)?));
    client.transport_config(Arc::new(transport()?));
    Ok((server, client))
}

fn transport() -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(PEER_STREAMS_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(1)))
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?));
    Ok(transport)
}
