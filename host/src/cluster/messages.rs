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
use crate::node::{NodeChange, ScanPage, ScanSpec};
use crate::storage::GroupId;

/// The peer protocol's version (8: nodes can be drained and removed; 9: users; 10: nodes tell
/// each other which grex version they run; 11: nodes ask each other for their load; 12: scans).
pub const PEER_PROTOCOL: u32 = 12;
/// The oldest peer protocol this build still speaks: a node of the previous release and one of
/// this release work together, so a cluster is upgraded one node at a time (`docs/operations.md`).
pub const PEER_PROTOCOL_OLDEST: u32 = 11;
/// ALPN of the peer protocol: `grex-peer/` and [`PEER_PROTOCOL`].
pub const PEER_ALPN: &[u8] = b"grex-peer/12";

/// This build's grex version, as nodes tell each other from protocol 10 on.
pub const GREX_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The ALPN of peer protocol `version`.
pub fn alpn(version: u32) -> Vec<u8> {
    format!("grex-peer/{version}").into_bytes()
}

/// Every peer protocol version's ALPN, newest first. The TLS server picks the first of its own
/// list that the client offers, so two nodes settle on the highest version both know. A node
/// accepts a connection in any version, so that a peer too old or too new to work with hears
/// which versions differ instead of a bare handshake failure, and then refuses it (see `peer`).
pub fn peer_alpns() -> Vec<Vec<u8>> {
    (1..=PEER_PROTOCOL).rev().map(alpn).collect()
}

/// The protocol version a connection's ALPN names, when this build speaks it.
pub fn spoken(alpn: &[u8]) -> Option<u32> {
    let version: u32 = std::str::from_utf8(alpn).ok()?.strip_prefix("grex-peer/")?.parse().ok()?;
    (PEER_PROTOCOL_OLDEST..=PEER_PROTOCOL).contains(&version).then_some(version)
}

/// Why two nodes whose peer protocols are too far apart cannot work together, naming both.
pub fn version_mismatch(theirs: &[u8], who: &str) -> String {
    format!(
        "{who} speaks the peer protocol {} and this node grex-peer/{PEER_PROTOCOL_OLDEST} to \
         grex-peer/{PEER_PROTOCOL}: nodes work together only within one release of each other; \
         upgrade a cluster one release at a time, or run the same grex version on every node",
        String::from_utf8_lossy(theirs),
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
    // Protocol 10. A request added in a new protocol version goes at the end (bincode numbers
    // variants in order) and is sent only on connections of that version ([`PeerRequest::since`]).
    /// First request on a new connection of protocol 10 or later: `Hello`, with the sender's grex
    /// version (answered [`PeerResponse::WelcomeWithVersion`]).
    HelloWithVersion {
        /// As in `Hello`.
        incarnation: u64,
        /// The sender's grex version.
        version: String,
    },
    // Protocol 11.
    /// The answering node's load (answered [`PeerResponse::Stats`]).
    Stats,
    // Protocol 12.
    /// A page of a scan of a flock (answered [`PeerResponse::ScanPage`]): `open` starts it, on
    /// the flock's leader; later pages continue the session that started.
    ScanPage {
        /// The scan's id, chosen by the node the client asked.
        scan: u64,
        /// The flock.
        flock: u32,
        /// What to run, with the first page.
        open: Option<ScanSpec>,
    },
    /// Opens a consensus lane: the stream carries, after this frame, the sender's consensus
    /// messages for the receiver, a frame (a `Vec<RaftMessage>`) per round of its engine, in
    /// order and unanswered, until the sender finishes the stream. It replaces a `Raft` request
    /// per round (a stream opened, answered and waited for) on connections that speak it.
    RaftLane,
}

impl PeerRequest {
    /// The peer protocol version that brought this request: a node sends it only to a peer
    /// whose connection speaks that version or a later one.
    pub fn since(&self) -> u32 {
        match self {
            PeerRequest::HelloWithVersion { .. } => 10,
            PeerRequest::Stats => 11,
            PeerRequest::ScanPage { .. } | PeerRequest::RaftLane => 12,
            _ => 9,
        }
    }

    /// What the request is, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            PeerRequest::Hello { .. } => "hello",
            PeerRequest::Ping { .. } => "ping",
            PeerRequest::Raft { .. } => "consensus messages",
            PeerRequest::SnapshotChunk { .. } => "snapshot chunk",
            PeerRequest::Job { .. } => "job",
            PeerRequest::Hail { .. } => "hail",
            PeerRequest::PutModule { .. } => "module upload",
            PeerRequest::DeleteModule { .. } => "module deletion",
            PeerRequest::ChangeNode { .. } => "member change",
            PeerRequest::ChangeUser(_) => "user change",
            PeerRequest::HelloWithVersion { .. } => "hello with version",
            PeerRequest::Stats => "load",
            PeerRequest::ScanPage { .. } => "scan page",
            PeerRequest::RaftLane => "consensus lane",
        }
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
    // Protocol 10: answers only to requests of protocol 10.
    /// `HelloWithVersion` accepted: `Welcome`, with the answering node's grex version.
    WelcomeWithVersion {
        /// The answering node's incarnation.
        incarnation: u64,
        /// Its grex version.
        version: String,
    },
    // Protocol 11.
    /// The answering node's load: a [`grex_client::NodeStats`] as JSON, so that either side may
    /// add fields without a new protocol version.
    Stats {
        /// The JSON.
        json: Vec<u8>,
    },
    // Protocol 12.
    /// A page of a flock's scan.
    ScanPage(Result<ScanPage, RemoteError>),
}

#[cfg(test)]
mod tests {
    use grex_client::proto::{decode_frame, encode_frame};

    use super::*;

    #[test]
    fn this_version_is_offered_first_and_a_mismatch_names_both_versions() {
        let alpns = peer_alpns();
        assert_eq!(alpns[0], PEER_ALPN);
        assert_eq!(alpns.len(), PEER_PROTOCOL as usize);
        let message = version_mismatch(b"grex-peer/8", "peer 127.0.0.1:7072");
        assert!(message.contains("grex-peer/8") && message.contains("grex-peer/11 to grex-peer/12"), "{message}");
    }

    /// One frame of every request and answer that protocol 9 has, as this build encodes them.
    fn protocol_9_frames() -> Vec<(&'static str, Vec<u8>)> {
        use grex_client::proto::{ErrorCode, Permissions};

        use super::super::wire::{AppliedPoint, WireConf, WireEntry};
        use crate::access::{UserChange, UserRecord};

        let frame = |request| encode_frame(&PeerFrame { cluster_id: "c1".into(), from: 7, request }).unwrap();
        let info = PeerInfo {
            peer: "127.0.0.1:1".into(),
            http: "http://h".into(),
            quic: "quic://q".into(),
            resp: "r:2".into(),
            zone: "z".into(),
            capacity: 3,
        };
        let raft = RaftMessage {
            group: 4,
            kind: 3,
            to: 2,
            from: 7,
            term: 5,
            log_term: 4,
            index: 9,
            entries: vec![WireEntry { kind: 0, term: 5, index: 10, data: bytes::Bytes::from(vec![1, 2]) }],
            commit: 8,
            commit_term: 4,
            snapshot: Some(AppliedPoint {
                index: 6,
                term: 3,
                conf: WireConf { voters: vec![1, 2], learners: vec![3], auto_leave: true, ..WireConf::default() },
            }),
            request_snapshot: 0,
            reject: true,
            reject_hint: 2,
            context: serde_bytes::ByteBuf::from(vec![9]),
            priority: -1,
        };
        let answer = |response: PeerResponse| encode_frame(&response).unwrap();
        let lead = Lead { flock: 1, term: 2, settled: true, map_version: 3 };
        let failure = RemoteError { code: ErrorCode::ModuleNotFound, message: "gone".into() };
        vec![
            ("Hello", frame(PeerRequest::Hello { incarnation: 11 })),
            (
                "Ping",
                frame(PeerRequest::Ping { load: 1, snapshot_bytes_sent: 2, leads_version: 3, leads: Some(vec![lead]) }),
            ),
            ("Raft", frame(PeerRequest::Raft { messages: vec![raft.clone()] })),
            (
                "SnapshotChunk",
                frame(PeerRequest::SnapshotChunk { group: 1, offset: 2, data: vec![3], message: Some(raft) }),
            ),
            (
                "Job",
                frame(PeerRequest::Job {
                    bucket: b"b".to_vec(),
                    module: "m".into(),
                    input: vec![1],
                    read_only: true,
                    relay: false,
                }),
            ),
            ("Hail", frame(PeerRequest::Hail { id: 8, info: info.clone() })),
            ("PutModule", frame(PeerRequest::PutModule { name: "m".into(), wasm: vec![0, 97] })),
            ("DeleteModule", frame(PeerRequest::DeleteModule { name: "m".into() })),
            ("ChangeNode", frame(PeerRequest::ChangeNode { id: 8, change: NodeChange::Remove })),
            (
                "ChangeUser",
                frame(PeerRequest::ChangeUser(UserChange::Add {
                    name: "u".into(),
                    record: UserRecord {
                        token_sha256: [5; 32],
                        permissions: Permissions { admin: false, read: true, write: false, run: vec!["m".into()] },
                    },
                })),
            ),
            ("Welcome", answer(PeerResponse::Welcome { incarnation: 12 })),
            ("Pong", answer(PeerResponse::Pong { load: 1, leads_held: 2 })),
            ("Ack", answer(PeerResponse::Ack)),
            (
                "Job answer",
                answer(PeerResponse::Job(Ok(JobOutput {
                    output: vec![1],
                    bucket_version: 2,
                    flock: 3,
                    node: "n".into(),
                }))),
            ),
            ("NotLeader", answer(PeerResponse::NotLeader { leader: Some(2) })),
            ("Joined", answer(PeerResponse::Joined { members: vec![(8, info)] })),
            (
                "Module",
                answer(PeerResponse::Module(Ok(ModuleInfo { name: "m".into(), id: "sha256:0".into(), size: 2 }))),
            ),
            ("Error", answer(PeerResponse::Error(failure))),
            ("Removed", answer(PeerResponse::Removed)),
        ]
    }

    /// Protocol 9's frames as the release that spoke it last (grex 0.1.0) encoded them: this
    /// build must read and write them byte for byte, or a node of that release cannot follow it.
    const PROTOCOL_9_FRAMES: &[(&str, &str)] = &[
        ("Hello", "000000070102633107000b"),
        ("Ping", "0000000f010263310701010203010101020103"),
        ("Raft", "0000002801026331070201040602070504090100050a02010208040106030201020103000001000102010901"),
        (
            "SnapshotChunk",
            "0000002c0102633107030102010301040602070504090100050a02010208040106030201020103000001000102010901",
        ),
        ("Job", "0000000e0102633107040162016d01010100"),
        ("Hail", "0000002c010263310705080b3132372e302e302e313a3108687474703a2f2f6808717569633a2f2f7103723a32017a03"),
        ("PutModule", "0000000b010263310706016d020061"),
        ("DeleteModule", "00000008010263310707016d"),
        ("ChangeNode", "000000080102633107080801"),
        (
            "ChangeUser",
            "0000002f010263310709000175050505050505050505050505050505050505050505050505050505050505050500010001016d",
        ),
        ("Welcome", "0000000301000c"),
        ("Pong", "0000000401010102"),
        ("Ack", "000000020102"),
        ("Job answer", "0000000901030001010203016e"),
        ("NotLeader", "0000000401040102"),
        ("Joined", "00000029010501080b3132372e302e302e313a3108687474703a2f2f6808717569633a2f2f7103723a32017a03"),
        ("Module", "0000000f010600016d087368613235363a3002"),
        ("Error", "0000000801070504676f6e65"),
        ("Removed", "000000020108"),
    ];

    #[test]
    fn frames_of_protocol_9_are_written_and_read_as_its_release_did() {
        let frames = protocol_9_frames();
        assert_eq!(frames.len(), PROTOCOL_9_FRAMES.len());
        for ((name, bytes), (fixture_name, fixture)) in frames.iter().zip(PROTOCOL_9_FRAMES) {
            assert_eq!(name, fixture_name);
            assert_eq!(&hex::encode(bytes), fixture, "{name} is no longer encoded as protocol 9 encoded it");
        }
        for (name, fixture) in &PROTOCOL_9_FRAMES[..10] {
            let frame: PeerFrame = decode_frame(&hex::decode(fixture).unwrap()).unwrap();
            assert_eq!(frame.request.since(), 9, "{name}");
        }
        for (name, fixture) in &PROTOCOL_9_FRAMES[10..] {
            decode_frame::<PeerResponse>(&hex::decode(fixture).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn nodes_settle_on_the_highest_version_both_speak_and_refuse_older_ones() {
        assert_eq!(spoken(PEER_ALPN), Some(PEER_PROTOCOL));
        assert_eq!(spoken(&alpn(PEER_PROTOCOL - 1)), Some(PEER_PROTOCOL - 1));
        assert_eq!(spoken(&alpn(PEER_PROTOCOL_OLDEST - 1)), None);
        assert_eq!(spoken(&alpn(PEER_PROTOCOL + 1)), None);
        assert_eq!(spoken(b"grex-peer/x"), None);
        let hello = PeerRequest::HelloWithVersion { incarnation: 1, version: GREX_VERSION.into() };
        assert_eq!(hello.since(), 10);
        assert_eq!(PeerRequest::Stats.since(), 11);
        assert_eq!(PeerRequest::ScanPage { scan: 1, flock: 0, open: None }.since(), 12);
    }
}
