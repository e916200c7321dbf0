//! The native transport: QUIC with TLS 1.3 (quinn + rustls).
//!
//! With a node that has sessions (ALPN [`ALPN_SESSIONS`]), every request but module uploads and
//! scans goes on one session stream per connection: a tagged frame each, answered in any order, so
//! many requests in flight share packets both ways. Uploads (large) and scans (many frames) take
//! a stream of their own, as every request does with an older node (ALPN `grex/1`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;
use crate::proto::{
    ALPN, ALPN_SESSIONS, FRAME_BYTES_MAX, Request, Response, ScanEvent, Tagged, decode_frame, encode_frame, frame_len,
};

/// A connection with no answer from the node for this long is considered dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(3);
/// Requests one session has in flight; more wait for an answer (a node serves at most 256 at
/// once per connection and reads the rest as it answers).
pub const SESSION_IN_FLIGHT_MAX: usize = 256;
/// Frames the session's writer gathers into one write.
const FRAMES_PER_WRITE_MAX: usize = 64;

pub(crate) struct QuicTransport {
    // Kept so the endpoint's driver lives as long as the connection.
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    /// The session stream, opened at first use; `None` if the node has no sessions.
    session: Option<tokio::sync::Mutex<Option<Session>>>,
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
        let sessions = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol)
            .is_some_and(|alpn| alpn == ALPN_SESSIONS);
        let session = sessions.then(|| tokio::sync::Mutex::new(None));
        Ok(QuicTransport { _endpoint: endpoint, connection, session })
    }

    /// Whether the node has sessions.
    pub(crate) fn has_sessions(&self) -> bool {
        self.session.is_some()
    }

    /// Sends one request and waits for its answer: on the session if the node has sessions (but
    /// for an upload, which could hold the session's other answers back behind its bytes).
    pub(crate) async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        match &self.session {
            Some(session) if !matches!(request, Request::PutModule { .. }) => {
                let session = {
                    let mut open = session.lock().await;
                    match &*open {
                        Some(session) if !session.is_closed() => session.clone(),
                        _ => open.insert(Session::open(&self.connection).await?).clone(),
                    }
                };
                session.call(request).await
            }
            _ => self.call_on_stream(request).await,
        }
    }

    /// Sends one request on a stream of its own.
    async fn call_on_stream(&self, request: &Request) -> Result<Response, ClientError> {
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
            let Some(frame) = next_frame(&mut recv).await? else { return Ok(last) };
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

/// Reads the next frame (header included) of a stream that carries one after another; `None`
/// when the stream ends before a frame starts.
async fn next_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, ClientError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(ClientError::NoAnswer(e.to_string())),
    }
    let len = frame_len(header).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut frame = vec![0; 4 + len];
    frame[..4].copy_from_slice(&header);
    recv.read_exact(&mut frame[4..]).await.map_err(|e| ClientError::NoAnswer(e.to_string()))?;
    Ok(Some(frame))
}

/// Callers waiting for their answers, by request id; `None` once the session ended.
type Waiting = Mutex<Option<HashMap<u64, oneshot::Sender<Result<Response, ClientError>>>>>;

/// One session stream: a writer task sends the requests' frames, as many as are queued in one
/// write; a reader task hands each answer to the caller waiting for its id. Dropping the last
/// handle finishes the stream, and the node then ends its side.
#[derive(Clone)]
struct Session {
    frames: mpsc::Sender<Bytes>,
    waiting: Arc<Waiting>,
    slots: Arc<tokio::sync::Semaphore>,
    next_id: Arc<AtomicU64>,
}

impl Session {
    async fn open(connection: &quinn::Connection) -> Result<Session, ClientError> {
        let (mut send, recv) = connection.open_bi().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let opening = encode_frame(&Request::Session).expect("a unit variant encodes");
        send.write_all(&opening).await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let (frames, queued) = mpsc::channel(SESSION_IN_FLIGHT_MAX);
        let waiting = Arc::new(Mutex::new(Some(HashMap::new())));
        tokio::spawn(write_requests(send, queued, waiting.clone()));
        tokio::spawn(read_answers(recv, waiting.clone()));
        let slots = Arc::new(tokio::sync::Semaphore::new(SESSION_IN_FLIGHT_MAX));
        Ok(Session { frames, waiting, slots, next_id: Arc::new(AtomicU64::new(1)) })
    }

    /// Whether the session ended (the stream broke, or the node ended it): a new one is opened.
    fn is_closed(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        let _slot = self.slots.acquire().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&Tagged { id, message: request }).map_err(|e| ClientError::Config(e.to_string()))?;
        let (answer, answered) = oneshot::channel();
        match self.waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(waiting) => waiting.insert(id, answer),
            None => return Err(ClientError::Unreachable("the session to the node ended; try again".into())),
        };
        // A caller that gives up (its future dropped) takes its place in the list with it.
        let _waiting = WaitingFor { waiting: &self.waiting, id };
        // Not queued: the writer is gone, so the request was never written.
        if self.frames.send(Bytes::from(frame)).await.is_err() {
            return Err(ClientError::Unreachable("the session to the node ended; try again".into()));
        }
        // From here on the node may have the request: a failure leaves its outcome unknown.
        answered.await.unwrap_or_else(|_| Err(ClientError::NoAnswer("the session to the node ended".into())))
    }
}

/// A caller's place among those waiting, given up when it stops waiting, answered or not.
struct WaitingFor<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for WaitingFor<'_> {
    fn drop(&mut self) {
        if let Some(waiting) = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            waiting.remove(&self.id);
        }
    }
}

/// Ends a session: every caller still waiting learns that its request may or may not have run.
fn end_session(waiting: &Waiting, why: &str) {
    let ended = waiting.lock().unwrap_or_else(|p| p.into_inner()).take();
    for (_, answer) in ended.into_iter().flatten() {
        let _ = answer.send(Err(ClientError::NoAnswer(why.to_owned())));
    }
}

/// The session's writer: requests sent at once share packets ([`write_queued_frames`]).
/// Finishes the stream once every handle is dropped.
async fn write_requests(mut send: quinn::SendStream, queued: mpsc::Receiver<Bytes>, waiting: Arc<Waiting>) {
    match write_queued_frames(&mut send, queued).await {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => end_session(&waiting, &format!("the session's stream broke: {e}")),
    }
}

/// Writes frames to `send` as they are queued, whatever is queued at once in one write (a
/// session's writer, on either side), until every sender is dropped.
pub async fn write_queued_frames(
    send: &mut quinn::SendStream,
    mut queued: mpsc::Receiver<Bytes>,
) -> Result<(), quinn::WriteError> {
    let mut batch = Vec::with_capacity(FRAMES_PER_WRITE_MAX);
    while queued.recv_many(&mut batch, FRAMES_PER_WRITE_MAX).await > 0 {
        send.write_all_chunks(&mut batch).await?;
        batch.clear();
    }
    Ok(())
}

/// The session's reader: hands each answer to its caller, until the stream ends.
async fn read_answers(mut recv: quinn::RecvStream, waiting: Arc<Waiting>) {
    let why = loop {
        let frame = match next_frame(&mut recv).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "the node ended the session".to_owned(),
            Err(e) => break e.to_string(),
        };
        let answer = match decode_frame::<Tagged<Response>>(&frame) {
            Ok(answer) => answer,
            Err(e) => break format!("unexpected answer from the node: {e}"),
        };
        // Id 0 is no request's: the node ends the session, and says why.
        if answer.id == 0 {
            break match answer.message {
                Response::Error(e) => format!("the node ended the session: {e}"),
                other => format!("the node ended the session with a {} answer", other.kind()),
            };
        }
        let caller = waiting.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|w| w.remove(&answer.id));
        // No caller: it gave up before the answer came.
        if let Some(caller) = caller {
            let _ = caller.send(Ok(answer.message));
        }
    };
    end_session(&waiting, &why);
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
    let mut tls = tls_config(ca_file, ALPN_SESSIONS)?;
    tls.alpn_protocols.push(ALPN.to_vec());
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
