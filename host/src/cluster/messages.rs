//! What nodes say to each other. Every peer request is one [`PeerFrame`] on its own QUIC stream
//! and gets one [`PeerResponse`]; both travel in the same length-prefixed, versioned bincode
//! frames as client traffic (`grex_client::proto::encode_frame`), with the same size limit.
//! Each subsystem owns a variant: consensus traffic (one frame per peer per round), job forwarding,
//! membership, liveness.

use std::fmt;

use grex_client::proto::{JobOutput, ModuleInfo, RemoteError};
use serde::{Deserialize, Serialize};

use super::engine::NodeId;
use super::placement::Site;
use super::wire::RaftMessage;
use crate::node::NodeChange;
use crate::storage::GroupId;

/// The peer protocol's version (8: nodes can be drained and removed; 9: users).
pub const PEER_PROTOCOL: u32 = 9;
/// ALPN of the peer protocol: `grex-peer/` and [`PEER_PROTOCOL`].
pub const PEER_ALPN: &[u8] = b"grex-peer/9";

/// Every peer protocol version's ALPN, this one first: a node accepts a connection in any of them,
/// so that a peer of another version hears which versions differ instead of a bare handshake
/// failure, and then refuses it (see `peer`).
pub fn peer_alpns() -> Vec<Vec<u8>> {
    (1..=PEER_PROTOCOL).rev().map(|v| format!("grex-peer/{v}").into_bytes()).collect()
}

/// Why two nodes of different peer protocol versions cannot work together, naming both.
pub fn version_mismatch(theirs: &[u8], who: &str) -> String {
    format!(
        "{who} speaks the peer protocol {} and this node {}: nodes of different grex versions cannot \
         work together; run the same grex version on every node",
        String::from_utf8_lossy(theirs),
        String::from_utf8_lossy(PEER_ALPN)
    )
}

/// Where a node answers, and where it stands for placement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Peer (QUIC, mutual TLS) address, `HOST:PORT`.
    pub peer: String,
    /// HTTP URL for clients.
    pub http: String,
    /// QUIC URL for clients.
    pub quic: String,
    /// Redis protocol address, `HOST:PORT` (empty when the node serves none).
    pub resp: String,
    /// Its zone (`--zone`): copies of a flock spread over zones first.
    pub zone: String,
    /// Its capacity (`--capacity`): its share of the flocks' copies is proportional to it.
    pub capacity: u32,
}

impl Default for PeerInfo {
    fn default() -> Self {
        PeerInfo {
            peer: String::new(),
            http: String::new(),
            quic: String::new(),
            resp: String::new(),
            zone: String::new(),
            capacity: 1,
        }
    }
}

impl PeerInfo {
    /// Where the node stands for placement.
    pub fn site(&self) -> Site {
        Site { zone: self.zone.clone(), capacity: self.capacity.max(1) }
    }
}

impl fmt::Display for PeerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} http={} quic={} resp={}", self.peer, self.http, self.quic, self.resp)?;
        write!(f, " zone={:?} capacity={}", self.zone, self.capacity)
    }
}

/// A flock its sender leads (told to every peer with pings, so that nodes that do not herd the
/// flock know where to send its jobs and canaries).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lead {
    /// Which flock.
    pub flock: u32,
    /// The term it leads in: of two claims, the later term wins.
    pub term: u64,
    /// The flock's voters are the herders the flock map names.
    pub settled: bool,
    /// The version of the flock map the sender judged `settled` against.
    pub map_version: u64,
}

/// One request and who sends it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerFrame {
    /// The cluster the sender belongs to.
    pub cluster_id: String,
    /// The sender.
    pub from: NodeId,
    /// The request.
    pub request: PeerRequest,
}

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// First request on a new connection: which process of the dialing node this is.
    Hello {
        /// Drawn at random when the dialer's process started: a new one means the peer restarted,
        /// so any older connection to it is dead, whoever dialed it.
        incarnation: u64,
    },
    /// Liveness, once per interval per node pair, with the sender's load and the flocks it leads.
    Ping {
        /// Jobs the sender is running or has queued.
        load: u64,
        /// Bytes of snapshots the sender has sent to its peers since it started (a drain's
        /// progress).
        snapshot_bytes_sent: u64,
        /// Goes up each time the sender's list of led flocks changes.
        leads_version: u64,
        /// The flocks the sender leads, when the receiver has not confirmed `leads_version` yet.
        leads: Option<Vec<Lead>>,
    },
    /// Consensus messages of every group, from one round of the sender's engine (answered
    /// with [`PeerResponse::Ack`] once handed to this node's engine; the answers travel as
    /// messages of their own).
    Raft {
        /// The messages, in order.
        messages: Vec<RaftMessage>,
    },
    /// A chunk of a group's snapshot; the last one carries the snapshot message.
    SnapshotChunk {
        /// The group.
        group: GroupId,
        /// Where the chunk starts in the snapshot's data (0 starts a new snapshot).
        offset: u64,
        /// The chunk.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// With the last chunk: the message that installs it.
        message: Option<RaftMessage>,
    },
    /// Run a job here (the sender found that this node leads the bucket's flock, or, with `relay`,
    /// that this node can reach the leader when the sender cannot).
    Job {
        /// Bucket key.
        bucket: Vec<u8>,
        /// Module name or id.
        module: String,
        /// Job input.
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
        /// Read-only job.
        read_only: bool,
        /// The sender cannot reach the flock's leader: a node that does not run the job passes it
        /// on to the leader it knows, if it reaches it (once: a passed-on job is not relayed again).
        relay: bool,
    },
    /// A node asks to join the cluster, or a member that restarted with other addresses asks to
    /// have them recorded. A node that is not the meta leader passes it on unchanged.
    Hail {
        /// The node that asks (not the sender when the hail is passed on).
        id: NodeId,
        /// Its addresses.
        info: PeerInfo,
    },
    /// Store a module cluster-wide (sent to the meta group's leader).
    PutModule {
        /// Name.
        name: String,
        /// Bytes as uploaded.
        #[serde(with = "serde_bytes")]
        wasm: Vec<u8>,
    },
    /// Delete a module name cluster-wide (sent to the meta group's leader).
    DeleteModule {
        /// Name.
        name: String,
    },
    /// Drain or remove a member (sent to the meta group's leader; answered `Ack` once recorded).
    ChangeNode {
        /// The member.
        id: NodeId,
        /// What becomes of it.
        change: NodeChange,
    },
    /// Add, change or delete a user (sent to the meta group's leader; answered `Ack` once
    /// recorded).
    ChangeUser(crate::access::UserChange),
}

/// The answer to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Hello accepted, with the answering process's incarnation (as in `Hello`).
    Welcome {
        /// The answering node's incarnation.
        incarnation: u64,
    },
    /// Ping answered, with the answering node's load.
    Pong {
        /// Jobs running or queued.
        load: u64,
        /// The version of the pinging node's led flocks that the answering node holds (0: none).
        leads_held: u64,
    },
    /// Taken (consensus messages, snapshot chunks).
    Ack,
    /// The job's result.
    Job(Result<JobOutput, RemoteError>),
    /// This node does not lead the flock; `leader` is its best guess of who does.
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// Joined: the cluster's members.
    Joined {
        /// Every member and its addresses.
        members: Vec<(NodeId, PeerInfo)>,
    },
    /// Module stored.
    Module(Result<ModuleInfo, RemoteError>),
    /// The request failed.
    Error(RemoteError),
    /// The sender was removed from the cluster: nothing it asks is answered any more.
    Removed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_version_is_offered_first_and_a_mismatch_names_both_versions() {
        let alpns = peer_alpns();
        assert_eq!(alpns[0], PEER_ALPN);
        assert_eq!(alpns.len(), PEER_PROTOCOL as usize);
        let message = version_mismatch(b"grex-peer/8", "peer 127.0.0.1:7072");
        assert!(message.contains("grex-peer/8") && message.contains("grex-peer/9"), "{message}");
    }
}
