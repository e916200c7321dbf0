//! Supervision: one task per node that keeps the cluster in shape, ticking every
//! [`SUPERVISE_EVERY`]:
//!
//! - the failure detector (per node pair, `peer`) feeds the engine: a peer that went down, or
//!   came back as a new process, loses the groups it led, so their other herders elect at once
//!   instead of waiting out raft's election timer;
//! - membership follows the flock map (the meta leader publishes maps as nodes join; each flock's
//!   leader changes its group's voters to the map's herders);
//! - an idle flock's lead goes to its preferred herder, so leads stay spread as the map spreads
//!   them;
//! - each node tells its peers which flocks it leads (claims, with its pings), for the nodes that
//!   do not herd them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::decide::{self, IDLE_FOR_REBALANCE};
use super::engine::StateRole;
use super::messages::{Lead, PeerResponse};
use super::{Claim, Cluster, NodeId};
use crate::storage::META_GROUP;

/// How often the supervisor looks at the cluster.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// How often membership is checked against the flock map when the map has not changed.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

impl Cluster {
    /// The supervisor (see the module's notes).
    pub(super) async fn supervise(self, load: Arc<AtomicU64>) {
        let flocks = self.inner.file.flock_count;
        let mut ticker = tokio::time::interval(SUPERVISE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut meta_changes = self.inner.meta_state.clone();
        let mut last_reconcile = Instant::now();
        // Each peer's incarnation while it was alive; absent while down.
        let mut alive: BTreeMap<NodeId, u64> = BTreeMap::new();
        // Since when each unreachable member has been so (as this node saw it).
        let mut unreachable: BTreeMap<NodeId, Instant> = BTreeMap::new();
        // Per flock: the applied index last seen, and since when.
        let mut activity: Vec<(u64, Instant)> = vec![(0, Instant::now()); flocks as usize];
        loop {
            ticker.tick().await;
            load.store(self.inner.node.load(), Ordering::Relaxed);
            self.watch_peers(&mut alive).await;
            self.track_unreachable(&mut unreachable);
            let reconcile = meta_changes.has_changed().unwrap_or(false) || last_reconcile.elapsed() >= RECONCILE_EVERY;
            if reconcile {
                meta_changes.mark_unchanged();
                last_reconcile = Instant::now();
                let meta_leader =
                    self.inner.consensus.view(META_GROUP).is_some_and(|v| v.lead.role == StateRole::Leader);
                if meta_leader {
                    self.reconcile_meta(&unreachable).await;
                }
            }
            for flock in 0..flocks {
                let Some((lead, applied)) = self.inner.consensus.lead_and_applied(flock) else { continue };
                let seen = &mut activity[flock as usize];
                if seen.0 != applied {
                    *seen = (applied, Instant::now());
                }
                if reconcile && lead.role != StateRole::Leader && self.moved_away(flock) {
                    if let Err(e) = self.inner.consensus.release(flock).await {
                        tracing::warn!(flock, error = %e.message, "could not delete the copy of a flock moved away");
                    }
                    continue;
                }
                if lead.role != StateRole::Leader || !reconcile {
                    continue;
                }
                let Some(view) = self.inner.consensus.view(flock) else { continue };
                self.reconcile_flock(flock);
                // Hand an idle flock's lead to its preferred herder (checked at the pace of
                // reconciliation: it is never urgent).
                let voters: Vec<NodeId> = view.voters.iter().copied().collect();
                let alive = |n| self.inner.peers.alive(n);
                let preferred = decide::preferred_leader(&self.herders(flock), &voters, &alive);
                if let Some(heir) = preferred.filter(|p| *p != self.inner.me)
                    && seen.1.elapsed() > IDLE_FOR_REBALANCE
                    && self.herders_wanted(flock).is_none()
                {
                    self.inner.consensus.transfer(flock, heir).await;
                }
            }
            self.publish_leads();
        }
    }

    /// True once `flock` has moved away from this node for good: the map does not name it, and
    /// the flock's leader (another node) claims its voters are the herders of the very map
    /// version this node holds. An older or newer map might name this node again, so only the
    /// same version counts.
    fn moved_away(&self, flock: u32) -> bool {
        let (version, named) = {
            let state = self.inner.meta_state.borrow();
            let herders = state.map.herders.get(flock as usize);
            (state.map.version, herders.is_none_or(|h| h.is_empty() || h.contains(&self.inner.me)))
        };
        !named
            && self.live_claim(flock).is_some_and(|c| c.node != self.inner.me && c.settled && c.map_version == version)
    }

    /// Tells the engine of peers the failure detector lost, or that came back as a new process
    /// (they lead nothing any more), or that left the members while this node still counted
    /// them alive (removed before its detector noticed them gone: they are lost just the same).
    async fn watch_peers(&self, alive: &mut BTreeMap<NodeId, u64>) {
        let members: Vec<NodeId> =
            self.inner.meta_state.borrow().nodes.keys().copied().filter(|n| *n != self.inner.me).collect();
        let gone: Vec<NodeId> = alive.keys().filter(|n| !members.contains(n)).copied().collect();
        for node in gone {
            alive.remove(&node);
            self.inner.consensus.peer_down(node).await;
        }
        for node in members {
            let now = self.inner.peers.alive(node).then(|| {
                // Between connections a live peer keeps the incarnation it had.
                self.inner.peers.incarnation_of(node).or(alive.get(&node).copied()).unwrap_or(0)
            });
            let was = alive.get(&node).copied();
            match (was, now) {
                (Some(_), None) => {
                    alive.remove(&node);
                    self.inner.consensus.peer_down(node).await;
                }
                (Some(before), Some(incarnation)) if before != incarnation && before != 0 => {
                    alive.insert(node, incarnation);
                    self.inner.consensus.peer_down(node).await;
                }
                (_, Some(incarnation)) => {
                    alive.insert(node, incarnation);
                }
                (None, None) => {}
            }
        }
    }

    /// Keeps, for each member this node cannot reach, since when it has not.
    fn track_unreachable(&self, unreachable: &mut BTreeMap<NodeId, Instant>) {
        let state = self.inner.meta_state.borrow();
        unreachable.retain(|n, _| state.nodes.contains_key(n));
        for &node in state.nodes.keys() {
            if self.inner.peers.alive(node) {
                unreachable.remove(&node);
            } else {
                unreachable.entry(node).or_insert_with(Instant::now);
            }
        }
    }

    /// A restarted member whose addresses changed (another `--http`, `--quic`, `--resp` or
    /// `--peer` than it last ran with) has the meta leader record the new ones, as for a join, so
    /// canaries, `CLUSTER` replies and its peers find it where it listens now.
    pub(super) async fn advertise(self) {
        let (me, info) = (self.inner.me, self.inner.info.clone());
        let mut state = self.inner.meta_state.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let recorded = state.borrow_and_update().nodes.get(&me).cloned();
            if recorded.as_ref() == Some(&info) {
                return;
            }
            if recorded.is_none() {
                // Its applied meta state does not list it yet.
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            // As a hail to this node: admitted here if it leads the meta group, else passed on.
            match self.admit(me, info.clone()).await {
                PeerResponse::Joined { .. } => {
                    tracing::info!(was = %recorded.unwrap_or_default(), now = %info, "recorded this node's new addresses");
                    return;
                }
                other => tracing::debug!(answer = ?other, "recording this node's new addresses failed; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Keeps the transport's member list (and the former members it refuses) in step with the
    /// meta group, and notices when the meta group removes this node.
    pub(super) async fn follow_members(self) {
        let mut state = self.inner.meta_state.clone();
        loop {
            let (nodes, removed) = {
                let state = state.borrow_and_update();
                (state.nodes.clone(), state.removed.clone())
            };
            self.inner.peers.set_members(&nodes);
            self.inner.peers.set_removed(&removed);
            if removed.contains(&self.inner.me) {
                self.inner.peers.set_evicted("the meta group recorded its removal");
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Tells peers (with the next pings) which flocks this node leads.
    fn publish_leads(&self) {
        let map_version = self.inner.meta_state.borrow().map.version;
        let leads = (0..self.inner.file.flock_count)
            .filter_map(|flock| {
                let term = self.inner.terms.get(flock)?;
                Some(Lead { flock, term, settled: self.herders_wanted(flock).is_none(), map_version })
            })
            .collect();
        self.inner.peers.set_leads(leads);
    }

    /// Keeps the claims board in step with what peers say they lead: per flock, the claim of the
    /// latest term.
    pub(super) async fn follow_claims(self) {
        let mut heard = self.inner.peers.leads_heard();
        loop {
            heard.borrow_and_update();
            let mut board: Vec<Option<Claim>> = vec![None; self.inner.file.flock_count as usize];
            for (node, leads) in self.inner.peers.peer_leads() {
                for lead in leads.iter() {
                    if let Some(slot) = board.get_mut(lead.flock as usize)
                        && slot.is_none_or(|c| lead.term > c.term)
                    {
                        *slot =
                            Some(Claim { node, term: lead.term, settled: lead.settled, map_version: lead.map_version });
                    }
                }
            }
            *self.inner.claims.lock().unwrap_or_else(|p| p.into_inner()) = board;
            if heard.changed().await.is_err() {
                return;
            }
        }
    }
}
