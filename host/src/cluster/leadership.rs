//! When a flock's leader may run jobs: the readiness decision, apart from openraft's metrics so a
//! table test drives it.
//!
//! A node that leads a group may still lack committed entries in its state: after a restart its
//! state holds what its last checkpoint held (the state file is synced about once a second; the
//! log is the durable copy), and openraft restores a node whose persisted vote was its own and
//! committed as leader at once, in the same term. Its log holds every committed entry (Raft's
//! election rule), but they are applied only once it learns they are committed. A job run before
//! that would read stale state, and the change set it proposed would overwrite acknowledged ones
//! once applied after them. So a leader is *ready* only once it has applied its whole log as it
//! stood when it took the lead, and an entry of its own term: then its state holds every entry
//! committed before its term, and every later entry is one it proposed itself.
//!
//! Also here: [`Refusals`], what a refused candidate learns about a better one, and what the voter
//! that refused it remembers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::{RaftMetrics, ServerState};

use super::raft::{NodeId, PeerInfo};
use crate::storage::GroupId;

/// What the readiness decision reads from a group's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeadView {
    /// This node is openraft's leader and votes in the group's membership. A leader that changed
    /// the group without itself stays openraft's leader until it hears of a later term (ticks are
    /// off); jobs it took could be cut off by the next leader and never be answered.
    pub leads: bool,
    /// The group's current term.
    pub term: u64,
    /// Index of the last entry in this node's log.
    pub log_last: u64,
    /// Term and index of the last entry this node applied.
    pub applied: Option<(u64, u64)>,
}

impl LeadView {
    /// The view of `metrics` for node `me`.
    pub fn of(metrics: &RaftMetrics<NodeId, PeerInfo>, me: NodeId) -> LeadView {
        let votes = metrics.membership_config.membership().voter_ids().any(|v| v == me);
        LeadView {
            leads: metrics.state == ServerState::Leader && votes,
            term: metrics.current_term,
            log_last: metrics.last_log_index.unwrap_or(0),
            applied: metrics.last_applied.map(|l| (l.leader_id.term, l.index)),
        }
    }
}

/// Where this node's current lead of one group began: the term, and the last index of its log
/// when it first saw itself lead in that term.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeadStart {
    term: u64,
    log_last: u64,
}

impl LeadStart {
    /// The term in which this node is a ready leader, or 0. Call it with every new view, in order.
    pub fn ready_term(&mut self, view: &LeadView) -> u64 {
        if !view.leads {
            *self = LeadStart::default();
            return 0;
        }
        if self.term != view.term {
            *self = LeadStart { term: view.term, log_last: view.log_last };
        }
        let caught_up = view.applied.is_some_and(|(term, index)| term == view.term && index >= self.log_last);
        if caught_up { view.term } else { 0 }
    }
}

/// How long a node holds back its elections for a group after a live voter refused its vote
/// because that voter's log is longer (and how long that voter keeps the right to run).
pub const OUTRANKED_FOR: Duration = Duration::from_secs(3);

/// Per group, the last vote refused because the voter's log is longer: the candidate keeps one
/// (`outranked`: who refused it) and the voter another (`outranks`: whom it refused).
///
/// Two survivors of a leader's death whose logs differ can stall a group: the one with the shorter
/// log can never win (the other refuses it), and while it keeps calling elections it raises the
/// term under the other one, whose elections then collide with it. Raft's pre-vote avoids that;
/// openraft 0.9 has none, so a refused candidate learns from the refusal (the answer carries the
/// voter's last log id) and leaves the election to the better candidate for a while. The voter
/// learns it too: it must then run even where it otherwise would not (the map moved the group
/// away from it), or no one does.
#[derive(Default)]
pub struct Refusals {
    by: Mutex<HashMap<GroupId, (NodeId, Instant)>>,
}

impl Refusals {
    /// Notes a vote refused in `group` for log length; `other` is the node at the far end.
    pub fn note(&self, group: GroupId, other: NodeId) {
        self.lock().insert(group, (other, Instant::now()));
    }

    /// The node at the far end of `group`'s last such refusal, if it was within [`OUTRANKED_FOR`].
    pub fn recent(&self, group: GroupId) -> Option<NodeId> {
        let mut by = self.lock();
        match by.get(&group) {
            Some((other, at)) if at.elapsed() < OUTRANKED_FOR => Some(*other),
            Some(_) => {
                by.remove(&group);
                None
            }
            None => None,
        }
    }

    /// Forgets `group`'s record (it has a leader again).
    pub fn clear(&self, group: GroupId) {
        self.lock().remove(&group);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, (NodeId, Instant)>> {
        self.by.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(leads: bool, term: u64, log_last: u64, applied: (u64, u64)) -> LeadView {
        LeadView { leads, term, log_last, applied: Some(applied) }
    }

    #[test]
    fn a_leader_restored_at_start_up_waits_for_the_entries_its_checkpoint_lacks() {
        // The bug this guards: restarted with its state at 1311 and its log at 1528, all of its
        // own term, it ran jobs against the state of 1311.
        let mut start = LeadStart::default();
        assert_eq!(start.ready_term(&view(true, 7, 1528, (7, 1311))), 0);
        assert_eq!(start.ready_term(&view(true, 7, 1528, (7, 1400))), 0);
        assert_eq!(start.ready_term(&view(true, 7, 1530, (7, 1528))), 7);
    }

    #[test]
    fn a_new_leader_is_ready_once_an_entry_of_its_term_is_applied() {
        let mut start = LeadStart::default();
        // Elected in term 9 with the blank entry 41 appended; 40 (term 8) applied.
        assert_eq!(start.ready_term(&view(true, 9, 41, (8, 40))), 0);
        assert_eq!(start.ready_term(&view(true, 9, 41, (9, 41))), 9);
        // Its own proposals do not take readiness away.
        assert_eq!(start.ready_term(&view(true, 9, 60, (9, 45))), 9);
    }

    #[test]
    fn a_lead_lost_and_won_again_starts_over_from_the_log_it_then_holds() {
        let mut start = LeadStart::default();
        assert_eq!(start.ready_term(&view(true, 3, 10, (3, 10))), 3);
        assert_eq!(start.ready_term(&view(false, 4, 12, (3, 10))), 0);
        assert_eq!(start.ready_term(&view(true, 5, 20, (3, 10))), 0);
        assert_eq!(start.ready_term(&view(true, 5, 20, (5, 19))), 0);
        assert_eq!(start.ready_term(&view(true, 5, 21, (5, 20))), 5);
    }

    #[test]
    fn a_follower_or_a_node_without_applied_state_is_never_ready() {
        let mut start = LeadStart::default();
        assert_eq!(start.ready_term(&view(false, 2, 5, (2, 5))), 0);
        assert_eq!(start.ready_term(&LeadView { leads: true, term: 1, log_last: 0, applied: None }), 0);
    }
}
