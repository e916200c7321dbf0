//! Routing: every job goes where it should run. A node runs a job itself when it leads the
//! flock (or, read-only, herds it); otherwise it sends it one hop to the leader, follows one
//! redirect at once and then retries every 50 ms within [`ROUTE_PATIENCE`], and sends it through
//! a third herder when only its own link to the leader is cut. Canaries and the flock listing
//! answer from the same view.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use grex_client::proto::{self, Canary, FlockInfo, FlockMapInfo, JobOutput, ModuleInfo, NodesInfo, UserInfo};

use super::messages::{PeerRequest, PeerResponse};
use super::{Cluster, NodeId, decide, node_id_text, peer};
use crate::access::{self, Action, Caller, Identity, UserChange};
use crate::error::{ErrorCode, RemoteError, Result, error};
use crate::node::{NodeChange, RespNode, Service};
use crate::storage::{GroupId, META_GROUP};

/// How long a routed job keeps looking for its flock's leader (an election takes about 1 s).
pub(super) const ROUTE_PATIENCE: Duration = Duration::from_secs(4);

/// What came of forwarding a job to a peer.
enum Forwarded {
    /// The job's outcome, for the client.
    Answer(Result<JobOutput>),
    /// The peer does not lead the flock; it named its best guess of who does, if any.
    Redirect(Option<NodeId>),
    /// The job did not run and may be tried again.
    Failed(RemoteError),
}

impl Cluster {
    /// Where to send a job for `flock` this node does not run itself: its leader if known, else
    /// any live herder (which knows the leader or redirects). `None` while this node itself is
    /// about to lead (elected, not caught up yet).
    pub(super) fn route_target(&self, flock: u32) -> Option<NodeId> {
        decide::route(self.inner.me, self.leader_of(flock), &self.herders(flock), &|n| self.inner.peers.alive(n))
    }

    /// The voters of a group (itself included; for a flock this node does not herd, the herders
    /// in the flock map), and whether this node can reach a majority of them.
    fn quorum_view(&self, group: GroupId) -> (Vec<NodeId>, bool) {
        let voters: Vec<NodeId> = if group == META_GROUP || self.herds(group) {
            self.voters(group).into_iter().collect()
        } else {
            self.herders(group)
        };
        let alive = voters.iter().filter(|v| self.inner.peers.alive(**v)).count();
        let majority = alive * 2 > voters.len();
        (voters, majority)
    }

    pub(super) fn has_quorum(&self, group: GroupId) -> bool {
        self.quorum_view(group).1
    }

    fn no_quorum(&self, flock: u32) -> RemoteError {
        let (voters, _) = self.quorum_view(flock);
        let view: Vec<String> = voters
            .iter()
            .map(|v| format!("{} {}", node_id_text(*v), if self.inner.peers.alive(*v) { "up" } else { "unreachable" }))
            .collect();
        error(
            ErrorCode::NoQuorum,
            format!(
                "this node cannot reach a majority of flock {flock}'s herders ({}), so it refuses writes; \
                 retry on another node",
                view.join(", ")
            ),
        )
    }

    /// Runs a job where it belongs: here if this node leads the flock (or, read-only, herds it),
    /// else one hop to the leader, following redirects until [`ROUTE_PATIENCE`] runs out.
    async fn route_job(&self, bucket: Vec<u8>, module: String, input: Vec<u8>, read_only: bool) -> Result<JobOutput> {
        proto::check_bucket_key(&bucket)?;
        let flock = proto::flock_of(&bucket, self.inner.file.flock_count);
        let deadline = Instant::now() + ROUTE_PATIENCE;
        let mut last_error = None;
        if !read_only && !self.has_quorum(flock) {
            return Err(self.no_quorum(flock));
        }
        // The leader the last redirect named, and how many redirects were followed: only the
        // first goes at once, so nodes with stale views cannot bounce a job at network speed.
        let (mut redirect, mut redirects) = (None::<NodeId>, 0);
        // A job counts as forwarded once, however many tries and redirects it takes.
        let mut counted = false;
        loop {
            if let Some(local) = self.try_here(flock, &bucket, &module, &input, read_only).await {
                match local {
                    Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => last_error = Some(e),
                    other => return other,
                }
            } else if let Some(target) = redirect.take().or_else(|| self.route_target(flock)) {
                // A leader this node cannot reach may still lead the others (a cut between two
                // nodes): a herder that reaches it passes the job on. (The herders are looked up
                // only then: this runs for every forwarded job.)
                let alive = |n| self.inner.peers.alive(n);
                let via = (!alive(target)).then(|| decide::relay(self.inner.me, target, &self.herders(flock), &alive));
                let via = via.flatten();
                let relay = via.is_some();
                if !std::mem::replace(&mut counted, true) {
                    self.inner.node.count_forwarded();
                }
                match self.forward_job(via.unwrap_or(target), &bucket, &module, &input, read_only, relay).await {
                    // The leader has yet to apply the meta entry that named the module here (an
                    // upload is answered once the node it went through applied it). Nothing ran
                    // there, so the job goes again.
                    Forwarded::Answer(Err(e))
                        if e.code == ErrorCode::ModuleNotFound
                            && Instant::now() < deadline
                            && self.inner.node.module_named(&module).is_ok() =>
                    {
                        last_error = Some(e)
                    }
                    Forwarded::Answer(result) => return result,
                    Forwarded::Redirect(hint) => {
                        self.inner.node.metrics().redirected();
                        redirect = hint;
                        redirects += 1;
                        if redirects == 1 && hint.is_some() {
                            continue;
                        }
                    }
                    Forwarded::Failed(e) => last_error = Some(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(last_error.unwrap_or_else(|| {
                    error(
                        ErrorCode::Unavailable,
                        format!("flock {flock} has no reachable leader (an election may be under way); retry shortly"),
                    )
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a job to `target`, which should lead its flock (or, with `relay`, pass it on to the
    /// leader, which this node cannot reach).
    async fn forward_job(
        &self,
        target: NodeId,
        bucket: &[u8],
        module: &str,
        input: &[u8],
        read_only: bool,
        relay: bool,
    ) -> Forwarded {
        let flock = proto::flock_of(bucket, self.inner.file.flock_count);
        if !self.inner.peers.alive(target) {
            // The failure detector has it down: wait for the election instead.
            return Forwarded::Failed(error(
                ErrorCode::Unavailable,
                format!("flock {flock}'s leader {target:016x} is down and a new one is being elected; retry shortly"),
            ));
        }
        let request = PeerRequest::Job {
            bucket: bucket.to_vec(),
            module: module.to_owned(),
            input: input.to_vec(),
            read_only,
            relay,
        };
        let timeout = self.inner.node.config().limits.timeout() + Duration::from_secs(10);
        let answer = tokio::select! {
            answer = self.inner.peers.call(target, request, timeout) => answer,
            () = self.until_down(target) => return Forwarded::Answer(Err(error(
                ErrorCode::OutcomeUnknown,
                "the node running the job went down before answering; the job may have committed, so read before retrying",
            ))),
        };
        let hint = &self.inner.hints[flock as usize];
        match answer {
            // Nothing took effect there (the lead moved, or is moving, under the job): the job
            // goes again, to whoever leads by then, until the router's patience runs out.
            Ok(PeerResponse::Job(Err(e))) if e.code == ErrorCode::Unavailable => Forwarded::Failed(e),
            Ok(PeerResponse::Job(result)) => {
                if !relay {
                    hint.store(target, Ordering::Relaxed);
                }
                Forwarded::Answer(result)
            }
            Ok(PeerResponse::NotLeader { leader }) => {
                let leader = leader.filter(|l| *l != self.inner.me && *l != target);
                hint.store(leader.unwrap_or(0), Ordering::Relaxed);
                Forwarded::Redirect(leader)
            }
            Ok(PeerResponse::Error(e)) => Forwarded::Answer(Err(e)),
            Ok(other) => {
                Forwarded::Answer(Err(error(ErrorCode::Internal, format!("unexpected peer answer {other:?}"))))
            }
            Err(e) if !read_only && e.may_have_arrived() => Forwarded::Answer(Err(error(
                ErrorCode::OutcomeUnknown,
                format!("{e}; the job may have committed, so read before retrying"),
            ))),
            Err(e) => Forwarded::Failed(e.into()),
        }
    }

    /// Resolves once the failure detector considers `peer` down.
    pub(super) async fn until_down(&self, peer: NodeId) {
        while self.inner.peers.alive(peer) {
            tokio::time::sleep(peer::PING_INTERVAL).await;
        }
    }

    /// Runs the job here if this node should; `None` if it belongs elsewhere.
    async fn try_here(
        &self,
        flock: u32,
        bucket: &[u8],
        module: &str,
        input: &[u8],
        read_only: bool,
    ) -> Option<Result<JobOutput>> {
        let leads = self.inner.terms.get(flock).is_some();
        let herds = read_only && self.herds(flock);
        if !leads && !herds {
            return None;
        }
        if leads && !read_only && !self.has_quorum(flock) {
            return Some(Err(self.no_quorum(flock)));
        }
        Some(self.inner.node.run_job(bucket, module, input.to_vec(), read_only).await)
    }

    /// A peer forwarded (or relayed) a job: run it here if this node should, else pass it on
    /// once (a relayed job) or say who leads.
    pub(super) async fn answer_job(
        &self,
        bucket: Vec<u8>,
        module: String,
        input: Vec<u8>,
        read_only: bool,
        relay: bool,
    ) -> PeerResponse {
        // A peer's bytes are checked as a client's are (empty, or over the limit).
        if let Err(e) = proto::check_bucket_key(&bucket) {
            return PeerResponse::Job(Err(e));
        }
        let flock = proto::flock_of(&bucket, self.inner.file.flock_count);
        if let Some(result) = self.try_here(flock, &bucket, &module, &input, read_only).await {
            return PeerResponse::Job(result);
        }
        let leader = self.leader_of(flock).filter(|l| *l != self.inner.me);
        match leader {
            // Passed on once, never relayed again: a job travels at most two hops.
            Some(target) if relay && self.inner.peers.alive(target) => {
                self.inner.node.count_forwarded();
                match self.forward_job(target, &bucket, &module, &input, read_only, false).await {
                    Forwarded::Answer(result) => PeerResponse::Job(result),
                    Forwarded::Redirect(hint) => PeerResponse::NotLeader { leader: hint },
                    Forwarded::Failed(_) => PeerResponse::NotLeader { leader },
                }
            }
            leader => PeerResponse::NotLeader { leader },
        }
    }
}

impl Service for Cluster {
    fn run_job(
        &self,
        bucket: Vec<u8>,
        module: String,
        input: Vec<u8>,
        read_only: bool,
    ) -> BoxFuture<'static, Result<JobOutput>> {
        let this = self.clone();
        async move { this.route_job(bucket, module, input, read_only).await }.boxed()
    }

    fn put_module(&self, name: String, wasm: Vec<u8>) -> BoxFuture<'static, Result<ModuleInfo>> {
        let this = self.clone();
        async move { this.store_module(name, wasm).await }.boxed()
    }

    fn delete_module(&self, name: String) -> BoxFuture<'static, Result<ModuleInfo>> {
        let this = self.clone();
        async move { this.remove_module(name).await }.boxed()
    }

    fn canary(&self, bucket: Vec<u8>, read_only: bool) -> BoxFuture<'static, Result<Canary>> {
        let this = self.clone();
        async move {
            proto::check_bucket_key(&bucket)?;
            // Its bucket version is read from the store.
            this.inner.node.commits().settle().await;
            this.canary_now(&bucket, read_only)
        }
        .boxed()
    }

    fn flocks(&self) -> FlockMapInfo {
        let state = self.meta_state();
        FlockMapInfo {
            version: state.map.version,
            nodes: state.nodes.iter().map(|(id, info)| (node_id_text(*id), info.http.clone())).collect(),
            flocks: state
                .map
                .herders
                .iter()
                .enumerate()
                .map(|(flock, herders)| FlockInfo {
                    flock: flock as u32,
                    herders: herders.iter().map(|h| node_id_text(*h)).collect(),
                    leader: self.leader_of(flock as u32).map(node_id_text),
                    // Only herders see the group; others go by its leader's claim.
                    settled: if self.herds(flock as u32) {
                        self.herders_wanted(flock as u32).is_none()
                    } else {
                        self.live_claim(flock as u32).is_some_and(|c| c.settled)
                    },
                    log_purged: self.inner.consensus.view(flock as u32).map_or(0, |v| v.first.saturating_sub(1)),
                })
                .collect(),
            meta_log_purged: self.inner.consensus.view(META_GROUP).map_or(0, |v| v.first.saturating_sub(1)),
        }
    }

    fn nodes(&self) -> Result<NodesInfo> {
        Ok(self.nodes_info())
    }

    fn change_node(&self, node: String, change: NodeChange) -> BoxFuture<'static, Result<NodesInfo>> {
        let this = self.clone();
        async move {
            let id = super::parse_node_id(&node).map_err(|e| error(ErrorCode::BadRequest, e.to_string()))?;
            this.change_node(id, change).await?;
            Ok(this.nodes_info())
        }
        .boxed()
    }

    fn cluster_stats(&self) -> BoxFuture<'static, grex_client::proto::ClusterStats> {
        let this = self.clone();
        async move { this.cluster_stats().await }.boxed()
    }

    fn scan(&self, request: proto::ScanRequest) -> tokio::sync::mpsc::Receiver<proto::ScanEvent> {
        crate::scan::start(std::sync::Arc::new(self.clone()), request)
    }

    fn authorize(&self, caller: &Caller, action: Action<'_>) -> Result<()> {
        access::authorize(&self.inner.meta_state.borrow().users, caller, action)
    }

    fn authenticate(&self, token: &str) -> Result<Identity> {
        access::authenticate(&self.inner.meta_state.borrow().users, token)
    }

    fn users(&self) -> Vec<UserInfo> {
        access::user_list(&self.inner.meta_state.borrow().users)
    }

    fn change_user(&self, change: UserChange) -> BoxFuture<'static, Result<()>> {
        let this = self.clone();
        async move { this.change_user(change).await }.boxed()
    }

    fn resp_nodes(&self) -> Vec<RespNode> {
        self.meta_state()
            .nodes
            .iter()
            .filter(|(_, info)| !info.resp.is_empty())
            .map(|(id, info)| RespNode { id: node_id_text(*id), resp: info.resp.clone(), peer: info.peer.clone() })
            .collect()
    }
}

impl Cluster {
    /// The best node for `bucket` as this node sees the cluster now.
    fn canary_now(&self, bucket: &[u8], read_only: bool) -> Result<Canary> {
        let flock = proto::flock_of(bucket, self.inner.file.flock_count);
        let leader = self.leader_of(flock);
        let (node, role) = if read_only {
            // The warm leader unless a live herder carries clearly less load.
            let herders = self.herders(flock);
            let pick = herders.iter().copied().filter(|h| self.inner.peers.alive(*h)).min_by_key(|h| {
                (
                    self.inner.peers.load_of(*h).saturating_sub(if Some(*h) == leader { 4 } else { 0 }),
                    Some(*h) != leader,
                )
            });
            match pick {
                Some(h) => (h, if Some(h) == leader { "leader" } else { "follower" }),
                None => (leader.unwrap_or(self.inner.me), "leader"),
            }
        } else {
            let leader = leader.ok_or_else(|| {
                error(
                    ErrorCode::Unavailable,
                    format!("flock {flock} has no leader right now (an election is under way); retry shortly"),
                )
            })?;
            (leader, "leader")
        };
        let info = self.inner.meta_state.borrow().nodes.get(&node).cloned().unwrap_or_default();
        Ok(Canary {
            url: info.http,
            quic: Some(info.quic).filter(|q| !q.is_empty()),
            node: node_id_text(node),
            flock,
            role: role.into(),
            bucket_version: self.inner.node.store().bucket_version(bucket).map_err(RemoteError::from)?,
        })
    }
}
