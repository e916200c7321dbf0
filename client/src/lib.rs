//! Talk to a Grex node from an application, without compiling the node itself.
//!
//! [`Client::connect`] takes a node URL: `quic://HOST:PORT` speaks the native protocol (QUIC with
//! TLS; many requests share a session stream, answered as each is done; trust comes from the
//! node's CA file), and
//! `http://HOST:PORT` speaks the HTTP/JSON API that curl uses. Both offer the same calls.
//!
//! ```no_run
//! # async fn demo() -> Result<(), grex_client::ClientError> {
//! let client = grex_client::Client::connect("quic://127.0.0.1:7071", Some("grex-data/ca.pem".as_ref())).await?;
//! let out = client.run_job(b"customer-42", "counter", b"5", false).await?;
//! println!("{}", String::from_utf8_lossy(&out.output));
//! # Ok(()) }
//! ```
//!
//! In a cluster any node serves any request, passing jobs on to the node that should run them.
//! [`Router`] goes to that node directly, following each bucket's canary.
//!
//! [`proto`] holds the wire types that node and client share: requests, responses, the closed set
//! of error codes, the frame codec and the bucket → flock hash.

pub mod http;
pub mod proto;
pub mod quic;
pub mod router;

use std::path::{Path, PathBuf};

pub use proto::{
    Canary, ClusterStats, ErrorCode, JobOutput, JobRecord, MemberStats, ModuleInfo, NewUser, NodeStats, Permissions,
    RecentJobs, RemoteError, Request, Response, ScanEvent, ScanItem, ScanRequest, ScanSummary, Status, UserInfo,
};
pub use router::Router;

/// A failed client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The node could not be reached: the request was not sent, so it took no effect.
    #[error("cannot reach the node: {0}")]
    Unreachable(String),
    /// The request was sent but no answer came (the connection broke, or the node stopped): a job
    /// may or may not have run and committed. Read before retrying a change that must not repeat.
    #[error("no answer from the node (the request may or may not have taken effect): {0}")]
    NoAnswer(String),
    /// The URL or the client's settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The node's answer did not make sense.
    #[error("unexpected answer from the node: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The node's error code, when the node answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

enum Transport {
    Quic(quic::QuicTransport),
    Http(http::HttpTransport),
}

/// A connection to one Grex node.
pub struct Client {
    transport: Transport,
}

/// How to reach a node and whom to sign in as.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// The cluster's `ca.pem`, which signs its nodes' QUIC certificates (needed for `quic://`).
    pub ca_file: Option<PathBuf>,
    /// A user's token (from `grex user add`), for a cluster that has users.
    pub token: Option<String>,
}

impl Client {
    /// Connects to `url`: `quic://HOST:PORT` (needs `ca_file`, the node's `ca.pem`),
    /// `http://HOST:PORT`, or `https://HOST:PORT` (a node started with `--http-tls`; needs
    /// `ca_file` too), without signing in (a cluster that has users refuses such a client
    /// everything but on a node's loopback before its first user).
    pub async fn connect(url: &str, ca_file: Option<&Path>) -> Result<Client, ClientError> {
        Client::connect_with(url, &ConnectOptions { ca_file: ca_file.map(Path::to_path_buf), token: None }).await
    }

    /// Connects to `url` and signs in with `options.token` if it is given: a token that matches
    /// no user fails here, with `unauthenticated`.
    pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Client, ClientError> {
        let token = options.token.as_deref();
        let transport = if let Some(rest) = url.strip_prefix("quic://") {
            let ca = options.ca_file.as_deref().ok_or_else(|| {
                ClientError::Config(format!(
                    "{url}: a quic:// node needs the node's CA file (--ca FILE or GREX_CA; it is ca.pem in the node's data directory)"
                ))
            })?;
            Transport::Quic(quic::QuicTransport::connect(rest.trim_end_matches('/'), ca).await?)
        } else if let Some(rest) = url.strip_prefix("http://") {
            Transport::Http(http::HttpTransport::new(rest.trim_end_matches('/'), token, None)?)
        } else if let Some(rest) = url.strip_prefix("https://") {
            let ca = options.ca_file.as_deref().ok_or_else(|| {
                ClientError::Config(format!(
                    "{url}: an https:// node is trusted through the cluster's CA file (--ca FILE or GREX_CA: ca.pem)"
                ))
            })?;
            Transport::Http(http::HttpTransport::new(rest.trim_end_matches('/'), token, Some(ca))?)
        } else {
            return Err(ClientError::Config(format!(
                "node URL `{url}` must start with http://, https:// or quic://, e.g. http://127.0.0.1:7070"
            )));
        };
        let client = Client { transport };
        if let Some(token) = token {
            client.authenticate(token).await?;
        }
        Ok(client)
    }

    /// Signs in as the user `token` belongs to (over QUIC, for this connection's later requests).
    pub async fn authenticate(&self, token: &str) -> Result<UserInfo, ClientError> {
        match self.call(Request::Authenticate { token: token.to_owned() }).await? {
            Response::User(user) => Ok(user),
            other => Err(unexpected(other)),
        }
    }

    /// Every user and its permissions.
    pub async fn users(&self) -> Result<Vec<UserInfo>, ClientError> {
        match self.call(Request::Users).await? {
            Response::Users(users) => Ok(users),
            other => Err(unexpected(other)),
        }
    }

    /// Adds a user; returns its token, which is shown only this once.
    pub async fn add_user(&self, name: &str, permissions: Permissions) -> Result<NewUser, ClientError> {
        match self.call(Request::AddUser { name: name.to_owned(), permissions }).await? {
            Response::NewUser(user) => Ok(user),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces a user's permissions (its token stays).
    pub async fn set_user(&self, name: &str, permissions: Permissions) -> Result<UserInfo, ClientError> {
        match self.call(Request::SetUser { name: name.to_owned(), permissions }).await? {
            Response::User(user) => Ok(user),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a user; returns what it was.
    pub async fn delete_user(&self, name: &str) -> Result<UserInfo, ClientError> {
        match self.call(Request::DeleteUser { name: name.to_owned() }).await? {
            Response::User(user) => Ok(user),
            other => Err(unexpected(other)),
        }
    }

    /// Whether this client's requests share one session stream, as they do with a QUIC node of
    /// grex 0.4.0 or later (`docs/wire.md`); module uploads and scans take a stream of their own.
    pub fn has_sessions(&self) -> bool {
        matches!(&self.transport, Transport::Quic(t) if t.has_sessions())
    }

    /// Sends one request and returns the node's answer; errors the node reports come back as
    /// [`ClientError::Remote`].
    pub async fn call(&self, request: Request) -> Result<Response, ClientError> {
        let response = match &self.transport {
            Transport::Quic(t) => t.call(&request).await?,
            Transport::Http(t) => t.call(&request).await?,
        };
        match response {
            Response::Error(e) => Err(ClientError::Remote(e)),
            other => Ok(other),
        }
    }

    /// Runs `request`'s module read-only on every bucket (with its prefix), handing each event
    /// to `on_event` as it arrives: results of a flock's buckets, each flock as it finishes, and
    /// last `done`, which this returns. A scan that stops (`failed`) returns its error, as does
    /// a stream that breaks before it ends (`no_answer`): results already handed over are right,
    /// but not every bucket was scanned.
    pub async fn scan(
        &self,
        request: ScanRequest,
        mut on_event: impl FnMut(&ScanEvent) + Send,
    ) -> Result<ScanSummary, ClientError> {
        let request = Request::Scan(request);
        let last = match &self.transport {
            Transport::Quic(t) => t.scan(&request, &mut on_event).await?,
            Transport::Http(t) => t.scan(&request, &mut on_event).await?,
        };
        match last {
            Some(ScanEvent::Done(summary)) => Ok(summary),
            Some(ScanEvent::Failed(e)) => Err(ClientError::Remote(e)),
            _ => Err(ClientError::NoAnswer("the scan's answer ended before it said the scan was done".into())),
        }
    }

    /// Uploads a module (a wasm component, or a core module built with the guest SDK) under `name`.
    pub async fn put_module(&self, name: &str, wasm: Vec<u8>) -> Result<ModuleInfo, ClientError> {
        match self.call(Request::PutModule { name: name.to_owned(), wasm }).await? {
            Response::Module(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Every module name on the node, with its id and size.
    pub async fn list_modules(&self) -> Result<Vec<ModuleInfo>, ClientError> {
        match self.call(Request::ListModules).await? {
            Response::Modules(list) => Ok(list),
            other => Err(unexpected(other)),
        }
    }

    /// The flock map as the node sees it.
    pub async fn flocks(&self) -> Result<proto::FlockMapInfo, ClientError> {
        match self.call(Request::Flocks).await? {
            Response::Flocks(map) => Ok(map),
            other => Err(unexpected(other)),
        }
    }

    /// Runs the module called `module` against `bucket` with `input`.
    pub async fn run_job(
        &self,
        bucket: &[u8],
        module: &str,
        input: &[u8],
        read_only: bool,
    ) -> Result<JobOutput, ClientError> {
        let request =
            Request::RunJob { bucket: bucket.to_vec(), module: module.to_owned(), input: input.to_vec(), read_only };
        match self.call(request).await? {
            Response::Job(out) => Ok(out),
            other => Err(unexpected(other)),
        }
    }

    /// An item's value (error code `item_not_found` if there is none).
    pub async fn get_item(&self, bucket: &[u8], item: &str) -> Result<Vec<u8>, ClientError> {
        match self.call(Request::GetItem { bucket: bucket.to_vec(), item: item.to_owned() }).await? {
            Response::Item(value) => Ok(value),
            other => Err(unexpected(other)),
        }
    }

    /// One page of a bucket's item keys that start with `prefix`.
    pub async fn list_items(
        &self,
        bucket: &[u8],
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, ClientError> {
        let request = Request::ListItems {
            bucket: bucket.to_vec(),
            prefix: prefix.to_owned(),
            start_after: start_after.map(str::to_owned),
            limit,
        };
        match self.call(request).await? {
            Response::Items(keys) => Ok(keys),
            other => Err(unexpected(other)),
        }
    }

    /// Which node is best for `bucket`.
    pub async fn canary(&self, bucket: &[u8]) -> Result<Canary, ClientError> {
        match self.call(Request::Canary { bucket: bucket.to_vec() }).await? {
            Response::Canary(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// The node's slowest and failed recent jobs.
    pub async fn recent_jobs(&self) -> Result<RecentJobs, ClientError> {
        match self.call(Request::RecentJobs).await? {
            Response::RecentJobs(jobs) => Ok(jobs),
            other => Err(unexpected(other)),
        }
    }

    /// Every member's load, as the node asked gathers it.
    pub async fn cluster_stats(&self) -> Result<ClusterStats, ClientError> {
        match self.call(Request::ClusterStats).await? {
            Response::ClusterStats(stats) => Ok(stats),
            other => Err(unexpected(other)),
        }
    }

    /// The node's status.
    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.call(Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a module name; returns what it pointed to. The module itself goes once no name
    /// points to it (a job running it finishes).
    pub async fn delete_module(&self, name: &str) -> Result<ModuleInfo, ClientError> {
        match self.call(Request::DeleteModule { name: name.to_owned() }).await? {
            Response::Module(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    /// The cluster's nodes.
    pub async fn nodes(&self) -> Result<proto::NodesInfo, ClientError> {
        self.nodes_after(Request::Nodes).await
    }

    /// Starts draining a node (its flocks move away, then it leaves); returns the nodes once
    /// the cluster has recorded the drain.
    pub async fn drain_node(&self, node: &str) -> Result<proto::NodesInfo, ClientError> {
        self.nodes_after(Request::DrainNode { node: node.to_owned() }).await
    }

    /// Removes a dead node; returns the nodes once the cluster has recorded it.
    pub async fn remove_node(&self, node: &str) -> Result<proto::NodesInfo, ClientError> {
        self.nodes_after(Request::RemoveNode { node: node.to_owned() }).await
    }

    async fn nodes_after(&self, request: Request) -> Result<proto::NodesInfo, ClientError> {
        match self.call(request).await? {
            Response::Nodes(nodes) => Ok(nodes),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("answer of the wrong kind: {}", response.kind()))
}
