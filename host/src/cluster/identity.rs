//! Who belongs to the cluster: the cluster file, the cluster CA, node certificates and the
//! credentials bundle that carries them to a new machine.
//!
//! `grex init` (or the first `grex serve` of a data directory without a cluster) writes, in the
//! data directory: `cluster.json` (cluster id, flock count, replication factor), `ca.pem` (the
//! cluster CA: clients and peers trust exactly it), `ca.key` (the CA's key: only on nodes that
//! issue credentials), `node.pem` and `node.key` (this node's certificate, signed by the CA, used
//! both to serve clients and, with mutual TLS, to talk to peers).
//!
//! `grex cluster credentials --out FILE` on a node holding `ca.key` issues a fresh node
//! certificate and writes it, with the CA certificate and the cluster file, into one bundle. The
//! operator copies the bundle to the new machine (scp, a secrets manager) and starts
//! `grex serve --credentials FILE --join ADDR`; the bundle is imported into the data directory on
//! first start and is not needed afterwards. The bundle holds a private key: treat it as a secret.

use std::path::Path;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The cluster file in a data directory.
pub const CLUSTER_FILE: &str = "cluster.json";
/// The CA certificate (clients and peers trust it).
pub const CA_FILE: &str = "ca.pem";
/// The CA key (present only on nodes that can issue credentials).
pub const CA_KEY_FILE: &str = "ca.key";
/// This node's certificate.
pub const NODE_CERT_FILE: &str = "node.pem";
/// This node's key.
pub const NODE_KEY_FILE: &str = "node.key";
/// The name every node certificate carries; peers verify each other against it.
pub const PEER_SERVER_NAME: &str = "grex-peer";
const CA_NAME: &str = "Grex cluster CA";

/// What every node of a cluster agrees on from the start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Random id, hex; a peer from another cluster is refused even if its CA were shared.
    pub cluster_id: String,
    /// Flocks (a power of two), fixed for the cluster's life.
    pub flock_count: u32,
    /// Herders per flock (odd).
    pub replication: u32,
}

impl ClusterFile {
    /// Reads the cluster file of a data directory, if there is one.
    pub fn load(dir: &Path) -> anyhow::Result<Option<ClusterFile>> {
        let path = dir.join(CLUSTER_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).with_context(|| format!("{} is not a cluster file", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// A new node's credentials, issued by a node that holds the CA key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credentials {
    /// The cluster.
    pub cluster: ClusterFile,
    /// CA certificate, PEM.
    pub ca_pem: String,
    /// The new node's certificate, PEM.
    pub node_cert_pem: String,
    /// The new node's key, PEM.
    pub node_key_pem: String,
}

/// Creates a cluster in `dir`: cluster file, CA and this node's certificate. Refuses a directory
/// that already belongs to a cluster.
pub fn init(dir: &Path, flock_count: u32, replication: u32, names: &[String]) -> anyhow::Result<ClusterFile> {
    grex_client::proto::check_flock_count(flock_count).map_err(anyhow::Error::msg)?;
    if replication == 0 || replication.is_multiple_of(2) {
        anyhow::bail!("the replication factor must be odd (1, 3, 5), not {replication}");
    }
    if let Some(existing) = ClusterFile::load(dir)? {
        anyhow::bail!(
            "{} already belongs to cluster {}; use another --data directory",
            dir.display(),
            existing.cluster_id
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    write_file(&dir.join(CA_KEY_FILE), &ca_key.serialize_pem(), true)?;
    write_file(&dir.join(CA_FILE), &ca_cert.pem(), false)?;
    let (cert, key) = issue(&ca_key, names)?;
    write_file(&dir.join(NODE_KEY_FILE), &key, true)?;
    write_file(&dir.join(NODE_CERT_FILE), &cert, false)?;
    let cluster = ClusterFile { cluster_id: hex::encode(rand::random::<[u8; 8]>()), flock_count, replication };
    // Written last: its presence means the identity is complete.
    write_file(&dir.join(CLUSTER_FILE), &serde_json::to_string_pretty(&cluster)?, false)?;
    tracing::info!(cluster = %cluster.cluster_id, dir = %dir.display(), "created a cluster");
    Ok(cluster)
}

/// Issues credentials for a new node from the cluster in `dir` (which must hold `ca.key`).
/// `names` are extra DNS names or IP addresses the new node's certificate should carry.
pub fn issue_credentials(dir: &Path, names: &[String]) -> anyhow::Result<Credentials> {
    let cluster = ClusterFile::load(dir)?
        .with_context(|| format!("{} holds no cluster; run `grex init --data DIR` first", dir.display()))?;
    let key_pem = std::fs::read_to_string(dir.join(CA_KEY_FILE)).with_context(|| {
        format!("{} has no {CA_KEY_FILE}; issue credentials on the node that ran `grex init`", dir.display())
    })?;
    let ca_key = KeyPair::from_pem(&key_pem).context("the CA key does not parse")?;
    let ca_pem = std::fs::read_to_string(dir.join(CA_FILE)).with_context(|| format!("reading {CA_FILE}"))?;
    let (node_cert_pem, node_key_pem) = issue(&ca_key, names)?;
    Ok(Credentials { cluster, ca_pem, node_cert_pem, node_key_pem })
}

/// Writes credentials into a new node's data directory (first start with `--credentials`).
pub fn import(dir: &Path, credentials: &Credentials) -> anyhow::Result<()> {
    if let Some(existing) = ClusterFile::load(dir)? {
        if existing.cluster_id != credentials.cluster.cluster_id {
            anyhow::bail!(
                "{} belongs to cluster {}, but the credentials are for cluster {}",
                dir.display(),
                existing.cluster_id,
                credentials.cluster.cluster_id
            );
        }
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(&dir.join(NODE_KEY_FILE), &credentials.node_key_pem, true)?;
    write_file(&dir.join(NODE_CERT_FILE), &credentials.node_cert_pem, false)?;
    write_file(&dir.join(CA_FILE), &credentials.ca_pem, false)?;
    write_file(&dir.join(CLUSTER_FILE), &serde_json::to_string_pretty(&credentials.cluster)?, false)?;
    Ok(())
}

/// This node's TLS identity, as the data directory holds it: the one place it is read, for the
/// client-facing QUIC server (`api::quic`) and the peer transport (`peer`) alike.
pub struct NodeIdentity {
    /// Node certificate, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
    /// The cluster CA's certificates: the only roots a peer trusts.
    pub ca: Vec<CertificateDer<'static>>,
}

impl NodeIdentity {
    /// Reads the identity in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read =
            |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("reading {name} in {}", dir.display()));
        let mut chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut read(NODE_CERT_FILE)?.as_slice()).collect::<Result<_, _>>()?;
        let ca: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut read(CA_FILE)?.as_slice()).collect::<Result<_, _>>()?;
        chain.extend(ca.iter().cloned());
        let key = rustls_pemfile::private_key(&mut read(NODE_KEY_FILE)?.as_slice())?
            .with_context(|| format!("{NODE_KEY_FILE} holds no private key"))?;
        Ok(NodeIdentity { chain, key, ca })
    }
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// A node certificate (PEM) and key (PEM) signed by the CA. The issuer is rebuilt from the CA's
/// fixed name and its key, which is all a signature needs.
fn issue(ca_key: &KeyPair, extra_names: &[String]) -> anyhow::Result<(String, String)> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned(), PEER_SERVER_NAME.to_owned()];
    names.extend(extra_names.iter().filter(|n| !n.is_empty()).cloned());
    names.dedup();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, "Grex node");
    let key = KeyPair::generate()?;
    let ca_key = KeyPair::from_pem(&ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a file and syncs it; secrets get mode 0600.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_credentials_import_into_a_new_directory_once() {
        let first = tempfile::tempdir().unwrap();
        let cluster = init(first.path(), 64, 3, &[]).unwrap();
        assert!(init(first.path(), 64, 3, &[]).unwrap_err().to_string().contains("already belongs"));
        let creds = issue_credentials(first.path(), &["10.0.0.7".into()]).unwrap();
        assert_eq!(creds.cluster, cluster);
        let second = tempfile::tempdir().unwrap();
        import(second.path(), &creds).unwrap();
        assert_eq!(ClusterFile::load(second.path()).unwrap(), Some(cluster));
        assert!(!second.path().join(CA_KEY_FILE).exists(), "the CA key stays with the issuer");
        let err = issue_credentials(second.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("ran `grex init`"), "{err}");
    }

    #[test]
    fn even_replication_and_odd_flock_counts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(init(dir.path(), 256, 2, &[]).unwrap_err().to_string().contains("odd"));
        assert!(init(dir.path(), 100, 3, &[]).unwrap_err().to_string().contains("power of two"));
    }
}
