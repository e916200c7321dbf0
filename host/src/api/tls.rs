//! The node's TLS identity for QUIC: a CA made on first start and a node certificate it signs.
//!
//! Files in the data directory: `ca.pem` (give this to clients: they trust exactly it),
//! `ca.key`, `node.pem`, `node.key` (keys are written mode 0600). The node certificate names
//! `localhost`, `127.0.0.1`, `::1` and the listen address when it is a specific one; a client
//! verifies it normally against `ca.pem`, so verification is never turned off.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA certificate clients trust.
pub const CA_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const NODE_CERT_FILE: &str = "node.pem";
const NODE_KEY_FILE: &str = "node.key";

/// A certificate chain and its key.
pub struct NodeIdentity {
    /// Node certificate, then the CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
}

impl NodeIdentity {
    /// Loads the identity in `dir`, creating the CA and node certificate if they are missing.
    pub fn load_or_create(dir: &Path, listen_ip: IpAddr) -> anyhow::Result<Self> {
        if !dir.join(NODE_CERT_FILE).exists() {
            create(dir, listen_ip)?;
        }
        let read =
            |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("reading {name} in {}", dir.display()));
        let mut chain: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut read(NODE_CERT_FILE)?.as_slice()).collect::<Result<_, _>>()?;
        chain.extend(rustls_pemfile::certs(&mut read(CA_FILE)?.as_slice()).collect::<Result<Vec<_>, _>>()?);
        let key = rustls_pemfile::private_key(&mut read(NODE_KEY_FILE)?.as_slice())?
            .with_context(|| format!("{NODE_KEY_FILE} holds no private key"))?;
        Ok(NodeIdentity { chain, key })
    }
}

fn create(dir: &Path, listen_ip: IpAddr) -> anyhow::Result<()> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Grex node CA");
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    if !listen_ip.is_unspecified() && !listen_ip.is_loopback() {
        names.push(listen_ip.to_string());
    }
    let mut node_params = CertificateParams::new(names)?;
    node_params.distinguished_name.push(DnType::CommonName, "Grex node");
    let node_key = KeyPair::generate()?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let node_cert = node_params.signed_by(&node_key, &issuer)?;

    write_file(&dir.join(CA_KEY_FILE), &ca_key_pem, true)?;
    write_file(&dir.join(NODE_KEY_FILE), &node_key.serialize_pem(), true)?;
    write_file(&dir.join(CA_FILE), &ca_pem, false)?;
    // Written last: its presence means the identity is complete.
    write_file(&dir.join(NODE_CERT_FILE), &node_cert.pem(), false)?;
    tracing::info!(ca = %dir.join(CA_FILE).display(), "created the node's TLS identity");
    Ok(())
}

fn write_file(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}
