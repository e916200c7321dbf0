//! Scans in a cluster: each flock's pages come from its leader (this node, or a peer over the
//! peer protocol), which reads them from one view of its store; see [`crate::scan`].

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::messages::{PeerRequest, PeerResponse};
use super::peer::PeerError;
use super::{Cluster, NodeId, node_id_text, parse_node_id};
use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::node::{SCAN_PAGE_BUCKETS, ScanSpec};
use crate::scan::{Paged, Pages};

/// Whether asking again (elsewhere, later) may give what this error refused.
fn passing(e: &RemoteError) -> bool {
    matches!(e.code, ErrorCode::Unavailable | ErrorCode::Overloaded | ErrorCode::ShuttingDown)
}

fn classify(result: Result<crate::node::ScanPage>, node: String) -> Paged {
    match result {
        Ok(page) => Paged::Page { page, node },
        Err(e) if passing(&e) => Paged::Retry(e),
        Err(e) => Paged::Fail(e),
    }
}

impl Cluster {
    /// A peer asks for a page: the first only if this node leads the flock, later ones from the
    /// session it holds.
    pub(super) async fn answer_scan_page(&self, scan: u64, flock: u32, open: Option<ScanSpec>) -> PeerResponse {
        if open.is_some() && self.inner.terms.get(flock).is_none() {
            return PeerResponse::NotLeader { leader: self.leader_of(flock).filter(|l| *l != self.inner.me) };
        }
        PeerResponse::ScanPage(self.inner.node.scan_page(scan, flock, open).await)
    }

    /// Asks `target` for a page, giving up when the failure detector has it down.
    async fn remote_page(&self, target: NodeId, scan: u64, flock: u32, open: Option<ScanSpec>) -> Paged {
        let node = node_id_text(target);
        if !self.inner.peers.alive(target) {
            return Paged::Retry(error(ErrorCode::Unavailable, format!("node {node} is down")));
        }
        // A page runs up to SCAN_PAGE_BUCKETS jobs one after another.
        let timeout = self.inner.node.config().limits.timeout() * SCAN_PAGE_BUCKETS as u32 + Duration::from_secs(10);
        let request = PeerRequest::ScanPage { scan, flock, open };
        let answer = tokio::select! {
            answer = self.inner.peers.call(target, request, timeout) => answer,
            () = self.until_down(target) => {
                return Paged::Retry(error(ErrorCode::Unavailable, format!("node {node} went down")));
            }
        };
        match answer {
            Ok(PeerResponse::ScanPage(result)) => classify(result, node),
            Ok(PeerResponse::NotLeader { .. }) => {
                Paged::Retry(error(ErrorCode::Unavailable, format!("node {node} no longer leads flock {flock}")))
            }
            Ok(PeerResponse::Error(e)) => Paged::Fail(e),
            Ok(other) => Paged::Fail(error(ErrorCode::Internal, format!("unexpected peer answer {other:?}"))),
            Err(e @ PeerError::Protocol(_)) => Paged::Fail(error(ErrorCode::Unavailable, e.to_string())),
            Err(e) => Paged::Retry(error(ErrorCode::Unavailable, e.to_string())),
        }
    }

    /// A page from the node that holds the session (`at`), or else from the flock's leader.
    async fn ask_page(&self, scan: u64, flock: u32, at: Option<String>, open: Option<ScanSpec>) -> Paged {
        let me = self.inner.me;
        let target = match at {
            Some(node) => match parse_node_id(&node) {
                Ok(id) => id,
                Err(e) => return Paged::Fail(error(ErrorCode::Internal, e.to_string())),
            },
            None if self.inner.terms.get(flock).is_some() => me,
            None => match self.route_target(flock) {
                Some(target) => target,
                None => {
                    return Paged::Retry(error(
                        ErrorCode::Unavailable,
                        format!("flock {flock} has no leader this node knows of (an election may be under way)"),
                    ));
                }
            },
        };
        if target == me {
            classify(self.inner.node.scan_page(scan, flock, open).await, node_id_text(me))
        } else {
            self.remote_page(target, scan, flock, open).await
        }
    }
}

impl Pages for Cluster {
    fn flock_count(&self) -> u32 {
        self.inner.file.flock_count
    }

    fn page(&self, scan: u64, flock: u32, at: Option<String>, open: Option<ScanSpec>) -> BoxFuture<'static, Paged> {
        let this = self.clone();
        async move { this.ask_page(scan, flock, at, open).await }.boxed()
    }

    fn fold(&self, module: String, acc: Option<Vec<u8>>, outputs: Vec<Vec<u8>>) -> BoxFuture<'static, Result<Vec<u8>>> {
        let node = self.inner.node.clone();
        async move { node.fold(&module, acc.as_deref(), &outputs).await }.boxed()
    }
}
