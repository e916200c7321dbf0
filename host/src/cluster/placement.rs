//! The flock map: which nodes herd each flock. Pure: [`place`] takes the old map and the member
//! list and returns the new one, so tests drive it without a cluster.
//!
//! Rules: each flock gets `min(replication, nodes)` herders; herders that are still members stay
//! (a flock moves only when it must); new replicas go to the least-loaded nodes; then replicas
//! move from the most to the least loaded node until loads differ by at most one. The first herder
//! of a flock is its preferred leader, chosen so that preferred leaderships are spread evenly too.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::engine::NodeId;

/// Flock → herders, versioned. `herders[f][0]` is flock f's preferred leader.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlockMap {
    /// Grows by one with every change.
    pub version: u64,
    /// Herders of each flock.
    pub herders: Vec<Vec<NodeId>>,
}

/// The balanced map for `nodes`, moving as little as possible from `old`.
pub fn place(old: &FlockMap, nodes: &BTreeSet<NodeId>, flocks: u32, replication: u32) -> FlockMap {
    let copies = (replication as usize).min(nodes.len());
    let mut herders: Vec<Vec<NodeId>> = (0..flocks as usize)
        .map(|f| {
            let mut kept: Vec<NodeId> = old
                .herders
                .get(f)
                .map(|h| h.iter().copied().filter(|n| nodes.contains(n)).collect())
                .unwrap_or_default();
            kept.truncate(copies);
            kept
        })
        .collect();
    let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for set in &herders {
        for n in set {
            *load.get_mut(n).expect("members only") += 1;
        }
    }
    for (f, set) in herders.iter_mut().enumerate() {
        while set.len() < copies {
            let pick = *load
                .iter()
                .filter(|(n, _)| !set.contains(n))
                .min_by_key(|(n, l)| (**l, spread(f, **n)))
                .map(|(n, _)| n)
                .expect("fewer herders than nodes");
            set.push(pick);
            *load.get_mut(&pick).expect("member") += 1;
        }
    }
    // Move replicas from the busiest node to the idlest until they differ by at most one.
    loop {
        let (&max_node, &max) = load.iter().max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n))).expect("nodes");
        let (&min_node, &min) = load.iter().min_by_key(|(n, l)| (**l, **n)).expect("nodes");
        if max <= min + 1 {
            break;
        }
        let Some(set) = herders.iter_mut().find(|s| s.contains(&max_node) && !s.contains(&min_node)) else { break };
        let at = set.iter().position(|n| *n == max_node).expect("contains");
        set[at] = min_node;
        *load.get_mut(&max_node).expect("member") -= 1;
        *load.get_mut(&min_node).expect("member") += 1;
    }
    // Spread preferred leaders: hand a flock's lead to one of its herders that leads fewer, until
    // no flock can improve the spread (each pass moves a lead only from a busier to an idler node).
    let mut leads: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for set in herders.iter().filter(|s| !s.is_empty()) {
        *leads.get_mut(&set[0]).expect("member") += 1;
    }
    for _ in 0..herders.len() {
        let mut moved = false;
        for (f, set) in herders.iter_mut().enumerate() {
            let Some(at) = (1..set.len()).min_by_key(|&i| (leads[&set[i]], spread(f, set[i]))) else { continue };
            if leads[&set[at]] + 1 < leads[&set[0]] {
                *leads.get_mut(&set[0]).expect("member") -= 1;
                *leads.get_mut(&set[at]).expect("member") += 1;
                set.swap(0, at);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let version = if herders == old.herders { old.version } else { old.version + 1 };
    FlockMap { version, herders }
}

/// A tie-breaker that differs per flock, so ties do not all go to the lowest id.
fn spread(flock: usize, node: NodeId) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&[(flock as u64).to_le_bytes(), node.to_le_bytes()].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(map: &FlockMap) -> (BTreeMap<NodeId, usize>, BTreeMap<NodeId, usize>) {
        let mut replicas = BTreeMap::new();
        let mut leads = BTreeMap::new();
        for set in &map.herders {
            *leads.entry(set[0]).or_default() += 1;
            for n in set {
                *replicas.entry(*n).or_default() += 1;
            }
        }
        (replicas, leads)
    }

    #[test]
    fn growing_from_one_to_five_nodes_stays_balanced_and_moves_little() {
        let mut map = FlockMap::default();
        let mut nodes = BTreeSet::new();
        for node in [10, 20, 30, 40, 50] {
            nodes.insert(node);
            let next = place(&map, &nodes, 256, 3);
            let copies = 3.min(nodes.len());
            assert!(
                next.herders.iter().all(|s| s.len() == copies && s.iter().collect::<BTreeSet<_>>().len() == copies)
            );
            let (replicas, leads) = loads(&next);
            let (lo, hi) = (replicas.values().min().unwrap(), replicas.values().max().unwrap());
            assert!(hi - lo <= 1, "replica loads {replicas:?}");
            let (lo, hi) = (leads.values().min().unwrap(), leads.values().max().unwrap());
            assert!(hi - lo <= 2, "leader loads {leads:?}");
            // A flock keeps every herder that is still a member unless it must make room.
            let moved: usize = next
                .herders
                .iter()
                .zip(map.herders.iter())
                .map(|(new, old)| old.iter().filter(|n| !new.contains(n)).count())
                .sum();
            assert!(moved <= 256 * copies / nodes.len() + 1, "{moved} replicas moved");
            assert_eq!(next.version, map.version + 1);
            map = next;
        }
        assert_eq!(place(&map, &nodes, 256, 3), map, "placing again changes nothing");
    }

    #[test]
    fn a_departed_node_is_replaced() {
        let nodes: BTreeSet<NodeId> = [1, 2, 3, 4].into();
        let map = place(&FlockMap::default(), &nodes, 64, 3);
        let fewer: BTreeSet<NodeId> = [1, 2, 4].into();
        let next = place(&map, &fewer, 64, 3);
        assert!(next.herders.iter().all(|s| s.len() == 3 && !s.contains(&3)));
    }
}
