//! Scripted scenarios for the engine, without sockets or disks: nodes are engines with an
//! in-memory disk and state machine, the network is a queue the test delivers, cuts and drops.
//! Each scenario drives elections, replication, catch-up, membership and partitions and checks
//! what every node applied.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, Entry, HardState, MessageType};
use raft::{RaftState, StateRole};

use super::*;

/// A node's disk: the log's entries, hard states and purge points.
#[derive(Default)]
struct Disk {
    log: Mutex<BTreeMap<(GroupId, u64), Entry>>,
    hard: Mutex<BTreeMap<GroupId, HardState>>,
    base: Mutex<BTreeMap<GroupId, (u64, u64)>>,
}

impl EntrySource for Disk {
    fn entries(&self, group: GroupId, low: u64, high: u64, max_bytes: u64) -> anyhow::Result<Vec<Entry>> {
        let log = self.log.lock().unwrap();
        let mut out = Vec::new();
        let mut bytes = 0;
        for index in low..high {
            let entry = log.get(&(group, index)).ok_or_else(|| anyhow::anyhow!("entry {index} missing"))?;
            bytes += entry_bytes(entry);
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }
}

impl Disk {
    fn write(&self, write: &Write) {
        let mut log = self.log.lock().unwrap();
        for gw in &write.groups {
            if let Some(snapshot) = &gw.snapshot {
                let meta = snapshot.get_metadata();
                log.retain(|&(g, _), _| g != gw.group);
                self.base.lock().unwrap().insert(gw.group, (meta.index, meta.term));
            }
            if let Some(first) = gw.entries.first() {
                log.retain(|&(g, i), _| g != gw.group || i < first.index);
                for entry in &gw.entries {
                    log.insert((gw.group, entry.index), entry.clone());
                }
            }
            if let Some(hs) = &gw.hard_state {
                self.hard.lock().unwrap().insert(gw.group, hs.clone());
            }
        }
    }

    fn purge(&self, group: GroupId, upto: u64) {
        let mut log = self.log.lock().unwrap();
        let Some(term) = log.get(&(group, upto)).map(|e| e.term) else { return };
        log.retain(|&(g, i), _| g != group || i > upto);
        self.base.lock().unwrap().insert(group, (upto, term));
    }
}

/// A group's state machine: the data of every applied entry, in order.
#[derive(Clone, Debug, Default, PartialEq)]
struct Machine {
    applied: u64,
    term: u64,
    conf: ConfState,
    data: Vec<Vec<u8>>,
}

impl Machine {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).unwrap()
    }
}

struct Node {
    engine: Engine,
    disk: Arc<Disk>,
    machines: BTreeMap<GroupId, Machine>,
    /// Writes handed out and not yet made durable (when the test holds them).
    unwritten: VecDeque<Write>,
    hold_writes: bool,
    reads: Vec<(GroupId, ReadState)>,
    /// How many frames (one per peer per output) and writes this node sent.
    frames: usize,
    writes: usize,
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    wire: VecDeque<(NodeId, NodeId, Envelope)>,
    down: BTreeSet<NodeId>,
    cut: BTreeSet<(NodeId, NodeId)>,
    seed: u64,
}

fn config(seed: u64) -> EngineConfig {
    EngineConfig { seed, ..EngineConfig::default() }
}

fn voters(ids: &[NodeId]) -> ConfState {
    ConfState { voters: ids.to_vec(), ..Default::default() }
}

impl Cluster {
    /// `ids.len()` nodes, each a voter of every group in `groups`.
    fn new(ids: &[NodeId], groups: &[GroupId], seed: u64) -> Cluster {
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            wire: VecDeque::new(),
            down: BTreeSet::new(),
            cut: BTreeSet::new(),
            seed,
        };
        for &id in ids {
            cluster.start(id);
            for &group in groups {
                cluster.add_group(id, group, voters(ids));
            }
        }
        cluster
    }

    /// Nodes `ids`, each in every group of `groups` with configuration `conf`.
    fn with_conf(ids: &[NodeId], groups: &[GroupId], conf: ConfState, seed: u64) -> Cluster {
        let mut cluster = Cluster::new(&[], &[], seed);
        for &id in ids {
            cluster.start(id);
            for &group in groups {
                cluster.add_group(id, group, conf.clone());
            }
        }
        cluster
    }

    fn start(&mut self, id: NodeId) {
        let node = Node {
            engine: Engine::new(id, config(self.seed ^ id)),
            disk: Arc::new(Disk::default()),
            machines: BTreeMap::new(),
            unwritten: VecDeque::new(),
            hold_writes: false,
            reads: Vec::new(),
            frames: 0,
            writes: 0,
        };
        self.nodes.insert(id, node);
    }

    fn add_group(&mut self, id: NodeId, group: GroupId, conf: ConfState) {
        let node = self.nodes.get_mut(&id).unwrap();
        let machine = Machine { applied: BOOTSTRAP_INDEX, term: BOOTSTRAP_INDEX, conf: conf.clone(), data: Vec::new() };
        node.machines.insert(group, machine);
        let (index, term) = (BOOTSTRAP_INDEX, BOOTSTRAP_INDEX);
        node.disk.base.lock().unwrap().insert(group, (index, term));
        node.disk.hard.lock().unwrap().insert(group, HardState { term, commit: index, ..Default::default() });
        node.engine.add_group(group, GroupLog::bootstrap(group, conf, node.disk.clone())).unwrap();
    }

    fn link(&self, from: NodeId, to: NodeId) -> bool {
        !self.down.contains(&from)
            && !self.down.contains(&to)
            && !self.cut.contains(&(from, to))
            && !self.cut.contains(&(to, from))
    }

    /// Hands out everything node `id` has to do: sends, writes (unless held), applies.
    fn pump(&mut self, id: NodeId) {
        if self.down.contains(&id) {
            return;
        }
        loop {
            let node = self.nodes.get_mut(&id).unwrap();
            let out = node.engine.output();
            if out.is_empty() {
                return;
            }
            node.frames += out.messages.len();
            for (to, envelopes) in out.messages {
                for mut envelope in envelopes {
                    if envelope.message.get_msg_type() == MessageType::MsgSnapshot {
                        let machine = &node.machines[&envelope.group];
                        let meta = envelope.message.get_snapshot().get_metadata();
                        assert_eq!(meta.index, machine.applied, "a snapshot is of the applied state");
                        envelope.message.mut_snapshot().data = machine.encode().into();
                    }
                    self.wire.push_back((id, to, envelope));
                }
            }
            if let Some(write) = out.write {
                node.writes += 1;
                node.unwritten.push_back(write);
            }
            if !node.hold_writes {
                Cluster::flush(node);
            }
            for committed in out.committed {
                let machine = node.machines.get_mut(&committed.group).unwrap();
                let mut confs = committed.conf_states.iter();
                for entry in &committed.entries {
                    assert_eq!(entry.index, machine.applied + 1, "entries apply in order");
                    machine.applied = entry.index;
                    machine.term = entry.term;
                    if entry.get_entry_type() == raft::prelude::EntryType::EntryConfChangeV2 {
                        if let Some((_, conf)) = confs.next() {
                            machine.conf = conf.clone();
                        }
                    } else if !entry.data.is_empty() {
                        machine.data.push(entry.data.to_vec());
                    }
                }
                node.engine.applied(committed.group, machine.applied);
            }
            node.reads.extend(out.reads);
        }
    }

    /// Makes node `id`'s held writes durable.
    fn flush(node: &mut Node) {
        while let Some(write) = node.unwritten.pop_front() {
            node.disk.write(&write);
            for gw in &write.groups {
                if let Some(snapshot) = &gw.snapshot {
                    let data: Vec<Vec<u8>> = serde_json::from_slice(&snapshot.data).unwrap();
                    let meta = snapshot.get_metadata();
                    node.machines.insert(
                        gw.group,
                        Machine { applied: meta.index, term: meta.term, conf: meta.get_conf_state().clone(), data },
                    );
                }
            }
            node.engine.persisted(write.id);
        }
    }

    /// Delivers messages and pumps every node until nothing moves. Each round delivers
    /// everything on the wire, as a driver steps every frame that arrived before its next
    /// output.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for &id in &ids {
                self.pump(id);
            }
            if self.wire.is_empty() {
                return;
            }
            for (from, to, envelope) in std::mem::take(&mut self.wire) {
                if !self.link(from, to) {
                    continue;
                }
                let node = self.nodes.get_mut(&to).unwrap();
                let group = envelope.group;
                for stray in node.engine.step([envelope]) {
                    // A node learns of a group it joins from its leader's first message.
                    node.machines.insert(group, Machine::default());
                    let log = GroupLog::empty(group, node.disk.clone());
                    node.engine.add_group(group, log).unwrap();
                    node.engine.step([stray]);
                }
            }
        }
        panic!("the cluster did not settle (seed {})", self.seed);
    }

    fn tick(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for (id, node) in self.nodes.iter_mut() {
                if !self.down.contains(id) {
                    node.engine.tick();
                }
            }
            self.settle();
        }
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        let leaders: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, n)| {
                !self.down.contains(id) && n.engine.lead(group).is_some_and(|l| l.role == StateRole::Leader)
            })
            .map(|(id, _)| *id)
            .collect();
        leaders.iter().copied().max_by_key(|id| self.nodes[id].engine.lead(group).unwrap().term)
    }

    /// Ticks until `group` has a leader that is ready to serve; returns it and the ticks taken.
    fn elect(&mut self, group: GroupId) -> (NodeId, usize) {
        for ticks in 0..1000 {
            if let Some(leader) = self.leader(group)
                && self.nodes[&leader].engine.lead(group).unwrap().ready
            {
                return (leader, ticks);
            }
            self.tick(1);
        }
        panic!("no leader of group {group} after 1000 ticks (seed {})", self.seed);
    }

    fn propose(&mut self, at: NodeId, group: GroupId, data: &str) -> Result<Proposal, Refusal> {
        let proposal = self.nodes.get_mut(&at).unwrap().engine.propose(group, data.as_bytes().to_vec());
        self.settle();
        proposal
    }

    fn applied(&self, id: NodeId, group: GroupId) -> Vec<String> {
        self.nodes[&id].machines[&group].data.iter().map(|d| String::from_utf8(d.clone()).unwrap()).collect()
    }

    /// Whether `proposal` was committed as proposed, by the log of node `id`.
    fn committed_as_proposed(&self, id: NodeId, group: GroupId, proposal: Proposal) -> bool {
        let disk = self.nodes[&id].disk.log.lock().unwrap();
        disk.get(&(group, proposal.index)).is_some_and(|e| e.term == proposal.term)
            && self.nodes[&id].machines[&group].applied >= proposal.index
    }

    fn peer_down(&mut self, lost: NodeId) {
        for (id, node) in self.nodes.iter_mut() {
            if *id != lost {
                node.engine.peer_down(lost);
            }
        }
    }

    /// Kills node `id` (losing held writes) and starts it again from its disk and state machine.
    fn restart(&mut self, id: NodeId) {
        let old = self.nodes.remove(&id).unwrap();
        let mut engine = Engine::new(id, config(self.seed ^ id ^ 0x5eed));
        for (&group, machine) in &old.machines {
            let hard_state = old.disk.hard.lock().unwrap().get(&group).cloned().unwrap_or_default();
            let base = old.disk.base.lock().unwrap().get(&group).copied().unwrap_or((0, 0));
            let log = old.disk.log.lock().unwrap();
            let entries: Vec<&Entry> = log.range((group, base.0 + 1)..=(group, u64::MAX)).map(|(_, e)| e).collect();
            let last = entries.last().map_or(base.0, |e| e.index);
            let mut terms: Vec<(u64, u64)> = Vec::new();
            for e in &entries {
                if terms.last().is_none_or(|&(_, t)| t != e.term) {
                    terms.push((e.index, e.term));
                }
            }
            let applied = raft::prelude::SnapshotMetadata {
                index: machine.applied,
                term: machine.term,
                conf_state: Some(machine.conf.clone()).into(),
                ..Default::default()
            };
            let state = RaftState { hard_state, conf_state: machine.conf.clone() };
            let restored = GroupLog::restore(group, state, base, last, terms, applied, old.disk.clone());
            drop(log);
            engine.add_group(group, restored).unwrap();
        }
        let node = Node {
            engine,
            disk: old.disk,
            machines: old.machines,
            unwritten: VecDeque::new(),
            hold_writes: false,
            reads: Vec::new(),
            frames: 0,
            writes: 0,
        };
        self.nodes.insert(id, node);
        self.down.remove(&id);
    }
}

fn change(kind: ConfChangeType, node: NodeId) -> ConfChangeSingle {
    ConfChangeSingle { change_type: kind, node_id: node, ..Default::default() }
}

fn conf_change(changes: Vec<ConfChangeSingle>) -> ConfChangeV2 {
    ConfChangeV2 { changes: changes.into(), transition: ConfChangeTransition::Auto, ..Default::default() }
}

const G: GroupId = 7;

#[test]
fn three_nodes_elect_one_leader_and_apply_the_same_entries() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 1);
    let (leader, _) = cluster.elect(G);
    for i in 0..20 {
        cluster.propose(leader, G, &format!("e{i}")).unwrap();
    }
    cluster.tick(10); // a heartbeat carries the last commit index to the followers
    let want: Vec<String> = (0..20).map(|i| format!("e{i}")).collect();
    for id in [1, 2, 3] {
        assert_eq!(cluster.applied(id, G), want, "node {id}");
    }
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let refused = cluster.propose(follower, G, "at a follower");
    assert_eq!(refused, Err(Refusal::NotLeader { leader: Some(leader) }));
}

#[test]
fn a_lost_leader_is_replaced_within_the_stagger_not_the_election_timeout() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 2);
    let (leader, _) = cluster.elect(G);
    let acked: Vec<Proposal> = (0..10).map(|i| cluster.propose(leader, G, &format!("a{i}")).unwrap()).collect();
    cluster.down.insert(leader);
    cluster.peer_down(leader);
    let (next, ticks) = cluster.elect(G);
    assert_ne!(next, leader);
    let stagger = EngineConfig::default().campaign_stagger_ticks as usize;
    assert!(
        ticks <= 2 + stagger,
        "took {ticks} ticks; the election timeout is {}",
        EngineConfig::default().election_ticks
    );
    for proposal in acked {
        assert!(cluster.committed_as_proposed(next, G, proposal), "{proposal:?} lost");
    }
    cluster.propose(next, G, "after").unwrap();
    cluster.tick(10);
    let survivors: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    assert_eq!(cluster.applied(survivors[0], G), cluster.applied(survivors[1], G));
    assert_eq!(cluster.applied(next, G).last().unwrap(), "after");
}

#[test]
fn without_the_failure_detector_the_election_timer_still_replaces_the_leader_of_a_busy_group() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 3);
    // Groups that never sleep: a sleeping group has no timer running (see the test below).
    for node in cluster.nodes.values_mut() {
        node.engine.config.hibernate_ticks = 0;
    }
    let (leader, _) = cluster.elect(G);
    cluster.down.insert(leader);
    let (next, ticks) = cluster.elect(G);
    assert_ne!(next, leader);
    assert!(ticks >= EngineConfig::default().election_ticks, "elected after {ticks} ticks");
}

#[test]
fn a_follower_back_from_a_short_absence_catches_up_from_the_log() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 4);
    let (leader, _) = cluster.elect(G);
    let away = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    cluster.down.insert(away);
    for i in 0..50 {
        cluster.propose(leader, G, &format!("b{i}")).unwrap();
    }
    cluster.down.remove(&away);
    cluster.tick(12);
    assert_eq!(cluster.applied(away, G), cluster.applied(leader, G));
    assert_eq!(cluster.applied(away, G).len(), 50);
}

#[test]
fn a_follower_behind_a_purged_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 5);
    let (leader, _) = cluster.elect(G);
    let away = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    cluster.down.insert(away);
    for i in 0..200 {
        cluster.propose(leader, G, &format!("c{i}")).unwrap();
    }
    cluster.tick(10);
    for (&id, node) in cluster.nodes.iter_mut() {
        if id != away {
            let upto = node.machines[&G].applied;
            node.engine.purge(G, upto);
            node.disk.purge(G, upto);
        }
    }
    cluster.down.remove(&away);
    cluster.tick(12);
    assert_eq!(cluster.applied(away, G), cluster.applied(leader, G));
    assert_eq!(cluster.applied(away, G).len(), 200);
    assert!(cluster.nodes[&away].disk.base.lock().unwrap()[&G].0 > BOOTSTRAP_INDEX, "caught up by snapshot");
    cluster.propose(leader, G, "after").unwrap();
    cluster.tick(10);
    assert_eq!(cluster.applied(away, G).last().unwrap(), "after");
}

#[test]
fn a_group_moves_to_a_new_herder_and_its_leader_leaves_it() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 6);
    cluster.start(4);
    let (leader, _) = cluster.elect(G);
    for i in 0..30 {
        cluster.propose(leader, G, &format!("d{i}")).unwrap();
    }
    // Learner first, then promote it and remove the leader in one joint change.
    let learner = conf_change(vec![change(ConfChangeType::AddLearnerNode, 4)]);
    cluster.nodes.get_mut(&leader).unwrap().engine.propose_conf_change(G, learner).unwrap();
    cluster.tick(12);
    assert_eq!(cluster.applied(4, G).len(), 30, "the learner caught up");
    let swap = conf_change(vec![change(ConfChangeType::AddNode, 4), change(ConfChangeType::RemoveNode, leader)]);
    cluster.nodes.get_mut(&leader).unwrap().engine.propose_conf_change(G, swap).unwrap();
    cluster.tick(3);
    let (next, _) = cluster.elect(G);
    assert_ne!(next, leader, "the removed leader no longer leads");
    let (voters, learners) = cluster.nodes[&next].engine.members(G).unwrap();
    let mut want: BTreeSet<NodeId> = [1, 2, 3, 4].into();
    want.remove(&leader);
    assert_eq!((voters, learners), (want.clone(), BTreeSet::new()));
    cluster.propose(next, G, "after").unwrap();
    cluster.tick(10);
    for id in want {
        assert_eq!(cluster.applied(id, G).len(), 31, "node {id}");
    }
}

#[test]
fn a_proposal_while_the_lead_is_handed_over_is_sent_to_the_next_leader() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 17);
    let (leader, _) = cluster.elect(G);
    let next = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let engine = &mut cluster.nodes.get_mut(&leader).unwrap().engine;
    engine.transfer_leader(G, next).unwrap();
    // The transfer is under way until `next` hears it and wins: raft-rs would drop this.
    let during = engine.propose(G, b"during".to_vec());
    assert_eq!(during, Err(Refusal::NotLeader { leader: Some(next) }));
    cluster.settle();
    assert_eq!(cluster.elect(G).0, next);
    let after = cluster.propose(next, G, "after").unwrap();
    cluster.tick(10);
    for id in [1, 2, 3] {
        assert!(cluster.committed_as_proposed(id, G, after), "node {id}");
        assert_eq!(cluster.applied(id, G), ["after"], "node {id}: only what was taken is applied");
    }
}

#[test]
fn a_change_raft_would_ignore_is_refused_not_passed_off_as_made() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 16);
    cluster.start(4);
    cluster.start(5);
    let (leader, _) = cluster.elect(G);
    let engine = &mut cluster.nodes.get_mut(&leader).unwrap().engine;
    engine.propose_conf_change(G, conf_change(vec![change(ConfChangeType::AddLearnerNode, 4)])).unwrap();
    // raft-rs would append an empty entry in its place while the first is unapplied.
    let second = engine.propose_conf_change(G, conf_change(vec![change(ConfChangeType::AddLearnerNode, 5)]));
    assert!(matches!(second, Err(Refusal::Busy)), "{second:?}");
    cluster.tick(12);
    let engine = &mut cluster.nodes.get_mut(&leader).unwrap().engine;
    engine.propose_conf_change(G, conf_change(vec![change(ConfChangeType::AddLearnerNode, 5)])).unwrap();
    cluster.tick(12);
    let (_, learners) = cluster.nodes[&leader].engine.members(G).unwrap();
    assert_eq!(learners, [4, 5].into());
    // Leaving a joint configuration that is not joint: refused too.
    let engine = &mut cluster.nodes.get_mut(&leader).unwrap().engine;
    assert!(matches!(engine.propose_conf_change(G, conf_change(Vec::new())), Err(Refusal::Busy)));
}

#[test]
fn a_node_cut_from_the_leader_alone_does_not_depose_it() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 7);
    let (leader, _) = cluster.elect(G);
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    let (cut_off, third) = (others[0], others[1]);
    cluster.cut.insert((leader, cut_off));
    cluster.nodes.get_mut(&cut_off).unwrap().engine.peer_down(leader);
    let term = cluster.nodes[&leader].engine.lead(G).unwrap().term;
    cluster.tick(100);
    assert_eq!(cluster.leader(G), Some(leader));
    assert_eq!(cluster.nodes[&leader].engine.lead(G).unwrap().term, term, "pre-vote kept the term");
    let proposal = cluster.propose(leader, G, "through the third").unwrap();
    cluster.tick(10);
    assert!(cluster.committed_as_proposed(third, G, proposal));
    cluster.cut.clear();
    cluster.tick(12);
    assert_eq!(cluster.applied(cut_off, G), ["through the third"]);
}

#[test]
fn a_cut_off_leader_acknowledges_nothing_and_its_entries_are_replaced() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 8);
    let (leader, _) = cluster.elect(G);
    cluster.propose(leader, G, "before").unwrap();
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    for &other in &others {
        cluster.cut.insert((leader, other));
        cluster.nodes.get_mut(&other).unwrap().engine.peer_down(leader);
    }
    let stranded = cluster.propose(leader, G, "stranded").unwrap();
    let next = loop {
        cluster.tick(1);
        if let Some(&next) = others.iter().find(|&&id| cluster.nodes[&id].engine.lead(G).unwrap().ready) {
            break next;
        }
    };
    cluster.propose(next, G, "majority").unwrap();
    cluster.cut.clear();
    cluster.tick(40);
    assert_ne!(cluster.nodes[&leader].engine.lead(G).unwrap().role, StateRole::Leader);
    assert!(!cluster.committed_as_proposed(leader, G, stranded), "the stranded entry was replaced");
    for id in [1, 2, 3] {
        assert_eq!(cluster.applied(id, G), ["before", "majority"], "node {id}");
    }
}

#[test]
fn a_leader_sends_before_its_own_write_and_commits_once_a_follower_has_written() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 9);
    let (leader, _) = cluster.elect(G);
    for node in cluster.nodes.values_mut() {
        node.hold_writes = true;
    }
    let proposal = cluster.propose(leader, G, "overlapped").unwrap();
    // The followers received the entry although no node has written it yet.
    for id in [1, 2, 3] {
        if id != leader {
            let node = &cluster.nodes[&id];
            assert!(node.unwritten.iter().any(|w| w.groups.iter().any(|g| !g.entries.is_empty())), "node {id}");
        }
    }
    assert!(cluster.applied(leader, G).is_empty());
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    Cluster::flush(cluster.nodes.get_mut(&follower).unwrap());
    cluster.settle();
    assert!(cluster.applied(leader, G).is_empty(), "the leader's own write is still pending");
    Cluster::flush(cluster.nodes.get_mut(&leader).unwrap());
    cluster.settle();
    assert_eq!(cluster.applied(leader, G), ["overlapped"]);
    assert!(cluster.committed_as_proposed(leader, G, proposal));
}

#[test]
fn many_groups_share_one_write_and_one_frame_per_peer() {
    let groups: Vec<GroupId> = (0..64).collect();
    let mut cluster = Cluster::new(&[1, 2, 3], &groups, 10);
    for &group in &groups {
        // Spread leaders: each group's first campaign on a node chosen by the group.
        cluster.nodes.get_mut(&(1 + group as u64 % 3)).unwrap().engine.campaign(group).unwrap();
    }
    cluster.settle();
    for &group in &groups {
        cluster.elect(group);
    }
    let before: BTreeMap<NodeId, (usize, usize)> =
        cluster.nodes.iter().map(|(&id, n)| (id, (n.frames, n.writes))).collect();
    for &group in &groups {
        let leader = cluster.leader(group).unwrap();
        cluster.nodes.get_mut(&leader).unwrap().engine.propose(group, b"x".to_vec()).unwrap();
    }
    let leader = cluster.leader(0).unwrap();
    let out = cluster.nodes.get_mut(&leader).unwrap().engine.output();
    let led = groups.iter().filter(|&&g| cluster.leader(g) == Some(leader)).count();
    assert_eq!(out.write.as_ref().unwrap().groups.len(), led, "one write for every group it leads");
    assert_eq!(out.messages.len(), 2, "one list per peer");
    assert_eq!(out.messages.values().map(Vec::len).sum::<usize>(), 2 * led);
    cluster.wire.extend(out.messages.into_iter().flat_map(|(to, es)| es.into_iter().map(move |e| (leader, to, e))));
    let node = cluster.nodes.get_mut(&leader).unwrap();
    node.unwritten.extend(out.write);
    Cluster::flush(node);
    cluster.settle();
    cluster.tick(10);
    for &group in &groups {
        for id in [1, 2, 3] {
            assert_eq!(cluster.applied(id, group), ["x"], "node {id} group {group}");
        }
    }
    for (id, node) in &cluster.nodes {
        let (frames, writes) = before[id];
        // Proposals, replication, commit: a handful of frames and writes, not one per group.
        assert!(node.writes - writes <= 12, "node {id}: {} writes", node.writes - writes);
        assert!(node.frames - frames <= 30, "node {id}: {} frames", node.frames - frames);
    }
}

#[test]
fn a_restarted_node_keeps_what_it_acknowledged_and_rejoins() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 11);
    let (leader, _) = cluster.elect(G);
    let acked: Vec<Proposal> = (0..10).map(|i| cluster.propose(leader, G, &format!("r{i}")).unwrap()).collect();
    for id in [1, 2, 3] {
        cluster.restart(id);
    }
    let (next, _) = cluster.elect(G);
    for proposal in acked {
        assert!(cluster.committed_as_proposed(next, G, proposal), "{proposal:?} lost");
    }
    cluster.propose(next, G, "after").unwrap();
    cluster.tick(10);
    for id in [1, 2, 3] {
        assert_eq!(cluster.applied(id, G).len(), 11, "node {id}");
    }
}

#[test]
fn a_read_index_answers_at_the_commit_index_on_the_leader() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 12);
    let (leader, _) = cluster.elect(G);
    let proposal = cluster.propose(leader, G, "w").unwrap();
    cluster.nodes.get_mut(&leader).unwrap().engine.read_index(G, b"r1".to_vec()).unwrap();
    cluster.settle();
    let reads = &cluster.nodes[&leader].reads;
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].1.request_ctx, b"r1");
    assert!(reads[0].1.index >= proposal.index);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed: u64| {
        let mut cluster = Cluster::new(&[1, 2, 3], &[1, 2, 3, 4], seed);
        let mut trace = Vec::new();
        for round in 0..5 {
            for group in 1..=4 {
                let (leader, ticks) = cluster.elect(group);
                trace.push((leader, ticks));
                let _ = cluster.propose(leader, group, &format!("{round}"));
            }
            let victim = cluster.leader(1).unwrap();
            cluster.down.insert(victim);
            cluster.tick(3);
            cluster.down.remove(&victim);
        }
        trace
    };
    for seed in [13, 14] {
        println!("seed {seed}");
        assert_eq!(run(seed), run(seed));
    }
}

#[test]
fn an_idle_group_sleeps_and_sends_nothing_until_a_proposal_wakes_it() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 11);
    let (leader, _) = cluster.elect(G);
    cluster.propose(leader, G, "before").unwrap();
    cluster.tick(EngineConfig::default().hibernate_ticks as usize + 15);
    let frames: Vec<usize> = cluster.nodes.values().map(|n| n.frames).collect();
    cluster.tick(500);
    assert_eq!(cluster.nodes.values().map(|n| n.frames).collect::<Vec<_>>(), frames, "a sleeping group sends nothing");
    assert_eq!(cluster.leader(G), Some(leader));
    let proposal = cluster.propose(leader, G, "after").unwrap();
    cluster.tick(12);
    for id in [1, 2, 3] {
        assert!(cluster.committed_as_proposed(id, G, proposal), "node {id}");
        assert_eq!(cluster.applied(id, G), ["before", "after"], "node {id}");
    }
}

#[test]
fn a_leader_sleeps_only_once_every_member_knows_what_is_committed() {
    // A learner never campaigns, so nothing of its own would wake a sleeping leader: if it holds
    // an entry but missed what told it the entry is committed, only the leader can tell it. (A
    // voter with an unapplied configuration change is as stuck: raft refuses its campaigns.)
    let conf = ConfState { voters: vec![1, 2, 3], learners: vec![4], ..Default::default() };
    let mut cluster = Cluster::with_conf(&[1, 2, 3, 4], &[G], conf, 15);
    let (leader, _) = cluster.elect(G);
    let idle = EngineConfig::default().hibernate_ticks as usize + 15;
    cluster.tick(idle);
    // The append reaches every member; the commit would ride on the next heartbeat, which the
    // learner does not get.
    cluster.propose(leader, G, "x").unwrap();
    cluster.cut.insert((leader, 4));
    cluster.tick(idle);
    assert!(cluster.applied(4, G).is_empty(), "the learner cannot know the entry is committed yet");
    cluster.cut.clear();
    cluster.tick(idle);
    assert_eq!(cluster.applied(4, G), ["x"], "the leader slept before the learner knew the commit");
    let frames: Vec<usize> = cluster.nodes.values().map(|n| n.frames).collect();
    cluster.tick(500);
    assert_eq!(cluster.nodes.values().map(|n| n.frames).collect::<Vec<_>>(), frames, "then the group sleeps");
}

#[test]
fn the_failure_detector_wakes_a_sleeping_group_to_replace_its_lost_leader() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 12);
    let (leader, _) = cluster.elect(G);
    cluster.tick(EngineConfig::default().hibernate_ticks as usize + 15);
    cluster.down.insert(leader);
    cluster.tick(500);
    assert!(
        cluster
            .nodes
            .iter()
            .filter(|(id, _)| **id != leader)
            .all(|(_, n)| n.engine.lead(G).unwrap().leader == Some(leader)),
        "asleep, the followers run no timer of their own"
    );
    for id in [1, 2, 3].into_iter().filter(|&id| id != leader) {
        cluster.nodes.get_mut(&id).unwrap().engine.peer_down(leader);
    }
    let (next, ticks) = cluster.elect(G);
    assert_ne!(next, leader);
    assert!(ticks < EngineConfig::default().election_ticks, "elected after {ticks} ticks");
    let proposal = cluster.propose(next, G, "after").unwrap();
    cluster.tick(12);
    assert!(cluster.committed_as_proposed(next, G, proposal));
}

#[test]
fn a_member_restarted_while_its_group_sleeps_learns_the_leader_and_catches_up() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 13);
    let (leader, _) = cluster.elect(G);
    cluster.propose(leader, G, "before").unwrap();
    cluster.tick(EngineConfig::default().hibernate_ticks as usize + 15);
    let member = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    cluster.restart(member);
    // The leader's failure detector sees the new process; the restarted node's sees the leader.
    cluster.nodes.get_mut(&leader).unwrap().engine.peer_down(member);
    cluster.tick(40);
    assert_eq!(cluster.nodes[&member].engine.lead(G).unwrap().leader, Some(leader));
    assert_eq!(cluster.applied(member, G), ["before"]);
}

#[test]
fn a_leader_over_its_log_memory_refuses_proposals_until_commits_catch_up() {
    const BOUND: u64 = 8 << 10;
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 10);
    for node in cluster.nodes.values_mut() {
        node.engine.config.max_mem_bytes = BOUND;
    }
    let (leader, _) = cluster.elect(G);
    // With both followers away nothing commits, so every entry stays in the leader's memory.
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&id| id != leader).collect();
    cluster.down.extend(others.iter().copied());
    let payload = "x".repeat(1000);
    let mut accepted = 0;
    let held = loop {
        match cluster.propose(leader, G, &payload) {
            Ok(_) => accepted += 1,
            Err(Refusal::Memory { held }) => break held,
            Err(other) => panic!("refused for another reason: {other:?}"),
        }
        assert!(accepted < 100, "{accepted} entries accepted past a bound of {BOUND} bytes");
    };
    assert!(held <= BOUND && held + 1024 > BOUND, "refused at {held} bytes held");
    assert_eq!(cluster.nodes[&leader].engine.mem_bytes(), held);
    // Back: the entries commit and apply, leave memory, and proposals are taken again.
    for other in &others {
        cluster.down.remove(other);
    }
    cluster.tick(40);
    for id in [1, 2, 3] {
        assert_eq!(cluster.applied(id, G).len(), accepted, "node {id}");
    }
    assert!(cluster.nodes[&leader].engine.mem_bytes() < held, "applied entries left memory");
    cluster.propose(leader, G, &payload).expect("taken once the entries are applied");
    // One entry larger than the bound (a large module) is taken once what is held is applied:
    // applied entries kept for lagging followers make room for it.
    cluster.tick(40);
    assert!(cluster.nodes[&leader].engine.mem_bytes() > 0, "applied entries are kept for followers");
    let large = "y".repeat(3 * BOUND as usize);
    cluster.propose(leader, G, &large).expect("a large entry is taken when only applied entries are held");
    cluster.tick(40);
    assert_eq!(cluster.applied(leader, G).last().map(String::len), Some(large.len()));
}

#[test]
fn an_election_lost_while_every_node_is_up_is_run_again_within_a_second() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 9);
    let (leader, _) = cluster.elect(G);
    let behind = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    // The follower misses entries the others commit.
    cluster.cut.insert((leader, behind));
    for i in 0..5 {
        cluster.propose(leader, G, &format!("d{i}")).unwrap();
    }
    cluster.cut.clear();
    // Before it catches up, it is told to take over (as a hand-over to a herder whose log turned
    // out to be behind): a real election in the next term, which it loses. Everyone is up, nobody
    // leads, and no failure detector has anything to report.
    let term = cluster.nodes[&behind].engine.lead(G).unwrap().term;
    let mut timeout_now = Message::default();
    timeout_now.set_msg_type(MessageType::MsgTimeoutNow);
    (timeout_now.from, timeout_now.to, timeout_now.term) = (leader, behind, term);
    cluster.nodes.get_mut(&behind).unwrap().engine.step([Envelope { group: G, message: timeout_now }]);
    cluster.settle();
    assert!(cluster.leader(G).is_none(), "the lagging node's election failed and the leader stepped down");
    assert!(cluster.nodes.values().all(|n| n.engine.lead(G).unwrap().term == term + 1));
    // raft's own timer would wait 30 ticks or more; a leaderless voter campaigns after
    // LEADERLESS_TICKS and its rank's wait.
    let (next, ticks) = cluster.elect(G);
    let most = LEADERLESS_TICKS as usize + 2 * EngineConfig::default().campaign_stagger_ticks as usize + 1;
    assert!(ticks <= most, "a leader after {ticks} ticks, not within {most}");
    assert_ne!(next, behind, "the lagging node cannot win");
    cluster.propose(next, G, "after").unwrap();
    // The commit reaches followers with the next heartbeat.
    cluster.tick(12);
    assert_eq!(cluster.applied(behind, G).last().map(String::as_str), Some("after"));
}

#[test]
fn a_follower_over_its_log_memory_drops_appends_and_asks_for_them_once_its_writes_land() {
    const BOUND: u64 = 8 << 10;
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 11);
    for node in cluster.nodes.values_mut() {
        node.engine.config.max_mem_bytes = BOUND;
    }
    let (leader, _) = cluster.elect(G);
    // One follower's disk stalls: what it receives stays in memory, unwritten. The leader and
    // the other follower commit and apply without it.
    let slow = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    cluster.nodes.get_mut(&slow).unwrap().hold_writes = true;
    let payload = "y".repeat(1000);
    for i in 0..30 {
        cluster.propose(leader, G, &format!("{i}:{payload}")).expect("the leader applies and makes room");
        let held = cluster.nodes[&slow].engine.mem_bytes();
        assert!(held <= BOUND, "the slow follower holds {held} bytes, over its bound of {BOUND}");
    }
    let dropped = cluster.nodes[&slow].engine.appends_dropped();
    assert!(dropped > 0, "the slow follower took every append");
    assert!(cluster.applied(slow, G).is_empty());
    // Its disk comes back: it asks the leader for what it dropped, which comes at once, not
    // with the next heartbeat (no time passes here).
    cluster.nodes.get_mut(&slow).unwrap().hold_writes = false;
    Cluster::flush(cluster.nodes.get_mut(&slow).unwrap());
    cluster.settle();
    let expected: Vec<String> = (0..30).map(|i| format!("{i}:{payload}")).collect();
    assert_eq!(cluster.applied(slow, G), expected, "the slow follower caught up without a heartbeat");
    cluster.tick(60);
    for id in [1, 2, 3] {
        assert_eq!(cluster.applied(id, G), expected, "node {id}");
        assert!(cluster.nodes[&id].engine.mem_bytes() <= BOUND, "node {id}");
    }
}

#[test]
fn under_memory_pressure_durable_entries_leave_memory_before_they_apply_and_are_read_back() {
    let mut cluster = Cluster::new(&[1, 2, 3], &[G], 12);
    let (leader, _) = cluster.elect(G);
    let follower = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    cluster.nodes.get_mut(&follower).unwrap().hold_writes = true;
    for i in 0..5 {
        cluster.propose(leader, G, &format!("entry {i}")).unwrap();
    }
    // The follower's entries become durable but are not applied yet (the commit index reaches it
    // with the next message); room is made for an append larger than the bound, so every durable
    // entry leaves memory.
    let node = cluster.nodes.get_mut(&follower).unwrap();
    assert!(node.engine.mem_bytes() > 0);
    Cluster::flush(node);
    node.hold_writes = false;
    assert!(node.engine.make_room(u64::MAX / 2), "one append always fits once nothing is held");
    assert_eq!(node.engine.mem_bytes(), 0, "durable entries stay in memory");
    assert!(cluster.applied(follower, G).is_empty());
    cluster.tick(20);
    let expected: Vec<String> = (0..5).map(|i| format!("entry {i}")).collect();
    assert_eq!(cluster.applied(follower, G), expected, "read back from the disk and applied in order");
}
