//! The flock map: which nodes herd each flock. Pure: [`place`] takes the old map and the members
//! (with each one's zone and capacity) and returns the new one, so tests drive it without a
//! cluster.
//!
//! Rules, as Garage's layout and CockroachDB's allocator have them:
//!
//! - each flock gets `min(replication, nodes)` herders, in as many distinct zones as there are (up
//!   to that count): losing a zone loses at most the copies a flock must keep elsewhere anyway;
//! - each node's share of all copies is proportional to its capacity (a node holds at most one
//!   copy of a flock, and a zone at most what its flocks may put in one zone; what they cannot
//!   take goes to the others), see [`targets`];
//! - herders that are still members stay where zones allow (a flock moves only when it must);
//!   new copies go to the node furthest below its share; then copies move from the node furthest
//!   above its share to the one furthest below, while that brings both closer;
//! - the first herder of a flock is its preferred leader, chosen so that preferred leaderships are
//!   spread in proportion to capacity too.

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

/// Where a node stands for placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// Its failure domain (a rack, a room, a region): copies of a flock spread over zones first.
    pub zone: String,
    /// Its weight: its share of all copies is proportional to it (at least 1).
    pub capacity: u32,
}

impl Default for Site {
    fn default() -> Self {
        Site { zone: String::new(), capacity: 1 }
    }
}

/// The balanced map for `nodes`, moving as little as possible from `old`.
pub fn place(old: &FlockMap, nodes: &BTreeMap<NodeId, Site>, flocks: u32, replication: u32) -> FlockMap {
    let copies = (replication as usize).min(nodes.len());
    let zones: BTreeSet<&str> = nodes.values().map(|s| s.zone.as_str()).collect();
    // Each flock spans `want_zones` zones, so it may put at most `per_zone` copies in one.
    let want_zones = copies.min(zones.len());
    let per_zone = copies + 1 - want_zones.max(1);
    let target = targets(nodes, flocks as usize, copies, per_zone);
    let zone: BTreeMap<NodeId, &str> = nodes.iter().map(|(n, site)| (*n, site.zone.as_str())).collect();
    let mut load: BTreeMap<NodeId, usize> = nodes.keys().map(|n| (*n, 0)).collect();
    let mut herders: Vec<Vec<NodeId>> = (0..flocks as usize)
        .map(|f| {
            let mut kept: Vec<NodeId> = old
                .herders
                .get(f)
                .map(|h| h.iter().copied().filter(|n| nodes.contains_key(n)).collect())
                .unwrap_or_default();
            kept.truncate(copies);
            // A zone over its share of this flock's copies (zones changed) keeps its first ones.
            let mut in_zone: BTreeMap<&str, usize> = BTreeMap::new();
            kept.retain(|n| {
                let count = in_zone.entry(zone[n]).or_default();
                *count += 1;
                *count <= per_zone
            });
            kept
        })
        .collect();
    for set in &herders {
        for n in set {
            *load.get_mut(n).expect("members only") += 1;
        }
    }
    // How far a node would be above its share with `extra` more copies (scaled to compare exactly).
    let over = |load: &BTreeMap<NodeId, usize>, n: &NodeId, extra: f64| load[n] as f64 + extra - target[n];
    for (f, set) in herders.iter_mut().enumerate() {
        while set.len() < copies {
            let used: BTreeSet<&str> = set.iter().map(|n| zone[n]).collect();
            let fits = |n: &NodeId| {
                let same = set.iter().filter(|m| zone[*m] == zone[n]).count();
                !set.contains(n) && same < per_zone && (used.len() >= want_zones || !used.contains(zone[n]))
            };
            let pick = *nodes
                .keys()
                .filter(|n| fits(n))
                .min_by(|a, b| {
                    (over(&load, a, 1.0), spread(f, **a))
                        .partial_cmp(&(over(&load, b, 1.0), spread(f, **b)))
                        .expect("finite")
                })
                .expect("a node fits: zones and counts allow every flock its copies");
            set.push(pick);
            *load.get_mut(&pick).expect("member") += 1;
        }
    }
    rebalance(&mut herders, &mut load, &target, &zone, per_zone);
    spread_leads(&mut herders, nodes);
    let version = if herders == old.herders { old.version } else { old.version + 1 };
    FlockMap { version, herders }
}

/// Each node's fair share of `flocks × copies` copies: proportional to capacity, with no node
/// over `flocks` (one copy per flock) and no zone over `flocks × per_zone`; what a capped node or
/// zone cannot take is shared among the others the same way (water-filling).
pub fn targets(nodes: &BTreeMap<NodeId, Site>, flocks: usize, copies: usize, per_zone: usize) -> BTreeMap<NodeId, f64> {
    let mut zones: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for (n, site) in nodes {
        zones.entry(site.zone.as_str()).or_default().push(*n);
    }
    let zone_capacity = |members: &Vec<NodeId>| members.iter().map(|n| nodes[n].capacity.max(1) as f64).sum::<f64>();
    let zone_share = fill(
        &zones.iter().map(|(z, m)| (*z, zone_capacity(m), (flocks * per_zone) as f64)).collect::<Vec<_>>(),
        (flocks * copies) as f64,
    );
    let mut target = BTreeMap::new();
    for (zone, members) in &zones {
        let share = fill(
            &members.iter().map(|n| (*n, nodes[n].capacity.max(1) as f64, flocks as f64)).collect::<Vec<_>>(),
            zone_share[zone],
        );
        target.extend(share);
    }
    target
}

/// Shares `total` among `(key, weight, cap)` in proportion to weight, none over its cap.
fn fill<K: Ord + Copy>(items: &[(K, f64, f64)], total: f64) -> BTreeMap<K, f64> {
    let mut share: BTreeMap<K, f64> = items.iter().map(|(k, _, _)| (*k, 0.0)).collect();
    let mut open: Vec<&(K, f64, f64)> = items.iter().collect();
    let mut left = total;
    while left > 1e-9 && !open.is_empty() {
        let weight: f64 = open.iter().map(|(_, w, _)| w).sum();
        let capped: Vec<K> = open.iter().filter(|(_, w, cap)| left * w / weight >= *cap).map(|(k, _, _)| *k).collect();
        if capped.is_empty() {
            for (k, w, _) in &open {
                *share.get_mut(k).expect("listed") += left * w / weight;
            }
            break;
        }
        for (k, _, cap) in open.iter().filter(|(k, _, _)| capped.contains(k)) {
            *share.get_mut(k).expect("listed") = *cap;
            left -= cap;
        }
        open.retain(|(k, _, _)| !capped.contains(k));
    }
    share
}

/// Moves copies from the node furthest above its share to the one furthest below while a move
/// brings both closer (their gap exceeds one copy), keeping every flock's zones spread.
fn rebalance(
    herders: &mut [Vec<NodeId>],
    load: &mut BTreeMap<NodeId, usize>,
    target: &BTreeMap<NodeId, f64>,
    zone: &BTreeMap<NodeId, &str>,
    per_zone: usize,
) {
    let surplus = |load: &BTreeMap<NodeId, usize>, n: &NodeId| load[n] as f64 - target[n];
    for _ in 0..herders.len() * 4 {
        let mut by_surplus: Vec<NodeId> = load.keys().copied().collect();
        by_surplus.sort_by(|a, b| surplus(load, b).partial_cmp(&surplus(load, a)).expect("finite").then(a.cmp(b)));
        let mut moved = false;
        'pairs: for hi in &by_surplus {
            for lo in by_surplus.iter().rev() {
                if surplus(load, hi) - surplus(load, lo) <= 1.0 + 1e-9 {
                    break;
                }
                // A flock on `hi` but not `lo` whose zones stay spread with `lo` in `hi`'s place.
                let in_zone = |set: &Vec<NodeId>, z: &str| set.iter().filter(|m| zone[*m] == z).count();
                let fits = |set: &Vec<NodeId>| {
                    let (from, to) = (zone[hi], zone[lo]);
                    set.contains(hi)
                        && !set.contains(lo)
                        && (from == to
                            || in_zone(set, to) == 0
                            || in_zone(set, to) < per_zone && in_zone(set, from) > 1)
                };
                if let Some(set) = herders.iter_mut().find(|s| fits(s)) {
                    let at = set.iter().position(|n| n == hi).expect("contains");
                    set[at] = *lo;
                    *load.get_mut(hi).expect("member") -= 1;
                    *load.get_mut(lo).expect("member") += 1;
                    moved = true;
                    break 'pairs;
                }
            }
        }
        if !moved {
            return;
        }
    }
}

/// Hands a flock's lead to one of its herders that leads less for its capacity, until no flock
/// can improve the spread (each move goes from a busier to an idler node, so it ends).
fn spread_leads(herders: &mut [Vec<NodeId>], nodes: &BTreeMap<NodeId, Site>) {
    let weight = |n: &NodeId| nodes[n].capacity.max(1) as u64;
    let mut leads: BTreeMap<NodeId, u64> = nodes.keys().map(|n| (*n, 0)).collect();
    for set in herders.iter().filter(|s| !s.is_empty()) {
        *leads.get_mut(&set[0]).expect("member") += 1;
    }
    for _ in 0..herders.len() {
        let mut moved = false;
        for (f, set) in herders.iter_mut().enumerate() {
            // Compared as leads per capacity, cross-multiplied to stay exact.
            let Some(at) =
                (1..set.len()).min_by_key(|&i| ((leads[&set[i]] + 1) * 1_000_000 / weight(&set[i]), spread(f, set[i])))
            else {
                continue;
            };
            let (from, to) = (set[0], set[at]);
            if (leads[&to] + 1) * weight(&from) < leads[&from] * weight(&to) {
                *leads.get_mut(&from).expect("member") -= 1;
                *leads.get_mut(&to).expect("member") += 1;
                set.swap(0, at);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
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

    fn same_site(ids: &[NodeId]) -> BTreeMap<NodeId, Site> {
        ids.iter().map(|n| (*n, Site::default())).collect()
    }

    /// Replica copies that left a node between two maps.
    fn moved(old: &FlockMap, new: &FlockMap) -> usize {
        new.herders
            .iter()
            .zip(old.herders.iter())
            .map(|(new, old)| old.iter().filter(|n| !new.contains(n)).count())
            .sum()
    }

    #[test]
    fn growing_from_one_to_five_nodes_stays_balanced_and_moves_little() {
        let mut map = FlockMap::default();
        let mut ids = Vec::new();
        for node in [10, 20, 30, 40, 50] {
            ids.push(node);
            let nodes = same_site(&ids);
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
            let moved = moved(&map, &next);
            let flocks_changed = next
                .herders
                .iter()
                .zip(&map.herders)
                .filter(|(new, old)| old.iter().collect::<BTreeSet<_>>() != new.iter().collect::<BTreeSet<_>>());
            println!(
                "{} nodes: {moved} copies moved, {} of 256 flocks changed herders",
                nodes.len(),
                flocks_changed.count()
            );
            assert!(moved <= 256 * copies / nodes.len() + 1, "{moved} replicas moved");
            assert_eq!(next.version, map.version + 1);
            map = next;
        }
        assert_eq!(place(&map, &same_site(&ids), 256, 3), map, "placing again changes nothing");
    }

    #[test]
    fn a_departed_node_is_replaced() {
        let map = place(&FlockMap::default(), &same_site(&[1, 2, 3, 4]), 64, 3);
        let next = place(&map, &same_site(&[1, 2, 4]), 64, 3);
        assert!(next.herders.iter().all(|s| s.len() == 3 && !s.contains(&3)));
    }

    #[test]
    fn shares_follow_capacity_within_the_caps_of_one_copy_per_flock_and_per_zone() {
        let site = |zone: &str, capacity| Site { zone: zone.into(), capacity };
        // One node of capacity 10 among two of 1: it cannot hold more than one copy per flock.
        let nodes = BTreeMap::from([(1, site("", 10)), (2, site("", 1)), (3, site("", 1))]);
        let t = targets(&nodes, 100, 2, 2);
        assert!((t[&1] - 100.0).abs() < 1e-6 && (t[&2] - 50.0).abs() < 1e-6, "{t:?}");
        // Two zones for three copies: a zone holds at most two copies of each flock.
        let nodes = BTreeMap::from([(1, site("a", 1)), (2, site("a", 1)), (3, site("a", 1)), (4, site("b", 1))]);
        let t = targets(&nodes, 100, 3, 2);
        assert!((t[&4] - 100.0).abs() < 1e-6, "{t:?}");
        assert!(((t[&1] + t[&2] + t[&3]) - 200.0).abs() < 1e-6, "{t:?}");
    }

    /// What the layout report measures for one map.
    struct Quality {
        /// Largest |copies − fair share| of any node.
        worst_gap: f64,
        /// Flocks whose copies span fewer zones than they could.
        narrow: usize,
    }

    fn quality(map: &FlockMap, nodes: &BTreeMap<NodeId, Site>, flocks: usize, copies: usize) -> Quality {
        let zones: BTreeSet<&str> = nodes.values().map(|s| s.zone.as_str()).collect();
        let want = copies.min(zones.len());
        let target = targets(nodes, flocks, copies, copies + 1 - want);
        let (replicas, _) = loads(map);
        let worst_gap =
            nodes.keys().map(|n| (replicas.get(n).copied().unwrap_or(0) as f64 - target[n]).abs()).fold(0.0, f64::max);
        let narrow = map
            .herders
            .iter()
            .filter(|s| s.iter().map(|n| nodes[n].zone.as_str()).collect::<BTreeSet<_>>().len() < want)
            .count();
        Quality { worst_gap, narrow }
    }

    /// The layouts docs/benchmarks.md reports: 256 flocks, 3 copies, 5 and 9 nodes over three
    /// zones with capacities 1 and 2; then a node joins, and one leaves. Every map keeps each
    /// flock in three zones and every node within 1.5 copies of its fair share; a change moves
    /// at most 1.5 × the copies the new node must take (or the old one gave up).
    /// `cargo test -p grex --lib layouts -- --nocapture` prints the figures.
    #[test]
    fn layouts_of_five_and_nine_nodes_over_three_zones_stay_near_optimal_and_move_little() {
        let site = |i: u64| Site { zone: ["a", "b", "c"][(i % 3) as usize].into(), capacity: 1 + (i % 2) as u32 };
        let (flocks, copies) = (256usize, 3usize);
        for count in [5u64, 9] {
            let mut nodes: BTreeMap<NodeId, Site> = (1..=count).map(|i| (i, site(i))).collect();
            let map = place(&FlockMap::default(), &nodes, flocks as u32, copies as u32);
            let q = quality(&map, &nodes, flocks, copies);
            println!(
                "{count} nodes: worst gap from the fair share {:.2} copies, {} flocks in too few zones",
                q.worst_gap, q.narrow
            );
            assert!(q.worst_gap <= 1.5 && q.narrow == 0);
            // A node joins.
            nodes.insert(count + 1, site(count + 1));
            let joined = place(&map, &nodes, flocks as u32, copies as u32);
            let q = quality(&joined, &nodes, flocks, copies);
            let share = targets(&nodes, flocks, copies, 1)[&(count + 1)];
            let moves = moved(&map, &joined);
            println!(
                "{count} → {} nodes: {moves} copies moved (the new node's share is {share:.1}), worst gap {:.2}, {} narrow",
                count + 1,
                q.worst_gap,
                q.narrow
            );
            assert!(q.worst_gap <= 1.5 && q.narrow == 0);
            assert!(moves as f64 <= share * 1.5, "{moves} copies moved for a share of {share:.1}");
            // Node 1 leaves.
            let gone = nodes.remove(&1).expect("node 1");
            let _ = gone;
            let left = place(&joined, &nodes, flocks as u32, copies as u32);
            let q = quality(&left, &nodes, flocks, copies);
            let held = loads(&joined).0[&1];
            let moves = moved(&joined, &left);
            println!(
                "{} → {count} nodes (node 1 leaves, it held {held}): {moves} copies moved, worst gap {:.2}, {} narrow",
                count + 1,
                q.worst_gap,
                q.narrow
            );
            assert!(q.worst_gap <= 1.5 && q.narrow == 0);
            assert!(moves as f64 <= held as f64 * 1.5, "{moves} copies moved for {held} lost");
        }
    }
}
