//! The client-facing servers: HTTP/JSON (`http`), QUIC (`quic`) and the Redis protocol (`resp`),
//! all thin layers over [`Node`], and the TLS identity QUIC serves (`tls`).
//!
//! [`start`] binds the listeners, records their URLs on the node and returns a [`Servers`] handle
//! that stops them. `docs/wire.md` specifies both protocols.

mod http;
pub(crate) mod quic;
pub mod resp;
mod tls;

pub use tls::{CA_FILE, NodeIdentity};

use std::net::SocketAddr;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::node::{Node, NodeUrls};

/// Where to listen.
#[derive(Clone, Debug, Default)]
pub struct ServeConfig {
    /// HTTP/JSON listener.
    pub http: Option<SocketAddr>,
    /// QUIC listener.
    pub quic: Option<SocketAddr>,
    /// Redis protocol (RESP2/RESP3) listener.
    pub resp: Option<SocketAddr>,
}

/// Running servers.
pub struct Servers {
    /// Where HTTP listens.
    pub http_addr: Option<SocketAddr>,
    /// Where QUIC listens.
    pub quic_addr: Option<SocketAddr>,
    /// Where the Redis protocol listens.
    pub resp_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts the configured servers for `node`.
pub async fn start(node: &Node, config: &ServeConfig) -> anyhow::Result<Servers> {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut urls = NodeUrls::default();
    let mut http_addr = None;
    let mut quic_addr = None;
    if let Some(addr) = config.http {
        let (bound, task) = http::start(node.clone(), addr, stopped.clone()).await?;
        urls.http = Some(format!("http://{}", url_host(bound)));
        http_addr = Some(bound);
        tasks.push(task);
    }
    if let Some(addr) = config.quic {
        let identity = NodeIdentity::load_or_create(node.data_dir(), addr.ip())?;
        let (bound, task) = quic::start(node.clone(), addr, &identity, stopped.clone())?;
        urls.quic = Some(format!("quic://{}", url_host(bound)));
        quic_addr = Some(bound);
        tasks.push(task);
    }
    let mut resp_addr = None;
    if let Some(addr) = config.resp {
        let (bound, task) = resp::start(node.clone(), addr, stopped.clone()).await?;
        urls.resp = Some(url_host(bound));
        resp_addr = Some(bound);
        tasks.push(task);
    }
    node.set_urls(urls);
    Ok(Servers { http_addr, quic_addr, resp_addr, stop, tasks })
}

impl Servers {
    /// Stops accepting, lets requests in flight finish, and returns when the servers are down.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
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
