//! What the cluster adds to the node's metrics at each scrape (`crate::metrics`): every group's
//! role, term and log positions as this node's engine holds them, and every peer's reachability
//! and round-trip time.

use std::sync::Weak;

use raft::StateRole;

use super::consensus::GroupView;
use super::{Cluster, Inner, node_id_text};
use crate::metrics::Samples;
use crate::storage::{GroupId, META_GROUP};

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
        let slowest = view.voters.iter().filter_map(|v| view.matched.get(v)).min().copied().unwrap_or(view.last);
        samples.gauge(
            "group_replication_lag_entries",
            "On the leader: entries its slowest voter has not acknowledged",
            &label,
            view.last.saturating_sub(slowest) as f64,
        );
    }
}
