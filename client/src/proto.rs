//! The wire contract shared by node and clients: requests, responses, error codes, the frame codec
//! and the bucket → flock hash. `docs/wire.md` describes the bytes.
//!
//! A frame is a 4-byte big-endian length of what follows, one version byte ([`WIRE_VERSION`]),
//! then the message encoded with serde + bincode 2 (standard configuration). Frames larger than
//! [`FRAME_BYTES_MAX`] are refused before they are read into memory.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;

mod scan;
pub use scan::{FlockScanned, ScanEvent, ScanItem, ScanRequest, ScanSummary, encode_fold, text_or_hex};

/// The version byte every frame carries; a peer that reads another version refuses the frame.
pub const WIRE_VERSION: u8 = 1;
/// The largest frame either side accepts (a module upload is the largest message).
pub const FRAME_BYTES_MAX: usize = 48 << 20;
/// ALPN protocol of the client API over QUIC.
pub const ALPN: &[u8] = b"grex/1";
/// The QUIC ALPN of `grex/1` with session streams ([`Request::Session`]): nodes offer it first,
/// so a client that offers it too learns from the handshake whether the node has sessions.
pub const ALPN_SESSIONS: &[u8] = b"grex/2";
/// The longest bucket key.
pub const BUCKET_KEY_BYTES_MAX: usize = 512;
/// The longest item key.
pub const ITEM_KEY_BYTES_MAX: usize = 1024;

/// Hash slots, as in Redis Cluster: every key maps to one of them.
pub const SLOTS: u32 = 16384;
/// The most flocks a cluster can have: one per hash slot.
pub const FLOCKS_MAX: u32 = SLOTS;

/// The Redis Cluster hash slot of a key: CRC16 (XMODEM) mod 16384 of its hash tag (the bytes
/// between its first `{` and the next `}`, when there are any) or else of the whole key. Keys with
/// the same tag (`{customer-7}.orders`, `{customer-7}.cart`) share a slot, and so a flock.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let tag = &key[open + 1..];
        tag.iter().position(|&b| b == b'}').filter(|&len| len > 0).map(|len| &tag[..len])
    });
    (crc16(tagged.unwrap_or(key)) as u32 % SLOTS) as u16
}

const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum Redis Cluster slots use.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ b)])
}

/// The flock a bucket belongs to. Flock `f` of `F` holds the contiguous hash slots
/// `f·16384/F ..= (f+1)·16384/F − 1` ([`flock_slots`]), so a Redis Cluster client's slot map
/// routes a key to its flock's leader. `flock_count` is a power of two up to [`FLOCKS_MAX`].
pub fn flock_of(bucket: &[u8], flock_count: u32) -> u32 {
    debug_assert!(flock_count.is_power_of_two() && flock_count <= FLOCKS_MAX);
    u32::from(key_slot(bucket)) / (SLOTS / flock_count)
}

/// The first and last hash slot of a flock.
pub fn flock_slots(flock: u32, flock_count: u32) -> (u16, u16) {
    let width = SLOTS / flock_count;
    ((flock * width) as u16, (flock * width + width - 1) as u16)
}

/// Checks a flock count: a power of two from 1 to [`FLOCKS_MAX`].
pub fn check_flock_count(flock_count: u32) -> Result<(), String> {
    if flock_count.is_power_of_two() && flock_count <= FLOCKS_MAX {
        Ok(())
    } else {
        Err(format!("the flock count must be a power of two from 1 to {FLOCKS_MAX} (such as 256), not {flock_count}"))
    }
}

/// Checks a bucket key: 1 to 512 bytes.
pub fn check_bucket_key(bucket: &[u8]) -> Result<(), RemoteError> {
    if bucket.is_empty() {
        return Err(RemoteError::new(ErrorCode::InvalidBucketKey, "the bucket key is empty; give 1 to 512 bytes"));
    }
    if bucket.len() > BUCKET_KEY_BYTES_MAX {
        return Err(RemoteError::new(
            ErrorCode::InvalidBucketKey,
            format!("the bucket key is {} bytes; the limit is {BUCKET_KEY_BYTES_MAX}", bucket.len()),
        ));
    }
    Ok(())
}

/// Checks an item key: 1 to 1024 bytes of UTF-8 (UTF-8 is guaranteed by `&str`).
pub fn check_item_key(item: &str) -> Result<(), RemoteError> {
    if item.is_empty() || item.len() > ITEM_KEY_BYTES_MAX {
        return Err(RemoteError::new(
            ErrorCode::InvalidItemKey,
            format!("item key of {} bytes; item keys are 1 to {ITEM_KEY_BYTES_MAX} bytes of UTF-8", item.len()),
        ));
    }
    Ok(())
}

/// A request to a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Store a module and point `name` at it.
    PutModule {
        /// The alias.
        name: String,
        /// A wasm component, or a core module built with the guest SDK.
        #[serde(with = "serde_bytes")]
        wasm: Vec<u8>,
    },
    /// Run a job.
    RunJob {
        /// Bucket key.
        bucket: Vec<u8>,
        /// Module name or `sha256:HEX` id.
        module: String,
        /// Input bytes for the job.
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
        /// Run without committing writes (a read-only job may not write).
        read_only: bool,
    },
    /// Read one item.
    GetItem {
        /// Bucket key.
        bucket: Vec<u8>,
        /// Item key.
        item: String,
    },
    /// List item keys.
    ListItems {
        /// Bucket key.
        bucket: Vec<u8>,
        /// Only keys with this prefix.
        prefix: String,
        /// Only keys strictly after this one.
        start_after: Option<String>,
        /// At most this many (capped at 1000).
        limit: u32,
    },
    /// Which node is best for a bucket.
    Canary {
        /// Bucket key.
        bucket: Vec<u8>,
    },
    /// The node's status.
    Status,
    /// Every module name and the id it points at.
    ListModules,
    /// The flock map: each flock's herders and leader.
    Flocks,
    /// The cluster's nodes: their state, liveness and the flocks they herd.
    Nodes,
    /// Delete a module name (the module goes too once no name points to it); answered with
    /// what the name pointed to.
    DeleteModule {
        /// The name.
        name: String,
    },
    /// Start draining a node: its flocks move to the other nodes, then it leaves the cluster.
    DrainNode {
        /// The node's id (16 hex digits, as `Nodes` lists it).
        node: String,
    },
    /// Remove a dead node at once: its flocks are copied again from the surviving herders, and
    /// the node is refused if it comes back.
    RemoveNode {
        /// The node's id.
        node: String,
    },
    /// Sign this connection in as the user the token belongs to; answered with the user. Over
    /// QUIC it holds for the connection's later requests; over HTTP every request carries the
    /// token (`Authorization: Bearer TOKEN`) and this only checks it.
    Authenticate {
        /// The user's token, as `AddUser` answered it.
        token: String,
    },
    /// The users and their permissions (admin only).
    Users,
    /// Add a user; answered with its token, which the cluster keeps only as a hash (admin only;
    /// the first user, who must be an admin, may be added by any client on a node's loopback).
    AddUser {
        /// The user's name.
        name: String,
        /// What it may do.
        permissions: Permissions,
    },
    /// Replace a user's permissions; its token stays (admin only).
    SetUser {
        /// The user's name.
        name: String,
        /// What it may do from now on.
        permissions: Permissions,
    },
    /// Delete a user: its token stops working on every node (admin only).
    DeleteUser {
        /// The user's name.
        name: String,
    },
    /// The slowest and the failed recent jobs of the node asked.
    RecentJobs,
    /// Every member's load, each asked by the node that answers (`grex top`, the dashboard).
    ClusterStats,
    /// Run a read-only job on every bucket (with the prefix): answered with a stream of
    /// [`Response::Scan`] frames that ends with `done` or `failed`.
    Scan(ScanRequest),
    /// Over QUIC with ALPN [`ALPN_SESSIONS`] only, as a stream's first frame: the stream is a
    /// session from here on, carrying many requests, each a [`Tagged`] frame, answered in any
    /// order by [`Tagged`] answers with the same ids (`docs/wire.md`).
    Session,
}

/// A request or answer on a session stream ([`Request::Session`]): `id` is the client's (unique
/// among its requests in flight on the stream) and comes back on the answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tagged<T> {
    /// Which request this is, or answers.
    pub id: u64,
    /// The request or its answer.
    pub message: T,
}

/// One job as a node remembers it among its slowest or failed recent jobs: never its bucket key,
/// a hash of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Its module (the name it was run by).
    pub module: String,
    /// The XXH3-64 of its bucket key, hex.
    pub bucket_hash: String,
    /// Its bucket's flock.
    pub flock: u32,
    /// Microseconds waiting for its executor.
    pub queue_us: u64,
    /// Microseconds running (sandbox, with its bucket's load).
    pub run_us: u64,
    /// Microseconds waiting for its commit (or its read's confirmation).
    pub commit_us: u64,
    /// Microseconds from its arrival to its answer.
    pub total_us: u64,
    /// Its error, if it failed.
    pub error: Option<ErrorCode>,
}

/// A node's slowest recent jobs (of the last one to two minutes, slowest first) and its last
/// failed jobs (newest first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentJobs {
    /// The node's id.
    pub node: String,
    /// The slowest recent jobs.
    pub slowest: Vec<JobRecord>,
    /// The last failed jobs.
    pub failed: Vec<JobRecord>,
}

/// Upper bounds, in seconds, of the buckets of [`NodeStats::latency`]: 50 µs doubling to about
/// 1.6 s; a last bucket past them counts the slower jobs.
pub const LATENCY_BOUNDS_S: [f64; 16] = {
    let mut bounds = [0.000_05; 16];
    let mut i = 1;
    while i < bounds.len() {
        bounds[i] = bounds[i - 1] * 2.0;
        i += 1;
    }
    bounds
};

/// One node's load, as it reports it: what `grex top` and the dashboard show of it.
///
/// It travels between nodes as JSON, so that either side may add fields (with `serde(default)`)
/// without a new peer protocol version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Its status (counters since it started).
    pub status: Status,
    /// Its jobs' end-to-end latency since it started: `latency[i]` jobs took at most
    /// `LATENCY_BOUNDS_S[i]` and more than the bound before; the last entry counts the jobs
    /// slower than every bound. Two readings' difference gives the quantiles of the jobs between
    /// them ([`latency_quantile`]).
    #[serde(default)]
    pub latency: Vec<u64>,
    /// The flocks it leads, with how far behind their slowest herder is.
    #[serde(default)]
    pub leads: Vec<FlockLag>,
    /// Entries it knows to be committed and has not applied yet, over all its groups.
    #[serde(default)]
    pub apply_lag: u64,
    /// Its last failed jobs, newest first (at most a few).
    #[serde(default)]
    pub failed: Vec<JobRecord>,
}

/// A flock as its leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockLag {
    /// The flock.
    pub flock: u32,
    /// Entries of its log that its slowest voting herder has not acknowledged.
    pub lag: u64,
}

/// A member as the answering node reached it for its load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStats {
    /// Its id.
    pub id: String,
    /// Its HTTP URL.
    pub http: String,
    /// The answering node hears from it (its failure detector).
    pub alive: bool,
    /// Its load, if it answered.
    pub stats: Option<NodeStats>,
    /// Why there is no load: it did not answer in time, or runs a release that cannot say.
    pub error: Option<String>,
}

/// Every member's load, as one node gathered it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    /// The node that gathered it.
    pub node: String,
    /// When, in milliseconds since the Unix epoch (by the gathering node's clock).
    pub at_ms: u64,
    /// Every member (just the node itself outside a cluster).
    pub members: Vec<MemberStats>,
}

/// The latency under which a fraction `q` (0 to 1) of the jobs counted by `latency` fell, from
/// two readings of [`NodeStats::latency`] (`before` may be empty: since the start), interpolated
/// within a bucket as Prometheus's `histogram_quantile` does. `None` when no job fell between.
pub fn latency_quantile(before: &[u64], after: &[u64], q: f64) -> Option<f64> {
    let counts: Vec<u64> =
        after.iter().enumerate().map(|(i, n)| n.saturating_sub(before.get(i).copied().unwrap_or(0))).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let Some(&upper) = LATENCY_BOUNDS_S.get(i) else {
                // Slower than every bound: the last bound is all that is known.
                return Some(LATENCY_BOUNDS_S[LATENCY_BOUNDS_S.len() - 1]);
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS_S[i - 1] };
            let within = (rank - seen as f64) / n as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += n;
    }
    Some(LATENCY_BOUNDS_S[LATENCY_BOUNDS_S.len() - 1])
}

/// A node's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A module was stored.
    Module(ModuleInfo),
    /// A job ran.
    Job(JobOutput),
    /// An item's value.
    Item(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Item keys.
    Items(Vec<String>),
    /// The best node for a bucket.
    Canary(Canary),
    /// Node status.
    Status(Status),
    /// The request failed.
    Error(RemoteError),
    /// Module names, ids and sizes.
    Modules(Vec<ModuleInfo>),
    /// The flock map.
    Flocks(FlockMapInfo),
    /// The cluster's nodes.
    Nodes(NodesInfo),
    /// A user (who signed in; who was changed or deleted).
    User(UserInfo),
    /// Every user.
    Users(Vec<UserInfo>),
    /// A user was added: its token, shown this once.
    NewUser(NewUser),
    /// A node's slowest and failed recent jobs.
    RecentJobs(RecentJobs),
    /// Every member's load.
    ClusterStats(ClusterStats),
    /// Part of a scan's answer.
    Scan(ScanEvent),
}

impl Response {
    /// The variant's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Module(_) => "module",
            Response::Job(_) => "job",
            Response::Item(_) => "item",
            Response::Items(_) => "items",
            Response::Canary(_) => "canary",
            Response::Status(_) => "status",
            Response::Error(_) => "error",
            Response::Modules(_) => "modules",
            Response::Flocks(_) => "flocks",
            Response::Nodes(_) => "nodes",
            Response::User(_) => "user",
            Response::Users(_) => "users",
            Response::NewUser(_) => "new user",
            Response::RecentJobs(_) => "recent jobs",
            Response::ClusterStats(_) => "cluster stats",
            Response::Scan(_) => "scan",
        }
    }
}

/// What a user may do. An admin may do everything; a user with no permission at all may still
/// see the cluster (status, flock map, members, module names, canaries).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// Modules, users and the cluster's members: upload and delete modules, add and remove
    /// users, drain and remove nodes.
    #[serde(default)]
    pub admin: bool,
    /// Read items (`GET` items over HTTP, `GetItem`/`ListItems`, Redis `HGET`, `HGETALL`...).
    #[serde(default)]
    pub read: bool,
    /// Write items directly (Redis `HSET`, `HDEL`, `DEL`).
    #[serde(default)]
    pub write: bool,
    /// Modules whose jobs it may run, by name; `*` for every module.
    #[serde(default)]
    pub run: Vec<String>,
}

impl Permissions {
    /// Every permission.
    pub fn admin() -> Permissions {
        Permissions { admin: true, ..Permissions::default() }
    }

    /// Whether it may run jobs of the module named `module`.
    pub fn may_run(&self, module: &str) -> bool {
        self.admin || self.run.iter().any(|m| m == "*" || m == module)
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        for (on, name) in [(self.admin, "admin"), (self.read, "read"), (self.write, "write")] {
            if on {
                parts.push(name.to_owned());
            }
        }
        parts.extend(self.run.iter().map(|m| format!("run:{m}")));
        if parts.is_empty() { f.write_str("(see only)") } else { f.write_str(&parts.join(",")) }
    }
}

/// A user as the cluster lists it (its token is never shown again after it was made).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The user's name.
    pub name: String,
    /// What it may do.
    pub permissions: Permissions,
}

/// A user just added, with its token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUser {
    /// The user.
    pub user: UserInfo,
    /// Its token: the password for Redis `AUTH`, the bearer token over HTTP, `--token` and
    /// `GREX_TOKEN` for the CLI. The cluster keeps only its SHA-256.
    pub token: String,
}

/// A stored module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// The alias.
    pub name: String,
    /// `sha256:` + hex SHA-256 of the uploaded bytes: the module's id.
    pub id: String,
    /// Size of the uploaded bytes.
    pub size: u64,
}

/// The result of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutput {
    /// What the job returned.
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
    /// The bucket's version after the job (unchanged if the job wrote nothing).
    pub bucket_version: u64,
    /// The bucket's flock.
    pub flock: u32,
    /// The id of the node that ran the job (a node passes a job on to the node that should run
    /// it; a client that sees another node here than the one it asked may go there directly).
    pub node: String,
}

/// One flock's place in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockInfo {
    /// The flock.
    pub flock: u32,
    /// Node ids of its herders; the first is its preferred leader.
    pub herders: Vec<String>,
    /// Its current leader, as this node knows it.
    pub leader: Option<String>,
    /// True once the flock's consensus group votes with exactly these herders, as this node
    /// sees it; false while a membership change toward the map is under way.
    #[serde(default)]
    pub settled: bool,
    /// This node's log of the flock holds no entry at or below this index: they were folded into
    /// a snapshot and dropped (0: none). A herder further behind catches up from a snapshot.
    #[serde(default)]
    pub log_purged: u64,
}

/// The flock map as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockMapInfo {
    /// The map's version (grows with every change).
    pub version: u64,
    /// Every member node: id → HTTP URL.
    pub nodes: Vec<(String, String)>,
    /// Every flock.
    pub flocks: Vec<FlockInfo>,
    /// This node's log of the meta group holds no entry at or below this index (0: none purged);
    /// a member further behind catches up from a snapshot of the meta group.
    #[serde(default)]
    pub meta_log_purged: u64,
}

/// The cluster's nodes as one node sees them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodesInfo {
    /// The flock map's version.
    pub map_version: u64,
    /// Flocks whose herders are still changing toward the map (moves under way).
    pub flocks_moving: u32,
    /// Every member.
    pub nodes: Vec<NodeInfo>,
    /// Ids of former members, refused if they come back.
    pub removed: Vec<String>,
    /// The meta group's voters are changing (a joint configuration, which needs a quorum of the
    /// old voters and of the new ones), as the answering node sees it.
    pub meta_changing: bool,
}

/// One member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its id (16 hex digits).
    pub id: String,
    /// `active`, or `draining` (handing its flocks to the others before it leaves).
    pub state: String,
    /// The answering node hears from it.
    pub alive: bool,
    /// Its HTTP URL.
    pub http: String,
    /// Its peer address.
    pub peer: String,
    /// Its zone (`--zone`; empty: the default zone).
    pub zone: String,
    /// Its capacity (`--capacity`).
    pub capacity: u32,
    /// Flocks the map names it a herder of.
    pub flocks: u32,
    /// Flocks it leads, as the answering node knows.
    pub leads: u32,
    /// Bytes of snapshots it has sent to other nodes since it started (new herders catching
    /// up), as its last ping to the answering node said.
    pub snapshot_bytes_sent: u64,
    /// It votes in the meta group (the first five members do; the others follow it), as the
    /// answering node sees the group.
    #[serde(default)]
    pub meta_voter: bool,
    /// The grex version it runs, as it told the answering node (empty when unknown: it runs a
    /// release that does not say, or the answering node has no connection to it).
    #[serde(default)]
    pub version: String,
    /// The peer protocol version the answering node speaks with it (0 when it has no connection
    /// to it); during a rolling upgrade, nodes of the new release speak the old one's protocol
    /// with nodes of the old release.
    #[serde(default)]
    pub protocol: u32,
}

/// Where to send work for a bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    /// HTTP URL of the best node.
    pub url: String,
    /// QUIC URL of the same node, when it serves QUIC.
    pub quic: Option<String>,
    /// The node's id.
    pub node: String,
    /// The bucket's flock.
    pub flock: u32,
    /// The node's role for that flock (`leader` on a single node).
    pub role: String,
    /// The bucket's committed version (0 if it has never been written).
    pub bucket_version: u64,
}

/// A node's status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The node's id.
    pub node: String,
    /// The binary's version.
    pub version: String,
    /// HTTP URL, if served.
    pub http_url: Option<String>,
    /// QUIC URL, if served.
    pub quic_url: Option<String>,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Flocks in the cluster (fixed when the data directory was created).
    pub flock_count: u32,
    /// Jobs that committed or returned output.
    pub jobs_ok: u64,
    /// Jobs that failed.
    pub jobs_failed: u64,
    /// Jobs this node passed on to the node that serves their bucket (one hop each).
    #[serde(default)]
    pub jobs_forwarded: u64,
    /// Jobs running on this node now (their module loaded; queued, running or waiting for
    /// their commit).
    #[serde(default)]
    pub jobs_running: u64,
    /// Modules stored.
    pub modules: u64,
    /// Buckets in the cache.
    pub cache_buckets: u64,
    /// Bytes the cache holds.
    pub cache_bytes: u64,
    /// The cache's limit.
    pub cache_bytes_max: u64,
    /// Cache hits since start.
    pub cache_hits: u64,
    /// Cache misses since start.
    pub cache_misses: u64,
    /// Commits to disk since start (each can hold many jobs' change sets).
    pub commits: u64,
    /// Change sets committed since start.
    pub change_sets: u64,
}

/// The closed set of error codes a node reports. Stable: clients branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed.
    BadRequest,
    /// The request's content type is not accepted.
    UnsupportedMediaType,
    /// The bucket key is empty or too long.
    InvalidBucketKey,
    /// An item key is empty or too long.
    InvalidItemKey,
    /// No item by that key.
    ItemNotFound,
    /// No module by that name or id.
    ModuleNotFound,
    /// The uploaded bytes are not a usable module.
    ModuleInvalid,
    /// The module is larger than the limit.
    ModuleTooLarge,
    /// The job's input is larger than the limit.
    InputTooLarge,
    /// The job returned an error.
    JobFailed,
    /// The job trapped (a panic, unreachable code, out-of-bounds access...).
    JobTrapped,
    /// The job ran past its deadline.
    JobTimeout,
    /// The job used up its fuel.
    JobFuelExhausted,
    /// The job tried to grow its memory past the limit.
    JobMemoryLimit,
    /// The job's output is larger than the limit.
    OutputTooLarge,
    /// The job wrote an item larger than the limit.
    ItemTooLarge,
    /// The job's change set is larger than the limit.
    ChangeSetTooLarge,
    /// A read-only job tried to write.
    ReadOnlyViolation,
    /// The node is at its limit of queued work; retry later.
    Overloaded,
    /// The node's storage failed; it refuses writes until restarted.
    StorageFailed,
    /// The node is shutting down.
    ShuttingDown,
    /// Anything else: a bug.
    Internal,
    /// The node cannot reach a majority of the flock's herders, so it refuses writes.
    NoQuorum,
    /// The flock has no reachable leader right now (an election is under way); retry shortly.
    /// The job did not run: retrying it is safe.
    Unavailable,
    /// The job ran, but the node could not learn whether its change set committed (its leader
    /// went down or lost its lead first). It may have taken effect: read before retrying.
    OutcomeUnknown,
    /// The request's body did not arrive in time (HTTP); nothing ran. (Codes are encoded by
    /// index: new ones go at the end.)
    RequestTimeout,
    /// The module did not compile within the node's compile deadline or memory cap.
    ModuleTooComplex,
    /// No member node has that id.
    NodeNotFound,
    /// The request does not fit the cluster's state (the message says why and what to do);
    /// nothing changed.
    Conflict,
    /// The request carried no credential, or one that matches no user; nothing ran.
    Unauthenticated,
    /// The user may not do this; nothing ran.
    Forbidden,
    /// No user by that name.
    UserNotFound,
}

impl ErrorCode {
    /// The stable text of the code, as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::InvalidBucketKey => "invalid_bucket_key",
            ErrorCode::InvalidItemKey => "invalid_item_key",
            ErrorCode::ItemNotFound => "item_not_found",
            ErrorCode::ModuleNotFound => "module_not_found",
            ErrorCode::ModuleInvalid => "module_invalid",
            ErrorCode::ModuleTooLarge => "module_too_large",
            ErrorCode::ModuleTooComplex => "module_too_complex",
            ErrorCode::InputTooLarge => "input_too_large",
            ErrorCode::JobFailed => "job_failed",
            ErrorCode::JobTrapped => "job_trapped",
            ErrorCode::JobTimeout => "job_timeout",
            ErrorCode::JobFuelExhausted => "job_fuel_exhausted",
            ErrorCode::JobMemoryLimit => "job_memory_limit",
            ErrorCode::OutputTooLarge => "output_too_large",
            ErrorCode::ItemTooLarge => "item_too_large",
            ErrorCode::ChangeSetTooLarge => "change_set_too_large",
            ErrorCode::ReadOnlyViolation => "read_only_violation",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::StorageFailed => "storage_failed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::NoQuorum => "no_quorum",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::NodeNotFound => "node_not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::UserNotFound => "user_not_found",
        }
    }

    /// The HTTP status that fits the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidBucketKey | ErrorCode::InvalidItemKey => 400,
            ErrorCode::ModuleInvalid => 400,
            ErrorCode::ItemNotFound | ErrorCode::ModuleNotFound | ErrorCode::NodeNotFound => 404,
            ErrorCode::UserNotFound => 404,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::Conflict => 409,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::ModuleTooLarge | ErrorCode::InputTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::JobFailed
            | ErrorCode::JobTrapped
            | ErrorCode::JobTimeout
            | ErrorCode::JobFuelExhausted
            | ErrorCode::JobMemoryLimit
            | ErrorCode::OutputTooLarge
            | ErrorCode::ItemTooLarge
            | ErrorCode::ChangeSetTooLarge
            | ErrorCode::ReadOnlyViolation
            | ErrorCode::ModuleTooComplex => 422,
            ErrorCode::Overloaded
            | ErrorCode::StorageFailed
            | ErrorCode::ShuttingDown
            | ErrorCode::NoQuorum
            | ErrorCode::Unavailable
            | ErrorCode::OutcomeUnknown => 503,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it crosses the wire: a stable code and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RemoteError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What failed and what to do about it; at most [`ERROR_MESSAGE_BYTES_MAX`] bytes (longer
    /// ones, a job's own error text say, are cut, also when decoded from the wire).
    #[serde(rename = "error", deserialize_with = "bounded_message")]
    pub message: String,
}

/// The longest error message, in bytes, that a node sends or a client accepts.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 4096;

impl RemoteError {
    /// An error with a code and message (cut to [`ERROR_MESSAGE_BYTES_MAX`]).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError { code, message: bound_message(message.into()) }
    }
}

/// `message` cut at a character boundary to [`ERROR_MESSAGE_BYTES_MAX`] bytes, saying how much
/// was cut.
fn bound_message(mut message: String) -> String {
    if message.len() <= ERROR_MESSAGE_BYTES_MAX {
        return message;
    }
    let total = message.len();
    let mut end = ERROR_MESSAGE_BYTES_MAX - 64;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("... ({} more bytes cut)", total - end));
    message
}

fn bounded_message<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    String::deserialize(deserializer).map(bound_message)
}

/// A frame that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Longer than [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes is over the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    /// Shorter than its header or its stated length.
    #[error("truncated frame: {0}")]
    Truncated(String),
    /// Another wire version.
    #[error("frame has wire version {0}; this build speaks version {WIRE_VERSION}")]
    Version(u8),
    /// The payload does not decode.
    #[error("malformed frame payload: {0}")]
    Payload(String),
}

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encodes a message into one frame.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    encode_frame_sized(message, 0)
}

/// [`encode_frame`] into a buffer made for about `bytes` of message, so that a large one is
/// written once rather than copied each time the buffer would grow.
pub fn encode_frame_sized<T: Serialize>(message: &T, bytes: usize) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::with_capacity(5 + bytes.min(FRAME_BYTES_MAX));
    frame.extend_from_slice(&[0, 0, 0, 0, WIRE_VERSION]);
    bincode::serde::encode_into_std_write(message, &mut frame, codec())
        .map_err(|e| FrameError::Payload(e.to_string()))?;
    let len = frame.len() - 4;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// The length a frame header announces, checked against the limit; `header` is its first 4 bytes.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Truncated("empty frame".into()));
    }
    Ok(len)
}

/// Decodes one whole frame (header included).
pub fn decode_frame<T: DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    decode_frame_borrowed(frame)
}

/// Decodes one whole frame (header included) into a message that may borrow from it: byte
/// strings (`&[u8]` through `serde_bytes`) and text are not copied.
pub fn decode_frame_borrowed<'de, T: Deserialize<'de>>(frame: &'de [u8]) -> Result<T, FrameError> {
    let header: [u8; 4] = frame
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| FrameError::Truncated(format!("{} bytes, shorter than the header", frame.len())))?;
    let len = frame_len(header)?;
    if frame.len() - 4 != len {
        return Err(FrameError::Truncated(format!("header says {len} bytes, frame has {}", frame.len() - 4)));
    }
    if frame[4] != WIRE_VERSION {
        return Err(FrameError::Version(frame[4]));
    }
    let (message, used) = bincode::serde::borrow_decode_from_slice(&frame[5..], codec())
        .map_err(|e| FrameError::Payload(e.to_string()))?;
    if used != len - 1 {
        return Err(FrameError::Payload(format!("{} trailing bytes", len - 1 - used)));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_come_from_the_jobs_between_two_readings() {
        assert!((LATENCY_BOUNDS_S[15] - 0.000_05 * 32768.0).abs() < 1e-12);
        let mut before = vec![0; LATENCY_BOUNDS_S.len() + 1];
        before[0] = 1000; // old jobs, all fast: not counted
        let mut after = before.clone();
        // 100 jobs: 90 in (0.4 ms, 0.8 ms], 10 in (12.8 ms, 25.6 ms].
        after[4] += 90;
        after[9] += 10;
        let p50 = latency_quantile(&before, &after, 0.5).unwrap();
        assert!(p50 > 0.000_4 && p50 <= 0.000_8, "{p50}");
        let p99 = latency_quantile(&before, &after, 0.99).unwrap();
        assert!(p99 > 0.012_8 && p99 <= 0.025_6, "{p99}");
        assert_eq!(latency_quantile(&before, &before, 0.5), None, "no jobs in between");
        // Since the start; slower than every bound: the last bound.
        let mut slow = vec![0; LATENCY_BOUNDS_S.len() + 1];
        slow[LATENCY_BOUNDS_S.len()] = 3;
        assert_eq!(latency_quantile(&[], &slow, 0.99), Some(LATENCY_BOUNDS_S[15]));
    }

    #[test]
    fn long_error_messages_are_cut_when_made_and_when_decoded() {
        // Multi-byte characters around the cut: it lands on a character boundary.
        let long = "é".repeat(ERROR_MESSAGE_BYTES_MAX);
        let made = RemoteError::new(ErrorCode::JobFailed, long.clone());
        assert!(made.message.len() <= ERROR_MESSAGE_BYTES_MAX, "{}", made.message.len());
        assert!(made.message.ends_with("more bytes cut)"), "{}", &made.message[made.message.len() - 40..]);
        let short = RemoteError::new(ErrorCode::JobFailed, "short");
        assert_eq!(short.message, "short");
        // From a peer that does not cut: cut on the way in.
        let unbounded = RemoteError { code: ErrorCode::JobFailed, message: long };
        let decoded: RemoteError = decode_frame(&encode_frame(&unbounded).unwrap()).unwrap();
        assert_eq!(decoded, made);
        let json: RemoteError = serde_json::from_str(&serde_json::to_string(&unbounded).unwrap()).unwrap();
        assert_eq!(json, made);
    }

    #[test]
    fn frames_round_trip() {
        let request =
            Request::RunJob { bucket: b"b".to_vec(), module: "counter".into(), input: b"5".to_vec(), read_only: false };
        let frame = encode_frame(&request).unwrap();
        assert_eq!(decode_frame::<Request>(&frame).unwrap(), request);
    }

    #[test]
    fn damaged_frames_are_refused_not_panicked_on() {
        let frame = encode_frame(&Request::Status).unwrap();
        assert!(matches!(decode_frame::<Request>(&frame[..3]), Err(FrameError::Truncated(_))));
        assert!(matches!(decode_frame::<Request>(&frame[..frame.len() - 1]), Err(FrameError::Truncated(_))));
        let mut wrong_version = frame.clone();
        wrong_version[4] = 9;
        assert!(matches!(decode_frame::<Request>(&wrong_version), Err(FrameError::Version(9))));
        let huge = [0xff, 0xff, 0xff, 0xff, 1];
        assert!(matches!(decode_frame::<Request>(&huge), Err(FrameError::TooLarge(_))));
        // A payload that claims a 2^60-byte vector must fail on the limit, not try to allocate.
        let mut bomb = vec![0, 0, 0, 0, WIRE_VERSION, 1, 0xff];
        bomb.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let len = (bomb.len() - 4) as u32;
        bomb[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(decode_frame::<Request>(&bomb), Err(FrameError::Payload(_))));
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        let seed: u64 = std::env::var("GREX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x9e37_79b9);
        println!("seed {seed} (set GREX_SEED to replay)");
        let mut state = seed;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            if bytes.len() >= 5 {
                let body = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&body.to_be_bytes());
                bytes[4] = WIRE_VERSION;
            }
            let _ = decode_frame::<Request>(&bytes);
        }
    }

    #[test]
    fn key_slots_match_redis_cluster() {
        // Values Redis itself gives (`CLUSTER KEYSLOT`, and the CRC16 check value of "123456789").
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), 2515);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"));
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Only the first `{...}` counts, an empty one means no tag, and `{` inside a tag is data.
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"no-closing{brace"), crc16(b"no-closing{brace") % 16384);
    }

    #[test]
    fn a_flock_is_a_contiguous_range_of_slots() {
        for flock_count in [1, 2, 256, FLOCKS_MAX] {
            let mut next = 0u32;
            for flock in 0..flock_count {
                let (first, last) = flock_slots(flock, flock_count);
                assert_eq!(u32::from(first), next, "{flock_count} flocks: flock {flock} starts where the last ended");
                next = u32::from(last) + 1;
            }
            assert_eq!(next, SLOTS, "{flock_count} flocks cover every slot");
        }
        for i in 0..2000u32 {
            let key = format!("customer-{i}");
            let flock = flock_of(key.as_bytes(), 256);
            let (first, last) = flock_slots(flock, 256);
            assert!((first..=last).contains(&key_slot(key.as_bytes())), "{key} is in its flock's slots");
        }
        assert_eq!(flock_of(b"anything", 1), 0);
        assert!(check_flock_count(256).is_ok() && check_flock_count(FLOCKS_MAX).is_ok());
        assert!(check_flock_count(100).is_err() && check_flock_count(2 * FLOCKS_MAX).is_err());
        assert!(check_flock_count(0).is_err());
    }

    #[test]
    fn error_codes_serialize_as_their_stable_text() {
        let json = serde_json::to_string(&RemoteError::new(ErrorCode::JobTimeout, "late")).unwrap();
        assert_eq!(json, r#"{"code":"job_timeout","error":"late"}"#);
    }
}
