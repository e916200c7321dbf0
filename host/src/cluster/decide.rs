//! The cluster's routing decisions as pure functions of what a node sees: where a job goes, and
//! which herder should lead a flock. The router and the supervisor call them with the node's
//! live view (the failure detector, the engine's groups, the flock map); the simulation calls
//! them with a simulated one.

use std::time::Duration;

use super::engine::NodeId;

/// A flock's lead goes to its preferred herder once the flock has been idle this long.
pub const IDLE_FOR_REBALANCE: Duration = Duration::from_secs(2);

/// The herder that should lead a flock: the first live one in the flock map's order that votes
/// in the group (the map spreads first places evenly over the nodes).
pub fn preferred_leader(herders: &[NodeId], voters: &[NodeId], alive: &dyn Fn(NodeId) -> bool) -> Option<NodeId> {
    herders.iter().copied().find(|h| voters.contains(h) && alive(*h))
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

    #[test]
    fn the_first_live_voting_herder_in_map_order_should_lead() {
        assert_eq!(preferred_leader(&[B, C, A], &[A, B, C], &|_| true), Some(B));
        assert_eq!(preferred_leader(&[B, C, A], &[A, B, C], &|n| n != B), Some(C));
        // A herder the group does not count yet (a learner being caught up) waits its turn.
        assert_eq!(preferred_leader(&[4, C, A], &[A, B, C], &|_| true), Some(C));
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
