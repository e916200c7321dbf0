//! A member's lifecycle as operators drive it: listing the members, draining one (its flocks
//! move to the others, then it leaves), removing a dead one (its flocks are copied again from
//! the surviving herders), and removing a member that has been unreachable for longer than
//! `--dead-after` without being asked, as CockroachDB does with a dead store.
//!
//! Every change is decided by the meta leader and recorded in the meta group (`meta`); placement
//! and each flock's leader then move the flocks as for a join (`membership`). A drained node is
//! removed once the map names it nowhere, it votes in no group the meta leader can see, and every
//! flock's leader reports its voters settled on the map that no longer names it.
//!
//! Users (`access`) change the same way: checked and recorded by the meta leader.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use grex_client::proto::{NodeInfo, NodesInfo};

use super::consensus::Command;
use super::messages::{GREX_VERSION, PEER_PROTOCOL, PeerRequest, PeerResponse};
use super::meta::MetaState;
use super::{Cluster, NodeId, node_id_text};
use crate::access::{self, UserChange};
use crate::error::{ErrorCode, Result, error};
use crate::node::NodeChange;
use crate::storage::META_GROUP;

/// `--dead-after` by default: how long a member may be unreachable before the cluster removes
/// it and copies its flocks again (CockroachDB's store-dead timeout is 5 minutes; a node
/// restarting or being upgraded must not trigger a copy).
pub const REMOVE_DEAD_AFTER_DEFAULT: Duration = Duration::from_secs(600);

impl Cluster {
    /// The members as this node sees them.
    pub(super) fn nodes_info(&self) -> NodesInfo {
        let state = self.meta_state();
        let flocks = self.inner.file.flock_count;
        let mut leads: BTreeMap<NodeId, u32> = BTreeMap::new();
        for flock in 0..flocks {
            if let Some(leader) = self.leader_of(flock) {
                *leads.entry(leader).or_default() += 1;
            }
        }
        let herded = |id: &NodeId| state.map.herders.iter().filter(|h| h.contains(id)).count() as u32;
        let meta_voters = self.voters(META_GROUP);
        let version = |id: &NodeId| match self.inner.peers.version_of(*id) {
            _ if *id == self.inner.me => (PEER_PROTOCOL, GREX_VERSION.to_owned()),
            Some((protocol, version)) => (protocol, version.unwrap_or_default()),
            None => (0, String::new()),
        };
        NodesInfo {
            map_version: state.map.version,
            flocks_moving: (0..flocks).filter(|f| !self.flock_settled_at(*f, state.map.version)).count() as u32,
            nodes: state
                .nodes
                .iter()
                .map(|(id, info)| (id, info, version(id)))
                .map(|(id, info, (protocol, version))| NodeInfo {
                    id: node_id_text(*id),
                    state: if state.draining.contains(id) { "draining" } else { "active" }.to_owned(),
                    alive: self.inner.peers.alive(*id),
                    http: info.http.clone(),
                    peer: info.peer.clone(),
                    zone: info.zone.clone(),
                    capacity: info.capacity,
                    flocks: herded(id),
                    leads: leads.get(id).copied().unwrap_or(0),
                    snapshot_bytes_sent: self.inner.peers.snapshot_bytes_sent_by(*id),
                    meta_voter: meta_voters.contains(id),
                    version,
                    protocol,
                })
                .collect(),
            removed: state.removed.iter().map(|id| node_id_text(*id)).collect(),
            meta_changing: self.inner.consensus.view(META_GROUP).is_some_and(|v| v.joint),
        }
    }

    /// Drains or removes member `id`, asked on any node: the meta leader decides and records it.
    /// Returns once this node's meta state shows it.
    pub(super) async fn change_node(&self, id: NodeId, change: NodeChange) -> Result<()> {
        self.at_meta_leader(PeerRequest::ChangeNode { id, change }, self.change_node_here(id, change)).await?;
        // Read your writes: the answer lists the node as drained or removed.
        let mut state = self.inner.meta_state.clone();
        let recorded = |s: &MetaState| match change {
            NodeChange::Drain => s.draining.contains(&id) || s.removed.contains(&id),
            NodeChange::Remove => s.removed.contains(&id),
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), state.wait_for(recorded)).await;
        Ok(())
    }

    /// Runs `here` if this node leads the meta group, else sends `request` to the leader, which
    /// answers `Ack` or an error.
    pub(super) async fn at_meta_leader(
        &self,
        request: PeerRequest,
        here: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        match self.leader_of(META_GROUP) {
            Some(leader) if leader == self.inner.me => here.await,
            Some(leader) => match self.inner.peers.call(leader, request, Duration::from_secs(30)).await {
                Ok(PeerResponse::Ack) => Ok(()),
                Ok(PeerResponse::Error(e)) => Err(e),
                Ok(other) => Err(error(ErrorCode::Internal, format!("unexpected peer answer {other:?}"))),
                Err(e) => Err(e.into()),
            },
            None => Err(error(ErrorCode::Unavailable, "the cluster has no meta leader; retry shortly")),
        }
    }

    /// Adds, changes or deletes a user through the meta group; returns once this node checks
    /// requests with the change (within 5 s).
    pub(super) async fn change_user(&self, change: UserChange) -> Result<()> {
        access::check_user_name(change.name())?;
        self.at_meta_leader(PeerRequest::ChangeUser(change.clone()), self.change_user_here(change.clone())).await?;
        let mut state = self.inner.meta_state.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), state.wait_for(|s| change.is_applied(&s.users))).await;
        Ok(())
    }

    /// On the meta leader: checks the change against the users, and records it.
    pub(super) async fn change_user_here(&self, change: UserChange) -> Result<()> {
        change.check(&self.inner.meta_state.borrow().users)?;
        self.meta_write(Command::ChangeUser(change)).await
    }

    /// On the meta leader: checks that the change fits the cluster, and records it.
    pub(super) async fn change_node_here(&self, id: NodeId, change: NodeChange) -> Result<()> {
        let state = self.meta_state();
        let name = node_id_text(id);
        if state.removed.contains(&id) {
            return match change {
                NodeChange::Remove => Ok(()),
                NodeChange::Drain => Err(error(ErrorCode::Conflict, format!("node {name} was removed already"))),
            };
        }
        if !state.nodes.contains_key(&id) {
            return Err(error(
                ErrorCode::NodeNotFound,
                format!("no member has the id {name}; `grex cluster nodes` lists the members"),
            ));
        }
        let command = match change {
            NodeChange::Drain => {
                if state.draining.contains(&id) {
                    return Ok(());
                }
                let left = state.active().len() - 1;
                let copies = self.inner.file.replication as usize;
                if left < copies {
                    return Err(error(
                        ErrorCode::Conflict,
                        format!(
                            "draining node {name} would leave {left} active node(s) for flocks kept in {copies} \
                             copies; join another node first (or, if the node is dead, remove it)"
                        ),
                    ));
                }
                tracing::info!(node = %name, "draining a node: its flocks move to the other nodes, then it leaves");
                Command::DrainNode { id }
            }
            NodeChange::Remove => {
                if self.inner.peers.alive(id) {
                    return Err(error(
                        ErrorCode::Conflict,
                        format!(
                            "node {name} is up: drain it instead (`grex cluster drain {name}`), or stop it \
                             before removing it"
                        ),
                    ));
                }
                if state.nodes.len() == 1 {
                    return Err(error(ErrorCode::Conflict, "the last node of a cluster cannot be removed"));
                }
                tracing::warn!(node = %name, "removing a dead node: its flocks are copied again from the other herders");
                Command::RemoveNode { id }
            }
        };
        self.meta_write(command).await
    }

    /// On the meta leader: removes each draining node that no group needs any more.
    pub(super) async fn finish_drains(&self, state: &MetaState) {
        for &id in &state.draining {
            let named = state.map.herders.iter().any(|h| h.contains(&id));
            let meta_voter = self.voters(META_GROUP).contains(&id);
            let moved = (0..self.inner.file.flock_count).all(|f| self.flock_settled_at(f, state.map.version));
            if named || meta_voter || !moved {
                continue;
            }
            tracing::info!(node = %node_id_text(id), "a drained node herds no flock any more; it leaves the cluster");
            if let Err(e) = self.meta_write(Command::RemoveNode { id }).await {
                tracing::warn!(error = %e.message, "could not remove a drained node; will retry");
            }
        }
    }

    /// On the meta leader: removes a member unreachable for longer than `--dead-after`, one per
    /// call, and only while the members that stay up are a majority (a wide outage, or this node
    /// being cut off, removes nobody; the removal must also commit in the meta group, which a
    /// leader cut off from its quorum cannot do).
    pub(super) async fn remove_dead(&self, state: &MetaState, unreachable: &BTreeMap<NodeId, Instant>) {
        let dead_after = self.inner.dead_after;
        let Some((&id, since)) = unreachable
            .iter()
            .find(|(n, since)| **n != self.inner.me && state.nodes.contains_key(n) && since.elapsed() >= dead_after)
        else {
            self.inner.dead_held.store(false, Ordering::Relaxed);
            return;
        };
        let up = state.nodes.keys().filter(|n| !unreachable.contains_key(n)).count();
        if up * 2 <= state.nodes.len() || !self.has_quorum(META_GROUP) {
            // Once per episode: the check runs on every supervision round.
            if !self.inner.dead_held.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    node = %node_id_text(id),
                    up,
                    members = state.nodes.len(),
                    "members unreachable for longer than --dead-after stay: more than half the members must be up, \
                     and the meta group's quorum reached, to remove one"
                );
            }
            return;
        }
        self.inner.dead_held.store(false, Ordering::Relaxed);
        tracing::warn!(
            node = %node_id_text(id),
            unreachable_for = ?since.elapsed(),
            "a member has been unreachable for longer than --dead-after; removing it (its flocks are copied again)"
        );
        if let Err(e) = self.meta_write(Command::RemoveNode { id }).await {
            tracing::warn!(error = %e.message, "could not remove a dead node; will retry");
        }
    }

    /// True if `flock`'s voters are the herders of flock map `version` or later: checked here
    /// if this node leads the flock, else from its leader's claim.
    fn flock_settled_at(&self, flock: u32, version: u64) -> bool {
        if self.inner.terms.get(flock).is_some() {
            return self.inner.meta_state.borrow().map.version >= version && self.herders_wanted(flock).is_none();
        }
        self.live_claim(flock).is_some_and(|c| c.settled && c.map_version >= version)
    }
}
