//! The client-facing servers: HTTP/JSON (`http`), QUIC (`quic`) and the Redis protocol (`resp`),
//! all thin layers over a [`Node`] (what it answers itself: items, status, modules) and a
//! [`Service`] (what a cluster routes: jobs, uploads, canaries, the flock map), and the TLS
//! identity QUIC serves (`tls`).
//!
//! [`bind`] binds the listeners and records their URLs on the node, and returns a [`Servers`]
//! handle that accepts nothing until [`Servers::open`] hands the servers their service: a cluster
//! node needs its URLs to start its cluster side, and no request is taken before that side is
//! the service (a job run before would commit outside its flock's log). [`start`] does both for a
//! node on its own, which is its own service. `docs/wire.md` specifies the protocols.

pub mod admission;
pub mod budget;
mod conns;
mod dashboard;
mod http;
pub(crate) mod quic;
pub mod resp;
mod tls;

pub use tls::{CA_FILE, NodeIdentity};

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use grex_client::{NewUser, Permissions, Request, UserInfo};

use crate::access::{self, Action, Caller, UserChange, UserRecord};
use crate::data::Builtin;
use crate::error::{ErrorCode, error};
use crate::node::{Node, NodeUrls, Service};

/// Where to listen.
#[derive(Clone, Debug, Default)]
pub struct ServeConfig {
    /// HTTP/JSON listener.
    pub http: Option<SocketAddr>,
    /// QUIC listener.
    pub quic: Option<SocketAddr>,
    /// Redis protocol (RESP2/RESP3) listener.
    pub resp: Option<SocketAddr>,
    /// HTTP over TLS (HTTPS), with the node's certificate (the one QUIC serves).
    pub http_tls: bool,
    /// The Redis protocol over TLS, with the node's certificate.
    pub resp_tls: bool,
}

/// Running servers.
pub struct Servers {
    /// Where HTTP listens.
    pub http_addr: Option<SocketAddr>,
    /// Where QUIC listens.
    pub quic_addr: Option<SocketAddr>,
    /// Where the Redis protocol listens.
    pub resp_addr: Option<SocketAddr>,
    /// HTTP speaks TLS.
    pub http_tls: bool,
    /// The Redis protocol speaks TLS.
    pub resp_tls: bool,
    open: watch::Sender<Option<Arc<dyn Service>>>,
    /// [`NodeConfig::jobs_bytes_max`](crate::config::NodeConfig::jobs_bytes_max) of the node.
    jobs_bytes_max: usize,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// When a server may accept: after [`Servers::open`], until [`Servers::stop`].
#[derive(Clone)]
pub(crate) struct Gate {
    open: watch::Receiver<Option<Arc<dyn Service>>>,
    /// Turns true when the servers stop.
    pub(crate) stopped: watch::Receiver<bool>,
}

impl Gate {
    /// Waits until the servers are opened: the service they serve, or `None` if they were
    /// stopped first.
    pub(crate) async fn opened(&mut self) -> Option<Arc<dyn Service>> {
        tokio::select! {
            opened = self.open.wait_for(Option::is_some) => opened.ok().and_then(|s| s.clone()),
            _ = self.stopped.wait_for(|s| *s) => None,
        }
    }
}

/// Starts the configured servers for `node`, accepting at once (a node without a cluster side,
/// which serves itself).
pub async fn start(node: &Node, config: &ServeConfig) -> anyhow::Result<Servers> {
    let servers = bind(node, config).await?;
    servers.open(Arc::new(node.clone()));
    Ok(servers)
}

/// Binds the configured listeners for `node` and records their URLs; nothing is accepted until
/// [`Servers::open`] (connections wait in the kernel's and QUIC's accept queues meanwhile).
pub async fn bind(node: &Node, config: &ServeConfig) -> anyhow::Result<Servers> {
    let (stop, stopped) = watch::channel(false);
    let (open, opened) = watch::channel(None);
    let gate = Gate { open: opened, stopped };
    let budget = budget::ReadBudget::new(node.config().request_buffer_bytes_max);
    let mut tasks = Vec::new();
    let mut urls = NodeUrls::default();
    let mut http_addr = None;
    let mut quic_addr = None;
    // Every TLS listener serves the one identity; a node without any listens for QUIC.
    let listen_ip = config.quic.or(config.http).or(config.resp).map(|a| a.ip());
    let identity = match listen_ip {
        Some(ip) if config.quic.is_some() || config.http_tls || config.resp_tls => {
            Some(tls::load_or_create(node.data_dir(), ip)?)
        }
        _ => None,
    };
    let acceptor = |on: bool, alpn: &[&[u8]]| match (&identity, on) {
        (Some(identity), true) => tls::acceptor(identity, alpn).map(Some),
        _ => Ok(None),
    };
    if let Some(addr) = config.http {
        let tls = acceptor(config.http_tls, &[b"http/1.1"])?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (bound, task) = http::start(node.clone(), addr, gate.clone(), budget.clone(), tls).await?;
        urls.http = Some(format!("{scheme}://{}", url_host(bound)));
        http_addr = Some(bound);
        tasks.push(task);
    }
    if let (Some(addr), Some(identity)) = (config.quic, &identity) {
        let (bound, task) = quic::start(node.clone(), addr, identity, gate.clone(), budget.clone())?;
        urls.quic = Some(format!("quic://{}", url_host(bound)));
        quic_addr = Some(bound);
        tasks.push(task);
    }
    let mut resp_addr = None;
    if let Some(addr) = config.resp {
        let tls = acceptor(config.resp_tls, &[])?;
        let (bound, task) = resp::start(node.clone(), addr, gate.clone(), budget.clone(), tls).await?;
        urls.resp = Some(url_host(bound));
        resp_addr = Some(bound);
        tasks.push(task);
    }
    node.set_urls(urls);
    let jobs_bytes_max = node.config().jobs_bytes_max;
    let (http_tls, resp_tls) = (config.http_tls, config.resp_tls);
    Ok(Servers { http_addr, quic_addr, resp_addr, http_tls, resp_tls, open, jobs_bytes_max, stop, tasks })
}

impl Servers {
    /// Starts accepting requests, for `service` (the node itself, or its cluster), whose jobs
    /// and uploads are admitted by the bytes they hold ([`admission`]).
    pub fn open(&self, service: Arc<dyn Service>) {
        let _ = self.open.send(Some(Arc::new(admission::Admitted::new(service, self.jobs_bytes_max))));
    }

    /// Stops accepting, lets requests in flight finish, and returns when the servers are down.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// What a request would do, as permissions name it (`Authenticate` needs no permission).
fn request_action(request: &Request) -> Action<'_> {
    match request {
        // The built-ins (the Redis hash commands) are reads or writes of items, whatever runs them.
        Request::RunJob { module, .. } => match Builtin::from_module(module) {
            Some(builtin) if builtin.read_only() => Action::Read,
            Some(_) => Action::Write,
            None => Action::Run(module),
        },
        Request::GetItem { .. } | Request::ListItems { .. } => Action::Read,
        Request::PutModule { .. }
        | Request::DeleteModule { .. }
        | Request::DrainNode { .. }
        | Request::RemoveNode { .. }
        | Request::Users
        | Request::AddUser { .. }
        | Request::SetUser { .. }
        | Request::DeleteUser { .. } => Action::Admin,
        Request::Canary { .. }
        | Request::Status
        | Request::ListModules
        | Request::Flocks
        | Request::Nodes
        | Request::RecentJobs
        | Request::ClusterStats
        | Request::Authenticate { .. }
        | Request::Session => Action::See,
        // And its reduce module's, which `authorize_scan` checks too.
        Request::Scan(scan) => Action::Run(&scan.module),
    }
}

/// Refuses a scan unless its caller may run its module and its reduce module.
fn authorize_scan(
    service: &dyn Service,
    caller: &Caller,
    scan: &grex_client::proto::ScanRequest,
) -> crate::error::Result<()> {
    service.authorize(caller, Action::Run(&scan.module))?;
    match &scan.reduce {
        Some(reduce) => service.authorize(caller, Action::Run(reduce)),
        None => Ok(()),
    }
}

/// Signs `caller` in with `token`: the caller as it is then, and the user.
fn sign_in(service: &dyn Service, caller: Caller, token: &str) -> crate::error::Result<(Caller, UserInfo)> {
    let identity = service.authenticate(token)?;
    let user = user_named(service, &identity.name)
        .ok_or_else(|| error(ErrorCode::Unauthenticated, format!("user `{}` was just deleted", identity.name)))?;
    Ok((Caller { user: Some(identity), ..caller }, user))
}

/// The user called `name`, if there is one.
fn user_named(service: &dyn Service, name: &str) -> Option<UserInfo> {
    service.users().into_iter().find(|u| u.name == name)
}

/// Adds a user with a new token, made here and kept by the cluster only as its hash.
async fn add_user(service: &dyn Service, name: String, permissions: Permissions) -> crate::error::Result<NewUser> {
    let token = access::new_token();
    let record = UserRecord { token_sha256: access::token_hash(&token), permissions: permissions.clone() };
    service.change_user(UserChange::Add { name: name.clone(), record }).await?;
    Ok(NewUser { user: UserInfo { name, permissions }, token })
}

/// Replaces a user's permissions.
async fn set_user(service: &dyn Service, name: String, permissions: Permissions) -> crate::error::Result<UserInfo> {
    service.change_user(UserChange::Set { name: name.clone(), permissions: permissions.clone() }).await?;
    Ok(UserInfo { name, permissions })
}

/// Deletes a user; answers what it was.
async fn delete_user(service: &dyn Service, name: String) -> crate::error::Result<UserInfo> {
    let user = user_named(service, &name);
    service.change_user(UserChange::Delete { name: name.clone() }).await?;
    Ok(user.unwrap_or(UserInfo { name, permissions: Permissions::default() }))
}

/// An address as clients should dial it: a wildcard bind is reached on loopback.
fn url_host(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        if addr.is_ipv4() { "127.0.0.1".parse().expect("literal") } else { "::1".parse().expect("literal") }
    } else {
        addr.ip()
    };
    SocketAddr::new(ip, addr.port()).to_string()
}
