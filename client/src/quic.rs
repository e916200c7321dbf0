//! The native transport: QUIC with TLS 1.3 (quinn + rustls), one bidirectional stream per request.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::ClientError;
use crate::proto::{ALPN, FRAME_BYTES_MAX, Request, Response, ScanEvent, decode_frame, encode_frame, frame_len};

/// A connection with no answer from the node for this long is considered dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(3);

pub(crate) struct QuicTransport {
    // Kept so the endpoint's driver lives as long as the connection.
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl QuicTransport {
    pub(crate) async fn connect(host_port: &str, ca_file: &Path) -> Result<Self, ClientError> {
        let (host, _) = host_port
            .rsplit_once(':')
            .ok_or_else(|| ClientError::Config(format!("`{host_port}` has no port; write HOST:PORT")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addr: SocketAddr = tokio::net::lookup_host(host_port)
            .await
            .map_err(|e| ClientError::Unreachable(format!("cannot resolve {host_port}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Unreachable(format!("{host_port} resolves to no address")))?;
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid literal");
        let mut endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| ClientError::Unreachable(format!("cannot open a UDP socket: {e}")))?;
        endpoint.set_default_client_config(client_config(ca_file)?);
        let connection = endpoint
            .connect(addr, host)
            .map_err(|e| ClientError::Unreachable(format!("{host_port}: {e}")))?
            .await
            .map_err(|e| ClientError::Unreachable(format!("{host_port}: {e}")))?;
        Ok(QuicTransport { _endpoint: endpoint, connection })
    }

    pub(crate) async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let frame = encode_frame(request).map_err(|e| ClientError::Config(e.to_string()))?;
        let (send, mut recv) = self.connection.open_bi().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        // From here on the node may have the request: a failure leaves its outcome unknown.
        send_frame(send, &frame).await.map_err(|e| ClientError::NoAnswer(e.to_string()))?;
        let answer = recv.read_to_end(FRAME_BYTES_MAX + 4).await.map_err(|e| ClientError::NoAnswer(e.to_string()))?;
        decode_frame(&answer).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Runs a scan: one request, answered by a stream of frames, each handed to `on_event` as it
    /// arrives; returns the last one (`None` if the node finished the stream without one).
    pub(crate) async fn scan(
        &self,
        request: &Request,
        on_event: &mut (dyn FnMut(&ScanEvent) + Send),
    ) -> Result<Option<ScanEvent>, ClientError> {
        let frame = encode_frame(request).map_err(|e| ClientError::Config(e.to_string()))?;
        let (send, mut recv) = self.connection.open_bi().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        send_frame(send, &frame).await.map_err(|e| ClientError::NoAnswer(e.to_string()))?;
        let mut last = None;
        loop {
            let mut header = [0u8; 4];
            match recv.read_exact(&mut header).await {
                Ok(()) => {}
                Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(last),
                Err(e) => return Err(ClientError::NoAnswer(e.to_string())),
            }
            let len = frame_len(header).map_err(|e| ClientError::Protocol(e.to_string()))?;
            let mut frame = vec![0; 4 + len];
            frame[..4].copy_from_slice(&header);
            recv.read_exact(&mut frame[4..]).await.map_err(|e| ClientError::NoAnswer(e.to_string()))?;
            match decode_frame(&frame).map_err(|e| ClientError::Protocol(e.to_string()))? {
                Response::Scan(event) => {
                    on_event(&event);
                    last = Some(event);
                }
                Response::Error(e) => return Err(ClientError::Remote(e)),
                other => return Err(ClientError::Protocol(format!("a scan answered with a {} frame", other.kind()))),
            }
        }
    }
}

/// Writes one whole frame on `send` and finishes the stream. If this future is dropped before
/// the frame is written (a timeout, a cancelled caller), the stream is reset, not finished:
/// quinn finishes a dropped stream, and the receiver would take the part that was sent for a
/// whole, truncated frame.
pub async fn send_frame(send: quinn::SendStream, frame: &[u8]) -> Result<quinn::SendStream, quinn::WriteError> {
    struct ResetUnlessWritten(Option<quinn::SendStream>);
    impl Drop for ResetUnlessWritten {
        fn drop(&mut self) {
            if let Some(send) = &mut self.0 {
                let _ = send.reset(0u32.into());
            }
        }
    }
    let mut guard = ResetUnlessWritten(Some(send));
    let send = guard.0.as_mut().expect("set above");
    send.write_all(frame).await?;
    // Finishing fails only on a stream already closed; the write above would have failed first.
    let _ = send.finish();
    Ok(guard.0.take().expect("set above"))
}

/// A QUIC client configuration that trusts exactly the certificates in `ca_file` (PEM).
pub fn client_config(ca_file: &Path) -> Result<quinn::ClientConfig, ClientError> {
    let tls = tls_config(ca_file, ALPN)?;
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| ClientError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Notice a dead node within seconds, and keep an idle connection to a live one open.
    transport.keep_alive_interval(Some(KEEP_ALIVE)).max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("small")));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A TLS 1.3 client configuration that trusts exactly the certificates in `ca_file` and offers
/// `alpn` (QUIC, and HTTPS to a node started with `--http-tls`).
pub fn tls_config(ca_file: &Path, alpn: &[u8]) -> Result<rustls::ClientConfig, ClientError> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| ClientError::Config(format!("cannot read CA file {}: {e}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert =
            cert.map_err(|e| ClientError::Config(format!("{}: not a PEM certificate: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| ClientError::Config(format!("{}: unusable CA certificate: {e}", ca_file.display())))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Config(format!("{} holds no certificate", ca_file.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}
