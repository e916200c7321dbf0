//! `CLUSTER` commands: the cluster as a Redis Cluster client expects to see it, so cluster-aware
//! clients (and `redis-benchmark --cluster`) send each key straight to its flock's leader instead
//! of through a node that forwards it.
//!
//! A flock is a contiguous range of hash slots (`proto::flock_slots`). A range is served by its
//! flock's leader when that node serves the Redis protocol and the answering node knows it;
//! otherwise by the answering node itself, which forwards (as it does for any key). The flock's
//! other herders are the range's replicas. Roles in Grex are per flock, so one node is the primary
//! of some ranges and a replica of others: `CLUSTER SLOTS` says exactly that, while `CLUSTER
//! NODES` and `CLUSTER SHARDS`, whose formats give a node one role, list every node as a primary
//! of the ranges it leads. Leadership moves; a client that keeps an old map still gets correct
//! answers (the node it asks forwards), only one hop slower, and no `MOVED` is ever sent.

use std::fmt::Write as _;

use grex_client::proto::{self, FlockMapInfo};

use super::{Reply, arity};
use crate::node::{Node, RespNode, Service};

/// One run of slots with the same primary and replicas.
#[derive(Debug, PartialEq, Eq)]
struct SlotRange {
    first: u16,
    last: u16,
    primary: String,
    replicas: Vec<String>,
}

/// Who serves which slots, as of one look at the flock map.
struct Topology {
    me: String,
    /// Epoch for `CLUSTER NODES`: the flock map's version.
    epoch: u64,
    nodes: Vec<RespNode>,
    ranges: Vec<SlotRange>,
}

impl Topology {
    fn of(node: &Node, service: &dyn Service) -> Topology {
        let me = node.id().to_owned();
        let mut nodes = service.resp_nodes();
        // This node answers on the Redis protocol even when no cluster (or not yet its meta log)
        // names its address.
        if !nodes.iter().any(|n| n.id == me)
            && let Some(resp) = node.node_urls().resp
        {
            nodes.push(RespNode { id: me.clone(), resp, peer: String::new() });
        }
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let map = service.flocks();
        let ranges = slot_ranges(&me, &map, &nodes);
        Topology { me, epoch: map.version, nodes, ranges }
    }

    fn node(&self, id: &str) -> Option<&RespNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Slots assigned to a node that serves them.
    fn slots_served(&self) -> u32 {
        self.ranges.iter().map(|r| u32::from(r.last - r.first) + 1).sum()
    }

    /// The slot spans a node leads, adjacent ranges joined.
    fn led_by(&self, id: &str) -> Vec<(u16, u16)> {
        let mut spans: Vec<(u16, u16)> = Vec::new();
        for r in self.ranges.iter().filter(|r| r.primary == id) {
            match spans.last_mut() {
                Some(span) if span.1 + 1 == r.first => span.1 = r.last,
                _ => spans.push((r.first, r.last)),
            }
        }
        spans
    }
}

/// The slot ranges of a flock map: consecutive flocks with the same primary and replicas merge.
/// `nodes` are the nodes that serve the Redis protocol; a leader outside it, or an unknown one,
/// is replaced by `me`.
fn slot_ranges(me: &str, map: &FlockMapInfo, nodes: &[RespNode]) -> Vec<SlotRange> {
    let serves = |id: &str| nodes.iter().any(|n| n.id == id);
    let flock_count = map.flocks.len() as u32;
    if !flock_count.is_power_of_two() {
        // No map yet (a node that has not finished joining): no slots to give.
        return Vec::new();
    }
    let mut ranges: Vec<SlotRange> = Vec::new();
    for info in &map.flocks {
        let primary = info.leader.as_deref().filter(|l| serves(l)).unwrap_or(me).to_owned();
        // Sorted: herders' order (preferred leader first) differs between flocks of the same set.
        let mut replicas: Vec<String> = info.herders.iter().filter(|h| **h != primary && serves(h)).cloned().collect();
        replicas.sort();
        let (first, last) = proto::flock_slots(info.flock, flock_count);
        match ranges.last_mut() {
            Some(r) if r.primary == primary && r.replicas == replicas => r.last = last,
            _ => ranges.push(SlotRange { first, last, primary, replicas }),
        }
    }
    ranges
}

/// A node id as Redis Cluster names nodes: 40 characters.
fn cluster_name(id: &str) -> String {
    format!("{id:0>40}")
}

/// `HOST:PORT` split for clients (an IPv6 host loses its brackets).
fn host_port(addr: &str) -> (String, i64) {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            (host.trim_start_matches('[').trim_end_matches(']').to_owned(), port.parse().unwrap_or(0))
        }
        None => (addr.to_owned(), 0),
    }
}

/// `CLUSTER subcommand [args]`.
pub(super) fn command(node: &Node, service: &dyn Service, args: &[Vec<u8>]) -> Reply {
    let Some(sub) = args.first() else { return arity("cluster") };
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    let rest = &args[1..];
    match (sub.as_str(), rest) {
        ("KEYSLOT", [key]) => Reply::Int(i64::from(proto::key_slot(key))),
        ("MYID", []) => Reply::bulk(cluster_name(node.id())),
        ("SLOTS", []) => slots(&Topology::of(node, service)),
        ("SHARDS", []) => shards(&Topology::of(node, service)),
        ("NODES", []) => Reply::bulk(nodes(&Topology::of(node, service))),
        ("INFO", []) => Reply::bulk(info(&Topology::of(node, service))),
        ("HELP", []) => Reply::Array(
            [
                "CLUSTER <subcommand> [<arg> ...]. Subcommands are:",
                "KEYSLOT <key>: the hash slot of a key (its flock holds a range of slots).",
                "MYID: this node's id.",
                "SLOTS | SHARDS | NODES: which node leads each range of slots, and the replicas.",
                "INFO: the cluster's state.",
            ]
            .into_iter()
            .map(|line| Reply::Simple(line.into()))
            .collect(),
        ),
        ("KEYSLOT" | "MYID" | "SLOTS" | "SHARDS" | "NODES" | "INFO" | "HELP", _) => {
            Reply::err(format!("wrong number of arguments for 'cluster|{}' command", sub.to_ascii_lowercase()))
        }
        _ => Reply::err(format!(
            "unknown subcommand '{}'. Try CLUSTER HELP (Grex places keys itself: slots are not assigned, \
             migrated or counted by hand)",
            sub.to_ascii_lowercase()
        )),
    }
}

/// `CLUSTER SLOTS`: `[first, last, [host, port, id], replica...]` per range.
fn slots(topology: &Topology) -> Reply {
    let entry = |id: &str| {
        topology.node(id).map(|n| {
            let (host, port) = host_port(&n.resp);
            Reply::Array(vec![Reply::bulk(host), Reply::Int(port), Reply::bulk(cluster_name(id))])
        })
    };
    Reply::Array(
        topology
            .ranges
            .iter()
            .filter_map(|r| {
                let mut fields =
                    vec![Reply::Int(i64::from(r.first)), Reply::Int(i64::from(r.last)), entry(&r.primary)?];
                fields.extend(r.replicas.iter().filter_map(|id| entry(id)));
                Some(Reply::Array(fields))
            })
            .collect(),
    )
}

/// `CLUSTER SHARDS`: one shard per node that leads slots, with that node as its only member.
fn shards(topology: &Topology) -> Reply {
    let shard = |n: &RespNode| {
        let slots: Vec<Reply> = topology
            .led_by(&n.id)
            .into_iter()
            .flat_map(|(first, last)| [Reply::Int(i64::from(first)), Reply::Int(i64::from(last))])
            .collect();
        if slots.is_empty() {
            return None;
        }
        let (host, port) = host_port(&n.resp);
        let member = Reply::Map(vec![
            (Reply::bulk("id"), Reply::bulk(cluster_name(&n.id))),
            (Reply::bulk("port"), Reply::Int(port)),
            (Reply::bulk("ip"), Reply::bulk(host.clone())),
            (Reply::bulk("endpoint"), Reply::bulk(host)),
            (Reply::bulk("role"), Reply::bulk("master")),
            (Reply::bulk("replication-offset"), Reply::Int(0)),
            (Reply::bulk("health"), Reply::bulk("online")),
        ]);
        Some(Reply::Map(vec![
            (Reply::bulk("slots"), Reply::Array(slots)),
            (Reply::bulk("nodes"), Reply::Array(vec![member])),
        ]))
    };
    Reply::Array(topology.nodes.iter().filter_map(shard).collect())
}

/// `CLUSTER NODES`: a line per node, `id host:port@bus flags master ping pong epoch link slots...`.
fn nodes(topology: &Topology) -> String {
    let mut text = String::new();
    for n in &topology.nodes {
        let (host, port) = host_port(&n.resp);
        let flags = if n.id == topology.me { "myself,master" } else { "master" };
        let bus_port = host_port(&n.peer).1;
        let _ =
            write!(text, "{} {host}:{port}@{bus_port} {flags} - 0 0 {} connected", cluster_name(&n.id), topology.epoch);
        for (first, last) in topology.led_by(&n.id) {
            if first == last {
                let _ = write!(text, " {first}");
            } else {
                let _ = write!(text, " {first}-{last}");
            }
        }
        text.push('\n');
    }
    text
}

/// `CLUSTER INFO`.
fn info(topology: &Topology) -> String {
    let served = topology.slots_served();
    let state = if served == proto::SLOTS { "ok" } else { "fail" };
    let primaries = topology.nodes.iter().filter(|n| !topology.led_by(&n.id).is_empty()).count();
    format!(
        "cluster_enabled:1\r\ncluster_state:{state}\r\ncluster_slots_assigned:{served}\r\ncluster_slots_ok:{served}\r\n\
         cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{}\r\ncluster_size:{primaries}\r\n\
         cluster_current_epoch:{epoch}\r\ncluster_my_epoch:{epoch}\r\n",
        topology.nodes.len(),
        epoch = topology.epoch,
    )
}

#[cfg(test)]
mod tests {
    use grex_client::proto::FlockInfo;

    use super::*;

    fn resp_node(id: &str, port: u16) -> RespNode {
        RespNode { id: id.into(), resp: format!("127.0.0.1:{port}"), peer: format!("127.0.0.1:{}", port + 1) }
    }

    fn map(leaders: &[Option<&str>], herders: &[&str]) -> FlockMapInfo {
        FlockMapInfo {
            version: 7,
            nodes: Vec::new(),
            flocks: leaders
                .iter()
                .enumerate()
                .map(|(flock, leader)| FlockInfo {
                    flock: flock as u32,
                    herders: herders.iter().map(|h| h.to_string()).collect(),
                    leader: leader.map(str::to_owned),
                    settled: true,
                    log_purged: 0,
                })
                .collect(),
            meta_log_purged: 0,
        }
    }

    #[test]
    fn flocks_with_one_leader_merge_into_ranges_and_every_slot_is_served() {
        let nodes = [resp_node("a", 7000), resp_node("b", 7010), resp_node("c", 7020)];
        let map = map(&[Some("a"), Some("a"), Some("b"), Some("c")], &["a", "b", "c"]);
        let ranges = slot_ranges("a", &map, &nodes);
        let spans: Vec<_> = ranges.iter().map(|r| (r.first, r.last, r.primary.as_str())).collect();
        assert_eq!(spans, vec![(0, 8191, "a"), (8192, 12287, "b"), (12288, 16383, "c")]);
        assert_eq!(ranges[1].replicas, vec!["a".to_string(), "c".to_string()], "the other herders, in map order");
    }

    #[test]
    fn herder_order_does_not_split_ranges_and_nodes_joins_what_one_node_leads() {
        let nodes = vec![resp_node("a", 7000), resp_node("b", 7010), resp_node("c", 7020)];
        let mut map = map(&[Some("a"), Some("a"), Some("b"), Some("a")], &["a", "b", "c"]);
        map.flocks[1].herders = vec!["a".into(), "c".into(), "b".into()];
        map.flocks[3].herders = vec!["c".into(), "a".into(), "b".into()];
        let ranges = slot_ranges("a", &map, &nodes);
        let spans: Vec<_> = ranges.iter().map(|r| (r.first, r.last, r.primary.as_str())).collect();
        assert_eq!(spans, vec![(0, 8191, "a"), (8192, 12287, "b"), (12288, 16383, "a")]);
        let topology = Topology { me: "a".into(), epoch: 1, nodes, ranges };
        assert_eq!(topology.led_by("a"), vec![(0, 8191), (12288, 16383)]);
        let mut split = slot_ranges("a", &map, &topology.nodes);
        split[0].replicas = vec!["x".into()];
        split.insert(1, SlotRange { first: 4096, last: 8191, primary: "a".into(), replicas: Vec::new() });
        split[0].last = 4095;
        let topology = Topology { ranges: split, ..topology };
        assert_eq!(topology.led_by("a"), vec![(0, 8191), (12288, 16383)], "adjacent ranges of one primary are joined");
    }

    #[test]
    fn a_range_without_a_reachable_leader_is_served_by_the_answering_node() {
        // "c" serves no Redis protocol; the second flock has no leader during an election.
        let nodes = [resp_node("a", 7000), resp_node("b", 7010)];
        let map = map(&[Some("c"), None, Some("b"), Some("b")], &["a", "b", "c"]);
        let ranges = slot_ranges("b", &map, &nodes);
        let spans: Vec<_> = ranges.iter().map(|r| (r.first, r.last, r.primary.as_str())).collect();
        assert_eq!(spans, vec![(0, 16383, "b")]);
        assert_eq!(ranges[0].replicas, vec!["a".to_string()], "a replica that serves no Redis protocol is left out");
        let topology = Topology { me: "b".into(), epoch: 7, nodes: nodes.to_vec(), ranges };
        assert!(info(&topology).contains("cluster_state:ok\r\n"));
        assert!(info(&topology).contains("cluster_size:1\r\n"));
    }

    #[test]
    fn nodes_and_slots_replies_name_each_node_the_same_way() {
        let members = vec![resp_node("a", 7000), resp_node("b", 7010)];
        let map = map(&[Some("a"), Some("b")], &["a", "b"]);
        let ranges = slot_ranges("b", &map, &members);
        let topology = Topology { me: "b".into(), epoch: 7, nodes: members, ranges };
        let a = cluster_name("a");
        let b = cluster_name("b");
        assert_eq!(a.len(), 40);
        assert_eq!(
            nodes(&topology),
            format!(
                "{a} 127.0.0.1:7000@7001 master - 0 0 7 connected 0-8191\n\
                 {b} 127.0.0.1:7010@7011 myself,master - 0 0 7 connected 8192-16383\n"
            )
        );
        let mut out = Vec::new();
        slots(&topology).write(&mut out, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(&format!(
            "*2\r\n*4\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$40\r\n{a}\r\n*3\r\n$9\r\n127.0.0.1\r\n:7010\r\n$40\r\n{b}\r\n"
        )));
        let mut out = Vec::new();
        shards(&topology).write(&mut out, true);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("*2\r\n%2\r\n$5\r\nslots\r\n*2\r\n:0\r\n:8191\r\n$5\r\nnodes\r\n*1\r\n%7\r\n"),
            "{text}"
        );
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        assert_eq!(host_port("[::1]:7003"), ("::1".to_string(), 7003));
        assert_eq!(host_port("127.0.0.1:7003"), ("127.0.0.1".to_string(), 7003));
    }
}
