//! What the cluster shows of itself. At each scrape of the node's metrics (`crate::metrics`):
//! every group's role, term and log positions as this node's engine holds them, and every peer's
//! reachability and round-trip time. Asked for the cluster's load (`grex top`, the dashboard):
//! every member's [`NodeStats`], each asked over the peer protocol.

use std::sync::Weak;
use std::time::Duration;

use futures::future::join_all;
use grex_client::proto::{ClusterStats, FlockLag, MemberStats, NodeStats};
use raft::StateRole;

use super::consensus::GroupView;
use super::messages::{PeerRequest, PeerResponse};
use super::{Cluster, Inner, node_id_text};
use crate::metrics::Samples;
use crate::node::{Clock, SystemClock};
use crate::storage::{GroupId, META_GROUP};

/// How long gathering the cluster's load waits for each member's answer.
const STATS_PATIENCE: Duration = Duration::from_secs(1);

impl Cluster {
    /// This node's load, with the flocks it leads.
    pub(super) fn local_stats(&self) -> NodeStats {
        let mut stats = self.inner.node.stats();
        for (&group, view) in &self.inner.consensus.views() {
            stats.apply_lag += view.commit.saturating_sub(view.applied);
            if group != META_GROUP && view.lead.role == StateRole::Leader {
                stats.leads.push(FlockLag { flock: group, lag: replication_lag(view) });
            }
        }
        stats
    }

    /// Every member's load: this node's own, and each other member's as it answers within
    /// [`STATS_PATIENCE`] (asked all at once).
    pub(super) async fn cluster_stats(&self) -> ClusterStats {
        let me = self.inner.me;
        let members: Vec<_> = self.meta_state().nodes.iter().map(|(id, info)| (*id, info.http.clone())).collect();
        let asked = members.into_iter().map(|(id, http)| async move {
            let alive = id == me || self.inner.peers.alive(id);
            let answer = if id == me {
                Ok(self.local_stats())
            } else if !alive {
                Err("this node does not hear from it".to_owned())
            } else {
                self.peer_stats(id).await
            };
            let (stats, error) = match answer {
                Ok(stats) => (Some(stats), None),
                Err(e) => (None, Some(e)),
            };
            MemberStats { id: node_id_text(id), http, alive, stats, error }
        });
        ClusterStats { node: node_id_text(me), at_ms: SystemClock.now_ms(), members: join_all(asked).await }
    }

    async fn peer_stats(&self, id: super::NodeId) -> Result<NodeStats, String> {
        match self.inner.peers.call(id, PeerRequest::Stats, STATS_PATIENCE).await {
            Ok(PeerResponse::Stats { json }) => {
                serde_json::from_slice(&json).map_err(|e| format!("its answer is not a load this node reads: {e}"))
            }
            Ok(PeerResponse::Error(e)) => Err(e.message),
            Ok(other) => Err(format!("it answered {other:?} instead of its load")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// On a leader: entries its slowest voter has not acknowledged.
fn replication_lag(view: &GroupView) -> u64 {
    let slowest = view.voters.iter().filter_map(|v| view.matched.get(v)).min().copied().unwrap_or(view.last);
    view.last.saturating_sub(slowest)
}

/// Adds the cluster's state to every scrape of `cluster`'s node's metrics, while the cluster runs.
pub(super) fn observe(cluster: &Cluster) {
    let inner: Weak<Inner> = std::sync::Arc::downgrade(&cluster.inner);
    cluster.inner.node.metrics().add_source(Box::new(move |samples| {
        if let Some(inner) = inner.upgrade() {
            sample(&Cluster { inner }, samples);
        }
    }));
}

fn group_label(group: GroupId) -> String {
    if group == META_GROUP { "meta".into() } else { group.to_string() }
}

fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre_candidate",
    }
}

fn sample(cluster: &Cluster, samples: &mut Samples) {
    let views = cluster.inner.consensus.views();
    let mut roles = [("leader", 0u64), ("follower", 0), ("candidate", 0), ("pre_candidate", 0)];
    for (&group, view) in &views {
        let role = role_name(view.lead.role);
        if let Some(count) = roles.iter_mut().find(|(name, _)| *name == role) {
            count.1 += 1;
        }
        group_samples(group, view, samples);
    }
    for (role, count) in roles {
        samples.gauge(
            "groups",
            "Consensus groups (flocks and meta) this node runs, by its role in them",
            &[("role", role.into())],
            count as f64,
        );
    }
    let (held, dropped) = cluster.inner.consensus.log_memory();
    samples.gauge(
        "consensus_log_bytes",
        "Bytes of log entries the consensus engine holds in memory, over every group (its share of --node-memory-mib)",
        &[],
        held as f64,
    );
    samples.counter(
        "consensus_appends_dropped",
        "Appends from leaders dropped because their entries did not fit in the log memory share; each is sent again",
        &[],
        dropped as f64,
    );
    for (peer, alive, rtt) in cluster.inner.peers.reachability() {
        let label = [("peer", node_id_text(peer))];
        samples.gauge(
            "peer_up",
            "1 while this node hears from the peer (its failure detector), else 0",
            &label,
            f64::from(u8::from(alive)),
        );
        if let Some(rtt) = rtt {
            samples.gauge(
                "peer_rtt_seconds",
                "Round-trip time to the peer, as QUIC estimates it on the open connection",
                &label,
                rtt.as_secs_f64(),
            );
        }
    }
}

fn group_samples(group: GroupId, view: &GroupView, samples: &mut Samples) {
    let label = [("group", group_label(group))];
    samples.gauge(
        "group_leader",
        "1 where this node leads the group, else 0",
        &label,
        f64::from(u8::from(view.lead.role == StateRole::Leader)),
    );
    samples.gauge("group_term", "The group's term, as this node knows it", &label, view.lead.term as f64);
    samples.gauge(
        "group_log_entries",
        "Entries of the group's log this node keeps (the rest is in snapshots)",
        &label,
        (view.last + 1).saturating_sub(view.first) as f64,
    );
    samples.gauge(
        "group_commit_lag_entries",
        "Entries this node holds that it does not know to be committed",
        &label,
        view.last.saturating_sub(view.commit) as f64,
    );
    samples.gauge(
        "group_apply_lag_entries",
        "Committed entries this node has not applied yet",
        &label,
        view.commit.saturating_sub(view.applied) as f64,
    );
    if view.lead.role == StateRole::Leader {
        samples.gauge(
            "group_replication_lag_entries",
            "On the leader: entries its slowest voter has not acknowledged",
            &label,
            replication_lag(view) as f64,
        );
    }
}
