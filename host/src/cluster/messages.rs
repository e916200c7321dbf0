//! What nodes say to each other. Every peer request is one [`PeerFrame`] on its own QUIC stream
//! and gets one [`PeerResponse`]; both travel in the same length-prefixed, versioned bincode
//! frames as client traffic (`grex_client::proto::encode_frame`), with the same size limit.
//! Each subsystem owns a variant: raft traffic (alone or batched per peer), job forwarding,
//! membership, liveness.

use grex_client::proto::{JobOutput, ModuleInfo, RemoteError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::outbox::BatchItem;
use super::raft::{NodeId, PeerInfo, TypeConfig};
use crate::storage::GroupId;

/// ALPN of the peer protocol.
pub const PEER_ALPN: &[u8] = b"grex-peer/6";

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
    /// First request on a new connection: who is dialing and where it listens.
    Hello {
        /// The dialer's addresses.
        info: PeerInfo,
        /// Drawn at random when the dialer's process started: a new one means the peer restarted,
        /// so any older connection to it is dead, whoever dialed it.
        incarnation: u64,
    },
    /// Liveness, once per interval per node pair, with the sender's load and the flocks it leads.
    Ping {
        /// Jobs the sender is running or has queued.
        load: u64,
        /// Goes up each time the sender's list of led flocks changes.
        leads_version: u64,
        /// The flocks the sender leads, when the receiver has not confirmed `leads_version` yet.
        leads: Option<Vec<Lead>>,
    },
    /// A message of one flock's (or the meta group's) consensus.
    Raft {
        /// Which group.
        group: GroupId,
        /// The message.
        rpc: RaftRpc,
    },
    /// Consensus messages of several groups, answered together in order (`outbox`).
    RaftBatch {
        /// Each message's group and its encoded [`RaftRpc`].
        items: Vec<BatchItem>,
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
}

/// A consensus message.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Log replication (and the leader's commit point).
    Append(AppendEntriesRequest<TypeConfig>),
    /// A candidate asks for a vote.
    Vote(VoteRequest<NodeId>),
    /// A chunk of a snapshot.
    Snapshot(#[serde(with = "snapshot_chunk")] InstallSnapshotRequest<TypeConfig>),
}

/// A snapshot chunk with its data as one byte string, not a sequence of numbers: the same bytes
/// on the wire, encoded and decoded as one copy instead of one call per byte.
mod snapshot_chunk {
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{SnapshotMeta, Vote};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::cluster::raft::{NodeId, PeerInfo, TypeConfig};

    #[derive(Serialize)]
    struct Out<'a> {
        vote: &'a Vote<NodeId>,
        meta: &'a SnapshotMeta<NodeId, PeerInfo>,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
        done: bool,
    }

    #[derive(Deserialize)]
    struct In {
        vote: Vote<NodeId>,
        meta: SnapshotMeta<NodeId, PeerInfo>,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        done: bool,
    }

    pub fn serialize<S: Serializer>(c: &InstallSnapshotRequest<TypeConfig>, s: S) -> Result<S::Ok, S::Error> {
        Out { vote: &c.vote, meta: &c.meta, offset: c.offset, data: &c.data, done: c.done }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<InstallSnapshotRequest<TypeConfig>, D::Error> {
        let In { vote, meta, offset, data, done } = In::deserialize(d)?;
        Ok(InstallSnapshotRequest { vote, meta, offset, data, done })
    }
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
    /// Answer to a log replication.
    Append(AppendEntriesResponse<NodeId>),
    /// Answer to a vote request.
    Vote(VoteResponse<NodeId>),
    /// Answer to a snapshot chunk.
    Snapshot(InstallSnapshotResponse<NodeId>),
    /// Answers to a [`PeerRequest::RaftBatch`], one per message, in order.
    RaftBatch(Vec<PeerResponse>),
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
}
