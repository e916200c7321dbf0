//! The node's TLS identity for QUIC (and HTTPS and the Redis protocol over TLS, when asked for):
//! the cluster CA and the node certificate it signed (`cluster::identity` makes them; a data
//! directory without them becomes a one-node cluster).
//!
//! Files in the data directory: `ca.pem` (give this to clients: they trust exactly it),
//! `ca.key`, `node.pem`, `node.key` (keys are written mode 0600). The node certificate names
//! `localhost`, `127.0.0.1`, `::1`, `grex-peer` and any address given when it was issued; a client
//! verifies it normally against `ca.pem`, so verification is never turned off.

use std::net::IpAddr;
use std::path::Path;

use crate::cluster::identity::NODE_CERT_FILE;
pub use crate::cluster::identity::{CA_FILE, NodeIdentity};

/// Loads the identity in `dir`, creating the CA and node certificate if they are missing.
pub fn load_or_create(dir: &Path, listen_ip: IpAddr) -> anyhow::Result<NodeIdentity> {
    if !dir.join(NODE_CERT_FILE).exists() {
        create(dir, listen_ip)?;
    }
    NodeIdentity::load(dir)
}

fn create(dir: &Path, listen_ip: IpAddr) -> anyhow::Result<()> {
    let names =
        if listen_ip.is_unspecified() || listen_ip.is_loopback() { vec![] } else { vec![listen_ip.to_string()] };
    crate::cluster::identity::init(dir, crate::config::NodeConfig::new(dir).flock_count, 1, &names)?;
    Ok(())
}

/// A TLS acceptor serving `identity` (TLS 1.3 and 1.2, for Redis clients that stop at 1.2),
/// offering `alpn`.
pub fn acceptor(identity: &NodeIdentity, alpn: &[&[u8]]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}
