//! Membership: founding a cluster, admitting nodes, the meta group's commands (nodes, the flock
//! map, modules), and making each group's voters what the flock map says.
//!
//! A group changes its voters as the best multi-raft systems move replicas: the new herder is
//! added as a learner, catches up (from a snapshot, then the log) until it holds the entry that
//! added it, and is then promoted while the herders the map dropped leave, in one joint
//! configuration change that raft-rs leaves by itself. A leader that leaves its group hands the
//! lead to the voter with the longest log (`engine`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use grex_client::proto::ModuleInfo;
use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};

use super::consensus::Command;
use super::engine::StateRole;
use super::messages::{PeerRequest, PeerResponse};
use super::placement::place;
use super::routing::ROUTE_PATIENCE;
use super::{Cluster, NodeId, PeerInfo, node_id_text};
use crate::error::{ErrorCode, Result, error};
use crate::node::Node;
use crate::storage::{GroupId, META_GROUP};

/// Meta voters at most; further nodes follow the meta group as learners.
const META_VOTERS_MAX: usize = 5;

fn change(kind: ConfChangeType, node: NodeId) -> ConfChangeSingle {
    ConfChangeSingle { change_type: kind, node_id: node, ..Default::default() }
}

fn conf_change(changes: Vec<ConfChangeSingle>) -> ConfChangeV2 {
    ConfChangeV2 { changes: changes.into(), transition: ConfChangeTransition::Auto, ..Default::default() }
}

impl Cluster {
    /// Founds a new cluster: this node leads every group alone, and records itself.
    pub(super) async fn found(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.leader_of(META_GROUP) != Some(self.inner.me) {
            if Instant::now() > deadline {
                anyhow::bail!("the meta group elected no leader within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let me = self.inner.me;
        self.meta_write(Command::AddNode { id: me, info: self.inner.info.clone() })
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        tracing::info!(node = %node_id_text(me), "founded a new cluster");
        Ok(())
    }

    /// Proposes a meta command here (this node must lead the meta group) and waits until it is
    /// applied.
    pub(super) async fn meta_write(&self, command: Command) -> Result<()> {
        self.inner.consensus.write(META_GROUP, &command).await.map(|_| ()).map_err(|e| {
            error(ErrorCode::Unavailable, format!("the cluster could not record the change: {}", e.message))
        })
    }

    /// A node hails, to join or to have its new addresses recorded: the meta leader adds it (as a
    /// learner, then a voter while there are fewer than [`META_VOTERS_MAX`]; a member stays what
    /// it is) and records its addresses; any other node passes the hail on to the meta leader.
    pub(super) async fn admit(&self, id: NodeId, info: PeerInfo) -> PeerResponse {
        let Some(leader) = self.leader_of(META_GROUP) else {
            return PeerResponse::Error(error(ErrorCode::Unavailable, "the cluster has no meta leader; retry shortly"));
        };
        if leader != self.inner.me {
            return self
                .inner
                .peers
                .call(leader, PeerRequest::Hail { id, info }, Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| PeerResponse::Error(e.into()));
        }
        if self.inner.meta_state.borrow().removed.contains(&id) {
            return PeerResponse::Error(error(
                ErrorCode::Conflict,
                format!(
                    "node {} was removed from the cluster; wipe its data directory, then start it with \
                     --credentials and --join to join as a new node",
                    node_id_text(id)
                ),
            ));
        }
        let recorded = self.inner.meta_state.borrow().nodes.get(&id).cloned();
        match recorded {
            Some(was) => {
                tracing::info!(node = %node_id_text(id), %was, now = %info, "a member hails again (a join not answered before, or new addresses)")
            }
            None => tracing::info!(node = %node_id_text(id), peer = %info.peer, "a node asks to join"),
        }
        self.inner.peers.learn(id, &info);
        // The joiner holds the log up to its own admission before it hears it has joined: a node
        // that restarts with an empty log is not a member in its own eyes.
        if let Err(e) = self.add_caught_up_learner(META_GROUP, id, ROUTE_PATIENCE * 3).await {
            return PeerResponse::Error(error(
                ErrorCode::Unavailable,
                format!("adding the node failed: {e}; start it again with the same --join"),
            ));
        }
        if let Err(e) = self.meta_write(Command::AddNode { id, info }).await {
            return PeerResponse::Error(e);
        }
        PeerResponse::Joined { members: self.meta_state().nodes.into_iter().collect() }
    }

    /// Stores a module cluster-wide: through the meta group, proposed by its leader.
    pub(super) async fn store_module(&self, name: String, wasm: Vec<u8>) -> Result<ModuleInfo> {
        let (id, wasm) = self.inner.node.check_module(&name, wasm).await?;
        let size = wasm.len() as u64;
        let id_text = crate::wasm::module_id_text(&id);
        let info = ModuleInfo { name: name.clone(), id: id_text.clone(), size };
        let stored = |node: &Node| node.modules().iter().any(|m| m.name == name && m.id == id_text);
        self.module_change(Command::PutModule { name: name.clone(), id, wasm }, info, stored).await
    }

    /// Deletes a module name cluster-wide, through the meta group; answers what it pointed to.
    /// The module's bytes and code go on every node once no name points to them.
    pub(super) async fn remove_module(&self, name: String) -> Result<ModuleInfo> {
        let info = self.inner.node.module_named(&name)?;
        let gone = |node: &Node| node.module_named(&name).is_err();
        self.module_change(Command::DeleteModule { name: name.clone() }, info, gone).await
    }

    /// Makes a change to the modules through the meta group: `command` proposed here when this
    /// node leads it, else asked of its leader. Answers `info` (or the leader's), once this node
    /// has applied the change (`applied`, within 5 s), so a job sent here next sees it.
    async fn module_change(
        &self,
        command: Command,
        info: ModuleInfo,
        applied: impl Fn(&Node) -> bool,
    ) -> Result<ModuleInfo> {
        match self.leader_of(META_GROUP) {
            Some(leader) if leader == self.inner.me => {
                self.meta_write(command).await?;
                Ok(info)
            }
            Some(leader) => {
                let request = match command {
                    Command::PutModule { name, wasm, .. } => PeerRequest::PutModule { name, wasm },
                    Command::DeleteModule { name } => PeerRequest::DeleteModule { name },
                    other => return Err(error(ErrorCode::Internal, format!("{other:?} is not a module change"))),
                };
                match self.inner.peers.call(leader, request, Duration::from_secs(60)).await {
                    Ok(PeerResponse::Module(Ok(info))) => {
                        let deadline = Instant::now() + Duration::from_secs(5);
                        while !applied(&self.inner.node) && Instant::now() < deadline {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Ok(info)
                    }
                    Ok(PeerResponse::Module(result)) => result,
                    Ok(PeerResponse::Error(e)) => Err(e),
                    Ok(other) => Err(error(ErrorCode::Internal, format!("unexpected peer answer {other:?}"))),
                    Err(e) => Err(e.into()),
                }
            }
            None => Err(error(ErrorCode::Unavailable, "the cluster has no meta leader; retry shortly")),
        }
    }

    /// Adds `id` to `group` as a learner (unless it is a member already) and waits until its
    /// log holds the entry that added it (and so everything before it), within `patience`.
    async fn add_caught_up_learner(
        &self,
        group: GroupId,
        id: NodeId,
        patience: Duration,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + patience;
        let view = self.inner.consensus.view(group).ok_or("this node does not take part in the group")?;
        if view.voters.contains(&id) || view.learners.contains(&id) {
            return Ok(());
        }
        let added = loop {
            match self
                .inner
                .consensus
                .change_conf(group, conf_change(vec![change(ConfChangeType::AddLearnerNode, id)]))
                .await
            {
                Ok(index) => break index,
                Err(e) if e.code == ErrorCode::Overloaded && Instant::now() < deadline => {
                    // Another change is under way.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.message),
            }
        };
        loop {
            let matched = self.inner.consensus.view(group).and_then(|v| v.matched.get(&id).copied()).unwrap_or(0);
            if matched >= added {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the learner did not receive the log in time (it holds up to {matched} of {added})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// On the meta leader: every active member (not draining) is in the flock map and the meta
    /// group's voters; drained nodes leave, and so do nodes dead for longer than `--dead-after`
    /// (`lifecycle`). `unreachable` holds since when each unreachable member has been so.
    pub(super) async fn reconcile_meta(&self, unreachable: &BTreeMap<NodeId, Instant>) {
        let state = self.meta_state();
        if state.nodes.is_empty() {
            return;
        }
        let nodes = state.active();
        let map = place(&state.map, &nodes, self.inner.file.flock_count, self.inner.file.replication);
        if map != state.map {
            tracing::info!(version = map.version, nodes = nodes.len(), "publishing a new flock map");
            if let Err(e) = self.meta_write(Command::SetFlockMap(map)).await {
                tracing::warn!(error = %e.message, "could not publish the flock map");
            }
        }
        self.finish_drains(&state).await;
        self.remove_dead(&state, unreachable).await;
        let want: BTreeSet<NodeId> = nodes.keys().copied().take(META_VOTERS_MAX).collect();
        if self.voters_differ(META_GROUP, &want) && !self.inner.meta_reconfiguring.swap(true, Ordering::AcqRel) {
            let this = self.clone();
            tokio::spawn(async move {
                while this.change_voters(META_GROUP, &want).await {}
                this.inner.meta_reconfiguring.store(false, Ordering::Release);
            });
        }
    }

    /// On a flock's leader: make the flock's voters the map's herders.
    pub(super) fn reconcile_flock(&self, flock: u32) {
        let Some(want) = self.herders_wanted(flock) else { return };
        if self.inner.reconfiguring[flock as usize].swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            // A few moves at a time: each new herder is sent a snapshot, and a join or drain that
            // moved every flock at once would build and install them all together, holding every
            // flock's data in memory and stalling the committers that serve jobs.
            let Ok(_permit) = this.inner.moves.clone().acquire_owned().await else { return };
            // The map may change again while a change is under way (nodes joining one after
            // another): go on until the group matches the latest map, or a step fails (the
            // supervisor tries again later).
            let mut want = want;
            while this.change_voters(flock, &want).await {
                match this.herders_wanted(flock) {
                    Some(next) => want = next,
                    None => break,
                }
            }
            this.inner.reconfiguring[flock as usize].store(false, Ordering::Release);
        });
    }

    /// The flock map's herders for `flock` when its group's voters differ from them (`None`
    /// when they match, or the map names none yet).
    pub(super) fn herders_wanted(&self, flock: u32) -> Option<BTreeSet<NodeId>> {
        let want: BTreeSet<NodeId> = self.herders(flock).into_iter().collect();
        (!want.is_empty() && self.voters_differ(flock, &want)).then_some(want)
    }

    /// True if `group`'s voters are not `want`, or it keeps a learner it should drop.
    fn voters_differ(&self, group: GroupId, want: &BTreeSet<NodeId>) -> bool {
        let Some(view) = self.inner.consensus.view(group) else { return !want.is_empty() };
        &view.voters != want || !self.stale_learners(group, &view.learners, want).is_empty()
    }

    /// Learners a group should drop: of a flock, any the map no longer wants (a learner is a
    /// herder on its way in); of the meta group, those removed from the cluster (a joining node
    /// is a learner there before it is a member, and nodes past the fifth stay learners).
    fn stale_learners(&self, group: GroupId, learners: &BTreeSet<NodeId>, want: &BTreeSet<NodeId>) -> Vec<NodeId> {
        let state = self.inner.meta_state.borrow();
        let stale = |l: &NodeId| !want.contains(l) && (group != META_GROUP || state.removed.contains(l));
        learners.iter().copied().filter(stale).collect()
    }

    /// One step towards `want` as `group`'s voters: new ones join as learners and catch up, then
    /// one joint change promotes them and drops the others. True if it changed the voters (and
    /// this node still leads, so it may go on).
    async fn change_voters(&self, group: GroupId, want: &BTreeSet<NodeId>) -> bool {
        let leads = |this: &Cluster| this.inner.consensus.view(group).is_some_and(|v| v.lead.role == StateRole::Leader);
        if !leads(self) {
            return false;
        }
        let Some(view) = self.inner.consensus.view(group) else { return false };
        let (have, stale) = (view.voters, self.stale_learners(group, &view.learners, want));
        if &have == want && stale.is_empty() {
            return false;
        }
        let me = self.inner.me;
        if !want.contains(&me) {
            // The map moves the group off this node: hand the lead to a herder that stays first
            // (it goes on from here), as a leader cannot commit in a group it left.
            let alive = |n: NodeId| self.inner.peers.alive(n);
            if let Some(&heir) = want.iter().find(|&&id| have.contains(&id) && alive(id)) {
                self.inner.consensus.transfer(group, heir).await;
                return false;
            }
        }
        for &id in want.difference(&have) {
            if let Err(e) = self.add_caught_up_learner(group, id, ROUTE_PATIENCE * 3).await {
                tracing::info!(group, node = %node_id_text(id), error = %e, "adding a herder failed; will retry");
                return false;
            }
        }
        let mut changes: Vec<ConfChangeSingle> =
            want.difference(&have).map(|&id| change(ConfChangeType::AddNode, id)).collect();
        changes.extend(have.difference(want).chain(&stale).map(|&id| change(ConfChangeType::RemoveNode, id)));
        let changed =
            tokio::time::timeout(ROUTE_PATIENCE * 3, self.inner.consensus.change_conf(group, conf_change(changes)))
                .await;
        match changed {
            Ok(Ok(_)) => {
                tracing::debug!(group, "voters changed");
                // raft-rs leaves the joint configuration by itself with the next entry: wait for
                // that here, so the move ends within this call (and its turn among the moves).
                let deadline = Instant::now() + ROUTE_PATIENCE;
                while self.voters(group) != *want && leads(self) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                leads(self)
            }
            Ok(Err(e)) => {
                tracing::debug!(group, error = %e.message, "a membership change failed; will retry");
                false
            }
            Err(_) => {
                tracing::warn!(group, "a membership change did not commit in time; will retry");
                false
            }
        }
    }
}
