//! The cluster's decisions as pure functions of what a node sees: whether to call an election
//! for a group and when, the order in which voters call them, and where a job goes. The
//! supervisor and the router call them with the node's live view (the failure detector, openraft's
//! metrics, the flock map); the simulation (`tests/tests/simulation.rs`) calls them with a
//! simulated one, so a schedule that breaks them replays in one process from its seed.
//!
//! Time is a [`Duration`] since an origin the caller picks (the node's start, or the simulated
//! clock's zero), so the same code runs on either clock.

use std::time::Duration;

use super::raft::NodeId;
use crate::storage::{GroupId, META_GROUP};

/// How often the supervisor looks at every group.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

/// How long a voter refuses to vote after it last heard from a leader (openraft's leader lease,
/// its `election_timeout_max`): a live leader is not deposed by a node that merely lost sight of it.
pub const VOTE_LEASE: Duration = Duration::from_millis(600);

/// How long after a leader is lost the first voter in election order calls an election; the
/// next ones wait this much longer each. Also the least time between two tries of one node.
pub const ELECT_BACKOFF: Duration = Duration::from_millis(300);

/// A flock's lead goes back to its preferred herder once the flock has been idle this long.
pub const IDLE_FOR_REBALANCE: Duration = Duration::from_secs(2);

/// How long a live leader may go without claiming its flock in its pings before its followers
/// stop counting it as their leader. A leader claims a flock once it is ready for jobs, within
/// moments of its election; one that stays unready this long cannot serve (a membership change
/// left it out), or it stepped down on a later term its followers have not heard of, and then
/// nothing else would tell them: it calls no elections and sends them nothing.
pub const UNCLAIMED_FOR: Duration = Duration::from_secs(2);

/// What a voter of a group sees when its supervisor looks.
#[derive(Clone, Copy, Debug)]
pub struct GroupSight<'a> {
    /// This node.
    pub me: NodeId,
    /// The group.
    pub group: GroupId,
    /// The group's leader as this node's raft knows it.
    pub leader: Option<NodeId>,
    /// That leader votes in the group's membership (a leader a membership change left out
    /// stays leader in openraft's view until it hears of a later term, but takes no jobs).
    pub leader_votes: bool,
    /// That leader, another node, has not claimed the group for [`UNCLAIMED_FOR`]
    /// ([`ElectionTimer::unclaimed`]).
    pub leader_unclaimed: bool,
    /// The voters of the group, in this node's view of its membership.
    pub voters: &'a [NodeId],
    /// The flock map's herders of the group, preferred leader first (empty for the meta group).
    pub preferred: &'a [NodeId],
    /// The live voter that refused this node's last vote because its log is longer, if any
    /// within the outranking window (`leadership::OUTRANKED_FOR`).
    pub outranked_by: Option<NodeId>,
    /// This node refused a candidate's vote within that window because its own log is longer.
    /// The candidates it refused defer to it, so it must run even if the map moved the group
    /// away from it: it may hold an entry no other voter has (a membership change it began as
    /// leader), and then no one else can win.
    pub outranks: bool,
}

/// The supervisor's verdict on one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The group has a live leader that votes in it (and, if another node, claims it).
    Led,
    /// No majority of the voters is reachable (or the map moved the group away from this node
    /// while a herder it names is up, and no voter defers to it): an election could not succeed
    /// or would only disturb.
    Hopeless,
    /// A live voter with a longer log refused this node: leave it the election.
    Defer,
    /// The group needs a leader; this node is `rank`th in election order.
    Leaderless {
        /// This node's place among the live voters in election order.
        rank: u32,
    },
}

/// The verdict on one group, given which nodes the failure detector holds alive.
pub fn verdict(sight: &GroupSight<'_>, alive: &dyn Fn(NodeId) -> bool) -> Verdict {
    if sight.leader.is_some_and(alive) && sight.leader_votes && !sight.leader_unclaimed {
        return Verdict::Led;
    }
    // A node the map moved the group away from still runs when the others defer to it: without
    // the map's order only the majority rule holds it back.
    let preferred = if sight.outranks { &[][..] } else { sight.preferred };
    let Some(rank) = election_rank(sight.me, sight.group, sight.voters, preferred, alive) else {
        return Verdict::Hopeless;
    };
    if sight.outranked_by.is_some_and(alive) {
        return Verdict::Defer;
    }
    Verdict::Leaderless { rank }
}

/// This node's place among a group's live voters in election order (the flock map's order, then
/// a rotation per group), or `None` if it should not call an election: no majority is
/// reachable, so it could not succeed, or the flock map no longer names this node while a live
/// voter is named (the group may have dropped this node without it hearing so; its elections
/// would only disturb the herders).
pub fn election_rank(
    me: NodeId,
    group: GroupId,
    voters: &[NodeId],
    preferred: &[NodeId],
    alive: &dyn Fn(NodeId) -> bool,
) -> Option<u32> {
    let mut order = voters.to_vec();
    order.sort_by_key(|v| (preferred.iter().position(|p| p == v).unwrap_or(usize::MAX), v.rotate_left(group % 64)));
    let live: Vec<NodeId> = order.iter().copied().filter(|v| alive(*v)).collect();
    if live.len() * 2 <= order.len() {
        return None;
    }
    if group != META_GROUP && !preferred.contains(&me) && live.iter().any(|v| preferred.contains(v)) {
        return None;
    }
    Some(live.iter().position(|v| *v == me).unwrap_or(usize::MAX) as u32)
}

/// When one node calls elections for one group: the first voter in election order right after
/// the leader is lost, the next [`ELECT_BACKOFF`] later, and so on; a node whose try failed
/// tries again after a random back-off, so that two candidates that collided in one term do not
/// collide in every later one.
#[derive(Clone, Copy, Debug, Default)]
pub struct ElectionTimer {
    leaderless_since: Option<Duration>,
    next_try: Duration,
    /// The leader that has not claimed the group, and since when.
    unclaimed_since: Option<(NodeId, Duration)>,
}

impl ElectionTimer {
    /// Called at every supervision of the group: `unclaimed_by` is the leader this node knows, if
    /// it is another node that does not claim the group in its pings. True once the same leader
    /// has gone unclaimed for [`UNCLAIMED_FOR`] (then [`GroupSight::leader_unclaimed`]); a new
    /// leader gets the whole time to become ready.
    pub fn unclaimed(&mut self, now: Duration, unclaimed_by: Option<NodeId>) -> bool {
        let Some(leader) = unclaimed_by else {
            self.unclaimed_since = None;
            return false;
        };
        let (_, since) = match self.unclaimed_since {
            Some((l, since)) if l == leader => (l, since),
            _ => *self.unclaimed_since.insert((leader, now)),
        };
        now.saturating_sub(since) >= UNCLAIMED_FOR
    }

    /// Called at every supervision of the group with its verdict; true when this node should call
    /// an election now. `leading`: this node is already the group's leader (or becoming it);
    /// `jitter`: a random number in `1.0..2.0` that scales the back-off after this try.
    pub fn elect_now(&mut self, verdict: Verdict, now: Duration, leading: bool, jitter: f64) -> bool {
        match verdict {
            Verdict::Led | Verdict::Hopeless => {
                self.leaderless_since = None;
                false
            }
            Verdict::Defer => false,
            Verdict::Leaderless { rank } => {
                let since = *self.leaderless_since.get_or_insert(now);
                let wait = ELECT_BACKOFF * rank.min(8);
                if now.saturating_sub(since) >= wait && now >= self.next_try && !leading {
                    self.next_try = now + ELECT_BACKOFF.mul_f64(jitter);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Whether the group was leaderless at the last look.
    pub fn leaderless(&self) -> bool {
        self.leaderless_since.is_some()
    }

    /// Whether a led, idle flock's lead should move to this node, its preferred herder
    /// (`rank_first`: first in election order) now. At most once per [`IDLE_FOR_REBALANCE`].
    pub fn take_back_now(&mut self, now: Duration, idle_for: Duration, leading: bool, rank_first: bool) -> bool {
        self.leaderless_since = None;
        let due = !leading
            && rank_first
            && idle_for > IDLE_FOR_REBALANCE
            && now.saturating_sub(self.next_try) > IDLE_FOR_REBALANCE;
        if due {
            self.next_try = now + ELECT_BACKOFF;
        }
        due
    }
}

/// Where a node sends a job for a flock it does not run itself: the leader if it knows one (and
/// that is not itself), else any live herder, which knows the leader or redirects. `None` while
/// this node itself is about to lead (elected, not caught up yet) or no herder is up.
pub fn route(me: NodeId, leader: Option<NodeId>, herders: &[NodeId], alive: &dyn Fn(NodeId) -> bool) -> Option<NodeId> {
    match leader {
        Some(leader) => (leader != me).then_some(leader),
        None => herders.iter().copied().find(|h| *h != me && alive(*h)),
    }
}

/// Through which node a job goes when this node's failure detector has `target` (where [`route`]
/// sends it) down: a live herder other than both, which passes it on if it still reaches `target`.
/// A cut between two nodes leaves the rest of the flock whole: without the relay, jobs entering at
/// either end for a flock the other leads would wait out the routing patience. `None` while
/// `target` looks alive, or when no such herder is up (then the node waits for an election).
pub fn relay(me: NodeId, target: NodeId, herders: &[NodeId], alive: &dyn Fn(NodeId) -> bool) -> Option<NodeId> {
    if alive(target) {
        return None;
    }
    herders.iter().copied().find(|h| *h != me && *h != target && alive(*h))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = 1;
    const B: NodeId = 2;
    const C: NodeId = 3;

    fn sight<'a>(me: NodeId, leader: Option<NodeId>, voters: &'a [NodeId], preferred: &'a [NodeId]) -> GroupSight<'a> {
        GroupSight {
            me,
            group: 0,
            leader,
            leader_votes: true,
            leader_unclaimed: false,
            voters,
            preferred,
            outranked_by: None,
            outranks: false,
        }
    }

    #[test]
    fn voters_call_elections_in_the_map_order_one_back_off_apart() {
        let all_up = |_| true;
        let voters = [C, B, A];
        let preferred = [B, C, A];
        let b_dead = |n| n != B;
        assert_eq!(verdict(&sight(C, Some(B), &voters, &preferred), &all_up), Verdict::Led);
        assert_eq!(verdict(&sight(C, Some(B), &voters, &preferred), &b_dead), Verdict::Leaderless { rank: 0 });
        assert_eq!(verdict(&sight(A, Some(B), &voters, &preferred), &b_dead), Verdict::Leaderless { rank: 1 });
        let (mut c, mut a) = (ElectionTimer::default(), ElectionTimer::default());
        let ms = Duration::from_millis;
        assert!(c.elect_now(Verdict::Leaderless { rank: 0 }, ms(1000), false, 1.0));
        assert!(!a.elect_now(Verdict::Leaderless { rank: 1 }, ms(1000), false, 1.0));
        assert!(!a.elect_now(Verdict::Leaderless { rank: 1 }, ms(1299), false, 1.0));
        assert!(a.elect_now(Verdict::Leaderless { rank: 1 }, ms(1300), false, 1.0));
        // A failed try waits out its back-off.
        assert!(!c.elect_now(Verdict::Leaderless { rank: 0 }, ms(1200), false, 1.0));
        assert!(c.elect_now(Verdict::Leaderless { rank: 0 }, ms(1300), false, 1.0));
    }

    #[test]
    fn a_minority_or_an_outranked_node_calls_no_election() {
        let voters = [A, B, C];
        let only_a = |n| n == A;
        assert_eq!(verdict(&sight(A, None, &voters, &voters), &only_a), Verdict::Hopeless);
        let outranked = GroupSight { outranked_by: Some(B), ..sight(A, None, &voters, &voters) };
        assert_eq!(verdict(&outranked, &|_| true), Verdict::Defer);
        // The outranking voter died: this node goes on.
        assert_eq!(verdict(&outranked, &|n| n != B), Verdict::Leaderless { rank: 0 });
    }

    #[test]
    fn a_node_the_map_moved_the_flock_away_from_leaves_its_election_to_the_herders() {
        let voters = [A, B, C];
        let preferred = [B, C, 4];
        assert_eq!(verdict(&sight(A, None, &voters, &preferred), &|_| true), Verdict::Hopeless);
        // With no herder the map names up, the voters still elect among themselves.
        let moved = [4, 5, 6];
        assert_eq!(verdict(&sight(A, None, &voters, &moved), &|n| n < 4), Verdict::Leaderless { rank: 0 });
        // The bug this guards: the leader began the move, lost the lead with the new membership
        // in its log alone, and refused every herder's vote for it, so they deferred to it while
        // it left the election to them; the flock had no leader for good.
        let refusing = GroupSight { outranks: true, ..sight(A, None, &voters, &preferred) };
        assert!(matches!(verdict(&refusing, &|_| true), Verdict::Leaderless { .. }));
        assert_eq!(verdict(&refusing, &|n| n == A), Verdict::Hopeless);
    }

    #[test]
    fn a_leader_that_stops_claiming_its_flock_is_no_longer_followed() {
        // The bug this guards: the leader committed a membership change that left it out, or
        // stepped down on a later term these followers never heard of; alive and silent, it kept
        // them from electing anyone for good.
        let voters = [A, B, C];
        let mut timer = ElectionTimer::default();
        let s = Duration::from_secs;
        assert!(!timer.unclaimed(s(10), Some(B)));
        assert!(!timer.unclaimed(s(10) + UNCLAIMED_FOR / 2, Some(B)));
        assert!(timer.unclaimed(s(10) + UNCLAIMED_FOR, Some(B)));
        let silent = GroupSight { leader_unclaimed: true, ..sight(A, Some(B), &voters, &voters) };
        assert_eq!(verdict(&silent, &|_| true), Verdict::Leaderless { rank: 0 });
        // A claim starts the count again, and so does another leader.
        assert!(!timer.unclaimed(s(20), None));
        assert!(!timer.unclaimed(s(20) + UNCLAIMED_FOR / 2, Some(B)));
        assert!(!timer.unclaimed(s(20) + UNCLAIMED_FOR, Some(C)));
        assert!(timer.unclaimed(s(20) + UNCLAIMED_FOR * 2, Some(C)));
    }

    #[test]
    fn a_job_goes_to_the_leader_or_else_to_a_live_herder() {
        let herders = [A, B, C];
        assert_eq!(route(A, Some(B), &herders, &|_| true), Some(B));
        assert_eq!(route(A, Some(A), &herders, &|_| true), None);
        assert_eq!(route(A, None, &herders, &|n| n != B), Some(C));
        assert_eq!(route(4, None, &herders, &|n| n == 4), None);
    }

    #[test]
    fn a_job_for_a_leader_this_node_cannot_reach_goes_through_a_herder_that_can() {
        let herders = [A, B, C];
        // A cut between A and B (B leads): A relays through C.
        assert_eq!(relay(A, B, &herders, &|n| n != B), Some(C));
        // B looks alive: no relay, the job goes to B itself.
        assert_eq!(relay(A, B, &herders, &|_| true), None);
        // A alone: nobody to relay through; A waits for an election.
        assert_eq!(relay(A, B, &herders, &|n| n == A), None);
        // A node outside the flock relays through any live herder but the unreachable one.
        assert_eq!(relay(4, B, &herders, &|n| n != B), Some(A));
    }
}
