//! The QUIC API (quinn + rustls, ALPN `grex/2` or `grex/1`): one bidirectional stream per
//! request, one frame each way, or many requests on one session stream (ALPN `grex/2`), each
//! answered as it is done (`docs/wire.md`).
//!
//! Limits: connections at once ([`CONNECTIONS_MAX`]), streams per connection
//! ([`STREAMS_PER_CONNECTION_MAX`]), frame size ([`FRAME_BYTES_MAX`]), and the time a request may
//! take to arrive ([`REQUEST_READ_TIMEOUT`]), so a slow or half-sent request cannot pin memory.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grex_client::proto::{
    ALPN, ALPN_SESSIONS, FRAME_BYTES_MAX, Request, Response, Tagged, decode_frame, encode_frame, frame_len,
};
use grex_client::quic::{send_frame, write_queued_frames};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::Gate;
use super::budget::{Claim, FREE_BYTES, ReadBudget};
use super::tls::NodeIdentity;
use crate::access::Caller;
use crate::error::{ErrorCode, RemoteError, error};
use crate::node::{Node, NodeChange, Service};

/// Client connections served at once; more are refused.
pub const CONNECTIONS_MAX: usize = 1024;
/// Requests in flight on one connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// How long a request may take to arrive.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn start(
    node: Node,
    addr: SocketAddr,
    identity: &NodeIdentity,
    mut gate: Gate,
    budget: Arc<ReadBudget>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let endpoint = quinn::Endpoint::server(server_config(identity)?, addr)
        .map_err(|e| anyhow::anyhow!("cannot listen for QUIC on {addr}: {e}"))?;
    let bound = endpoint.local_addr()?;
    let task = tokio::spawn(async move {
        let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let mut stop = gate.stopped.clone();
        // Stopped before it was opened: nothing to accept.
        if let Some(service) = gate.opened().await {
            let serving = Serving { node, service };
            loop {
                tokio::select! {
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        let Ok(permit) = connections.clone().try_acquire_owned() else {
                            tracing::warn!(remote = %incoming.remote_address(), "refusing a QUIC connection: at the connection limit");
                            incoming.refuse();
                            continue;
                        };
                        let (serving, budget) = (serving.clone(), budget.clone());
                        tokio::spawn(async move {
                            serve_connection(serving, incoming, budget).await;
                            drop(permit);
                        });
                    }
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        }
        endpoint.close(0u32.into(), b"node shutting down");
        endpoint.wait_idle().await;
    });
    Ok((bound, task))
}

fn server_config(identity: &NodeIdentity) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    // Sessions first: a client that offers them gets them (`grex_client::quic`).
    tls.alpn_protocols = vec![ALPN_SESSIONS.to_vec(), ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// What a request is answered by: the node for what it answers itself, the service for what a
/// cluster routes.
#[derive(Clone)]
struct Serving {
    node: Node,
    service: Arc<dyn Service>,
}

impl Serving {
    /// Answers one request of the connection signed in as `caller` says.
    async fn answer(&self, request: Request, caller: &Mutex<Caller>) -> Response {
        let (node, service) = (&self.node, &self.service);
        let signed_in = caller.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Request::Authenticate { token } = &request {
            return match super::sign_in(service.as_ref(), signed_in, token) {
                Ok((caller_now, user)) => {
                    *caller.lock().unwrap_or_else(|p| p.into_inner()) = caller_now;
                    Response::User(user)
                }
                Err(e) => Response::Error(e),
            };
        }
        if let Err(e) = service.authorize(&signed_in, super::request_action(&request)) {
            return Response::Error(e);
        }
        let result = match request {
            Request::PutModule { name, wasm } => service.put_module(name, wasm).await.map(Response::Module),
            Request::DeleteModule { name } => service.delete_module(name).await.map(Response::Module),
            Request::RunJob { bucket, module, input, read_only } => {
                service.run_job(bucket, module, input, read_only).await.map(Response::Job)
            }
            Request::GetItem { bucket, item } => node.get_item(&bucket, &item).await.map(Response::Item),
            Request::ListItems { bucket, prefix, start_after, limit } => {
                node.list_items(&bucket, &prefix, start_after.as_deref(), limit).await.map(Response::Items)
            }
            Request::Canary { bucket } => service.canary(bucket, false).await.map(Response::Canary),
            Request::Flocks => Ok(Response::Flocks(service.flocks())),
            Request::Nodes => service.nodes().map(Response::Nodes),
            Request::DrainNode { node } => service.change_node(node, NodeChange::Drain).await.map(Response::Nodes),
            Request::RemoveNode { node } => service.change_node(node, NodeChange::Remove).await.map(Response::Nodes),
            Request::Status => Ok(Response::Status(node.status())),
            Request::RecentJobs => Ok(Response::RecentJobs(node.recent_jobs())),
            Request::ClusterStats => Ok(Response::ClusterStats(service.cluster_stats().await)),
            Request::ListModules => Ok(Response::Modules(node.modules())),
            Request::Users => Ok(Response::Users(service.users())),
            Request::AddUser { name, permissions } => {
                super::add_user(service.as_ref(), name, permissions).await.map(Response::NewUser)
            }
            Request::SetUser { name, permissions } => {
                super::set_user(service.as_ref(), name, permissions).await.map(Response::User)
            }
            Request::DeleteUser { name } => super::delete_user(service.as_ref(), name).await.map(Response::User),
            Request::Authenticate { .. } => unreachable!("answered above"),
            Request::Scan(_) | Request::Session => {
                unreachable!("a stream of their own: `stream_scan`, `serve_session`")
            }
        };
        result.unwrap_or_else(Response::Error)
    }
}

impl Serving {
    /// Answers a scan with a frame per event, as they come; a client that stops reading stops it.
    async fn stream_scan(
        &self,
        mut send: quinn::SendStream,
        scan: grex_client::proto::ScanRequest,
        caller: &Mutex<Caller>,
    ) -> anyhow::Result<()> {
        let signed_in = caller.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(e) = super::authorize_scan(self.service.as_ref(), &signed_in, &scan) {
            return send_answer(send, &Response::Error(e), |e| Response::Error(error(ErrorCode::Internal, e))).await;
        }
        let mut events = self.service.scan(scan);
        while let Some(event) = events.recv().await {
            let frame = encode_frame(&Response::Scan(event))?;
            send.write_all(&frame).await?;
        }
        send.finish()?;
        let _ = send.stopped().await;
        Ok(())
    }
}

async fn serve_connection(serving: Serving, incoming: quinn::Incoming, budget: Arc<ReadBudget>) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "QUIC handshake failed");
            return;
        }
    };
    // Who the connection signed in as: set by an `Authenticate` request, which a client sends
    // first and waits for.
    let caller = Arc::new(Mutex::new(Caller::from(remote)));
    let _counted = serving.node.metrics().connection(crate::metrics::Protocol::Quic);
    // Requests in flight over all of the connection's sessions.
    let session_slots = Arc::new(Semaphore::new(STREAMS_PER_CONNECTION_MAX as usize));
    while let Ok((send, recv)) = connection.accept_bi().await {
        let stream = Stream { serving: serving.clone(), budget: budget.clone(), caller: caller.clone() };
        let session_slots = session_slots.clone();
        tokio::spawn(async move {
            if let Err(e) = stream.serve(send, recv, session_slots).await {
                tracing::debug!(%remote, error = %e, "QUIC request stream failed");
            }
        });
    }
}

/// What a stream of a connection is served with.
struct Stream {
    serving: Serving,
    budget: Arc<ReadBudget>,
    /// Who the connection signed in as.
    caller: Arc<Mutex<Caller>>,
}

impl Stream {
    /// Serves one stream: a request and its answer, a scan, or a session.
    async fn serve(
        self,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        session_slots: Arc<Semaphore>,
    ) -> anyhow::Result<()> {
        let mut claim = self.budget.claim();
        let read = async {
            let frame = next_frame_within(&mut recv, Some(&mut claim))
                .await?
                .ok_or_else(|| error(ErrorCode::BadRequest, "the stream ended before its frame"))?;
            let request = decode_frame::<Request>(&frame).map_err(|e| error(ErrorCode::BadRequest, e.to_string()))?;
            // A session's requests follow its first frame; any other request is the stream's last frame.
            if request != Request::Session {
                read_end(&mut recv, frame.len() - 4).await?;
            }
            Ok(request)
        };
        let response = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read).await {
            Err(_) => Response::Error(too_late()),
            Ok(Err(e)) => Response::Error(e),
            Ok(Ok(request)) => {
                // Whole: the bytes are the request's now, not a request in part.
                drop(claim);
                match request {
                    Request::Scan(scan) => return self.serving.stream_scan(send, scan, &self.caller).await,
                    Request::Session => return self.serve_session(send, recv, session_slots).await,
                    request => self.serving.answer(request, &self.caller).await,
                }
            }
        };
        send_answer(send, &response, |e| Response::Error(error(ErrorCode::Internal, e))).await
    }

    /// Serves a session (`Request::Session`): reads tagged requests one after another, each
    /// answered by a task of its own as soon as it is done, and whatever answers are ready go out
    /// in one write. At most `slots` requests of the connection are served at once; the next
    /// frame is read when one is answered. A frame that cannot be read or decoded ends the session
    /// with an answer tagged 0 that says why, after the answers in flight.
    async fn serve_session(
        self,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        slots: Arc<Semaphore>,
    ) -> anyhow::Result<()> {
        let (answers, ready) = mpsc::channel::<Bytes>(STREAMS_PER_CONNECTION_MAX as usize);
        let writer = tokio::spawn(write_answers(send, ready));
        // One buffer for every request frame of the session.
        let mut frame = Vec::new();
        let ended = loop {
            let slot = slots.clone().acquire_owned().await?;
            // Between requests a session may idle as a connection may; a frame once begun must
            // arrive in time.
            let header = match next_header(&mut recv).await {
                Ok(Some(header)) => header,
                Ok(None) => break None,
                Err(e) => break Some(e),
            };
            let mut claim = self.budget.claim();
            let body =
                tokio::time::timeout(REQUEST_READ_TIMEOUT, read_body(&mut recv, header, Some(&mut claim), &mut frame));
            match body.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => break Some(e),
                Err(_) => break Some(too_late()),
            };
            drop(claim);
            let decoded = decode_frame::<Tagged<Request>>(&frame);
            // The claim is gone: a large request's buffer goes with it.
            drop_if_larger(&mut frame, FREE_BYTES);
            let Tagged { id, message: request } = match decoded {
                Ok(tagged) => tagged,
                Err(e) => break Some(error(ErrorCode::BadRequest, format!("a malformed session frame: {e}"))),
            };
            let (serving, caller, answers) = (self.serving.clone(), self.caller.clone(), answers.clone());
            tokio::spawn(async move {
                let response = match request {
                    Request::Scan(_) | Request::Session => Response::Error(error(
                        ErrorCode::BadRequest,
                        "a scan or a session needs a stream of its own, not a session's",
                    )),
                    request => serving.answer(request, &caller).await,
                };
                let _ = answers.send(tagged_frame(id, &response)).await;
                drop(slot);
            });
        };
        if let Some(why) = ended {
            let _ = answers.send(tagged_frame(0, &Response::Error(why))).await;
        }
        drop(answers);
        writer.await?
    }
}

/// The frame of an answer on a session (an answer that cannot be encoded becomes `internal`).
fn tagged_frame(id: u64, response: &Response) -> Bytes {
    let frame = encode_frame(&Tagged { id, message: response }).unwrap_or_else(|e| {
        let internal = Response::Error(error(ErrorCode::Internal, format!("cannot encode the answer: {e}")));
        encode_frame(&Tagged { id, message: &internal }).expect("an error message is bounded")
    });
    Bytes::from(frame)
}

/// A session's writer: answers finished at once share packets. Finishes the stream after the
/// last answer.
async fn write_answers(mut send: quinn::SendStream, ready: mpsc::Receiver<Bytes>) -> anyhow::Result<()> {
    write_queued_frames(&mut send, ready).await?;
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// The answer to a request that did not arrive in time.
fn too_late() -> RemoteError {
    error(ErrorCode::BadRequest, format!("the request did not arrive within {} s", REQUEST_READ_TIMEOUT.as_secs()))
}

/// Reads one whole frame (header included) from a stream. Memory grows with the bytes that
/// actually arrive (bounded by QUIC flow control), not with the length the sender announces.
pub(crate) async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, String> {
    let frame = next_frame_within(recv, None)
        .await
        .and_then(|frame| frame.ok_or_else(|| error(ErrorCode::BadRequest, "the stream ended before its frame")))
        .map_err(|e| e.message)?;
    // The sender must finish the stream after the frame: anything more is not a frame of ours.
    read_end(recv, frame.len() - 4).await.map_err(|e| e.message)?;
    Ok(frame)
}

/// Checks that the stream ends here, after a `len`-byte frame.
pub(crate) async fn read_end(recv: &mut quinn::RecvStream, len: usize) -> Result<(), RemoteError> {
    let bad = |message: String| error(ErrorCode::BadRequest, message);
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(bad(format!("more bytes followed the {len}-byte frame"))),
        Err(e) => Err(bad(format!("reading a {len}-byte frame: {e}"))),
    }
}

/// Reads the next frame of a stream that carries one frame after another; `None` when the
/// stream ends before a frame starts.
pub(crate) async fn read_next_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, String> {
    next_frame_within(recv, None).await.map_err(|e| e.message)
}

/// Reads the next frame of a stream from a peer of the cluster (authenticated, so trusted with
/// the length it announces) into `frame`, sized for it at once rather than grown as bytes arrive:
/// a reader that reuses one buffer touches its pages once, not again for each frame and each
/// doubling. False when the stream ends before a frame starts.
pub(crate) async fn read_next_peer_frame(recv: &mut quinn::RecvStream, frame: &mut Vec<u8>) -> Result<bool, String> {
    let Some(header) = next_header(recv).await.map_err(|e| e.message)? else { return Ok(false) };
    let len = frame_len(header).map_err(|e| e.to_string())?;
    frame.clear();
    frame.reserve_exact(4 + len);
    read_body(recv, header, None, frame).await.map_err(|e| e.message)?;
    Ok(true)
}

/// [`read_next_frame`], holding the bytes received so far on `claim` (when given); the frame
/// returned includes its header.
async fn next_frame_within(
    recv: &mut quinn::RecvStream,
    claim: Option<&mut Claim>,
) -> Result<Option<Vec<u8>>, RemoteError> {
    let Some(header) = next_header(recv).await? else { return Ok(None) };
    let mut frame = Vec::new();
    read_body(recv, header, claim, &mut frame).await?;
    Ok(Some(frame))
}

/// Frees `buffer` if it holds more than `keep` bytes of capacity, so that a reader reusing one
/// buffer keeps a large one only while it is in use.
fn drop_if_larger(buffer: &mut Vec<u8>, keep: usize) {
    if buffer.capacity() > keep {
        *buffer = Vec::new();
    }
}

/// Reads the header of a stream's next frame; `None` when the stream ends before one starts.
async fn next_header(recv: &mut quinn::RecvStream) -> Result<Option<[u8; 4]>, RemoteError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => Ok(Some(header)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(e) => Err(error(ErrorCode::BadRequest, format!("reading a frame header: {e}"))),
    }
}

/// Reads the rest of the frame `header` starts into `frame` (cleared first; header included),
/// holding the bytes received so far on `claim` (when given). The buffer grows with the bytes
/// that arrive, past [`FREE_BYTES`], not with the length the header announces.
async fn read_body(
    recv: &mut quinn::RecvStream,
    header: [u8; 4],
    mut claim: Option<&mut Claim>,
    frame: &mut Vec<u8>,
) -> Result<(), RemoteError> {
    let bad = |message: String| error(ErrorCode::BadRequest, message);
    let len = frame_len(header).map_err(|e| bad(e.to_string()))?;
    debug_assert!(len <= FRAME_BYTES_MAX);
    frame.clear();
    frame.reserve(4 + len.min(FREE_BYTES));
    frame.extend_from_slice(&header);
    while frame.len() < 4 + len {
        let chunk = recv.read_chunk(4 + len - frame.len(), true).await;
        match chunk.map_err(|e| bad(format!("reading a {len}-byte frame: {e}")))? {
            Some(chunk) => {
                if let Some(claim) = claim.as_deref_mut() {
                    claim.set(frame.len() + chunk.bytes.len())?;
                }
                frame.extend_from_slice(&chunk.bytes);
            }
            None => return Err(bad(format!("the stream ended {} bytes into a {len}-byte frame", frame.len() - 4))),
        }
    }
    Ok(())
}

/// Writes one answer frame and finishes the stream (an answer that cannot be encoded becomes
/// `internal(message)`), then waits until the other side has it, so the stream is not reset
/// under it.
pub(crate) async fn send_answer<T: serde::Serialize>(
    send: quinn::SendStream,
    answer: &T,
    internal: impl FnOnce(String) -> T,
) -> anyhow::Result<()> {
    let frame = encode_frame(answer).or_else(|e| encode_frame(&internal(format!("cannot encode the answer: {e}"))))?;
    let send = send_frame(send, &frame).await?;
    let _ = send.stopped().await;
    Ok(())
}
