//! Consensus messages to each peer travel in batches. Every group's replication stream hands its
//! append or vote to [`Outbox::send`]; one lane per peer takes whatever has queued and sends it as
//! one peer request (`PeerRequest::RaftBatch`), with at most [`LANE_IN_FLIGHT`] batches under way.
//! A loaded node thus makes one QUIC exchange per peer per round trip instead of one per message,
//! and the receiver hands the appends of a batch to its committer together (one fsync). An idle
//! lane sends a lone message at once, so batching adds no delay of its own.
//!
//! Votes, snapshot chunks and messages over [`BATCH_BYTES_MAX`] go on their own exchange.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grex_client::proto::{decode_frame, encode_frame};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::messages::{PeerRequest, PeerResponse, RaftRpc};
use super::peer::{PeerError, Peers};
use super::raft::NodeId;
use crate::error::{ErrorCode, error};
use crate::storage::GroupId;

/// Batches a lane has under way at once; while they are, new messages queue up for the next.
const LANE_IN_FLIGHT: usize = 2;
/// Messages waiting in a lane (each group has at most a few outstanding, so this is slack).
const LANE_QUEUE_MAX: usize = 4096;
/// The most encoded bytes in one batch; a larger message travels alone. About two catch-up
/// appends (each at most `raft::APPEND_BYTES_MAX` of entries): a batch is sent and answered well
/// within [`BATCH_TIMEOUT`] even on a loaded node, so catching up never hangs on one large frame.
pub const BATCH_BYTES_MAX: usize = 2 << 20;
/// How long a batch may take as a whole.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the receiver lets one message of a batch take before it answers an error for it, so
/// one stuck group cannot hold up the answers of every other group in the batch.
pub const BATCH_ITEM_PATIENCE: Duration = Duration::from_secs(3);

/// One group's message, encoded (a frame of its own, so the receiver decodes it with the
/// frame size limit).
pub type BatchItem = (GroupId, serde_bytes::ByteBuf);

struct Pending {
    item: BatchItem,
    answer: oneshot::Sender<Result<PeerResponse, PeerError>>,
}

/// The node's outgoing consensus messages, one lane per peer.
pub struct Outbox {
    peers: Arc<Peers>,
    lanes: Mutex<HashMap<NodeId, mpsc::Sender<Pending>>>,
}

impl Outbox {
    /// An outbox over the peer transport.
    pub fn new(peers: Arc<Peers>) -> Arc<Self> {
        Arc::new(Outbox { peers, lanes: Mutex::new(HashMap::new()) })
    }

    /// The transport.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Sends `rpc` of `group` to `to` in the next batch and waits up to `timeout` for its answer.
    pub async fn send(
        &self,
        to: NodeId,
        group: GroupId,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let bytes = match &rpc {
            // Votes are rare and urgent: behind a batch of catch-up appends an election would
            // time out, and the next one start, before the first vote even arrived.
            RaftRpc::Snapshot(_) | RaftRpc::Vote(_) => None,
            _ => Some(encode_frame(&rpc).map_err(|e| PeerError::Protocol(e.to_string()))?),
        };
        let Some(bytes) = bytes.filter(|b| b.len() <= BATCH_BYTES_MAX) else {
            return self.peers.call(to, PeerRequest::Raft { group, rpc }, timeout).await;
        };
        let (answer, answered) = oneshot::channel();
        let lane = self.lane(to);
        let exchange = async {
            lane.send(Pending { item: (group, serde_bytes::ByteBuf::from(bytes)), answer })
                .await
                .map_err(|_| PeerError::Unreachable(to, "the node is stopping".into()))?;
            answered.await.map_err(|_| PeerError::Lost(to, "the batch was dropped".into()))?
        };
        // The wait covers the queue too: a lane stuck on a dead peer must not hold its callers.
        match tokio::time::timeout(timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(PeerError::Lost(to, format!("no answer within {timeout:?}"))),
        }
    }

    fn lane(&self, to: NodeId) -> mpsc::Sender<Pending> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE_MAX);
                tokio::spawn(run_lane(self.peers.clone(), to, rx));
                tx
            })
            .clone()
    }
}

/// Sends everything queued for `to` as batches, [`LANE_IN_FLIGHT`] at a time.
async fn run_lane(peers: Arc<Peers>, to: NodeId, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(LANE_IN_FLIGHT));
    // A message that did not fit in the last batch.
    let mut held: Option<Pending> = None;
    loop {
        let first = match held.take() {
            Some(pending) => pending,
            None => match queue.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let mut bytes = first.item.1.len();
        let mut batch = vec![first];
        while let Ok(next) = queue.try_recv() {
            if bytes + next.item.1.len() > BATCH_BYTES_MAX {
                held = Some(next);
                break;
            }
            bytes += next.item.1.len();
            batch.push(next);
        }
        let peers = peers.clone();
        tokio::spawn(async move {
            exchange(&peers, to, batch).await;
            drop(permit);
        });
    }
}

/// One batch: sends it and hands each message its answer.
async fn exchange(peers: &Arc<Peers>, to: NodeId, batch: Vec<Pending>) {
    let (items, answers): (Vec<BatchItem>, Vec<_>) = batch.into_iter().map(|p| (p.item, p.answer)).unzip();
    let count = items.len();
    let answer = peers.call(to, PeerRequest::RaftBatch { items }, BATCH_TIMEOUT).await;
    match answer {
        Ok(PeerResponse::RaftBatch(responses)) if responses.len() == count => {
            for (answer, response) in answers.into_iter().zip(responses) {
                let _ = answer.send(Ok(response));
            }
        }
        Ok(PeerResponse::Error(e)) => {
            for answer in answers {
                let _ = answer.send(Ok(PeerResponse::Error(e.clone())));
            }
        }
        Ok(other) => {
            let problem = format!("unexpected answer to a batch of {count} consensus messages: {other:?}");
            for answer in answers {
                let _ = answer.send(Err(PeerError::Protocol(problem.clone())));
            }
        }
        Err(e) => {
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

/// Decodes one message of a received batch.
pub fn decode_item(bytes: &[u8]) -> Result<RaftRpc, PeerResponse> {
    decode_frame(bytes).map_err(|e| {
        PeerResponse::Error(error(ErrorCode::BadRequest, format!("malformed consensus message in a batch: {e}")))
    })
}
